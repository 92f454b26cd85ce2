// Training forward and backward passes. A training forward computes the same output as the
// layer's forward and records on a tape what the backward needs (x, the router logits and
// probabilities, the routing, the dispatch plan, each routed pair's h = A_e x, dropout and
// jitter multipliers). The backward takes dL/dy [T, out] and
// adds dL/dA_e, dL/dB_e (only experts with routed tokens do any work), dL/dW_r, dL/db_r into a
// gradient buffer laid out like the parameters, and produces dL/dx [T, in] through the frozen
// base, the experts and the router. Gradients reach the router through the gate weights only
// (softmax over the k selected, or the masked full softmax), never through the discrete
// choice of experts; with routing supplied by the caller the router gets no gradient.
//
// Training-time options (TrainingOptions, all off by default, drawn from the tape's seeded
// generator): PEFT's LoRA dropout on the adapter input, and MixLoRA's multiplicative jitter
// on the router input. MING-MOE's released training path (molora_helper2) computes its
// experts on x without dropout (the call is commented out), so MING-MOE parity means
// lora_dropout = 0.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "config.hpp"
#include "dispatch.hpp"
#include "errors.hpp"
#include "gating.hpp"
#include "kernels/backward_kernels.hpp"
#include "kernels/lora_kernels.hpp"
#include "lora.hpp"
#include "molora_linear.hpp"
#include "random.hpp"
#include "router.hpp"
#include "types.hpp"

namespace molora {

// Options of a training forward; all off by default.
struct TrainingOptions {
  // p of PEFT's lora_dropout: each element of the adapter's input is zeroed with probability
  // p and the kept ones are scaled by 1/(1-p) (inverted dropout, torch.nn.Dropout). The same
  // dropped x feeds every expert of the layer; the router and the base see the clean x.
  double lora_dropout = 0;
  // eps of MixLoRA's / Mixtral's jitter_noise: the router's input is x * U(1-eps, 1+eps),
  // drawn per element. Only the router sees it here (MixLoRA multiplies the whole block input
  // in place, so its experts and base see it too; to reproduce that, jitter x yourself
  // before the layer and multiply dx by the same noise).
  double router_jitter = 0;

  void validate() const {
    if (!(lora_dropout >= 0 && lora_dropout < 1))
      throw config_error(detail::mismatch("lora_dropout", "a value in [0, 1)", lora_dropout));
    if (!(router_jitter >= 0 && router_jitter < 1))
      throw config_error(detail::mismatch("router_jitter", "a value in [0, 1)", router_jitter));
  }
};

namespace detail {

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

// splitmix64's finaliser: a 64-bit hash of a counter.
constexpr std::uint64_t mix64(std::uint64_t z) noexcept {
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

// m(i, j) = f(u) for each element, u 32 random bits. One 64-bit key per row comes from gen;
// within the row, element pair q hashes (key, q) and takes the low and the high halves. The
// draws need no sequential generator per element (a Mersenne Twister step per element cost
// more than the whole adapter forward at T = 256).
template <class Scalar, class F>
void draw_rows(RowMatrix<Scalar>& m, Index rows, Index cols, Generator& gen, F f) {
  constexpr std::uint64_t kGolden = 0x9e3779b97f4a7c15ULL;
  m.resize(rows, cols);
  for (Index i = 0; i < rows; ++i) {
    const std::uint64_t key = bits64(gen);
    Scalar* row = m.data() + i * cols;
    const auto hash = [key](Index q) { return mix64(key + static_cast<std::uint64_t>(q + 1) * kGolden); };
    const Index pairs = cols / 2;
    for (Index q = 0; q < pairs; ++q) {
      const std::uint64_t h = hash(q);
      row[2 * q] = f(static_cast<std::uint32_t>(h));
      row[2 * q + 1] = f(static_cast<std::uint32_t>(h >> 32));
    }
    if (cols % 2 != 0) row[cols - 1] = f(static_cast<std::uint32_t>(hash(pairs)));
  }
}

// m = Bernoulli(1-p) / (1-p) per element: 0 or 1/(1-p) (p rounded to a multiple of 2^-32).
template <class Scalar>
void draw_dropout(RowMatrix<Scalar>& m, Index rows, Index cols, double p, Generator& gen) {
  const auto keep = static_cast<Scalar>(1.0 / (1.0 - p));
  const auto drop_below = static_cast<std::uint64_t>(std::llround(p * 0x1.0p32));  // P(u < it) = p
  draw_rows(m, rows, cols, gen, [=](std::uint32_t u) { return u < drop_below ? Scalar(0) : keep; });
}

// m = U(1-eps, 1+eps) per element.
template <class Scalar>
void draw_jitter(RowMatrix<Scalar>& m, Index rows, Index cols, double eps, Generator& gen) {
  draw_rows(m, rows, cols, gen, [=](std::uint32_t u) {
    return static_cast<Scalar>((1.0 - eps) + (2.0 * eps) * (static_cast<double>(u) * 0x1.0p-32));
  });
}

template <class D>
void require_rows_cols(const D& m, Index rows, Index cols, const char* field) {
  if (m.rows() != rows || m.cols() != cols)
    throw shape_error(mismatch(field, shape_str(rows, cols), shape_str(m.rows(), m.cols())));
}

}  // namespace detail

// ---- plain LoRA ----------------------------------------------------------------------------

// What a LoRA training forward saves. One per layer and step; reuse it across steps (warm
// tapes of the same size do not allocate). Seed it for reproducible dropout.
template <class Scalar>
struct LoRATape {
  TrainingOptions options;
  Generator noise_rng{0x6c6f72612d6e6fULL};  // dropout draws

  detail::SavedInput<Scalar> x;      // [T, in]
  RowMatrix<Scalar> dropout_scale;   // [T, in] 0 or 1/(1-p); empty without dropout
  RowMatrix<Scalar> adapter_input;   // [T, in] x * dropout_scale; empty without dropout
  RowMatrix<Scalar> hidden;          // [T, r] h = A x (unscaled)
  RowMatrix<Scalar> u;               // [T, r] backward scratch
  RowMatrix<Scalar> dxa;             // [T, in] backward scratch (dropout only)
  detail::InUseFlag in_use;          // held by the call writing this tape

  void seed(std::uint64_t s) { noise_rng.seed(s); }
  Index num_tokens() const { return x.rows; }
  bool has_dropout() const { return dropout_scale.size() > 0; }
  typename detail::SavedInput<Scalar>::View input() const { return x.view(); }
};

// dL/dA [r, in] and dL/dB [out, r] of one LoRA, in the LoRA's own layouts.
template <class Scalar>
struct LoRAGrads {
  RowMatrix<Scalar> A;  // [rank, in]
  ColMatrix<Scalar> B;  // [out, rank]

  LoRAGrads() = default;
  explicit LoRAGrads(const LoRA<Scalar>& lora) { resize_like(lora); }
  void resize_like(const LoRA<Scalar>& lora) {
    A.setZero(lora.rank(), lora.in_features());
    B.setZero(lora.out_features(), lora.rank());
  }
  void zero() {
    A.setZero();
    B.setZero();
  }
};

// y += s * B A dropout(x) for x [T, in], y [T, out], saving into tape what add_backward needs.
// x must stay alive and unchanged until add_backward (unless it shares memory with y: then the
// tape keeps a copy). Throws shape_error on shapes, config_error on bad tape.options,
// state_error on a moved-from lora or a tape in use; y is unchanged when it throws.
template <class Scalar, class Derived>
void add_delta_train(const LoRA<Scalar>& lora, const Eigen::MatrixBase<Derived>& x_in, detail::OutRef<Scalar> y,
                     LoRATape<Scalar>& tape) {
  const detail::WorkspaceGuard hold(tape.in_use, "LoRATape");
  const ConstRowRef<Scalar> x(x_in);
  lora.check_live();
  tape.options.validate();
  if (x.cols() != lora.in_features())
    throw shape_error(detail::mismatch("x columns (in_features)", lora.in_features(), x.cols()));
  detail::require_rows_cols(y, x.rows(), lora.out_features(), "y shape");
  tape.x.save(x, y);
  const auto xs = tape.x.view();
  const Index T = x.rows();
  if (tape.options.lora_dropout > 0) {
    detail::draw_dropout(tape.dropout_scale, T, x.cols(), tape.options.lora_dropout, tape.noise_rng);
    tape.adapter_input = xs.cwiseProduct(tape.dropout_scale);  // [T, in]
  } else {
    tape.dropout_scale.resize(0, 0);
    tape.adapter_input.resize(0, 0);
  }
  tape.hidden.resize(T, lora.rank());
  if (tape.has_dropout())
    tape.hidden.noalias() = tape.adapter_input * lora.A().transpose();  // [T, r]
  else
    tape.hidden.noalias() = xs * lora.A().transpose();  // [T, r]
  y.noalias() += (tape.hidden * lora.scaling()) * lora.B().transpose();  // [T, out]
}

namespace detail {

// Throws shape_error naming the field unless x's record on a tape is a [T, in] input.
template <class Scalar>
void check_saved_input(const SavedInput<Scalar>& x, Index in) {
  if (x.cols != in) throw shape_error(mismatch("tape.x columns (in_features)", in, x.cols));
  if (x.owned && (x.copy.rows() != x.rows || x.copy.cols() != x.cols))
    throw shape_error(mismatch("tape.x copy", shape_str(x.rows, x.cols), shape_str(x.copy.rows(), x.copy.cols())));
  if (!x.owned && x.rows > 0 && x.data == nullptr)
    throw shape_error(mismatch("tape.x", shape_str(x.rows, x.cols), "no data"));
}

// A backward trusts nothing on the tape: it must have been recorded by a layer of this shape.
template <class Scalar>
void check_tape(const LoRA<Scalar>& lora, const LoRATape<Scalar>& tape) {
  const Index T = tape.num_tokens(), in = lora.in_features();
  check_saved_input(tape.x, in);
  require_rows_cols(tape.hidden, T, lora.rank(), "tape.hidden shape (tokens, rank)");
  if (tape.has_dropout()) {
    require_rows_cols(tape.dropout_scale, T, in, "tape.dropout_scale shape");
    require_rows_cols(tape.adapter_input, T, in, "tape.adapter_input shape");
  }
}

template <class Scalar>
void lora_backward_impl(const LoRA<Scalar>& lora, LoRATape<Scalar>& tape, const ConstRowRef<Scalar>& dy,
                        LoRAGrads<Scalar>& grads, RowRef<Scalar>* dx) {
  const WorkspaceGuard hold(tape.in_use, "LoRATape");
  lora.check_live();
  check_tape(lora, tape);
  const Index T = tape.num_tokens(), r = lora.rank();
  const Scalar s = lora.scaling();
  detail::require_rows_cols(dy, T, lora.out_features(), "dy shape");
  detail::require_rows_cols(grads.A, r, lora.in_features(), "grads.A shape");
  detail::require_rows_cols(grads.B, lora.out_features(), r, "grads.B shape");
  if (dx) detail::require_rows_cols(*dx, T, lora.in_features(), "dx shape");
  if (T == 0) return;
  grads.B.noalias() += dy.transpose() * (tape.hidden * s);  // [out, r]
  tape.u.resize(T, r);
  tape.u.noalias() = (dy * lora.B()) * s;  // [T, r] dL/dh
  if (tape.has_dropout())
    grads.A.noalias() += tape.u.transpose() * tape.adapter_input;  // [r, in]
  else
    grads.A.noalias() += tape.u.transpose() * tape.input();  // [r, in]
  if (!dx) return;
  if (tape.has_dropout()) {
    tape.dxa.resize(T, lora.in_features());
    tape.dxa.noalias() = tape.u * lora.A();  // [T, in]
    dx->array() += tape.dxa.array() * tape.dropout_scale.array();
  } else {
    dx->noalias() += tape.u * lora.A();  // [T, in]
  }
}
}  // namespace detail

// Adds dL/dA, dL/dB into grads and, when dx is given, adds dL/dx [T, in] into dx (the host
// adds the base's own x-gradient). dy [T, out] with T of the last add_delta_train on tape.
// grads must be sized for lora (LoRAGrads(lora)). Throws shape_error on shapes.
template <class Scalar>
void add_backward(const LoRA<Scalar>& lora, LoRATape<Scalar>& tape, const detail::InRef<Scalar>& dy,
                  LoRAGrads<Scalar>& grads, detail::OutRef<Scalar> dx) {
  detail::lora_backward_impl(lora, tape, dy, grads, &dx);
}
template <class Scalar>
void add_backward(const LoRA<Scalar>& lora, LoRATape<Scalar>& tape, const detail::InRef<Scalar>& dy,
                  LoRAGrads<Scalar>& grads) {
  detail::lora_backward_impl(lora, tape, dy, grads, static_cast<RowRef<Scalar>*>(nullptr));
}

// ---- MoLoRA --------------------------------------------------------------------------------

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
  bool normalize_top_k = true;

  RowMatrix<Scalar> u, hs, dlogits, gate_grad;  // backward scratch
  std::vector<Index> pair_order;
  std::vector<Scalar> row_scratch, spill, scale;
  std::vector<const Scalar*> in_rows;
  std::vector<Scalar*> out_rows;
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
  explicit MoLoRAGrads(const MoLoRALinear<Scalar>& l) { resize_like(l.adapter()); }
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

// Checks of every training forward, before anything is written (the caller holds the tape).
template <class Scalar>
void train_begin(const MoLoRAAdapter<Scalar>& a, const ConstRowRef<Scalar>& x, const RowRef<Scalar>& y,
                 MoLoRATape<Scalar>& tape) {
  tape.options.validate();
  check_adapter_io(a, x, y);
  tape.x.save(x, y);
  tape.normalize_top_k = a.config().normalize_top_k;
}

// Size of the tile that starts at row t0 of n rows cut into as few tiles of at most
// kernels::kGradTile rows as possible, of sizes that differ by at most one (17 rows: 6, 6, 5, not
// 8, 8, 1): a backward kernel's sweep over the weights costs nearly as much for one row as
// for eight. (The forward kernels work in blocks of 4 tokens and keep whole tiles.)
inline Index even_tile(Index n, Index t0) {
  const Index tiles = (n + kernels::kGradTile - 1) / kernels::kGradTile;
  const Index base = n / tiles, extra = n % tiles;  // the first `extra` tiles get base + 1 rows
  return t0 < extra * (base + 1) ? base + 1 : base;
}

// Kernel scratch of a tape: row-pointer arrays for n rows and the shrink's spill for tiles
// of kTile rows of rank r (and grad_out's for tiles of kGradTile rows).
template <class Scalar>
void reserve_kernel_scratch(MoLoRATape<Scalar>& tape, Index n, Index r) {
  using Arch = kernels::layer_arch;
  const auto need = static_cast<std::size_t>(std::max(kernels::kTile, kernels::kGradTile) * r *
                                             kernels::simd_width<Arch, Scalar>());
  if (tape.spill.size() < need) tape.spill.resize(need);
  if (tape.in_rows.size() < static_cast<std::size_t>(n)) {
    tape.in_rows.resize(static_cast<std::size_t>(n));
    tape.out_rows.resize(static_cast<std::size_t>(n));
    tape.scale.resize(static_cast<std::size_t>(n));
  }
}

// out[i] = w x[i] for n rows x[i] (w [rows, cols] row-major, stride ldw), through the shrink
// kernel in tiles of kTile rows; out rows have stride ldo.
template <class Scalar>
void shrink_rows(const Scalar* w, Index ldw, Index rows, Index cols, const Scalar* const* x, Index n, Scalar* out,
                 Index ldo, Scalar* spill) {
  for (Index t0 = 0; t0 < n; t0 += kernels::kTile) {
    const Index nt = std::min<Index>(kernels::kTile, n - t0);
    kernels::shrink(kernels::layer_arch{}, w, ldw, rows, cols, x + t0, nt, out + t0 * ldo, ldo, spill);
  }
}

// Router (with jitter) and gating into tape.logits / probs / routing.
template <class Scalar>
void train_route(const MoLoRAAdapter<Scalar>& a, MoLoRATape<Scalar>& tape) {
  const auto x = tape.input();
  const Index T = x.rows(), E = a.num_experts();
  const Index in = x.cols();
  tape.logits.resize(T, E);
  const Scalar* xr = x.data();
  Index ldx = x.outerStride();
  if (tape.options.router_jitter > 0) {
    draw_jitter(tape.jitter, T, in, tape.options.router_jitter, tape.noise_rng);
    tape.router_input = x.cwiseProduct(tape.jitter);  // [T, in]
    xr = tape.router_input.data();
    ldx = in;
  } else {
    tape.jitter.resize(0, 0);
    tape.router_input.resize(0, 0);
  }
  // logits = x W_r^T (+ b_r) [T, E] by the shrink kernel, as the layer's forward computes them.
  reserve_kernel_scratch(tape, T, E);
  for (Index t = 0; t < T; ++t) tape.in_rows[static_cast<std::size_t>(t)] = xr + t * ldx;
  shrink_rows(a.router().weight().data(), in, E, in, tape.in_rows.data(), T, tape.logits.data(), E, tape.spill.data());
  if (a.router().has_bias()) tape.logits.rowwise() += a.router().bias();
  for (Index t = 0; t < T; ++t)  // a non-finite x is named as the layer's forward names it
    if (!tape.logits.row(t).allFinite()) require_finite_token<Scalar>(x, t);
  tape.probs.resize(T, E);
  softmax_rows<Scalar>(tape.logits, tape.probs);  // [T, E]
  tape.row_scratch.resize(static_cast<std::size_t>(E));
  route(ConstRowRef<Scalar>(tape.logits), GatingOptions::from(a.config()), tape.routing, &tape.sampling_rng,
        tape.row_scratch.data());
  tape.has_router = true;
  tape.logit_grad.setZero(T, E);
}

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

// y[i] += scale[i] * w^T h[i] for n rows (w [rows, cols] row-major, stride ldw) through the
// expand kernel in tiles of kTile rows, so each tile's output rows stay in cache.
template <class Scalar>
void expand_rows(const Scalar* w, Index ldw, Index rows, Index cols, const Scalar* const* h, const Scalar* scale,
                 Index n, Scalar* const* y) {
  for (Index t0 = 0; t0 < n; t0 += kernels::kTile) {
    const Index nt = std::min<Index>(kernels::kTile, n - t0);
    kernels::expand(kernels::layer_arch{}, w, ldw, rows, cols, h + t0, scale + t0, nt, y + t0);
  }
}

// Dropout, then per expert: h = A_e x for its pairs (saved), y += s g B_e h, with the same
// shrink / expand kernels as the layer's fused path, reading x and writing y in place.
template <class Scalar>
void train_experts(const MoLoRAAdapter<Scalar>& a, MoLoRATape<Scalar>& tape, RowRef<Scalar>& y) {
  const auto x = tape.input();
  const Index T = x.rows(), in = a.in_features(), out = a.out_features(), r = a.rank(), E = a.num_experts();
  const Scalar s = a.scaling();
  if (tape.options.lora_dropout > 0) {
    draw_dropout(tape.dropout_scale, T, in, tape.options.lora_dropout, tape.noise_rng);
    tape.adapter_input = x.cwiseProduct(tape.dropout_scale);  // [T, in]
  } else {
    tape.dropout_scale.resize(0, 0);
    tape.adapter_input.resize(0, 0);
  }
  const Scalar* xa = tape.has_dropout() ? tape.adapter_input.data() : x.data();
  const Index ldx = tape.has_dropout() ? in : x.outerStride();
  tape.plan.build(tape.routing, E);
  const Index pairs = static_cast<Index>(tape.plan.tokens.size());
  tape.hidden.resize(pairs, r);
  reserve_kernel_scratch(tape, std::max(tape.plan.max_count(), T), std::max(r, E));
  const Scalar* A = a.stacked_A().data();  // expert e: rows [e*r, (e+1)*r) of [E*r, in]
  const Scalar* Bt = a.stacked_B().data();  // column-major [out, E*r] = B^T [E*r, out] row-major
  for (const std::int32_t e : tape.plan.active) {
    const Index n = tape.plan.count(e), b = tape.plan.begin(e);
    const auto* tok = tape.plan.tokens.data() + b;
    const auto* gate = tape.plan.gates.data() + b;
    for (Index i = 0; i < n; ++i) {
      tape.in_rows[static_cast<std::size_t>(i)] = xa + Index(tok[i]) * ldx;
      tape.out_rows[static_cast<std::size_t>(i)] = y.data() + Index(tok[i]) * y.outerStride();
      tape.scale[static_cast<std::size_t>(i)] = s * gate[i];
    }
    Scalar* h = tape.hidden.data() + b * r;  // [n, r]
    // h = A_e x by grad_out without its dB part: rank rows walked in order, two at a time
    // against a tile of up to 8 tokens (same sums as the layer's shrink up to rounding; within
    // 3 % of its speed since the shrink reads 32 KB of A per pass).
    for (Index t0 = 0; t0 < n; t0 += even_tile(n, t0))
      kernels::grad_out(kernels::layer_arch{}, A + Index(e) * r * in, in, static_cast<Scalar*>(nullptr), 0, r, in,
                        tape.in_rows.data() + t0, static_cast<const Scalar*>(nullptr), 0, even_tile(n, t0),
                        h + t0 * r, r, tape.spill.data());
    for (Index i = 0; i < n; ++i) tape.in_rows[static_cast<std::size_t>(i)] = h + i * r;
    expand_rows(Bt + Index(e) * r * out, out, r, out, tape.in_rows.data(), tape.scale.data(), n,
                tape.out_rows.data());
  }
}

// The backward of the experts and the router, in two sweeps per expert over tiles of at most
// kernels::kGradTile of its pairs, each through a fused kernel of backward_kernels.hpp that reads
// the tokens' rows in place (no gathered copies):
//   1. over `out`: u = B_e^T dy and dB_e += dy (s g h)^T, each dy chunk loaded once for
//      both; then dL/dg = s <u, h> and dL/dh = s g u (kept for sweep 2);
//   (gate gradients -> logit gradients, for all tokens at once)
//   2. over `in`: dA_e += dL/dh x'^T and dx += A_e^T dL/dh (times the dropout scale), and,
//      for each token's slot-0 pair, the router's dW_r += dl x_r^T and dx += W_r^T dl (times
//      the jitter), all while the tile's x and dx chunks sit in L1.
// So dy and x are each read once per slot and dx updated in place once per slot, with no
// [T, in] temporary and no separate router pass, whatever the options.
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
  require_rows_cols(tape.routing.weights, T, k, "tape.routing.weights shape");
  const auto pairs = static_cast<std::size_t>(T * k);
  const auto& p = tape.plan;
  if (p.tokens.size() != pairs || p.slots.size() != pairs || p.gates.size() != pairs ||
      p.offsets.front() != 0 || p.offsets.back() != T * k)
    throw shape_error(mismatch("tape.plan pairs (tokens * top_k)", T * k, p.tokens.size()));
  require_rows_cols(tape.hidden, T * k, r, "tape.hidden shape (pairs, rank)");
  if (tape.has_router) {
    require_rows_cols(tape.logits, T, E, "tape.logits shape");
    require_rows_cols(tape.probs, T, E, "tape.probs shape");
    require_rows_cols(tape.logit_grad, T, E, "tape.logit_grad shape");
  }
  if (tape.has_dropout()) {
    require_rows_cols(tape.dropout_scale, T, in, "tape.dropout_scale shape");
    require_rows_cols(tape.adapter_input, T, in, "tape.adapter_input shape");
  }
  if (tape.has_jitter()) {
    require_rows_cols(tape.jitter, T, in, "tape.jitter shape");
    require_rows_cols(tape.router_input, T, in, "tape.router_input shape");
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

// Every check of a MoLoRA backward, before anything is written.
template <class Scalar>
void check_backward(const MoLoRAAdapter<Scalar>& a, const MoLoRATape<Scalar>& tape, const ConstRowRef<Scalar>& dy,
                    const MoLoRAGrads<Scalar>& g, const RowRef<Scalar>* dx) {
  const Index T = tape.num_tokens(), E = a.num_experts(), r = a.rank(), in = a.in_features(), out = a.out_features();
  a.check_live();
  check_tape(a, tape);
  require_rows_cols(dy, T, out, "dy shape");
  require_rows_cols(g.router_weight, E, in, "grads.router_weight shape");
  require_rows_cols(g.router_bias, 1, E, "grads.router_bias shape");
  require_rows_cols(g.A, E * r, in, "grads.A shape");
  require_rows_cols(g.B, out, E * r, "grads.B shape");
  if (dx) require_rows_cols(*dx, T, in, "dx shape");
}

// The caller holds the tape and has run check_backward.
template <class Scalar>
void backward_impl(const MoLoRAAdapter<Scalar>& a, MoLoRATape<Scalar>& tape, const detail::InRef<Scalar>& dy,
                   MoLoRAGrads<Scalar>& g, RowRef<Scalar>* dx) {
  using Arch = kernels::layer_arch;
  constexpr Index kT = kernels::kGradTile;
  const Index T = tape.num_tokens(), E = a.num_experts(), r = a.rank(), in = a.in_features(),
              out = a.out_features(), k = tape.routing.top_k();
  const Scalar s = a.scaling();
  if (T == 0) return;

  const Scalar* A = a.stacked_A().data();   // expert e: [r, in] at e*r*in
  const Scalar* Bt = a.stacked_B().data();  // expert e: B_e^T [r, out] at e*r*out
  const auto x = tape.input();
  const bool has_router = tape.has_router;
  // The experts see x' (x after dropout), the router x_r (x after jitter).
  const Scalar* xa = tape.has_dropout() ? tape.adapter_input.data() : x.data();
  const Index ldxa = tape.has_dropout() ? in : x.outerStride();
  const Scalar* xr = tape.has_jitter() ? tape.router_input.data() : x.data();
  const Index ldxr = tape.has_jitter() ? in : x.outerStride();
  const Index pairs = static_cast<Index>(tape.plan.tokens.size());
  if (has_router) tape.gate_grad.resize(T, k);  // dL/dg of each (token, slot)
  reserve_rows(tape.u, pairs, r);
  reserve_rows(tape.hs, kT, r);
  const auto spill_need = static_cast<std::size_t>(
      std::max(kernels::grad_out_scratch_size<Arch, Scalar>(r), kernels::grad_in_scratch_size(r + E)));
  if (tape.spill.size() < spill_need) tape.spill.resize(spill_need);

  // Sweep 1 per tile: u = B_e^T dy, dB_e^T += (s g h) dy^T; then dL/dg and dL/dh = s g u.
  const Scalar* dyr[kT];
  for (const std::int32_t e : tape.plan.active) {
    const Index n_e = tape.plan.count(e), b_e = tape.plan.begin(e);
    const Scalar* Bte = Bt + Index(e) * r * out;  // B_e^T [r, out]
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
        if (has_router) tape.gate_grad(tok[i], slot[i]) = s * u.row(i).dot(h.row(i));
        u.row(i) *= s * gate[i];  // dL/dh
      }
    }
  }

  // Gate weights -> logits. Renormalised: g = softmax(logits of the k selected), so
  // dl_j = g_j (dg_j - sum_S g_i dg_i) for j in S, 0 elsewhere. Masked: g_i = p_i with p the
  // full softmax, so dl_j = p_j (dg_j - sum_S p_i dg_i) over all j (dg_j = 0 off S).
  if (has_router) {
    tape.dlogits = tape.logit_grad;  // [T, E] auxiliary losses' part
    for (Index t = 0; t < T; ++t) {
      Scalar dot = 0;
      for (Index sl = 0; sl < k; ++sl) dot += tape.routing.weights(t, sl) * tape.gate_grad(t, sl);
      if (tape.normalize_top_k) {
        for (Index sl = 0; sl < k; ++sl)
          tape.dlogits(t, tape.routing.ids(t, sl)) += tape.routing.weights(t, sl) * (tape.gate_grad(t, sl) - dot);
      } else {
        for (Index j = 0; j < E; ++j) tape.dlogits(t, j) -= tape.probs(t, j) * dot;
        for (Index sl = 0; sl < k; ++sl) {
          const Index j = tape.routing.ids(t, sl);
          tape.dlogits(t, j) += tape.probs(t, j) * tape.gate_grad(t, sl);
        }
      }
    }
    if (a.router().has_bias()) g.router_bias += tape.dlogits.colwise().sum();
  }

  // Sweep 2 per tile: the expert's term over all its pairs, and the router's. In general
  // dL/dlogits is dense: the router's term is all E rows of W_r over the tile's slot-0
  // pairs (each token has exactly one). Each expert's slot-0 pairs go first, so its router
  // terms fill whole tiles (the kernel's cost per sweep barely depends on the number of
  // tokens) and at most one tile per expert has a partial router term. Renormalised top-k
  // without auxiliary losses makes it sparse instead: dl_j = 0 off the k selected experts,
  // so the router's term is the single row e of W_r over all of expert e's pairs, k rows of
  // W_r per token rather than E (when 2k <= E; otherwise the dense form does less).
  // Without dropout and jitter the router sees the experts' x and its x-gradient takes no
  // mask, so that row is folded into the expert's term as its extra row: the x and dx
  // chunks are then read and written once for both.
  const bool sparse_router = has_router && tape.normalize_top_k && 2 * k <= E &&
                             (tape.logit_grad.array() == Scalar(0)).all();
  const bool fold_router = sparse_router && !tape.has_dropout() && !tape.has_jitter();
  tape.pair_order.resize(static_cast<std::size_t>(pairs));
  const Scalar* xe[kT];
  const Scalar* he[kT];
  Scalar* dxe[kT];
  const Scalar* me[kT];
  const Scalar* xrr[kT];
  const Scalar* lr[kT];
  Scalar* dxr[kT];
  const Scalar* mr[kT];
  kernels::GradInTerm<Scalar> terms[2];
  for (const std::int32_t e : tape.plan.active) {
    const Index n_e = tape.plan.count(e), b_e = tape.plan.begin(e);
    auto& ex = terms[0];
    ex.w = A + Index(e) * r * in;  // A_e [r, in]
    ex.ldw = in;
    ex.dw = g.A.data() + Index(e) * r * g.A.outerStride();  // dA_e [r, in]
    ex.lddw = g.A.outerStride();
    ex.rows = r;
    ex.x = xe;
    ex.coef = he;
    ex.dx = dx ? dxe : nullptr;
    ex.mask = tape.has_dropout() ? me : nullptr;
    ex.extra_w = fold_router ? a.router().weight().data() + Index(e) * a.router().weight().outerStride() : nullptr;
    ex.extra_dw = fold_router ? g.router_weight.data() + Index(e) * g.router_weight.outerStride() : nullptr;
    ex.extra_coef = fold_router ? lr : nullptr;
    auto& ro = terms[1];
    ro.w = a.router().weight().data();  // W_r [E, in], or its row e when sparse
    ro.ldw = a.router().weight().outerStride();
    ro.dw = g.router_weight.data();
    ro.lddw = g.router_weight.outerStride();
    ro.rows = E;
    if (sparse_router) {
      ro.w += Index(e) * ro.ldw;
      ro.dw += Index(e) * ro.lddw;
      ro.rows = 1;
    }
    ro.x = xrr;
    ro.coef = lr;
    ro.dx = dx ? dxr : nullptr;
    ro.mask = tape.has_jitter() ? mr : nullptr;
    // Expert e's pairs, the n_router that carry a router term first.
    Index* order = tape.pair_order.data() + b_e;
    const auto routed = [&](Index i) {
      return sparse_router || (has_router && tape.plan.slots[static_cast<std::size_t>(b_e + i)] == 0);
    };
    Index n_router = 0;
    for (Index i = 0; i < n_e; ++i)
      if (routed(i)) order[n_router++] = b_e + i;
    for (Index i = 0, o = n_router; i < n_e; ++i)
      if (!routed(i)) order[o++] = b_e + i;
    for (Index t0 = 0; t0 < n_e; t0 += even_tile(n_e, t0)) {
      const Index n = even_tile(n_e, t0);
      Index m = 0;
      for (Index i = 0; i < n; ++i) {
        const Index p = order[t0 + i], t = tape.plan.tokens[static_cast<std::size_t>(p)];
        xe[i] = xa + t * ldxa;
        he[i] = tape.u.data() + p * tape.u.outerStride();
        if (dx) dxe[i] = dx->data() + t * dx->outerStride();
        if (tape.has_dropout()) me[i] = tape.dropout_scale.data() + t * in;
        if (t0 + i < n_router) {
          xrr[m] = xr + t * ldxr;
          lr[m] = tape.dlogits.data() + t * E + (sparse_router ? Index(e) : 0);
          if (dx) dxr[m] = dx->data() + t * dx->outerStride();
          if (tape.has_jitter()) mr[m] = tape.jitter.data() + t * in;
          ++m;
        }
      }
      ex.n = n;
      ro.n = m;
      kernels::grad_in(Arch{}, terms, has_router && !fold_router ? 2 : 1, in, tape.spill.data());
    }
  }
}

}  // namespace detail

// y += delta(x) as MoLoRAAdapter::add_delta computes it (same gating, same sampling stream
// when tape and workspace are seeded alike; equal up to rounding, since the layer may pick
// another kernel strategy for the batch), recording on tape what add_backward
// needs. x [T, in] must stay alive and unchanged until add_backward, unless it shares memory
// with y (the tape then keeps a copy). Zeroes tape.logit_grad. Returns the routing used.
// Throws shape_error / numeric_error (non-finite logits) / config_error (bad options).
template <class Scalar, class Derived>
const Routing<Scalar>& add_delta_train(const MoLoRAAdapter<Scalar>& a, const Eigen::MatrixBase<Derived>& x,
                                       detail::OutRef<Scalar> y, MoLoRATape<Scalar>& tape) {
  const detail::WorkspaceGuard hold(tape.in_use, "MoLoRATape");
  const ConstRowRef<Scalar> xr(x);
  detail::train_begin(a, xr, y, tape);
  detail::train_route(a, tape);
  detail::train_experts(a, tape, y);
  return tape.routing;
}

// Same with routing supplied by the caller: its weights are constants, the router is not
// run and gets no gradient (load_balancing_loss / router_z_loss then throw).
template <class Scalar, class Derived>
void add_delta_routed_train(const MoLoRAAdapter<Scalar>& a, const Eigen::MatrixBase<Derived>& x,
                            const Routing<Scalar>& routing, detail::OutRef<Scalar> y, MoLoRATape<Scalar>& tape) {
  const detail::WorkspaceGuard hold(tape.in_use, "MoLoRATape");
  const ConstRowRef<Scalar> xr(x);
  detail::train_begin(a, xr, y, tape);
  detail::train_routed(a, routing, tape);
  detail::train_experts(a, tape, y);
}

// Adds the adapter's gradients into grads (sized by MoLoRAGrads(adapter)) and, when dx is
// given, adds the adapter's and router's part of dL/dx [T, in] into dx (a host that does its
// own base matmul adds the base's x-gradient itself). dy is dL/dy [T, out]; tape is from the
// last training forward of this adapter; the adapter's weights must not have changed since.
// Only experts with routed tokens are touched. Also adds tape.logit_grad (auxiliary losses)
// to the router's gradient. Throws shape_error on shapes, the tape's included (a tape from
// another layer), state_error on a moved-from adapter or a tape in use; nothing is written
// then.
template <class Scalar>
void add_backward(const MoLoRAAdapter<Scalar>& a, MoLoRATape<Scalar>& tape, const detail::InRef<Scalar>& dy,
                  MoLoRAGrads<Scalar>& grads, detail::OutRef<Scalar> dx) {
  const detail::WorkspaceGuard hold(tape.in_use, "MoLoRATape");
  detail::check_backward(a, tape, dy, grads, &dx);
  detail::backward_impl(a, tape, dy, grads, &dx);
}
template <class Scalar>
void add_backward(const MoLoRAAdapter<Scalar>& a, MoLoRATape<Scalar>& tape, const detail::InRef<Scalar>& dy,
                  MoLoRAGrads<Scalar>& grads) {
  const detail::WorkspaceGuard hold(tape.in_use, "MoLoRATape");
  detail::check_backward(a, tape, dy, grads, static_cast<const RowRef<Scalar>*>(nullptr));
  detail::backward_impl(a, tape, dy, grads, static_cast<RowRef<Scalar>*>(nullptr));
}

// y = x W0^T + b0 + delta(x), MoLoRALinear::forward's output (up to rounding), recording on
// tape what backward needs. Throws as forward does; y is unchanged when it throws (the
// router runs before y is written).
template <class Scalar, class Derived>
const Routing<Scalar>& forward_train(const MoLoRALinear<Scalar>& layer, const Eigen::MatrixBase<Derived>& x,
                                     detail::OutRef<Scalar> y, MoLoRATape<Scalar>& tape) {
  const detail::WorkspaceGuard hold(tape.in_use, "MoLoRATape");
  const ConstRowRef<Scalar> xr(x);
  layer.check_live();
  detail::train_begin(layer.adapter(), xr, y, tape);
  detail::train_route(layer.adapter(), tape);
  layer.forward_base(tape.input(), y);  // [T, out]
  detail::train_experts(layer.adapter(), tape, y);
  return tape.routing;
}
template <class Scalar, class Derived>
void forward_routed_train(const MoLoRALinear<Scalar>& layer, const Eigen::MatrixBase<Derived>& x,
                          const Routing<Scalar>& routing, detail::OutRef<Scalar> y, MoLoRATape<Scalar>& tape) {
  const detail::WorkspaceGuard hold(tape.in_use, "MoLoRATape");
  const ConstRowRef<Scalar> xr(x);
  layer.check_live();
  detail::train_begin(layer.adapter(), xr, y, tape);
  detail::train_routed(layer.adapter(), routing, tape);
  layer.forward_base(tape.input(), y);  // [T, out]
  detail::train_experts(layer.adapter(), tape, y);
}

// dx = dy W0 [T, in]: the frozen base's x-gradient alone (no weight gradient).
template <class Scalar>
void base_backward(const MoLoRALinear<Scalar>& layer, const detail::InRef<Scalar>& dy, detail::OutRef<Scalar> dx) {
  detail::require_rows_cols(dy, dy.rows(), layer.out_features(), "dy shape");
  detail::require_rows_cols(dx, dy.rows(), layer.in_features(), "dx shape");
  dx.noalias() = dy * layer.base_weight();  // [T, in]
}

// Writes dL/dx [T, in] (base + adapter + router) into dx and adds the adapter's gradients
// into grads. The base weight is frozen: it gets no gradient. Throws as add_backward does,
// before dx or grads are written.
template <class Scalar>
void backward(const MoLoRALinear<Scalar>& layer, MoLoRATape<Scalar>& tape, const detail::InRef<Scalar>& dy,
              MoLoRAGrads<Scalar>& grads, detail::OutRef<Scalar> dx) {
  const detail::WorkspaceGuard hold(tape.in_use, "MoLoRATape");
  layer.check_live();
  detail::check_backward(layer.adapter(), tape, dy, grads, &dx);
  base_backward(layer, dy, dx);
  detail::backward_impl(layer.adapter(), tape, dy, grads, &dx);
}
// Without dL/dx (the first layer of a model): parameter gradients only.
template <class Scalar>
void backward(const MoLoRALinear<Scalar>& layer, MoLoRATape<Scalar>& tape, const detail::InRef<Scalar>& dy,
              MoLoRAGrads<Scalar>& grads) {
  const detail::WorkspaceGuard hold(tape.in_use, "MoLoRATape");
  layer.check_live();
  detail::check_backward(layer.adapter(), tape, dy, grads, static_cast<const RowRef<Scalar>*>(nullptr));
  detail::backward_impl(layer.adapter(), tape, dy, grads, static_cast<RowRef<Scalar>*>(nullptr));
}

}  // namespace molora
