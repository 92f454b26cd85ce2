// Parameters of the layers as views (parameter.hpp): every trainable tensor of a layer as a
// named pair of flat Eigen Maps, one over the parameter's storage and one over the matching
// gradient buffer, so that any optimiser (molora::AdamW, or the caller's own) can drive them
// without knowing the layer. Each view covers one contiguous block: the router weight [E, in]
// and bias [E], and per expert e its A block [r, in] (row-major rows of the stacked A) and
// its B block [out, r] (column-major columns of the stacked B).
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
#include <vector>

#include "backward.hpp"
#include "detail/checks.hpp"
#include "lora.hpp"
#include "molora_linear.hpp"
#include "parameter.hpp"
#include "types.hpp"

namespace molora {

// The adapter's trainable tensors with grads' matching buffers. grads must be sized for the
// adapter (MoLoRAGrads(adapter)); throws shape_error otherwise, state_error for a moved-from
// adapter.
template <class Scalar, class AdapterWeight>
ParameterList<Scalar> parameters(MoLoRAAdapter<Scalar, AdapterWeight>& a, MoLoRAGrads<Scalar>& grads,
                                 const std::string& prefix = "") {
  static_assert(detail::require_trainable_adapter<Scalar, AdapterWeight>());
  a.check_live();  // views over a moved-from adapter's empty storage would dangle
  const Index E = a.num_experts(), r = a.rank(), in = a.in_features(), out = a.out_features();
  detail::require_shape(grads.router_weight, E, in, "grads.router_weight shape");
  detail::require_shape(grads.router_bias, 1, E, "grads.router_bias shape");
  detail::require_shape(grads.A, E * r, in, "grads.A shape");
  detail::require_shape(grads.B, out, E * r, "grads.B shape");
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

// The layer's adapter (its base, float or 16-bit, is frozen and not listed).
template <class Scalar, class BaseWeight, class AdapterWeight>
ParameterList<Scalar> parameters(MoLoRALinear<Scalar, BaseWeight, AdapterWeight>& layer, MoLoRAGrads<Scalar>& grads,
                                 const std::string& prefix = "") {
  return parameters(layer.adapter(), grads, prefix);
}

// A plain LoRA's A and B.
template <class Scalar>
ParameterList<Scalar> parameters(LoRA<Scalar>& lora, LoRAGrads<Scalar>& grads, const std::string& prefix = "") {
  lora.check_live();
  const Index r = lora.rank(), in = lora.in_features(), out = lora.out_features();
  detail::require_shape(grads.A, r, in, "grads.A shape");
  detail::require_shape(grads.B, out, r, "grads.B shape");
  ParameterList<Scalar> list;
  list.emplace_back(prefix + "lora_A.weight", lora.mutable_A().data(), grads.A.data(), r, in, false);
  list.emplace_back(prefix + "lora_B.weight", lora.mutable_B().data(), grads.B.data(), out, r, true);
  return list;
}

}  // namespace molora
