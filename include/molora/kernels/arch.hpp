// The instruction set the kernels run with. Two modes (docs/design-notes.md, "Kernels' ISA
// chosen at run time"):
//  - run-time dispatch, when the program links the compiled library molora::kernels (which
//    defines MOLORA_DISPATCH for its users): the layers call the kernels through a table of
//    function pointers filled once per ISA (AVX-512, AVX2+FMA, SSE4.2, scalar) by objects
//    compiled with that ISA's flags, and the best one the CPU has is chosen at run time,
//    whatever -march the host compiled with. The tag for these calls is dispatched_arch.
//  - compile-time ISA (header-only use, or MOLORA_PIN_ISA defined): like Eigen, the kernels
//    follow the user's compiler flags: xsimd::default_arch is the best ISA that -m/-march
//    enables. Defining MOLORA_NO_XSIMD, or compiling for a target xsimd does not know,
//    selects the plain scalar kernels.
// layer_arch is the tag the layers pass to the kernels: dispatched_arch or default_arch.
// This header and its siblings in kernels/ are the only code that includes xsimd.
#pragma once

#include <type_traits>

#if !defined(MOLORA_NO_XSIMD)
#include <xsimd/xsimd.hpp>
#endif

#if defined(MOLORA_DISPATCH) && !defined(MOLORA_PIN_ISA) && !defined(MOLORA_NO_XSIMD)
#define MOLORA_RUNTIME_DISPATCH 1
#else
#define MOLORA_RUNTIME_DISPATCH 0
#endif

namespace molora::kernels {

// Tag of the portable scalar kernels (no xsimd).
struct scalar_arch {
  static constexpr const char* name() noexcept { return "scalar"; }
};

// Tag of a call through the run-time table (kernels/dispatched.hpp); it has no registers.
struct dispatched_arch {
  static constexpr const char* name() noexcept { return "dispatched"; }
};

#if defined(MOLORA_NO_XSIMD)
using default_arch = scalar_arch;
#else
using default_arch = std::conditional_t<std::is_same_v<xsimd::default_arch, xsimd::unavailable>, scalar_arch,
                                        xsimd::default_arch>;
#endif

#if MOLORA_RUNTIME_DISPATCH
using layer_arch = dispatched_arch;
#else
using layer_arch = default_arch;
#endif

// Bytes of the widest vector register any dispatched ISA uses (AVX-512).
constexpr long kMaxVectorBytes = 64;

// Lanes of one register of Scalar on Arch (1 for the scalar kernels). For dispatched_arch,
// the widest ISA's: scratch sized with it fits whichever ISA runs.
template <class Arch, class Scalar>
constexpr long simd_width() noexcept {
  if constexpr (std::is_same_v<Arch, scalar_arch>)
    return 1;
  else if constexpr (std::is_same_v<Arch, dispatched_arch>)
    return kMaxVectorBytes / static_cast<long>(sizeof(Scalar));
#if !defined(MOLORA_NO_XSIMD)
  else
    return static_cast<long>(xsimd::batch<Scalar, Arch>::size);
#else
  else
    return 1;
#endif
}

// The four ISAs the library dispatches between, and `other` for any further xsimd ISA a
// compile-time build may target ("avx", "sse2", "neon64"...).
enum class IsaLevel { scalar, sse42, avx2, avx512, other };

// Which of them a compile-time ISA is: avx512 (F+BW+DQ), avx2 (with FMA), sse4.2, scalar.
template <class Arch>
constexpr IsaLevel isa_level() noexcept {
#if !defined(MOLORA_NO_XSIMD) && (defined(__x86_64__) || defined(_M_X64) || defined(__i386__))
  if constexpr (std::is_base_of_v<xsimd::avx512bw, Arch>)
    return IsaLevel::avx512;
  else if constexpr (std::is_base_of_v<xsimd::fma3<xsimd::avx2>, Arch>)
    return IsaLevel::avx2;
  else if constexpr (std::is_same_v<xsimd::sse4_2, Arch>)
    return IsaLevel::sse42;
#endif
  if constexpr (std::is_same_v<Arch, scalar_arch>)
    return IsaLevel::scalar;
  else
    return IsaLevel::other;
}

// Readable name of a compile-time ISA: "avx512", "avx2", "sse4.2", "scalar", else xsimd's own
// name.
template <class Arch>
constexpr const char* isa_name() noexcept {
  switch (isa_level<Arch>()) {
    case IsaLevel::avx512: return "avx512";
    case IsaLevel::avx2: return "avx2";
    case IsaLevel::sse42: return "sse4.2";
    default: return Arch::name();
  }
}

}  // namespace molora::kernels
