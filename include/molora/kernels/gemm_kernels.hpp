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
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
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
// Outputs per packed block of W: 256 x 512 floats (512 KiB) stay in L2.
constexpr Index kGemmNC = 512;
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

// Packs tokens [0, rows) of x (rows <= MR), inputs [0, kc), into dst[k * MR + i]; tokens
// i >= rows are zero.
template <int MR, class Scalar>
inline void gemm_pack_x(const Scalar* x, Index ldx, Index rows, Index kc, Scalar* dst) noexcept {
  for (Index i = 0; i < rows; ++i)
    for (Index k = 0; k < kc; ++k) dst[k * MR + i] = x[i * ldx + k];
  for (Index i = rows; i < MR; ++i)
    for (Index k = 0; k < kc; ++k) dst[k * MR + i] = Scalar(0);
}

// The register block over one pair of panels: c[i*ldc + j] = (first ? 0 : c) + sum_k
// xp[k*MR + i] * wp[k*NR + j], then + bias[j] when bias is not null, for i < MR, j < NR.
template <class Arch, int MR, class Scalar>
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
      const B xv(xp[k * MR + i]);
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
template <class Arch, int MR, class Scalar>
inline void gemm_edge_block(Index kc, const Scalar* xp, const Scalar* wp, Scalar* c, Index ldc, Index rows,
                            Index cols, bool first, const Scalar* bias) noexcept {
  constexpr Index NR = kGemmNV * simd_width<Arch, Scalar>();
  alignas(64) Scalar tile[MR * NR];
  alignas(64) Scalar b[NR];
  for (Index i = 0; i < MR; ++i)
    for (Index j = 0; j < NR; ++j) tile[i * NR + j] = i < rows && j < cols && !first ? c[i * ldc + j] : Scalar(0);
  if (bias)
    for (Index j = 0; j < NR; ++j) b[j] = j < cols ? bias[j] : Scalar(0);
  gemm_block<Arch, MR>(kc, xp, wp, tile, NR, first, bias ? b : nullptr);
  for (Index i = 0; i < rows; ++i)
    for (Index j = 0; j < cols; ++j) c[i * ldc + j] = tile[i * NR + j];
}

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
      for (Index ic = 0; ic < T; ic += MC) {
        const Index mc = T - ic < MC ? T - ic : MC;
        for (Index ir = 0; ir < mc; ir += MR)
          detail::gemm_pack_x<MR>(x + (ic + ir) * ldx + pc, ldx, mc - ir < MR ? mc - ir : MR, kc,
                                  xpack + ir * kGemmKC);
        for (Index ir = 0; ir < mc; ir += MR) {
          const Index rows = mc - ir < MR ? mc - ir : MR;
          const Scalar* xp = xpack + ir * kGemmKC;
          Scalar* yt = y + (ic + ir) * ldy + jc;
          for (Index jr = 0; jr < nc; jr += NR) {
            const Index cols = nc - jr < NR ? nc - jr : NR;
            const Scalar* bj = b ? b + jc + jr : nullptr;
            if (rows == MR && cols == NR)
              detail::gemm_block<Arch, MR>(kc, xp, wpack + jr * kGemmKC, yt + jr, ldy, first, bj);
            else
              detail::gemm_edge_block<Arch, MR>(kc, xp, wpack + jr * kGemmKC, yt + jr, ldy, rows, cols, first, bj);
          }
        }
      }
    }
  }
}

#endif  // !MOLORA_NO_XSIMD

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
