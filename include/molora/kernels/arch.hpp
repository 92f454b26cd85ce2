// The instruction set the kernels are compiled for. Like Eigen, molora's header-only core
// follows the user's compiler flags: xsimd::default_arch is the best ISA that -m/-march
// enables (SSE4.2, AVX2+FMA, AVX-512, NEON...). Defining MOLORA_NO_XSIMD, or compiling for
// a target xsimd does not know, selects the plain scalar kernels instead. This header and
// its siblings in kernels/ are the only code that includes xsimd.
#pragma once

#include <type_traits>

#if !defined(MOLORA_NO_XSIMD)
#include <xsimd/xsimd.hpp>
#endif

namespace molora::kernels {

// Tag of the portable scalar kernels (no xsimd).
struct scalar_arch {
  static constexpr const char* name() noexcept { return "scalar"; }
};

#if defined(MOLORA_NO_XSIMD)
using default_arch = scalar_arch;
#else
using default_arch = std::conditional_t<std::is_same_v<xsimd::default_arch, xsimd::unavailable>, scalar_arch,
                                        xsimd::default_arch>;
#endif

// Lanes of one register of Scalar on Arch (1 for the scalar kernels).
template <class Arch, class Scalar>
constexpr long simd_width() noexcept {
#if defined(MOLORA_NO_XSIMD)
  return 1;
#else
  if constexpr (std::is_same_v<Arch, scalar_arch>)
    return 1;
  else
    return static_cast<long>(xsimd::batch<Scalar, Arch>::size);
#endif
}

// Name of the ISA the kernels were compiled for ("avx512bw", "fma3+avx2", "sse4.2", "scalar").
inline const char* arch_name() noexcept { return default_arch::name(); }

}  // namespace molora::kernels
