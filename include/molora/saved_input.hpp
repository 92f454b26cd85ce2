// SavedInput: where a training tape finds x at backward
// time (the caller's buffer, or the tape's own copy when x shared memory with y). Also the
// view types the training entry points (lora_train.hpp, backward.hpp) share; their shape
// checks are detail/checks.hpp's.
#pragma once

#include <algorithm>
#include <cstdint>
#include <utility>

#include "detail/checks.hpp"
#include "errors.hpp"
#include "types.hpp"

namespace molora::detail {

// Views whose Scalar is not deduced from the argument (it comes from the layer), so a
// RowMatrix or Map converts to them at a call.
template <class T>
struct no_deduce {
  using type = T;
};
template <class Scalar>
using InRef = typename no_deduce<ConstRowRef<Scalar>>::type;
template <class Scalar>
using OutRef = typename no_deduce<RowRef<Scalar>>::type;

// Where a tape finds x: the caller's buffer (kept alive and unchanged until backward) or the
// tape's own copy when x shared memory with y.
template <class Scalar>
struct SavedInput {
  const Scalar* data = nullptr;
  Index rows = 0, cols = 0, stride = 0;
  bool owned = false;
  RowMatrix<Scalar> copy;

  using View = Eigen::Map<const RowMatrix<Scalar>, 0, Eigen::OuterStride<>>;

  template <class Y>
  void save(const ConstRowRef<Scalar>& x, const Y& y) {
    owned = overlaps(x, y);
    if (owned) copy = x;
    data = x.data();
    rows = x.rows();
    cols = x.cols();
    stride = x.outerStride();
  }
  View view() const {
    if (owned) return View(copy.data(), copy.rows(), copy.cols(), Eigen::OuterStride<>(copy.cols()));
    return View(data, rows, cols, Eigen::OuterStride<>(stride));
  }
};

// Throws shape_error naming the field unless x's record on a tape is a [T, in] input.
template <class Scalar>
void check_saved_input(const SavedInput<Scalar>& x, Index in) {
  if (x.cols != in) throw shape_error(mismatch("tape.x columns (in_features)", in, x.cols));
  if (x.owned && (x.copy.rows() != x.rows || x.copy.cols() != x.cols))
    throw shape_error(mismatch("tape.x copy", shape_str(x.rows, x.cols), shape_str(x.copy.rows(), x.copy.cols())));
  if (!x.owned && x.rows > 0 && x.data == nullptr)
    throw shape_error(mismatch("tape.x", shape_str(x.rows, x.cols), "no data"));
}

}  // namespace molora::detail
