// The base product y = x W^T (+ b) of MoLoRALinear and Linear, in one place: the strategy
// switch (BaseStrategy), the crossover rule, and the calls into the kernels (skinny_product
// below the crossover, rows split between OpenMP threads; above it, for float, molora's packed
// GEMM gemm_product, outputs split between threads, or Eigen's GEMM, over blocks of widened
// rows for bf16 / f16 weights). docs/design-notes.md, "The base product for few tokens", "The
// base product for many tokens" and "Weights in their own type".
#pragma once

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include "detail/aligned.hpp"
#include "half.hpp"
#include "kernels/base_kernels.hpp"
#include "kernels/gemm_kernels.hpp"
#include "types.hpp"

#if defined(MOLORA_USE_OPENMP)
#include <omp.h>
#endif

namespace molora {

// How a layer computes its base product x W^T + b (same values up to rounding):
//   eigen      Eigen's GEMV / GEMM (for 16-bit weights: over blocks of widened rows)
//   skinny     kernels::skinny_product: each row of W streamed once for all the tokens
//   gemm       kernels::gemm_product: packed panels of x and W (16-bit W widened while packed)
//   automatic  skinny below kernels::skinny_crossover<Scalar, Weight>() tokens (a constant of
//              the running ISA: with AVX-512 32 for float weights, 48 for bf16 / f16 ones;
//              with AVX2 20, 10 and 16; 128 for double everywhere), from there on
//              detail::many_tokens_strategy (gemm for float activations, eigen for double);
//              one token of weights of the layer's own type goes to Eigen's GEMV (with OpenMP
//              its rows split between the threads), except float weights while AVX-512 runs,
//              which go to skinny (detail::one_token_skinny: rows of at most 4 KiB one after
//              the other, longer ones 12 side by side with the next rows fetched ahead, both
//              faster than the GEMV cold); 16-bit weights stay skinny (Eigen would need them
//              widened). Fixed rules per ISA, type and width, whatever the thread count.
enum class BaseStrategy { automatic, eigen, skinny, gemm };

inline const char* to_string(BaseStrategy s) {
  switch (s) {
    case BaseStrategy::automatic: return "automatic";
    case BaseStrategy::eigen: return "eigen";
    case BaseStrategy::skinny: return "skinny";
    case BaseStrategy::gemm: return "gemm";
  }
  return "?";
}

namespace detail {

// Weight types a layer of activations Scalar may hold: Scalar itself, or bf16 / f16 for float.
template <class Scalar, class Weight>
constexpr bool is_weight_for =
    std::is_same_v<Weight, Scalar> || (std::is_same_v<Scalar, float> && is_half<Weight>);

// What `automatic` takes from the crossover on: gemm for float activations (any weight
// type), Eigen's GEMM for double (docs/benchmarks.md, "The base product for many tokens").
template <class Scalar, class Weight>
constexpr BaseStrategy many_tokens_strategy() noexcept {
  return std::is_same_v<Scalar, float> ? BaseStrategy::gemm : BaseStrategy::eigen;
}

// Whether `automatic` gives one token of a float weight with rows of `in` values to the skinny
// kernel rather than Eigen's GEMV: whenever AVX-512 is active. Rows of at most
// kernels::skinny_short_row_bytes<float>() (4 KiB) the kernel reads one after the other: cold on
// Zen 4 0.99-1.07x the time of a plain read of the weight where the GEMV's 8 rows side by side
// took 1.05-1.21x (docs/benchmarks.md, "The f32 one-token route"). Longer rows it reads 12 side
// by side while fetching the rows two blocks on into L2 in address order: 1.05-1.10x the read
// against the GEMV's 1.10-1.17x at in = 2816 and 4096 ("The next rows fetched in address
// order"). A rule per ISA and type, whatever the thread count; double keeps the GEMV.
template <class Scalar>
bool one_token_skinny(Index in) noexcept {
  if constexpr (std::is_same_v<Scalar, float>) {
    (void)in;
#if MOLORA_RUNTIME_DISPATCH
    return std::strcmp(kernels::detail::current_isa().name, "avx512") == 0;  // the 32-register ISA
#elif !defined(MOLORA_NO_XSIMD)
    return kernels::detail::vector_registers<kernels::default_arch>() >= 32;
#else
    return false;
#endif
  } else {
    return (void)in, false;
  }
}

// What `automatic` (or a set strategy) means for T tokens of rows of `in` values.
template <class Scalar, class Weight>
BaseStrategy resolve_base_strategy(BaseStrategy s, Index num_tokens, Index in) {
  if (s != BaseStrategy::automatic) return s;
  const Index first_skinny = std::is_same_v<Weight, Scalar> && !one_token_skinny<Scalar>(in) ? 2 : 1;
  const Index crossover = kernels::skinny_crossover<Scalar, Weight>();
  if (num_tokens >= first_skinny && num_tokens < crossover) return BaseStrategy::skinny;
  return num_tokens >= crossover ? many_tokens_strategy<Scalar, Weight>()
                                                           : BaseStrategy::eigen;
}

// Bytes of float rows widened per Eigen product for 16-bit weights: the block stays in L2
// while Eigen packs it.
constexpr Index kWidenBlockBytes = Index(256) << 10;

// Calls f(o, n, rows) for each block [o, o + n) of W's rows among blocks [first, last) of
// `rows_per_block` rows, `rows` holding them widened to Scalar by the kernels (W [out, in]
// row-major bf16 / f16). The one loop behind the 16-bit products above the crossover,
// forward and backward.
template <class Scalar, class Weight, class F>
void for_widened_blocks(const Weight* w, Index in, Index out, Index rows_per_block, Index first, Index last, F&& f) {
  std::vector<Scalar> block(static_cast<std::size_t>(rows_per_block * in));
  for (Index o = first * rows_per_block; o < out && o < last * rows_per_block; o += rows_per_block) {
    const Index n = std::min(rows_per_block, out - o);
    kernels::widen(kernels::layer_arch{}, w + o * in, n * in, block.data());
    f(o, n, Eigen::Map<const RowMatrix<Scalar>>(block.data(), n, in));
  }
}

// Rows per widened block of `block_bytes` of Scalar (at least 16, at most out).
template <class Scalar>
Index widened_block_rows(Index in, Index out, Index block_bytes) {
  return std::min(out, std::max<Index>(16, block_bytes / Index(sizeof(Scalar)) / in));
}

// Calls f(o0, o1) on contiguous ranges that cover [0, n). With OpenMP, outside a parallel
// region and with more than one thread, one range per thread when n allows at least two
// ranges of min_part, at most n / min_part of them, every cut a multiple of step; otherwise
// f(0, n) once. The products split this way give every output the bits of one call over
// [0, n), so the thread count changes no bit of y.
template <class F>
void split_ranges(Index n, Index step, Index min_part, F&& f) {
#if defined(MOLORA_USE_OPENMP)
  const Index most = n / min_part;
  if (most >= 2 && !omp_in_parallel() && omp_get_max_threads() > 1) {
    const int parts = static_cast<int>(std::min<Index>(omp_get_max_threads(), most));
#pragma omp parallel num_threads(parts)
    {
      const Index p = omp_get_thread_num(), P = omp_get_num_threads();
      f(n * p / P / step * step, p + 1 == P ? n : n * (p + 1) / P / step * step);
    }
    return;
  }
#else
  (void)step;
  (void)min_part;
#endif
  f(Index(0), n);
}

// Calls f() so that an Eigen product inside it runs on one thread. Called outside a parallel
// region with more than one OpenMP thread, Eigen splits a GEMM between the threads itself,
// and the bits of its result then depend on the thread count (tests/test_threads.cpp saw it
// at in = 300, out = 130); inside a one-thread region whose thread count is set to 1, Eigen
// sees one thread.
template <class F>
void on_one_eigen_thread(F&& f) {
#if defined(MOLORA_USE_OPENMP)
  if (!omp_in_parallel() && omp_get_max_threads() > 1) {
#pragma omp parallel num_threads(1)
    {
      omp_set_num_threads(1);  // this region's own setting: Eigen reads it, the caller's is kept
      f();
    }
    return;
  }
#endif
  f();
}

// Tokens from which the skinny product reads x from a staged copy (staged_rows) rather than
// in place. From 5 tokens on every block of rows passes over 5 or more rows of x at once (the
// wide path, then 4-token blocks over chunks), and rows of x 16 bytes off a cache line
// (Eigen's alignment without -march) split their loads: cold on Zen 4 the kernel on staged
// rows took 0.75-0.93x its time on such rows at T = 8 (4096 x 4096, 1024 -> 2816, 2816 ->
// 1024; f32 and bf16), 0.87-1.02x at 16-96, and 0.94-1.02x its time on 64-byte aligned rows in place
// (docs/benchmarks.md, "The crossover to the packed GEMM"). Up to 4 tokens it made no
// difference, and the copy is skipped.
constexpr Index kStageXFrom = 5;

// Floats (or doubles) per row of a staged x: `in` rounded up to a cache line, plus one line
// when that is a multiple of 4 KiB, so that consecutive rows fall in different L1 sets (an
// ad hoc run once measured rows 16 KiB apart 1.2x slower at T = 8; the benchmark above did not
// see it, and the extra line costs nothing).
template <class Scalar>
constexpr Index staged_stride(Index in) noexcept {
  constexpr Index line = 64 / Index(sizeof(Scalar));
  const Index ld = (in + line - 1) / line * line;
  return (ld * Index(sizeof(Scalar))) % 4096 == 0 ? ld + line : ld;
}

// Rows of x [T, in] and their stride, as the skinny kernel reads them.
template <class Scalar>
struct StridedRows {
  const Scalar* data;
  Index ld;
};

// x copied into a per-thread buffer kept between calls (it grows, never shrinks: no
// allocation once warm for T <= the largest T seen), rows 64-byte aligned, staged_stride
// apart. The values are copied, so the product gives the same bits as on x in place.
template <class Scalar>
StridedRows<Scalar> staged_rows(const ConstRowRef<Scalar>& x) {
  thread_local aligned_vector<Scalar> staged;
  const Index T = x.rows(), in = x.cols(), ld = staged_stride<Scalar>(in);
  if (staged.size() < static_cast<std::size_t>(T * ld)) staged.resize(static_cast<std::size_t>(T * ld));
  for (Index t = 0; t < T; ++t) std::copy_n(x.row(t).data(), in, staged.data() + t * ld);
  return {staged.data(), ld};
}

// y = x W^T (+ bias) with W [out, in] row-major contiguous (out, in >= 1), bias null or
// [out], x [T, in] and y [T, out] row-major, T >= 1, y not aliasing x, W or bias; `how` is
// skinny, gemm or eigen (resolved). Checks nothing.
template <class Scalar, class Weight>
void base_product(const Weight* w, Index in, Index out, const Scalar* bias, const ConstRowRef<Scalar>& x,
                  RowRef<Scalar>& y, BaseStrategy how) {
  const Index T = x.rows();
  if (how == BaseStrategy::skinny) {
    // x copied once, before any thread starts
    const StridedRows<Scalar> xs = T >= kStageXFrom ? staged_rows(x) : StridedRows<Scalar>{x.data(), x.outerStride()};
    Scalar* yp = y.data();
    const Index ldy = y.outerStride();
    auto rows = [&](Index o0, Index o1) {
      kernels::skinny_product(kernels::layer_arch{}, w, in, in, xs.data, xs.ld, T, bias, yp, ldy, o0, o1);  // [T, out]
    };
    // With OpenMP one contiguous range of rows per thread (cut at multiples of 4, the
    // register block; at least 32 rows each).
    split_ranges(out, 4, 32, rows);
    return;
  }
  if (how == BaseStrategy::gemm) {
    // Each thread packs into its own scratch, kept between calls.
    thread_local std::vector<Scalar> scratch;
    const Scalar* xp = x.data();
    Scalar* yp = y.data();
    const Index ldx = x.outerStride(), ldy = y.outerStride();
    auto columns = [&](Index o0, Index o1) {
      scratch.resize(static_cast<std::size_t>(kernels::gemm_scratch_size<Scalar>()));
      kernels::gemm_product(kernels::layer_arch{}, w, in, in, xp, ldx, T, bias, yp, ldy, o0, o1,
                            scratch.data());  // [T, o1 - o0]
    };
    // With OpenMP one contiguous range of outputs per thread, cut at multiples of 64 (whole
    // register blocks for any ISA).
    split_ranges(out, 64, 64, columns);
    return;
  }
  if constexpr (std::is_same_v<Weight, Scalar>) {
    // One token: Eigen's GEMV, with OpenMP rows split between the threads at multiples of
    // 8. The GEMV takes rows in blocks of 8, then 4, 2, 1 from the first row it is given,
    // and a row's bits depend on its block; ranges cut at multiples of 8 give every row the
    // block it has in one call over all rows. About 64 rows per range (at least 56) keep
    // Eigen on its GEMV rather than its coefficient-wise product for tiny sizes.
    if (T == 1)
      split_ranges(out, 8, 64, [&](Index o0, Index o1) {
        y.middleCols(o0, o1 - o0).noalias() =
            x * Eigen::Map<const RowMatrix<Scalar>>(w + o0 * in, o1 - o0, in).transpose();  // [1, o1 - o0]
      });
    else
      y.noalias() = x * Eigen::Map<const RowMatrix<Scalar>>(w, out, in).transpose();  // [T, out]
  } else {
    // Blocks of rows widened into a scratch (by the kernels), one Eigen GEMM each. With
    // OpenMP the blocks are shared out between the threads, each widening into its own
    // scratch and running its GEMMs alone (Eigen does not split a GEMM inside a parallel
    // region): split by Eigen instead, each GEMM of 16-odd output columns costs more in
    // synchronisation than it gains. A single block (no split) runs on one Eigen thread
    // too. Every block is the same one-thread GEMM whatever the thread count, so y has the
    // same bits.
    const Index rb = widened_block_rows<Scalar>(in, out, kWidenBlockBytes);
    auto widened_blocks = [&](Index first, Index last) {  // the blocks [first, last)
      for_widened_blocks<Scalar>(w, in, out, rb, first, last, [&](Index o, Index n, const auto& rows) {
        y.middleCols(o, n).noalias() = x * rows.transpose();  // [T, n]
      });
    };
    const Index blocks = (out + rb - 1) / rb;
    if (blocks == 1)
      on_one_eigen_thread([&] { widened_blocks(0, 1); });
    else
      split_ranges(blocks, 1, 1, widened_blocks);
  }
  if (bias) y.rowwise() += Eigen::Map<const Eigen::Matrix<Scalar, 1, Eigen::Dynamic>>(bias, out);
}

// Tokens from which the bf16-dot mode's `automatic` takes kernels::gemm_product_bf16dot, with
// AVX512_BF16; below it x is rounded to bf16 and the exact skinny_product runs on it, faster
// there than skinny_product_bf16dot (docs/peers.md, "bf16-dot at few tokens"). A constant,
// whatever the thread count.
constexpr Index kBf16DotGemmFrom = 8;

// y = round_bf16(x) as floats [T, in], into a per-thread scratch kept between calls (it grows,
// never shrinks: no allocation once warm for T <= the largest T seen).
inline Eigen::Map<const RowMatrix<float>> rounded_to_bf16(const ConstRowRef<float>& x) {
  thread_local std::vector<float> rounded;  // [T, in]
  const Index T = x.rows(), in = x.cols();
  if (rounded.size() < static_cast<std::size_t>(T * in)) rounded.resize(static_cast<std::size_t>(T * in));
  for (Index t = 0; t < T; ++t)
    for (Index i = 0; i < in; ++i) rounded[static_cast<std::size_t>(t * in + i)] = to_float(to_bf16(x(t, i)));
  return Eigen::Map<const RowMatrix<float>>(rounded.data(), T, in);  // [T, in]
}

// The opt-in bf16-dot product of a bf16 weight (Linear::set_bf16_dot,
// MoLoRALinear::set_bf16_dot): y = round_bf16(x) W^T (+ bias), products of the rounded x and W
// summed in float. `strategy` is the layer's own, unresolved; with
// kernels::bf16_dot_available() it names the kernel:
//   gemm       kernels::gemm_product_bf16dot (outputs split between OpenMP threads at
//              multiples of 64, as base_product's gemm)
//   skinny     kernels::skinny_product_bf16dot (rows split at multiples of 4)
//   eigen      x rounded into a scratch, then base_product's eigen on it
//   automatic  gemm from kBf16DotGemmFrom tokens on; below, x rounded into a scratch, then
//              base_product's skinny (the exact kernel, f32 FMAs on widened weights) on it
// Without AVX512_BF16 every strategy rounds x into the scratch and runs base_product with
// the strategy `automatic` (or the one set) resolves to. None of the splits changes a bit. Every
// path gives round_bf16(x) W^T up to float summation error: the rounded x times a bf16 weight
// is exact in float whichever kernel forms it. No allocation in a warm call but Eigen's own in
// its path. Same requirements as base_product.
inline void base_product_bf16dot(const bf16* w, Index in, Index out, const float* bias, const ConstRowRef<float>& x,
                                 RowRef<float>& y, BaseStrategy strategy) {
  const Index T = x.rows();
  const float* xp = x.data();
  float* yp = y.data();
  const Index ldx = x.outerStride(), ldy = y.outerStride();
  const bool dot = kernels::bf16_dot_available();
  if (dot && (strategy == BaseStrategy::gemm || (strategy == BaseStrategy::automatic && T >= kBf16DotGemmFrom))) {
    thread_local std::vector<float> scratch;  // per thread, kept between calls
    auto columns = [&](Index o0, Index o1) {
      scratch.resize(static_cast<std::size_t>(kernels::gemm_scratch_size<float>()));
      kernels::gemm_product_bf16dot(kernels::layer_arch{}, w, in, in, xp, ldx, T, bias, yp, ldy, o0, o1,
                                    scratch.data());  // [T, o1 - o0]
    };
    split_ranges(out, 64, 64, columns);
    return;
  }
  if (dot && strategy == BaseStrategy::skinny) {
    auto rows = [&](Index o0, Index o1) {
      kernels::skinny_product_bf16dot(kernels::layer_arch{}, w, in, in, xp, ldx, T, bias, yp, ldy, o0,
                                      o1);  // [T, o1 - o0]
    };
    // Each output is one row's dot products whatever the range.
    split_ranges(out, 4, 32, rows);
    return;
  }
  // The rounded x through the exact product; `automatic` below kBf16DotGemmFrom resolves to
  // skinny (16-bit weights take the skinny kernel from one token on).
  const auto xb = rounded_to_bf16(x);  // [T, in]
  base_product(w, in, out, bias, ConstRowRef<float>(xb), y, resolve_base_strategy<float, bf16>(strategy, T, in));
}

}  // namespace detail
}  // namespace molora
