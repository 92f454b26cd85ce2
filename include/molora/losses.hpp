// Auxiliary router losses of MoE training: the Switch/Mixtral load-balancing loss and the
// router z-loss. Each reads a training tape (tape.hpp) after the training forward,
// returns its value and adds its gradient with respect to the router logits into
// tape.logit_grad, which the backward then carries into dL/dW_r, dL/db_r and dL/dx.
//
// Load balancing, as transformers' load_balancing_loss_func (Mixtral) and MixLoRA's
// _mixtral_load_balancing_loss_func compute it, over N token rows (several layers' rows
// concatenated, as MixLoRA does with its per-layer router logits):
//
//     f_e = (1/N) * #{rows whose selected experts include e}   (sum_e f_e = k)
//     P_e = (1/N) * sum_rows softmax(logits_row)_e             (sum_e P_e = 1)
//     L   = coef * E * sum_e f_e * P_e                          (k * coef when balanced)
//
// f is a count and gets no gradient; dL/dlogit_{t,j} = p_tj (c_j - sum_e p_te c_e) with
// c_e = coef * E * f_e / N. f counts the experts the forward used (for top-k routing the
// same as Mixtral's top-k of the softmax; for sampling the drawn experts).
//
// Router z-loss (ST-MoE; MixLoRA's switch strategy), per layer over its T tokens:
//
//     L = coef * (1/T) * sum_t logsumexp(logits_t)^2,  dL/dlogit_{t,j} = coef * 2 z_t p_tj / T.
#pragma once

#include <algorithm>
#include <cmath>
#include <vector>

#include "detail/checks.hpp"
#include "errors.hpp"
#include "tape.hpp"
#include "types.hpp"

namespace molora {

namespace detail {

// Also checks the sizes the losses index with (a tape is a public struct).
template <class Scalar>
void require_router_tape(const MoLoRATape<Scalar>& tape, const char* loss) {
  if (!tape.has_router)
    throw config_error(cat(loss, ": expected a tape from a forward that ran the router, got one with caller-supplied routing"));
  const Index T = tape.num_tokens(), E = tape.logits.cols();
  require_shape(tape.logits, T, E, "tape.logits shape");
  require_shape(tape.probs, T, E, "tape.probs shape");
  require_shape(tape.logit_grad, T, E, "tape.logit_grad shape");
  if (tape.routing.num_tokens() != T) throw shape_error(mismatch("tape.routing rows (tokens)", T, tape.routing.num_tokens()));
  for (Index t = 0; t < T; ++t)
    for (Index s = 0; s < tape.routing.top_k(); ++s)
      if (tape.routing.ids(t, s) < 0 || tape.routing.ids(t, s) >= E)
        throw shape_error(detail::mismatch(cat("tape.routing.ids of token ", t, " slot ", s), cat("[0, ", E, ")"),
                                   tape.routing.ids(t, s)));
}

}  // namespace detail

// Load-balancing loss over the token rows of several layers' tapes taken together (MixLoRA's
// concatenated router logits), all with the same number of experts. Returns its value and
// adds its gradient into each tape's logit_grad. Call after the training forwards and before
// the backwards. Throws config_error for a tape without router, shape_error for differing E.
template <class Scalar>
double load_balancing_loss(const std::vector<MoLoRATape<Scalar>*>& tapes, double coef) {
  if (tapes.empty()) return 0;
  const Index E = tapes.front()->logits.cols();
  Vector<double> count = Vector<double>::Zero(E), prob = Vector<double>::Zero(E);
  double rows = 0;
  for (const MoLoRATape<Scalar>* tape : tapes) {
    detail::require_router_tape(*tape, "load_balancing_loss");
    if (tape->logits.cols() != E)
      throw shape_error(detail::mismatch("load_balancing_loss tapes' num_experts", E, tape->logits.cols()));
    const Index T = tape->num_tokens();
    for (Index t = 0; t < T; ++t) {
      for (Index s = 0; s < tape->routing.top_k(); ++s) count(tape->routing.ids(t, s)) += 1;
      for (Index e = 0; e < E; ++e) prob(e) += static_cast<double>(tape->probs(t, e));
    }
    rows += static_cast<double>(T);
  }
  if (rows == 0) return 0;
  const Vector<double> f = count / rows, P = prob / rows;
  const double value = coef * static_cast<double>(E) * f.dot(P);
  const Vector<double> c = (coef * static_cast<double>(E) / rows) * f;  // dL/dp_te, the same for every row
  for (MoLoRATape<Scalar>* tape : tapes) {
    const detail::WorkspaceGuard hold(tape->in_use, "MoLoRATape");  // one tape at a time: a repeated tape is fine
    for (Index t = 0; t < tape->num_tokens(); ++t) {
      double pc = 0;
      for (Index e = 0; e < E; ++e) pc += static_cast<double>(tape->probs(t, e)) * c(e);
      for (Index e = 0; e < E; ++e)
        tape->logit_grad(t, e) += static_cast<Scalar>(static_cast<double>(tape->probs(t, e)) * (c(e) - pc));
    }
  }
  return value;
}

// One layer's load-balancing loss.
template <class Scalar>
double load_balancing_loss(MoLoRATape<Scalar>& tape, double coef) {
  return load_balancing_loss(std::vector<MoLoRATape<Scalar>*>{&tape}, coef);
}

// Router z-loss of one layer: coef * mean over tokens of logsumexp(logits)^2. Returns its
// value and adds its gradient into tape.logit_grad. Throws config_error for a tape without
// router.
template <class Scalar>
double router_z_loss(MoLoRATape<Scalar>& tape, double coef) {
  const detail::WorkspaceGuard hold(tape.in_use, "MoLoRATape");
  detail::require_router_tape(tape, "router_z_loss");
  const Index T = tape.num_tokens(), E = tape.logits.cols();
  if (T == 0) return 0;
  double sum = 0;
  for (Index t = 0; t < T; ++t) {
    double m = static_cast<double>(tape.logits(t, 0));
    for (Index e = 1; e < E; ++e) m = std::max(m, static_cast<double>(tape.logits(t, e)));
    double z = 0;
    for (Index e = 0; e < E; ++e) z += std::exp(static_cast<double>(tape.logits(t, e)) - m);
    const double lse = m + std::log(z);
    sum += lse * lse;
    const double scale = coef * 2.0 * lse / static_cast<double>(T);
    for (Index e = 0; e < E; ++e) tape.logit_grad(t, e) += static_cast<Scalar>(scale * static_cast<double>(tape.probs(t, e)));
  }
  return coef * sum / static_cast<double>(T);
}

}  // namespace molora
