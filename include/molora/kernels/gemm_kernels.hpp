// The base layer's product for many tokens: y = x W^T + b with x [T, in], W [out, in] (float,
// or bf16 / f16 widened exactly), both row-major, a packed GEMM in the manner of BLIS. Per
// block of kGemmNC outputs and kGemmKC inputs the block of W is packed (and, for 16-bit
// weights, widened: the packing is the widening) into panels of NR outputs x KC, K-major;
// per block of tokens x is packed into panels of MR tokens x KC; a register block of MR
// tokens x NR outputs (NR two vectors wide) then runs over each pair of panels, the x panel
// kept in L1 while the W panels stream from L2. Above kernels::skinny_crossover the layers
// use it instead of Eigen's GEMM for float (docs/design-notes.md, "The base product for
// many tokens"). Written once for any xsimd Arch over raw pointers, with a scalar fallback;
// like the other kernels it checks nothing and throws nothing.
//
// Bitwise reproducibility: y[t, o] is summed the same way wherever (t, o) falls in the
// blocks: per block of kGemmKC inputs (a constant) an accumulator starts at zero and adds the
// products in input order (panels are zero-padded, so a partial register block does the
// same operations as a full one), then y = y + acc for every block but the first, then the
// bias. It depends on row t of x, row o of W and b[o] only: splitting the outputs or the
// tokens between threads changes no bit, and 16-bit weights give the bits of their widened
// float copy.
//
// Also here: gemm_product_bf16dot, the opt-in bf16-dot mode's GEMM (AVX512_BF16's VDPBF16PS;
// docs/design-notes.md, "The bf16-dot GEMM"): W's bf16 pairs read in place and broadcast, x
// packed in panels of 64 tokens; the same bits rule.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "../half.hpp"
#include "lora_kernels.hpp"

#if !defined(MOLORA_NO_XSIMD) && (defined(__AVX__) || defined(__AVX512F__))
#include <immintrin.h>
#endif

namespace molora::kernels {

// Inputs per packed block: the sums of y are split at multiples of it (see above). A panel of
// 12 tokens x 256 floats (12 KiB) stays in L1 while the W panels pass.
constexpr Index kGemmKC = 256;
// Outputs per packed block of W: 256 x 256 floats (256 KiB) stay in L2 beside the next block,
// which gemm_product fetches while this one computes (docs/design-notes.md).
constexpr Index kGemmNC = 256;
// Tokens per packed block of x (rounded down to a multiple of the register block's tokens).
constexpr Index kGemmMC = 240;

// Scalar values of scratch gemm_product needs, whatever the ISA (the widest register block
// has at most 16 tokens and 4 x 16 outputs; one cache line of slack for alignment).
template <class Scalar>
constexpr Index gemm_scratch_size() noexcept {
  return kGemmKC * (kGemmMC + 16) + kGemmKC * (kGemmNC + 64) + 64 / Index(sizeof(Scalar));
}

// ---- scalar kernel ------------------------------------------------------------------------

// y[t*ldy + o] = sum_i w[o*ldw + i] * x[t*ldx + i] (+ bias[o]) for t < T, o in [o0, o1),
// summed per block of kGemmKC inputs as the vector kernel does. scratch is unused.
template <class W, class Scalar>
void gemm_product(scalar_arch, const W* w, Index ldw, Index in, const Scalar* x, Index ldx, Index T,
                  const Scalar* bias, Scalar* y, Index ldy, Index o0, Index o1, Scalar* /*scratch*/) noexcept {
  for (Index t = 0; t < T; ++t)
    for (Index o = o0; o < o1; ++o) {
      Scalar s = 0;
      for (Index p = 0; p < in; p += kGemmKC) {
        Scalar acc = 0;
        for (Index i = p; i < in && i < p + kGemmKC; ++i) {
#if defined(__FMA__)
          // Fused explicitly, as in skinny_product's scalar kernel: left to the compiler, a
          // -march build may contract the float and the 16-bit instantiations differently.
          acc = std::fma(Scalar(to_float(w[o * ldw + i])), x[t * ldx + i], acc);
#else
          acc += Scalar(to_float(w[o * ldw + i])) * x[t * ldx + i];
#endif
        }
        s = p == 0 ? acc : s + acc;
      }
      if (bias) s += bias[o];
      y[t * ldy + o] = s;
    }
}

#if !defined(MOLORA_NO_XSIMD)

namespace detail {

// Defined in base_kernels.hpp, which is included at the end of this header: it includes the
// dispatch table (dispatched.hpp), which needs this header's kernels declared first.
template <class Arch, class Scalar, class W>
inline xsimd::batch<Scalar, Arch> load_weights(const W* p) noexcept;

// Register block: MR tokens x NV vectors of outputs. With 32 vector registers 12 x 2 (24
// accumulators, 2 W vectors, 1 broadcast); with 16, 6 x 2.
template <class Arch>
constexpr int gemm_mr() noexcept {
  return vector_registers<Arch>() >= 32 ? 12 : 6;
}
constexpr int kGemmNV = 2;

// Whether transpose_square transposes V x V blocks of Scalar on Arch in registers.
template <class Arch, class Scalar>
constexpr bool has_transpose() noexcept {
  constexpr std::size_t V = xsimd::batch<Scalar, Arch>::size;
  (void)V;
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<Scalar, float> && V == 16) return true;
#endif
#if defined(__AVX__)
  if constexpr (std::is_same_v<Scalar, float> && V == 8) return true;
#endif
  return false;
}

// r[j] lane l <- r[l] lane j, for the V x V blocks has_transpose allows.
template <class Arch, class Scalar>
inline void transpose_square(xsimd::batch<Scalar, Arch>* r) noexcept {
  using B [[maybe_unused]] = xsimd::batch<Scalar, Arch>;
  (void)r;
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<Scalar, float> && B::size == 16) {
    __m512 t[16], u[16];
    for (int i = 0; i < 16; i += 2) {
      t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
      t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
    }
    for (int i = 0; i < 16; i += 4) {
      u[i] = _mm512_shuffle_ps(t[i], t[i + 2], 0x44);
      u[i + 1] = _mm512_shuffle_ps(t[i], t[i + 2], 0xEE);
      u[i + 2] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0x44);
      u[i + 3] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
    }
    // u[4q + j] holds, in 128-bit lane c, column 4c + j of rows 4q..4q+3.
    for (int h = 0; h < 16; h += 8)
      for (int j = 0; j < 4; ++j) {
        t[h + j] = _mm512_shuffle_f32x4(u[h + j], u[h + 4 + j], 0x88);
        t[h + 4 + j] = _mm512_shuffle_f32x4(u[h + j], u[h + 4 + j], 0xDD);
      }
    for (int j = 0; j < 8; ++j) {
      r[j] = B(_mm512_shuffle_f32x4(t[j], t[8 + j], 0x88));
      r[8 + j] = B(_mm512_shuffle_f32x4(t[j], t[8 + j], 0xDD));
    }
    return;
  }
#endif
#if defined(__AVX__)
  if constexpr (std::is_same_v<Scalar, float> && B::size == 8) {
    __m256 t[8], u[8];
    for (int i = 0; i < 8; i += 2) {
      t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
      t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
    }
    for (int i = 0; i < 8; i += 4) {
      u[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
      u[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xEE);
      u[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
      u[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
    }
    for (int j = 0; j < 4; ++j) {
      r[j] = B(_mm256_permute2f128_ps(u[j], u[4 + j], 0x20));
      r[4 + j] = B(_mm256_permute2f128_ps(u[j], u[4 + j], 0x31));
    }
    return;
  }
#endif
}

// Bytes ahead of the packing's reads of W that gemm_pack_w prefetches each row (four lines).
constexpr Index kGemmPackAhead = 256;

// Packs rows [o, o + cols) of W (cols <= NR), inputs [p, p + kc), into dst[k * NR + j],
// widened; columns j >= cols are zero. Full panels go through V x V transposes in registers
// where the ISA has them.
template <class Arch, Index NR, class Wt, class Scalar>
inline void gemm_pack_w(const Wt* w, Index ldw, Index cols, Index kc, Scalar* dst) noexcept {
  using B = xsimd::batch<Scalar, Arch>;
  constexpr Index V = static_cast<Index>(B::size);
  Index k0 = 0;
  if constexpr (has_transpose<Arch, Scalar>()) {
    if (cols == NR) {
      B r[V];
      for (; k0 + V <= kc; k0 += V)
        for (Index h = 0; h < NR; h += V) {
          // The panel reads NR rows side by side, more streams than the hardware prefetcher
          // follows: ask for each row's line kGemmPackAhead bytes on (a hint, no bit changes).
          MOLORA_UNROLL
          for (Index j = 0; j < V; ++j)
            __builtin_prefetch(w + (h + j) * ldw + k0 + kGemmPackAhead / Index(sizeof(Wt)), 0, 3);
          MOLORA_UNROLL
          for (Index j = 0; j < V; ++j) r[j] = load_weights<Arch, Scalar>(w + (h + j) * ldw + k0);
          transpose_square<Arch, Scalar>(r);
          MOLORA_UNROLL
          for (Index j = 0; j < V; ++j) r[j].store_aligned(dst + (k0 + j) * NR + h);
        }
    }
  }
  if (k0 < kc) {
    alignas(64) Scalar row[kGemmKC];
    for (Index j = 0; j < cols; ++j) {
      const Wt* src = w + j * ldw;
      Index k = k0;
      for (; k + V <= kc; k += V) load_weights<Arch, Scalar>(src + k).store_unaligned(row + k);
      for (; k < kc; ++k) row[k] = Scalar(to_float(src[k]));
      for (k = k0; k < kc; ++k) dst[k * NR + j] = row[k];
    }
  }
  for (Index j = cols; j < NR; ++j)
    for (Index k = 0; k < kc; ++k) dst[k * NR + j] = Scalar(0);
}

// Stores lanes [0, n) of r at p (n < the vector's width), for the ISAs has_transpose covers.
template <class Arch, class Scalar>
inline void store_first_lanes(const xsimd::batch<Scalar, Arch>& r, int n, Scalar* p) noexcept {
  using B [[maybe_unused]] = xsimd::batch<Scalar, Arch>;
  (void)r, (void)n, (void)p;
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<Scalar, float> && B::size == 16) {
    _mm512_mask_storeu_ps(p, static_cast<__mmask16>((1u << n) - 1u), r);
    return;
  }
#endif
#if defined(__AVX__)
  if constexpr (std::is_same_v<Scalar, float> && B::size == 8) {
    const __m256 lanes = _mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7);  // AVX only: no integer compare
    _mm256_maskstore_ps(p, _mm256_castps_si256(_mm256_cmp_ps(lanes, _mm256_set1_ps(float(n)), _CMP_LT_OQ)), r);
    return;
  }
#endif
}

// Packs tokens [0, rows) of x (rows <= MR), inputs [0, kc), into dst[k * MR + i]; tokens
// i >= rows are zero. Where the ISA transposes in registers (MR < V), V inputs of V rows
// (the missing ones zero) go through one V x V transpose, each input's MR tokens stored by a
// masked store; the inputs past the last multiple of V one by one.
template <class Arch, int MR, class Scalar>
inline void gemm_pack_x(const Scalar* x, Index ldx, Index rows, Index kc, Scalar* dst) noexcept {
  Index k0 = 0;
  if constexpr (has_transpose<Arch, Scalar>() && MR < Index(xsimd::batch<Scalar, Arch>::size)) {
    using B = xsimd::batch<Scalar, Arch>;
    constexpr Index V = static_cast<Index>(B::size);
    B r[V];
    for (; k0 + V <= kc; k0 += V) {
      MOLORA_UNROLL
      for (Index i = 0; i < V; ++i) r[i] = i < rows ? B::load_unaligned(x + i * ldx + k0) : B(Scalar(0));
      transpose_square<Arch, Scalar>(r);
      MOLORA_UNROLL
      for (Index j = 0; j < V; ++j) store_first_lanes<Arch, Scalar>(r[j], MR, dst + (k0 + j) * MR);
    }
  }
  for (Index i = 0; i < MR; ++i)
    for (Index k = k0; k < kc; ++k) dst[k * MR + i] = i < rows ? x[i * ldx + k] : Scalar(0);
}

// The register block over one pair of panels: c[i*ldc + j] = (first ? 0 : c) + sum_k
// xp[k*XS + i] * wp[k*NR + j], then + bias[j] when bias is not null, for i < MR, j < NR (XS,
// the x panel's stride, >= MR). Each element's operations are the same whatever MR.
template <class Arch, int MR, int XS, class Scalar>
inline void gemm_block(Index kc, const Scalar* xp, const Scalar* wp, Scalar* c, Index ldc, bool first,
                       const Scalar* bias) noexcept {
  using B = xsimd::batch<Scalar, Arch>;
  constexpr Index V = static_cast<Index>(B::size);
  constexpr Index NR = kGemmNV * V;
  B acc[MR][kGemmNV];
  MOLORA_UNROLL
  for (int i = 0; i < MR; ++i) {
    MOLORA_UNROLL
    for (int v = 0; v < kGemmNV; ++v) acc[i][v] = B(Scalar(0));
  }
  for (Index k = 0; k < kc; ++k) {
    B wv[kGemmNV];
    MOLORA_UNROLL
    for (int v = 0; v < kGemmNV; ++v) wv[v] = B::load_aligned(wp + k * NR + v * V);
    MOLORA_UNROLL
    for (int i = 0; i < MR; ++i) {
      const B xv(xp[k * XS + i]);
      MOLORA_UNROLL
      for (int v = 0; v < kGemmNV; ++v) acc[i][v] = xsimd::fma(xv, wv[v], acc[i][v]);
    }
  }
  MOLORA_UNROLL
  for (int i = 0; i < MR; ++i) {
    MOLORA_UNROLL
    for (int v = 0; v < kGemmNV; ++v) {
      Scalar* p = c + i * ldc + v * V;
      B r = first ? acc[i][v] : B::load_unaligned(p) + acc[i][v];
      if (bias) r = r + B::load_unaligned(bias + v * V);
      r.store_unaligned(p);
    }
  }
}

// The register block for the edges: rows x cols of c (rows <= MR, cols <= NR) through a
// full block in a local tile, so every element gets the same operations as in the interior.
template <class Arch, int MR, int XS, class Scalar>
inline void gemm_edge_block(Index kc, const Scalar* xp, const Scalar* wp, Scalar* c, Index ldc, Index rows,
                            Index cols, bool first, const Scalar* bias) noexcept {
  constexpr Index NR = kGemmNV * simd_width<Arch, Scalar>();
  alignas(64) Scalar tile[MR * NR];
  alignas(64) Scalar b[NR];
  for (Index i = 0; i < MR; ++i)
    for (Index j = 0; j < NR; ++j) tile[i * NR + j] = i < rows && j < cols && !first ? c[i * ldc + j] : Scalar(0);
  if (bias)
    for (Index j = 0; j < NR; ++j) b[j] = j < cols ? bias[j] : Scalar(0);
  gemm_block<Arch, MR, XS>(kc, xp, wp, tile, NR, first, bias ? b : nullptr);
  for (Index i = 0; i < rows; ++i)
    for (Index j = 0; j < cols; ++j) c[i * ldc + j] = tile[i * NR + j];
}

// rows x cols of c (rows <= XS, the x panel's tokens) by the smallest register block of XS / 3,
// 2 XS / 3 or XS tokens that holds them, straight into c when it fills the block, through the
// tile otherwise: a tail of 8 tokens (128 = 10 x 12 + 8) costs 8 tokens, not 12 and a copy.
// Same operations per element whichever block runs it.
template <class Arch, int XS, class Scalar>
inline void gemm_any_rows(Index kc, const Scalar* xp, const Scalar* wp, Scalar* c, Index ldc, Index rows,
                          Index cols, bool first, const Scalar* bias) noexcept {
  constexpr Index NR = kGemmNV * simd_width<Arch, Scalar>();
  constexpr int R1 = XS / 3, R2 = 2 * XS / 3;
  if (rows == XS && cols == NR)
    gemm_block<Arch, XS, XS>(kc, xp, wp, c, ldc, first, bias);
  else if (rows == R2 && cols == NR)
    gemm_block<Arch, R2, XS>(kc, xp, wp, c, ldc, first, bias);
  else if (rows == R1 && cols == NR)
    gemm_block<Arch, R1, XS>(kc, xp, wp, c, ldc, first, bias);
  else if (rows <= R1)
    gemm_edge_block<Arch, R1, XS>(kc, xp, wp, c, ldc, rows, cols, first, bias);
  else if (rows <= R2)
    gemm_edge_block<Arch, R2, XS>(kc, xp, wp, c, ldc, rows, cols, first, bias);
  else
    gemm_edge_block<Arch, XS, XS>(kc, xp, wp, c, ldc, rows, cols, first, bias);
}

// The next block of W that gemm_product packs, fetched towards the caches while the current
// block's register blocks run, so that packing it finds its lines there instead of waiting
// on memory row by row (a hint: no bit changes). Line l of the block is line l % per_row of
// row l / per_row, counted from the block's first input.
template <class Wt>
struct gemm_next_w {
  std::uintptr_t row = 0;  // the current row's address at the block's first input
  Index row_bytes = 0;     // ldw in bytes
  Index per_row = 0;       // lines per row: one more than the block's width needs, for rows
                           // that do not start on a line
  Index col = 0, left = 0, per_call = 0;  // line within the row; lines still to fetch

  // w: the next block's first row at its first input (null: there is none); calls: how many
  // times step() runs while the current block computes.
  gemm_next_w(const Wt* w, Index ldw, Index rows, Index kc, Index calls) noexcept {
    if (w == nullptr || rows <= 0 || kc <= 0) return;
    row = reinterpret_cast<std::uintptr_t>(w);
    row_bytes = ldw * Index(sizeof(Wt));
    per_row = (kc * Index(sizeof(Wt)) + 63) / 64 + 1;
    left = rows * per_row;
    if (calls < 1) calls = 1;
    per_call = (left + calls - 1) / calls;
  }
  // Fetches the next share of the block's lines (addresses as integers: the extra line of a
  // row may lie past the last row's end, where a pointer may not point).
  void step() noexcept {
    for (Index n = per_call < left ? per_call : left; n > 0; --n, --left) {
      __builtin_prefetch(reinterpret_cast<const void*>(row + static_cast<std::uintptr_t>(col * 64)), 0, 2);
      if (++col == per_row) {
        col = 0;
        row += static_cast<std::uintptr_t>(row_bytes);
      }
    }
  }
};

}  // namespace detail

// The base product for outputs [o0, o1): y[t*ldy + o] = sum_i w[o*ldw + i] * x[t*ldx + i]
// (+ bias[o] when bias is not null) for t < T. Requires: w rows of `in` values with stride
// ldw, x T rows with stride ldx >= in, y T rows with stride ldy, 0 <= o0 <= o1, scratch of
// gemm_scratch_size<Scalar>() values (any alignment) used by this call only; y aliases
// neither w, x, bias nor scratch. Fast from a few dozen tokens on; correct for any T >= 0.
// Wt is Scalar, or bf16 / f16 (widened while packed): the result is then bit for bit the one
// for the widened weights.
template <class Arch, class Wt, class Scalar>
void gemm_product(Arch, const Wt* w, Index ldw, Index in, const Scalar* x, Index ldx, Index T, const Scalar* bias,
                  Scalar* y, Index ldy, Index o0, Index o1, Scalar* scratch) noexcept {
  constexpr int MR = detail::gemm_mr<Arch>();
  constexpr Index NR = detail::kGemmNV * simd_width<Arch, Scalar>();
  constexpr Index MC = kGemmMC / MR * MR;
  // Both packed blocks start on a cache line.
  const auto addr = reinterpret_cast<std::uintptr_t>(scratch);
  Scalar* wpack = scratch + static_cast<Index>((64 - addr % 64) % 64) / Index(sizeof(Scalar));
  Scalar* xpack = wpack + kGemmKC * (kGemmNC + 64);
  for (Index jc = o0; jc < o1; jc += kGemmNC) {
    const Index nc = o1 - jc < kGemmNC ? o1 - jc : kGemmNC;
    for (Index pc = 0; pc < in; pc += kGemmKC) {
      const Index kc = in - pc < kGemmKC ? in - pc : kGemmKC;
      const bool first = pc == 0;
      const Scalar* b = pc + kc == in ? bias : nullptr;
      for (Index jr = 0; jr < nc; jr += NR)
        detail::gemm_pack_w<Arch, NR>(w + (jc + jr) * ldw + pc, ldw, nc - jr < NR ? nc - jr : NR, kc,
                                      wpack + jr * kGemmKC);
      // The block packed next: the next inputs of these outputs, or the next outputs' first.
      const bool more_in = pc + kc < in, more_out = jc + nc < o1;
      const Index next_rows = more_in ? nc : more_out ? (o1 - jc - nc < kGemmNC ? o1 - jc - nc : kGemmNC) : 0;
      const Index next_p = more_in ? pc + kc : 0;
      const Index next_kc = in - next_p < kGemmKC ? in - next_p : kGemmKC;
      detail::gemm_next_w<Wt> next(more_in || more_out ? w + (more_in ? jc : jc + nc) * ldw + next_p : nullptr, ldw,
                                   next_rows, next_kc, ((T + MR - 1) / MR) * ((nc + NR - 1) / NR));
      for (Index ic = 0; ic < T; ic += MC) {
        const Index mc = T - ic < MC ? T - ic : MC;
        for (Index ir = 0; ir < mc; ir += MR)
          detail::gemm_pack_x<Arch, MR>(x + (ic + ir) * ldx + pc, ldx, mc - ir < MR ? mc - ir : MR, kc,
                                  xpack + ir * kGemmKC);
        for (Index ir = 0; ir < mc; ir += MR) {
          const Index rows = mc - ir < MR ? mc - ir : MR;
          const Scalar* xp = xpack + ir * kGemmKC;
          Scalar* yt = y + (ic + ir) * ldy + jc;
          for (Index jr = 0; jr < nc; jr += NR) {
            const Index cols = nc - jr < NR ? nc - jr : NR;
            const Scalar* bj = b ? b + jc + jr : nullptr;
            next.step();
            detail::gemm_any_rows<Arch, MR>(kc, xp, wpack + jr * kGemmKC, yt + jr, ldy, rows, cols, first, bj);
          }
        }
      }
    }
  }
}

#endif  // !MOLORA_NO_XSIMD

// ---- opt-in bf16 dot products: the packed GEMM ------------------------------------------

// Inputs per packed block of gemm_product_bf16dot: kGemmKC pairs of bf16, so its packed blocks
// take the bytes of gemm_product's (and fit gemm_scratch_size<float>()).
constexpr Index kGemmBf16KC = 2 * kGemmKC;

#if defined(__AVX512BF16__) && defined(__AVX512BW__) && !defined(MOLORA_NO_XSIMD)
namespace detail {

// Register block of the bf16-dot GEMM: 12 tokens x 32 outputs (24 accumulators, 2 W vectors,
// 1 broadcast of a pair of x).
constexpr int kBf16MR = 12;
constexpr Index kBf16NR = 32;

// The block that reads W in place (gemm_bf16_wt_block): 6 outputs x up to 64 tokens (24
// accumulators, 4 x vectors, one broadcast of a W pair from memory). x is packed in
// panels of kBf16WtTP tokens x the pairs of kBf16WtKC inputs (a multiple of kGemmBf16KC), two
// panels at a time (512 KiB).
constexpr Index kBf16WtMR = 6;
constexpr Index kBf16WtTP = 64;
constexpr Index kBf16WtKC = 4 * kGemmBf16KC;
constexpr Index kBf16WtPanels = 2;
// The packed x panels, plus the alignment gemm_product_bf16dot_wt takes, fit the scratch.
static_assert(kBf16WtPanels * kBf16WtTP * (kBf16WtKC / 2) + 64 / Index(sizeof(float)) <= gemm_scratch_size<float>(),
              "the bf16-dot x panels must fit gemm_scratch_size<float>()");

// Two bf16 values as the bits of one float: the packed blocks live in the float scratch, each
// 32-bit lane holding inputs 2q (low half) and 2q + 1 (high half), as VDPBF16PS reads them.
inline float bf16_pair_bits(std::uint16_t lo, std::uint16_t hi) noexcept {
  return ::molora::detail::bits_float(std::uint32_t(lo) | std::uint32_t(hi) << 16);
}

// Packs rows [0, cols) of w (cols <= kBf16NR), inputs [0, kc), as pairs into dst[q * kBf16NR + j]
// for q < (kc + 1) / 2: an odd kc's last pair and the columns j >= cols are zero. dst is
// 64-byte aligned. Whole groups of 16 pairs of a full panel go through 16 x 16 transposes of
// 32-bit lanes.
inline void gemm_bf16_pack_w(const bf16* w, Index ldw, Index cols, Index kc, float* dst) noexcept {
  using B = xsimd::batch<float, xsimd::avx512bw>;
  const Index kq = (kc + 1) / 2;
  Index q0 = 0;
  if (cols == kBf16NR) {
    B r[16];
    for (; 2 * (q0 + 16) <= kc; q0 += 16)
      for (Index h = 0; h < kBf16NR; h += 16) {
        MOLORA_UNROLL
        for (Index j = 0; j < 16; ++j)
          r[j] = B(_mm512_castsi512_ps(_mm512_loadu_si512(static_cast<const void*>(w + (h + j) * ldw + 2 * q0))));
        transpose_square<xsimd::avx512bw, float>(r);
        MOLORA_UNROLL
        for (Index j = 0; j < 16; ++j) _mm512_store_ps(dst + (q0 + j) * kBf16NR + h, r[j]);
      }
  }
  for (Index j = 0; j < kBf16NR; ++j) {
    const bf16* src = w + j * ldw;
    for (Index q = q0; q < kq; ++q) {
      const std::uint16_t lo = j < cols ? src[2 * q].bits : 0;
      const std::uint16_t hi = j < cols && 2 * q + 1 < kc ? src[2 * q + 1].bits : 0;
      dst[q * kBf16NR + j] = bf16_pair_bits(lo, hi);
    }
  }
}

// Packs tokens [0, rows) of x (rows <= S, S = kBf16MR for the packed-W block, kBf16WtTP for the
// in-place one), inputs [0, kc), rounded to bf16 (to nearest even, by VCVTNE2PS2BF16 as
// skinny_product_bf16dot rounds them) as pairs into dst[q * S + i]; an odd kc's last pair and
// the tokens i >= rows are zero.
template <Index S = kBf16MR>
inline void gemm_bf16_pack_x(const float* x, Index ldx, Index rows, Index kc, float* dst) noexcept {
  const Index kq = (kc + 1) / 2;
  alignas(64) float pairs[16];
  for (Index i = 0; i < S; ++i) {
    if (i >= rows) {
      for (Index q = 0; q < kq; ++q) dst[q * S + i] = bf16_pair_bits(0, 0);
      continue;
    }
    const float* src = x + i * ldx;
    for (Index c = 0; c < kc; c += 32) {
      const auto n = static_cast<unsigned>(kc - c < 32 ? kc - c : 32);
      const auto mlo = static_cast<__mmask16>(n >= 16 ? 0xffffu : (1u << n) - 1u);
      const auto mhi = static_cast<__mmask16>(n <= 16 ? 0u : (1u << (n - 16)) - 1u);
      const __m512bh v = _mm512_cvtne2ps_pbh(_mm512_maskz_loadu_ps(mhi, src + c + 16), _mm512_maskz_loadu_ps(mlo, src + c));
      _mm512_store_ps(pairs, _mm512_castsi512_ps((__m512i)v));
      for (Index l = 0; l < Index(n + 1) / 2; ++l) dst[(c / 2 + l) * S + i] = pairs[l];
    }
  }
}

// The register block over one pair of panels of kq pairs, for the first MR tokens of the x
// panel (MR <= kBf16MR; the panel's stride stays kBf16MR): c[i*ldc + j] = (first ? 0 : c) +
// sum_q dot(xp pair (q, i), wp pair (q, j)), then + bias[j] when bias is not null, i < MR.
// Each element's operations are the same whatever MR: the 4- and 8-token blocks of a token
// tail give the bits of the 12-token block.
template <int MR>
inline void gemm_bf16_block(Index kq, const float* xp, const float* wp, float* c, Index ldc, bool first,
                            const float* bias) noexcept {
  __m512 acc[MR][2];
  MOLORA_UNROLL
  for (int i = 0; i < MR; ++i) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
  for (Index q = 0; q < kq; ++q) {
    const __m512bh w0 = (__m512bh)_mm512_load_si512(static_cast<const void*>(wp + q * kBf16NR));
    const __m512bh w1 = (__m512bh)_mm512_load_si512(static_cast<const void*>(wp + q * kBf16NR + 16));
    MOLORA_UNROLL
    for (int i = 0; i < MR; ++i) {
      const __m512bh xv = (__m512bh)_mm512_castps_si512(_mm512_set1_ps(xp[q * kBf16MR + i]));
      acc[i][0] = _mm512_dpbf16_ps(acc[i][0], xv, w0);
      acc[i][1] = _mm512_dpbf16_ps(acc[i][1], xv, w1);
    }
  }
  MOLORA_UNROLL
  for (int i = 0; i < MR; ++i) {
    MOLORA_UNROLL
    for (int v = 0; v < 2; ++v) {
      float* p = c + i * ldc + v * 16;
      __m512 r = first ? acc[i][v] : _mm512_add_ps(_mm512_loadu_ps(p), acc[i][v]);
      if (bias) r = _mm512_add_ps(r, _mm512_loadu_ps(bias + v * 16));
      _mm512_storeu_ps(p, r);
    }
  }
}

// The edges: rows x cols of c (rows <= MR) through an MR-token block in a local tile (same
// operations per element).
template <int MR>
inline void gemm_bf16_edge_block(Index kq, const float* xp, const float* wp, float* c, Index ldc, Index rows,
                                 Index cols, bool first, const float* bias) noexcept {
  alignas(64) float tile[MR * kBf16NR];
  alignas(64) float b[kBf16NR];
  for (Index i = 0; i < MR; ++i)
    for (Index j = 0; j < kBf16NR; ++j)
      tile[i * kBf16NR + j] = i < rows && j < cols && !first ? c[i * ldc + j] : 0.0f;
  if (bias)
    for (Index j = 0; j < kBf16NR; ++j) b[j] = j < cols ? bias[j] : 0.0f;
  gemm_bf16_block<MR>(kq, xp, wp, tile, kBf16NR, first, bias ? b : nullptr);
  for (Index i = 0; i < rows; ++i)
    for (Index j = 0; j < cols; ++j) c[i * ldc + j] = tile[i * kBf16NR + j];
}

// One register block of `rows` tokens (<= kBf16MR) x `cols` outputs: the 12-token block, or for
// a tail of at most 4 or 8 tokens the 4- or 8-token block, so that a few tokens do not pay for 12.
template <int MR>
inline void gemm_bf16_rows(Index kq, const float* xp, const float* wp, float* c, Index ldc, Index rows, Index cols,
                           bool first, const float* bias) noexcept {
  if (rows == MR && cols == kBf16NR)
    gemm_bf16_block<MR>(kq, xp, wp, c, ldc, first, bias);
  else
    gemm_bf16_edge_block<MR>(kq, xp, wp, c, ldc, rows, cols, first, bias);
}
inline void gemm_bf16_any_rows(Index kq, const float* xp, const float* wp, float* c, Index ldc, Index rows,
                               Index cols, bool first, const float* bias) noexcept {
  if (rows <= 4)
    gemm_bf16_rows<4>(kq, xp, wp, c, ldc, rows, cols, first, bias);
  else if (rows <= 8)
    gemm_bf16_rows<8>(kq, xp, wp, c, ldc, rows, cols, first, bias);
  else
    gemm_bf16_rows<kBf16MR>(kq, xp, wp, c, ldc, rows, cols, first, bias);
}

// ---- the block that reads W in place ----
// Roles swapped: the lanes hold tokens and W's pairs are broadcast, so W needs no packing (its
// row-major bf16 rows already hold each output's pairs, inputs 2q and 2q + 1, as 32-bit words)
// and only x is packed, K-major, 64 tokens wide. Each lane still computes, per block of
// kGemmBf16KC inputs, acc = 0 then acc = VDPBF16PS(acc, x pair, w pair) in input order, and
// the products of a lane are exact and commute: every element gets the bits of the packed-W
// block.

// W's pair (p[0], p[1]) in all 16 lanes.
inline __m512bh bf16_pair_broadcast(const bf16* p) noexcept {
  std::uint32_t u;
  std::memcpy(&u, p, sizeof u);
  return (__m512bh)_mm512_set1_epi32(static_cast<int>(u));
}

// Rows [0, rows) of w (rows <= kBf16WtMR, each from w + i*ldw), inputs [0, kc), against the
// first NV*16 tokens of a packed x panel (stride kBf16WtTP per pair; tokens [0, tokens) real,
// tokens <= 16 NV): per block of kGemmBf16KC inputs an accumulator from zero, summed into a
// local tile s (s = acc for the very first block when `first`, else s = s + acc); then
// y[t*ldy + i] = s (+ bias[i] when bias is not null) for t < tokens, i < rows. When not
// `first` s starts from y (the earlier chunks' sum). Missing rows repeat row rows - 1 and are
// not stored. An odd kc's last pair reads w's last input alone.
template <int NV>
inline void gemm_bf16_wt_block(const bf16* w, Index ldw, Index rows, Index kc, const float* xp, float* y, Index ldy,
                               Index tokens, bool first, const float* bias) noexcept {
  constexpr int MR = static_cast<int>(kBf16WtMR);
  constexpr Index TP = kBf16WtTP;
  constexpr Index N = 16 * NV;
  const bf16* wr[MR];
  MOLORA_UNROLL
  for (int i = 0; i < MR; ++i) wr[i] = w + (i < rows ? i : rows - 1) * ldw;
  alignas(64) float s[MR * N];
  if (!first) {
    for (Index i = 0; i < MR * N; ++i) s[i] = 0.0f;
    for (Index t = 0; t < tokens; ++t)
      for (Index i = 0; i < rows; ++i) s[i * N + t] = y[t * ldy + i];
  }
  for (Index p = 0; p < kc; p += kGemmBf16KC) {
    const Index kb = kc - p < kGemmBf16KC ? kc - p : kGemmBf16KC;
    const Index whole = kb / 2;
    const float* xq = xp + p / 2 * TP;
    __m512 acc[MR][NV];
    MOLORA_UNROLL
    for (int i = 0; i < MR; ++i) {
      MOLORA_UNROLL
      for (int v = 0; v < NV; ++v) acc[i][v] = _mm512_setzero_ps();
    }
    for (Index q = 0; q < whole; ++q) {
      __m512bh xv[NV];
      MOLORA_UNROLL
      for (int v = 0; v < NV; ++v) xv[v] = (__m512bh)_mm512_load_si512(static_cast<const void*>(xq + q * TP + 16 * v));
      MOLORA_UNROLL
      for (int i = 0; i < MR; ++i) {
        const __m512bh wb = bf16_pair_broadcast(wr[i] + p + 2 * q);
        MOLORA_UNROLL
        for (int v = 0; v < NV; ++v) acc[i][v] = _mm512_dpbf16_ps(acc[i][v], xv[v], wb);
      }
    }
    if (kb % 2 != 0) {
      __m512bh xv[NV];
      MOLORA_UNROLL
      for (int v = 0; v < NV; ++v)
        xv[v] = (__m512bh)_mm512_load_si512(static_cast<const void*>(xq + whole * TP + 16 * v));
      MOLORA_UNROLL
      for (int i = 0; i < MR; ++i) {
        const __m512bh wb = (__m512bh)_mm512_set1_epi32(static_cast<int>(wr[i][p + 2 * whole].bits));
        MOLORA_UNROLL
        for (int v = 0; v < NV; ++v) acc[i][v] = _mm512_dpbf16_ps(acc[i][v], xv[v], wb);
      }
    }
    const bool start = first && p == 0;
    MOLORA_UNROLL
    for (int i = 0; i < MR; ++i) {
      MOLORA_UNROLL
      for (int v = 0; v < NV; ++v) {
        float* sp = s + i * N + 16 * v;
        _mm512_store_ps(sp, start ? acc[i][v] : _mm512_add_ps(_mm512_load_ps(sp), acc[i][v]));
      }
    }
  }
  for (Index t = 0; t < tokens; ++t)
    for (Index i = 0; i < rows; ++i) y[t * ldy + i] = bias ? s[i * N + t] + bias[i] : s[i * N + t];
}

// The product with W read in place: per chunk of kBf16WtKC inputs and per two panels of 64
// tokens, x is packed once; then every block of 6 outputs runs over the panels (its W rows
// stay in L1 between them). A last panel of t tokens runs ceil(t / 16) vectors.
inline void gemm_product_bf16dot_wt(const bf16* w, Index ldw, Index in, const float* x, Index ldx, Index T,
                                    const float* bias, float* y, Index ldy, Index o0, Index o1,
                                    float* scratch) noexcept {
  constexpr Index TP = kBf16WtTP;
  constexpr Index KQ = kBf16WtKC / 2;
  const auto addr = reinterpret_cast<std::uintptr_t>(scratch);
  float* xpack = scratch + static_cast<Index>((64 - addr % 64) % 64) / Index(sizeof(float));
  for (Index pc = 0; pc < in; pc += kBf16WtKC) {
    const Index kc = in - pc < kBf16WtKC ? in - pc : kBf16WtKC;
    const bool first = pc == 0;
    const float* b = pc + kc == in ? bias : nullptr;
    for (Index ic = 0; ic < T; ic += kBf16WtPanels * TP) {
      const Index mc = T - ic < kBf16WtPanels * TP ? T - ic : kBf16WtPanels * TP;
      for (Index ir = 0; ir < mc; ir += TP)
        gemm_bf16_pack_x<TP>(x + (ic + ir) * ldx + pc, ldx, mc - ir < TP ? mc - ir : TP, kc, xpack + ir * KQ);
      for (Index ob = o0; ob < o1; ob += kBf16WtMR) {
        const Index rows = o1 - ob < kBf16WtMR ? o1 - ob : kBf16WtMR;
        const bf16* wb = w + ob * ldw + pc;
        const float* bb = b ? b + ob : nullptr;
        for (Index ir = 0; ir < mc; ir += TP) {
          const Index tokens = mc - ir < TP ? mc - ir : TP;
          const float* xp = xpack + ir * KQ;
          float* yt = y + (ic + ir) * ldy + ob;
          switch ((tokens + 15) / 16) {
            case 1: gemm_bf16_wt_block<1>(wb, ldw, rows, kc, xp, yt, ldy, tokens, first, bb); break;
            case 2: gemm_bf16_wt_block<2>(wb, ldw, rows, kc, xp, yt, ldy, tokens, first, bb); break;
            case 3: gemm_bf16_wt_block<3>(wb, ldw, rows, kc, xp, yt, ldy, tokens, first, bb); break;
            default: gemm_bf16_wt_block<4>(wb, ldw, rows, kc, xp, yt, ldy, tokens, first, bb); break;
          }
        }
      }
    }
  }
}

// gemm_product's loops over the packed blocks, with pairs of bf16 in place of floats: the
// bf16-dot GEMM before the in-place driver, kept as its yardstick (the same bits, checked in
// native builds by tests/test_gemm_kernels.cpp; its time by bench_base's dot4_wt cells).
inline void gemm_product_bf16dot_packed(const bf16* w, Index ldw, Index in, const float* x, Index ldx, Index T,
                                        const float* bias, float* y, Index ldy, Index o0, Index o1,
                                        float* scratch) noexcept {
  constexpr Index KQ = kGemmBf16KC / 2;  // pairs per packed block
  constexpr Index MC = kGemmMC / kBf16MR * kBf16MR;
  const auto addr = reinterpret_cast<std::uintptr_t>(scratch);
  float* wpack = scratch + static_cast<Index>((64 - addr % 64) % 64) / Index(sizeof(float));
  float* xpack = wpack + KQ * (kGemmNC + 64);
  for (Index jc = o0; jc < o1; jc += kGemmNC) {
    const Index nc = o1 - jc < kGemmNC ? o1 - jc : kGemmNC;
    for (Index pc = 0; pc < in; pc += kGemmBf16KC) {
      const Index kc = in - pc < kGemmBf16KC ? in - pc : kGemmBf16KC;
      const Index kq = (kc + 1) / 2;
      const bool first = pc == 0;
      const float* b = pc + kc == in ? bias : nullptr;
      for (Index jr = 0; jr < nc; jr += kBf16NR)
        gemm_bf16_pack_w(w + (jc + jr) * ldw + pc, ldw, nc - jr < kBf16NR ? nc - jr : kBf16NR, kc, wpack + jr * KQ);
      for (Index ic = 0; ic < T; ic += MC) {
        const Index mc = T - ic < MC ? T - ic : MC;
        for (Index ir = 0; ir < mc; ir += kBf16MR)
          gemm_bf16_pack_x(x + (ic + ir) * ldx + pc, ldx, mc - ir < kBf16MR ? mc - ir : kBf16MR, kc, xpack + ir * KQ);
        for (Index ir = 0; ir < mc; ir += kBf16MR) {
          const Index rows = mc - ir < kBf16MR ? mc - ir : kBf16MR;
          const float* xp = xpack + ir * KQ;
          float* yt = y + (ic + ir) * ldy + jc;
          for (Index jr = 0; jr < nc; jr += kBf16NR) {
            const Index cols = nc - jr < kBf16NR ? nc - jr : kBf16NR;
            const float* bj = b ? b + jc + jr : nullptr;
            gemm_bf16_any_rows(kq, xp, wpack + jr * KQ, yt + jr, ldy, rows, cols, first, bj);
          }
        }
      }
    }
  }
}

// The bf16-dot GEMM is the in-place driver at every T: on one Zen 4 core it took 0.55-0.91x
// the packed driver's time from 16 to 1024 tokens (docs/design-notes.md, "The bf16-dot GEMM").
inline void gemm_product_bf16dot_avx512(const bf16* w, Index ldw, Index in, const float* x, Index ldx, Index T,
                                        const float* bias, float* y, Index ldy, Index o0, Index o1,
                                        float* scratch) noexcept {
  gemm_product_bf16dot_wt(w, ldw, in, x, ldx, T, bias, y, ldy, o0, o1, scratch);
}

}  // namespace detail
#endif

// The bf16-dot mode's product for many tokens, outputs [o0, o1): y[t*ldy + o] = sum_i
// bf16(x[t*ldx + i]) * w[o*ldw + i] (+ bias[o]) for t < T, the activations rounded to bf16 (to
// nearest even), products exact, sums in float. Same requirements as gemm_product (scratch of
// gemm_scratch_size<Scalar>() values). With AVX512_BF16 (callers check bf16_dot_available()
// first) x is packed as pairs of bf16, W's pairs are read in place, and each lane of
// VDPBF16PS adds a pair of products (it rounds once per addition and flushes subnormals);
// elsewhere a plain loop.
// Either way the sums are split per kGemmBf16KC inputs as gemm_product splits them, so y
// depends on row t of x, row o of W and bias[o] only: no bit changes with the output range,
// the tokens or the thread count. (The bits differ from skinny_product_bf16dot's.)
template <class Arch, class Scalar>
void gemm_product_bf16dot(Arch, const bf16* w, Index ldw, Index in, const Scalar* x, Index ldx, Index T,
                          const Scalar* bias, Scalar* y, Index ldy, Index o0, Index o1, Scalar* scratch) noexcept {
#if defined(__AVX512BF16__) && defined(__AVX512BW__) && !defined(MOLORA_NO_XSIMD)
  if constexpr (std::is_same_v<Scalar, float> && std::is_base_of_v<xsimd::avx512bw, Arch>) {
    detail::gemm_product_bf16dot_avx512(w, ldw, in, x, ldx, T, bias, y, ldy, o0, o1, scratch);
    return;
  }
#endif
  (void)scratch;
  for (Index t = 0; t < T; ++t)
    for (Index o = o0; o < o1; ++o) {
      Scalar s = 0;
      for (Index p = 0; p < in; p += kGemmBf16KC) {
        Scalar acc = 0;
        for (Index i = p; i < in && i < p + kGemmBf16KC; ++i)
          acc += Scalar(to_float(to_bf16(static_cast<float>(x[t * ldx + i])))) * Scalar(to_float(w[o * ldw + i]));
        s = p == 0 ? acc : s + acc;
      }
      if (bias) s += bias[o];
      y[t * ldy + o] = s;
    }
}

// The entries of the run-time table for 16-bit weights.
template <class Arch, class Scalar>
void gemm_product_bf16(Arch a, const bf16* w, Index ldw, Index in, const Scalar* x, Index ldx, Index T,
                       const Scalar* bias, Scalar* y, Index ldy, Index o0, Index o1, Scalar* scratch) noexcept {
  gemm_product(a, w, ldw, in, x, ldx, T, bias, y, ldy, o0, o1, scratch);
}
template <class Arch, class Scalar>
void gemm_product_f16(Arch a, const f16* w, Index ldw, Index in, const Scalar* x, Index ldx, Index T,
                      const Scalar* bias, Scalar* y, Index ldy, Index o0, Index o1, Scalar* scratch) noexcept {
  gemm_product(a, w, ldw, in, x, ldx, T, bias, y, ldy, o0, o1, scratch);
}

}  // namespace molora::kernels

// load_weights, then the overloads for dispatched_arch (run-time ISA).
#include "base_kernels.hpp"
