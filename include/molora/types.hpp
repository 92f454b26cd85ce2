// Matrix aliases shared by every header. Activations and PyTorch-layout weights are
// row-major; expert B matrices are stored column-major (see lora.hpp for why).
#pragma once

#include <Eigen/Core>
#include <cstdint>
#include <new>
#include <type_traits>
#include <utility>
#include <vector>

namespace molora {

using Index = Eigen::Index;

template <class Scalar>
using RowMatrix = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

template <class Scalar>
using ColMatrix = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic, Eigen::ColMajor>;

template <class Scalar>
using Vector = Eigen::Matrix<Scalar, Eigen::Dynamic, 1>;

// Expert ids of a Routing: [T, k], int32 as in PyTorch's topk indices after a cast.
using IdMatrix = Eigen::Matrix<std::int32_t, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

// Read-only view of a row-major activation or weight: accepts a Matrix, a Map with any outer
// stride, or a block of either without a copy.
template <class Scalar>
using ConstRowRef = Eigen::Ref<const RowMatrix<Scalar>, 0, Eigen::OuterStride<>>;

// Writable view of a row-major output buffer.
template <class Scalar>
using RowRef = Eigen::Ref<RowMatrix<Scalar>, 0, Eigen::OuterStride<>>;

// A row-major [rows, cols] matrix whose storage only grows: resize() to a size within the
// capacity reuses the buffer, so a workspace that saw a larger batch allocates nothing for a
// smaller one. It is an Eigen::Map over its own buffer (m(t, e), m.row(t), m.data(),
// m == other, m << ..., m.setZero() all work as on a Matrix); assigning an expression resizes
// to the expression's shape first, and copies copy the live rows only. Resizing keeps no
// values. The buffer is a std::vector (the Map is unaligned, as a view of a host's buffer).
template <class T>
class GrowingMatrix : public Eigen::Map<Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>> {
  using Base = Eigen::Map<Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>>;

public:
  GrowingMatrix() : Base(nullptr, 0, 0) {}
  GrowingMatrix(Index rows, Index cols) : Base(nullptr, 0, 0) { resize(rows, cols); }
  GrowingMatrix(const GrowingMatrix& o) : Base(nullptr, 0, 0) { assign(o); }
  GrowingMatrix(GrowingMatrix&& o) noexcept : Base(nullptr, 0, 0), store_(std::move(o.store_)) {
    view(o.rows(), o.cols());
    o.view(0, 0);
  }
  GrowingMatrix& operator=(const GrowingMatrix& o) {
    if (this != &o) assign(o);
    return *this;
  }
  GrowingMatrix& operator=(GrowingMatrix&& o) noexcept {
    if (this != &o) {
      store_ = std::move(o.store_);
      view(o.rows(), o.cols());
      o.view(0, 0);
    }
    return *this;
  }
  template <class Derived>
  GrowingMatrix& operator=(const Eigen::DenseBase<Derived>& other) {
    assign(other);
    return *this;
  }

  // [rows, cols], reallocating only when rows * cols exceeds the capacity; values unspecified.
  void resize(Index rows, Index cols) {
    const auto need = static_cast<std::size_t>(rows * cols);
    if (store_.size() < need) store_.resize(need);
    view(rows, cols);
  }
  // Values the buffer holds without reallocating.
  Index capacity() const { return static_cast<Index>(store_.size()); }

private:
  template <class Other>
  void assign(const Other& o) {
    resize(o.rows(), o.cols());
    if (o.size() > 0) Base::operator=(o);
  }
  // Re-points the Map at the buffer, as Eigen documents for changing a Map's array.
  void view(Index rows, Index cols) { new (static_cast<Base*>(this)) Base(store_.data(), rows, cols); }

  std::vector<T> store_;
};

namespace detail {
template <class Scalar>
constexpr bool is_supported_scalar = std::is_same_v<Scalar, float> || std::is_same_v<Scalar, double>;
}  // namespace detail

}  // namespace molora
