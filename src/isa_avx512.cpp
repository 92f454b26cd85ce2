// The kernels for AVX-512 F+BW+DQ+VL (with AVX2, FMA and F16C), compiled with those flags only.
#include "isa_tables.hpp"

using Arch = xsimd::avx512bw;
static_assert(molora::kernels::detail::flags_select<Arch>(), "isa_avx512.cpp needs -mavx512f -mavx512bw ...");

namespace {
constexpr auto f32 = molora::kernels::detail::make_kernel_table<Arch, float>();
constexpr auto f64 = molora::kernels::detail::make_kernel_table<Arch, double>();
}  // namespace

extern const molora::kernels::IsaKernels molora_kernels_isa_avx512;
const molora::kernels::IsaKernels molora_kernels_isa_avx512{"avx512", &f32, &f64};
