// Portable random draws from a caller-seeded generator. The standard distributions are
// implementation-defined, so the same seed would give different weights with libstdc++ and
// libc++; these helpers give the same numbers everywhere for a 64-bit generator such as
// molora::Generator (std::mt19937_64).
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>
#include <random>

namespace molora {

using Generator = std::mt19937_64;

namespace detail {

template <class URBG>
std::uint64_t bits64(URBG& gen) {
  static_assert(URBG::min() == 0 && URBG::max() == std::numeric_limits<std::uint64_t>::max(),
                "molora needs a generator with 64 random bits per call, e.g. std::mt19937_64");
  return static_cast<std::uint64_t>(gen());
}

// Uniform in [0, 1) with 53 random bits.
template <class URBG>
double uniform01(URBG& gen) {
  return static_cast<double>(bits64(gen) >> 11) * 0x1.0p-53;
}

// Uniform in [lo, hi).
template <class URBG>
double uniform(URBG& gen, double lo, double hi) {
  return lo + (hi - lo) * uniform01(gen);
}

// Standard normal by Box-Muller (one value per call; simplicity over speed).
template <class URBG>
double normal01(URBG& gen) {
  const double u1 = 1.0 - uniform01(gen);  // (0, 1]
  const double u2 = uniform01(gen);
  return std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586476925 * u2);
}

}  // namespace detail
}  // namespace molora
