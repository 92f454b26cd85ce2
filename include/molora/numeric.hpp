// Numeric formulas every layer and loader shares, each written once: the LoRA scaling
// s = alpha / r (alpha / sqrt(r) with rsLoRA) and its check against the layer's scalar, and
// PyTorch's initialisations (nn.Linear's kaiming-uniform, normal draws) over molora's
// portable random draws (random.hpp).
#pragma once

#include <algorithm>
#include <cmath>
#include <limits>

#include "errors.hpp"
#include "random.hpp"
#include "types.hpp"

namespace molora {

// s in y += s * B A x: lora_alpha / rank, or lora_alpha / sqrt(rank) with rsLoRA, in double.
inline double lora_scaling(double lora_alpha, Index rank, bool use_rslora) {
  const double divisor = use_rslora ? std::sqrt(static_cast<double>(rank)) : static_cast<double>(rank);
  return lora_alpha / divisor;
}

namespace detail {

// lora_scaling as the layer's Scalar. alpha is checked as a double first; then s must be a
// normal value of Scalar (finite, nonzero, not subnormal), else every output would be inf/NaN
// or the adapter silently zero. Throws config_error naming lora_alpha, the range of alpha
// that gives such an s, and the value.
template <class Scalar>
Scalar checked_scaling(double alpha, Index rank, bool use_rslora) {
  if (!std::isfinite(alpha) || !(alpha > 0))
    throw config_error(mismatch("lora_alpha", "a finite value > 0", alpha));
  const auto s = static_cast<Scalar>(lora_scaling(alpha, rank, use_rslora));
  if (!std::isnormal(s)) {
    using lim = std::numeric_limits<Scalar>;
    const double divisor = use_rslora ? std::sqrt(static_cast<double>(rank)) : static_cast<double>(rank);
    const double lo = static_cast<double>(lim::min()) * divisor;
    const double hi = std::min(static_cast<double>(lim::max()) * divisor, std::numeric_limits<double>::max());
    throw config_error(mismatch("lora_alpha",
                                cat("a value in [", lo, ", ", hi, "] (scaling lora_alpha / ",
                                    use_rslora ? "sqrt(rank)" : "rank", " must be a normal ",
                                    sizeof(Scalar) == sizeof(float) ? "float" : "double", ")"),
                                alpha));
  }
  return s;
}

// Fills m with PyTorch's kaiming_uniform_(a = sqrt(5)) for a Linear whose fan_in is
// m.cols(): U(-1/sqrt(fan_in), 1/sqrt(fan_in)), entry by entry in row order.
template <class Derived, class URBG>
void kaiming_uniform_sqrt5(Eigen::MatrixBase<Derived>& m, URBG& gen) {
  const double bound = 1.0 / std::sqrt(static_cast<double>(m.cols()));
  for (Index i = 0; i < m.rows(); ++i)
    for (Index j = 0; j < m.cols(); ++j)
      m(i, j) = static_cast<typename Derived::Scalar>(uniform(gen, -bound, bound));
}

// nn.Linear's bias: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) per entry.
template <class Derived, class URBG>
void linear_bias_uniform(Eigen::MatrixBase<Derived>& b, Index fan_in, URBG& gen) {
  const double bound = 1.0 / std::sqrt(static_cast<double>(fan_in));
  for (Index i = 0; i < b.size(); ++i) b(i) = static_cast<typename Derived::Scalar>(uniform(gen, -bound, bound));
}

// m = std_dev * N(0, 1), entry by entry in row order.
template <class Derived, class URBG>
void normal_fill(Eigen::MatrixBase<Derived>& m, double std_dev, URBG& gen) {
  for (Index i = 0; i < m.rows(); ++i)
    for (Index j = 0; j < m.cols(); ++j) m(i, j) = static_cast<typename Derived::Scalar>(std_dev * normal01(gen));
}

}  // namespace detail
}  // namespace molora
