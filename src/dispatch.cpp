// The selector of molora::kernels: which ISA's table the dispatched kernels call. Compiled
// without ISA flags; the per-ISA objects (isa_*.cpp) each export one table.
#include <cpuid.h>

#include <cstdio>
#include <cstdlib>
#include <string>

#include <molora/kernels/dispatched.hpp>

// The ISA objects this build holds (CMake's MOLORA_KERNEL_ISAS defines MOLORA_KERNELS_HAVE_*;
// scalar is always there).
#if MOLORA_KERNELS_HAVE_AVX512
extern const molora::kernels::IsaKernels molora_kernels_isa_avx512;
#endif
#if MOLORA_KERNELS_HAVE_AVX2
extern const molora::kernels::IsaKernels molora_kernels_isa_avx2;
#endif
#if MOLORA_KERNELS_HAVE_SSE42
extern const molora::kernels::IsaKernels molora_kernels_isa_sse42;
#endif
extern const molora::kernels::IsaKernels molora_kernels_isa_scalar;

namespace molora::kernels::detail {

std::atomic<const IsaKernels*> active_isa_kernels{nullptr};

namespace {

using ::molora::detail::cat;

// F16C from CPUID leaf 1 (ECX bit 29): clang 14's __builtin_cpu_supports does not know the
// name. Its registers are AVX's, whose OS support the AVX2 check below already requires.
bool cpu_has_f16c() {
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  return __get_cpuid(1, &eax, &ebx, &ecx, &edx) != 0 && (ecx & bit_F16C) != 0;
}

// Whether the CPU (and the OS, for the AVX and AVX-512 register state, which the compiler's
// CPU check includes) can run an ISA's object: exactly the flags that object is built with.
bool cpu_has(const IsaKernels& k) {
  __builtin_cpu_init();
  const std::string name = k.name;
  if (name == "avx512")
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") &&
           __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && cpu_has_f16c();
  if (name == "avx2") return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && cpu_has_f16c();
  if (name == "sse4.2") return __builtin_cpu_supports("sse4.2");
  return true;
}

// Every ISA this build holds, best first.
const IsaKernels* const all_isas[] = {
#if MOLORA_KERNELS_HAVE_AVX512
    &molora_kernels_isa_avx512,
#endif
#if MOLORA_KERNELS_HAVE_AVX2
    &molora_kernels_isa_avx2,
#endif
#if MOLORA_KERNELS_HAVE_SSE42
    &molora_kernels_isa_sse42,
#endif
    &molora_kernels_isa_scalar};

// The names of the ISAs this build holds, best first, for messages.
std::string built_isa_list() {
  std::string s;
  for (const IsaKernels* k : all_isas) s += (s.empty() ? "" : ", ") + std::string(k->name);
  return s;
}

// The names of the ISAs this CPU has, best first, null-ended (filled once).
struct CpuIsas {
  const char* names[5] = {};
  CpuIsas() {
    int n = 0;
    for (const IsaKernels* k : all_isas)
      if (cpu_has(*k)) names[n++] = k->name;
  }
};
const CpuIsas& cpu_isas() {
  static const CpuIsas isas;
  return isas;
}

std::string cpu_isa_list() {
  std::string s;
  for (const char* const* p = cpu_isas().names; *p; ++p) s += (s.empty() ? "" : ", ") + std::string(*p);
  return s;
}

// The ISA called `name`; config_error if there is none or this CPU lacks it.
const IsaKernels& find_isa(const std::string& name, const char* what) {
  for (const IsaKernels* k : all_isas)
    if (name == k->name) {
      if (!cpu_has(*k))
        throw config_error(::molora::detail::mismatch(cat(what, " (an ISA this CPU has)"), cpu_isa_list(), name));
      return *k;
    }
  for (const char* known : {"avx512", "avx2", "sse4.2"})
    if (name == known)
      throw config_error(::molora::detail::mismatch(cat(what, " (an ISA this build of molora::kernels holds)"),
                                                    built_isa_list(), name));
  throw config_error(
      ::molora::detail::mismatch(cat(what, " (an ISA molora knows)"), "avx512, avx2, sse4.2 or scalar", name));
}

// MOLORA_ISA if set, else the best ISA this CPU has.
const IsaKernels& initial_isa() {
  if (const char* env = std::getenv("MOLORA_ISA"); env && *env) return find_isa(env, "environment variable MOLORA_ISA");
  for (const IsaKernels* k : all_isas)
    if (cpu_has(*k)) return *k;
  return molora_kernels_isa_scalar;
}

}  // namespace

const IsaKernels& choose_isa() {
  if (const IsaKernels* k = active_isa_kernels.load(std::memory_order_acquire)) return *k;
  const IsaKernels* chosen = &initial_isa();
  const IsaKernels* expected = nullptr;
  // A racing thread may have chosen first (the same ISA, or one forced): keep its choice.
  if (!active_isa_kernels.compare_exchange_strong(expected, chosen, std::memory_order_acq_rel)) return *expected;
  return *chosen;
}

const IsaKernels& choose_isa_or_abort() noexcept {
  try {
    return choose_isa();
  } catch (const std::exception& e) {
    std::fprintf(stderr, "molora: cannot choose the kernels' ISA: %s\n", e.what());
    std::abort();
  }
}

bool dispatch_cpu_has_bf16_dot() noexcept {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512bf16");
}

const char* const* dispatch_isa_names() noexcept { return cpu_isas().names; }

void dispatch_force_isa(const std::string& name) {
  active_isa_kernels.store(&find_isa(name, "molora::kernels::force_isa: ISA"), std::memory_order_release);
}

}  // namespace molora::kernels::detail
