// The layers. MoLoRAAdapter = router + gating + E LoRA experts; it adds its delta into an
// output the caller already holds (a host model that does its own, perhaps quantised, base
// matmul). MoLoRALinear = base W0 [out, in], optional b0 [out], plus an adapter: a drop-in
// for torch.nn.Linear, y = x W0^T + b0 + delta. Layers check their inputs and throw; the
// routines below them assert.
//
// Expert storage: all experts' A stacked as one [E*r, in] row-major matrix (expert e is rows
// [e*r, (e+1)*r)), all experts' B as one [out, E*r] column-major matrix (expert e is columns
// [e*r, (e+1)*r)). Each expert's block is contiguous, and the stacked A is what a dense
// shrink multiplies in one GEMM.
//
// Adapter weights in 16 bits (inference): MoLoRAAdapter<float, bf16 | f16> keeps the router
// weight and the stacked A and B in bf16 / f16 with the same layouts (router bias and
// scaling stay float); values set are rounded to nearest even, and the kernels widen them
// exactly as they load them, so the output is bitwise the float adapter's holding the
// widened weights (strategy fused; a 16-bit adapter runs fused whatever its strategy).
// Training needs a float adapter (static_assert in backward.hpp / params.hpp);
// convert_adapter<W>() rounds a float adapter into 16 bits and widens one back.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "base_product.hpp"  // BaseStrategy
#include "config.hpp"
#include "detail/aligned.hpp"
#include "detail/checks.hpp"
#include "dispatch.hpp"
#include "errors.hpp"
#include "gating.hpp"
#include "half.hpp"
#include "kernels/base_kernels.hpp"
#include "kernels/dispatch_kernels.hpp"
#include "numeric.hpp"
#include "random.hpp"
#include "router.hpp"
#include "saved_input.hpp"
#include "types.hpp"

#if defined(MOLORA_USE_OPENMP)
#include <omp.h>
#endif

namespace molora {

// How the experts' delta is computed (all give the same values up to rounding):
//   eigen         per expert: gather its tokens, shrink GEMM, scale, expand GEMM,
//                 scatter-add (MixLoRA / ggml style; the reference for the others)
//   dense_shrink  one GEMM x * A_stacked^T [T, E*r] for all experts, then a sparse expand of
//                 the selected experts only (E/k times the shrink work, as one big GEMM)
//   fused         kernels/: per expert, tiles of its tokens; h = A_e x stays in L1 and
//                 (s*g) B_e h is added straight into y
//   automatic     fused, except dense_shrink when the routing is dense (k == E) and T >= 64
//                 (measured in docs/benchmarks.md: there the dense shrink does no extra work
//                 and Eigen's GEMM beats the per-expert tiles by 20-35 % at T = 256). Only fused is
//                 guaranteed not to allocate in a warm forward (see apply_dense_shrink).
enum class Strategy { automatic, eigen, dense_shrink, fused };

inline const char* to_string(Strategy s) {
  switch (s) {
    case Strategy::automatic: return "automatic";
    case Strategy::eigen: return "eigen";
    case Strategy::dense_shrink: return "dense_shrink";
    case Strategy::fused: return "fused";
  }
  return "?";
}

// Everything a forward writes besides its output. Reuse one per thread: a warm adapter
// forward then allocates nothing with the fused strategy (README, "Allocation"). Every buffer
// only grows (logits and routing are GrowingMatrix views of their first T rows), so a smaller
// batch after a larger one allocates nothing. Also holds the generator that the sampling selection draws from
// (seed it with seed()). Two calls must not use one workspace at once: with the in-use check
// on (errors.hpp, on by default without NDEBUG) the second throws state_error.
template <class Scalar>
struct MoLoRAWorkspace {
  GrowingMatrix<Scalar> logits;  // [T, E] router logits of the last forward
  Routing<Scalar> routing;      // [T, k] routing of the last forward
  DispatchPlan<Scalar> plan;    // pairs grouped by expert
  std::vector<Scalar> probs;    // [E] softmax scratch
  RowMatrix<Scalar> gathered;   // [>= n_e, in] rows of x routed to one expert
  RowMatrix<Scalar> hidden;     // [>= n_e, r]  A_e x, then scaled by s * g
  RowMatrix<Scalar> expanded;   // [>= n_e, out] B_e h before the scatter-add
  RowMatrix<Scalar> x_copy;     // [T, in] copy of x when x and y share memory
  RowMatrix<Scalar> dense_hidden;      // [>= T, E*r] strategy dense_shrink: A_e x for every expert
  std::vector<Scalar> kernel_scratch;  // per thread: the fused kernels' h tile and spill
  Generator rng{0x6d6f6c6f7261ULL};
  detail::InUseFlag in_use;  // held by the call writing this workspace

  void seed(std::uint64_t s) { rng.seed(s); }
};

namespace detail {

// Grows m to at least rows x cols (never shrinks, so a warm workspace does not allocate).
template <class M>
void reserve_rows(M& m, Index rows, Index cols) {
  if (m.rows() < rows || m.cols() != cols) m.resize(std::max(rows, m.rows()), cols);
}

}  // namespace detail

template <class Scalar, class Weight = Scalar>
class MoLoRAAdapter;
template <class Scalar, class BaseWeight = Scalar, class AdapterWeight = Scalar>
class MoLoRALinear;
template <class Scalar, class AdapterWeight = Scalar>
class MixLoRAFeedForward;

namespace detail {
// The checks of an adapter's forward for a caller outside the layers (the training
// forwards): a live adapter, x [T, in], y [T, out]. Throws state_error / shape_error.
template <class Scalar>
void check_adapter_io(const MoLoRAAdapter<Scalar>& a, const ConstRowRef<Scalar>& x, const RowRef<Scalar>& y);
// The training forward (backward.hpp): runs the adapter's own router, gating and fused
// kernels, asking them to keep what the backward needs.
template <class Scalar>
struct TrainingPath;
}  // namespace detail

// Weight: the storage type of the router weight and the experts' A and B: Scalar, or for a
// float adapter bf16 / f16 (inference only; see the top of this header).
template <class Scalar, class Weight>
class MoLoRAAdapter {
  static_assert(detail::is_supported_scalar<Scalar>, "molora::MoLoRAAdapter supports float and double");
  static_assert(detail::is_weight_for<Scalar, Weight>,
                "molora::MoLoRAAdapter: Weight is Scalar, or bf16 / f16 for a float adapter");
  static constexpr bool kHalf = !std::is_same_v<Weight, Scalar>;
  template <class W>
  using IfScalar = std::enable_if_t<std::is_same_v<W, Scalar>>;

public:
  using Workspace = MoLoRAWorkspace<Scalar>;
  using WeightType = Weight;

  // A zero adapter (router and experts zero). Validates config (throws config_error).
  explicit MoLoRAAdapter(const MoLoRAConfig& config)
      : config_((config.validate(), config)),
        router_(config.in_features, config.num_experts, config.router_bias),
        scaling_(config.template scaling_as<Scalar>()) {
    const Index E = config.num_experts, r = config.rank;
    if constexpr (kHalf) {
      A_.assign(static_cast<std::size_t>(E * r * config.in_features), Weight{});
      B_.assign(static_cast<std::size_t>(E * r * config.out_features), Weight{});
    } else {
      A_.setZero(E * r, config.in_features);
      B_.setZero(config.out_features, E * r);
    }
  }

  const MoLoRAConfig& config() const { return config_; }
  Index in_features() const { return config_.in_features; }
  Index out_features() const { return config_.out_features; }
  Index num_experts() const { return config_.num_experts; }
  Index rank() const { return config_.rank; }
  Scalar scaling() const { return scaling_; }

  const Router<Scalar, Weight>& router() const { return router_; }
  Router<Scalar, Weight>& router() { return router_; }

  // The strategy used for the experts' delta (default automatic). For measurement and
  // tests; every strategy computes the same values up to rounding.
  void set_strategy(Strategy s) { strategy_ = s; }
  Strategy strategy() const { return strategy_; }
  // The strategy `automatic` resolves to for T tokens and k experts per token.
  Strategy resolved_strategy(Index num_tokens, Index top_k) const {
    if constexpr (kHalf) return Strategy::fused;  // eigen and dense_shrink multiply Scalar matrices
    if (strategy_ != Strategy::automatic) return strategy_;
    // Dense routing: the dense shrink does no extra work and is one large GEMM.
    if (top_k == num_experts() && num_tokens >= 64) return Strategy::dense_shrink;
    return Strategy::fused;
  }

  // Expert e's A [r, in] and B [out, r] as read-only views into the stacked storage (a
  // Scalar adapter; any adapter has the widened copies below).
  template <class W = Weight, class = IfScalar<W>>
  auto expert_A(Index e) const {
    return A_.middleRows(checked_expert(e) * rank(), rank());
  }
  template <class W = Weight, class = IfScalar<W>>
  auto expert_B(Index e) const {
    return B_.middleCols(checked_expert(e) * rank(), rank());
  }
  template <class W = Weight, class = IfScalar<W>>
  const RowMatrix<Scalar>& stacked_A() const {  // [E*r, in]
    return A_;
  }
  template <class W = Weight, class = IfScalar<W>>
  const ColMatrix<Scalar>& stacked_B() const {  // [out, E*r]
    return B_;
  }
  // Writable views for optimisers and loaders that have checked shapes and values; the
  // layout must not change (no resize). A Scalar adapter only.
  template <class W = Weight, class = IfScalar<W>>
  Eigen::Map<RowMatrix<Scalar>> mutable_stacked_A() {
    return {A_.data(), A_.rows(), A_.cols()};
  }
  template <class W = Weight, class = IfScalar<W>>
  Eigen::Map<ColMatrix<Scalar>> mutable_stacked_B() {
    return {B_.data(), B_.rows(), B_.cols()};
  }
  // The stacked weights as stored, for any Weight: A [E*r, in] row-major, B [out, E*r]
  // column-major (expert e's B^T [r, out] rows at e*r*out). Null when moved from.
  const Weight* stacked_A_data() const { return live_size(A_) > 0 ? A_.data() : nullptr; }
  const Weight* stacked_B_data() const { return live_size(B_) > 0 ? B_.data() : nullptr; }
  // The stacked weights widened exactly to Scalar (copies; for any Weight).
  RowMatrix<Scalar> widened_stacked_A() const {
    check_live();
    RowMatrix<Scalar> a(num_experts() * rank(), in_features());  // [E*r, in]
    for (Index i = 0; i < a.size(); ++i) a.data()[i] = Scalar(to_float(A_.data()[i]));
    return a;
  }
  ColMatrix<Scalar> widened_stacked_B() const {
    check_live();
    ColMatrix<Scalar> b(out_features(), num_experts() * rank());  // [out, E*r]
    for (Index i = 0; i < b.size(); ++i) b.data()[i] = Scalar(to_float(B_.data()[i]));
    return b;
  }

  // Sets expert e's A [r, in] / B [out, r]. A 16-bit adapter rounds each value to nearest
  // even (numeric_error naming the expert, index and value for one past f16's range).
  // Throws (and changes nothing) on a moved-from adapter, a bad expert index, shape or a
  // non-finite entry.
  template <class Derived>
  void set_expert_A(Index e, const Eigen::MatrixBase<Derived>& a) {
    check_live();
    checked_expert(e);
    detail::require_shape(a, rank(), in_features(), "expert lora_A.weight");
    if constexpr (kHalf) {
      const std::string field = detail::cat("experts.", e, ".lora_A.weight");
      std::vector<Weight> v(static_cast<std::size_t>(rank() * in_features()));
      for (Index j = 0; j < rank(); ++j)
        for (Index c = 0; c < in_features(); ++c)
          v[static_cast<std::size_t>(j * in_features() + c)] =
              detail::weight_from_float<Weight>(static_cast<double>(a(j, c)), field.c_str(), j, c);
      std::copy(v.begin(), v.end(), A_.begin() + e * rank() * in_features());
    } else {
      detail::require_finite(a, "expert lora_A.weight");
      A_.middleRows(e * rank(), rank()) = a.template cast<Scalar>();
    }
  }
  template <class Derived>
  void set_expert_B(Index e, const Eigen::MatrixBase<Derived>& b) {
    check_live();
    checked_expert(e);
    detail::require_shape(b, out_features(), rank(), "expert lora_B.weight");
    if constexpr (kHalf) {
      const std::string field = detail::cat("experts.", e, ".lora_B.weight");
      std::vector<Weight> v(static_cast<std::size_t>(rank() * out_features()));  // B_e^T [r, out]
      for (Index o = 0; o < out_features(); ++o)
        for (Index j = 0; j < rank(); ++j)
          v[static_cast<std::size_t>(j * out_features() + o)] =
              detail::weight_from_float<Weight>(static_cast<double>(b(o, j)), field.c_str(), o, j);
      std::copy(v.begin(), v.end(), B_.begin() + e * rank() * out_features());
    } else {
      detail::require_finite(b, "expert lora_B.weight");
      B_.middleCols(e * rank(), rank()) = b.template cast<Scalar>();
    }
  }
  // A 16-bit adapter's expert e from values as stored (e.g. a checkpoint's tensors): a
  // row-major [r, in] (PyTorch's lora_A.weight), b row-major [out, r] (lora_B.weight).
  // Copied; each value checked finite (numeric_error naming the expert and index). Throws
  // (and changes nothing) as set_expert_A / set_expert_B do.
  template <class W = Weight, class = std::enable_if_t<!std::is_same_v<W, Scalar>>>
  void set_expert_A_stored(Index e, const Weight* a) {
    check_live();
    checked_expert(e);
    if (!a) throw shape_error(detail::mismatch("expert lora_A.weight", "a buffer", "a null pointer"));
    const Index in = in_features(), r = rank();
    const std::string field = detail::cat("experts.", e, ".lora_A.weight");
    for (Index j = 0; j < r; ++j)
      for (Index c = 0; c < in; ++c) detail::require_finite_weight(a[j * in + c], field.c_str(), j, c);
    std::copy(a, a + r * in, A_.begin() + e * r * in);
  }
  template <class W = Weight, class = std::enable_if_t<!std::is_same_v<W, Scalar>>>
  void set_expert_B_stored(Index e, const Weight* b) {
    check_live();
    checked_expert(e);
    if (!b) throw shape_error(detail::mismatch("expert lora_B.weight", "a buffer", "a null pointer"));
    const Index out = out_features(), r = rank();
    const std::string field = detail::cat("experts.", e, ".lora_B.weight");
    for (Index o = 0; o < out; ++o)
      for (Index j = 0; j < r; ++j) detail::require_finite_weight(b[o * r + j], field.c_str(), o, j);
    Weight* bt = B_.data() + e * r * out;  // B_e^T [r, out]
    for (Index o = 0; o < out; ++o)
      for (Index j = 0; j < r; ++j) bt[j * out + o] = b[o * r + j];
  }

  // MING-MOE's initialisation: router as torch.nn.Linear, experts as PEFT (A kaiming-uniform,
  // B zero, so a fresh adapter adds nothing). A 16-bit adapter draws the same values and
  // rounds them.
  template <class URBG>
  void init_default(URBG& gen) {
    router_.init_uniform(gen);
    if constexpr (kHalf) {
      RowMatrix<Scalar> a(num_experts() * rank(), in_features());
      detail::kaiming_uniform_sqrt5(a, gen);
      for (Index i = 0; i < a.size(); ++i)
        A_[static_cast<std::size_t>(i)] = detail::weight_from_float<Weight>(a.data()[i], "experts lora_A.weight",
                                                                            i / in_features(), i % in_features());
      std::fill(B_.begin(), B_.end(), Weight{});
    } else {
      detail::kaiming_uniform_sqrt5(A_, gen);
      B_.setZero();
    }
  }

  // y += delta(x) for x [T, in], y [T, out]; routes with the configured gating.
  // Returns the routing used (it lives in ws). x and y may share memory: x is then copied
  // into ws before y is written. Throws shape_error on shapes, numeric_error on non-finite
  // router logits (naming the token); y is unchanged when it throws.
  template <class Derived>
  const Routing<Scalar>& add_delta(const Eigen::MatrixBase<Derived>& x, RowRef<Scalar> y, Workspace& ws) const {
    const detail::WorkspaceGuard hold(ws.in_use, "MoLoRAWorkspace");
    return add_delta_impl(ConstRowRef<Scalar>(x), y, ws);
  }
  // Allocating convenience overload.
  template <class Derived>
  void add_delta(const Eigen::MatrixBase<Derived>& x, RowRef<Scalar> y) const {
    Workspace ws;
    add_delta_impl(ConstRowRef<Scalar>(x), y, ws);
  }

  // y += delta(x) with routing supplied by the caller (task-annotated or multi-adapter
  // serving); k may differ from config().top_k. Throws on a routing that validate_routing
  // rejects and numeric_error naming the token on a non-finite x (as add_delta does); y is
  // then unchanged.
  template <class Derived>
  void add_delta_routed(const Eigen::MatrixBase<Derived>& x, const Routing<Scalar>& routing, RowRef<Scalar> y,
                        Workspace& ws) const {
    const detail::WorkspaceGuard hold(ws.in_use, "MoLoRAWorkspace");
    ConstRowRef<Scalar> xr(x);
    check_routed(xr, routing, y);
    if (xr.rows() == 0) return;
    apply_routing(unaliased(xr, y, ws), routing, y, ws);
  }

  // Router logits [T, E] and routing for x, without touching any output.
  template <class Derived>
  const Routing<Scalar>& route_tokens(const Eigen::MatrixBase<Derived>& x, Workspace& ws) const {
    const detail::WorkspaceGuard hold(ws.in_use, "MoLoRAWorkspace");
    ConstRowRef<Scalar> xr(x);
    check_x(xr);
    compute_routing(xr, ws);
    return ws.routing;
  }

  // y_rows.row(i) += scales(i) * s * B_e A_e x_rows.row(i) for every row i: expert e alone
  // on rows the caller chose (e.g. the tokens its own router sent to e), each with its own
  // gate. x_rows [n, in], y_rows [n, out], scales n finite values (a row or a column); n = 0
  // does nothing. x_rows and y_rows may share memory (x_rows is then copied into ws first).
  // The same values, bit for bit, as add_delta_routed with a routing that sends row i to
  // expert e alone with weight scales(i), without building or checking such a routing.
  // Throws state_error (moved-from adapter, ws in use), shape_error (expert index, shapes) or
  // numeric_error (a non-finite row of x_rows, named as "x of token i", or scale); y_rows is
  // then unchanged.
  template <class DX, class DS>
  void apply_expert(Index e, const Eigen::MatrixBase<DX>& x_rows, RowRef<Scalar> y_rows,
                    const Eigen::MatrixBase<DS>& scales, Workspace& ws) const {
    const detail::WorkspaceGuard hold(ws.in_use, "MoLoRAWorkspace");
    ConstRowRef<Scalar> xr(x_rows);
    check_io(xr, y_rows);
    checked_expert(e);
    detail::require_vector(scales, xr.rows(), "scales");
    detail::require_finite(scales, "scales");
    detail::require_finite_tokens(xr);
    if (xr.rows() == 0) return;
    plan_one_expert(e, xr.rows(), ws.plan);
    for (Index i = 0; i < xr.rows(); ++i) ws.plan.gates[static_cast<std::size_t>(i)] = static_cast<Scalar>(scales(i));
    apply_plan(unaliased(xr, y_rows, ws), 1, y_rows, ws);
  }

  // Throws state_error if this adapter was moved from: its weights then no longer have the
  // configured shapes (empty after a move construction, another layer's after a move
  // assignment).
  void check_live() const {
    const Index E = num_experts(), r = rank(), in = in_features(), out = out_features();
    if (live_size(A_) != E * r * in || live_size(B_) != out * E * r || !router_.live() ||
        router_.num_experts() != E || router_.in_features() != in)
      throw state_error(detail::cat("MoLoRAAdapter: expected a live adapter with stacked A ",
                                    detail::shape_str(E * r, in), ", got a moved-from one with stacked A ",
                                    stacked_A_shape()));
  }

private:
  template <class Storage>
  static Index live_size(const Storage& m) {
    return static_cast<Index>(m.size());
  }
  std::string stacked_A_shape() const {
    if constexpr (kHalf) {
      const Index in = A_.empty() ? 0 : in_features();
      return detail::shape_str(in ? live_size(A_) / in : 0, in);
    } else {
      return detail::shape_str(A_.rows(), A_.cols());
    }
  }

  // The layers built on the adapter call its unchecked steps after their own checks.
  template <class S, class BW, class AW>
  friend class MoLoRALinear;
  template <class S, class AW>
  friend class MixLoRAFeedForward;
  friend struct detail::TrainingPath<Scalar>;
  template <class S>
  friend void detail::check_adapter_io(const MoLoRAAdapter<S>&, const ConstRowRef<S>&, const RowRef<S>&);

  void check_x(const ConstRowRef<Scalar>& x) const {
    check_live();
    if (x.cols() != in_features())
      throw shape_error(detail::mismatch("x columns (in_features)", in_features(), x.cols()));
  }
  void check_io(const ConstRowRef<Scalar>& x, const RowRef<Scalar>& y) const {
    check_x(x);
    detail::require_shape(y, x.rows(), out_features(), "y shape");
  }
  // check_io, the routing (validate_routing) and x's values: with caller routing no router
  // logits catch a non-finite x, so it is checked here, with add_delta's message.
  void check_routed(const ConstRowRef<Scalar>& x, const Routing<Scalar>& routing, const RowRef<Scalar>& y) const {
    check_io(x, y);
    validate_routing(routing, x.rows(), num_experts());
    detail::require_finite_tokens(x);
  }

  // x itself, or its copy in ws when it shares memory with y.
  static ConstRowRef<Scalar> unaliased(const ConstRowRef<Scalar>& x, const RowRef<Scalar>& y, Workspace& ws) {
    if (!detail::overlaps(x, y)) return x;
    ws.x_copy = x;
    return ConstRowRef<Scalar>(ws.x_copy);
  }

  // The steps of a forward whose checks are done (x does not alias y, ws held by the
  // caller): the routing into ws, then y += delta with a routing already checked.
  const Routing<Scalar>& route_unchecked(const ConstRowRef<Scalar>& x, Workspace& ws) const {
    compute_routing(x, ws);
    return ws.routing;
  }
  void apply_routing_unchecked(const ConstRowRef<Scalar>& x, const Routing<Scalar>& routing, RowRef<Scalar>& y,
                               Workspace& ws) const {
    apply_routing(x, routing, y, ws);
  }
  // apply_expert after its checks, with scales null meaning 1 for every row.
  void apply_expert_unchecked(Index e, const ConstRowRef<Scalar>& x, RowRef<Scalar> y, const Scalar* scales,
                              Workspace& ws) const {
    const Index n = x.rows();
    if (n == 0) return;
    plan_one_expert(e, n, ws.plan);
    for (Index i = 0; i < n; ++i) ws.plan.gates[static_cast<std::size_t>(i)] = scales ? scales[i] : Scalar(1);
    apply_plan(x, 1, y, ws);
  }

  const Routing<Scalar>& add_delta_impl(const ConstRowRef<Scalar>& x, RowRef<Scalar>& y, Workspace& ws) const {
    check_io(x, y);
    if (x.rows() == 0) {
      ws.routing.resize(0, config_.top_k);
      return ws.routing;
    }
    const ConstRowRef<Scalar> xs = unaliased(x, y, ws);
    compute_routing(xs, ws);
    apply_routing(xs, ws.routing, y, ws);
    return ws.routing;
  }


  Index checked_expert(Index e) const {
    if (e < 0 || e >= num_experts())
      throw shape_error(detail::mismatch("expert index", detail::cat("[0, ", num_experts(), ")"), e));
    return e;
  }

  // Router logits and gating into ws.logits / ws.routing.
  void compute_routing(const ConstRowRef<Scalar>& x, Workspace& ws) const {
    router_logits_into(x, ws.logits, ws.kernel_scratch);  // [T, E]
    check_logits(x, ws.logits);
    ws.probs.resize(static_cast<std::size_t>(num_experts()));
    route(ConstRowRef<Scalar>(ws.logits), GatingOptions::from(config_), ws.routing, &ws.rng, ws.probs.data());
  }

  // A non-finite logit from a non-finite x names x (as add_delta_routed does); one from
  // overflow is left to route(), which names the logits.
  template <class Logits>
  static void check_logits(const ConstRowRef<Scalar>& x, const Logits& logits) {
    for (Index t = 0; t < logits.rows(); ++t)
      if (!detail::all_finite(logits.row(t))) detail::require_finite_token(x, t);
  }

  // y[t] += sum over t's slots of g * s * B_e A_e x[t], with the strategy resolved for this
  // batch. With OpenMP (MOLORA_USE_OPENMP), fused and dense_shrink split the tokens into one
  // contiguous range per thread: each y row is written by one thread, with its experts added
  // in ascending order, so the result is bitwise the same for any number of threads.
  void apply_routing(const ConstRowRef<Scalar>& x, const Routing<Scalar>& routing, RowRef<Scalar>& y,
                     Workspace& ws) const {
    ws.plan.build(routing, num_experts());
    apply_plan(x, routing.top_k(), y, ws);
  }
  // y += the pairs of ws.plan (k experts per token), with the strategy resolved for them.
  void apply_plan(const ConstRowRef<Scalar>& x, Index top_k, RowRef<Scalar>& y, Workspace& ws) const {
    if constexpr (kHalf) {
      (void)top_k;
      apply_fused(x, y, ws);
    } else {
      switch (resolved_strategy(x.rows(), top_k)) {
        case Strategy::eigen: apply_eigen(x, y, ws); break;
        case Strategy::dense_shrink: apply_dense_shrink(x, y, ws); break;
        default: apply_fused(x, y, ws); break;
      }
    }
  }
  // ws.plan = expert e alone, with rows 0..n-1 as its tokens (what DispatchPlan::build makes
  // of a one-expert routing); the caller fills the n gates. Warm vectors do not allocate.
  void plan_one_expert(Index e, Index n, DispatchPlan<Scalar>& plan) const {
    const auto E = static_cast<std::size_t>(num_experts()), pairs = static_cast<std::size_t>(n);
    plan.offsets.assign(E + 1, 0);
    for (std::size_t j = static_cast<std::size_t>(e) + 1; j <= E; ++j) plan.offsets[j] = n;
    plan.tokens.resize(pairs);
    plan.slots.assign(pairs, 0);
    plan.gates.resize(pairs);
    for (std::size_t i = 0; i < pairs; ++i) plan.tokens[i] = static_cast<std::int32_t>(i);
    plan.active.assign(1, static_cast<std::int32_t>(e));
  }

  // logits [T, E] = x W_r^T + b_r by Router::logits_rows over each thread's tokens: no heap
  // use once kernel_scratch is warm, bits independent of the batch and the thread count.
  // Inference passes the workspace's buffers (logits a GrowingMatrix), training the tape's.
  template <class Logits>
  void router_logits_into(const ConstRowRef<Scalar>& x, Logits& logits,
                          std::vector<Scalar>& kernel_scratch) const {
    const Index T = x.rows(), E = num_experts();
    if (logits.rows() != T || logits.cols() != E) logits.resize(T, E);
    const int threads = thread_count(T);
    const Index per_thread = router_.logits_scratch_size();
    const auto need = static_cast<std::size_t>(per_thread * threads);
    if (kernel_scratch.size() < need) kernel_scratch.resize(need);
    Scalar* scratch = kernel_scratch.data();
    RowRef<Scalar> out(logits);
    for_token_ranges(T, threads, [&](Index t0, Index t1, Index p) {
      router_.logits_rows(x, out, t0, t1, scratch + p * per_thread);  // [T, E]
    });
  }

  // Strategy eigen: per expert, gather its tokens, shrink, scale, expand, scatter-add.
  template <class W = Weight, class = IfScalar<W>>
  void apply_eigen(const ConstRowRef<Scalar>& x, RowRef<Scalar>& y, Workspace& ws) const {
    const Index n_max = ws.plan.max_count(), r = rank();
    detail::reserve_rows(ws.gathered, n_max, in_features());
    detail::reserve_rows(ws.hidden, n_max, r);
    detail::reserve_rows(ws.expanded, n_max, out_features());
    for (const std::int32_t e : ws.plan.active) {
      const Index n = ws.plan.count(e), b = ws.plan.begin(e);
      const auto* tok = ws.plan.tokens.data() + b;
      const auto* gate = ws.plan.gates.data() + b;
      auto xg = ws.gathered.topRows(n);  // [n, in]
      for (Index i = 0; i < n; ++i) xg.row(i) = x.row(tok[i]);
      auto h = ws.hidden.topRows(n);  // [n, r]
      h.noalias() = xg * A_.middleRows(Index(e) * r, r).transpose();
      for (Index i = 0; i < n; ++i) h.row(i) *= scaling_ * gate[i];
      auto d = ws.expanded.topRows(n);  // [n, out]
      d.noalias() = h * B_.middleCols(Index(e) * r, r).transpose();
      for (Index i = 0; i < n; ++i) y.row(tok[i]) += d.row(i);
    }
  }

  kernels::ExpertStack<Scalar, Weight> expert_stack() const {
    return {A_.data(), B_.data(), rank(), in_features(), out_features(), scaling_};
  }
  static kernels::PairGroups<Scalar> pair_groups(const DispatchPlan<Scalar>& p) {
    return {p.offsets.data(), p.tokens.data(), p.gates.data(), p.active.data(), static_cast<Index>(p.active.size())};
  }

  // Threads for T tokens: OpenMP's current limit when there are enough tokens to split.
  static int thread_count(Index num_tokens) {
#if defined(MOLORA_USE_OPENMP)
    if (num_tokens >= 8 && !omp_in_parallel()) return std::max(1, omp_get_max_threads());
#endif
    (void)num_tokens;
    return 1;
  }

  // Threads for the output columns of the experts' expand at T tokens: below the tokens
  // thread_count splits (decode), OpenMP's current limit, at most one per 128 columns.
  // Speed only: the column split gives the same bits as one thread.
  int column_thread_count(Index num_tokens) const {
#if defined(MOLORA_USE_OPENMP)
    if (num_tokens >= 1 && thread_count(num_tokens) == 1 && out_features() >= 256 && !omp_in_parallel())
      return static_cast<int>(std::min<Index>(std::max(1, omp_get_max_threads()), out_features() / 128));
#endif
    (void)num_tokens;
    return 1;
  }

  // Runs body(t_begin, t_end, thread) over contiguous token ranges, one per thread.
  template <class Body>
  static void for_token_ranges(Index num_tokens, int threads, const Body& body) {
#if defined(MOLORA_USE_OPENMP)
    if (threads > 1) {
#pragma omp parallel num_threads(threads)
      {
        const Index p = omp_get_thread_num(), P = omp_get_num_threads();
        body(num_tokens * p / P, num_tokens * (p + 1) / P, p);
      }
      return;
    }
#endif
    (void)threads;
    body(Index(0), num_tokens, Index(0));
  }

  // Strategy fused: kernels/dispatch_kernels.hpp over each thread's tokens.
  void apply_fused(const ConstRowRef<Scalar>& x, RowRef<Scalar>& y, Workspace& ws) const {
    apply_fused(x, y, ws.plan, ws.kernel_scratch, static_cast<Scalar*>(nullptr));
  }
  // The same over a given plan; kernel_scratch grows as needed. hidden (null, or
  // [pairs, rank] row-major) keeps each pair's h = A_e x in plan order for a backward.
  void apply_fused(const ConstRowRef<Scalar>& x, RowRef<Scalar>& y, const DispatchPlan<Scalar>& plan,
                   std::vector<Scalar>& kernel_scratch, Scalar* hidden) const {
    if (const int col_threads = column_thread_count(x.rows()); col_threads > 1) {
      apply_fused_columns(x, y, plan, kernel_scratch, hidden, col_threads);
      return;
    }
    const int threads = thread_count(x.rows());
    const Index per_thread = kernels::fused_scratch_size<kernels::layer_arch, Scalar>(rank());
    // Split tokens also leave room for a later decode step's h (apply_fused_columns), so a
    // warm workspace does not grow when the batch shrinks.
    const auto need = static_cast<std::size_t>(per_thread * threads + (threads > 1 ? decode_hidden_size(0) : 0));
    if (kernel_scratch.size() < need) kernel_scratch.resize(need);
    const auto w = expert_stack();
    const auto g = pair_groups(plan);
    Scalar* scratch = kernel_scratch.data();
    const Scalar* xp = x.data();
    Scalar* yp = y.data();
    const Index ldx = x.outerStride(), ldy = y.outerStride();
    for_token_ranges(x.rows(), threads, [&](Index t0, Index t1, Index p) {
      kernels::fused_tokens(kernels::layer_arch{}, w, g, xp, ldx, yp, ldy, t0, t1, scratch + p * per_thread, hidden);
    });
  }

  // Values of h that apply_fused_columns keeps in the scratch for `pairs` pairs: room for
  // the most a decode step routes (7 tokens x top_k), whatever this one routes.
  Index decode_hidden_size(Index pairs) const { return std::max<Index>(pairs, 7 * config_.top_k) * rank(); }

  // Strategy fused for few tokens on `threads` threads (OpenMP): the threads share the
  // shrink of the pairs (h into hidden, or the front of kernel_scratch), then each adds the
  // experts' expand to its own range of output columns (multiples of 64). The same bits as
  // apply_fused on one thread (kernels::shrink_pairs, kernels::expand_pairs_columns).
  void apply_fused_columns(const ConstRowRef<Scalar>& x, RowRef<Scalar>& y, const DispatchPlan<Scalar>& plan,
                           std::vector<Scalar>& kernel_scratch, Scalar* hidden, int threads) const {
#if defined(MOLORA_USE_OPENMP)
    const Index r = rank(), out = out_features();
    const auto pairs = static_cast<Index>(plan.tokens.size());
    const Index spill_size = kernels::fused_scratch_size<kernels::layer_arch, Scalar>(r);
    const Index h_size = hidden ? 0 : decode_hidden_size(pairs);
    const auto need = static_cast<std::size_t>(h_size + spill_size * threads);
    if (kernel_scratch.size() < need) kernel_scratch.resize(need);
    Scalar* h = hidden ? hidden : kernel_scratch.data();
    Scalar* spill = kernel_scratch.data() + h_size;
    const auto w = expert_stack();
    const auto g = pair_groups(plan);
    const Scalar* xp = x.data();
    Scalar* yp = y.data();
    const Index ldx = x.outerStride(), ldy = y.outerStride();
#pragma omp parallel num_threads(threads)
    {
      const Index p = omp_get_thread_num(), P = omp_get_num_threads();
      kernels::shrink_pairs(kernels::layer_arch{}, w, g, xp, ldx, pairs * p / P, pairs * (p + 1) / P, h,
                            spill + p * spill_size);
#pragma omp barrier
      const Index o0 = out * p / P / 64 * 64, o1 = p + 1 == P ? out : out * (p + 1) / P / 64 * 64;
      kernels::expand_pairs_columns(kernels::layer_arch{}, w, g, h, yp, ldy, o0, o1);
    }
#else
    (void)x, (void)y, (void)plan, (void)kernel_scratch, (void)hidden, (void)threads;
#endif
  }

  // Strategy dense_shrink: h [T, E*r] = x A_stacked^T by one GEMM, then the sparse expand.
  template <class W = Weight, class = IfScalar<W>>
  void apply_dense_shrink(const ConstRowRef<Scalar>& x, RowRef<Scalar>& y, Workspace& ws) const {
    const Index T = x.rows();
    detail::reserve_rows(ws.dense_hidden, T, A_.rows());
    // Eigen takes the GEMM's packing buffers from the heap when they exceed
    // EIGEN_STACK_ALLOCATION_LIMIT (128 KB): this strategy may allocate; fused never does.
    auto h = ws.dense_hidden.topRows(T);  // [T, E*r]
    h.noalias() = x * A_.transpose();
    const auto w = expert_stack();
    const auto g = pair_groups(ws.plan);
    const Scalar* hp = ws.dense_hidden.data();
    Scalar* yp = y.data();
    const Index ldh = ws.dense_hidden.outerStride(), ldy = y.outerStride();
    for_token_ranges(T, thread_count(T), [&](Index t0, Index t1, Index) {
      kernels::sparse_expand_tokens(kernels::layer_arch{}, w, g, hp, ldh, yp, ldy, t0, t1);
    });
  }

  MoLoRAConfig config_;
  Router<Scalar, Weight> router_;
  Scalar scaling_;
  std::conditional_t<kHalf, std::vector<Weight>, RowMatrix<Scalar>> A_;  // [E*r, in]
  std::conditional_t<kHalf, std::vector<Weight>, ColMatrix<Scalar>> B_;  // [out, E*r]
  Strategy strategy_ = Strategy::automatic;
};

// The adapter with its router weight and experts stored as To: rounded to nearest even into
// bf16 / f16 (numeric_error naming the tensor, index and value for one past f16's range),
// widened exactly into Scalar (so convert_adapter<float>(convert_adapter<bf16>(a)) holds
// a's weights rounded to bf16). Config, router bias, scaling and strategy are kept. Throws
// state_error for a moved-from adapter.
template <class To, class Scalar, class From>
MoLoRAAdapter<Scalar, To> convert_adapter(const MoLoRAAdapter<Scalar, From>& a) {
  a.check_live();
  MoLoRAAdapter<Scalar, To> b(a.config());
  b.set_strategy(a.strategy());
  const Index E = a.num_experts(), r = a.rank(), in = a.in_features();
  RowMatrix<Scalar> router_weight(E, in);  // [E, in]
  const From* w = a.router().weight_data();
  for (Index i = 0; i < router_weight.size(); ++i) router_weight.data()[i] = Scalar(to_float(w[i]));
  b.router().set_weight(router_weight);
  if (a.router().has_bias()) b.router().set_bias(a.router().bias());
  const RowMatrix<Scalar> A = a.widened_stacked_A();  // [E*r, in]
  const ColMatrix<Scalar> B = a.widened_stacked_B();  // [out, E*r]
  for (Index e = 0; e < E; ++e) {
    b.set_expert_A(e, A.middleRows(e * r, r));
    b.set_expert_B(e, B.middleCols(e * r, r));
  }
  return b;
}

namespace detail {
// The training entry points (backward.hpp, params.hpp) take adapters of any weight type so
// that a 16-bit one stops here, at compile time, with this message rather than a failed
// overload: training keeps Scalar master weights for what it trains.
template <class Scalar, class AdapterWeight>
constexpr bool require_trainable_adapter() {
  static_assert(std::is_same_v<AdapterWeight, Scalar>,
                "molora training (forward_train, add_delta_train, backward, add_backward, parameters, "
                "optimisers) needs an adapter whose router and experts are stored as Scalar (master weights); "
                "train MoLoRAAdapter<float> and convert_adapter<bf16 or f16>() it for inference");
  return true;
}

template <class Scalar>
void check_adapter_io(const MoLoRAAdapter<Scalar>& a, const ConstRowRef<Scalar>& x, const RowRef<Scalar>& y) {
  a.check_io(x, y);
}
}  // namespace detail

// BaseWeight: the base weight's storage type, Scalar or (float layers) bf16 / f16;
// AdapterWeight: the router's and the experts' (MoLoRAAdapter's Weight), chosen apart. A 16-bit base is set from any values (rounded to
// nearest even) or wrapped from a host's buffer; base_weight() (an Eigen map) exists only for
// a base of type Scalar, base_weight_data() for any. (The default BaseWeight = Scalar is on
// the declaration above the adapter.)
template <class Scalar, class BaseWeight, class AdapterWeight>
class MoLoRALinear {
  static_assert(detail::is_supported_scalar<Scalar>, "molora::MoLoRALinear supports float and double");
  static_assert(detail::is_weight_for<Scalar, BaseWeight>,
                "molora::MoLoRALinear: BaseWeight is Scalar, or bf16 / f16 for a float layer");
  static constexpr bool kHalfBase = !std::is_same_v<BaseWeight, Scalar>;

public:
  using Workspace = MoLoRAWorkspace<Scalar>;
  using BaseWeightMap = Eigen::Map<const RowMatrix<Scalar>>;
  using BaseBiasMap = Eigen::Map<const Eigen::Matrix<Scalar, 1, Eigen::Dynamic>>;

  // Owns a zero base weight [out, in] without bias, and a zero adapter.
  explicit MoLoRALinear(const MoLoRAConfig& config) : adapter_(config) {
    if constexpr (kHalfBase)
      half_weight_.assign(static_cast<std::size_t>(config.out_features * config.in_features), BaseWeight{});
    else
      owned_weight_.assign(static_cast<std::size_t>(config.out_features * config.in_features), Scalar(0));
  }

  const MoLoRAConfig& config() const { return adapter_.config(); }
  Index in_features() const { return adapter_.in_features(); }
  Index out_features() const { return adapter_.out_features(); }
  using Adapter = MoLoRAAdapter<Scalar, AdapterWeight>;
  const Adapter& adapter() const { return adapter_; }
  Adapter& adapter() { return adapter_; }
  // The adapter's strategy (see Strategy).
  void set_strategy(Strategy s) { adapter_.set_strategy(s); }
  Strategy strategy() const { return adapter_.strategy(); }
  // How the base product is computed (default automatic). For measurement and tests.
  void set_base_strategy(BaseStrategy s) { base_strategy_ = s; }
  BaseStrategy base_strategy() const { return base_strategy_; }
  // Opt-in for a bf16 base (default off), as Linear::set_bf16_dot: the base product rounds
  // the activations to bf16 and runs AVX512_BF16's dot instruction where the CPU has it; the
  // router and the experts still see the exact activations. The output differs from the
  // exact path by at most 2^-8 sum_i |w_i x_i| per output plus float summation error.
  template <class W = BaseWeight, class = std::enable_if_t<std::is_same_v<W, bf16>>>
  void set_bf16_dot(bool on) {
    bf16_dot_ = on;
  }
  bool bf16_dot() const { return bf16_dot_; }
  // The base strategy `automatic` resolves to for T tokens.
  BaseStrategy resolved_base_strategy(Index num_tokens) const {
    return detail::resolve_base_strategy<Scalar, BaseWeight>(base_strategy_, num_tokens, in_features());
  }

  // Base weight [out, in] and bias [out] (empty map without a bias), owned or wrapped.
  // Both throw state_error on a moved-from layer.
  template <class W = BaseWeight, class = std::enable_if_t<std::is_same_v<W, Scalar>>>
  BaseWeightMap base_weight() const {
    check_live();
    return BaseWeightMap(wrapped_weight_ ? wrapped_weight_ : owned_weight_.data(), out_features(), in_features());
  }
  bool has_base_bias() const { return bias_ptr() != nullptr; }
  BaseBiasMap base_bias() const {
    check_live();
    return BaseBiasMap(bias_ptr(), has_base_bias() ? out_features() : 0);
  }
  bool wraps_base() const { return wrapped_weight_ != nullptr || wrapped_half_ != nullptr; }
  // The base weight as stored, row-major [out, in], owned or wrapped (null when moved from).
  const BaseWeight* base_weight_data() const {
    if constexpr (kHalfBase)
      return wrapped_half_ ? wrapped_half_ : half_weight_.data();
    else
      return wrapped_weight_ ? wrapped_weight_ : owned_weight_.data();
  }

  // Copies w [out, in] (finite) into an owned base weight; stops wrapping.
  // A 16-bit base: each value rounded to nearest even; numeric_error (naming the index and
  // the value) for one that is not finite or, for f16, above 65504 after rounding.
  template <class Derived>
  void set_base_weight(const Eigen::MatrixBase<Derived>& w) {
    detail::require_shape(w, out_features(), in_features(), "base weight");
    if constexpr (kHalfBase) {
      detail::aligned_vector<BaseWeight> v(static_cast<std::size_t>(out_features() * in_features()));
      for (Index o = 0; o < out_features(); ++o)
        for (Index i = 0; i < in_features(); ++i)
          v[static_cast<std::size_t>(o * in_features() + i)] =
              detail::weight_from_float<BaseWeight>(static_cast<double>(w(o, i)), "base weight", o, i);
      half_weight_.swap(v);
      wrapped_half_ = nullptr;
    } else {
      detail::require_finite(w, "base weight");
      detail::aligned_vector<Scalar> v(static_cast<std::size_t>(out_features() * in_features()));
      Eigen::Map<RowMatrix<Scalar>>(v.data(), out_features(), in_features()) = w.template cast<Scalar>();
      owned_weight_.swap(v);
      wrapped_weight_ = nullptr;
    }
  }
  // Copies b [out] (row or column) into an owned base bias; stops wrapping the bias.
  template <class Derived>
  void set_base_bias(const Eigen::MatrixBase<Derived>& b) {
    detail::require_vector(b, out_features(), "base bias");
    detail::require_finite(b, "base bias");
    owned_bias_.resize(out_features());
    for (Index i = 0; i < out_features(); ++i) owned_bias_(i) = static_cast<Scalar>(b(i));
    wrapped_bias_ = nullptr;
  }
  void clear_base_bias() {
    owned_bias_.resize(0);
    wrapped_bias_ = nullptr;
  }
  // Uses the host model's buffer as the base weight without a copy. The buffer must hold
  // [out, in] row-major and outlive the layer's use of it; its values are checked here, once
  // (as set_base_weight checks its copy), and must not be changed to non-finite ones later.
  // Throws shape_error / numeric_error and leaves the layer unchanged.
  template <class W = BaseWeight, class = std::enable_if_t<std::is_same_v<W, Scalar>>>
  void wrap_base_weight(const BaseWeightMap& w) {
    detail::require_shape(w, out_features(), in_features(), "wrapped base weight");
    detail::require_finite(w, "wrapped base weight");
    wrapped_weight_ = w.data();
    owned_weight_.clear();
    owned_weight_.shrink_to_fit();
  }
  // A 16-bit base from the host's buffer (row-major [out, in] bf16 / f16, e.g. a checkpoint's
  // tensor as stored), without a copy; the same lifetime rule and one check of its values.
  template <class W = BaseWeight, class = std::enable_if_t<!std::is_same_v<W, Scalar>>>
  void wrap_base_weight(const BaseWeight* w, Index out, Index in) {
    if (out != out_features() || in != in_features())
      throw shape_error(detail::mismatch("wrapped base weight", detail::shape_str(out_features(), in_features()),
                                         detail::shape_str(out, in)));
    if (!w) throw shape_error(detail::mismatch("wrapped base weight", "a buffer", "a null pointer"));
    for (Index o = 0; o < out; ++o)
      for (Index i = 0; i < in; ++i) detail::require_finite_weight(w[o * in + i], "wrapped base weight", o, i);
    wrapped_half_ = w;
    half_weight_.clear();
    half_weight_.shrink_to_fit();
  }
  void wrap_base_bias(const Eigen::Map<const Vector<Scalar>>& b) {
    if (b.size() != out_features())
      throw shape_error(detail::mismatch("wrapped base bias", detail::cat("[", out_features(), "]"),
                                         detail::cat("[", b.size(), "]")));
    detail::require_finite(b, "wrapped base bias");
    wrapped_bias_ = b.data();
    owned_bias_.resize(0);
  }

  // y = x W0^T + b0 + delta(x), x [T, in], y [T, out]. Returns the routing used (in ws).
  // x and y may share memory (x is copied into ws first). Throws shape_error /
  // numeric_error (naming the token) / state_error (moved-from layer, ws in use); y is
  // unchanged when it throws (the routing is computed before y is written).
  template <class Derived>
  const Routing<Scalar>& forward(const Eigen::MatrixBase<Derived>& x, RowRef<Scalar> y, Workspace& ws) const {
    const detail::WorkspaceGuard hold(ws.in_use, "MoLoRAWorkspace");
    ConstRowRef<Scalar> xr(x);
    check_live();
    adapter_.check_io(xr, y);
    if (xr.rows() == 0) {
      ws.routing.resize(0, config().top_k);
      return ws.routing;
    }
    const ConstRowRef<Scalar> xs = adapter_.unaliased(xr, y, ws);
    const Routing<Scalar>& routing = adapter_.route_unchecked(xs, ws);
    base_into(xs, y);
    adapter_.apply_routing_unchecked(xs, routing, y, ws);
    return routing;
  }
  template <class Derived>
  void forward(const Eigen::MatrixBase<Derived>& x, RowRef<Scalar> y) const {
    Workspace ws;
    forward(x, y, ws);
  }
  // Allocating convenience: returns y [T, out].
  template <class Derived>
  RowMatrix<Scalar> forward(const Eigen::MatrixBase<Derived>& x) const {
    RowMatrix<Scalar> y(x.rows(), out_features());
    forward(x, y);
    return y;
  }
  // Same with routing supplied by the caller.
  // Throws as forward does (a non-finite x with forward's message); y unchanged on a throw.
  template <class Derived>
  void forward_routed(const Eigen::MatrixBase<Derived>& x, const Routing<Scalar>& routing, RowRef<Scalar> y,
                      Workspace& ws) const {
    const detail::WorkspaceGuard hold(ws.in_use, "MoLoRAWorkspace");
    ConstRowRef<Scalar> xr(x);
    check_live();
    adapter_.check_routed(xr, routing, y);
    if (xr.rows() == 0) return;
    const ConstRowRef<Scalar> xs = adapter_.unaliased(xr, y, ws);
    base_into(xs, y);
    adapter_.apply_routing_unchecked(xs, routing, y, ws);
  }

  // The base layer alone: y = x W0^T + b0 (what the adapter is measured against).
  template <class Derived>
  void forward_base(const Eigen::MatrixBase<Derived>& x, RowRef<Scalar> y) const {
    ConstRowRef<Scalar> xr(x);
    check_live();
    adapter_.check_io(xr, y);
    if (detail::overlaps(xr, y)) {
      RowMatrix<Scalar> copy = xr;
      base_into(ConstRowRef<Scalar>(copy), y);
    } else {
      base_into(xr, y);
    }
  }

  // Throws state_error if this layer was moved from (its owned base weight or bias no longer
  // has the layer's shape), then checks its adapter likewise.
  void check_live() const {
    const bool weight_ok =
        kHalfBase ? wrapped_half_ != nullptr || half_weight_.size() == static_cast<std::size_t>(out_features() * in_features())
                  : wrapped_weight_ != nullptr || owned_weight_.size() == static_cast<std::size_t>(out_features() * in_features());
    const bool bias_ok = wrapped_bias_ != nullptr || owned_bias_.size() == 0 || owned_bias_.size() == out_features();
    if (!weight_ok || !bias_ok) {
      const Index held = static_cast<Index>(kHalfBase ? half_weight_.size() : owned_weight_.size());  // > 0: out > 0
      throw state_error(detail::cat("MoLoRALinear: expected a live layer with base weight ",
                                    detail::shape_str(out_features(), in_features()),
                                    ", got a moved-from one with base weight ",
                                    detail::shape_str(held > 0 ? out_features() : 0, held > 0 ? held / out_features() : 0)));
    }
    adapter_.check_live();
  }

private:
  const Scalar* bias_ptr() const {
    if (wrapped_bias_) return wrapped_bias_;
    return owned_bias_.size() > 0 ? owned_bias_.data() : nullptr;
  }

  void base_into(const ConstRowRef<Scalar>& x, RowRef<Scalar>& y) const {
    // W0 is [out, in] contiguous, owned or wrapped; bias_ptr() is null without a bias.
    if constexpr (std::is_same_v<BaseWeight, bf16>) {
      if (bf16_dot_)
        return detail::base_product_bf16dot(base_weight_data(), in_features(), out_features(), bias_ptr(), x, y,
                                            base_strategy_);
    }
    detail::base_product(base_weight_data(), in_features(), out_features(), bias_ptr(), x, y,
                         resolved_base_strategy(x.rows()));
  }

  Adapter adapter_;
  detail::aligned_vector<Scalar> owned_weight_;  // base [out, in] row-major unless wrapping, 64-byte aligned
                                                 // (Eigen aligns to 16 bytes in a build without -march)
  Vector<Scalar> owned_bias_;                    // [out] or empty
  const Scalar* wrapped_weight_ = nullptr;
  const Scalar* wrapped_bias_ = nullptr;
  BaseStrategy base_strategy_ = BaseStrategy::automatic;
  bool bf16_dot_ = false;                        // bf16 base only: see set_bf16_dot
  detail::aligned_vector<BaseWeight> half_weight_;  // 16-bit base [out, in] unless wrapping (else empty), 64-byte aligned
  const BaseWeight* wrapped_half_ = nullptr;
};

}  // namespace molora
