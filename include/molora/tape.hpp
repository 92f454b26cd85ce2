// The MoLoRA training records. MoLoRATape is what a training forward (backward.hpp) keeps
// for the backward: x, the router's logits and probabilities, the routing and its dispatch
// plan, each routed pair's h = A_e x, and the dropout and jitter multipliers; check_tape is
// the backward's distrust of it. MoLoRAGrads holds the gradients, laid out like the
// adapter's parameters.
#pragma once

#include <cstdint>
#include <vector>

#include "dispatch.hpp"
#include "errors.hpp"
#include "gating.hpp"
#include "molora_linear.hpp"
#include "noise.hpp"
#include "random.hpp"
#include "saved_input.hpp"
#include "types.hpp"

namespace molora {

// What a MoLoRA training forward saves. One per layer and step; reuse it across steps.
// seed() fixes both the sampling draws (Selection::sampling; the same stream and default
// seed as MoLoRAWorkspace::rng, so a tape and a workspace seeded alike pick the same
// experts) and the dropout/jitter draws (a separate stream, so turning noise on does not
// change which experts are sampled).
template <class Scalar>
struct MoLoRATape {
  TrainingOptions options;
  Generator sampling_rng{0x6d6f6c6f7261ULL};
  Generator noise_rng{0x6e6f6973652d31ULL};

  detail::SavedInput<Scalar> x;       // [T, in]
  RowMatrix<Scalar> jitter;           // [T, in] U(1-eps, 1+eps); empty without jitter
  RowMatrix<Scalar> router_input;     // [T, in] x * jitter; empty without jitter
  RowMatrix<Scalar> dropout_scale;    // [T, in] 0 or 1/(1-p); empty without dropout
  RowMatrix<Scalar> adapter_input;    // [T, in] x * dropout_scale; empty without dropout
  RowMatrix<Scalar> logits;           // [T, E] router logits (empty with caller routing)
  RowMatrix<Scalar> probs;            // [T, E] softmax(logits)
  Routing<Scalar> routing;            // [T, k] the routing used
  DispatchPlan<Scalar> plan;          // pairs grouped by expert
  RowMatrix<Scalar> hidden;           // [T*k, r] h = A_e x of each pair (unscaled), plan order
  // dL/dlogits [T, E] from auxiliary losses (load_balancing_loss, router_z_loss); zeroed by
  // every training forward, added into the router's gradient by the backward.
  RowMatrix<Scalar> logit_grad;
  bool has_router = false;            // false after a forward with caller-supplied routing
  GatingOptions gating;               // the gating the routing came from (route_backward's)

  RowMatrix<Scalar> u, hs, dlogits, gate_grad;  // backward scratch
  std::vector<Index> pair_order;                // backward scratch
  std::vector<Scalar> spill;                    // the kernels' scratch, forward and backward
  detail::InUseFlag in_use;  // held by the call writing this tape (see errors.hpp)

  void seed(std::uint64_t s) {
    sampling_rng.seed(s);
    noise_rng.seed(s ^ 0x9e3779b97f4a7c15ULL);
  }
  Index num_tokens() const { return x.rows; }
  Index num_experts() const { return plan.num_experts(); }
  bool has_dropout() const { return dropout_scale.size() > 0; }
  bool has_jitter() const { return jitter.size() > 0; }
  typename detail::SavedInput<Scalar>::View input() const { return x.view(); }
};

// dL/d(every trainable tensor) of a MoLoRAAdapter, laid out exactly like the parameters:
// router weight [E, in], bias [E] (stays zero without a bias), stacked A [E*r, in] row-major,
// stacked B [out, E*r] column-major. Backward passes add into it (gradient accumulation);
// zero() between optimiser steps.
template <class Scalar>
struct MoLoRAGrads {
  RowMatrix<Scalar> router_weight;                   // [E, in]
  Eigen::Matrix<Scalar, 1, Eigen::Dynamic> router_bias;  // [E]
  RowMatrix<Scalar> A;                               // [E*r, in]
  ColMatrix<Scalar> B;                               // [out, E*r]

  MoLoRAGrads() = default;
  explicit MoLoRAGrads(const MoLoRAAdapter<Scalar>& a) { resize_like(a); }
  template <class BaseWeight>
  explicit MoLoRAGrads(const MoLoRALinear<Scalar, BaseWeight>& l) { resize_like(l.adapter()); }
  void resize_like(const MoLoRAAdapter<Scalar>& a) {
    router_weight.setZero(a.num_experts(), a.in_features());
    router_bias.setZero(a.num_experts());
    A.setZero(a.num_experts() * a.rank(), a.in_features());
    B.setZero(a.out_features(), a.num_experts() * a.rank());
  }
  void zero() {
    router_weight.setZero();
    router_bias.setZero();
    A.setZero();
    B.setZero();
  }
  // Expert e's blocks, views into A and B. Throw shape_error for e outside [0, E).
  auto expert_A(Index e) {
    const Index r = A.rows() / checked_expert(e);
    return A.middleRows(e * r, r);
  }
  auto expert_B(Index e) {
    const Index r = B.cols() / checked_expert(e);
    return B.middleCols(e * r, r);
  }

private:
  // E after checking e against it.
  Index checked_expert(Index e) const {
    const Index E = router_weight.rows();
    if (e < 0 || e >= E) throw shape_error(detail::mismatch("expert index", detail::cat("[0, ", E, ")"), e));
    return E;
  }
};

namespace detail {

// A backward trusts nothing on the tape: every size it indexes with must be the one a
// training forward of this adapter records (a tape from a layer of another E, k, r, in or T
// would send the kernels outside their buffers). O(T*k + E). Throws shape_error naming the
// tape field, the expected and the actual value.
template <class Scalar>
void check_tape(const MoLoRAAdapter<Scalar>& a, const MoLoRATape<Scalar>& tape) {
  const Index T = tape.num_tokens(), E = a.num_experts(), r = a.rank(), in = a.in_features();
  check_saved_input(tape.x, in);
  if (tape.plan.num_experts() != E)
    throw shape_error(mismatch("tape.plan experts (num_experts)", E, tape.plan.num_experts()));
  const Index k = tape.routing.top_k();
  if (tape.routing.num_tokens() != T) throw shape_error(mismatch("tape.routing rows (tokens)", T, tape.routing.num_tokens()));
  if (k < 1 || k > E) throw shape_error(mismatch("tape.routing columns (top_k)", cat("1..", E), k));
  require_shape(tape.routing.weights, T, k, "tape.routing.weights shape");
  const auto pairs = static_cast<std::size_t>(T * k);
  const auto& p = tape.plan;
  if (p.tokens.size() != pairs || p.slots.size() != pairs || p.gates.size() != pairs ||
      p.offsets.front() != 0 || p.offsets.back() != T * k)
    throw shape_error(mismatch("tape.plan pairs (tokens * top_k)", T * k, p.tokens.size()));
  require_shape(tape.hidden, T * k, r, "tape.hidden shape (pairs, rank)");
  if (tape.has_router) {
    if (tape.gating.num_experts != E || tape.gating.top_k != k)
      throw shape_error(mismatch("tape.gating (num_experts, top_k)", cat("(", E, ", ", k, ")"),
                                 cat("(", tape.gating.num_experts, ", ", tape.gating.top_k, ")")));
    require_shape(tape.logits, T, E, "tape.logits shape");
    require_shape(tape.probs, T, E, "tape.probs shape");
    require_shape(tape.logit_grad, T, E, "tape.logit_grad shape");
  }
  if (tape.has_dropout()) {
    require_shape(tape.dropout_scale, T, in, "tape.dropout_scale shape");
    require_shape(tape.adapter_input, T, in, "tape.adapter_input shape");
  }
  if (tape.has_jitter()) {
    require_shape(tape.jitter, T, in, "tape.jitter shape");
    require_shape(tape.router_input, T, in, "tape.router_input shape");
  }
  for (Index e = 0; e < E; ++e)
    if (p.count(e) < 0) throw shape_error(detail::mismatch(cat("tape.plan count of expert ", e), "a value >= 0", p.count(e)));
  for (const std::int32_t e : p.active)
    if (e < 0 || e >= E) throw shape_error(mismatch("tape.plan active expert", cat("[0, ", E, ")"), e));
  for (std::size_t i = 0; i < pairs; ++i)
    if (p.tokens[i] < 0 || p.tokens[i] >= T || p.slots[i] < 0 || p.slots[i] >= k)
      throw shape_error(detail::mismatch(cat("tape.plan pair ", i, " (token, slot)"), cat("in [0, ", T, ") x [0, ", k, ")"),
                                 cat("(", p.tokens[i], ", ", p.slots[i], ")")));
  for (Index t = 0; t < T; ++t)
    for (Index sl = 0; sl < k; ++sl)
      if (tape.routing.ids(t, sl) < 0 || tape.routing.ids(t, sl) >= E)
        throw shape_error(detail::mismatch(cat("tape.routing.ids of token ", t, " slot ", sl), cat("[0, ", E, ")"),
                                   tape.routing.ids(t, sl)));
}

}  // namespace detail
}  // namespace molora
