// LoRA: one low-rank adapter y += s * B (A x), the expert of a MoLoRA layer and, alone, a
// plain PEFT-style LoRA that can be merged into its base weight.
//
// Storage: A is [rank, in] row-major (PyTorch's layout; the shrink reads a row of A against a
// row of x, both contiguous). B has PyTorch's shape [out, rank] but is stored column-major,
// which is B^T [rank, out] row-major: the expand adds s*g*h_j times column j of B to an
// output row, a contiguous axpy. Loaders and setters accept B in any layout.
#pragma once

#include <cmath>

#include "detail/checks.hpp"
#include "errors.hpp"
#include "numeric.hpp"
#include "types.hpp"

namespace molora {

template <class Scalar>
class LoRA {
  static_assert(detail::is_supported_scalar<Scalar>, "molora::LoRA supports float and double");

public:
  // A zero adapter (A = 0, B = 0). Throws config_error for a zero size, or an alpha whose
  // scaling is not a normal Scalar.
  LoRA(Index in_features, Index out_features, Index rank, double lora_alpha, bool use_rslora = false)
      : in_(in_features), out_(out_features), rank_(rank) {
    detail::require_positive(in_features, "in_features");
    detail::require_positive(out_features, "out_features");
    detail::require_positive(rank, "rank");
    scaling_ = detail::checked_scaling<Scalar>(lora_alpha, rank, use_rslora);
    A_.setZero(rank, in_features);
    B_.setZero(out_features, rank);
  }

  Index in_features() const { return in_; }
  Index out_features() const { return out_; }
  Index rank() const { return rank_; }
  Scalar scaling() const { return scaling_; }

  const RowMatrix<Scalar>& A() const { return A_; }  // [rank, in]
  const ColMatrix<Scalar>& B() const { return B_; }  // [out, rank]
  // Writable views for optimisers and loaders that have checked shapes and values: a Map
  // over the same storage cannot resize it (set_A/set_B check what they copy in).
  Eigen::Map<RowMatrix<Scalar>> mutable_A() { return {A_.data(), A_.rows(), A_.cols()}; }  // [rank, in]
  Eigen::Map<ColMatrix<Scalar>> mutable_B() { return {B_.data(), B_.rows(), B_.cols()}; }  // [out, rank]

  // Requires: a is [rank, in] with finite entries. Throws shape_error / numeric_error and
  // leaves the adapter unchanged on failure.
  template <class Derived>
  void set_A(const Eigen::MatrixBase<Derived>& a) {
    detail::require_shape(a, rank_, in_, "lora_A.weight");
    detail::require_finite(a, "lora_A.weight");
    A_ = a.template cast<Scalar>();
  }
  // Requires: b is [out, rank] with finite entries.
  template <class Derived>
  void set_B(const Eigen::MatrixBase<Derived>& b) {
    detail::require_shape(b, out_, rank_, "lora_B.weight");
    detail::require_finite(b, "lora_B.weight");
    B_ = b.template cast<Scalar>();
  }

  // PEFT's default initialisation: A kaiming-uniform(a = sqrt 5), B zero.
  template <class URBG>
  void init_peft(URBG& gen) {
    detail::kaiming_uniform_sqrt5(A_, gen);
    B_.setZero();
  }

  // s * (x A^T) B^T as an expression, [T, out] for x [T, in]; `y += lora.delta(x)`.
  // Throws shape_error on x's width (when the expression is made), state_error if moved from.
  template <class Derived>
  auto delta(const Eigen::MatrixBase<Derived>& x) const {
    check_live();
    if (x.cols() != in_) throw shape_error(detail::mismatch("x columns (in_features)", in_, x.cols()));
    return ((x * A_.transpose()) * B_.transpose()) * scaling_;
  }

  // W0 += s * B A (PEFT merge). w is [out, in]. Computes the update first and commits only
  // if every merged value is finite (PEFT's safe_merge); throws and leaves w untouched else.
  void merge(RowRef<Scalar> w) const { apply_merge(w, Scalar(1)); }
  // W0 -= s * B A (PEFT unmerge).
  void unmerge(RowRef<Scalar> w) const { apply_merge(w, Scalar(-1)); }

  // Throws state_error if this LoRA was moved from (its A and B no longer have its shape).
  void check_live() const {
    if (A_.rows() != rank_ || A_.cols() != in_ || B_.rows() != out_ || B_.cols() != rank_)
      throw state_error(detail::cat("LoRA: expected a live adapter with lora_A ", detail::shape_str(rank_, in_),
                                    ", got a moved-from one with lora_A ", detail::shape_str(A_.rows(), A_.cols())));
  }

private:
  void apply_merge(RowRef<Scalar>& w, Scalar sign) const {
    check_live();
    detail::require_shape(w, out_, in_, "base weight");
    RowMatrix<Scalar> merged = w;
    merged.noalias() += (sign * scaling_) * (B_ * A_);  // [out, in]
    detail::require_finite(merged, "merged weight");
    w = merged;
  }

  Index in_, out_, rank_;
  Scalar scaling_ = 0;
  RowMatrix<Scalar> A_;  // [rank, in]
  ColMatrix<Scalar> B_;  // [out, rank]
};

}  // namespace molora
