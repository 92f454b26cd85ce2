// The fused kernels of the MoLoRA backward (docs/training.md, "Cost of a training step"),
// for a tile of at most kGradTile tokens routed to one expert:
//
//   grad_out  one sweep over `out`: u[t] = B_e^T dy[t] for every token of the tile, and the
//             tile's rank-n update dB_e^T += sum_t hs[t] dy[t]^T (hs = s g h), each chunk of
//             the dy rows loaded into L1 once and used for both;
//   grad_in   one sweep over `in`, chunk by chunk: dA_e += sum_t dh[t] x[t]^T (a rank-n
//             update walking each row of dA_e in order, the chunk of the x rows in L1) and
//             dx[t] += A_e^T dh[t] (an expand: a few vectors of each row of A_e per visit).
//             Rows are walked in order, not one column of all rows per step: the rows are
//             16 KB apart at MING-MOE's shape, so each such step would cost a new page and an
//             L1 set conflict per row. The router's dW_r += dl x_r^T and dx += W_r^T dl have
//             the same form (weights W_r, coefficients dL/dlogits), so a call takes several
//             such terms and applies them chunk by chunk while the chunks of the x and dx
//             rows are in cache. An optional per-element mask multiplies the dx term
//             (dropout's scale for the experts, jitter for the router). A term may carry
//             one extra row stored elsewhere (the router's row e of W_r, when dL/dlogits
//             is zero off the selected experts), which then costs no pass of its own.
//
// No gathered copies: rows of dy, x, dx, the coefficients and the masks come as pointer
// arrays. Layouts as in lora_kernels.hpp: A_e and W_r row-major [rows, in], B_e^T row-major
// [r, out] (B stored column-major), and the gradients in the same layouts. Written once for
// any xsimd Arch with scalar tails and a scalar fallback; kernels check nothing and throw
// nothing (backward.hpp has checked).
//
// Results depend on the tile's tokens and (Arch, Scalar) only: u's reduction order over
// `out` is fixed by the chunk length (a function of Arch and Scalar); the gradient updates
// add the tile's tokens in order.
#pragma once

#include <type_traits>

#include "lora_kernels.hpp"

// Software prefetch, to read (R) or to write (W), into all cache levels: the kernels walk
// 16-40 rows a power of two apart, more streams than the hardware prefetchers follow.
#if defined(__GNUC__) || defined(__clang__)
#define MOLORA_PREFETCH_R(p) __builtin_prefetch(static_cast<const void*>(p), 0, 3)
#define MOLORA_PREFETCH_W(p) __builtin_prefetch(static_cast<const void*>(p), 1, 3)
#else
#define MOLORA_PREFETCH_R(p) ((void)0)
#define MOLORA_PREFETCH_W(p) ((void)0)
#endif

namespace molora::kernels {

// Tokens per tile of the backward kernels: their register blocks are written for up to 8
// tokens (the switches below), whatever the forward's tile (kTile).
constexpr Index kGradTile = 8;

// Columns of `out` per pass of grad_out: the dy chunk of a full tile (kGradTile rows, 16 KB)
// stays in L1 while every rank row streams its B_e^T and dB_e^T chunks past it.
template <class Arch, class Scalar>
constexpr Index grad_out_chunk() noexcept {
  constexpr Index W = simd_width<Arch, Scalar>();
  constexpr Index kc = (Index(16384) / (kGradTile * Index(sizeof(Scalar)))) / W * W;
  return kc < W ? W : kc;
}

// Scratch (in Scalars) grad_out needs for rank r: vector partial sums of u between passes.
template <class Arch, class Scalar>
constexpr Index grad_out_scratch_size(Index rank) noexcept {
  return kGradTile * rank * simd_width<Arch, Scalar>();
}

// Columns of `in` per pass of grad_in: a full tile's x and dx chunks (2 x 8 KB) stay in L1
// from one term to the next.
template <class Arch, class Scalar>
constexpr Index grad_in_chunk() noexcept {
  constexpr Index W = simd_width<Arch, Scalar>();
  constexpr Index kc = (Index(16384) / (kGradTile * Index(sizeof(Scalar)))) / W * W;
  return kc < W ? W : kc;
}

// One term of grad_in, for n tokens:
//   dw[j*lddw + c] += sum_t coef[t][j] * x[t][c]                      j < rows, c < in
//   dx[t][c]       += mask[t][c] * sum_j coef[t][j] * w[j*ldw + c]     when dx is not null
// (mask taken as 1 when null). w and dw are [rows, in] row-major; x[t], dx[t], mask[t] point
// at `in` values, coef[t] at `rows` values. dx rows are distinct and alias nothing else.
// Optionally the term has one more row anywhere in memory, row `rows` of the sums above:
// weights extra_w and gradient extra_dw (`in` values each, both set or both null), its
// coefficient for token t at *extra_coef[t]; it shares the term's x, dx and mask. (The
// backward folds the router's row e of W_r into expert e's term so.)
template <class Scalar>
struct GradInTerm {
  const Scalar* w = nullptr;
  Index ldw = 0;
  Scalar* dw = nullptr;
  Index lddw = 0;
  Index rows = 0;
  const Scalar* const* x = nullptr;
  const Scalar* const* coef = nullptr;
  Scalar* const* dx = nullptr;
  const Scalar* const* mask = nullptr;
  Index n = 0;
  const Scalar* extra_w = nullptr;
  Scalar* extra_dw = nullptr;
  const Scalar* const* extra_coef = nullptr;
};

// Rows of a term's coefficients, its extra row included.
template <class Scalar>
constexpr Index term_rows(const GradInTerm<Scalar>& g) noexcept {
  return g.rows + (g.extra_w ? 1 : 0);
}

// ---- scalar kernels ----------------------------------------------------------------------

// u[t*ldu + j] = sum_o bt[j*ldb + o] * dy[t][o]; dbt[j*lddb + o] += sum_t hs[t*ldh + j] * dy[t][o]
// for t < n, j < r, o < out.
template <class Scalar>
void grad_out(scalar_arch, const Scalar* bt, Index ldb, Scalar* dbt, Index lddb, Index r, Index out,
              const Scalar* const* dy, const Scalar* hs, Index ldh, Index n, Scalar* u, Index ldu,
              Scalar* /*spill*/) noexcept {
  for (Index t = 0; t < n; ++t)
    for (Index j = 0; j < r; ++j) {
      Scalar s = 0;
      for (Index o = 0; o < out; ++o) s += bt[j * ldb + o] * dy[t][o];
      u[t * ldu + j] = s;
    }
  if (!dbt) return;
  for (Index j = 0; j < r; ++j)
    for (Index o = 0; o < out; ++o) {
      Scalar s = dbt[j * lddb + o];
      for (Index t = 0; t < n; ++t) s += hs[t * ldh + j] * dy[t][o];
      dbt[j * lddb + o] = s;
    }
}

namespace detail {

// Columns [c0, c1) of one grad_in term, one scalar at a time.
template <class Scalar>
inline void grad_in_scalar(const GradInTerm<Scalar>& g, Index c0, Index c1) noexcept {
  const Index t0 = 0, t1 = g.n;
  for (Index c = c0; c < c1; ++c) {
    for (Index j = 0; j < g.rows; ++j) {
      Scalar s = g.dw[j * g.lddw + c];
      for (Index t = t0; t < t1; ++t) s += g.coef[t][j] * g.x[t][c];
      g.dw[j * g.lddw + c] = s;
    }
    if (g.extra_w) {
      Scalar s = g.extra_dw[c];
      for (Index t = t0; t < t1; ++t) s += *g.extra_coef[t] * g.x[t][c];
      g.extra_dw[c] = s;
    }
    if (!g.dx) continue;
    for (Index t = t0; t < t1; ++t) {
      Scalar s = 0;
      for (Index j = 0; j < g.rows; ++j) s += g.coef[t][j] * g.w[j * g.ldw + c];
      if (g.extra_w) s += *g.extra_coef[t] * g.extra_w[c];
      g.dx[t][c] += g.mask ? g.mask[t][c] * s : s;
    }
  }
}

}  // namespace detail

// Columns [c0, c1) of one term (see GradInTerm).
template <class Scalar>
void grad_in_columns(scalar_arch, const GradInTerm<Scalar>& g, const Scalar* /*ct*/, Index c0, Index c1) noexcept {
  detail::grad_in_scalar(g, c0, c1);
}

#if !defined(MOLORA_NO_XSIMD)

namespace detail {

// Keeps a loaded vector in a register: GCC otherwise folds the load into each FMA that uses
// it, which doubles the loads of the dy rows in grad_out and makes it load-bound. An empty
// asm the value passes through (x86 vector registers); elsewhere nothing.
template <class B>
inline void pin_register(B& v) noexcept {
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__)) && defined(__SSE2__)
  auto reg = static_cast<typename B::register_type>(v);
  asm("" : "+v"(reg));
  v = B(reg);
#else
  (void)v;
#endif
}

// One register block of grad_out: RJ rank rows x RT tokens over columns [c0, c1) (whole
// vectors). u's vector partial sums start from zero on the first pass and from `spill`
// later; the last pass reduces them, adds the scalar tail [out_vec, out) and writes u. With
// HasDB, the dB^T rows of the block get the tile's update over [c0, c1) in the same loop.
//
// The last rank rows of a chunk prefetch the next chunk of the dy rows (they may come from
// memory; the weight rows, walked in order, are left to the hardware prefetcher).
template <int RJ, int RT, bool HasDB, class Arch, class Scalar>
inline void grad_out_block(const Scalar* bt, Index ldb, Scalar* dbt, Index lddb, const Scalar* const* dy,
                           const Scalar* hs, Index ldh, Index c0, Index c1, Index out_vec, Index out, bool first,
                           bool last, Scalar* spill, Index spill_ld, Scalar* u, Index ldu, Index j0,
                           Index r) noexcept {
  using B = xsimd::batch<Scalar, Arch>;
  constexpr Index W = static_cast<Index>(B::size);
  B acc[RJ][RT];
  B hv[HasDB ? RJ : 1][HasDB ? RT : 1];
  MOLORA_UNROLL
  for (int j = 0; j < RJ; ++j) {
    MOLORA_UNROLL
    for (int t = 0; t < RT; ++t) {
      acc[j][t] = first ? B(Scalar(0)) : B::load_unaligned(spill + t * spill_ld + j * W);
      if constexpr (HasDB) hv[j][t] = B(hs[t * ldh + j]);
    }
  }
  // Local copies: the stores below may alias anything as far as the compiler knows, and
  // reloading the row pointers every step would cost a load per token.
  const Scalar* dp[RT];
  MOLORA_UNROLL
  for (int t = 0; t < RT; ++t) dp[t] = dy[t];
  const bool last_rows = j0 + RJ >= r;
  for (Index c = c0; c < c1; c += W) {
    B dv[RT];
    MOLORA_UNROLL
    for (int t = 0; t < RT; ++t) {
      dv[t] = B::load_unaligned(dp[t] + c);
      pin_register(dv[t]);
    }
    if (last_rows) {
      MOLORA_UNROLL
      for (int t = 0; t < RT; ++t) MOLORA_PREFETCH_R(dp[t] + c + (c1 - c0));
    }
    MOLORA_UNROLL
    for (int j = 0; j < RJ; ++j) {
      const B bv = B::load_unaligned(bt + j * ldb + c);
      MOLORA_UNROLL
      for (int t = 0; t < RT; ++t) acc[j][t] = xsimd::fma(bv, dv[t], acc[j][t]);
      if constexpr (HasDB) {
        // Two partial sums halve the dependent chain of the dB update.
        B g0 = B::load_unaligned(dbt + j * lddb + c), g1(Scalar(0));
        MOLORA_UNROLL
        for (int t = 0; t < RT; ++t) {
          if (t % 2 == 0)
            g0 = xsimd::fma(hv[j][t], dv[t], g0);
          else
            g1 = xsimd::fma(hv[j][t], dv[t], g1);
        }
        (g0 + g1).store_unaligned(dbt + j * lddb + c);
      }
    }
  }
  finish_dots<RJ, RT>(acc, last, spill, spill_ld, u, ldu, [&](int j, int t, Scalar s) {
    for (Index o = out_vec; o < out; ++o) s += bt[j * ldb + o] * dy[t][o];
    return s;
  });
}

// All rank rows of one block of RT tokens: blocks of RJ rows (8 accumulators with the dB
// update, 16 without), then tails.
template <int RT, bool HasDB, class Arch, class Scalar>
inline void grad_out_tokens(const Scalar* bt, Index ldb, Scalar* dbt, Index lddb, Index r, const Scalar* const* dy,
                            const Scalar* hs, Index ldh, Index c0, Index c1, Index out_vec, Index out, bool first,
                            bool last, Scalar* spill, Index spill_ld, Scalar* u, Index ldu) noexcept {
  constexpr Index W = simd_width<Arch, Scalar>();
  constexpr int RJ = HasDB ? (RT <= 2 ? 4 : (RT <= 4 ? 2 : 1)) : (RT <= 2 ? 8 : (RT <= 4 ? 4 : 2));
  Index j = 0;
  auto run = [&](auto rows) {
    constexpr int R = decltype(rows)::value;
    grad_out_block<R, RT, HasDB, Arch>(bt + j * ldb, ldb, HasDB ? dbt + j * lddb : dbt, lddb, dy,
                                       HasDB ? hs + j : hs, ldh, c0, c1, out_vec, out, first, last, spill + j * W,
                                       spill_ld, u + j, ldu, j, r);
    j += R;
  };
  while (j + RJ <= r) run(std::integral_constant<int, RJ>{});
  if constexpr (RJ >= 8) {
    if (j + 4 <= r) run(std::integral_constant<int, 4>{});
  }
  if constexpr (RJ >= 4) {
    if (j + 2 <= r) run(std::integral_constant<int, 2>{});
  }
  if constexpr (RJ >= 2) {
    if (j < r) run(std::integral_constant<int, 1>{});
  }
}

// The rank-n update of one grad_in term over columns [c0, c1) (whole vectors), RJ rows at a
// time: dw[j] += sum_t ct[j*RT + t] x[t]. The coefficients stay in registers and each row
// is walked along its columns (one page at a time), the x chunks coming from L1 for every
// row block after the first.
template <int RJ, int RT, class Arch, class Scalar>
inline void grad_w_block(const Scalar* const* x, const Scalar* ct, Scalar* dw, Index lddw, Index c0,
                         Index c1) noexcept {
  using B = xsimd::batch<Scalar, Arch>;
  constexpr Index W = static_cast<Index>(B::size);
  B cv[RJ][RT];
  MOLORA_UNROLL
  for (int j = 0; j < RJ; ++j) {
    MOLORA_UNROLL
    for (int t = 0; t < RT; ++t) cv[j][t] = B(ct[j * RT + t]);
  }
  const Scalar* xp[RT];
  MOLORA_UNROLL
  for (int t = 0; t < RT; ++t) xp[t] = x[t];
  for (Index c = c0; c < c1; c += W) {
    B xv[RT];
    MOLORA_UNROLL
    for (int t = 0; t < RT; ++t) {
      xv[t] = B::load_unaligned(xp[t] + c);
      pin_register(xv[t]);
    }
    MOLORA_UNROLL
    for (int j = 0; j < RJ; ++j) {
      Scalar* p = dw + j * lddw + c;
      MOLORA_PREFETCH_W(p + 4 * W);
      // Two partial sums halve the dependent chain.
      B g0 = B::load_unaligned(p), g1(Scalar(0));
      MOLORA_UNROLL
      for (int t = 0; t < RT; ++t) {
        if (t % 2 == 0)
          g0 = xsimd::fma(cv[j][t], xv[t], g0);
        else
          g1 = xsimd::fma(cv[j][t], xv[t], g1);
      }
      (g0 + g1).store_unaligned(p);
    }
  }
}

// All rows of one term's rank-n update over [c0, c1): blocks of RJ rows with at most 16
// coefficient registers, then tails.
template <int RT, class Arch, class Scalar>
inline void grad_w_rows(const GradInTerm<Scalar>& g, const Scalar* ct, Index c0, Index c1) noexcept {
  constexpr int RJ = RT <= 4 ? 4 : 2;
  Index j = 0;
  for (; j + RJ <= g.rows; j += RJ)
    grad_w_block<RJ, RT, Arch>(g.x, ct + j * RT, g.dw + j * g.lddw, g.lddw, c0, c1);
  if constexpr (RJ == 4) {
    if (j + 2 <= g.rows) {
      grad_w_block<2, RT, Arch>(g.x, ct + j * RT, g.dw + j * g.lddw, g.lddw, c0, c1);
      j += 2;
    }
  }
  if (j < g.rows) grad_w_block<1, RT, Arch>(g.x, ct + j * RT, g.dw + j * g.lddw, g.lddw, c0, c1);
  if (g.extra_w) grad_w_block<1, RT, Arch>(g.x, ct + g.rows * RT, g.extra_dw, 0, c0, c1);
}

// One register block of the x-gradient: RT tokens x NV vectors at column c, summed over the
// term's rows (the expand of lora_kernels.hpp with the weights as B^T), then
// dx += mask * acc.
template <int RT, int NV, bool HasMask, class Arch, class Scalar>
inline void grad_x_block(const GradInTerm<Scalar>& g, const Scalar* ct, Index c) noexcept {
  using B = xsimd::batch<Scalar, Arch>;
  constexpr Index W = static_cast<Index>(B::size);
  B acc[RT][NV];
  MOLORA_UNROLL
  for (int t = 0; t < RT; ++t) {
    MOLORA_UNROLL
    for (int v = 0; v < NV; ++v) acc[t][v] = B(Scalar(0));
  }
  const Scalar* col = g.w + c;
  const Scalar* cj = ct;
  const auto add_row = [&](const Scalar* row) {
    B wv[NV];
    MOLORA_UNROLL
    for (int v = 0; v < NV; ++v) wv[v] = B::load_unaligned(row + v * W);
    MOLORA_UNROLL
    for (int t = 0; t < RT; ++t) {
      const B hv(cj[t]);
      MOLORA_UNROLL
      for (int v = 0; v < NV; ++v) acc[t][v] = xsimd::fma(hv, wv[v], acc[t][v]);
    }
  };
  for (Index j = 0; j < g.rows; ++j, col += g.ldw, cj += RT) add_row(col);
  if (g.extra_w) add_row(g.extra_w + c);  // cj is at the extra row's coefficients
  MOLORA_UNROLL
  for (int t = 0; t < RT; ++t) {
    MOLORA_UNROLL
    for (int v = 0; v < NV; ++v) {
      Scalar* p = g.dx[t] + c + v * W;
      if constexpr (HasMask)
        xsimd::fma(B::load_unaligned(g.mask[t] + c + v * W), acc[t][v], B::load_unaligned(p)).store_unaligned(p);
      else
        (B::load_unaligned(p) + acc[t][v]).store_unaligned(p);
    }
  }
}

// One term's x-gradient over [c0, c1) (whole vectors): two vectors per step (16
// accumulators for 8 tokens), then one.
template <int RT, bool HasMask, class Arch, class Scalar>
inline void grad_x_columns(const GradInTerm<Scalar>& g, const Scalar* ct, Index c0, Index c1) noexcept {
  constexpr Index W = simd_width<Arch, Scalar>();
  constexpr int NV = RT <= 4 ? 4 : 2;
  Index c = c0;
  for (; c + NV * W <= c1; c += NV * W) grad_x_block<RT, NV, HasMask, Arch>(g, ct, c);
  for (; c < c1; c += W) grad_x_block<RT, 1, HasMask, Arch>(g, ct, c);
}

template <int RT, class Arch, class Scalar>
inline void grad_in_tokens(const GradInTerm<Scalar>& g, const Scalar* ct, Index c0, Index c1) noexcept {
  grad_w_rows<RT, Arch>(g, ct, c0, c1);
  if (!g.dx) return;
  if (g.mask)
    grad_x_columns<RT, true, Arch>(g, ct, c0, c1);
  else
    grad_x_columns<RT, false, Arch>(g, ct, c0, c1);
}

}  // namespace detail

// Tile sweep over `out`: u[t*ldu + j] = sum_o bt[j*ldb + o] * dy[t][o] and
// dbt[j*lddb + o] += sum_t hs[t*ldh + j] * dy[t][o], for t < n, j < r, o < out (more than
// kGradTile tokens take one sweep per kGradTile of them). With dbt null only u is computed
// (hs is not read): the training forward's shrink h = A_e x, walking the rows of A_e in order.
// Requires: bt, dbt [r, out] row-major with strides ldb, lddb (not aliasing each other or
// the rest); dy[t] points at out values; hs n rows of stride ldh >= r; u n rows of stride
// ldu >= r; spill holds grad_out_scratch_size<Arch, Scalar>(r) values (unused when
// out < grad_out_chunk + simd_width).
template <class Arch, class Scalar>
void grad_out(Arch arch, const Scalar* bt, Index ldb, Scalar* dbt, Index lddb, Index r, Index out,
              const Scalar* const* dy, const Scalar* hs, Index ldh, Index n, Scalar* u, Index ldu,
              Scalar* spill) noexcept {
  if (n > kGradTile) {
    for (Index t0 = 0; t0 < n; t0 += kGradTile)
      grad_out(arch, bt, ldb, dbt, lddb, r, out, dy + t0, hs ? hs + t0 * ldh : hs, ldh,
               n - t0 < kGradTile ? n - t0 : kGradTile,
               u + t0 * ldu, ldu, spill);
    return;
  }
  constexpr Index W = simd_width<Arch, Scalar>();
  const Index out_vec = out - out % W, kc = grad_out_chunk<Arch, Scalar>(), spill_ld = r * W;
  for (Index c0 = 0;; c0 += kc) {
    const Index c1 = c0 + kc < out_vec ? c0 + kc : out_vec;
    const bool first = c0 == 0, last = c1 == out_vec;
#define MOLORA_GRAD_OUT_CASE(RT)                                                                            \
  case RT:                                                                                                  \
    if (dbt)                                                                                                \
      detail::grad_out_tokens<RT, true, Arch>(bt, ldb, dbt, lddb, r, dy, hs, ldh, c0, c1, out_vec, out, first, \
                                              last, spill, spill_ld, u, ldu);                               \
    else                                                                                                    \
      detail::grad_out_tokens<RT, false, Arch>(bt, ldb, dbt, lddb, r, dy, hs, ldh, c0, c1, out_vec, out,      \
                                               first, last, spill, spill_ld, u, ldu);                       \
    break;
    switch (n) {
      MOLORA_GRAD_OUT_CASE(1)
      MOLORA_GRAD_OUT_CASE(2)
      MOLORA_GRAD_OUT_CASE(3)
      MOLORA_GRAD_OUT_CASE(4)
      MOLORA_GRAD_OUT_CASE(5)
      MOLORA_GRAD_OUT_CASE(6)
      MOLORA_GRAD_OUT_CASE(7)
      MOLORA_GRAD_OUT_CASE(8)
      default: break;
    }
#undef MOLORA_GRAD_OUT_CASE
    if (last) break;
  }
  // dB^T's scalar tail columns.
  if (!dbt) return;
  for (Index j = 0; j < r; ++j)
    for (Index o = out_vec; o < out; ++o) {
      Scalar s = dbt[j * lddb + o];
      for (Index t = 0; t < n; ++t) s += hs[t * ldh + j] * dy[t][o];
      dbt[j * lddb + o] = s;
    }
}

// Columns [c0, c1) of one term (see GradInTerm), ct its coefficients transposed
// (ct[j*n + t] = coef[t][j]): whole vectors from c0, then a scalar tail.
template <class Arch, class Scalar>
void grad_in_columns(Arch, const GradInTerm<Scalar>& g, const Scalar* ct, Index c0, Index c1) noexcept {
  constexpr Index W = simd_width<Arch, Scalar>();
  const Index cv = c0 + (c1 - c0) / W * W;
  switch (g.n) {
    case 1: detail::grad_in_tokens<1, Arch>(g, ct, c0, cv); break;
    case 2: detail::grad_in_tokens<2, Arch>(g, ct, c0, cv); break;
    case 3: detail::grad_in_tokens<3, Arch>(g, ct, c0, cv); break;
    case 4: detail::grad_in_tokens<4, Arch>(g, ct, c0, cv); break;
    case 5: detail::grad_in_tokens<5, Arch>(g, ct, c0, cv); break;
    case 6: detail::grad_in_tokens<6, Arch>(g, ct, c0, cv); break;
    case 7: detail::grad_in_tokens<7, Arch>(g, ct, c0, cv); break;
    case 8: detail::grad_in_tokens<8, Arch>(g, ct, c0, cv); break;
    default: break;
  }
  detail::grad_in_scalar(g, cv, c1);
}

#endif  // !MOLORA_NO_XSIMD

// Scratch (in Scalars) grad_in needs for terms of `rows` rows in total (extra rows
// included): their coefficients transposed.
constexpr Index grad_in_scratch_size(Index rows) noexcept { return kGradTile * rows; }

namespace detail {

// grad_in for terms of at most kGradTile tokens each.
template <class Arch, class Scalar>
void grad_in_tile(Arch arch, const GradInTerm<Scalar>* terms, Index num_terms, Index in, Scalar* scratch) noexcept {
  Scalar* ct = scratch;
  for (Index i = 0; i < num_terms; ++i) {
    const GradInTerm<Scalar>& g = terms[i];
    for (Index t = 0; t < g.n; ++t) {
      for (Index j = 0; j < g.rows; ++j) ct[j * g.n + t] = g.coef[t][j];
      if (g.extra_w) ct[g.rows * g.n + t] = *g.extra_coef[t];
    }
    ct += term_rows(g) * g.n;
  }
  const Index kc = grad_in_chunk<Arch, Scalar>();
  for (Index c0 = 0; c0 < in; c0 += kc) {
    const Index c1 = c0 + kc < in ? c0 + kc : in;
    ct = scratch;
    for (Index i = 0; i < num_terms; ++i) {
      if (terms[i].n > 0) grad_in_columns(arch, terms[i], static_cast<const Scalar*>(ct), c0, c1);
      ct += term_rows(terms[i]) * terms[i].n;
    }
  }
}

}  // namespace detail

// Tile sweep over `in` for up to kMaxGradInTerms terms (an expert's, then the router's),
// chunk by chunk: every term's dw and dx updates over the first chunk of columns, then the
// next chunk, so rows shared by the terms (x, dx) are read from L1 by all but the first.
// Terms of more than kGradTile tokens take one sweep per kGradTile of them. scratch holds
// grad_in_scratch_size(sum of the terms' rows) values.
constexpr Index kMaxGradInTerms = 4;
template <class Arch, class Scalar>
void grad_in(Arch arch, const GradInTerm<Scalar>* terms, Index num_terms, Index in, Scalar* scratch) noexcept {
  Index n_max = 0;
  for (Index i = 0; i < num_terms; ++i) n_max = terms[i].n > n_max ? terms[i].n : n_max;
  if (n_max <= kGradTile) return detail::grad_in_tile(arch, terms, num_terms, in, scratch);
  GradInTerm<Scalar> part[kMaxGradInTerms];
  for (Index t0 = 0; t0 < n_max; t0 += kGradTile) {
    for (Index i = 0; i < num_terms; ++i) {
      const GradInTerm<Scalar>& g = terms[i];
      const Index lo = t0 < g.n ? t0 : g.n, hi = t0 + kGradTile < g.n ? t0 + kGradTile : g.n;
      part[i] = g;
      part[i].x = g.x + lo;
      part[i].coef = g.coef + lo;
      part[i].dx = g.dx ? g.dx + lo : nullptr;
      part[i].mask = g.mask ? g.mask + lo : nullptr;
      part[i].extra_coef = g.extra_coef ? g.extra_coef + lo : nullptr;
      part[i].n = hi - lo;
    }
    detail::grad_in_tile(arch, part, num_terms, in, scratch);
  }
}

}  // namespace molora::kernels

// The overloads for dispatched_arch (run-time ISA) sit next to the kernels they call.
#include "dispatched.hpp"
