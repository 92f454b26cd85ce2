// LoRA: one low-rank adapter y += s * B (A x), the expert of a MoLoRA layer and, alone, a
// plain PEFT-style LoRA that can be merged into its base weight.
//
// Storage: A is [rank, in] row-major (PyTorch's layout; the shrink reads a row of A against a
// row of x, both contiguous). B has PyTorch's shape [out, rank] but is stored column-major,
// which is B^T [rank, out] row-major: the expand adds s*g*h_j times column j of B to an
// output row, a contiguous axpy. Loaders and setters accept B in any layout.
//
// Weights in 16 bits (inference): LoRA<float, bf16 | f16> keeps A and B in bf16 / f16 with
// the same layouts (a PEFT checkpoint as it ships, io/peft.hpp). Values set are rounded to
// nearest even; delta() and merge() widen them exactly and compute in float, so their
// results are bitwise the float LoRA's holding the widened weights. A(), B(), the mutable
// views and init_peft exist for a Scalar LoRA only (training needs Scalar master weights).
#pragma once

#include <algorithm>
#include <cmath>
#include <string>
#include <type_traits>
#include <vector>

#include "detail/checks.hpp"
#include "errors.hpp"
#include "half.hpp"
#include "numeric.hpp"
#include "types.hpp"

namespace molora {

template <class Scalar, class Weight = Scalar>
class LoRA {
  static_assert(detail::is_supported_scalar<Scalar>, "molora::LoRA supports float and double");
  static_assert(std::is_same_v<Weight, Scalar> || (std::is_same_v<Scalar, float> && detail::is_half<Weight>),
                "molora::LoRA: Weight is Scalar, or bf16 / f16 for a float LoRA");
  static constexpr bool kHalf = !std::is_same_v<Weight, Scalar>;
  template <class W>
  using IfScalar = std::enable_if_t<std::is_same_v<W, Scalar>>;
  template <class W>
  using IfHalf = std::enable_if_t<!std::is_same_v<W, Scalar>>;

public:
  using WeightType = Weight;

  // A zero adapter (A = 0, B = 0). Throws config_error for a zero size, or an alpha whose
  // scaling is not a normal Scalar.
  LoRA(Index in_features, Index out_features, Index rank, double lora_alpha, bool use_rslora = false)
      : in_(in_features), out_(out_features), rank_(rank) {
    detail::require_positive(in_features, "in_features");
    detail::require_positive(out_features, "out_features");
    detail::require_positive(rank, "rank");
    scaling_ = detail::checked_scaling<Scalar>(lora_alpha, rank, use_rslora);
    if constexpr (kHalf) {
      A_.assign(static_cast<std::size_t>(rank * in_features), Weight{});
      B_.assign(static_cast<std::size_t>(rank * out_features), Weight{});
    } else {
      A_.setZero(rank, in_features);
      B_.setZero(out_features, rank);
    }
  }

  Index in_features() const { return in_; }
  Index out_features() const { return out_; }
  Index rank() const { return rank_; }
  Scalar scaling() const { return scaling_; }

  // A [rank, in] and B [out, rank] (a Scalar LoRA; any LoRA has the widened copies below).
  template <class W = Weight, class = IfScalar<W>>
  const RowMatrix<Scalar>& A() const {  // [rank, in]
    return A_;
  }
  template <class W = Weight, class = IfScalar<W>>
  const ColMatrix<Scalar>& B() const {  // [out, rank]
    return B_;
  }
  // Writable views for optimisers and loaders that have checked shapes and values: a Map
  // over the same storage cannot resize it (set_A/set_B check what they copy in).
  template <class W = Weight, class = IfScalar<W>>
  Eigen::Map<RowMatrix<Scalar>> mutable_A() {  // [rank, in]
    return {A_.data(), A_.rows(), A_.cols()};
  }
  template <class W = Weight, class = IfScalar<W>>
  Eigen::Map<ColMatrix<Scalar>> mutable_B() {  // [out, rank]
    return {B_.data(), B_.rows(), B_.cols()};
  }
  // The weights as stored, for any Weight: A [rank, in] row-major, B column-major [out, rank]
  // (B^T [rank, out] row-major).
  const Weight* A_data() const { return A_.data(); }
  const Weight* B_data() const { return B_.data(); }
  // The weights widened exactly to Scalar (copies; for any Weight).
  RowMatrix<Scalar> widened_A() const {
    check_live();
    RowMatrix<Scalar> a(rank_, in_);  // [rank, in]
    for (Index i = 0; i < a.size(); ++i) a.data()[i] = Scalar(to_float(A_.data()[i]));
    return a;
  }
  ColMatrix<Scalar> widened_B() const {
    check_live();
    ColMatrix<Scalar> b(out_, rank_);  // [out, rank]
    for (Index i = 0; i < b.size(); ++i) b.data()[i] = Scalar(to_float(B_.data()[i]));
    return b;
  }

  // Requires: a is [rank, in] with finite entries. Throws shape_error / numeric_error and
  // leaves the adapter unchanged on failure. A 16-bit LoRA rounds each value to nearest even
  // (numeric_error naming the index and value for one past f16's range).
  template <class Derived>
  void set_A(const Eigen::MatrixBase<Derived>& a) {
    detail::require_shape(a, rank_, in_, "lora_A.weight");
    if constexpr (kHalf) {
      std::vector<Weight> v(static_cast<std::size_t>(rank_ * in_));
      for (Index j = 0; j < rank_; ++j)
        for (Index c = 0; c < in_; ++c)
          v[static_cast<std::size_t>(j * in_ + c)] =
              detail::weight_from_float<Weight>(static_cast<double>(a(j, c)), "lora_A.weight", j, c);
      A_.swap(v);
    } else {
      detail::require_finite(a, "lora_A.weight");
      A_ = a.template cast<Scalar>();
    }
  }
  // Requires: b is [out, rank] with finite entries.
  template <class Derived>
  void set_B(const Eigen::MatrixBase<Derived>& b) {
    detail::require_shape(b, out_, rank_, "lora_B.weight");
    if constexpr (kHalf) {
      std::vector<Weight> v(static_cast<std::size_t>(rank_ * out_));  // B^T [rank, out]
      for (Index o = 0; o < out_; ++o)
        for (Index j = 0; j < rank_; ++j)
          v[static_cast<std::size_t>(j * out_ + o)] =
              detail::weight_from_float<Weight>(static_cast<double>(b(o, j)), "lora_B.weight", o, j);
      B_.swap(v);
    } else {
      detail::require_finite(b, "lora_B.weight");
      B_ = b.template cast<Scalar>();
    }
  }
  // A 16-bit LoRA's weights from values as stored (e.g. a checkpoint's tensors, copied): a
  // row-major [rank, in] (PyTorch's lora_A.weight), b row-major [out, rank] (lora_B.weight).
  // Each value checked finite (numeric_error naming the tensor and index); throws (and
  // changes nothing) on a null pointer or a non-finite value.
  template <class W = Weight, class = IfHalf<W>>
  void set_A_stored(const Weight* a) {
    if (!a) throw shape_error(detail::mismatch("lora_A.weight", "a buffer", "a null pointer"));
    for (Index j = 0; j < rank_; ++j)
      for (Index c = 0; c < in_; ++c) detail::require_finite_weight(a[j * in_ + c], "lora_A.weight", j, c);
    A_.assign(a, a + rank_ * in_);
  }
  template <class W = Weight, class = IfHalf<W>>
  void set_B_stored(const Weight* b) {
    if (!b) throw shape_error(detail::mismatch("lora_B.weight", "a buffer", "a null pointer"));
    std::vector<Weight> v(static_cast<std::size_t>(rank_ * out_));  // B^T [rank, out]
    for (Index o = 0; o < out_; ++o)
      for (Index j = 0; j < rank_; ++j) {
        detail::require_finite_weight(b[o * rank_ + j], "lora_B.weight", o, j);
        v[static_cast<std::size_t>(j * out_ + o)] = b[o * rank_ + j];
      }
    B_.swap(v);
  }

  // PEFT's default initialisation: A kaiming-uniform(a = sqrt 5), B zero.
  template <class URBG, class W = Weight, class = IfScalar<W>>
  void init_peft(URBG& gen) {
    detail::kaiming_uniform_sqrt5(A_, gen);
    B_.setZero();
  }

  // s * (x A^T) B^T as an expression, [T, out] for x [T, in]; `y += lora.delta(x)` (a 16-bit
  // LoRA returns the evaluated [T, out] matrix, on the widened weights).
  // Throws shape_error on x's width (when the expression is made), state_error if moved from.
  template <class Derived>
  auto delta(const Eigen::MatrixBase<Derived>& x) const {
    check_live();
    if (x.cols() != in_) throw shape_error(detail::mismatch("x columns (in_features)", in_, x.cols()));
    if constexpr (kHalf) {
      const RowMatrix<Scalar> a = widened_A();  // [rank, in]
      const ColMatrix<Scalar> b = widened_B();  // [out, rank]
      RowMatrix<Scalar> d = ((x * a.transpose()) * b.transpose()) * scaling_;  // [T, out]
      return d;
    } else {
      return ((x * A_.transpose()) * B_.transpose()) * scaling_;
    }
  }

  // W0 += s * B A (PEFT merge). w is [out, in]. Computes the update first and commits only
  // if every merged value is finite (PEFT's safe_merge); throws and leaves w untouched else.
  void merge(RowRef<Scalar> w) const { apply_merge(w, Scalar(1)); }
  // W0 -= s * B A (PEFT unmerge).
  void unmerge(RowRef<Scalar> w) const { apply_merge(w, Scalar(-1)); }

  // Throws state_error if this LoRA was moved from (its A and B no longer have its shape).
  void check_live() const {
    if constexpr (kHalf) {
      if (A_.size() != static_cast<std::size_t>(rank_ * in_) || B_.size() != static_cast<std::size_t>(out_ * rank_))
        throw state_error(detail::cat("LoRA: expected a live adapter with lora_A ", detail::shape_str(rank_, in_),
                                      ", got a moved-from one with ", A_.size(), " lora_A values"));
    } else {
      if (A_.rows() != rank_ || A_.cols() != in_ || B_.rows() != out_ || B_.cols() != rank_)
        throw state_error(detail::cat("LoRA: expected a live adapter with lora_A ", detail::shape_str(rank_, in_),
                                      ", got a moved-from one with lora_A ", detail::shape_str(A_.rows(), A_.cols())));
    }
  }

private:
  void apply_merge(RowRef<Scalar>& w, Scalar sign) const {
    check_live();
    detail::require_shape(w, out_, in_, "base weight");
    RowMatrix<Scalar> merged = w;
    if constexpr (kHalf)
      merged.noalias() += (sign * scaling_) * (widened_B() * widened_A());  // [out, in]
    else
      merged.noalias() += (sign * scaling_) * (B_ * A_);  // [out, in]
    detail::require_finite(merged, "merged weight");
    w = merged;
  }

  Index in_, out_, rank_;
  Scalar scaling_ = 0;
  std::conditional_t<kHalf, std::vector<Weight>, RowMatrix<Scalar>> A_;  // [rank, in]
  std::conditional_t<kHalf, std::vector<Weight>, ColMatrix<Scalar>> B_;  // [out, rank] (B^T row-major)
};

}  // namespace molora
