// What the layer benchmarks share: the clock they time with, the median they report, and a
// fast deterministic fill (setRandom is slow for the 16 M entries of a 4096 x 4096 weight).
#pragma once

#include <algorithm>
#include <cstdint>
#include <ctime>
#include <vector>

#include <Eigen/Core>

namespace bench_util {

// With OpenMP (MOLORA_OPENMP=ON) the process's CPU time adds up the threads: wall time
// instead, so that 1 and 2 threads can be compared (alternate runs on a shared machine).
inline double cpu_seconds() {
  timespec ts{};
#if defined(MOLORA_USE_OPENMP)
  clock_gettime(CLOCK_MONOTONIC, &ts);
#else
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
#endif
  return double(ts.tv_sec) + 1e-9 * double(ts.tv_nsec);
}

inline double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0.0 : (v[(v.size() - 1) / 2] + v[v.size() / 2]) / 2;
}

// Deterministic values in [-scale, scale] (an LCG), in the matrix's storage order.
template <class Derived>
void fill(Eigen::MatrixBase<Derived>& m, std::uint64_t seed, double scale) {
  using S = typename Derived::Scalar;
  std::uint64_t s = seed * 0x9E3779B97F4A7C15ULL + 1;
  const Eigen::Index outer = Derived::IsRowMajor ? m.rows() : m.cols();
  const Eigen::Index inner = Derived::IsRowMajor ? m.cols() : m.rows();
  for (Eigen::Index o = 0; o < outer; ++o)
    for (Eigen::Index i = 0; i < inner; ++i) {
      s = s * 6364136223846793005ULL + 1442695040888963407ULL;
      const S v = static_cast<S>(scale * (double(static_cast<std::uint32_t>(s >> 40)) / 8388608.0 - 1.0));
      if (Derived::IsRowMajor)
        m(o, i) = v;
      else
        m(i, o) = v;
    }
}

}  // namespace bench_util
