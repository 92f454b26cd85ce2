// The base layer's product for a few tokens: y = x W0^T + b0 with W0 [out, in] row-major.
// At decode sizes this product is bound by reading W0 from memory, so the kernel streams
// each row of W0 once for all tokens: register blocks of a few rows (8 side by side with
// AVX-512 up to 3 tokens, 6 at 4) x up to 4 tokens, the rows' chunk of `in` kept in L1 while
// every token passes over it; with AVX-512 for 5-8 tokens, 3 rows x 8 tokens (the wide path);
// on 16-register ISAs, for 5-8 tokens, pairs of rows along the whole of `in` with every token
// in registers (with AVX2, 2-4 tokens in blocks of 3 or 4 rows); for one token over short rows (skinny_short_row_bytes), one row after the
// other. With AVX-512, up to 8 tokens, a block's single pass along `in` also fetches the rows
// two blocks on into L2 in address order (FetchSpan), so that memory sees one sequential
// stream while the block reads its rows side by side. From skinny_crossover tokens on, the
// layers hand the product to a GEMM (gemm_product for float, Eigen's for double), which
// reuses W0 from cache better (docs/benchmarks.md, "The base product for few tokens", "The
// crossover to the packed GEMM").
// Written once for any xsimd Arch over raw pointers, with a scalar fallback; like the other
// kernels it checks nothing and throws nothing.
//
// Bitwise reproducibility: y[t, o] depends only on row o of W0, row t of x and b0[o], never
// on the other rows or tokens of the call, the row range or the token blocking: each vector
// accumulator sums over `in` in the same order whatever the chunking (partial sums spill to
// memory exactly), lanes are reduced in a fixed order, then the scalar tail, then the bias.
// Splitting the rows between threads therefore changes no bit of the result.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "../half.hpp"
#include "lora_kernels.hpp"

#if !defined(MOLORA_NO_XSIMD) && (defined(__SSE2__) || defined(__AVX2__) || defined(__AVX512F__))
#include <immintrin.h>
#endif

namespace molora::kernels {

// Tokens below which the layers use skinny_product for their base product, and a GEMM from
// there on (gemm_product for float activations, Eigen's for double): a constant per ISA,
// activation and weight type, so the choice never depends on the thread count. Measured cold,
// one thread, gemm_product over the skinny kernel (x staged) on the same weights, at 4096 x
// 4096 / 1024 -> 2816 / 2816 -> 1024, the first T where the two are level (docs/benchmarks.md,
// "The crossover to the packed GEMM", "The crossover on 16-register ISAs"):
//  - AVX-512 (Zen 4): float weights 1.11 / 1.05 / 1.11 at T = 24, 1.04 / 0.97 / 1.06 at 32,
//    0.94 / 0.80 / 0.94 at 48, so 32; bf16 weights 1.06 / 0.92 / 0.96 at 32 and 1.03 / 0.83 /
//    0.82 at 48 (f16 1.14 / 0.89 and 1.02 / 0.82), so 48;
//  - AVX2 (Zen 1, half the AVX-512 machine's multiply-adds per cycle): float weights 1.09 /
//    1.09 / 1.01 at 16, 1.03 / 1.03 / 0.96 at 20, so 20; bf16, since its one-shuffle widening,
//    1.18-1.24 / 1.05 / 1.06-1.07 at 12, 1.07-1.09 / 0.99-1.08 / 1.01-1.02 at 16, 0.94 / 1.01 /
//    0.99 at 20, so 16 (with the old widening 10: past the streamed path's 8 tokens the skinny
//    kernel widens each chunk of rows once per 4 tokens, the GEMM once per panel); f16 (F16C)
//    1.13 / 1.08 / 1.07 at 10, 1.02 / 0.99 / 0.97 at 16, so 16;
//  - SSE4.2 (Zen 1): float weights 1.14 / 1.12 at 32, 1.04 / 1.00 at 48 (4096 x 4096 / 1024 ->
//    2816), bf16 1.06 / 1.08 at 32, 0.98 / 0.99 at 48, so 48 for both; f16 has no hardware
//    conversion (SSE2 integer operations widen it) and the skinny kernel re-widens each chunk
//    of rows per pass: 1.28 / 1.36 / 1.28 at 8 tokens (one pass), 0.74 / 0.77 / 0.74 at 10
//    (two), so 9;
//  - the scalar kernels (Zen 1; any other compile-time ISA takes theirs), bound by their
//    arithmetic: float and bf16 weights level at every T from 4 to 64 (0.94-0.99 and
//    0.97-1.07), so 32 and 48 as with AVX-512; f16 weights, converted in software, run faster
//    on the skinny kernel at every T (the GEMM 1.16-1.30x its time), so 128.
// Double keeps 128, measured against Eigen's GEMM with AVX-512 (0.93-0.99 / 0.94-0.98 / 1.11-1.14
// skinny / Eigen at T = 96 / 128 / 192). (For one token of a weight of the layer's own type the
// layers keep Eigen's GEMV, but for float weights with AVX-512: detail::one_token_skinny in
// base_product.hpp.) skinny_crossover<Scalar, Weight>() (dispatched.hpp) is the active ISA's.
template <class Arch, class Scalar, class Weight = Scalar>
constexpr Index skinny_crossover_on() noexcept {
  static_assert(!std::is_same_v<Arch, dispatched_arch>, "the dispatched ISA's is skinny_crossover()");
  constexpr IsaLevel isa = isa_level<Arch>();
  constexpr bool f32 = std::is_same_v<Weight, float>, b16 = std::is_same_v<Weight, bf16>;
  if constexpr (!std::is_same_v<Scalar, float>) return 128;
  else if constexpr (isa == IsaLevel::avx512) return f32 ? 32 : 48;
  else if constexpr (isa == IsaLevel::avx2) return f32 ? 20 : 16;
  else if constexpr (isa == IsaLevel::sse42) return f32 || b16 ? 48 : 9;
  else return f32 ? 32 : b16 ? 48 : 128;
}

// Tokens whose partial sums one pass over a block of rows keeps (in a stack buffer); a call
// with more tokens streams W0 once per group of this many.
constexpr Index kSkinnyGroup = 32;

// How far ahead in each row of W0 the kernel prefetches (into L1): with 4 rows streamed at
// once the hardware prefetchers alone left T = 4-8 at 1.14-1.31x the time of a plain read
// of W0 (cold, 4096 x 4096 f32); 4 KiB ahead brought them to 0.99-1.12x, 2 and 8 KiB
// did no better (docs/benchmarks.md). Past the row's end it touches the next rows or
// nothing: prefetches do not fault.
constexpr Index kSkinnyPrefetch = 4096;

// The next register blocks' weights, fetched in address order while a block runs (one pass
// along `in`): a FetchSpan (lora_kernels.hpp) over the rows kSkinnyAhead blocks further on, a
// few cache lines per column step into L2, so that memory sees one sequential stream however
// many rows a block reads side by side. Cold on Zen 4, one thread, the paths it joins (12
// rows for one token, 8 rows x 2-4 tokens, the wide path for 5-8) took 0.78-0.93x their time
// without it at 4096 x 4096 and 0.43-0.97x at the Qwen2 MLP's 1024 x 2816 and 2816 x 1024,
// f32 and bf16 (docs/benchmarks.md, "The next rows fetched in address order").

// Blocks ahead of the running one whose rows the ahead prefetch fetches (1 and 4 measured
// the same in a scratch program).
constexpr Index kSkinnyAhead = 2;

// Cache lines of the ahead span per column step of W values: RO rows x W weights of Wt,
// rounded up, so that one pass along `in` covers RO whole rows.
template <int RO, Index W, class Wt>
constexpr int ahead_lines() noexcept {
  return static_cast<int>((Index(RO) * W * Index(sizeof(Wt)) + 63) / 64);
}

// Rows [a0, a1) of W0 (row stride ldw, `in` values each) as an ahead span; empty if a0 >= a1.
template <class Wt>
inline FetchSpan ahead_span(const Wt* w, Index ldw, Index in, Index a0, Index a1) noexcept {
  if (a0 >= a1) return {};
  return fetch_span(w + a0 * ldw, w + (a1 - 1) * ldw + in);
}

// f(std::integral_constant<int, n>{}) for N <= n <= Max, nothing otherwise: a run-time token
// count as the compile-time one of a register block.
template <int N, int Max, class F>
inline void with_token_count(Index n, F& f) noexcept {
  if constexpr (N <= Max) {
    if (n == N)
      f(std::integral_constant<int, N>{});
    else
      with_token_count<N + 1, Max>(n, f);
  }
}

// The streamed path: skinny_product runs it for kSkinnyStreamFrom <= T <= kSkinnyStreamTokens
// on ISAs with 16 vector registers, pairs of consecutive rows (kSkinnyStreamRows) one after
// the other, each along the whole of `in` with all T tokens in registers. Cold, 4096 x 4096
// on Zen 4 it took 0.71-0.98x the time of 4-row blocks with prefetch at T = 6-8 (docs/
// benchmarks.md, "One sequential stream of rows"), but 8 rows side by side without prefetch
// beat it there too ("Eight rows side by side"), so with 32 registers the blocked path runs.
constexpr Index kSkinnyStreamFrom = 5;
constexpr Index kSkinnyStreamTokens = 8;
constexpr int kSkinnyStreamRows = 2;

// Short rows: for one token, with 32 vector registers, a W0 whose rows take at most this many
// bytes is read one row after the other (skinny_stream_rows<1>, no software prefetch), one
// sequential stream, rather than 8 rows side by side: cold on Zen 4, 8 rows of 2 KiB (bf16,
// in = 1024) took 1.68-1.86x the time of a plain read of W0 and one row at a time 0.93-1.09x;
// float rows of 4 KiB (in = 1024) took 1.15-1.29x side by side and 0.99-1.07x one after the
// other; at 5.5 KiB (bf16, in = 2816) and 11 KiB (float) 8 rows won (docs/benchmarks.md,
// "Where a batch-1 step goes" and "The f32 one-token route"). 2 KiB for 16-bit (and double)
// weights, 4 KiB for float ones. Same bits.
template <class Wt>
constexpr Index skinny_short_row_bytes() noexcept {
  return sizeof(Wt) == 4 ? 4096 : 2048;
}

// ---- scalar kernel ------------------------------------------------------------------------

// y[t*ldy + o] = sum_i w[o*ldw + i] * x[t*ldx + i] (+ bias[o]) for t < T, o in [o0, o1).
// W is Scalar, or (Scalar float) bf16 / f16, widened exactly.
template <class W, class Scalar>
void skinny_product(scalar_arch, const W* w, Index ldw, Index in, const Scalar* x, Index ldx, Index T,
                    const Scalar* bias, Scalar* y, Index ldy, Index o0, Index o1) noexcept {
  for (Index t = 0; t < T; ++t)
    for (Index o = o0; o < o1; ++o) {
      Scalar s = 0;
      for (Index i = 0; i < in; ++i) {
#if defined(__FMA__)
        // Fused explicitly: with -march=native GCC contracted the float and the bf16 / f16
        // instantiations differently, so widened weights gave other bits than float ones.
        s = std::fma(Scalar(to_float(w[o * ldw + i])), x[t * ldx + i], s);
#else
        s += Scalar(to_float(w[o * ldw + i])) * x[t * ldx + i];
#endif
      }
      if (bias) s += bias[o];
      y[t * ldy + o] = s;
    }
}

// dst[i] = src[i] widened exactly, i < n.
template <class W, class Scalar>
void widen(scalar_arch, const W* src, Index n, Scalar* dst) noexcept {
  for (Index i = 0; i < n; ++i) dst[i] = Scalar(to_float(src[i]));
}

#if !defined(MOLORA_NO_XSIMD)

namespace detail {

#if !defined(MOLORA_NO_XSIMD) && defined(__SSE2__)
// Four f16 values at p widened exactly with SSE2 integer operations, for SSE builds without
// F16C (the scalar conversion of half.hpp, one value at a time, made the f16 layer 23-31x its
// read with the SSE4.2 kernels, this 4.8-5.5x; docs/benchmarks.md "f16 on SSE without
// F16C"). Exponent and mantissa move to float's positions and the exponent is rebiased
// (+112); inf and NaN get the all-ones exponent (+112 more; the payload kept, as half.hpp
// keeps it); a subnormal m * 2^-24 is made the normal float 2^-14 + m * 2^-24 and 2^-14 taken
// off, which is exact and reads and writes only normal floats, so flush-to-zero and
// denormals-are-zero modes change nothing; the sign last. The same bits as to_float(f16).
inline __m128 f16_to_float_sse2(const f16* p) noexcept {
  const __m128i h = _mm_unpacklo_epi16(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)), _mm_setzero_si128());
  const __m128i shifted = _mm_slli_epi32(_mm_and_si128(h, _mm_set1_epi32(0x7fff)), 13);
  const __m128i exp_bits = _mm_set1_epi32(0x1f << 23);
  const __m128i exp = _mm_and_si128(shifted, exp_bits);
  const __m128i rebias = _mm_set1_epi32(112 << 23);
  __m128i o = _mm_add_epi32(shifted, rebias);
  o = _mm_add_epi32(o, _mm_and_si128(_mm_cmpeq_epi32(exp, exp_bits), rebias));  // inf, NaN
  const __m128 sub = _mm_castsi128_ps(_mm_cmpeq_epi32(exp, _mm_setzero_si128()));
  const __m128 renorm = _mm_sub_ps(_mm_castsi128_ps(_mm_add_epi32(o, _mm_set1_epi32(1 << 23))),
                                   _mm_castsi128_ps(_mm_set1_epi32(113 << 23)));  // subnormal, zero
  const __m128 r = _mm_or_ps(_mm_and_ps(sub, renorm), _mm_andnot_ps(sub, _mm_castsi128_ps(o)));
  return _mm_or_ps(r, _mm_castsi128_ps(_mm_slli_epi32(_mm_and_si128(h, _mm_set1_epi32(0x8000)), 16)));
}
#endif

// One vector of Scalar from W values at p (unaligned), widened exactly: a plain load for
// W = Scalar; bf16 -> float by putting each value into the upper half of a zeroed lane
// (AVX-512, AVX2, SSE2); f16 -> float by the hardware conversion (AVX-512F, F16C) or SSE2
// integer operations (f16_to_float_sse2); else through the scalar conversion of half.hpp.
template <class Arch, class Scalar, class W>
inline xsimd::batch<Scalar, Arch> load_weights(const W* p) noexcept {
  using B = xsimd::batch<Scalar, Arch>;
  if constexpr (std::is_same_v<W, Scalar>) {
    return B::load_unaligned(p);
  } else {
    if constexpr (std::is_same_v<Scalar, float> && std::is_same_v<W, bf16>) {
#if defined(__AVX512F__)
      if constexpr (B::size == 16)
        return B(_mm512_castsi512_ps(
            _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16)));
#endif
#if defined(__AVX2__)
      // The 8 values in both 128-bit lanes (vbroadcasti128, a load), then one byte shuffle
      // puts w0..w3 (lane 0) and w4..w7 (lane 1) into the high halves of the dwords and zeros
      // into the low ones: one shuffle where zero-extending and shifting took two operations,
      // both on Zen 1's few integer vector pipes (docs/benchmarks.md, "The bf16 widening on
      // AVX2"). The same floats.
      if constexpr (B::size == 8) {
        const __m256i v = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
        const __m256i to_high = _mm256_setr_epi8(-1, -1, 0, 1, -1, -1, 2, 3, -1, -1, 4, 5, -1, -1, 6, 7,  //
                                                 -1, -1, 8, 9, -1, -1, 10, 11, -1, -1, 12, 13, -1, -1, 14, 15);
        return B(_mm256_castsi256_ps(_mm256_shuffle_epi8(v, to_high)));
      }
#endif
#if defined(__SSE2__)
      if constexpr (B::size == 4)
        return B(_mm_castsi128_ps(
            _mm_unpacklo_epi16(_mm_setzero_si128(), _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)))));
#endif
    }
    if constexpr (std::is_same_v<Scalar, float> && std::is_same_v<W, f16>) {
#if defined(__AVX512F__)
      if constexpr (B::size == 16) return B(_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))));
#endif
#if defined(__F16C__)
      if constexpr (B::size == 8) return B(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
#endif
#if defined(__SSE2__)
      if constexpr (B::size == 4) return B(f16_to_float_sse2(p));
#endif
    }
    alignas(64) Scalar v[B::size];
    for (std::size_t l = 0; l < B::size; ++l) v[l] = Scalar(to_float(p[l]));
    return B::load_aligned(v);
  }
}

// s + a * b in the scalar tail: one rounding (FMA) on the ISAs with FMA, two on the others,
// whatever the compiler would contract. At -O3 GCC vectorised the tails of some
// instantiations across rows and tokens and contracted them differently, so float and bf16
// weights (widened to the same values) gave different bits.
template <class Arch, class Scalar>
inline Scalar tail_mul_add(Scalar a, Scalar b, Scalar s) noexcept {
#if defined(__x86_64__) || defined(_M_X64) || defined(__i386__)
  if constexpr (std::is_base_of_v<xsimd::fma3<xsimd::avx2>, Arch> || std::is_base_of_v<xsimd::avx512f, Arch>)
    return std::fma(a, b, s);
  else
#endif
  {
    volatile Scalar p = a * b;  // rounded product, never fused with the sum
    return s + p;
  }
}

// Rows of W0 per register block: 4 with 32 vector registers (4 rows x 4 tokens = 16
// accumulators), 2 with 16 (8 accumulators, leaving room for the x and W0 vectors).
template <class Arch>
constexpr int skinny_rows() noexcept {
  return vector_registers<Arch>() >= 32 ? 4 : 2;
}

// Elements of `in` per pass when more than 4 tokens share a block of rows: the rows' chunk
// (RO * kc values, 8 KiB) stays in L1 while each block of 4 tokens passes over it.
template <class Arch, class Scalar, int RO>
constexpr Index skinny_chunk() noexcept {
  constexpr Index W = simd_width<Arch, Scalar>();
  constexpr Index kc = Index(8192) / (RO * Index(sizeof(Scalar))) / W * W;
  return kc < 4 * W ? 4 * W : kc;
}

// The end of a register block's pass: unless it is the last, the vector partial sums go to
// spill (token t, row j at (t * RO + j) * W); after the last, each dot product's lanes are
// reduced in order, then the scalar columns [in_vec, in) and the bias are added, and y written.
template <int RO, int RT, class Arch, class Wt, class Scalar>
inline void skinny_block_end(const xsimd::batch<Scalar, Arch> (&acc)[RO][RT], const Wt* w, Index ldw,
                             const Scalar* x, Index ldx, Index in_vec, Index in, bool last, Scalar* spill,
                             const Scalar* bias, Scalar* y, Index ldy) noexcept {
  constexpr Index W = simd_width<Arch, Scalar>();
  if (!last) {
    MOLORA_UNROLL
    for (int j = 0; j < RO; ++j) {
      MOLORA_UNROLL
      for (int t = 0; t < RT; ++t) acc[j][t].store_aligned(spill + (t * RO + j) * W);
    }
    return;
  }
  // Reduced through memory, once per dot product (see finish_dots).
  alignas(64) Scalar lanes[W];
  for (int j = 0; j < RO; ++j)
    for (int t = 0; t < RT; ++t) {
      acc[j][t].store_aligned(lanes);
      Scalar s = 0;
      for (Index l = 0; l < W; ++l) s += lanes[l];
      for (Index c = in_vec; c < in; ++c) s = tail_mul_add<Arch>(Scalar(to_float(w[j * ldw + c])), x[t * ldx + c], s);
      if (bias) s += bias[j];
      y[t * ldy + j] = s;
    }
}

// One register block: RO rows of W0 x RT tokens over columns [c0, c1). The first pass
// starts from zero, later ones reload the vector partial sums from spill (token t, row j
// at (t * RO + j) * W); the last reduces them, adds the scalar columns [in_vec, in) and the
// bias, and writes y.
template <int RO, int RT, class Arch, Index PF = kSkinnyPrefetch, bool Ahead = false, class Wt, class Scalar>
inline void skinny_block(const Wt* w, Index ldw, const Scalar* x, Index ldx, Index c0, Index c1, Index in_vec,
                         Index in, bool first, bool last, Scalar* spill, const Scalar* bias, Scalar* y,
                         Index ldy, FetchSpan ahead = {}) noexcept {
  using B = xsimd::batch<Scalar, Arch>;
  constexpr Index W = static_cast<Index>(B::size);
  B acc[RO][RT];
  MOLORA_UNROLL
  for (int j = 0; j < RO; ++j) {
    MOLORA_UNROLL
    for (int t = 0; t < RT; ++t) acc[j][t] = first ? B(Scalar(0)) : B::load_aligned(spill + (t * RO + j) * W);
  }
  for (Index c = c0; c < c1; c += W) {
    B xv[RT];
    MOLORA_UNROLL
    for (int t = 0; t < RT; ++t) xv[t] = B::load_unaligned(x + t * ldx + c);
#if defined(__GNUC__)
    if constexpr (PF > 0) {
      MOLORA_UNROLL
      for (int j = 0; j < RO; ++j) __builtin_prefetch(w + j * ldw + c + PF / Index(sizeof(Wt)), 0, 3);
    }
#endif
    if constexpr (Ahead) fetch_lines<ahead_lines<RO, W, Wt>()>(ahead);
    else (void)ahead;
    MOLORA_UNROLL
    for (int j = 0; j < RO; ++j) {
      const B wv = load_weights<Arch, Scalar>(w + j * ldw + c);
      MOLORA_UNROLL
      for (int t = 0; t < RT; ++t) acc[j][t] = xsimd::fma(wv, xv[t], acc[j][t]);
    }
  }
  skinny_block_end<RO, RT, Arch>(acc, w, ldw, x, ldx, in_vec, in, last, spill, bias, y, ldy);
}

// RO rows starting at w for n <= kSkinnyGroup tokens, register blocks of RO rows x TB
// tokens: one pass over `in` for up to TB tokens (nothing to reuse), else passes of
// skinny_chunk columns, each over all token blocks (TB, then a tail of fewer).
template <int RO, class Arch, Index PF = kSkinnyPrefetch, int TB = 4, class Wt, class Scalar>
inline void skinny_rows_block(const Wt* w, Index ldw, Index in, const Scalar* x, Index ldx, Index n,
                              const Scalar* bias, Scalar* y, Index ldy, Scalar* spill, FetchSpan ahead = {}) noexcept {
  static_assert(TB >= 1 && TB <= 4, "token blocks of 1 to 4");
  constexpr Index W = simd_width<Arch, Scalar>();
  const Index in_vec = in - in % W;
  if (ahead.p != 0 && n <= TB) {  // one pass along `in` for all n tokens, fetching the rows ahead
    auto one = [&](auto tokens) {
      constexpr int RT = decltype(tokens)::value;
      skinny_block<RO, RT, Arch, PF, true>(w, ldw, x, ldx, Index(0), in_vec, in_vec, in, true, true, spill, bias, y,
                                           ldy, ahead);
    };
    with_token_count<1, TB>(n, one);
    return;
  }
  const Index kc = n <= TB ? in_vec : skinny_chunk<Arch, Scalar, RO>();  // values of x per pass: same for any W
  for (Index c0 = 0;; c0 += kc) {
    const Index c1 = c0 + kc < in_vec ? c0 + kc : in_vec;
    const bool first = c0 == 0, last = c1 == in_vec;
    Index t = 0;
    for (; t + TB <= n; t += TB)
      skinny_block<RO, TB, Arch, PF>(w, ldw, x + t * ldx, ldx, c0, c1, in_vec, in, first, last, spill + t * RO * W,
                                     bias, y + t * ldy, ldy);
    auto tail = [&](auto tokens) {
      constexpr int RT = decltype(tokens)::value;
      skinny_block<RO, RT, Arch, PF>(w, ldw, x + t * ldx, ldx, c0, c1, in_vec, in, first, last, spill + t * RO * W,
                                     bias, y + t * ldy, ldy);
    };
    switch (n - t) {
      case 3:
        if constexpr (TB > 3) tail(std::integral_constant<int, 3>{});
        break;
      case 2:
        if constexpr (TB > 2) tail(std::integral_constant<int, 2>{});
        break;
      case 1:
        if constexpr (TB > 1) tail(std::integral_constant<int, 1>{});
        break;
      default: break;
    }
    if (last) break;
  }
}

// Rows of W0 one after the other, n <= kSkinnyStreamTokens tokens in one register block:
// each row (RO = 1) or pair of consecutive rows (RO = 2) read once along the whole of `in`
// (one or two streams through memory), x re-read from cache for every row. Same order of every sum as skinny_rows_block (one vector accumulator per
// dot product, summed along `in`, lanes reduced, tail, bias), so the same bits.
template <int RO, class Arch, Index PF = kSkinnyPrefetch, class Wt, class Scalar>
inline void skinny_stream_rows(const Wt* w, Index ldw, Index in, const Scalar* x, Index ldx, Index n,
                               const Scalar* bias, Scalar* y, Index ldy, Index o0, Index o1) noexcept {
  constexpr Index W = simd_width<Arch, Scalar>();
  const Index in_vec = in - in % W;
  auto rows = [&](auto tokens) {
    constexpr int RT = decltype(tokens)::value;
    Index o = o0;
    for (; o + RO <= o1; o += RO)
      skinny_block<RO, RT, Arch, PF>(w + o * ldw, ldw, x, ldx, Index(0), in_vec, in_vec, in, true, true,
                                 static_cast<Scalar*>(nullptr), bias ? bias + o : nullptr, y + o, ldy);
    if constexpr (RO > 1)
      for (; o < o1; ++o)
        skinny_block<1, RT, Arch, PF>(w + o * ldw, ldw, x, ldx, Index(0), in_vec, in_vec, in, true, true,
                                  static_cast<Scalar*>(nullptr), bias ? bias + o : nullptr, y + o, ldy);
  };
  switch (n) {
    case 1: rows(std::integral_constant<int, 1>{}); break;
    case 2: rows(std::integral_constant<int, 2>{}); break;
    case 3: rows(std::integral_constant<int, 3>{}); break;
    case 4: rows(std::integral_constant<int, 4>{}); break;
    case 5: rows(std::integral_constant<int, 5>{}); break;
    case 6: rows(std::integral_constant<int, 6>{}); break;
    case 7: rows(std::integral_constant<int, 7>{}); break;
    case 8: rows(std::integral_constant<int, 8>{}); break;
    default: break;
  }
}

// ---- the wide path: up to 8 tokens in registers (32-register ISAs) ------------------------

// Tokens per register block of the wide path.
constexpr int kSkinnyWideTokens = 8;

// Rows per register block of the wide path: 3 rows x 8 tokens = 24 accumulators, with the 3
// weight vectors and one x vector 28 of the 32 registers.
constexpr int kSkinnyWideRows = 3;

// Tokens for which skinny_product runs the wide path on 32-register ISAs (from
// kSkinnyWideFrom to kSkinnyWideTo): every token of a block of 8 in registers, one pass along
// `in` up to 8 tokens (W0 read once, x from L2), blocks of 8 tokens over L1-sized chunks of
// `in` for more (software prefetch kSkinnyPrefetch ahead). Cold, 4096 x 4096 on Zen 4 it took
// 0.60-0.80x the time of the 8 rows x 2 tokens before it at T = 5-8 (f32; bf16 0.86-0.89x),
// kernels alone; at T = 16 0.55-0.59x (f32) / 0.91-0.93x (bf16) of the 4 rows x 4 tokens
// alone, but the bf16 whole layer at T = 16 measured slower with it (7.9 -> 10.0 ms, two
// runs), so 9-16 tokens keep the 4 x 4 blocks until that is understood. 2 rows x 8 tokens,
// 6 rows x 4 tokens over chunks, and x copied to rows 64 bytes off the 4 KiB L1 aliasing
// were slower (docs/benchmarks.md, "Eight tokens in registers").
constexpr Index kSkinnyWideFrom = 5;
constexpr Index kSkinnyWideTo = 8;

// The first token count of the wide path for weights of type Wt: 4 for float weights, whose
// 4-token product took 0.88-0.92x the time of the 6 rows x 4 tokens before it cold (the
// whole layer at 4096 x 4096 on Zen 4, four runs in turns: 0.93-1.02x the read of its weights
// against 1.02-1.11x), though its hot compute is slower (58-63 against 85-92 GFLOP/s, still
// about half the read's time); bf16 weights took 1.18-1.32x the time there, so 16-bit weights
// keep the 6 x 4 blocks (docs/benchmarks.md, "Four float tokens on the wide path").
template <class Wt>
constexpr Index skinny_wide_from() {
  return std::is_same_v<Wt, float> ? 4 : kSkinnyWideFrom;
}

// The wide path's software prefetch goes to L2 (__builtin_prefetch locality 2, prefetcht1)
// rather than L1: cold, f32 4096 x 4096 at T = 8 on Zen 4, the kernel alone took 1.43-1.62x
// the time of a plain read of W0 against 1.61-2.06x with the L1 prefetch (six runs, the
// builds in turns); in the whole layer the difference was within the runs' spread
// (docs/benchmarks.md, "The wide path's prefetch into L2"). A hint only: the same bits.
constexpr int kSkinnyWidePrefetchLocality = 2;

// Pins a loaded vector to a register. Without it GCC folds the load of each token's x vector
// into every row's FMA as a memory operand, so the wide block loads x once per row (3 + 24
// loads per 24 FMAs rather than 3 + 8). Pinned, the block with its weights in L2 ran at
// 91-100 GFLOP/s against 72-87 on Zen 4 (f32 and bf16, T = 8). Cold, that made the bf16 and
// f16 products at T = 8 0.83-0.94x as long, while the f32 one was no faster (1.52-1.77x
// against 1.44x the read), so only 16-bit weights, whose widening adds to the
// arithmetic, take it (docs/benchmarks.md, "Limits beside the kernels"). No
// instruction is emitted; the value is unchanged.
template <class B>
inline void keep_in_register(B& v) noexcept {
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
  if constexpr (sizeof(v.data) >= 16) asm("" : "+v"(v.data));
#else
  (void)v;
#endif
}

// One register block of the wide path: RO rows x RT tokens over columns [c0, c1), as
// skinny_block but the RO weight vectors are loaded (and widened) first and each token's x
// vector then loaded on its own for its RO FMAs, so RO * RT accumulators + RO + 1 vectors
// are live (3 x 8: 28). Each accumulator sums fma(w, x, acc) along `in` as skinny_block
// does: the same bits.
template <int RO, int RT, class Arch, Index PF, bool Ahead = false, class Wt, class Scalar>
inline void skinny_wide_block(const Wt* w, Index ldw, const Scalar* x, Index ldx, Index c0, Index c1, Index in_vec,
                              Index in, bool first, bool last, Scalar* spill, const Scalar* bias, Scalar* y,
                              Index ldy, FetchSpan ahead = {}) noexcept {
  using B = xsimd::batch<Scalar, Arch>;
  constexpr Index W = static_cast<Index>(B::size);
  B acc[RO][RT];
  MOLORA_UNROLL
  for (int j = 0; j < RO; ++j) {
    MOLORA_UNROLL
    for (int t = 0; t < RT; ++t) acc[j][t] = first ? B(Scalar(0)) : B::load_aligned(spill + (t * RO + j) * W);
  }
  for (Index c = c0; c < c1; c += W) {
#if defined(__GNUC__)
    if constexpr (PF > 0) {
      MOLORA_UNROLL
      for (int j = 0; j < RO; ++j)
        __builtin_prefetch(w + j * ldw + c + PF / Index(sizeof(Wt)), 0, kSkinnyWidePrefetchLocality);
    }
#endif
    if constexpr (Ahead) fetch_lines<ahead_lines<RO, W, Wt>()>(ahead);
    else (void)ahead;
    B wv[RO];
    MOLORA_UNROLL
    for (int j = 0; j < RO; ++j) wv[j] = load_weights<Arch, Scalar>(w + j * ldw + c);
    MOLORA_UNROLL
    for (int t = 0; t < RT; ++t) {
      B xv = B::load_unaligned(x + t * ldx + c);
      if constexpr (!std::is_same_v<Wt, Scalar>) keep_in_register(xv);
      MOLORA_UNROLL
      for (int j = 0; j < RO; ++j) acc[j][t] = xsimd::fma(wv[j], xv, acc[j][t]);
    }
  }
  skinny_block_end<RO, RT, Arch>(acc, w, ldw, x, ldx, in_vec, in, last, spill, bias, y, ldy);
}

// RO rows starting at w for n <= kSkinnyGroup tokens in register blocks of RO rows x TB
// tokens (then a block of the n % TB left): one pass along `in` up to TB tokens, else passes
// of skinny_chunk columns, each over every token block, the partial sums spilled between
// passes (spill: n * RO vectors).
template <int RO, class Arch, Index PF, int TB = kSkinnyWideTokens, class Wt, class Scalar>
inline void skinny_wide_rows(const Wt* w, Index ldw, Index in, const Scalar* x, Index ldx, Index n,
                             const Scalar* bias, Scalar* y, Index ldy, Scalar* spill, FetchSpan ahead = {}) noexcept {
  constexpr Index W = simd_width<Arch, Scalar>();
  const Index in_vec = in - in % W;
  if (ahead.p != 0 && n <= TB) {  // one pass along `in` for all n tokens, fetching the rows ahead
    auto one = [&](auto tokens) {
      constexpr int RT = decltype(tokens)::value;
      skinny_wide_block<RO, RT, Arch, PF, true>(w, ldw, x, ldx, Index(0), in_vec, in_vec, in, true, true, spill, bias,
                                                y, ldy, ahead);
    };
    with_token_count<1, TB>(n, one);
    return;
  }
  const Index kc = n <= TB ? in_vec : skinny_chunk<Arch, Scalar, RO>();
  for (Index c0 = 0;; c0 += kc) {
    const Index c1 = c0 + kc < in_vec ? c0 + kc : in_vec;
    const bool first = c0 == 0, last = c1 == in_vec;
    Index t = 0;
    auto block = [&](auto tokens) {
      constexpr int RT = decltype(tokens)::value;
      skinny_wide_block<RO, RT, Arch, PF>(w, ldw, x + t * ldx, ldx, c0, c1, in_vec, in, first, last,
                                          spill + t * RO * W, bias, y + t * ldy, ldy);
    };
    for (; t + TB <= n; t += TB) block(std::integral_constant<int, TB>{});
    with_token_count<1, TB - 1>(n - t, block);
    if (last) break;
  }
}

// Rows [o, o1) in blocks of RO rows, then RO - 1, ..., 1 for the rest, for n <= kSkinnyGroup
// tokens in blocks of TB (skinny_wide_rows).
template <int RO, Index PF, class Arch, bool Ahead = false, int TB = kSkinnyWideTokens, class Wt, class Scalar>
inline void skinny_wide_range(const Wt* w, Index ldw, Index in, const Scalar* x, Index ldx, Index n,
                              const Scalar* bias, Scalar* y, Index ldy, Index o, Index o1, Scalar* spill) noexcept {
  for (; o + RO <= o1; o += RO) {
    FetchSpan ahead;
    if constexpr (Ahead) {
      const Index a0 = o + kSkinnyAhead * RO;
      ahead = ahead_span(w, ldw, in, a0, a0 + RO < o1 ? a0 + RO : o1);
    }
    skinny_wide_rows<RO, Arch, PF, TB>(w + o * ldw, ldw, in, x, ldx, n, bias ? bias + o : nullptr, y + o, ldy, spill,
                                       ahead);
  }
  if constexpr (RO > 1)  // the last rows of the range: nothing lies two blocks on
    skinny_wide_range<RO - 1, PF, Arch, false, TB>(w, ldw, in, x, ldx, n, bias, y, ldy, o, o1, spill);
}

// Blocks of RO rows (RO, then 8, 4, 2, 1 for the rest) over rows [o, o1) for n tokens,
// register blocks of TB tokens, software prefetch PF bytes ahead (0: none).
// With Ahead, a pass along `in` for at most TB tokens also fetches the rows kSkinnyAhead
// blocks further on (within [o, o1)) into L2 in address order; the blocks of fewer rows at
// the range's end run without it.
template <int RO, int TB, Index PF, class Arch, bool Ahead = false, class Wt, class Scalar>
inline void skinny_rows_range(const Wt* w, Index ldw, Index in, const Scalar* x, Index ldx, Index n,
                              const Scalar* bias, Scalar* y, Index ldy, Index o, Index o1, Scalar* spill) noexcept {
  for (; o + RO <= o1; o += RO) {
    FetchSpan ahead;
    if constexpr (Ahead) {
      const Index a0 = o + kSkinnyAhead * RO;
      ahead = ahead_span(w, ldw, in, a0, a0 + RO < o1 ? a0 + RO : o1);
    }
    skinny_rows_block<RO, Arch, PF, TB>(w + o * ldw, ldw, in, x, ldx, n, bias ? bias + o : nullptr, y + o, ldy, spill,
                                        ahead);
  }
  if constexpr (RO > 1) {
    constexpr int next = RO > 8 ? 8 : RO > 4 ? 4 : RO / 2;
    // the last rows of the range: nothing lies two blocks on
    skinny_rows_range<next, TB, PF, Arch>(w, ldw, in, x, ldx, n, bias, y, ldy, o, o1, spill);
  }
}

// Rows side by side for one token over long rows with 32 vector registers (rows at most
// skinny_short_row_bytes go one after the other). Cold on Zen 4, bf16 weights, one token,
// time over a plain read: in = 2816 (the Qwen2 down projection, 5.5 KiB rows) 0.98 with 12
// rows against 1.11 with 8; 4096 x 4096 1.04 against 1.07; f32 4096 x 4096 0.98 against 1.03
// (docs/benchmarks.md, "Twelve rows for one token"). 16 rows did no better than 12. Same bits.
constexpr int kSkinnyOneTokenRows = 12;

// The blocked kernel. With 32 vector registers: skinny_wide_from<Wt>() (4 for float weights,
// else kSkinnyWideFrom) to kSkinnyWideTo tokens take the wide path (3 rows x 8 tokens, above);
// one token kSkinnyOneTokenRows rows side by side; otherwise 8 rows side by side and no
// software prefetch up to kSkinnyStreamTokens tokens: one pass along `in` for up to 4 tokens
// (8 rows x T; at T = 4 for 16-bit weights 6 rows x 4 tokens, since 8 x 4 accumulators would
// take every register: with the ahead prefetch 0.90x the time of 8 rows cold at 4096 x 4096
// f32, 0.97-1.05x elsewhere, docs/benchmarks.md "The next rows fetched in address order"),
// then 8 rows x 2 tokens over L1-sized chunks of `in`; 8 row streams measured faster than 4
// rows with the prefetch, than the streamed pairs of rows, and than one sequential stream,
// and 16 rows (16 KiB apart for f32) thrash the 8-way L1 sets (docs/benchmarks.md, "Eight
// rows side by side"). More tokens: 4 rows x 4 tokens over chunks, prefetching
// kSkinnyPrefetch ahead, kSkinnyGroup tokens per pass over W0. With 16 registers: 8 rows
// for one token without software prefetch (with kSkinnyPrefetch, each row's line 4 KiB
// ahead lands in the set of the line it reads: on AVX2 (Zen 1), one token, cold, 8 rows
// without it took 0.61 / 0.85 / 0.83 / 1.00x the time with it for bf16 weights at 4096 x
// 4096 / 2816 -> 4096 / 2816 -> 1024 / 1024 -> 4096, docs/benchmarks.md "The crossover on
// 16-register ISAs"), else 2 rows x 4 tokens, prefetching. The block shape and the prefetch
// change no bit. With AVX2 and float activations, though, 2-4 tokens take blocks of the
// wide pattern (the weights loaded and widened first, then each token's x): float weights
// 3 rows x 4 tokens without software prefetch; 16-bit weights 4 rows x 2 tokens (T = 1-2) or
// 3 x 4 (T = 3-4) with the next blocks' rows fetched in address order. Cold on Zen 1, kernels
// alone, time over the 2 rows x 4 tokens with prefetch they replaced: f32 0.83-0.90 at
// 4096 x 4096 and 2816 -> 1024, 0.96-1.08 at 1024 -> 2816; bf16 0.70-0.81 (T = 2), 0.77-0.87
// (T = 3-4); f16 0.79-0.92, 0.84-1.03 (docs/benchmarks.md, "Two to four tokens on AVX2").
// At one token, over the 8 rows without prefetch, at 4096 x 4096 / 1024 -> 2816 / 2816 ->
// 1024: bf16 1.02-1.03 / 0.64-0.65 / 0.96-0.99, f16 0.87-0.88 / 0.64 / 0.86-0.87; float
// weights keep the 8 rows, which took 0.75-0.88x the 4 x 2 blocks' time (docs/benchmarks.md,
// "One 16-bit token on AVX2"). SSE4.2 keeps the 2 x 4 blocks (not measured).
template <class Arch, class Wt, class Scalar>
void skinny_product_blocked(const Wt* w, Index ldw, Index in, const Scalar* x, Index ldx, Index T,
                            const Scalar* bias, Scalar* y, Index ldy, Index o0, Index o1) noexcept {
  constexpr Index W = simd_width<Arch, Scalar>();
  constexpr int RO = skinny_rows<Arch>();
  constexpr bool wide = vector_registers<Arch>() >= 32;
  alignas(64) Scalar spill[kSkinnyGroup * RO * W];
  static_assert(!wide || kSkinnyWideRows <= RO, "the wide path's spill fits the buffer");
  // (the 16-register wide blocks below run one pass along `in` and spill nothing)
  for (Index t0 = 0; t0 < T; t0 += kSkinnyGroup) {
    const Index n = T - t0 < kSkinnyGroup ? T - t0 : kSkinnyGroup;
    const Scalar* xt = x + t0 * ldx;
    Scalar* yt = y + t0 * ldy;
    if constexpr (wide) {
      if (n == 1)
        skinny_rows_range<kSkinnyOneTokenRows, 1, 0, Arch, true>(w, ldw, in, xt, ldx, n, bias, yt, ldy, o0, o1, spill);
      else if (n >= skinny_wide_from<Wt>() && n <= kSkinnyWideTo)
        skinny_wide_range<kSkinnyWideRows, kSkinnyPrefetch, Arch, true>(w, ldw, in, xt, ldx, n, bias, yt, ldy, o0,
                                                                        o1, spill);
      else if (n == 4)  // 6 rows: 24 accumulators, where 8 rows x 4 tokens take all 32 registers
        skinny_rows_range<6, 4, 0, Arch, true>(w, ldw, in, xt, ldx, n, bias, yt, ldy, o0, o1, spill);
      else if (n <= 3)
        skinny_rows_range<8, 3, 0, Arch, true>(w, ldw, in, xt, ldx, n, bias, yt, ldy, o0, o1, spill);
      else if (n <= kSkinnyStreamTokens)
        skinny_rows_range<8, 2, 0, Arch>(w, ldw, in, xt, ldx, n, bias, yt, ldy, o0, o1, spill);
      else
        skinny_rows_range<RO, 4, kSkinnyPrefetch, Arch>(w, ldw, in, xt, ldx, n, bias, yt, ldy, o0, o1, spill);
    } else {
      constexpr bool avx2_f32 = isa_level<Arch>() == IsaLevel::avx2 && std::is_same_v<Scalar, float>;
      constexpr bool avx2_16 = avx2_f32 && !std::is_same_v<Wt, float>;  // 16-bit weights
      if (n == 1 && !avx2_16)
        skinny_rows_range<8, 1, 0, Arch>(w, ldw, in, xt, ldx, n, bias, yt, ldy, o0, o1, spill);
      else if (avx2_f32 && n <= 4 && !avx2_16)
        skinny_wide_range<3, 0, Arch, false, 4>(w, ldw, in, xt, ldx, n, bias, yt, ldy, o0, o1, spill);
      else if (avx2_16 && n <= 2)
        skinny_wide_range<4, 0, Arch, true, 2>(w, ldw, in, xt, ldx, n, bias, yt, ldy, o0, o1, spill);
      else if (avx2_16 && n <= 4)
        skinny_wide_range<3, 0, Arch, true, 4>(w, ldw, in, xt, ldx, n, bias, yt, ldy, o0, o1, spill);
      else
        skinny_rows_range<RO, 4, kSkinnyPrefetch, Arch>(w, ldw, in, xt, ldx, n, bias, yt, ldy, o0, o1, spill);
    }
  }
}

// The streamed kernel for T <= kSkinnyStreamTokens (any T: larger ones in groups).
template <class Arch, class Wt, class Scalar>
void skinny_product_streamed(const Wt* w, Index ldw, Index in, const Scalar* x, Index ldx, Index T,
                             const Scalar* bias, Scalar* y, Index ldy, Index o0, Index o1) noexcept {
  for (Index t0 = 0; t0 < T; t0 += kSkinnyStreamTokens) {
    const Index n = T - t0 < kSkinnyStreamTokens ? T - t0 : kSkinnyStreamTokens;
    skinny_stream_rows<kSkinnyStreamRows, Arch>(w, ldw, in, x + t0 * ldx, ldx, n, bias, y + t0 * ldy, ldy, o0, o1);
  }
}

}  // namespace detail

// The base product for rows [o0, o1) of W0: y[t*ldy + o] = sum_i w[o*ldw + i] * x[t*ldx + i]
// (+ bias[o] when bias is not null) for t < T. Requires: w rows of `in` values with stride
// ldw, x T rows with stride ldx >= in, y T rows with stride ldy, 0 <= o0 <= o1; y aliases
// neither w, x nor bias. Fast for T below skinny_crossover (each row of W0 read once from
// memory per kSkinnyGroup tokens); correct for any T. Wt is Scalar, or bf16 / f16 (widened
// exactly in registers): the result is then bit for bit the one for the widened weights.
// From kSkinnyStreamFrom to kSkinnyStreamTokens tokens on 16-register ISAs the rows are
// streamed pair after pair, from kSkinnyWideFrom to kSkinnyWideTo tokens on 32-register ISAs
// blocks of 3 rows x 8 tokens run along `in` (the wide path), one token's rows of at most skinny_short_row_bytes on 32-register
// ISAs one after the other, otherwise taken in blocks of rows; all sum in the same order, so
// give the same bits.
template <class Arch, class Wt, class Scalar>
void skinny_product(Arch, const Wt* w, Index ldw, Index in, const Scalar* x, Index ldx, Index T,
                    const Scalar* bias, Scalar* y, Index ldy, Index o0, Index o1) noexcept {
  if (detail::vector_registers<Arch>() < 32 && T >= kSkinnyStreamFrom && T <= kSkinnyStreamTokens)
    detail::skinny_product_streamed<Arch>(w, ldw, in, x, ldx, T, bias, y, ldy, o0, o1);
  else if (detail::vector_registers<Arch>() >= 32 && T == 1 && in * Index(sizeof(Wt)) <= skinny_short_row_bytes<Wt>())
    detail::skinny_stream_rows<1, Arch, 0>(w, ldw, in, x, ldx, T, bias, y, ldy, o0, o1);
  else
    detail::skinny_product_blocked<Arch>(w, ldw, in, x, ldx, T, bias, y, ldy, o0, o1);
}

// dst[i] = src[i] widened exactly, i < n (W bf16 or f16): the Eigen path's weight blocks.
template <class Arch, class W, class Scalar>
void widen(Arch, const W* src, Index n, Scalar* dst) noexcept {
  using B = xsimd::batch<Scalar, Arch>;
  constexpr Index V = static_cast<Index>(B::size);
  Index i = 0;
  for (; i + V <= n; i += V) detail::load_weights<Arch, Scalar>(src + i).store_unaligned(dst + i);
  for (; i < n; ++i) dst[i] = Scalar(to_float(src[i]));
}

#endif  // !MOLORA_NO_XSIMD

// ---- opt-in bf16 dot products ------------------------------------------------------------

#if defined(__AVX512BF16__) && defined(__AVX512BW__) && !defined(MOLORA_NO_XSIMD)
namespace detail {

// R rows of bf16 W (at w) x RT tokens of the bf16-dot product along the whole of `in`: one
// accumulator per dot product, VDPBF16PS over 32 columns at a time (x rounded to bf16 to
// nearest even as loaded), the last partial step masked, lanes reduced, then the bias. The
// order of every sum does not depend on R or RT: the bits of one row and one token alone.
template <int R, int RT>
inline void bf16dot_block(const bf16* w, Index ldw, Index in, const float* x, Index ldx, const float* bias, float* y,
                          Index ldy) noexcept {
  const Index full = in - in % 32;
  const auto rem = static_cast<unsigned>(in - full);
  __m512 acc[R][RT];
  MOLORA_UNROLL
  for (int j = 0; j < R; ++j) {
    MOLORA_UNROLL
    for (int t = 0; t < RT; ++t) acc[j][t] = _mm512_setzero_ps();
  }
  for (Index c = 0; c < full; c += 32) {
    MOLORA_UNROLL
    for (int j = 0; j < R; ++j) __builtin_prefetch(w + j * ldw + c + kSkinnyPrefetch / Index(sizeof(bf16)), 0, 3);
    __m512bh wv[R];
    MOLORA_UNROLL
    for (int j = 0; j < R; ++j) wv[j] = (__m512bh)_mm512_loadu_si512(reinterpret_cast<const void*>(w + j * ldw + c));
    MOLORA_UNROLL
    for (int t = 0; t < RT; ++t) {
      const float* xt = x + t * ldx + c;
      const __m512bh xv = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(xt + 16), _mm512_loadu_ps(xt));
      MOLORA_UNROLL
      for (int j = 0; j < R; ++j) acc[j][t] = _mm512_dpbf16_ps(acc[j][t], xv, wv[j]);
    }
  }
  if (rem) {
    const __mmask16 mlo = static_cast<__mmask16>(rem >= 16 ? 0xffffu : (1u << rem) - 1u);
    const __mmask16 mhi = static_cast<__mmask16>(rem <= 16 ? 0u : (1u << (rem - 16)) - 1u);
    const __mmask32 mw = static_cast<__mmask32>((std::uint64_t(1) << rem) - 1u);
    __m512bh wv[R];
    for (int j = 0; j < R; ++j) wv[j] = (__m512bh)_mm512_maskz_loadu_epi16(mw, w + j * ldw + full);
    for (int t = 0; t < RT; ++t) {
      const float* xt = x + t * ldx + full;
      const __m512bh xv = _mm512_cvtne2ps_pbh(_mm512_maskz_loadu_ps(mhi, xt + 16), _mm512_maskz_loadu_ps(mlo, xt));
      for (int j = 0; j < R; ++j) acc[j][t] = _mm512_dpbf16_ps(acc[j][t], xv, wv[j]);
    }
  }
  for (int j = 0; j < R; ++j)
    for (int t = 0; t < RT; ++t) {
      float s = _mm512_reduce_add_ps(acc[j][t]);
      if (bias) s += bias[j];
      y[t * ldy + j] = s;
    }
}

}  // namespace detail
#endif

// y[t*ldy + o] = sum_i bf16(x[t*ldx + i]) * w[o*ldw + i] (+ bias[o]) for t < T, o in
// [o0, o1): the activations rounded to bf16 (to nearest even), products exact, sums in
// float. With AVX512_BF16 (the AVX-512 object is compiled with -mavx512bf16; callers check
// bf16_dot_available() first) each lane adds a pair of products per VDPBF16PS, which rounds
// once per pair and flushes subnormals; elsewhere a plain loop in order. The two differ by
// float summation error only (tests/test_linear.cpp states the tolerance).
template <class Arch, class Scalar>
void skinny_product_bf16dot(Arch, const bf16* w, Index ldw, Index in, const Scalar* x, Index ldx, Index T,
                            const Scalar* bias, Scalar* y, Index ldy, Index o0, Index o1) noexcept {
#if defined(__AVX512BF16__) && defined(__AVX512BW__) && !defined(MOLORA_NO_XSIMD)
  if constexpr (std::is_same_v<Scalar, float> && std::is_base_of_v<xsimd::avx512bw, Arch>) {
    // Blocks of 3 rows x 8 tokens (then fewer), as the exact kernel's wide path: each
    // block's 3 weight vectors loaded once for 8 tokens, each x vector rounded for 3 rows.
    constexpr int RO = 3, TB = 8;
    auto rows = [&](auto height, Index o) {
      constexpr int R = decltype(height)::value;
      Index t = 0;
      auto block = [&](auto tokens) {
        constexpr int RT = decltype(tokens)::value;
        detail::bf16dot_block<R, RT>(w + o * ldw, ldw, in, x + t * ldx, ldx, bias ? bias + o : nullptr, y + t * ldy + o,
                                     ldy);
      };
      for (; t + TB <= T; t += TB) block(std::integral_constant<int, TB>{});
      switch (T - t) {
        case 1: block(std::integral_constant<int, 1>{}); break;
        case 2: block(std::integral_constant<int, 2>{}); break;
        case 3: block(std::integral_constant<int, 3>{}); break;
        case 4: block(std::integral_constant<int, 4>{}); break;
        case 5: block(std::integral_constant<int, 5>{}); break;
        case 6: block(std::integral_constant<int, 6>{}); break;
        case 7: block(std::integral_constant<int, 7>{}); break;
        default: break;
      }
    };
    Index o = o0;
    for (; o + RO <= o1; o += RO) rows(std::integral_constant<int, RO>{}, o);
    if (o1 - o == 2) rows(std::integral_constant<int, 2>{}, o);
    if (o1 - o == 1) rows(std::integral_constant<int, 1>{}, o);
    return;
  }
#endif
  for (Index t = 0; t < T; ++t)
    for (Index o = o0; o < o1; ++o) {
      Scalar s = 0;
      for (Index i = 0; i < in; ++i)
        s += Scalar(to_float(to_bf16(static_cast<float>(x[t * ldx + i])))) * Scalar(to_float(w[o * ldw + i]));
      if (bias) s += bias[o];
      y[t * ldy + o] = s;
    }
}

// The entries of the run-time table for 16-bit weights (one per weight type; the table's
// members are named after the kernels).
template <class Arch, class Scalar>
void skinny_product_bf16(Arch a, const bf16* w, Index ldw, Index in, const Scalar* x, Index ldx, Index T,
                         const Scalar* bias, Scalar* y, Index ldy, Index o0, Index o1) noexcept {
  skinny_product(a, w, ldw, in, x, ldx, T, bias, y, ldy, o0, o1);
}
template <class Arch, class Scalar>
void skinny_product_f16(Arch a, const f16* w, Index ldw, Index in, const Scalar* x, Index ldx, Index T,
                        const Scalar* bias, Scalar* y, Index ldy, Index o0, Index o1) noexcept {
  skinny_product(a, w, ldw, in, x, ldx, T, bias, y, ldy, o0, o1);
}
template <class Arch, class Scalar>
void widen_bf16(Arch a, const bf16* src, Index n, Scalar* dst) noexcept {
  widen(a, src, n, dst);
}
template <class Arch, class Scalar>
void widen_f16(Arch a, const f16* src, Index n, Scalar* dst) noexcept {
  widen(a, src, n, dst);
}

}  // namespace molora::kernels

// The overloads for dispatched_arch (run-time ISA) sit next to the kernels they call.
#include "dispatched.hpp"
