// Shared by the per-ISA objects of molora::kernels. Each src/isa_*.cpp is compiled with its
// ISA's flags, fills the float and double tables of its Arch (in an unnamed namespace: a
// static member of a class template would be a GNU "unique" symbol, which objcopy does not
// localise) and defines one IsaKernels named molora_kernels_isa_<id>, the only symbol its
// object exports once the build has localised the rest (CMakeLists.txt, "molora::kernels").
#pragma once

#include <type_traits>

#include <molora/kernels/dispatched.hpp>

namespace molora::kernels::detail {

// True when this file's compiler flags make Arch the compile-time ISA, i.e. when its kernels
// are the ones a host compiled for that ISA (-march) would run, bit for bit.
template <class Arch>
constexpr bool flags_select() noexcept {
  return std::is_same_v<default_arch, Arch>;
}

}  // namespace molora::kernels::detail
