// The kernels called through a table chosen at run time (docs/design-notes.md, "Kernels' ISA
// chosen at run time"). MOLORA_DISPATCHED_KERNELS is the one list of the kernels the table
// holds: from it come the table's members, the per-ISA instantiation that fills a table
// (compiled once per ISA in src/), and the overloads for the tag dispatched_arch that the
// layers call (one indirect call per kernel call). Adding a kernel to the dispatch is one
// line in that list. Also here: active_isa(), force_isa(), available_isas().
//
// dispatch_kernels.hpp and backward_kernels.hpp include this header at their end, so the
// dispatched overloads are declared before the layers' templates that call them, whichever
// the layers include first. (Not lora_kernels.hpp: both include it before their own
// declarations, which this header needs.)
#pragma once

#include <atomic>
#include <string>
#include <vector>

#include "../errors.hpp"
#include "arch.hpp"
#include "backward_kernels.hpp"
#include "base_kernels.hpp"
#include "dispatch_kernels.hpp"
#include "gemm_kernels.hpp"
#include "lora_kernels.hpp"

// X(name, (parameters after the Arch tag), (arguments)) for every dispatched kernel; S is
// the scalar type. (fused's `tile` and `keep` have no defaults here.)
#define MOLORA_DISPATCHED_KERNELS(X, S)                                                                          \
  X(shrink, (const S* a, Index lda, Index r, Index in, const S* const* x, Index n, S* h, Index ldh, S* spill),    \
    (a, lda, r, in, x, n, h, ldh, spill))                                                                        \
  X(expand,                                                                                                      \
    (const S* bt, Index ldb, Index r, Index out, const S* const* h, const S* scale, Index n, S* const* y),       \
    (bt, ldb, r, out, h, scale, n, y))                                                                           \
  X(fused,                                                                                                       \
    (const S* a, Index lda, const S* bt, Index ldb, Index r, Index in, Index out, const S* const* x,             \
     S* const* y, const S* scale, Index n, S* scratch, Index tile, S* keep),                                     \
    (a, lda, bt, ldb, r, in, out, x, y, scale, n, scratch, tile, keep))                                          \
  X(fused_tokens,                                                                                                \
    (const ExpertStack<S>& w, const PairGroups<S>& g, const S* x, Index ldx, S* y, Index ldy, Index t_begin,     \
     Index t_end, S* scratch, S* hidden),                                                                        \
    (w, g, x, ldx, y, ldy, t_begin, t_end, scratch, hidden))                                                     \
  X(sparse_expand_tokens,                                                                                        \
    (const ExpertStack<S>& w, const PairGroups<S>& g, const S* h, Index ldh, S* y, Index ldy, Index t_begin,     \
     Index t_end),                                                                                               \
    (w, g, h, ldh, y, ldy, t_begin, t_end))                                                                      \
  X(dense_rows,                                                                                                  \
    (const S* w, Index ldw, Index rows, Index in, const S* x, Index ldx, S* out, Index ldo, Index t_begin,       \
     Index t_end, S* scratch),                                                                                   \
    (w, ldw, rows, in, x, ldx, out, ldo, t_begin, t_end, scratch))                                               \
  X(grad_out,                                                                                                    \
    (const S* bt, Index ldb, S* dbt, Index lddb, Index r, Index out, const S* const* dy, const S* hs, Index ldh,  \
     Index n, S* u, Index ldu, S* spill),                                                                        \
    (bt, ldb, dbt, lddb, r, out, dy, hs, ldh, n, u, ldu, spill))                                                 \
  X(grad_in, (const GradInTerm<S>* terms, Index num_terms, Index in, S* scratch), (terms, num_terms, in, scratch)) \
  X(skinny_product,                                                                                              \
    (const S* w, Index ldw, Index in, const S* x, Index ldx, Index T, const S* bias, S* y, Index ldy, Index o0,   \
     Index o1),                                                                                                  \
    (w, ldw, in, x, ldx, T, bias, y, ldy, o0, o1))                                                              \
  X(skinny_product_bf16,                                                                                         \
    (const bf16* w, Index ldw, Index in, const S* x, Index ldx, Index T, const S* bias, S* y, Index ldy,          \
     Index o0, Index o1),                                                                                        \
    (w, ldw, in, x, ldx, T, bias, y, ldy, o0, o1))                                                              \
  X(skinny_product_f16,                                                                                          \
    (const f16* w, Index ldw, Index in, const S* x, Index ldx, Index T, const S* bias, S* y, Index ldy,           \
     Index o0, Index o1),                                                                                        \
    (w, ldw, in, x, ldx, T, bias, y, ldy, o0, o1))                                                              \
  X(skinny_product_bf16dot,                                                                                      \
    (const bf16* w, Index ldw, Index in, const S* x, Index ldx, Index T, const S* bias, S* y, Index ldy,          \
     Index o0, Index o1),                                                                                        \
    (w, ldw, in, x, ldx, T, bias, y, ldy, o0, o1))                                                              \
  X(shrink_bf16,                                                                                                 \
    (const bf16* a, Index lda, Index r, Index in, const S* const* x, Index n, S* h, Index ldh, S* spill),         \
    (a, lda, r, in, x, n, h, ldh, spill))                                                                        \
  X(shrink_f16,                                                                                                  \
    (const f16* a, Index lda, Index r, Index in, const S* const* x, Index n, S* h, Index ldh, S* spill),          \
    (a, lda, r, in, x, n, h, ldh, spill))                                                                        \
  X(expand_bf16,                                                                                                 \
    (const bf16* bt, Index ldb, Index r, Index out, const S* const* h, const S* scale, Index n, S* const* y),     \
    (bt, ldb, r, out, h, scale, n, y))                                                                           \
  X(expand_f16,                                                                                                  \
    (const f16* bt, Index ldb, Index r, Index out, const S* const* h, const S* scale, Index n, S* const* y),      \
    (bt, ldb, r, out, h, scale, n, y))                                                                           \
  X(fused_tokens_bf16,                                                                                           \
    (const ExpertStack<S, bf16>& w, const PairGroups<S>& g, const S* x, Index ldx, S* y, Index ldy,              \
     Index t_begin, Index t_end, S* scratch, S* hidden),                                                         \
    (w, g, x, ldx, y, ldy, t_begin, t_end, scratch, hidden))                                                     \
  X(fused_tokens_f16,                                                                                            \
    (const ExpertStack<S, f16>& w, const PairGroups<S>& g, const S* x, Index ldx, S* y, Index ldy,               \
     Index t_begin, Index t_end, S* scratch, S* hidden),                                                         \
    (w, g, x, ldx, y, ldy, t_begin, t_end, scratch, hidden))                                                     \
  X(widen_bf16, (const bf16* src, Index n, S* dst), (src, n, dst))                                               \
  X(widen_f16, (const f16* src, Index n, S* dst), (src, n, dst))                                                 \
  X(gemm_product,                                                                                                \
    (const S* w, Index ldw, Index in, const S* x, Index ldx, Index T, const S* bias, S* y, Index ldy, Index o0,   \
     Index o1, S* scratch),                                                                                      \
    (w, ldw, in, x, ldx, T, bias, y, ldy, o0, o1, scratch))                                                      \
  X(gemm_product_bf16,                                                                                           \
    (const bf16* w, Index ldw, Index in, const S* x, Index ldx, Index T, const S* bias, S* y, Index ldy,          \
     Index o0, Index o1, S* scratch),                                                                            \
    (w, ldw, in, x, ldx, T, bias, y, ldy, o0, o1, scratch))                                                      \
  X(gemm_product_f16,                                                                                            \
    (const f16* w, Index ldw, Index in, const S* x, Index ldx, Index T, const S* bias, S* y, Index ldy,           \
     Index o0, Index o1, S* scratch),                                                                            \
    (w, ldw, in, x, ldx, T, bias, y, ldy, o0, o1, scratch))                                                      \
  X(gemm_product_bf16dot,                                                                                        \
    (const bf16* w, Index ldw, Index in, const S* x, Index ldx, Index T, const S* bias, S* y, Index ldy,          \
     Index o0, Index o1, S* scratch),                                                                            \
    (w, ldw, in, x, ldx, T, bias, y, ldy, o0, o1, scratch))

#define MOLORA_DISPATCH_UNPAREN(...) __VA_ARGS__

namespace molora::kernels {

// One ISA's kernels for one Scalar, and the sizes that depend on its vector width.
template <class Scalar>
struct KernelTable {
  Index simd_width;
  Index grad_out_chunk;
  Index grad_in_chunk;
  Index (*shrink_chunk)(Index rank) noexcept;
  Index skinny_crossover;       // skinny_crossover_on<Arch, Scalar>() (base_kernels.hpp)
  Index skinny_crossover_bf16;  // the same for bf16 weights
  Index skinny_crossover_f16;   // and for f16 weights
#define MOLORA_TABLE_MEMBER(name, params, args) void (*name) params noexcept;
  MOLORA_DISPATCHED_KERNELS(MOLORA_TABLE_MEMBER, Scalar)
#undef MOLORA_TABLE_MEMBER
};

// One ISA's tables: what the library's selector switches between.
struct IsaKernels {
  const char* name;
  const KernelTable<float>* f32;
  const KernelTable<double>* f64;
};

namespace detail {

// Entry points with the Arch tag bound, for the table of Arch.
template <class Arch, class S>
struct KernelThunks {
#define MOLORA_TABLE_THUNK(name, params, args) \
  static void name params noexcept { kernels::name(Arch{}, MOLORA_DISPATCH_UNPAREN args); }
  MOLORA_DISPATCHED_KERNELS(MOLORA_TABLE_THUNK, S)
#undef MOLORA_TABLE_THUNK
  static Index shrink_chunk(Index rank) noexcept { return kernels::shrink_chunk<Arch, S>(rank); }
};

// The table of Arch's kernels for S. Instantiated only by the per-ISA objects of the
// library (src/), each compiled with its ISA's flags.
template <class Arch, class S>
constexpr KernelTable<S> make_kernel_table() noexcept {
  KernelTable<S> t{};
  t.simd_width = simd_width<Arch, S>();
  t.grad_out_chunk = grad_out_chunk<Arch, S>();
  t.grad_in_chunk = grad_in_chunk<Arch, S>();
  t.shrink_chunk = &KernelThunks<Arch, S>::shrink_chunk;
  t.skinny_crossover = skinny_crossover_on<Arch, S, S>();
  t.skinny_crossover_bf16 = skinny_crossover_on<Arch, S, bf16>();
  t.skinny_crossover_f16 = skinny_crossover_on<Arch, S, f16>();
#define MOLORA_TABLE_FILL(name, params, args) t.name = &KernelThunks<Arch, S>::name;
  MOLORA_DISPATCHED_KERNELS(MOLORA_TABLE_FILL, S)
#undef MOLORA_TABLE_FILL
  return t;
}

#if MOLORA_RUNTIME_DISPATCH
// Whether the CPU has AVX512_BF16 (src/dispatch.cpp).
bool dispatch_cpu_has_bf16_dot() noexcept;
// Defined in the library (src/dispatch.cpp). The active ISA, null until first chosen.
extern std::atomic<const IsaKernels*> active_isa_kernels;
// Chooses the ISA (MOLORA_ISA if set, else the best the CPU has) if none is yet. Throws
// config_error for a MOLORA_ISA naming an unknown ISA or one the CPU lacks.
const IsaKernels& choose_isa();
// The same for the kernels' noexcept path: prints the error and aborts.
const IsaKernels& choose_isa_or_abort() noexcept;
const char* const* dispatch_isa_names() noexcept;  // this CPU's ISAs, best first, null-ended
void dispatch_force_isa(const std::string& name);

inline const IsaKernels& current_isa() noexcept {
  const IsaKernels* k = active_isa_kernels.load(std::memory_order_acquire);
  return k ? *k : choose_isa_or_abort();
}
#endif

}  // namespace detail

// The table of the kernels that run for Scalar: the active ISA's with run-time dispatch,
// else the compile-time ISA's (for tests and measurement: the layers call the overloads).
template <class Scalar>
const KernelTable<Scalar>& active_kernels() noexcept {
#if MOLORA_RUNTIME_DISPATCH
  if constexpr (std::is_same_v<Scalar, float>)
    return *detail::current_isa().f32;
  else
    return *detail::current_isa().f64;
#else
  static constexpr KernelTable<Scalar> table = detail::make_kernel_table<default_arch, Scalar>();
  return table;
#endif
}

// Tokens from which the layers' base product for Scalar activations and Weight weights is a
// GEMM rather than skinny_product, on the ISA that runs (skinny_crossover_on, base_kernels.hpp):
// fixed per ISA and types, whatever the thread count.
template <class Scalar, class Weight = Scalar>
Index skinny_crossover() noexcept {
  const KernelTable<Scalar>& t = active_kernels<Scalar>();
  if constexpr (std::is_same_v<Weight, bf16>)
    return t.skinny_crossover_bf16;
  else if constexpr (std::is_same_v<Weight, f16>)
    return t.skinny_crossover_f16;
  else
    return t.skinny_crossover;
}

#if MOLORA_RUNTIME_DISPATCH

#define MOLORA_DISPATCHED_OVERLOAD(name, params, args)                         \
  template <class S>                                                           \
  void name(dispatched_arch, MOLORA_DISPATCH_UNPAREN params) noexcept {        \
    active_kernels<S>().name(MOLORA_DISPATCH_UNPAREN args);                    \
  }
MOLORA_DISPATCHED_KERNELS(MOLORA_DISPATCHED_OVERLOAD, S)
#undef MOLORA_DISPATCHED_OVERLOAD

// The layers call skinny_product, widen and gemm_product for any weight type; 16-bit
// weights go to their own table entries.
template <class S>
void skinny_product(dispatched_arch a, const bf16* w, Index ldw, Index in, const S* x, Index ldx, Index T,
                    const S* bias, S* y, Index ldy, Index o0, Index o1) noexcept {
  skinny_product_bf16(a, w, ldw, in, x, ldx, T, bias, y, ldy, o0, o1);
}
template <class S>
void skinny_product(dispatched_arch a, const f16* w, Index ldw, Index in, const S* x, Index ldx, Index T,
                    const S* bias, S* y, Index ldy, Index o0, Index o1) noexcept {
  skinny_product_f16(a, w, ldw, in, x, ldx, T, bias, y, ldy, o0, o1);
}
// The same for the expert kernels' 16-bit weights (shrink also serves a 16-bit router's
// logits through dense_rows). A fused() run through the table's separate shrink and expand
// (the adapter set's) leaves out the paced fetch of B_e^T: the table's shrink has no span.
template <class S>
void shrink(dispatched_arch d, const bf16* a, Index lda, Index r, Index in, const S* const* x, Index n, S* h,
            Index ldh, S* spill, PacedSpan* /*fetch*/ = nullptr) noexcept {
  shrink_bf16(d, a, lda, r, in, x, n, h, ldh, spill);
}
template <class S>
void shrink(dispatched_arch d, const f16* a, Index lda, Index r, Index in, const S* const* x, Index n, S* h,
            Index ldh, S* spill, PacedSpan* /*fetch*/ = nullptr) noexcept {
  shrink_f16(d, a, lda, r, in, x, n, h, ldh, spill);
}
template <class S>
void shrink(dispatched_arch d, const S* a, Index lda, Index r, Index in, const S* const* x, Index n, S* h,
            Index ldh, S* spill, PacedSpan* /*fetch*/) noexcept {
  shrink(d, a, lda, r, in, x, n, h, ldh, spill);
}
template <class S>
void expand(dispatched_arch d, const bf16* bt, Index ldb, Index r, Index out, const S* const* h, const S* scale,
            Index n, S* const* y) noexcept {
  expand_bf16(d, bt, ldb, r, out, h, scale, n, y);
}
template <class S>
void expand(dispatched_arch d, const f16* bt, Index ldb, Index r, Index out, const S* const* h, const S* scale,
            Index n, S* const* y) noexcept {
  expand_f16(d, bt, ldb, r, out, h, scale, n, y);
}
template <class S>
void fused_tokens(dispatched_arch d, const ExpertStack<S, bf16>& w, const PairGroups<S>& g, const S* x, Index ldx,
                  S* y, Index ldy, Index t_begin, Index t_end, S* scratch, S* hidden) noexcept {
  fused_tokens_bf16(d, w, g, x, ldx, y, ldy, t_begin, t_end, scratch, hidden);
}
template <class S>
void fused_tokens(dispatched_arch d, const ExpertStack<S, f16>& w, const PairGroups<S>& g, const S* x, Index ldx,
                  S* y, Index ldy, Index t_begin, Index t_end, S* scratch, S* hidden) noexcept {
  fused_tokens_f16(d, w, g, x, ldx, y, ldy, t_begin, t_end, scratch, hidden);
}
template <class S>
void widen(dispatched_arch a, const bf16* src, Index n, S* dst) noexcept {
  widen_bf16(a, src, n, dst);
}
template <class S>
void widen(dispatched_arch a, const f16* src, Index n, S* dst) noexcept {
  widen_f16(a, src, n, dst);
}
template <class S>
void gemm_product(dispatched_arch a, const bf16* w, Index ldw, Index in, const S* x, Index ldx, Index T,
                  const S* bias, S* y, Index ldy, Index o0, Index o1, S* scratch) noexcept {
  gemm_product_bf16(a, w, ldw, in, x, ldx, T, bias, y, ldy, o0, o1, scratch);
}
template <class S>
void gemm_product(dispatched_arch a, const f16* w, Index ldw, Index in, const S* x, Index ldx, Index T,
                  const S* bias, S* y, Index ldy, Index o0, Index o1, S* scratch) noexcept {
  gemm_product_f16(a, w, ldw, in, x, ldx, T, bias, y, ldy, o0, o1, scratch);
}

#endif

// Whether skinny_product_bf16dot and gemm_product_bf16dot run AVX512_BF16's dot products here: the AVX-512 kernels
// are active and the CPU has AVX512_BF16 (with run-time dispatch), or this translation unit
// is compiled for both. Otherwise a caller of the bf16-dot mode rounds the activations itself
// and runs the exact kernel (the kernel's own fallback is a plain loop, for tests).
inline bool bf16_dot_available() {
#if MOLORA_RUNTIME_DISPATCH
  return std::string(detail::choose_isa().name) == "avx512" && detail::dispatch_cpu_has_bf16_dot();
#elif defined(__AVX512BF16__) && defined(__AVX512BW__)
  return std::is_base_of_v<xsimd::avx512bw, default_arch>;
#else
  return false;
#endif
}

// Name of the ISA the kernels run with: "avx512", "avx2", "sse4.2" or "scalar" (with
// run-time dispatch, chosen on first use: MOLORA_ISA if set, else the best the CPU has;
// otherwise the ISA the translation unit was compiled for). Throws config_error if
// MOLORA_ISA names an unknown ISA or one this CPU lacks.
inline std::string active_isa() {
#if MOLORA_RUNTIME_DISPATCH
  return detail::choose_isa().name;
#else
  return isa_name<default_arch>();
#endif
}

// The ISAs that can run here, best first: with run-time dispatch, those of the four this
// CPU has; otherwise only the compiled one.
inline std::vector<std::string> available_isas() {
#if MOLORA_RUNTIME_DISPATCH
  std::vector<std::string> v;
  for (const char* const* p = detail::dispatch_isa_names(); *p; ++p) v.emplace_back(*p);
  return v;
#else
  return {isa_name<default_arch>()};
#endif
}

// Makes every later kernel call run `isa` ("avx512", "avx2", "sse4.2", "scalar"). Meant for
// tests and measurement, before layers run (a call racing with running layers may change
// the ISA between two of their kernel calls). Throws config_error for an unknown name, an
// ISA this CPU lacks, or (without run-time dispatch) any ISA but the compiled one.
inline void force_isa(const std::string& isa) {
#if MOLORA_RUNTIME_DISPATCH
  detail::dispatch_force_isa(isa);
#else
  if (isa != isa_name<default_arch>())
    throw config_error(::molora::detail::mismatch("molora::kernels::force_isa: ISA (this build has no run-time dispatch)",
                                isa_name<default_arch>(), isa));
#endif
}

}  // namespace molora::kernels
