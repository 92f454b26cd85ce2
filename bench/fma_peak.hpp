// The FMA peak of one core (or of `threads` cores at once), for benchmarks that report a
// kernel's GFLOP/s beside it: a register-only loop of independent FMAs at the widest ISA the
// kernels dispatch to, measured in the same process as the kernel it is compared with.
#pragma once

#include <algorithm>
#include <chrono>
#include <string>

#include <benchmark/benchmark.h>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define MOLORA_BENCH_X86 1
#endif

#ifdef MOLORA_USE_OPENMP
#include <omp.h>
#endif

#include <molora/kernels/dispatched.hpp>

namespace bench_peak {

using molora::Index;

// A register-only loop of independent FMAs (16 accumulators, more than latency x throughput
// on current x86 cores), at the widest ISA the kernels dispatch to; returns the FLOP it did
// (2 per lane per FMA). Nothing touches memory, so this is the arithmetic ceiling a GEMM
// could reach on one core.
constexpr int kChains = 16;

#ifdef MOLORA_BENCH_X86
__attribute__((target("avx512f"))) inline double fma_loop_avx512(long iters, float seed) {
  __m512 acc[kChains];
  for (int i = 0; i < kChains; ++i) acc[i] = _mm512_set1_ps(seed + static_cast<float>(i));
  const __m512 a = _mm512_set1_ps(0.999999f), b = _mm512_set1_ps(1e-7f);
  for (long n = 0; n < iters; ++n)
    for (int i = 0; i < kChains; ++i) acc[i] = _mm512_fmadd_ps(acc[i], a, b);
  for (int i = 1; i < kChains; ++i) acc[0] = _mm512_add_ps(acc[0], acc[i]);
  benchmark::DoNotOptimize(acc[0]);
  return 2.0 * 16 * kChains * static_cast<double>(iters);
}
__attribute__((target("avx2,fma"))) inline double fma_loop_avx2(long iters, float seed) {
  __m256 acc[kChains];
  for (int i = 0; i < kChains; ++i) acc[i] = _mm256_set1_ps(seed + static_cast<float>(i));
  const __m256 a = _mm256_set1_ps(0.999999f), b = _mm256_set1_ps(1e-7f);
  for (long n = 0; n < iters; ++n)
    for (int i = 0; i < kChains; ++i) acc[i] = _mm256_fmadd_ps(acc[i], a, b);
  for (int i = 1; i < kChains; ++i) acc[0] = _mm256_add_ps(acc[0], acc[i]);
  benchmark::DoNotOptimize(acc[0]);
  return 2.0 * 8 * kChains * static_cast<double>(iters);
}
#endif

// Scalar multiply-adds, the ceiling when the kernels run sse4.2 or scalar code (a machine
// without AVX2 and FMA, or MOLORA_ISA set so).
inline double fma_loop_scalar(long iters, float seed) {
  float acc[kChains];
  for (int i = 0; i < kChains; ++i) acc[i] = seed + static_cast<float>(i);
  for (long n = 0; n < iters; ++n)
    for (int i = 0; i < kChains; ++i) acc[i] = acc[i] * 0.999999f + 1e-7f;
  float sum = 0;
  for (float v : acc) sum += v;
  benchmark::DoNotOptimize(sum);
  return 2.0 * kChains * static_cast<double>(iters);
}

inline double fma_loop(const std::string& isa, long iters, float seed) {
#ifdef MOLORA_BENCH_X86
  if (isa == "avx512") return fma_loop_avx512(iters, seed);
  if (isa == "avx2") return fma_loop_avx2(iters, seed);
#endif
  (void)isa;
  return fma_loop_scalar(iters, seed);
}

// FLOP of one call of fma_loop per thread on `threads` threads, all running at once.
inline double fma_loop_threads(const std::string& isa, long iters, Index threads) {
  double flop = 0;
#ifdef MOLORA_USE_OPENMP
#pragma omp parallel num_threads(static_cast<int>(threads)) reduction(+ : flop)
  flop += fma_loop(isa, iters, static_cast<float>(omp_get_thread_num()));
#else
  (void)threads;
  flop = fma_loop(isa, iters, 0.0f);
#endif
  return flop;
}

// The peak GFLOP/s (wall time) of `threads` threads: the best of 5 runs of about 40 ms each.
inline double measure_fma_peak(Index threads) {
  const std::string isa = molora::kernels::active_isa();
  const long iters = 1L << 20;
  double best = 0;
  for (int rep = 0; rep < 5; ++rep) {
    const auto t0 = std::chrono::steady_clock::now();
    const double flop = fma_loop_threads(isa, iters, threads);
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    best = std::max(best, flop / s / 1e9);
  }
  return best;
}

}  // namespace bench_peak
