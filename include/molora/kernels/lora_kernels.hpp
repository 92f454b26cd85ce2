// The fused MoLoRA expert kernels (docs/design-notes.md, "Performance model"): for a tile of tokens
// routed to one expert, shrink h = A_e x into a small L1 tile, then expand
// y[tok] += (s * g) * B_e h straight into each token's output row. Written once for any
// xsimd Arch over raw pointers and sizes, with scalar tails, any rank and any in/out;
// kernels check nothing and throw nothing (the layers above have checked).
//
// Layouts: A_e is [r, in] row-major (PyTorch's lora_A), B_e^T is [r, out] row-major (B_e
// stored column-major, see lora.hpp): the shrink is a dot product of contiguous rows and the
// expand a contiguous axpy over `out`. Rows of x, y and h are passed as pointer arrays, so a
// tile can gather any tokens without copying them.
//
// Bitwise reproducibility: the value added to one token's row depends only on that token's
// x row, the weights and its scale, never on which other tokens share its tile, the tile
// size or the register block: each vector accumulator sums over `in` in the same order
// whatever the chunking (partial sums spill to memory and come back exactly), and the lanes
// are reduced in a fixed order. Splitting the tokens between threads therefore changes no
// bit of the result.
//
// Weights in 16 bits: the weight pointers (A_e, B_e^T) have their own type W, Scalar or (for
// float) bf16 / f16, widened exactly as they are loaded (base_kernels.hpp's load_weights) and
// summed in the same order, with the scalar tails fused the same way (tail_mul_add): a
// 16-bit expert gives the bits of a Scalar expert holding the widened values.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "../half.hpp"
#include "arch.hpp"

#if defined(__clang__)
#define MOLORA_UNROLL _Pragma("unroll")
#elif defined(__GNUC__)
#define MOLORA_UNROLL _Pragma("GCC unroll 16")
#else
#define MOLORA_UNROLL
#endif

namespace molora::kernels {

using Index = std::ptrdiff_t;

// Tokens per fused tile: h of one tile is tile x r values, kept in L1. kTile is the tile of
// the other kernels and of fused() by default; fused tiles go up to kMaxTile.
constexpr Index kTile = 8;
constexpr Index kMaxTile = 32;

// The fused tile for one expert of rank r over in -> out: 8 tokens while the expert's
// weights (r * (in + out) values) fit comfortably in a core's L2 and are read from there
// once per tile; 32 when they do not (above 1 MiB, e.g. r = 64 at 4096 x 4096: 2 MiB), so
// the weights come from L3 four times less often. Measured at E = 8, k = 2, T = 256:
// r = 64, 4096 x 4096 goes from 39 to 67-70 GFLOP/s; r = 16 (512 KiB) and Qwen's
// 4096 <-> 11008 at r = 16 (0.94 MiB) are 5-7 % slower with 32 than with 8. The tile changes
// no bit of the result (see above).
template <class Scalar>
constexpr Index fused_tile(Index r, Index in, Index out) noexcept {
  return r * (in + out) * Index(sizeof(Scalar)) > (Index(1) << 20) ? kMaxTile : kTile;
}

// Elements of `in` reduced per pass of the shrink: about 32 KB of A_e per pass (16 KB was
// 3-5 % slower at MING-MOE's shape, T = 64-1024; whole rows in one pass no faster than
// 32 KB), but at least 16 vectors, or reloading the partial sums between passes costs more
// than the pass (large ranks then read their A chunk from L2). The chunk length changes the
// speed only, never the values.
template <class Arch, class Scalar>
constexpr Index shrink_chunk(Index rank) noexcept {
  constexpr Index W = simd_width<Arch, Scalar>();
  const Index kc = (Index(32768) / (rank * Index(sizeof(Scalar)))) / W * W;
  return kc < 16 * W ? 16 * W : kc;
}

// Scratch (in Scalars) that fused() needs for rank r and any tile up to kMaxTile: the h
// tile, then the spill of vector partial sums between passes of the shrink.
template <class Arch, class Scalar>
constexpr Index fused_scratch_size(Index rank) noexcept {
  return kMaxTile * rank + kMaxTile * rank * simd_width<Arch, Scalar>();
}

// A span of weights [p, end) that a kernel fetches into L2 (prefetcht1) while it streams
// other weights, through a cursor that moves on one cache line per fetch: the base product
// fetches the rows it reads two blocks on (base_kernels.hpp, ahead_span), fused() an
// expert's B_e^T during its shrink (PacedSpan). Addresses as integers: the cursor may run
// past the end, which it never fetches. A hint only: no bit changes.
struct FetchSpan {
  std::uintptr_t p = 0, end = 0;
};

// The bytes [begin, end) as a span: the cursor starts at the line holding `begin`, so that
// fetches a line apart reach every line the bytes touch, the last one included.
inline FetchSpan fetch_span(const void* begin, const void* end) noexcept {
  return {reinterpret_cast<std::uintptr_t>(begin) & ~std::uintptr_t(63), reinterpret_cast<std::uintptr_t>(end)};
}

// Fetches the line at the span's cursor (nothing past its end) and moves the cursor on.
inline void fetch_line(FetchSpan& s) noexcept {
#if defined(__GNUC__)
  if (s.p < s.end) __builtin_prefetch(reinterpret_cast<const void*>(s.p), 0, 2);
#endif
  s.p += 64;
}

// `Lines` lines fetched from the span's cursor, unrolled (a fixed number per step of a
// kernel's loop).
template <int Lines>
inline void fetch_lines(FetchSpan& s) noexcept {
  MOLORA_UNROLL
  for (int i = 0; i < Lines; ++i) fetch_line(s);
}

// A span fetched at a pace set by what the kernel has consumed of its own stream, so that
// the fetches spread over its loop rather than come in one burst: fused() fetches an
// expert's B_e^T this way while its shrink for a few tokens streams A_e, so that the expand
// finds B_e^T in L2 (docs/benchmarks.md, "B_e^T fetched during the shrink"). Each `consumed`
// bytes of the stream let span_bytes / stream_bytes times as many bytes of the span (counted
// in whole lines) be fetched, a little ahead (5/4 of that), so the span is in flight before
// the stream ends.
struct PacedSpan {
  FetchSpan span;
  Index num = 0, den = 1;  // span bytes fetched per stream byte consumed: num / den
  Index credit = 0;        // consumed * num not yet spent, in units of 1 / den bytes
};

// The span [p, p + span_bytes) paced over a stream of stream_bytes: its lines (whole, from
// the one holding p to the one holding its last byte) fetched by 4/5 of the stream.
inline PacedSpan paced_span(const void* p, Index span_bytes, Index stream_bytes) noexcept {
  PacedSpan s;
  s.span = fetch_span(p, static_cast<const unsigned char*>(p) + span_bytes);
  const auto lines = static_cast<Index>((s.span.end - s.span.p + 63) / 64);
  s.num = lines * 64 * 5;
  s.den = stream_bytes * 4 > 0 ? stream_bytes * 4 : 1;
  return s;
}

// Fetches the span's next lines that `consumed` bytes of the stream have paid for (nothing
// without a span or past its end).
inline void fetch_paced(PacedSpan* s, Index consumed) noexcept {
  if (!s || s->span.p >= s->span.end) return;
  s->credit += consumed * s->num;
  const Index line = 64 * s->den;
  for (; s->credit >= line && s->span.p < s->span.end; s->credit -= line) fetch_line(s->span);
}

// ---- scalar kernels ----------------------------------------------------------------------

namespace detail {

// s + a * b of the scalar kernels: fused explicitly where the object has FMA, so that a
// weight widened from 16 bits and the same value stored as Scalar give the same bits
// whatever the compiler would contract in each instantiation.
template <class Scalar>
inline Scalar scalar_mul_add(Scalar a, Scalar b, Scalar s) noexcept {
#if defined(__FMA__)
  return std::fma(a, b, s);
#else
  return s + a * b;
#endif
}

}  // namespace detail

// h[t*ldh + j] = sum_c a[j*lda + c] * x[t][c] for t < n, j < r. Wt: Scalar, bf16 or f16.
template <class Wt, class Scalar>
void shrink(scalar_arch, const Wt* a, Index lda, Index r, Index in, const Scalar* const* x, Index n, Scalar* h,
            Index ldh, Scalar* /*spill*/, PacedSpan* /*fetch*/ = nullptr) noexcept {
  for (Index t = 0; t < n; ++t)
    for (Index j = 0; j < r; ++j) {
      Scalar s = 0;
      for (Index c = 0; c < in; ++c) s = detail::scalar_mul_add(Scalar(to_float(a[j * lda + c])), x[t][c], s);
      h[t * ldh + j] = s;
    }
}

// y[t][o] += scale[t] * sum_j h[t][j] * bt[j*ldb + o] for t < n, o < out.
template <class Wt, class Scalar>
void expand(scalar_arch, const Wt* bt, Index ldb, Index r, Index out, const Scalar* const* h, const Scalar* scale,
            Index n, Scalar* const* y) noexcept {
  for (Index t = 0; t < n; ++t)
    for (Index o = 0; o < out; ++o) {
      Scalar s = 0;
      for (Index j = 0; j < r; ++j) s = detail::scalar_mul_add(h[t][j], Scalar(to_float(bt[j * ldb + o])), s);
      y[t][o] += scale[t] * s;
    }
}

#if !defined(MOLORA_NO_XSIMD)

namespace detail {

// Defined in base_kernels.hpp (which includes this header): one vector of Scalar from W
// values widened exactly, and the scalar tails' s + a * b with a fixed fusion per ISA.
template <class Arch, class Scalar, class W>
inline xsimd::batch<Scalar, Arch> load_weights(const W* p) noexcept;
template <class Arch, class Scalar>
inline Scalar tail_mul_add(Scalar a, Scalar b, Scalar s) noexcept;

// Vector registers the kernels may plan for: 32 with AVX-512, 16 otherwise (SSE, AVX2).
template <class Arch>
constexpr int vector_registers() noexcept {
  return std::is_base_of_v<xsimd::avx512f, Arch> ? 32 : 16;
}

// The end of a register block of RJ x RT dot products over one chunk of their length:
// with more chunks to come, the vector partial sums go to spill (row t of stride spill_ld,
// then j * W); after the last, each is reduced through memory (not xsimd::hadd, whose
// AVX-512 version trips GCC 12's -Wmaybe-uninitialized; once per dot product, so its cost
// does not matter), tail(j, t, sum) adds the scalar columns past the last full vector to
// the sum, in order, and the result goes to out[t * ldo + j]. Shared by the shrink and the backward's grad_out.
template <int RJ, int RT, class B, class Scalar, class Tail>
inline void finish_dots(const B (&acc)[RJ][RT], bool last, Scalar* spill, Index spill_ld, Scalar* out, Index ldo,
                        const Tail& tail) noexcept {
  constexpr Index W = static_cast<Index>(B::size);
  if (!last) {
    MOLORA_UNROLL
    for (int j = 0; j < RJ; ++j) {
      MOLORA_UNROLL
      for (int t = 0; t < RT; ++t) acc[j][t].store_unaligned(spill + t * spill_ld + j * W);
    }
    return;
  }
  alignas(64) Scalar lanes[W];
  for (int j = 0; j < RJ; ++j)
    for (int t = 0; t < RT; ++t) {
      acc[j][t].store_unaligned(lanes);
      Scalar s = 0;
      for (Index l = 0; l < W; ++l) s += lanes[l];
      out[t * ldo + j] = tail(j, t, s);
    }
}

// One register block of the shrink: RJ rank rows x RT tokens of vector accumulators over
// columns [c0, c1) of `in`. The first pass starts from zero, later passes reload the
// partial sums from `spill`; the last pass reduces them, adds the scalar tail
// [in_vec, in) and writes h.
template <int RJ, int RT, class Arch, class Wt, class Scalar>
inline void shrink_block(const Wt* a, Index lda, const Scalar* const* x, Index c0, Index c1, Index in_vec,
                         Index in, bool first, bool last, Scalar* spill, Index spill_ld, Scalar* h,
                         Index ldh, PacedSpan* fetch = nullptr) noexcept {
  using B = xsimd::batch<Scalar, Arch>;
  constexpr Index W = static_cast<Index>(B::size);
  B acc[RJ][RT];
  MOLORA_UNROLL
  for (int j = 0; j < RJ; ++j) {
    MOLORA_UNROLL
    for (int t = 0; t < RT; ++t)
      acc[j][t] = first ? B(Scalar(0)) : B::load_unaligned(spill + t * spill_ld + j * W);
  }
  for (Index c = c0; c < c1; c += W) {
    fetch_paced(fetch, RJ * W * Index(sizeof(Wt)));
    B xv[RT];
    MOLORA_UNROLL
    for (int t = 0; t < RT; ++t) xv[t] = B::load_unaligned(x[t] + c);
    MOLORA_UNROLL
    for (int j = 0; j < RJ; ++j) {
      const B av = load_weights<Arch, Scalar>(a + j * lda + c);
      MOLORA_UNROLL
      for (int t = 0; t < RT; ++t) acc[j][t] = xsimd::fma(av, xv[t], acc[j][t]);
    }
  }
  finish_dots<RJ, RT>(acc, last, spill, spill_ld, h, ldh, [&](int j, int t, Scalar s) {
    for (Index c = in_vec; c < in; ++c) s = tail_mul_add<Arch>(Scalar(to_float(a[j * lda + c])), x[t][c], s);
    return s;
  });
}

// Rank rows of A_e of at most this many bytes are read one after the other (one sequential
// stream) for one or two tokens on 32-register ISAs, rather than 8 side by side: cold on
// Zen 4, one token, r = 16, the shrink took 0.80x the time of a plain read of A_e with bf16
// rows of 2 KiB (in = 1024, the Qwen2 gate/up adapters) against 1.50-1.56x with 8 rows side
// by side, and 0.93x against 1.37x with float rows of 2 KiB; at 4 KiB the two were level and
// from 8 KiB 8 rows were faster (docs/benchmarks.md, "The shrink's short rows"). Same bits.
constexpr Index kShrinkShortRowBytes = 2048;

// Rank rows side by side in one register block of RT tokens: as many as the registers hold
// (RJ x RT accumulators, RT token vectors and one weight vector). With 32 registers, 8 rows for
// up to 3 tokens and 6 for 4; with 16, 8 rows for one token, 6 for two, 4 for three and 3 for
// four (8 x 2 and 4 x 4 accumulators, as before, left no register for x and the weights: GCC
// kept some accumulators on the stack, loaded and stored in every step). Cold on Zen 1, r =
// 16, in = 512-4096: four tokens 1.06-1.85x the time of a plain read of A_e against
// 1.16-2.01x in f32 (bf16 1.80-3.21x against 2.33-3.13x), two 0.81-1.38x against 0.88-1.41x
// in f32 (bf16 level: 1.16-2.32x against 1.30-2.25x; docs/benchmarks.md, "The adapter's
// blocks on 16-register ISAs").
template <int RT, class Arch>
constexpr int shrink_rows() noexcept {
  if constexpr (vector_registers<Arch>() >= 32) return RT <= 3 ? 8 : 6;
  return RT == 1 ? 8 : RT == 2 ? 6 : RT == 3 ? 4 : 3;
}

// All rank rows of one block of RT tokens: rows of at most kShrinkShortRowBytes one after the
// other for RT <= 2 with 32 vector registers; otherwise blocks of shrink_rows<RT>() rows, then
// tails of 4, 2 and 1 rows.
template <int RT, class Arch, class Wt, class Scalar>
inline void shrink_tokens(const Wt* a, Index lda, Index r, const Scalar* const* x, Index c0, Index c1,
                          Index in_vec, Index in, bool first, bool last, Scalar* spill, Index spill_ld, Scalar* h,
                          Index ldh, PacedSpan* fetch = nullptr) noexcept {
  constexpr Index W = simd_width<Arch, Scalar>();
  constexpr int RJ = shrink_rows<RT, Arch>();
  Index j = 0;
  if constexpr (RT <= 2 && vector_registers<Arch>() >= 32) {
    if (in * Index(sizeof(Wt)) <= kShrinkShortRowBytes) {
      for (; j < r; ++j)
        shrink_block<1, RT, Arch>(a + j * lda, lda, x, c0, c1, in_vec, in, first, last, spill + j * W, spill_ld,
                                  h + j, ldh, fetch);
      return;
    }
  }
  for (; j + RJ <= r; j += RJ)
    shrink_block<RJ, RT, Arch>(a + j * lda, lda, x, c0, c1, in_vec, in, first, last, spill + j * W, spill_ld,
                               h + j, ldh, fetch);
  if constexpr (RJ > 4) {
    if (j + 4 <= r) {
      shrink_block<4, RT, Arch>(a + j * lda, lda, x, c0, c1, in_vec, in, first, last, spill + j * W, spill_ld,
                                h + j, ldh, fetch);
      j += 4;
    }
  }
  if (j + 2 <= r) {
    shrink_block<2, RT, Arch>(a + j * lda, lda, x, c0, c1, in_vec, in, first, last, spill + j * W, spill_ld, h + j,
                              ldh, fetch);
    j += 2;
  }
  if (j < r)
    shrink_block<1, RT, Arch>(a + j * lda, lda, x, c0, c1, in_vec, in, first, last, spill + j * W, spill_ld, h + j,
                              ldh, fetch);
}

// One register block of the expand: RT tokens x NV output vectors starting at column o,
// summed over the rank, then y += scale * acc.
template <int RT, int NV, class Arch, class Wt, class Scalar>
inline void expand_block(const Wt* bt, Index ldb, Index r, const Scalar* const* h, const Scalar* scale,
                         Scalar* const* y, Index o) noexcept {
  using B = xsimd::batch<Scalar, Arch>;
  constexpr Index W = static_cast<Index>(B::size);
  B acc[RT][NV];
  MOLORA_UNROLL
  for (int t = 0; t < RT; ++t) {
    MOLORA_UNROLL
    for (int v = 0; v < NV; ++v) acc[t][v] = B(Scalar(0));
  }
  const Wt* col = bt + o;
  for (Index j = 0; j < r; ++j, col += ldb) {
    B bv[NV];
    MOLORA_UNROLL
    for (int v = 0; v < NV; ++v) bv[v] = load_weights<Arch, Scalar>(col + v * W);
    MOLORA_UNROLL
    for (int t = 0; t < RT; ++t) {
      const B hv(h[t][j]);
      MOLORA_UNROLL
      for (int v = 0; v < NV; ++v) acc[t][v] = xsimd::fma(hv, bv[v], acc[t][v]);
    }
  }
  MOLORA_UNROLL
  for (int t = 0; t < RT; ++t) {
    const B sv(scale[t]);
    MOLORA_UNROLL
    for (int v = 0; v < NV; ++v) {
      Scalar* p = y[t] + o + v * W;
      xsimd::fma(sv, acc[t][v], B::load_unaligned(p)).store_unaligned(p);
    }
  }
}

// Every token block (4, then a tail of 1 to 3) for NV vectors at column o.
template <int NV, class Arch, class Wt, class Scalar>
inline void expand_columns(const Wt* bt, Index ldb, Index r, const Scalar* const* h, const Scalar* scale,
                           Index n, Scalar* const* y, Index o) noexcept {
  Index t = 0;
  for (; t + 4 <= n; t += 4) expand_block<4, NV, Arch>(bt, ldb, r, h + t, scale + t, y + t, o);
  switch (n - t) {
    case 3: expand_block<3, NV, Arch>(bt, ldb, r, h + t, scale + t, y + t, o); break;
    case 2: expand_block<2, NV, Arch>(bt, ldb, r, h + t, scale + t, y + t, o); break;
    case 1: expand_block<1, NV, Arch>(bt, ldb, r, h + t, scale + t, y + t, o); break;
    default: break;
  }
}

// The few-token expand (2 to 4 tokens, 32 vector registers): one output vector per block, so
// the rank rows are read side by side a vector at a time, each advancing steadily, in passes
// of at most kExpandPassRows rows, or 8 when the rows lie a multiple of 4 KiB apart (they then
// share the L1 sets, 8 ways each). The columns go in chunks of kExpandChunkBytes per row; between
// passes the vector partial sums of a chunk wait in a stack buffer, exactly, so every column
// still sums fma(h[t][j], B_e^T[j][o], acc) over j in order from zero, as expand_block does:
// the same bits. Each pass copies its rows' h values to the stack first.
constexpr Index kExpandPassRows = 16;
constexpr Index kExpandChunkBytes = 2048;

// Columns [c0, c1) of RT tokens over nj rank rows from bt (h values in hp): partial sums
// from zero (First) or from spill, and to spill or, after the last rows (Last), into y.
template <int RT, bool First, bool Last, class Arch, class Wt, class Scalar>
inline void expand_few_columns(const Wt* bt, Index ldb, Index nj, const Scalar (&hp)[RT][kExpandPassRows],
                               const Scalar* scale, Scalar* const* y, Index c0, Index c1, Scalar* spill,
                               Index ld_spill) noexcept {
  using B = xsimd::batch<Scalar, Arch>;
  constexpr Index W = static_cast<Index>(B::size);
  for (Index o = c0; o < c1; o += W) {
    B acc[RT];
    MOLORA_UNROLL
    for (int t = 0; t < RT; ++t) {
      if constexpr (First)
        acc[t] = B(Scalar(0));
      else
        acc[t] = B::load_aligned(spill + t * ld_spill + (o - c0));
    }
    const Wt* col = bt + o;
    for (Index j = 0; j < nj; ++j, col += ldb) {
      const B bv = load_weights<Arch, Scalar>(col);
      MOLORA_UNROLL
      for (int t = 0; t < RT; ++t) acc[t] = xsimd::fma(B(hp[t][j]), bv, acc[t]);
    }
    MOLORA_UNROLL
    for (int t = 0; t < RT; ++t) {
      if constexpr (Last) {
        Scalar* p = y[t] + o;
        xsimd::fma(B(scale[t]), acc[t], B::load_unaligned(p)).store_unaligned(p);
      } else {
        acc[t].store_aligned(spill + t * ld_spill + (o - c0));
      }
    }
  }
}

template <int RT, class Arch, class Wt, class Scalar>
inline void expand_few(const Wt* bt, Index ldb, Index r, Index out_vec, const Scalar* const* h, const Scalar* scale,
                       Scalar* const* y) noexcept {
  constexpr Index kc = kExpandChunkBytes / Index(sizeof(Scalar)) / simd_width<Arch, Scalar>() *
                       simd_width<Arch, Scalar>();
  const Index rows = (ldb * Index(sizeof(Wt))) % 4096 == 0 ? 8 : kExpandPassRows;
  Scalar hp[RT][kExpandPassRows];
  auto take_h = [&](Index j0, Index j1) {
    for (int t = 0; t < RT; ++t)
      for (Index j = j0; j < j1; ++j) hp[t][j - j0] = h[t][j];
  };
  if (r <= rows) {  // one pass over all columns, nothing to spill
    take_h(0, r);
    expand_few_columns<RT, true, true, Arch>(bt, ldb, r, hp, scale, y, Index(0), out_vec, static_cast<Scalar*>(nullptr),
                                             Index(0));
    return;
  }
  alignas(64) Scalar spill[RT * kc];
  for (Index c0 = 0; c0 < out_vec; c0 += kc) {
    const Index c1 = c0 + kc < out_vec ? c0 + kc : out_vec;
    for (Index j0 = 0; j0 < r; j0 += rows) {
      const Index j1 = j0 + rows < r ? j0 + rows : r;
      take_h(j0, j1);
      const Wt* b0 = bt + j0 * ldb;
      if (j0 == 0)
        expand_few_columns<RT, true, false, Arch>(b0, ldb, j1 - j0, hp, scale, y, c0, c1, spill, kc);
      else if (j1 < r)
        expand_few_columns<RT, false, false, Arch>(b0, ldb, j1 - j0, hp, scale, y, c0, c1, spill, kc);
      else
        expand_few_columns<RT, false, true, Arch>(b0, ldb, j1 - j0, hp, scale, y, c0, c1, spill, kc);
    }
  }
}

}  // namespace detail

// Shrink of a tile: h[t*ldh + j] = sum_c a[j*lda + c] * x[t][c] for t < n, j < r.
// Requires: a [r, in] with row stride lda; x[t] points at in values; h holds n rows of
// stride ldh >= r; spill holds n * r * simd_width values (unused, may be null, when
// in < shrink_chunk + simd_width). h must not alias a or x. fetch (null, or a PacedSpan):
// lines fetched into L2 as the rows of A are consumed.
template <class Arch, class Wt, class Scalar>
void shrink(Arch, const Wt* a, Index lda, Index r, Index in, const Scalar* const* x, Index n, Scalar* h,
            Index ldh, Scalar* spill, PacedSpan* fetch = nullptr) noexcept {
  constexpr Index W = simd_width<Arch, Scalar>();
  const Index in_vec = in - in % W, spill_ld = r * W;
  // Up to four tokens (decode; one register block of tokens) reuse no A chunk: one pass
  // over `in` streams each A row once, with no spill (4-10 % faster at T = 1; up to 4 rather
  // than 2 tokens: fused over eigen at T = 16, 4 tokens per expert, from 1.93-1.97x to
  // 2.02-2.04x in `decode_bound`; up to 8 was slower again). The spill is exact, so the
  // chunking does not change the values.
  const Index kc = n <= 4 && in_vec > 0 ? in_vec : shrink_chunk<Arch, Scalar>(r);
  for (Index c0 = 0;; c0 += kc) {
    const Index c1 = c0 + kc < in_vec ? c0 + kc : in_vec;
    const bool first = c0 == 0, last = c1 == in_vec;
    Index t = 0;
    for (; t + 4 <= n; t += 4)
      detail::shrink_tokens<4, Arch>(a, lda, r, x + t, c0, c1, in_vec, in, first, last, spill + t * spill_ld,
                                     spill_ld, h + t * ldh, ldh, fetch);
    switch (n - t) {
      case 3:
        detail::shrink_tokens<3, Arch>(a, lda, r, x + t, c0, c1, in_vec, in, first, last, spill + t * spill_ld,
                                       spill_ld, h + t * ldh, ldh, fetch);
        break;
      case 2:
        detail::shrink_tokens<2, Arch>(a, lda, r, x + t, c0, c1, in_vec, in, first, last, spill + t * spill_ld,
                                       spill_ld, h + t * ldh, ldh, fetch);
        break;
      case 1:
        detail::shrink_tokens<1, Arch>(a, lda, r, x + t, c0, c1, in_vec, in, first, last, spill + t * spill_ld,
                                       spill_ld, h + t * ldh, ldh, fetch);
        break;
      default: break;
    }
    if (last) break;
  }
}

// Expand of a tile: y[t][o] += scale[t] * sum_j h[t][j] * bt[j*ldb + o] for t < n, o < out.
// Requires: bt [r, out] with row stride ldb; h[t] points at r values; y[t] at out values,
// distinct rows that alias neither bt nor h.
template <class Arch, class Wt, class Scalar>
void expand(Arch, const Wt* bt, Index ldb, Index r, Index out, const Scalar* const* h, const Scalar* scale,
            Index n, Scalar* const* y) noexcept {
  constexpr Index W = simd_width<Arch, Scalar>();
  const Index out_vec = out - out % W;
  Index o = 0;
  // Full tiles with 32 vector registers (AVX-512): 8 tokens x 3 vectors per block, so each
  // vector of B_e^T is loaded once per tile; with blocks of 4 tokens the second block found
  // the 16 rank rows (16 KiB apart, the same L1 sets) evicted. 26-43 % faster at r = 16-64
  // (tiles of 8 or more tokens, 4096 columns); ranks 3 and 200 unchanged.
  if constexpr (detail::vector_registers<Arch>() >= 32) {
    if (n >= 8)
      for (; o + 3 * W <= out_vec; o += 3 * W) {
        Index t = 0;
        for (; t + 8 <= n; t += 8) detail::expand_block<8, 3, Arch>(bt, ldb, r, h + t, scale + t, y + t, o);
        if (t < n) {
          detail::expand_columns<2, Arch>(bt, ldb, r, h + t, scale + t, n - t, y + t, o);
          detail::expand_columns<1, Arch>(bt, ldb, r, h + t, scale + t, n - t, y + t, o + 2 * W);
        }
      }
  }
  // Two to four tokens with 32 vector registers (the few tokens an expert gets at small
  // batches): expand_few, one output vector per block, the rank rows side by side, in passes
  // of 8 rows where they are a multiple of 4 KiB apart. Cold on Zen 4 (r = 16, out =
  // 1024-11008) it took 1.04-1.48x the time of a plain read of B_e^T in f32 against
  // 1.44-1.80x with the 8- or 4-vector blocks, 1.12-2.09x in bf16 against 1.46-2.75x; warm
  // from 14 % faster to 25 % slower (docs/benchmarks.md, "The few-token expand").
  if constexpr (detail::vector_registers<Arch>() >= 32) {
    switch (n) {
      case 2: detail::expand_few<2, Arch>(bt, ldb, r, out_vec, h, scale, y); o = out_vec; break;
      case 3: detail::expand_few<3, Arch>(bt, ldb, r, out_vec, h, scale, y); o = out_vec; break;
      case 4: detail::expand_few<4, Arch>(bt, ldb, r, out_vec, h, scale, y); o = out_vec; break;
      default: break;
    }
  }
  // One token (decode): one output vector per block, so the r rank rows are read side by side
  // a vector at a time, each advancing steadily, rather than 8 vectors of one row, then 8 of
  // the next. Cold on Zen 4 (r = 16, out = 1024-11008) the expand took 1.06-1.54x the time
  // of a plain read of B_e^T in bf16 against 1.50-1.93x with 8 vectors, 0.98-0.99x in f32
  // against 1.19-1.24x; warm 0-15 % longer (docs/benchmarks.md, "The expand's rank rows side
  // by side"). Rows a multiple of 4 KiB apart keep 8 vectors: they share L1 sets, and warm
  // the one-vector blocks took twice as long there (4096 columns of bf16); expand_few's
  // passes of 8 rows were faster there cold (1.12-1.14x the read against 1.25-1.31x at 4096
  // columns) but 1.2-1.4x slower warm ("The few-token expand").
  if (n == 1 && (ldb * Index(sizeof(Wt))) % 4096 != 0)
    for (; o + W <= out_vec; o += W) detail::expand_block<1, 1, Arch>(bt, ldb, r, h, scale, y, o);
  // One token over rows a multiple of 4 KiB apart: 8 output vectors per block keep enough
  // FMAs in flight. On 16-register ISAs two and three tokens take 4 vectors, four or more 2:
  // 2 x 8 and 4 x 4 accumulators left no register for B_e^T and h (GCC kept some of them on
  // the stack, loaded and stored in every step). Cold on Zen 1 (r = 16, out = 1024-11008)
  // that took the expand of two tokens from 1.31-1.62x the time of a plain read of B_e^T to
  // 1.08-1.28x in f32 (bf16 1.90-2.84x to 1.56-2.39x), of four from 1.93-2.19x to 1.36-1.65x
  // (bf16 2.54-3.49x to 2.30-2.92x); three tokens were 13-19 % slower warm with 2 vectors
  // (docs/benchmarks.md, "The adapter's blocks on 16-register ISAs").
  // (With 32 registers two to four tokens took expand_few above.)
  constexpr bool regs16 = detail::vector_registers<Arch>() < 32;
  if (n == 1)
    for (; o + 8 * W <= out_vec; o += 8 * W) detail::expand_columns<8, Arch>(bt, ldb, r, h, scale, n, y, o);
  if (!regs16 || n <= 3)
    for (; o + 4 * W <= out_vec; o += 4 * W) detail::expand_columns<4, Arch>(bt, ldb, r, h, scale, n, y, o);
  for (; o + 2 * W <= out_vec; o += 2 * W) detail::expand_columns<2, Arch>(bt, ldb, r, h, scale, n, y, o);
  if (o < out_vec) {
    detail::expand_columns<1, Arch>(bt, ldb, r, h, scale, n, y, o);
    o += W;
  }
  for (; o < out; ++o)
    for (Index t = 0; t < n; ++t) {
      Scalar s = 0;
      for (Index j = 0; j < r; ++j) s = detail::tail_mul_add<Arch>(h[t][j], Scalar(to_float(bt[j * ldb + o])), s);
      y[t][o] += scale[t] * s;
    }
}

#endif  // !MOLORA_NO_XSIMD

// Fused shrink-expand of n tokens routed to one expert, `tile` tokens at a time
// (1 <= tile <= kMaxTile): y[t] += scale[t] * B_e (A_e x[t]). Requires: a [r, in] (stride
// lda), bt = B_e^T [r, out] (stride ldb), x[t] / y[t] rows of in / out values (y rows
// distinct, not aliasing x or the weights), scratch of fused_scratch_size<Arch, Scalar>(r)
// values. The tile changes the speed, not the values. For tiles of up to 4 tokens the shrink
// fetches B_e^T into L2 as it streams A_e (PacedSpan), so that the expand finds it there.
// keep (null, or n x r values aliasing nothing else) asks to keep what a backward needs:
// h = A_e x[t] (unscaled) of token t is then shrunk straight into keep + t*r instead of the
// scratch tile; y gets the same bits.
template <class Arch, class Wt, class Scalar>
void fused(Arch arch, const Wt* a, Index lda, const Wt* bt, Index ldb, Index r, Index in, Index out,
           const Scalar* const* x, Scalar* const* y, const Scalar* scale, Index n, Scalar* scratch,
           Index tile = kTile, Scalar* keep = nullptr) noexcept {
  tile = tile < 1 ? 1 : tile > kMaxTile ? kMaxTile : tile;
  Scalar* h = scratch;
  Scalar* spill = scratch + tile * r;
  const Scalar* hrows[kMaxTile];
  for (Index i = 0; i < tile; ++i) hrows[i] = h + i * r;
  for (Index t0 = 0; t0 < n; t0 += tile) {
    const Index nt = n - t0 < tile ? n - t0 : tile;
    if (keep) {
      h = keep + t0 * r;
      for (Index i = 0; i < nt; ++i) hrows[i] = h + i * r;
    }
    // A few tokens read A_e once: B_e^T is fetched into L2 at the pace of that read.
    PacedSpan fetch_bt;
    PacedSpan* fetch = nullptr;
    if (nt <= 4) {
      fetch_bt = paced_span(bt, ((r - 1) * ldb + out) * Index(sizeof(Wt)), r * in * Index(sizeof(Wt)));
      fetch = &fetch_bt;
    }
    shrink(arch, a, lda, r, in, x + t0, nt, h, r, spill, fetch);
    expand(arch, bt, ldb, r, out, hrows, scale + t0, nt, y + t0);
  }
}

}  // namespace molora::kernels
