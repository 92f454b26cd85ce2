// The kernels for SSE4.2, compiled with -msse4.2 only.
#include "isa_tables.hpp"

using Arch = xsimd::sse4_2;
static_assert(molora::kernels::detail::flags_select<Arch>(), "isa_sse42.cpp needs -msse4.2");

namespace {
constexpr auto f32 = molora::kernels::detail::make_kernel_table<Arch, float>();
constexpr auto f64 = molora::kernels::detail::make_kernel_table<Arch, double>();
}  // namespace

extern const molora::kernels::IsaKernels molora_kernels_isa_sse42;
const molora::kernels::IsaKernels molora_kernels_isa_sse42{"sse4.2", &f32, &f64};
