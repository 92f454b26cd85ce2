// Argument checks shared by the layers: shapes, finite values, positive sizes, and whether
// two views share memory. Each throws the molora::error its failure calls for (shape_error,
// numeric_error, config_error) with a message naming the field, the expected and the actual
// value. Public entry points call these in every build; the kernels below them check nothing
// (docs/design-notes.md, "Which header holds what").
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <utility>

#include "../errors.hpp"
#include "../types.hpp"

namespace molora::detail {

// Throws shape_error naming field unless m is [rows, cols].
template <class Derived>
void require_shape(const Eigen::MatrixBase<Derived>& m, Index rows, Index cols, const char* field) {
  if (m.rows() != rows || m.cols() != cols)
    throw shape_error(mismatch(field, shape_str(rows, cols), shape_str(m.rows(), m.cols())));
}

// Throws shape_error naming field unless v is a row or a column of n values ("[n]").
template <class Derived>
void require_vector(const Eigen::MatrixBase<Derived>& v, Index n, const char* field) {
  if (v.size() != n || (v.rows() != 1 && v.cols() != 1))
    throw shape_error(mismatch(field, cat("[", n, "]"), shape_str(v.rows(), v.cols())));
}

// Throws config_error naming field unless value >= 1 (a size: features, experts, rank, k).
inline void require_positive(Index value, const char* field) {
  if (value <= 0) throw config_error(mismatch(field, "a value >= 1", value));
}

// [row, col] of m's first non-finite entry in row order, or {-1, -1} when all are finite.
template <class Derived>
std::pair<Index, Index> first_non_finite(const Eigen::MatrixBase<Derived>& m) {
  for (Index i = 0; i < m.rows(); ++i)
    for (Index j = 0; j < m.cols(); ++j)
      if (!std::isfinite(static_cast<double>(m(i, j)))) return {i, j};
  return {-1, -1};
}

// The message of a non-finite entry: "<field>: expected finite values, got <v> at [i, j]".
template <class Derived>
std::string non_finite_message(const Eigen::MatrixBase<Derived>& m, std::pair<Index, Index> at, const std::string& field) {
  return cat(field, ": expected finite values, got ", m(at.first, at.second), " at [", at.first, ", ", at.second, "]");
}

// Throws numeric_error naming the token and column if row t of x has a non-finite value.
template <class Scalar>
void require_finite_token(const ConstRowRef<Scalar>& x, Index t) {
  for (Index j = 0; j < x.cols(); ++j)
    if (!std::isfinite(static_cast<double>(x(t, j))))
      throw numeric_error(cat("x of token ", t, ": expected finite values, got ", x(t, j), " at column ", j));
}

// Whether every entry of a row (or any dense expression) is finite: v * 0 is 0 for a finite
// v and NaN for an infinite or NaN one, so the sum of the products is 0 exactly when all
// are finite. One vectorised pass; Eigen's allFinite() compared entry by entry and cost
// 2.9 us per 1024 floats (a 128-token prompt's check took a sixth of the q projection's
// time on two threads), this 0.1 us.
template <class Derived>
bool all_finite(const Eigen::DenseBase<Derived>& v) {
  using S = typename Derived::Scalar;
  return (v.derived().array() * S(0)).sum() == S(0);
}

// Throws numeric_error if m has a non-finite entry; names the field and the entry. One
// vectorised pass (all_finite) when every entry is finite, which is what a weight's check at
// set or load time costs; the entry-by-entry search only when one is not.
template <class Derived>
void require_finite(const Eigen::MatrixBase<Derived>& m, const char* field) {
  if (all_finite(m)) return;
  const auto at = first_non_finite(m);
  if (at.first >= 0) throw numeric_error(non_finite_message(m, at, field));
}

// Throws numeric_error naming the first token of x with a non-finite value (one vectorised
// pass per row when all are finite).
template <class Scalar>
void require_finite_tokens(const ConstRowRef<Scalar>& x) {
  for (Index t = 0; t < x.rows(); ++t)
    if (!all_finite(x.row(t))) require_finite_token(x, t);
}

// Byte range [first, last] spanned by a strided view: the extreme element offsets come from
// each stride's sign, so a negative stride (a view walking its rows backwards) is covered.
template <class V>
std::pair<std::uintptr_t, std::uintptr_t> byte_range(const V& v) {
  const auto extent = [](Index n, Index stride) {  // {min, max} of i * stride over [0, n)
    const Index far = (n - 1) * stride;
    return std::pair<Index, Index>(std::min<Index>(0, far), std::max<Index>(0, far));
  };
  const auto rows = extent(v.rows(), v.rowStride()), cols = extent(v.cols(), v.colStride());
  const auto size = static_cast<std::intptr_t>(sizeof(*v.data()));
  const auto base = reinterpret_cast<std::intptr_t>(v.data());
  return {static_cast<std::uintptr_t>(base + (rows.first + cols.first) * size),
          static_cast<std::uintptr_t>(base + (rows.second + cols.second + 1) * size - 1)};
}

// True if the memory spanned by two views (any strides, negative included) overlaps.
template <class A, class B>
bool overlaps(const A& a, const B& b) {
  if (a.size() == 0 || b.size() == 0) return false;
  const auto ra = byte_range(a), rb = byte_range(b);
  return ra.first <= rb.second && rb.first <= ra.second;
}

}  // namespace molora::detail
