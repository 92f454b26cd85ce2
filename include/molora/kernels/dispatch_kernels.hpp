// Drivers that run the tile kernels of lora_kernels.hpp over a grouped routing (the arrays of
// a DispatchPlan): strategy `fused` (shrink and expand per tile of an expert's tokens) and the
// sparse expand of strategy `dense_shrink` (h for every expert already computed by one GEMM).
// Each driver handles only the tokens in [t_begin, t_end), so threads given disjoint token
// ranges write disjoint rows of y; per token, experts are added in ascending order whatever
// the range, so the result does not depend on how the tokens were split.
//
// The experts' weights have their own type Wt (ExpertStack's second parameter): Scalar, or
// for float bf16 / f16, widened as the tile kernels load them (lora_kernels.hpp), so a
// 16-bit stack gives the bits of a Scalar stack holding the widened values.
#pragma once

#include <algorithm>
#include <cstdint>

#include "lora_kernels.hpp"

namespace molora::kernels {

// All experts of one layer: stacked A [E*r, in] row-major and stacked B [out, E*r]
// column-major, i.e. expert e's A at a + e*r*in and its B^T [r, out] at b + e*r*out.
// Wt: the weights' storage type (Scalar, bf16 or f16); the scaling stays Scalar.
template <class Scalar, class Wt = Scalar>
struct ExpertStack {
  const Wt* a;
  const Wt* b;
  Index rank, in, out;
  Scalar scaling;
};

// The (token, gate) pairs grouped by expert: expert e's pairs are [offsets[e], offsets[e+1]),
// tokens ascending within an expert; `active` lists the experts with pairs, ascending.
template <class Scalar>
struct PairGroups {
  const Index* offsets;
  const std::int32_t* tokens;
  const Scalar* gates;
  const std::int32_t* active;
  Index num_active;
};

namespace detail {

// The pairs of expert e whose token lies in [t_begin, t_end): [lo, hi).
template <class Scalar>
inline void token_subrange(const PairGroups<Scalar>& g, std::int32_t e, Index t_begin, Index t_end, Index& lo,
                           Index& hi) noexcept {
  const std::int32_t* first = g.tokens + g.offsets[e];
  const std::int32_t* last = g.tokens + g.offsets[e + 1];
  lo = std::lower_bound(first, last, static_cast<std::int32_t>(t_begin)) - g.tokens;
  hi = std::lower_bound(first, last, static_cast<std::int32_t>(t_end)) - g.tokens;
}

}  // namespace detail

namespace detail {

// Calls body(e, p0, n) for every tile of `tile` consecutive pairs of each active expert e
// whose tokens lie in [t_begin, t_end): pairs [p0, p0 + n) of the grouped arrays.
template <class Scalar, class Body>
inline void for_each_tile(const PairGroups<Scalar>& g, Index t_begin, Index t_end, Index tile, Body&& body) {
  for (Index ai = 0; ai < g.num_active; ++ai) {
    const std::int32_t e = g.active[ai];
    Index lo = 0, hi = 0;
    token_subrange(g, e, t_begin, t_end, lo, hi);
    for (Index p0 = lo; p0 < hi; p0 += tile) body(e, p0, std::min(tile, hi - p0));
  }
}

}  // namespace detail

// Strategy fused, tokens [t_begin, t_end): y[t] += sum over t's pairs (e, g) of
// s * g * B_e A_e x[t]. x [T, in] and y [T, out] row-major with strides ldx, ldy (must not
// overlap); scratch holds fused_scratch_size<Arch, Scalar>(rank) values. hidden (null, or
// [pairs, rank] row-major in the groups' pair order) keeps h = A_e x[t] of pair p at
// hidden + p*rank for a backward (the training forward); y gets the same bits either way.
template <class Arch, class Scalar, class Wt>
void fused_tokens(Arch arch, const ExpertStack<Scalar, Wt>& w, const PairGroups<Scalar>& g, const Scalar* x, Index ldx,
                  Scalar* y, Index ldy, Index t_begin, Index t_end, Scalar* scratch, Scalar* hidden) noexcept {
  const Scalar* xr[kMaxTile];
  Scalar* yr[kMaxTile];
  Scalar sc[kMaxTile];
  const Index r = w.rank, tile = fused_tile<Wt>(r, w.in, w.out);
  detail::for_each_tile(g, t_begin, t_end, tile, [&](std::int32_t e, Index p0, Index n) {
    for (Index i = 0; i < n; ++i) {
      const Index tok = g.tokens[p0 + i];
      xr[i] = x + tok * ldx;
      yr[i] = y + tok * ldy;
      sc[i] = w.scaling * g.gates[p0 + i];
    }
    fused(arch, w.a + Index(e) * r * w.in, w.in, w.b + Index(e) * r * w.out, w.out, r, w.in, w.out, xr, yr, sc, n,
          scratch, tile, hidden ? hidden + p0 * r : nullptr);
  });
}

// Strategy fused for few tokens, split by output columns between threads instead of by
// tokens, in two steps. shrink_pairs: h = A_e x[t] for the pairs [p_begin, p_end) of the
// groups (in their order), into h + p*rank; spill holds kTile * rank * simd_width values.
// Each pair's h has the bits fused() computes for it (the shrink's values do not depend on
// how the pairs are grouped into calls).
template <class Arch, class Scalar, class Wt>
void shrink_pairs(Arch arch, const ExpertStack<Scalar, Wt>& w, const PairGroups<Scalar>& g, const Scalar* x, Index ldx,
                  Index p_begin, Index p_end, Scalar* h, Scalar* spill) noexcept {
  const Scalar* xr[kTile];
  const Index r = w.rank;
  for (Index ai = 0; ai < g.num_active; ++ai) {
    const std::int32_t e = g.active[ai];
    const Index lo = std::max(p_begin, g.offsets[e]), hi = std::min(p_end, g.offsets[e + 1]);
    for (Index p0 = lo; p0 < hi; p0 += kTile) {
      const Index n = std::min(kTile, hi - p0);
      for (Index i = 0; i < n; ++i) xr[i] = x + Index(g.tokens[p0 + i]) * ldx;
      shrink(arch, w.a + Index(e) * r * w.in, w.in, r, w.in, xr, n, h + p0 * r, r, spill);
    }
  }
}

// expand_pairs_columns: y[t][o] += s * g * (B_e h)[o] for every pair and the columns
// [o_begin, o_end) only, experts in ascending order per token. With o_begin a multiple of
// 16 (any SIMD width) and o_end one too or the layer's out, every column goes through the
// same vector lane or scalar tail as in fused(), so y gets fused()'s bits whatever the split.
template <class Arch, class Scalar, class Wt>
void expand_pairs_columns(Arch arch, const ExpertStack<Scalar, Wt>& w, const PairGroups<Scalar>& g, const Scalar* h,
                          Scalar* y, Index ldy, Index o_begin, Index o_end) noexcept {
  const Scalar* hr[kTile];
  Scalar* yr[kTile];
  Scalar sc[kTile];
  const Index r = w.rank;
  if (o_end <= o_begin) return;
  for (Index ai = 0; ai < g.num_active; ++ai) {
    const std::int32_t e = g.active[ai];
    const Index lo = g.offsets[e], hi = g.offsets[e + 1];
    for (Index p0 = lo; p0 < hi; p0 += kTile) {
      const Index n = std::min(kTile, hi - p0);
      for (Index i = 0; i < n; ++i) {
        hr[i] = h + (p0 + i) * r;
        yr[i] = y + Index(g.tokens[p0 + i]) * ldy + o_begin;
        sc[i] = w.scaling * g.gates[p0 + i];
      }
      expand(arch, w.b + Index(e) * r * w.out + o_begin, w.out, r, o_end - o_begin, hr, sc, n, yr);
    }
  }
}

// Strategy dense_shrink's sparse expand, tokens [t_begin, t_end): h [T, E*r] row-major
// (stride ldh) holds A_e x[t] for every expert; adds s * g * B_e h[t, e*r..] for t's pairs.
template <class Arch, class Scalar, class Wt>
void sparse_expand_tokens(Arch arch, const ExpertStack<Scalar, Wt>& w, const PairGroups<Scalar>& g, const Scalar* h,
                          Index ldh, Scalar* y, Index ldy, Index t_begin, Index t_end) noexcept {
  const Scalar* hr[kTile];
  Scalar* yr[kTile];
  Scalar sc[kTile];
  const Index r = w.rank;
  detail::for_each_tile(g, t_begin, t_end, kTile, [&](std::int32_t e, Index p0, Index n) {
    for (Index i = 0; i < n; ++i) {
      const Index tok = g.tokens[p0 + i];
      hr[i] = h + tok * ldh + Index(e) * r;
      yr[i] = y + tok * ldy;
      sc[i] = w.scaling * g.gates[p0 + i];
    }
    expand(arch, w.b + Index(e) * r * w.out, w.out, r, w.out, hr, sc, n, yr);
  });
}

// Dense shrink of consecutive tokens [t_begin, t_end) of x [T, in] (stride ldx) against a
// row-major [rows, in] matrix w (stride ldw): out[t*ldo + j] = sum_c w[j*ldw + c] x[t*ldx + c].
// The router's logits (rows = E) without a GEMM's heap-allocated packing buffers; each
// token's values do not depend on the range. scratch: fused_scratch_size<Arch, Scalar>(rows).
template <class Arch, class Wt, class Scalar>
void dense_rows(Arch arch, const Wt* w, Index ldw, Index rows, Index in, const Scalar* x, Index ldx,
                Scalar* out, Index ldo, Index t_begin, Index t_end, Scalar* scratch) noexcept {
  const Scalar* xr[kTile];
  for (Index t0 = t_begin; t0 < t_end; t0 += kTile) {
    const Index n = std::min(kTile, t_end - t0);
    for (Index i = 0; i < n; ++i) xr[i] = x + (t0 + i) * ldx;
    shrink(arch, w, ldw, rows, in, xr, n, out + t0 * ldo, ldo, scratch);
  }
}

// The entries of the dispatch table for 16-bit experts (dispatched.hpp): the kernels above
// with the weight type in the name, as the table needs one member per signature.
template <class Arch, class Scalar>
void shrink_bf16(Arch a, const bf16* w, Index lda, Index r, Index in, const Scalar* const* x, Index n, Scalar* h,
                 Index ldh, Scalar* spill) noexcept {
  shrink(a, w, lda, r, in, x, n, h, ldh, spill);
}
template <class Arch, class Scalar>
void shrink_f16(Arch a, const f16* w, Index lda, Index r, Index in, const Scalar* const* x, Index n, Scalar* h,
                Index ldh, Scalar* spill) noexcept {
  shrink(a, w, lda, r, in, x, n, h, ldh, spill);
}
template <class Arch, class Scalar>
void expand_bf16(Arch a, const bf16* bt, Index ldb, Index r, Index out, const Scalar* const* h, const Scalar* scale,
                 Index n, Scalar* const* y) noexcept {
  expand(a, bt, ldb, r, out, h, scale, n, y);
}
template <class Arch, class Scalar>
void expand_f16(Arch a, const f16* bt, Index ldb, Index r, Index out, const Scalar* const* h, const Scalar* scale,
                Index n, Scalar* const* y) noexcept {
  expand(a, bt, ldb, r, out, h, scale, n, y);
}
template <class Arch, class Scalar>
void fused_tokens_bf16(Arch a, const ExpertStack<Scalar, bf16>& w, const PairGroups<Scalar>& g, const Scalar* x,
                       Index ldx, Scalar* y, Index ldy, Index t_begin, Index t_end, Scalar* scratch,
                       Scalar* hidden) noexcept {
  fused_tokens(a, w, g, x, ldx, y, ldy, t_begin, t_end, scratch, hidden);
}
template <class Arch, class Scalar>
void fused_tokens_f16(Arch a, const ExpertStack<Scalar, f16>& w, const PairGroups<Scalar>& g, const Scalar* x,
                      Index ldx, Scalar* y, Index ldy, Index t_begin, Index t_end, Scalar* scratch,
                      Scalar* hidden) noexcept {
  fused_tokens(a, w, g, x, ldx, y, ldy, t_begin, t_end, scratch, hidden);
}

}  // namespace molora::kernels

// The overloads for dispatched_arch (run-time ISA) sit next to the kernels they call.
#include "dispatched.hpp"
