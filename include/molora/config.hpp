// MoLoRAConfig: every option of a MoLoRA layer as one validated struct (style: options as
// configuration, not forked code). The defaults are MING-MOE's released settings
// (E = 8, k = 2, r = 16, alpha = 32, router with bias, top-k renormalised).
#pragma once

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>

#include "errors.hpp"
#include "types.hpp"

namespace molora {

namespace detail {

// Throws numeric_error if m has a non-finite entry; names the field and the entry.
template <class Derived>
void require_finite(const Eigen::MatrixBase<Derived>& m, const char* field) {
  for (Index i = 0; i < m.rows(); ++i)
    for (Index j = 0; j < m.cols(); ++j)
      if (!std::isfinite(static_cast<double>(m(i, j))))
        throw numeric_error(cat(field, ": expected finite values, got ", m(i, j), " at [", i, ", ", j, "]"));
}

// Throws shape_error naming field unless m is [rows, cols].
template <class Derived>
void require_shape(const Eigen::MatrixBase<Derived>& m, Index rows, Index cols, const char* field) {
  if (m.rows() != rows || m.cols() != cols)
    throw shape_error(mismatch(field, shape_str(rows, cols), shape_str(m.rows(), m.cols())));
}

// s = alpha / r, or alpha / sqrt(r) with rsLoRA, as the layer's Scalar. alpha is checked as a
// double first; then s must be a normal value of Scalar (finite, nonzero, not subnormal),
// else every output would be inf/NaN or the adapter silently zero. Throws config_error
// naming lora_alpha, the range of alpha that gives such an s, and the value.
template <class Scalar>
Scalar checked_scaling(double alpha, Index rank, bool use_rslora) {
  if (!std::isfinite(alpha) || !(alpha > 0))
    throw config_error(mismatch("lora_alpha", "a finite value > 0", alpha));
  const double divisor = use_rslora ? std::sqrt(static_cast<double>(rank)) : static_cast<double>(rank);
  const auto s = static_cast<Scalar>(alpha / divisor);
  if (!std::isnormal(s)) {
    using lim = std::numeric_limits<Scalar>;
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

}  // namespace detail

// How each token's experts are chosen from the router's probabilities.
enum class Selection {
  top_k,     // the k largest probabilities; ties go to the lower expert index
  sampling,  // k distinct experts drawn from softmax(logits) (MING-MOE expert_selection="sampling")
};

inline const char* to_string(Selection s) {
  return s == Selection::top_k ? "top_k" : "sampling";
}

struct MoLoRAConfig {
  Index in_features = 0;    // columns of x and of W0
  Index out_features = 0;   // columns of y, rows of W0
  Index num_experts = 8;    // E
  Index top_k = 2;          // k, 1 <= k <= E; k == E is the dense soft mixture
  Index rank = 16;          // r of every expert
  double lora_alpha = 32;   // scaling = alpha / r (alpha / sqrt(r) with use_rslora)
  bool use_rslora = false;
  bool router_bias = true;       // MING-MOE: true; MoLoRA (Zadouri) and MixLoRA: false
  bool normalize_top_k = true;   // renormalise the k weights to sum 1 (MING-MOE, MixLoRA);
                                 // false: plain masked probabilities (Switch, Zadouri top-k)
  Selection selection = Selection::top_k;

  // Throws config_error naming the first field out of its domain.
  void validate() const {
    auto positive = [](const char* field, Index v) {
      if (v <= 0) throw config_error(detail::mismatch(field, "a value >= 1", v));
    };
    positive("in_features", in_features);
    positive("out_features", out_features);
    positive("num_experts", num_experts);
    positive("rank", rank);
    positive("top_k", top_k);
    if (top_k > num_experts)
      throw config_error(detail::mismatch("top_k", detail::cat("a value <= num_experts (", num_experts, ")"), top_k));
    if (!std::isfinite(lora_alpha) || !(lora_alpha > 0))
      throw config_error(detail::mismatch("lora_alpha", "a finite value > 0", lora_alpha));
    if (selection != Selection::top_k && selection != Selection::sampling)
      throw config_error(detail::mismatch("selection", "top_k or sampling", static_cast<int>(selection)));
  }

  // s in y += s * g * B A x, in double. A layer of Scalar uses scaling_as<Scalar>().
  double scaling() const {
    return use_rslora ? lora_alpha / std::sqrt(static_cast<double>(rank)) : lora_alpha / static_cast<double>(rank);
  }
  // The scaling as a layer of Scalar holds it; throws config_error naming lora_alpha unless
  // it is a normal Scalar (see detail::checked_scaling).
  template <class Scalar>
  Scalar scaling_as() const {
    return detail::checked_scaling<Scalar>(lora_alpha, rank, use_rslora);
  }
};

}  // namespace molora
