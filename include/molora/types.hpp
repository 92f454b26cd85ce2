// Matrix aliases shared by every header. Activations and PyTorch-layout weights are
// row-major; expert B matrices are stored column-major (see lora.hpp for why).
#pragma once

#include <Eigen/Core>
#include <cstdint>

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

namespace detail {
template <class Scalar>
constexpr bool is_supported_scalar = std::is_same_v<Scalar, float> || std::is_same_v<Scalar, double>;
}  // namespace detail

}  // namespace molora
