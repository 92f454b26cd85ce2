// The kernels for AVX2 with FMA (and F16C, for f16 weights), compiled with -mavx2 -mfma -mf16c only.
#include "isa_tables.hpp"

using Arch = xsimd::fma3<xsimd::avx2>;
static_assert(molora::kernels::detail::flags_select<Arch>(), "isa_avx2.cpp needs -mavx2 -mfma");

namespace {
constexpr auto f32 = molora::kernels::detail::make_kernel_table<Arch, float>();
constexpr auto f64 = molora::kernels::detail::make_kernel_table<Arch, double>();
}  // namespace

extern const molora::kernels::IsaKernels molora_kernels_isa_avx2;
const molora::kernels::IsaKernels molora_kernels_isa_avx2{"avx2", &f32, &f64};
