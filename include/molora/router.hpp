// Router: logits = x W_r^T (+ b_r), one score per expert for each token. MING-MOE's router
// (`switch`) has a bias; MoLoRA (Zadouri) and MixLoRA's `moe_gate` do not. The layers compute
// their logits here, through the shrink kernel (logits_rows); logits() and logits_into() are
// Eigen's product, for callers outside a layer.
#pragma once

#include "detail/checks.hpp"
#include "errors.hpp"
#include "kernels/dispatch_kernels.hpp"
#include "numeric.hpp"
#include "types.hpp"

namespace molora {

template <class Scalar>
class Router {
  static_assert(detail::is_supported_scalar<Scalar>, "molora::Router supports float and double");

public:
  using RowVector = Eigen::Matrix<Scalar, 1, Eigen::Dynamic>;

  // A zero router. Throws config_error for zero sizes.
  Router(Index in_features, Index num_experts, bool has_bias)
      : has_bias_(has_bias) {
    detail::require_positive(in_features, "in_features");
    detail::require_positive(num_experts, "num_experts");
    weight_.setZero(num_experts, in_features);
    bias_.setZero(num_experts);
  }

  Index in_features() const { return weight_.cols(); }
  Index num_experts() const { return weight_.rows(); }
  bool has_bias() const { return has_bias_; }

  const RowMatrix<Scalar>& weight() const { return weight_; }  // [E, in]
  const RowVector& bias() const { return bias_; }              // [E], zero without a bias
  // Writable views for optimisers (shape fixed).
  Eigen::Map<RowMatrix<Scalar>> mutable_weight() { return {weight_.data(), weight_.rows(), weight_.cols()}; }
  Eigen::Map<RowVector> mutable_bias() { return {bias_.data(), bias_.size()}; }

  // Requires w [E, in], finite. Unchanged on failure.
  template <class Derived>
  void set_weight(const Eigen::MatrixBase<Derived>& w) {
    detail::require_shape(w, num_experts(), in_features(), "router.weight");
    detail::require_finite(w, "router.weight");
    weight_ = w.template cast<Scalar>();
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
  template <class URBG>
  void init_uniform(URBG& gen) {
    detail::kaiming_uniform_sqrt5(weight_, gen);
    if (has_bias_) detail::linear_bias_uniform(bias_, in_features(), gen);
  }
  // N(0, std^2) weight, zero bias (MixLoRA: std = 0.02).
  template <class URBG>
  void init_normal(URBG& gen, double std_dev) {
    detail::normal_fill(weight_, std_dev, gen);
    bias_.setZero();
  }

  // logits [T, E] for x [T, in], as an expression. Throws shape_error on x's width when the
  // expression is made.
  template <class Derived>
  auto logits(const Eigen::MatrixBase<Derived>& x) const {
    check_x(x.cols());
    return ((x * weight_.transpose()).rowwise() + bias_);
  }

  // Writes logits into out [T, E] by Eigen's product, which takes its packing buffers from
  // the heap above EIGEN_STACK_ALLOCATION_LIMIT (logits_rows does not). Requires x [T, in],
  // out [T, E]; throws shape_error (out unchanged) otherwise.
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

  bool has_bias_;
  RowMatrix<Scalar> weight_;  // [E, in]
  RowVector bias_;            // [E]
};

}  // namespace molora
