// MoLoRAConfig: every option of a MoLoRA layer as one validated struct (style: options as
// configuration, not forked code). The defaults are MING-MOE's released settings
// (E = 8, k = 2, r = 16, alpha = 32, router with bias, top-k renormalised).
#pragma once

#include <cmath>
#include <string>

#include "detail/checks.hpp"
#include "errors.hpp"
#include "numeric.hpp"
#include "types.hpp"

namespace molora {

// How each token's experts are chosen from the router's probabilities.
enum class Selection {
  top_k,     // the k largest probabilities; ties go to the lower expert index
  sampling,  // k distinct experts drawn from softmax(logits) (MING-MOE expert_selection="sampling")
};

inline const char* to_string(Selection s) {
  return s == Selection::top_k ? "top_k" : "sampling";
}

struct MoLoRAConfig {
  Index in_features = 0;    // columns of x and of W0
  Index out_features = 0;   // columns of y, rows of W0
  Index num_experts = 8;    // E
  Index top_k = 2;          // k, 1 <= k <= E; k == E is the dense soft mixture
  Index rank = 16;          // r of every expert
  double lora_alpha = 32;   // scaling = alpha / r (alpha / sqrt(r) with use_rslora)
  bool use_rslora = false;
  bool router_bias = true;       // MING-MOE: true; MoLoRA (Zadouri) and MixLoRA: false
  bool normalize_top_k = true;   // renormalise the k weights to sum 1 (MING-MOE, MixLoRA);
                                 // false: plain masked probabilities (Switch, Zadouri top-k)
  Selection selection = Selection::top_k;

  // Throws config_error naming the first field out of its domain.
  void validate() const {
    detail::require_positive(in_features, "in_features");
    detail::require_positive(out_features, "out_features");
    detail::require_positive(num_experts, "num_experts");
    detail::require_positive(rank, "rank");
    detail::require_positive(top_k, "top_k");
    if (top_k > num_experts)
      throw config_error(detail::mismatch("top_k", detail::cat("a value <= num_experts (", num_experts, ")"), top_k));
    if (!std::isfinite(lora_alpha) || !(lora_alpha > 0))
      throw config_error(detail::mismatch("lora_alpha", "a finite value > 0", lora_alpha));
    if (selection != Selection::top_k && selection != Selection::sampling)
      throw config_error(detail::mismatch("selection", "top_k or sampling", static_cast<int>(selection)));
  }

  // s in y += s * g * B A x, in double. A layer of Scalar uses scaling_as<Scalar>().
  double scaling() const { return lora_scaling(lora_alpha, rank, use_rslora); }
  // The scaling as a layer of Scalar holds it; throws config_error naming lora_alpha unless
  // it is a normal Scalar (see detail::checked_scaling).
  template <class Scalar>
  Scalar scaling_as() const {
    return detail::checked_scaling<Scalar>(lora_alpha, rank, use_rslora);
  }
};

}  // namespace molora
