// A plain linear layer, y = x W^T + b, the base product of MoLoRALinear as a building block
// for a host's other projections (attention, the LM head). W [out, in] row-major as PyTorch
// stores it, in its own type: float, double (for a double layer), or bf16 / f16 for a float
// layer (activations and accumulation stay float, weights widen exactly in registers, so the
// outputs are those of a float layer holding the rounded weights). The layer owns its
// weights or wraps a host's buffer without a copy. Same kernels and strategy switch as
// MoLoRALinear's base: skinny_product for few tokens, above the crossover gemm_product for
// float (16-bit weights widened while packed) and Eigen's GEMM for double. docs/design-notes.md,
// "Weights in their own type", "The base product for few tokens" and "... for many tokens".
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "base_product.hpp"
#include "config.hpp"
#include "detail/aligned.hpp"
#include "detail/checks.hpp"
#include "errors.hpp"
#include "half.hpp"
#include "types.hpp"

namespace molora {

template <class Scalar, class Weight = Scalar>
class Linear {
  static_assert(detail::is_supported_scalar<Scalar>, "molora::Linear supports float and double activations");
  static_assert(detail::is_weight_for<Scalar, Weight>,
                "molora::Linear: Weight is Scalar, or bf16 / f16 with float activations");

public:
  using weight_type = Weight;

  // A zero weight [out, in] (owned), no bias. Throws config_error unless in, out >= 1.
  Linear(Index in_features, Index out_features) : in_(in_features), out_(out_features) {
    if (in_features < 1) throw config_error(detail::mismatch("Linear in_features", "a value >= 1", in_features));
    if (out_features < 1) throw config_error(detail::mismatch("Linear out_features", "a value >= 1", out_features));
    owned_weight_.assign(static_cast<std::size_t>(in_ * out_), Weight{});
  }

  Index in_features() const { return in_; }
  Index out_features() const { return out_; }

  // How the product is computed (default automatic, see BaseStrategy).
  void set_strategy(BaseStrategy s) { strategy_ = s; }
  BaseStrategy strategy() const { return strategy_; }
  BaseStrategy resolved_strategy(Index num_tokens) const {
    return detail::resolve_base_strategy<Scalar, Weight>(strategy_, num_tokens, in_);
  }

  // Opt-in for bf16 weights (default off): the activations are rounded to bf16 (to nearest
  // even) before the product, whose pairs of products then run on AVX512_BF16's dot
  // instruction where the CPU has it (kernels::bf16_dot_available(): with the strategy
  // automatic, the bf16-dot GEMM from detail::kBf16DotGemmFrom tokens on, below it the exact
  // skinny kernel on the rounded activations; see detail::base_product_bf16dot for what each
  // strategy runs; rows or outputs split between OpenMP threads with the bits of one thread). The output
  // differs from the exact path by the activations' rounding, at most 2^-8 sum_i |w_i x_i|
  // per output, plus float summation error (tests/test_linear.cpp checks this bound).
  template <class W = Weight, class = std::enable_if_t<std::is_same_v<W, bf16>>>
  void set_bf16_dot(bool on) {
    bf16_dot_ = on;
  }
  bool bf16_dot() const { return bf16_dot_; }

  // ---- weights ---------------------------------------------------------------------------

  // Copies w [out, in] (any Eigen expression, any scalar) into an owned weight, each value
  // rounded to Weight (to nearest, ties to even); stops wrapping. Throws shape_error, or
  // numeric_error naming the index and the value of a non-finite value or one out of
  // Weight's range (f16: above 65504 after rounding). The layer is unchanged when it throws.
  template <class Derived>
  void set_weight(const Eigen::MatrixBase<Derived>& w) {
    detail::require_shape(w, out_, in_, "Linear weight");
    detail::aligned_vector<Weight> v(static_cast<std::size_t>(in_ * out_));
    for (Index o = 0; o < out_; ++o)
      for (Index i = 0; i < in_; ++i)
        v[static_cast<std::size_t>(o * in_ + i)] =
            detail::weight_from_float<Weight>(static_cast<double>(w(o, i)), "Linear weight", o, i);
    owned_weight_.swap(v);
    wrapped_weight_ = nullptr;
  }
  // Copies out * in values of Weight (row-major [out, in]), checked finite.
  void set_weight(const Weight* w, Index out, Index in) {
    check_buffer(w, out, in, "Linear weight");
    owned_weight_.assign(w, w + in_ * out_);
    wrapped_weight_ = nullptr;
  }
  // Copies raw 16-bit patterns (row-major [out, in]) as stored in a bf16 / f16 checkpoint.
  template <class W = Weight, class = std::enable_if_t<detail::is_half<W>>>
  void set_weight_bits(const std::uint16_t* bits, Index out, Index in) {
    check_dims(bits, out, in, "Linear weight bits");
    detail::aligned_vector<Weight> v(static_cast<std::size_t>(in_ * out_));
    std::memcpy(v.data(), bits, v.size() * sizeof(Weight));
    check_finite(v.data(), "Linear weight bits");
    owned_weight_.swap(v);
    wrapped_weight_ = nullptr;
  }
  // Uses the host's buffer w (row-major [out, in] of Weight) as the weight, without a copy.
  // Lifetime: the buffer must stay alive, and keep finite values, for as long as this layer
  // (or a copy of it, which wraps the same buffer) runs forward with it; set_weight or
  // another wrap_weight ends the use. Its values are checked once, here. Throws
  // shape_error / numeric_error and leaves the layer unchanged.
  void wrap_weight(const Weight* w, Index out, Index in) {
    check_buffer(w, out, in, "wrapped Linear weight");
    wrapped_weight_ = w;
    owned_weight_.clear();
    owned_weight_.shrink_to_fit();
  }
  bool wraps_weight() const { return wrapped_weight_ != nullptr; }
  // The weight as stored, row-major [out, in] (null in a moved-from layer).
  const Weight* weight_data() const { return wrapped_weight_ ? wrapped_weight_ : owned_weight_.data(); }
  // The weight widened to Scalar, [out, in] (a copy).
  RowMatrix<Scalar> widened_weight() const {
    RowMatrix<Scalar> m(out_, in_);
    const Weight* w = weight_data();
    for (Index o = 0; o < out_; ++o)
      for (Index i = 0; i < in_; ++i) m(o, i) = static_cast<Scalar>(to_float(w[o * in_ + i]));
    return m;
  }

  // Bias [out] in Scalar (row or column, finite), owned. Throws shape_error / numeric_error.
  template <class Derived>
  void set_bias(const Eigen::MatrixBase<Derived>& b) {
    if (b.size() != out_ || (b.rows() != 1 && b.cols() != 1))
      throw shape_error(detail::mismatch("Linear bias", detail::cat("[", out_, "]"), detail::shape_str(b.rows(), b.cols())));
    detail::require_finite(b, "Linear bias");
    bias_.resize(out_);
    for (Index o = 0; o < out_; ++o) bias_(o) = static_cast<Scalar>(b(o));
  }
  void clear_bias() { bias_.resize(0); }
  bool has_bias() const { return bias_.size() > 0; }
  const Vector<Scalar>& bias() const { return bias_; }

  // ---- forward ---------------------------------------------------------------------------

  // y = x W^T (+ b) for x [T, in] (any Eigen expression; row-major without a copy), y [T, out]
  // row-major. x and y may share memory (x is then copied first). Throws shape_error, or
  // numeric_error naming the first token of x with a non-finite value; y is unchanged then.
  template <class Derived>
  void forward(const Eigen::MatrixBase<Derived>& x, RowRef<Scalar> y) const {
    ConstRowRef<Scalar> xr(x);
    if (xr.cols() != in_) throw shape_error(detail::mismatch("x columns (in_features)", in_, xr.cols()));
    if (y.rows() != xr.rows() || y.cols() != out_)
      throw shape_error(detail::mismatch("y shape", detail::shape_str(xr.rows(), out_), detail::shape_str(y.rows(), y.cols())));
    check_live();
    detail::require_finite_tokens(xr);
    if (xr.rows() == 0) return;
    if (detail::overlaps(xr, y)) {
      const RowMatrix<Scalar> copy = xr;
      product(ConstRowRef<Scalar>(copy), y);
    } else {
      product(xr, y);
    }
  }
  // Allocating convenience: returns y [T, out].
  template <class Derived>
  RowMatrix<Scalar> forward(const Eigen::MatrixBase<Derived>& x) const {
    RowMatrix<Scalar> y(x.rows(), out_);
    forward(x, y);
    return y;
  }

  // Throws state_error if this layer was moved from (it then holds no weight).
  void check_live() const {
    if (!wrapped_weight_ && owned_weight_.size() != static_cast<std::size_t>(in_ * out_))
      throw state_error(detail::cat("Linear: expected a live layer with weight ", detail::shape_str(out_, in_),
                                    ", got a moved-from one holding ", owned_weight_.size(), " weights"));
  }

private:
  template <class P>
  void check_dims(const P* p, Index out, Index in, const char* field) const {
    if (out != out_ || in != in_) throw shape_error(detail::mismatch(field, detail::shape_str(out_, in_), detail::shape_str(out, in)));
    if (!p) throw shape_error(detail::mismatch(field, "a buffer", "a null pointer"));
  }
  void check_finite(const Weight* w, const char* field) const {
    for (Index o = 0; o < out_; ++o)
      for (Index i = 0; i < in_; ++i) detail::require_finite_weight(w[o * in_ + i], field, o, i);
  }
  void check_buffer(const Weight* w, Index out, Index in, const char* field) const {
    check_dims(w, out, in, field);
    check_finite(w, field);
  }

  void product(const ConstRowRef<Scalar>& x, RowRef<Scalar>& y) const {
    const Scalar* b = has_bias() ? bias_.data() : nullptr;
    const BaseStrategy how = resolved_strategy(x.rows());
    if constexpr (std::is_same_v<Weight, bf16>) {
      if (bf16_dot_) return detail::base_product_bf16dot(weight_data(), in_, out_, b, x, y, strategy_);
    }
    detail::base_product(weight_data(), in_, out_, b, x, y, how);
  }

  Index in_, out_;
  detail::aligned_vector<Weight> owned_weight_;  // [out, in] row-major unless wrapping, 64-byte aligned
  const Weight* wrapped_weight_ = nullptr;
  Vector<Scalar> bias_;               // [out] or empty
  BaseStrategy strategy_ = BaseStrategy::automatic;
  bool bf16_dot_ = false;
};

}  // namespace molora
