// Router: logits = x W_r^T (+ b_r), one score per expert for each token. MING-MOE's router
// (`switch`) has a bias; MoLoRA (Zadouri) and MixLoRA's `moe_gate` do not. The layers compute
// their logits here, through the shrink kernel (logits_rows); logits() and logits_into() are
// Eigen's product, for callers outside a layer.
//
// Weight: the weight's storage type, Scalar or (float routers, inference) bf16 / f16, set
// rounded to nearest even and widened exactly by the kernel; the bias stays Scalar.
#pragma once

#include <type_traits>
#include <vector>

#include "detail/checks.hpp"
#include "half.hpp"
#include "errors.hpp"
#include "kernels/dispatch_kernels.hpp"
#include "numeric.hpp"
#include "types.hpp"

namespace molora {

template <class Scalar, class Weight = Scalar>
class Router {
  static_assert(detail::is_supported_scalar<Scalar>, "molora::Router supports float and double");
  static_assert(std::is_same_v<Weight, Scalar> || (std::is_same_v<Scalar, float> && detail::is_half<Weight>),
                "molora::Router: Weight is Scalar, or bf16 / f16 for a float router");
  static constexpr bool kHalf = !std::is_same_v<Weight, Scalar>;

public:
  using RowVector = Eigen::Matrix<Scalar, 1, Eigen::Dynamic>;
  using WeightType = Weight;

  // A zero router. Throws config_error for zero sizes.
  Router(Index in_features, Index num_experts, bool has_bias)
      : has_bias_(has_bias), in_features_(in_features), num_experts_(num_experts) {
    detail::require_positive(in_features, "in_features");
    detail::require_positive(num_experts, "num_experts");
    if constexpr (kHalf)
      weight_.assign(static_cast<std::size_t>(num_experts * in_features), Weight{});
    else
      weight_.setZero(num_experts, in_features);
    bias_.setZero(num_experts);
  }

  Index in_features() const { return in_features_; }
  Index num_experts() const { return num_experts_; }
  bool has_bias() const { return has_bias_; }
  // Whether the weight still has its shape (false once moved from).
  bool live() const { return weight_size() == num_experts_ * in_features_; }

  // The weight [E, in] row-major as stored (null when moved from).
  const Weight* weight_data() const { return weight_size() > 0 ? weight_.data() : nullptr; }
  template <class W = Weight, class = std::enable_if_t<std::is_same_v<W, Scalar>>>
  const RowMatrix<Scalar>& weight() const {  // [E, in]
    return weight_;
  }
  const RowVector& bias() const { return bias_; }  // [E], zero without a bias
  // Writable views for optimisers (shape fixed; a Scalar weight only: training keeps its
  // master weights in Scalar).
  template <class W = Weight, class = std::enable_if_t<std::is_same_v<W, Scalar>>>
  Eigen::Map<RowMatrix<Scalar>> mutable_weight() {
    return {weight_.data(), weight_.rows(), weight_.cols()};
  }
  Eigen::Map<RowVector> mutable_bias() { return {bias_.data(), bias_.size()}; }

  // Requires w [E, in], finite (a 16-bit weight: rounded to nearest even; numeric_error
  // naming the index and value for one past f16's range). Unchanged on failure.
  template <class Derived>
  void set_weight(const Eigen::MatrixBase<Derived>& w) {
    detail::require_shape(w, num_experts(), in_features(), "router.weight");
    if constexpr (kHalf) {
      std::vector<Weight> v(static_cast<std::size_t>(num_experts() * in_features()));
      for (Index e = 0; e < num_experts(); ++e)
        for (Index i = 0; i < in_features(); ++i)
          v[static_cast<std::size_t>(e * in_features() + i)] =
              detail::weight_from_float<Weight>(static_cast<double>(w(e, i)), "router.weight", e, i);
      weight_.swap(v);
    } else {
      detail::require_finite(w, "router.weight");
      weight_ = w.template cast<Scalar>();
    }
  }
  // A 16-bit weight from values as stored (row-major [E, in], e.g. a checkpoint's tensor),
  // copied; each checked finite (numeric_error naming the index). Unchanged on failure.
  template <class W = Weight, class = std::enable_if_t<!std::is_same_v<W, Scalar>>>
  void set_weight_stored(const Weight* w, Index rows, Index cols) {
    if (rows != num_experts() || cols != in_features())
      throw shape_error(detail::mismatch("router.weight", detail::shape_str(num_experts(), in_features()),
                                         detail::shape_str(rows, cols)));
    for (Index e = 0; e < rows; ++e)
      for (Index i = 0; i < cols; ++i) detail::require_finite_weight(w[e * cols + i], "router.weight", e, i);
    weight_.assign(w, w + rows * cols);
  }
  // Requires a router with a bias, and b with E entries (row or column), finite.
  template <class Derived>
  void set_bias(const Eigen::MatrixBase<Derived>& b) {
    if (!has_bias_) throw config_error("router.bias: expected no bias (router_bias = false), got a bias tensor");
    detail::require_vector(b, num_experts(), "router.bias");
    detail::require_finite(b, "router.bias");
    for (Index e = 0; e < num_experts(); ++e) bias_(e) = static_cast<Scalar>(b(e));
  }

  // PyTorch's nn.Linear default: weight and bias U(-1/sqrt(in), 1/sqrt(in)) (MING-MOE).
  // A 16-bit weight draws the same values and rounds them.
  template <class URBG>
  void init_uniform(URBG& gen) {
    if constexpr (kHalf) {
      RowMatrix<Scalar> w(num_experts(), in_features());
      detail::kaiming_uniform_sqrt5(w, gen);
      set_weight(w);
    } else {
      detail::kaiming_uniform_sqrt5(weight_, gen);
    }
    if (has_bias_) detail::linear_bias_uniform(bias_, in_features(), gen);
  }
  // N(0, std^2) weight, zero bias (MixLoRA: std = 0.02).
  template <class URBG>
  void init_normal(URBG& gen, double std_dev) {
    if constexpr (kHalf) {
      RowMatrix<Scalar> w(num_experts(), in_features());
      detail::normal_fill(w, std_dev, gen);
      set_weight(w);
    } else {
      detail::normal_fill(weight_, std_dev, gen);
    }
    bias_.setZero();
  }

  // logits [T, E] for x [T, in], as an expression (a Scalar weight). Throws shape_error on
  // x's width when the expression is made.
  template <class Derived, class W = Weight, class = std::enable_if_t<std::is_same_v<W, Scalar>>>
  auto logits(const Eigen::MatrixBase<Derived>& x) const {
    check_x(x.cols());
    return ((x * weight_.transpose()).rowwise() + bias_);
  }

  // Writes logits into out [T, E] by Eigen's product (a Scalar weight), which takes its
  // packing buffers from the heap above EIGEN_STACK_ALLOCATION_LIMIT (logits_rows does not).
  // Requires x [T, in], out [T, E]; throws shape_error (out unchanged) otherwise.
  template <class W = Weight, class = std::enable_if_t<std::is_same_v<W, Scalar>>>
  void logits_into(const ConstRowRef<Scalar>& x, RowRef<Scalar> out) const {
    check_x(x.cols());
    detail::require_shape(out, x.rows(), num_experts(), "router logits");
    out.noalias() = x * weight_.transpose();  // [T, E]
    if (has_bias_) out.rowwise() += bias_;
  }

  // Scalars of scratch one logits_rows call needs.
  Index logits_scratch_size() const {
    return kernels::fused_scratch_size<kernels::layer_arch, Scalar>(num_experts());
  }

  // Rows [t_begin, t_end) of out [T, E] = those rows of x [T, in] times W_r^T, plus b_r, by
  // the shrink kernel: no heap use (Eigen's GEMM takes its packing buffers from the heap
  // above EIGEN_STACK_ALLOCATION_LIMIT), and a token's bits do not depend on the range, the
  // batch or the thread count (the same values as logits_into up to rounding). Threads given
  // disjoint ranges and their own scratch (logits_scratch_size() values) may call it at once.
  // Requires x [T, in], out [T, E], 0 <= t_begin <= t_end <= T, scratch non-null; throws
  // shape_error / config_error (out unchanged) otherwise.
  void logits_rows(const ConstRowRef<Scalar>& x, RowRef<Scalar>& out, Index t_begin, Index t_end,
                   Scalar* scratch) const {
    check_x(x.cols());
    detail::require_shape(out, x.rows(), num_experts(), "router logits");
    if (t_begin < 0 || t_begin > t_end || t_end > x.rows())
      throw shape_error(detail::mismatch("router logits token range", detail::cat("within [0, ", x.rows(), "]"),
                                         detail::cat("[", t_begin, ", ", t_end, ")")));
    if (scratch == nullptr) throw config_error("router logits scratch: expected logits_scratch_size() values, got null");
    kernels::dense_rows(kernels::layer_arch{}, weight_.data(), in_features(), num_experts(), in_features(), x.data(),
                        x.outerStride(), out.data(), out.outerStride(), t_begin, t_end, scratch);  // [t1 - t0, E]
    if (has_bias_) out.middleRows(t_begin, t_end - t_begin).rowwise() += bias_;
  }

private:
  void check_x(Index cols) const {
    if (cols != in_features()) throw shape_error(detail::mismatch("router x columns (in_features)", in_features(), cols));
  }

  Index weight_size() const { return static_cast<Index>(weight_.size()); }

  bool has_bias_;
  Index in_features_, num_experts_;
  std::conditional_t<kHalf, std::vector<Weight>, RowMatrix<Scalar>> weight_;  // [E, in]
  RowVector bias_;                                                            // [E]
};

}  // namespace molora
