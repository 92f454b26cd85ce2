// The plain scalar kernels (no xsimd), compiled without ISA flags: any x86-64 CPU runs them.
#include "isa_tables.hpp"

using Arch = molora::kernels::scalar_arch;

namespace {
constexpr auto f32 = molora::kernels::detail::make_kernel_table<Arch, float>();
constexpr auto f64 = molora::kernels::detail::make_kernel_table<Arch, double>();
}  // namespace

extern const molora::kernels::IsaKernels molora_kernels_isa_scalar;
const molora::kernels::IsaKernels molora_kernels_isa_scalar{"scalar", &f32, &f64};
