// Parameters as views: every trainable tensor of a layer as a named pair of flat Eigen Maps,
// one over the parameter's storage and one over the matching gradient buffer, so that any
// optimiser (molora::AdamW, or the caller's own) can drive them without knowing the layer.
// Each view covers one contiguous block: the router weight [E, in] and bias [E], and per
// expert e its A block [r, in] (row-major rows of the stacked A) and its B block [out, r]
// (column-major columns of the stacked B). rows/cols/column_major give the tensor's shape and
// element order for a caller that wants it back as a matrix (shaped()).
//
// Names follow PyTorch's state_dict keys of a MixLoRA-style module, with an optional prefix:
// "router.weight", "router.bias" (only when the router has a bias),
// "experts.{e}.lora_A.weight", "experts.{e}.lora_B.weight"; a plain LoRA gives
// "lora_A.weight", "lora_B.weight". The base weight is frozen and is not listed.
//
// The views point into the layer and the gradient buffer: both must outlive the list and
// must not be resized while it is in use.
#pragma once

#include <string>
#include <utility>
#include <vector>

#include "backward.hpp"
#include "lora.hpp"
#include "molora_linear.hpp"
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

// The adapter's trainable tensors with grads' matching buffers. grads must be sized for the
// adapter (MoLoRAGrads(adapter)); throws shape_error otherwise, state_error for a moved-from
// adapter.
template <class Scalar>
ParameterList<Scalar> parameters(MoLoRAAdapter<Scalar>& a, MoLoRAGrads<Scalar>& grads, const std::string& prefix = "") {
  a.check_live();  // views over a moved-from adapter's empty storage would dangle
  const Index E = a.num_experts(), r = a.rank(), in = a.in_features(), out = a.out_features();
  detail::require_rows_cols(grads.router_weight, E, in, "grads.router_weight shape");
  detail::require_rows_cols(grads.router_bias, 1, E, "grads.router_bias shape");
  detail::require_rows_cols(grads.A, E * r, in, "grads.A shape");
  detail::require_rows_cols(grads.B, out, E * r, "grads.B shape");
  ParameterList<Scalar> list;
  list.reserve(static_cast<std::size_t>(2 + 2 * E));
  Router<Scalar>& router = a.router();
  list.emplace_back(prefix + "router.weight", router.mutable_weight().data(), grads.router_weight.data(), E, in, false);
  if (router.has_bias())
    list.emplace_back(prefix + "router.bias", router.mutable_bias().data(), grads.router_bias.data(), E, 1, false);
  Scalar* A = a.mutable_stacked_A().data();
  Scalar* B = a.mutable_stacked_B().data();
  for (Index e = 0; e < E; ++e) {
    const std::string ex = prefix + "experts." + std::to_string(e) + ".";
    list.emplace_back(ex + "lora_A.weight", A + e * r * in, grads.A.data() + e * r * in, r, in, false);
    list.emplace_back(ex + "lora_B.weight", B + e * r * out, grads.B.data() + e * r * out, out, r, true);
  }
  return list;
}

template <class Scalar>
ParameterList<Scalar> parameters(MoLoRALinear<Scalar>& layer, MoLoRAGrads<Scalar>& grads, const std::string& prefix = "") {
  return parameters(layer.adapter(), grads, prefix);
}

// A plain LoRA's A and B.
template <class Scalar>
ParameterList<Scalar> parameters(LoRA<Scalar>& lora, LoRAGrads<Scalar>& grads, const std::string& prefix = "") {
  lora.check_live();
  const Index r = lora.rank(), in = lora.in_features(), out = lora.out_features();
  detail::require_rows_cols(grads.A, r, in, "grads.A shape");
  detail::require_rows_cols(grads.B, out, r, "grads.B shape");
  ParameterList<Scalar> list;
  list.emplace_back(prefix + "lora_A.weight", lora.mutable_A().data(), grads.A.data(), r, in, false);
  list.emplace_back(prefix + "lora_B.weight", lora.mutable_B().data(), grads.B.data(), out, r, true);
  return list;
}

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
