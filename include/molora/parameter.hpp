// Parameter and ParameterList: a trainable tensor as a named pair of flat Eigen Maps, one
// over the parameter's storage and one over its gradient, with the tensor's shape and
// element order. The optimisers (optim.hpp) step a ParameterList and need nothing else; the
// layers' lists are made by parameters() in params.hpp, which sits above the layers.
#pragma once

#include <string>
#include <utility>
#include <vector>

#include "errors.hpp"
#include "types.hpp"

namespace molora {

template <class Scalar>
struct Parameter {
  using Flat = Eigen::Map<Vector<Scalar>>;
  std::string name;
  Flat value;  // the parameter's storage, rows*cols values
  Flat grad;   // its gradient, same size and element order
  Index rows, cols;
  bool column_major;  // element order of value and grad

  Parameter(std::string n, Scalar* v, Scalar* g, Index r, Index c, bool col_major)
      : name(std::move(n)), value(v, r * c), grad(g, r * c), rows(r), cols(c), column_major(col_major) {}

  Index size() const { return rows * cols; }
  // value as a [rows, cols] matrix in its own storage order; asking for the other order
  // throws shape_error naming the parameter.
  Eigen::Map<RowMatrix<Scalar>> shaped_row_major() {
    if (column_major) throw shape_error(detail::mismatch(name + " element order", "row-major", "column-major"));
    return {value.data(), rows, cols};
  }
  Eigen::Map<ColMatrix<Scalar>> shaped_col_major() {
    if (!column_major) throw shape_error(detail::mismatch(name + " element order", "column-major", "row-major"));
    return {value.data(), rows, cols};
  }
};

template <class Scalar>
using ParameterList = std::vector<Parameter<Scalar>>;

// Appends b's views to a (to drive several layers with one optimiser).
template <class Scalar>
void append(ParameterList<Scalar>& a, const ParameterList<Scalar>& b) {
  a.insert(a.end(), b.begin(), b.end());
}

// Total number of trainable values.
template <class Scalar>
Index count_values(const ParameterList<Scalar>& list) {
  Index n = 0;
  for (const auto& p : list) n += p.size();
  return n;
}

template <class Scalar>
void zero_grad(ParameterList<Scalar>& list) {
  for (auto& p : list) p.grad.setZero();
}

}  // namespace molora
