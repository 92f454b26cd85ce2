// The MoLoRA layers' training: a training forward computes the same output as the layer's
// forward, through the same router, gating, dispatch plan and fused kernels
// (molora_linear.hpp), asking them to keep on a tape (tape.hpp) what the backward needs: the
// router's probabilities and each routed pair's h = A_e x. The backward takes dL/dy [T, out]
// and adds dL/dA_e, dL/dB_e (only experts with routed tokens do any work), dL/dW_r, dL/db_r
// into a gradient buffer laid out like the parameters, and produces dL/dx [T, in] through
// the frozen base, the experts and the router. Gradients reach the router through the gate
// weights only (gating.hpp, route_backward), never through the discrete choice of experts;
// with routing supplied by the caller the router gets no gradient.
//
// Training-time options (TrainingOptions, noise.hpp, all off by default, drawn from the
// tape's seeded generator): PEFT's LoRA dropout on the adapter input, and MixLoRA's
// multiplicative jitter on the router input. MING-MOE's released training path computes
// its experts on x without dropout (the call is commented out), so MING-MOE parity means
// lora_dropout = 0. Plain LoRA training is in lora_train.hpp, included here so that this
// header still gives every training entry point.
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "config.hpp"
#include "dispatch.hpp"
#include "errors.hpp"
#include "gating.hpp"
#include "kernels/backward_kernels.hpp"
#include "lora_train.hpp"
#include "molora_linear.hpp"
#include "noise.hpp"
#include "saved_input.hpp"
#include "tape.hpp"
#include "types.hpp"

namespace molora {
namespace detail {

// ---- the training forward -------------------------------------------------------------------

// Checks of every training forward, before anything is written (the caller holds the tape).
template <class Scalar>
void train_begin(const MoLoRAAdapter<Scalar>& a, const ConstRowRef<Scalar>& x, const RowRef<Scalar>& y,
                 MoLoRATape<Scalar>& tape) {
  tape.options.validate();
  check_adapter_io(a, x, y);
  tape.x.save(x, y);
  tape.gating = GatingOptions::from(a.config());
}

// The adapter's own forward steps, run on the tape's buffers (a friend of MoLoRAAdapter).
template <class Scalar>
struct TrainingPath {
  // Jitter, then the router's logits by the layer's kernel and the layer's gating, keeping
  // every token's probabilities: tape.logits, probs, routing.
  static void route(const MoLoRAAdapter<Scalar>& a, MoLoRATape<Scalar>& tape) {
    const auto x = tape.input();
    apply_noise(x, tape.options.router_jitter, tape.noise_rng, tape.jitter, tape.router_input, draw_jitter<Scalar>);
    const ConstRowRef<Scalar> xr = tape.has_jitter() ? ConstRowRef<Scalar>(tape.router_input) : ConstRowRef<Scalar>(x);
    a.router_logits_into(xr, tape.logits, tape.spill);  // [T, E]
    a.check_logits(x, tape.logits);                      // a non-finite x is named as forward names it
    route_keep_probs(ConstRowRef<Scalar>(tape.logits), tape.gating, tape.routing, &tape.sampling_rng, tape.probs);
    tape.has_router = true;
    tape.logit_grad.setZero(x.rows(), a.num_experts());
  }

  // Dropout, then the layer's dispatch plan and fused kernels (y += s g B_e A_e x'), keeping
  // each pair's h = A_e x' in tape.hidden (plan order).
  static void experts(const MoLoRAAdapter<Scalar>& a, MoLoRATape<Scalar>& tape, RowRef<Scalar>& y) {
    const auto x = tape.input();
    apply_noise(x, tape.options.lora_dropout, tape.noise_rng, tape.dropout_scale, tape.adapter_input,
                draw_dropout<Scalar>);
    const ConstRowRef<Scalar> xa = tape.has_dropout() ? ConstRowRef<Scalar>(tape.adapter_input) : ConstRowRef<Scalar>(x);
    tape.plan.build(tape.routing, a.num_experts());
    tape.hidden.resize(static_cast<Index>(tape.plan.tokens.size()), a.rank());  // [T*k, r]
    a.apply_fused(xa, y, tape.plan, tape.spill, tape.hidden.data());
  }
};

// Caller-supplied routing: checked, copied, no router on the tape.
template <class Scalar>
void train_routed(const MoLoRAAdapter<Scalar>& a, const Routing<Scalar>& routing, MoLoRATape<Scalar>& tape) {
  validate_routing(routing, tape.num_tokens(), a.num_experts());
  require_finite_tokens<Scalar>(tape.input());
  tape.routing = routing;
  tape.has_router = false;
  tape.logits.resize(0, 0);
  tape.probs.resize(0, 0);
  tape.jitter.resize(0, 0);
  tape.router_input.resize(0, 0);
  tape.logit_grad.resize(0, 0);
}

// ---- the backward -----------------------------------------------------------------------------
//
// The experts' and the router's backward, in named steps, two sweeps per expert over tiles
// of at most kernels::kGradTile of its pairs, each through a fused kernel of
// backward_kernels.hpp that reads the tokens' rows in place (no gathered copies):
//   1. backward_outputs, over `out`: u = B_e^T dy and dB_e += dy (s g h)^T, each dy chunk
//      loaded once for both; then dL/dg = s <u, h> and dL/dh = s g u (kept for step 3);
//   2. backward_gating: gate gradients -> logit gradients for all tokens at once
//      (gating.hpp's route_backward), plus the auxiliary losses' part, and dL/db_r;
//   3. backward_inputs, over `in`: dA_e += dL/dh x'^T and dx += A_e^T dL/dh (times the
//      dropout scale), and the router's dW_r += dl x_r^T and dx += W_r^T dl (times the
//      jitter), all while the tile's x and dx chunks sit in L1.
// So dy and x are each read once per slot and dx updated in place once per slot, with no
// [T, in] temporary and no separate router pass, whatever the options.

// Size of the tile that starts at row t0 of n rows cut into as few tiles of at most
// kernels::kGradTile rows as possible, of sizes that differ by at most one (17 rows: 6, 6, 5, not
// 8, 8, 1): a backward kernel's sweep over the weights costs nearly as much for one row as
// for eight. (The forward kernels work in blocks of 4 tokens and keep whole tiles.)
inline Index even_tile(Index n, Index t0) {
  const Index tiles = (n + kernels::kGradTile - 1) / kernels::kGradTile;
  const Index base = n / tiles, extra = n % tiles;  // the first `extra` tiles get base + 1 rows
  return t0 < extra * (base + 1) ? base + 1 : base;
}

// Every check of a MoLoRA backward, before anything is written.
template <class Scalar>
void check_backward(const MoLoRAAdapter<Scalar>& a, const MoLoRATape<Scalar>& tape, const ConstRowRef<Scalar>& dy,
                    const MoLoRAGrads<Scalar>& g, const RowRef<Scalar>* dx) {
  const Index T = tape.num_tokens(), E = a.num_experts(), r = a.rank(), in = a.in_features(), out = a.out_features();
  a.check_live();
  check_tape(a, tape);
  require_shape(dy, T, out, "dy shape");
  require_shape(g.router_weight, E, in, "grads.router_weight shape");
  require_shape(g.router_bias, 1, E, "grads.router_bias shape");
  require_shape(g.A, E * r, in, "grads.A shape");
  require_shape(g.B, out, E * r, "grads.B shape");
  if (dx) require_shape(*dx, T, in, "dx shape");
}

// Step 1. Fills tape.u [pairs, r] with dL/dh (plan order) and, with a router,
// tape.gate_grad [T, k] with dL/dg; adds dB_e.
template <class Scalar>
void backward_outputs(const MoLoRAAdapter<Scalar>& a, MoLoRATape<Scalar>& tape, const ConstRowRef<Scalar>& dy,
                      MoLoRAGrads<Scalar>& g) {
  using Arch = kernels::layer_arch;
  constexpr Index kT = kernels::kGradTile;
  const Index r = a.rank(), out = a.out_features();
  const Scalar s = a.scaling();
  const Scalar* Bt = a.stacked_B().data();  // expert e: B_e^T [r, out] at e*r*out
  const Scalar* dyr[kT];
  for (const std::int32_t e : tape.plan.active) {
    const Index n_e = tape.plan.count(e), b_e = tape.plan.begin(e);
    const Scalar* Bte = Bt + Index(e) * r * out;                    // B_e^T [r, out]
    Scalar* dBte = g.B.data() + Index(e) * r * g.B.outerStride();  // dB_e^T [r, out]
    for (Index t0 = 0; t0 < n_e; t0 += even_tile(n_e, t0)) {
      const Index n = even_tile(n_e, t0), b = b_e + t0;
      const auto* tok = tape.plan.tokens.data() + b;
      const auto* slot = tape.plan.slots.data() + b;
      const auto* gate = tape.plan.gates.data() + b;
      const auto h = tape.hidden.middleRows(b, n);  // [n, r]
      auto hs = tape.hs.topRows(n);                 // [n, r] s g h
      for (Index i = 0; i < n; ++i) {
        dyr[i] = dy.data() + Index(tok[i]) * dy.outerStride();
        hs.row(i) = h.row(i) * (s * gate[i]);
      }
      auto u = tape.u.middleRows(b, n);  // [n, r]
      kernels::grad_out(Arch{}, Bte, out, dBte, g.B.outerStride(), r, out, dyr, hs.data(), r, n, u.data(), r,
                        tape.spill.data());
      for (Index i = 0; i < n; ++i) {
        if (tape.has_router) tape.gate_grad(tok[i], slot[i]) = s * u.row(i).dot(h.row(i));
        u.row(i) *= s * gate[i];  // dL/dh
      }
    }
  }
}

// Step 2. tape.dlogits [T, E] = the auxiliary losses' part + the gating's backward of
// tape.gate_grad; dL/db_r += its column sums.
template <class Scalar>
void backward_gating(const MoLoRAAdapter<Scalar>& a, MoLoRATape<Scalar>& tape, MoLoRAGrads<Scalar>& g) {
  const Index E = a.num_experts(), k = tape.routing.top_k();
  tape.dlogits = tape.logit_grad;  // [T, E]
  route_backward_rows(tape.gating, tape.routing, tape.probs.data(), E, tape.gate_grad.data(), k,
                      tape.dlogits.data(), E);
  if (a.router().has_bias()) g.router_bias += tape.dlogits.colwise().sum();
}

// How step 3 forms the router's term. In general dL/dlogits is dense: the router's term is
// all E rows of W_r over the tile's slot-0 pairs (each token has exactly one). When the
// gating's backward is zero off the selected experts (route_backward_selected_only) and no
// auxiliary loss has added a dense part, it is sparse instead: the single row e of W_r over
// all of expert e's pairs, k rows of W_r per token rather than E (when 2k <= E; otherwise the
// dense form does less). Without dropout and jitter the router sees the experts' x and its
// x-gradient takes no mask, so that row is folded into the expert's term as its extra row:
// the x and dx chunks are then read and written once for both.
struct RouterTermForm {
  bool any = false;     // the router has a term at all
  bool sparse = false;  // row e of W_r over all of expert e's pairs
  bool fold = false;    // ... carried by the expert's term as its extra row
};

template <class Scalar>
RouterTermForm router_term_form(const MoLoRATape<Scalar>& tape) {
  RouterTermForm f;
  const Index k = tape.routing.top_k(), E = tape.num_experts();
  f.any = tape.has_router;
  f.sparse = f.any && route_backward_selected_only(tape.gating) && 2 * k <= E &&
             (tape.logit_grad.array() == Scalar(0)).all();
  f.fold = f.sparse && !tape.has_dropout() && !tape.has_jitter();
  return f;
}

// The row pointers one GradInTerm reads for a tile (the kernels read rows in place).
template <class Scalar>
struct TermRows {
  const Scalar* x[kernels::kGradTile];
  const Scalar* coef[kernels::kGradTile];
  Scalar* dx[kernels::kGradTile];
  const Scalar* mask[kernels::kGradTile];
};

// What step 3 reads besides the tape's plan: the experts see x' (x after dropout), the
// router x_r (x after jitter); dx is null without an x-gradient.
template <class Scalar>
struct InputSweep {
  const Scalar* xa;
  Index ldxa;
  const Scalar* xr;
  Index ldxr;
  RowRef<Scalar>* dx;
  RouterTermForm form;
};

// Expert e's term (terms[0]: A_e, dA_e, its pairs' dL/dh) and the router's (terms[1]: W_r or
// its row e), pointing at the row arrays ex and ro that each tile refills.
template <class Scalar>
void set_terms(const MoLoRAAdapter<Scalar>& a, const MoLoRATape<Scalar>& tape, MoLoRAGrads<Scalar>& g,
               const InputSweep<Scalar>& in_sweep, std::int32_t e, TermRows<Scalar>& ex_rows,
               TermRows<Scalar>& ro_rows, kernels::GradInTerm<Scalar> (&terms)[2]) {
  const Index r = a.rank(), in = a.in_features(), E = a.num_experts();
  const auto& wr = a.router().weight();
  const RouterTermForm form = in_sweep.form;
  auto& ex = terms[0];
  ex.w = a.stacked_A().data() + Index(e) * r * in;  // A_e [r, in]
  ex.ldw = in;
  ex.dw = g.A.data() + Index(e) * r * g.A.outerStride();  // dA_e [r, in]
  ex.lddw = g.A.outerStride();
  ex.rows = r;
  ex.x = ex_rows.x;
  ex.coef = ex_rows.coef;
  ex.dx = in_sweep.dx ? ex_rows.dx : nullptr;
  ex.mask = tape.has_dropout() ? ex_rows.mask : nullptr;
  ex.extra_w = form.fold ? wr.data() + Index(e) * wr.outerStride() : nullptr;
  ex.extra_dw = form.fold ? g.router_weight.data() + Index(e) * g.router_weight.outerStride() : nullptr;
  ex.extra_coef = form.fold ? ro_rows.coef : nullptr;
  auto& ro = terms[1];
  ro.w = wr.data();  // W_r [E, in], or its row e when sparse
  ro.ldw = wr.outerStride();
  ro.dw = g.router_weight.data();
  ro.lddw = g.router_weight.outerStride();
  ro.rows = E;
  if (form.sparse) {
    ro.w += Index(e) * ro.ldw;
    ro.dw += Index(e) * ro.lddw;
    ro.rows = 1;
  }
  ro.x = ro_rows.x;
  ro.coef = ro_rows.coef;
  ro.dx = in_sweep.dx ? ro_rows.dx : nullptr;
  ro.mask = tape.has_jitter() ? ro_rows.mask : nullptr;
}

// Orders expert e's pairs in tape.pair_order with the ones that carry a router term first
// (all of them when sparse, the slot-0 pairs when dense), so the router's terms fill whole
// tiles (the kernel's cost per sweep barely depends on the number of tokens) and at most
// one tile per expert has a partial router term. Returns their count.
template <class Scalar>
Index order_router_pairs_first(MoLoRATape<Scalar>& tape, std::int32_t e, RouterTermForm form) {
  const Index n_e = tape.plan.count(e), b_e = tape.plan.begin(e);
  Index* order = tape.pair_order.data() + b_e;
  const auto routed = [&](Index i) {
    return form.sparse || (form.any && tape.plan.slots[static_cast<std::size_t>(b_e + i)] == 0);
  };
  Index n_router = 0;
  for (Index i = 0; i < n_e; ++i)
    if (routed(i)) order[n_router++] = b_e + i;
  for (Index i = 0, o = n_router; i < n_e; ++i)
    if (!routed(i)) order[o++] = b_e + i;
  return n_router;
}

// Fills the row arrays for the tile of expert e's ordered pairs [t0, t0 + n): every pair's
// rows into ex_rows, the first n_router - t0 pairs' router rows into ro_rows. Returns how
// many pairs of the tile carry a router term.
template <class Scalar>
Index fill_tile_rows(const MoLoRATape<Scalar>& tape, const InputSweep<Scalar>& in_sweep, std::int32_t e, Index t0,
                     Index n, Index n_router, TermRows<Scalar>& ex_rows, TermRows<Scalar>& ro_rows) {
  const Index E = tape.num_experts(), in = tape.x.cols;
  const Index* order = tape.pair_order.data() + tape.plan.begin(e);
  RowRef<Scalar>* dx = in_sweep.dx;
  Index m = 0;
  for (Index i = 0; i < n; ++i) {
    const Index p = order[t0 + i], t = tape.plan.tokens[static_cast<std::size_t>(p)];
    ex_rows.x[i] = in_sweep.xa + t * in_sweep.ldxa;
    ex_rows.coef[i] = tape.u.data() + p * tape.u.outerStride();
    if (dx) ex_rows.dx[i] = dx->data() + t * dx->outerStride();
    if (tape.has_dropout()) ex_rows.mask[i] = tape.dropout_scale.data() + t * in;
    if (t0 + i < n_router) {
      ro_rows.x[m] = in_sweep.xr + t * in_sweep.ldxr;
      ro_rows.coef[m] = tape.dlogits.data() + t * E + (in_sweep.form.sparse ? Index(e) : 0);
      if (dx) ro_rows.dx[m] = dx->data() + t * dx->outerStride();
      if (tape.has_jitter()) ro_rows.mask[m] = tape.jitter.data() + t * in;
      ++m;
    }
  }
  return m;
}

// Step 3. dA_e, dW_r and dx, per expert over tiles of its ordered pairs.
template <class Scalar>
void backward_inputs(const MoLoRAAdapter<Scalar>& a, MoLoRATape<Scalar>& tape, MoLoRAGrads<Scalar>& g,
                     const InputSweep<Scalar>& in_sweep) {
  const Index in = a.in_features();
  const RouterTermForm form = in_sweep.form;
  tape.pair_order.resize(tape.plan.tokens.size());
  TermRows<Scalar> ex_rows, ro_rows;
  kernels::GradInTerm<Scalar> terms[2];
  for (const std::int32_t e : tape.plan.active) {
    set_terms(a, tape, g, in_sweep, e, ex_rows, ro_rows, terms);
    const Index n_e = tape.plan.count(e), n_router = order_router_pairs_first(tape, e, form);
    for (Index t0 = 0; t0 < n_e; t0 += even_tile(n_e, t0)) {
      const Index n = even_tile(n_e, t0);
      terms[0].n = n;
      terms[1].n = fill_tile_rows(tape, in_sweep, e, t0, n, n_router, ex_rows, ro_rows);
      kernels::grad_in(kernels::layer_arch{}, terms, form.any && !form.fold ? 2 : 1, in, tape.spill.data());
    }
  }
}

// Backward scratch on the tape: u for every pair, one tile of s g h, dL/dg, and the
// kernels' spill.
template <class Scalar>
void reserve_backward_scratch(const MoLoRAAdapter<Scalar>& a, MoLoRATape<Scalar>& tape) {
  using Arch = kernels::layer_arch;
  const Index r = a.rank(), E = a.num_experts();
  if (tape.has_router) tape.gate_grad.resize(tape.num_tokens(), tape.routing.top_k());  // dL/dg per (token, slot)
  reserve_rows(tape.u, static_cast<Index>(tape.plan.tokens.size()), r);
  reserve_rows(tape.hs, kernels::kGradTile, r);
  const auto need = static_cast<std::size_t>(
      std::max(kernels::grad_out_scratch_size<Arch, Scalar>(r), kernels::grad_in_scratch_size(r + E)));
  if (tape.spill.size() < need) tape.spill.resize(need);
}

// The caller holds the tape and has run check_backward.
template <class Scalar>
void backward_impl(const MoLoRAAdapter<Scalar>& a, MoLoRATape<Scalar>& tape, const ConstRowRef<Scalar>& dy,
                   MoLoRAGrads<Scalar>& g, RowRef<Scalar>* dx) {
  if (tape.num_tokens() == 0) return;
  const auto x = tape.input();
  const Index in = a.in_features();
  InputSweep<Scalar> in_sweep;
  in_sweep.xa = tape.has_dropout() ? tape.adapter_input.data() : x.data();
  in_sweep.ldxa = tape.has_dropout() ? in : x.outerStride();
  in_sweep.xr = tape.has_jitter() ? tape.router_input.data() : x.data();
  in_sweep.ldxr = tape.has_jitter() ? in : x.outerStride();
  in_sweep.dx = dx;
  in_sweep.form = router_term_form(tape);
  reserve_backward_scratch(a, tape);
  backward_outputs(a, tape, dy, g);
  if (tape.has_router) backward_gating(a, tape, g);
  backward_inputs(a, tape, g, in_sweep);
}

}  // namespace detail

// y += delta(x) as MoLoRAAdapter::add_delta computes it (same gating, same sampling stream
// when tape and workspace are seeded alike; equal up to rounding, since the layer may pick
// another kernel strategy for the batch), recording on tape what add_backward
// needs. x [T, in] must stay alive and unchanged until add_backward, unless it shares memory
// with y (the tape then keeps a copy). Zeroes tape.logit_grad. Returns the routing used.
// Throws shape_error / numeric_error (non-finite logits) / config_error (bad options).
template <class Scalar, class AdapterWeight, class Derived>
const Routing<Scalar>& add_delta_train(const MoLoRAAdapter<Scalar, AdapterWeight>& a, const Eigen::MatrixBase<Derived>& x,
                                       detail::OutRef<Scalar> y, MoLoRATape<Scalar>& tape) {
  static_assert(detail::require_trainable_adapter<Scalar, AdapterWeight>());
  const detail::WorkspaceGuard hold(tape.in_use, "MoLoRATape");
  const ConstRowRef<Scalar> xr(x);
  detail::train_begin(a, xr, y, tape);
  detail::TrainingPath<Scalar>::route(a, tape);
  detail::TrainingPath<Scalar>::experts(a, tape, y);
  return tape.routing;
}

// Same with routing supplied by the caller: its weights are constants, the router is not
// run and gets no gradient (load_balancing_loss / router_z_loss then throw).
template <class Scalar, class AdapterWeight, class Derived>
void add_delta_routed_train(const MoLoRAAdapter<Scalar, AdapterWeight>& a, const Eigen::MatrixBase<Derived>& x,
                            const Routing<Scalar>& routing, detail::OutRef<Scalar> y, MoLoRATape<Scalar>& tape) {
  static_assert(detail::require_trainable_adapter<Scalar, AdapterWeight>());
  const detail::WorkspaceGuard hold(tape.in_use, "MoLoRATape");
  const ConstRowRef<Scalar> xr(x);
  detail::train_begin(a, xr, y, tape);
  detail::train_routed(a, routing, tape);
  detail::TrainingPath<Scalar>::experts(a, tape, y);
}

// Adds the adapter's gradients into grads (sized by MoLoRAGrads(adapter)) and, when dx is
// given, adds the adapter's and router's part of dL/dx [T, in] into dx (a host that does its
// own base matmul adds the base's x-gradient itself). dy is dL/dy [T, out]; tape is from the
// last training forward of this adapter; the adapter's weights must not have changed since.
// Only experts with routed tokens are touched. Also adds tape.logit_grad (auxiliary losses)
// to the router's gradient. Throws shape_error on shapes, the tape's included (a tape from
// another layer), state_error on a moved-from adapter or a tape in use; nothing is written
// then.
template <class Scalar, class AdapterWeight>
void add_backward(const MoLoRAAdapter<Scalar, AdapterWeight>& a, MoLoRATape<Scalar>& tape, const detail::InRef<Scalar>& dy,
                  MoLoRAGrads<Scalar>& grads, detail::OutRef<Scalar> dx) {
  static_assert(detail::require_trainable_adapter<Scalar, AdapterWeight>());
  const detail::WorkspaceGuard hold(tape.in_use, "MoLoRATape");
  detail::check_backward(a, tape, dy, grads, &dx);
  detail::backward_impl(a, tape, dy, grads, &dx);
}
template <class Scalar, class AdapterWeight>
void add_backward(const MoLoRAAdapter<Scalar, AdapterWeight>& a, MoLoRATape<Scalar>& tape, const detail::InRef<Scalar>& dy,
                  MoLoRAGrads<Scalar>& grads) {
  static_assert(detail::require_trainable_adapter<Scalar, AdapterWeight>());
  const detail::WorkspaceGuard hold(tape.in_use, "MoLoRATape");
  detail::check_backward(a, tape, dy, grads, static_cast<const RowRef<Scalar>*>(nullptr));
  detail::backward_impl(a, tape, dy, grads, static_cast<RowRef<Scalar>*>(nullptr));
}

// y = x W0^T + b0 + delta(x), MoLoRALinear::forward's output (up to rounding), recording on
// tape what backward needs. Throws as forward does; y is unchanged when it throws (the
// router runs before y is written).
template <class Scalar, class BaseWeight, class AdapterWeight, class Derived>
const Routing<Scalar>& forward_train(const MoLoRALinear<Scalar, BaseWeight, AdapterWeight>& layer, const Eigen::MatrixBase<Derived>& x,
                                     detail::OutRef<Scalar> y, MoLoRATape<Scalar>& tape) {
  static_assert(detail::require_trainable_adapter<Scalar, AdapterWeight>());
  const detail::WorkspaceGuard hold(tape.in_use, "MoLoRATape");
  const ConstRowRef<Scalar> xr(x);
  layer.check_live();
  detail::train_begin(layer.adapter(), xr, y, tape);
  detail::TrainingPath<Scalar>::route(layer.adapter(), tape);
  layer.forward_base(tape.input(), y);  // [T, out]
  detail::TrainingPath<Scalar>::experts(layer.adapter(), tape, y);
  return tape.routing;
}
template <class Scalar, class BaseWeight, class AdapterWeight, class Derived>
void forward_routed_train(const MoLoRALinear<Scalar, BaseWeight, AdapterWeight>& layer, const Eigen::MatrixBase<Derived>& x,
                          const Routing<Scalar>& routing, detail::OutRef<Scalar> y, MoLoRATape<Scalar>& tape) {
  static_assert(detail::require_trainable_adapter<Scalar, AdapterWeight>());
  const detail::WorkspaceGuard hold(tape.in_use, "MoLoRATape");
  const ConstRowRef<Scalar> xr(x);
  layer.check_live();
  detail::train_begin(layer.adapter(), xr, y, tape);
  detail::train_routed(layer.adapter(), routing, tape);
  layer.forward_base(tape.input(), y);  // [T, out]
  detail::TrainingPath<Scalar>::experts(layer.adapter(), tape, y);
}

namespace detail {
// Bytes of float rows widened per Eigen product in the backward of a 16-bit base. Each
// block adds its rows' share into all of dx, so the block is larger than the forward's
// (kWidenBlockBytes): dx is read and written out / rows-per-block times.
constexpr Index kWidenBackwardBlockBytes = Index(2) << 20;

// dx = dy W0 for W0 [out, in] row-major of the layer's own type (Eigen's GEMM) or bf16 / f16
// (blocks of rows widened exactly by the kernels, each block's rows adding their share:
// dx = sum over blocks of dy[:, rows] W0[rows, :]). Shapes checked by the caller.
template <class Scalar, class Weight>
void base_x_gradient(const Weight* w, Index in, Index out, const InRef<Scalar>& dy, OutRef<Scalar>& dx) {
  if constexpr (std::is_same_v<Weight, Scalar>) {
    dx.noalias() = dy * Eigen::Map<const RowMatrix<Scalar>>(w, out, in);  // [T, in]
  } else {
    const Index rb = widened_block_rows<Scalar>(in, out, kWidenBackwardBlockBytes);
    dx.setZero();
    for_widened_blocks<Scalar>(w, in, out, rb, 0, (out + rb - 1) / rb, [&](Index o, Index n, const auto& rows) {
      dx.noalias() += dy.middleCols(o, n) * rows;  // [T, in]
    });
  }
}
}  // namespace detail

// dx = dy W0 [T, in]: the frozen base's x-gradient alone (no weight gradient). A bf16 / f16
// base is widened exactly, block by block, so dx is the float layer's holding the rounded
// weights up to the order of summation.
template <class Scalar, class BaseWeight, class AdapterWeight>
void base_backward(const MoLoRALinear<Scalar, BaseWeight, AdapterWeight>& layer, const detail::InRef<Scalar>& dy,
                   detail::OutRef<Scalar> dx) {
  layer.check_live();
  detail::require_shape(dy, dy.rows(), layer.out_features(), "dy shape");
  detail::require_shape(dx, dy.rows(), layer.in_features(), "dx shape");
  detail::base_x_gradient<Scalar>(layer.base_weight_data(), layer.in_features(), layer.out_features(), dy, dx);
}

// Writes dL/dx [T, in] (base + adapter + router) into dx and adds the adapter's gradients
// into grads. The base weight is frozen: it gets no gradient. Throws as add_backward does,
// before dx or grads are written.
template <class Scalar, class BaseWeight>
void backward(const MoLoRALinear<Scalar, BaseWeight>& layer, MoLoRATape<Scalar>& tape, const detail::InRef<Scalar>& dy,
              MoLoRAGrads<Scalar>& grads, detail::OutRef<Scalar> dx) {
  const detail::WorkspaceGuard hold(tape.in_use, "MoLoRATape");
  layer.check_live();
  detail::check_backward(layer.adapter(), tape, dy, grads, &dx);
  base_backward(layer, dy, dx);
  detail::backward_impl(layer.adapter(), tape, dy, grads, &dx);
}
// Without dL/dx (the first layer of a model): parameter gradients only.
template <class Scalar, class BaseWeight>
void backward(const MoLoRALinear<Scalar, BaseWeight>& layer, MoLoRATape<Scalar>& tape, const detail::InRef<Scalar>& dy,
              MoLoRAGrads<Scalar>& grads) {
  const detail::WorkspaceGuard hold(tape.in_use, "MoLoRATape");
  layer.check_live();
  detail::check_backward(layer.adapter(), tape, dy, grads, static_cast<const RowRef<Scalar>*>(nullptr));
  detail::backward_impl(layer.adapter(), tape, dy, grads, static_cast<RowRef<Scalar>*>(nullptr));
}

}  // namespace molora
