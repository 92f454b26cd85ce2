// Training an adapter set (docs/design-notes.md, "Adapter sets"): several tenants' adapters
// trained in one mixed batch. forward_train groups the batch's tokens by adapter (the set's
// counting sort), runs each used adapter's training forward (backward.hpp) on its own tokens
// gathered into a block, and scatters the result; add_backward sends dL/dy of each token to
// its adapter's backward and dL/dx back to the token. Gradients go only to the adapters the
// batch used; every token is visited once per pass (each adapter sees only its tokens).
// The set's per-adapter scale c multiplies the adapter's delta, so y += c * delta and the
// adapter's backward sees c * dL/dy. Only adapters shared from a MoLoRAAdapter or a LoRA can
// be trained (wrapped views, e.g. of a mapped file, have no trainable object).
#pragma once

#include <cstdint>
#include <vector>

#include "adapter_set.hpp"
#include "backward.hpp"
#include "errors.hpp"
#include "types.hpp"

namespace molora {

// Per adapter of a set, the gradients of its trainable tensors (laid out like them); empty
// for empty slots. Backward passes add into them; zero() between optimiser steps.
template <class Scalar>
struct AdapterSetGrads {
  std::vector<MoLoRAGrads<Scalar>> molora;  // [N]; sized for MoLoRA adapters
  std::vector<LoRAGrads<Scalar>> lora;      // [N]; sized for plain LoRAs

  AdapterSetGrads() = default;
  explicit AdapterSetGrads(const AdapterSet<Scalar>& set) { resize_like(set); }
  void resize_like(const AdapterSet<Scalar>& set) {
    molora.assign(static_cast<std::size_t>(set.size()), MoLoRAGrads<Scalar>());
    lora.assign(static_cast<std::size_t>(set.size()), LoRAGrads<Scalar>());
    for (Index a = 0; a < set.size(); ++a) {
      const auto& p = set.adapter(a);
      if (!p) continue;
      if (p->molora_adapter()) molora[static_cast<std::size_t>(a)].resize_like(*p->molora_adapter());
      if (p->lora()) lora[static_cast<std::size_t>(a)].resize_like(*p->lora());
    }
  }
  void zero() {
    for (auto& g : molora) g.zero();
    for (auto& g : lora) g.zero();
  }
};

// What forward_train saves for add_backward: the tokens grouped by adapter, each used
// adapter's gathered input and its own tape. One per set and step; reuse it.
template <class Scalar>
struct AdapterSetTape {
  TrainingOptions options;  // given to every adapter's tape
  Index num_tokens = 0;
  std::vector<std::int32_t> adapter;        // [T] adapter of each token, -1 = base only
  std::vector<Index> offsets;               // [N + 1] adapter a's tokens: tokens[offsets[a]..]
  std::vector<std::int32_t> tokens;         // adapted tokens grouped by adapter, ascending
  std::vector<RowMatrix<Scalar>> x;         // [N] each adapter's gathered x rows
  std::vector<MoLoRATape<Scalar>> molora;   // [N]
  std::vector<LoRATape<Scalar>> lora;       // [N]
  RowMatrix<Scalar> rows_out, rows_in;      // scratch: gathered y / dy and dx rows
  bool seeded = false;
  std::uint64_t seed_base = 0;
  detail::InUseFlag in_use;

  // Seeds every adapter's tape (adapter a's with s + a) at each forward_train: reproducible
  // dropout, jitter and sampling.
  void seed(std::uint64_t s) {
    seeded = true;
    seed_base = s;
  }
};

namespace detail {

template <class Scalar>
void require_trainable(const AdapterSet<Scalar>& set, Index a) {
  const auto& p = set.adapter(a);
  if (p && !p->molora_adapter() && !p->lora())
    throw config_error(mismatch(cat("adapter ", a, " (training)"), "an adapter shared from a MoLoRAAdapter or a LoRA",
                                "wrapped weights without a trainable object"));
}

}  // namespace detail

// y[t] += c_a * delta_a(x[t]) for each token's adapter a (nothing for -1), recording on tape
// what add_backward needs (tape keeps its own copy of each adapter's x rows, so x may change
// or alias y afterwards). Equal to AdapterSet::add_delta up to rounding (other kernels; the
// same routing, except for sampling draws). Throws as add_delta does, and config_error for an
// adapter the batch uses that cannot be trained; y is unchanged when it throws.
template <class Scalar, class Derived>
void forward_train(const AdapterSet<Scalar>& set, const Eigen::MatrixBase<Derived>& x_in, TokenAdapters ids,
                   detail::OutRef<Scalar> y, AdapterSetTape<Scalar>& tape) {
  const detail::WorkspaceGuard hold(tape.in_use, "AdapterSetTape");
  const ConstRowRef<Scalar> x(x_in);
  tape.options.validate();
  const Index T = x.rows(), N = set.size(), in = set.in_features(), out = set.out_features();
  if (x.cols() != in) throw shape_error(detail::mismatch("x columns (in_features)", in, x.cols()));
  detail::require_shape(y, T, out, "y shape");
  if (ids.size != T) throw shape_error(detail::mismatch("adapter ids (one per token)", T, ids.size));
  tape.adapter.resize(static_cast<std::size_t>(T));
  tape.offsets.assign(static_cast<std::size_t>(N) + 1, 0);
  for (Index t = 0; t < T; ++t) {
    std::int32_t a = ids.ids[t];
    if (a < -1 || a >= N)
      throw numeric_error(detail::cat("adapter id of token ", t, ": expected -1 or an adapter id in [0, ", N, "), got ", a));
    if (a >= 0 && !set.adapter(a)) a = -1;
    if (a >= 0) {
      detail::require_trainable(set, a);
      ++tape.offsets[static_cast<std::size_t>(a) + 1];
    }
    tape.adapter[static_cast<std::size_t>(t)] = a;
  }
  for (Index a = 0; a < N; ++a) tape.offsets[static_cast<std::size_t>(a) + 1] += tape.offsets[static_cast<std::size_t>(a)];
  tape.tokens.resize(static_cast<std::size_t>(tape.offsets.back()));
  {
    std::vector<Index> cur(tape.offsets.begin(), tape.offsets.end() - 1);
    for (Index t = 0; t < T; ++t)
      if (const std::int32_t a = tape.adapter[static_cast<std::size_t>(t)]; a >= 0)
        tape.tokens[static_cast<std::size_t>(cur[static_cast<std::size_t>(a)]++)] = static_cast<std::int32_t>(t);
  }
  tape.x.resize(static_cast<std::size_t>(N));
  tape.molora.resize(static_cast<std::size_t>(N));
  tape.lora.resize(static_cast<std::size_t>(N));
  // Every adapter's rows first (with its tape's checks), then y: a throw leaves y unchanged.
  std::vector<RowMatrix<Scalar>> deltas(static_cast<std::size_t>(N));
  for (Index a = 0; a < N; ++a) {
    const Index b = tape.offsets[static_cast<std::size_t>(a)], n = tape.offsets[static_cast<std::size_t>(a) + 1] - b;
    if (n == 0) continue;
    const SetAdapter<Scalar>& ad = *set.adapter(a);
    auto& xa = tape.x[static_cast<std::size_t>(a)];
    xa.resize(n, in);  // [n, in]
    for (Index i = 0; i < n; ++i) xa.row(i) = x.row(tape.tokens[static_cast<std::size_t>(b + i)]);
    auto& d = deltas[static_cast<std::size_t>(a)];
    d.setZero(n, out);  // [n, out]
    if (ad.molora_adapter()) {
      auto& tp = tape.molora[static_cast<std::size_t>(a)];
      tp.options = tape.options;
      if (tape.seeded) tp.seed(tape.seed_base + static_cast<std::uint64_t>(a));
      add_delta_train(*ad.molora_adapter(), xa, d, tp);
    } else {
      auto& tp = tape.lora[static_cast<std::size_t>(a)];
      tp.options = tape.options;
      if (tape.seeded) tp.seed(tape.seed_base + static_cast<std::uint64_t>(a));
      add_delta_train(*ad.lora(), xa, d, tp);
    }
  }
  tape.num_tokens = T;
  for (Index a = 0; a < N; ++a) {
    const Index b = tape.offsets[static_cast<std::size_t>(a)], n = tape.offsets[static_cast<std::size_t>(a) + 1] - b;
    if (n == 0) continue;
    const auto c = static_cast<Scalar>(set.adapter(a)->scale());
    const auto& d = deltas[static_cast<std::size_t>(a)];
    for (Index i = 0; i < n; ++i) y.row(tape.tokens[static_cast<std::size_t>(b + i)]) += c * d.row(i);
  }
}

// Adds each used adapter's gradients into grads (sized by AdapterSetGrads(set)) and, when dx
// is given, the adapters' part of dL/dx [T, in] into dx. dy is dL/dy [T, out]; tape is from
// the last forward_train of this set, whose adapters must not have changed since. Throws
// shape_error on shapes (nothing written then).
template <class Scalar>
void add_backward(const AdapterSet<Scalar>& set, AdapterSetTape<Scalar>& tape, const detail::InRef<Scalar>& dy,
                  AdapterSetGrads<Scalar>& grads, detail::OutRef<Scalar> dx) {
  const detail::WorkspaceGuard hold(tape.in_use, "AdapterSetTape");
  const Index T = tape.num_tokens, N = set.size(), in = set.in_features(), out = set.out_features();
  detail::require_shape(dy, T, out, "dy shape");
  detail::require_shape(dx, T, in, "dx shape");
  if (static_cast<Index>(tape.offsets.size()) != N + 1)
    throw shape_error(detail::mismatch("tape adapters (recorded by a set of this size)", N,
                                       static_cast<Index>(tape.offsets.size()) - 1));
  if (static_cast<Index>(grads.molora.size()) != N || static_cast<Index>(grads.lora.size()) != N)
    throw shape_error(detail::mismatch("grads adapters (AdapterSetGrads(set))", N, grads.molora.size()));
  for (Index a = 0; a < N; ++a) {  // every used adapter's grads before anything is written
    if (tape.offsets[static_cast<std::size_t>(a) + 1] == tape.offsets[static_cast<std::size_t>(a)]) continue;
    const SetAdapter<Scalar>& ad = *set.adapter(a);
    const Index E = ad.num_experts(), r = ad.rank();
    if (ad.molora_adapter()) {
      const auto& g = grads.molora[static_cast<std::size_t>(a)];
      detail::require_shape(g.A, E * r, in, detail::cat("grads of adapter ", a, ": A shape").c_str());
      detail::require_shape(g.B, out, E * r, detail::cat("grads of adapter ", a, ": B shape").c_str());
      detail::require_shape(g.router_weight, E, in, detail::cat("grads of adapter ", a, ": router_weight shape").c_str());
    } else {
      const auto& g = grads.lora[static_cast<std::size_t>(a)];
      detail::require_shape(g.A, r, in, detail::cat("grads of adapter ", a, ": A shape").c_str());
      detail::require_shape(g.B, out, r, detail::cat("grads of adapter ", a, ": B shape").c_str());
    }
  }
  for (Index a = 0; a < N; ++a) {
    const Index b = tape.offsets[static_cast<std::size_t>(a)], n = tape.offsets[static_cast<std::size_t>(a) + 1] - b;
    if (n == 0) continue;
    const SetAdapter<Scalar>& ad = *set.adapter(a);
    const auto c = static_cast<Scalar>(ad.scale());
    tape.rows_out.resize(n, out);  // [n, out] c * dy of the adapter's tokens
    for (Index i = 0; i < n; ++i) tape.rows_out.row(i) = c * dy.row(tape.tokens[static_cast<std::size_t>(b + i)]);
    tape.rows_in.setZero(n, in);  // [n, in]
    if (ad.molora_adapter())
      add_backward(*ad.molora_adapter(), tape.molora[static_cast<std::size_t>(a)], tape.rows_out,
                   grads.molora[static_cast<std::size_t>(a)], tape.rows_in);
    else
      add_backward(*ad.lora(), tape.lora[static_cast<std::size_t>(a)], tape.rows_out, grads.lora[static_cast<std::size_t>(a)],
                   tape.rows_in);
    for (Index i = 0; i < n; ++i) dx.row(tape.tokens[static_cast<std::size_t>(b + i)]) += tape.rows_in.row(i);
  }
}

}  // namespace molora
