// The driver of an adapter set's forward (adapter_set.hpp): the fused shrink-expand kernel of
// lora_kernels.hpp run over pairs grouped by *virtual* expert (one per expert of each adapter
// in the set), each with its own weights, rank and scaling. It is fused_tokens
// (dispatch_kernels.hpp) with a table of experts instead of one stack of equal rank: ranks
// mix freely and nothing is padded. Per token, its experts are visited in ascending virtual
// id, which for one token (one adapter) is ascending expert id, the order a single adapter
// adds them in: a token's row gets the same bits as from its adapter alone.
// A float set's virtual expert may keep its A and B^T in bf16 / f16: fused() then widens them
// as it loads them (lora_kernels.hpp), giving the bits of a float expert holding the widened
// values.
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "../half.hpp"

#include "dispatch_kernels.hpp"
#include "lora_kernels.hpp"

namespace molora::kernels {

// One virtual expert: A_e [rank, in] row-major at a (row stride lda), B_e^T [rank, out]
// row-major at bt (row stride ldb), and the scaling s of its adapter (times the set's
// per-adapter scale); tile is fused_tile for its shape. An expert stored in 16 bits (float
// sets only) has a and bt null and a_bf16 / bt_bf16 or a_f16 / bt_f16 set instead.
template <class Scalar>
struct VirtualExpert {
  const Scalar* a;
  const Scalar* bt;
  Index lda, ldb, rank, tile;
  Scalar scaling;
  const bf16* a_bf16 = nullptr;
  const bf16* bt_bf16 = nullptr;
  const f16* a_f16 = nullptr;
  const f16* bt_f16 = nullptr;
};

// y[t] += sum over t's pairs (v, g) of s_v * g * B_v A_v x[t], for tokens [t_begin, t_end).
// g groups the pairs by virtual expert (tokens ascending within one); experts[v] describes
// virtual expert v. x [T, in], y [T, out] row-major with strides ldx, ldy (must not overlap);
// scratch holds fused_scratch_size<Arch, Scalar>(max rank) values.
template <class Arch, class Scalar>
void fused_set_tokens(Arch arch, const VirtualExpert<Scalar>* experts, Index in, Index out,
                      const PairGroups<Scalar>& g, const Scalar* x, Index ldx, Scalar* y, Index ldy, Index t_begin,
                      Index t_end, Scalar* scratch) noexcept {
  const Scalar* xr[kMaxTile];
  Scalar* yr[kMaxTile];
  Scalar sc[kMaxTile];
  for (Index ai = 0; ai < g.num_active; ++ai) {
    const std::int32_t v = g.active[ai];
    const VirtualExpert<Scalar>& w = experts[v];
    Index lo = 0, hi = 0;
    detail::token_subrange(g, v, t_begin, t_end, lo, hi);
    for (Index p0 = lo; p0 < hi; p0 += w.tile) {
      const Index n = std::min(w.tile, hi - p0);
      for (Index i = 0; i < n; ++i) {
        const Index tok = g.tokens[p0 + i];
        xr[i] = x + tok * ldx;
        yr[i] = y + tok * ldy;
        sc[i] = w.scaling * g.gates[p0 + i];
      }
      if constexpr (std::is_same_v<Scalar, float>) {
        if (w.a_bf16) {
          fused(arch, w.a_bf16, w.lda, w.bt_bf16, w.ldb, w.rank, in, out, xr, yr, sc, n, scratch, w.tile);
          continue;
        }
        if (w.a_f16) {
          fused(arch, w.a_f16, w.lda, w.bt_f16, w.ldb, w.rank, in, out, xr, yr, sc, n, scratch, w.tile);
          continue;
        }
      }
      fused(arch, w.a, w.lda, w.bt, w.ldb, w.rank, in, out, xr, yr, sc, n, scratch, w.tile);
    }
  }
}

}  // namespace molora::kernels
