// Many adapters in one batch (docs/design-notes.md, "Adapter sets"). An AdapterSet holds N
// adapters over one base layer's shape [in -> out]: MoLoRA adapters, each with its own E, k,
// r, alpha, gating and router, and plain LoRAs (E = 1, k = 1, no router), ranks mixed. Each
// token of a batch names its adapter (an int32 per token, or segments of consecutive
// tokens; -1 = base only). One add_delta routes every token with its own adapter's router
// and gating, sorts all (token, slot) pairs by virtual expert (adapter, expert) with one
// counting sort, and runs the fused kernel once over the whole batch (kernels/set_kernels.hpp).
//
// SetAdapter is one adapter as the set reads it: pointers to its weights in the kernels'
// layouts, plus an owner that keeps them alive (a shared MoLoRAAdapter or LoRA, or a
// memory-mapped file), and the per-adapter scale (llama.cpp's --lora-scaled). A float set's
// adapter may keep its experts in bf16 / f16 (MoLoRAAdapter<float, W>, LoRA<float, W>, a
// set-adapter file loaded with load_set_adapter<float, W>): the set's kernel widens them as
// it loads them; the router weight (E x in) is widened once into a float copy the
// SetAdapter owns, since the set's routing reads float. A set and its adapters are
// immutable once built, so one set is safely shared by threads (each with its own
// AdapterSetWorkspace); tenants.hpp swaps whole sets in and out at run time.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <type_traits>
#include <utility>
#include <vector>

#include "config.hpp"
#include "dispatch.hpp"
#include "errors.hpp"
#include "gating.hpp"
#include "kernels/dispatch_kernels.hpp"
#include "kernels/set_kernels.hpp"
#include "lora.hpp"
#include "molora_linear.hpp"
#include "random.hpp"
#include "types.hpp"

#if defined(MOLORA_USE_OPENMP)
#include <omp.h>
#endif

namespace molora {

// The weights of one adapter in the kernels' layouts, as pointers (the caller's storage).
template <class Scalar>
struct SetAdapterViews {
  Index in_features = 0, out_features = 0, num_experts = 1, top_k = 1, rank = 0;
  double scaling = 0;                      // alpha / r (or alpha / sqrt(r)), before the set's scale
  bool normalize_top_k = true;
  Selection selection = Selection::top_k;
  const Scalar* router_weight = nullptr;   // [E, in] row-major; null only for E == 1 (gate 1)
  const Scalar* router_bias = nullptr;     // [E], or null without a bias
  std::vector<const Scalar*> A;            // E pointers, each A_e [rank, in] row-major
  std::vector<const Scalar*> Bt;           // E pointers, each B_e^T [rank, out] row-major
  // A float adapter's experts stored in bf16 or f16 instead (then A and Bt are empty): E
  // pointers each, the same layouts; the kernels widen them as they load them.
  std::vector<const bf16*> A_bf16, Bt_bf16;
  std::vector<const f16*> A_f16, Bt_f16;

  // Bytes of one stored expert weight: sizeof(Scalar), or 2 for 16-bit experts.
  std::size_t expert_weight_size() const { return A_bf16.empty() && A_f16.empty() ? sizeof(Scalar) : 2; }
};

template <class Scalar>
class SetAdapter {
  static_assert(detail::is_supported_scalar<Scalar>, "molora::SetAdapter supports float and double");

public:
  using Ptr = std::shared_ptr<const SetAdapter>;

  // A MoLoRA adapter, shared without a copy: the set reads its weights in place, so they must
  // not change while any set holds it (optimisers: train, then share a new snapshot).
  // scale multiplies its scaling (1 = as trained). Throws state_error on a moved-from adapter,
  // config_error on a scale that is not finite or makes the scaling overflow Scalar.
  static Ptr share(std::shared_ptr<const MoLoRAAdapter<Scalar>> a, double scale = 1) {
    if (!a) throw config_error("SetAdapter::share: expected an adapter, got null");
    a->check_live();
    const auto& c = a->config();
    SetAdapterViews<Scalar> v = moe_views(c, static_cast<double>(a->scaling()));
    v.router_weight = a->router().weight().data();
    v.router_bias = a->router().has_bias() ? a->router().bias().data() : nullptr;
    for (Index e = 0; e < c.num_experts; ++e) {
      v.A.push_back(a->stacked_A().data() + e * c.rank * c.in_features);
      v.Bt.push_back(a->stacked_B().data() + e * c.rank * c.out_features);
    }
    auto s = std::shared_ptr<SetAdapter>(new SetAdapter(std::move(v), a, scale, false));
    s->molora_ = a.get();
    return s;
  }
  // A plain LoRA (E = 1, k = 1, gate 1), shared without a copy; as above.
  static Ptr share(std::shared_ptr<const LoRA<Scalar>> l, double scale = 1) {
    if (!l) throw config_error("SetAdapter::share: expected a LoRA, got null");
    l->check_live();
    SetAdapterViews<Scalar> v = lora_views(*l);
    v.A.push_back(l->A().data());
    v.Bt.push_back(l->B().data());
    auto s = std::shared_ptr<SetAdapter>(new SetAdapter(std::move(v), l, scale, false));
    s->lora_ = l.get();
    return s;
  }
  // A float adapter whose router and experts are stored in bf16 / f16 (e.g. loaded as a
  // checkpoint stores them), shared without a copy of its experts: the set's kernel widens
  // them as it loads them, and the set's output is bitwise that of the float adapter holding
  // the widened weights (convert_adapter<float>(a)). The router weight [E, in] is widened
  // once into a float copy held with the adapter. molora_adapter() is null (training needs a
  // float adapter). Throws as share() does.
  template <class W, class = std::enable_if_t<detail::is_half<W>>>
  static Ptr share(std::shared_ptr<const MoLoRAAdapter<Scalar, W>> a, double scale = 1) {
    if (!a) throw config_error("SetAdapter::share: expected an adapter, got null");
    a->check_live();
    const auto& c = a->config();
    const Index E = c.num_experts, r = c.rank, in = c.in_features, out = c.out_features;
    auto held = std::make_shared<HalfAdapter<MoLoRAAdapter<Scalar, W>>>();
    held->adapter = a;
    held->router_weight.resize(E, in);  // [E, in]
    for (Index i = 0; i < held->router_weight.size(); ++i)
      held->router_weight.data()[i] = Scalar(to_float(a->router().weight_data()[i]));
    SetAdapterViews<Scalar> v = moe_views(c, static_cast<double>(a->scaling()));
    v.router_weight = held->router_weight.data();
    v.router_bias = a->router().has_bias() ? a->router().bias().data() : nullptr;
    for (Index e = 0; e < E; ++e) {
      half_A<W>(v).push_back(a->stacked_A_data() + e * r * in);    // A_e [r, in]
      half_Bt<W>(v).push_back(a->stacked_B_data() + e * r * out);  // B_e^T [r, out]
    }
    return Ptr(new SetAdapter(std::move(v), std::move(held), scale, false));
  }
  // A float LoRA stored in bf16 / f16 (e.g. io::load_peft_lora<float, bf16>'s), shared
  // without a copy; as above (lora() is null).
  template <class W, class = std::enable_if_t<detail::is_half<W>>>
  static Ptr share(std::shared_ptr<const LoRA<Scalar, W>> l, double scale = 1) {
    if (!l) throw config_error("SetAdapter::share: expected a LoRA, got null");
    l->check_live();
    SetAdapterViews<Scalar> v = lora_views(*l);
    half_A<W>(v).push_back(l->A_data());    // [r, in]
    half_Bt<W>(v).push_back(l->B_data());   // B^T [r, out]
    return Ptr(new SetAdapter(std::move(v), std::move(l), scale, false));
  }
  // Weights owned by `owner` (e.g. a mapped safetensors file; kept alive by the adapter).
  // With check_values, every weight is checked finite once, here. Throws config_error /
  // numeric_error naming the field.
  static Ptr wrap(SetAdapterViews<Scalar> views, std::shared_ptr<const void> owner, double scale = 1,
                  bool check_values = true) {
    return Ptr(new SetAdapter(std::move(views), std::move(owner), scale, check_values));
  }
  // The same weights (shared) with another scale.
  Ptr with_scale(double scale) const {
    auto s = std::shared_ptr<SetAdapter>(new SetAdapter(views_, owner_, scale, false));
    s->molora_ = molora_;
    s->lora_ = lora_;
    return s;
  }

  const SetAdapterViews<Scalar>& views() const { return views_; }
  Index in_features() const { return views_.in_features; }
  Index out_features() const { return views_.out_features; }
  Index num_experts() const { return views_.num_experts; }
  Index top_k() const { return views_.top_k; }
  Index rank() const { return views_.rank; }
  bool has_router() const { return views_.router_weight != nullptr; }
  double scale() const { return scale_; }
  // s * scale, as the kernels multiply it.
  Scalar effective_scaling() const { return effective_; }
  GatingOptions gating() const {
    return GatingOptions{views_.num_experts, views_.top_k, views_.normalize_top_k, views_.selection};
  }
  // The trainable object behind the views, if the adapter was shared from one (else null).
  const MoLoRAAdapter<Scalar>* molora_adapter() const { return molora_; }
  const LoRA<Scalar>* lora() const { return lora_; }
  // Bytes of all its weights as the set reads them: router (and bias) and every expert's A
  // and B (what it keeps resident, whether its owner maps them or holds a copy).
  std::size_t weight_bytes() const {
    const Index E = views_.num_experts;
    const Index router = views_.router_weight ? E * views_.in_features : 0, bias = views_.router_bias ? E : 0;
    return static_cast<std::size_t>(router + bias) * sizeof(Scalar) + static_cast<std::size_t>(E) * expert_bytes();
  }
  // Bytes of expert weights (A and B) read for one routed expert.
  std::size_t expert_bytes() const {
    return static_cast<std::size_t>(views_.rank * (views_.in_features + views_.out_features)) * views_.expert_weight_size();
  }

private:
  // The views' shape, gating and scaling fields of a MoLoRA adapter / a LoRA (share()).
  static SetAdapterViews<Scalar> moe_views(const MoLoRAConfig& c, double scaling) {
    SetAdapterViews<Scalar> v;
    v.in_features = c.in_features;
    v.out_features = c.out_features;
    v.num_experts = c.num_experts;
    v.top_k = c.top_k;
    v.rank = c.rank;
    v.scaling = scaling;
    v.normalize_top_k = c.normalize_top_k;
    v.selection = c.selection;
    return v;
  }
  template <class L>
  static SetAdapterViews<Scalar> lora_views(const L& l) {
    SetAdapterViews<Scalar> v;
    v.in_features = l.in_features();
    v.out_features = l.out_features();
    v.rank = l.rank();
    v.scaling = static_cast<double>(l.scaling());
    return v;
  }
  // A shared 16-bit MoLoRA adapter and its router weight widened (share()).
  template <class Held>
  struct HalfAdapter {
    std::shared_ptr<const Held> adapter;
    RowMatrix<Scalar> router_weight;  // [E, in]
  };
  template <class W>
  static std::vector<const W*>& half_A(SetAdapterViews<Scalar>& v) {
    if constexpr (std::is_same_v<W, bf16>)
      return v.A_bf16;
    else
      return v.A_f16;
  }
  template <class W>
  static std::vector<const W*>& half_Bt(SetAdapterViews<Scalar>& v) {
    if constexpr (std::is_same_v<W, bf16>)
      return v.Bt_bf16;
    else
      return v.Bt_f16;
  }

  SetAdapter(SetAdapterViews<Scalar> v, std::shared_ptr<const void> owner, double scale, bool check_values)
      : views_(std::move(v)), owner_(std::move(owner)), scale_(scale) {
    auto positive = [](const char* field, Index x) {
      if (x <= 0) throw config_error(detail::mismatch(field, "a value >= 1", x));
    };
    positive("adapter in_features", views_.in_features);
    positive("adapter out_features", views_.out_features);
    positive("adapter num_experts", views_.num_experts);
    positive("adapter rank", views_.rank);
    if (views_.top_k < 1 || views_.top_k > views_.num_experts)
      throw config_error(detail::mismatch("adapter top_k", detail::cat("a value in [1, ", views_.num_experts, "]"),
                                          views_.top_k));
    if (!views_.router_weight && views_.num_experts != 1)
      throw config_error(detail::mismatch("adapter router_weight", "a router for num_experts > 1", "null"));
    const auto E = static_cast<std::size_t>(views_.num_experts);
    const bool bf = !views_.A_bf16.empty() || !views_.Bt_bf16.empty(), hf = !views_.A_f16.empty() || !views_.Bt_f16.empty();
    if ((bf || hf) && (!std::is_same_v<Scalar, float> || (bf && hf) || !views_.A.empty() || !views_.Bt.empty()))
      throw config_error(detail::mismatch(
          "adapter expert pointers", "one storage: A / Bt, or (float sets only) A_bf16 / Bt_bf16 or A_f16 / Bt_f16",
          detail::cat(views_.A.size() + views_.Bt.size(), " Scalar, ", views_.A_bf16.size() + views_.Bt_bf16.size(),
                      " bf16 and ", views_.A_f16.size() + views_.Bt_f16.size(), " f16 pointers in a ",
                      detail::weight_type_name<Scalar>(), " set")));
    auto check_experts = [&](const auto& a, const auto& bt, const char* names) {
      if (a.size() != E || bt.size() != E)
        throw shape_error(detail::mismatch(detail::cat("adapter expert pointers (", names, ")"), detail::cat(E, ", ", E),
                                           detail::cat(a.size(), ", ", bt.size())));
      for (std::size_t e = 0; e < E; ++e)
        if (!a[e] || !bt[e])
          throw config_error(detail::mismatch(detail::cat("adapter expert ", e, " weights"), "non-null pointers", "null"));
    };
    if (bf)
      check_experts(views_.A_bf16, views_.Bt_bf16, "A_bf16, Bt_bf16");
    else if (hf)
      check_experts(views_.A_f16, views_.Bt_f16, "A_f16, Bt_f16");
    else
      check_experts(views_.A, views_.Bt, "A, Bt");
    if (!std::isfinite(scale))
      throw config_error(detail::mismatch("adapter scale", "a finite value", scale));
    const double s = views_.scaling * scale;
    if (!std::isfinite(views_.scaling) || !std::isfinite(static_cast<Scalar>(s)))
      throw config_error(detail::mismatch("adapter scaling * scale", "a finite value of the layer's scalar", s));
    effective_ = static_cast<Scalar>(s);
    if (check_values) check_finite();
  }

  void check_finite() const {
    const Index E = views_.num_experts, r = views_.rank, in = views_.in_features, out = views_.out_features;
    auto check = [](const auto* p, Index n, const std::string& field) {
      for (Index i = 0; i < n; ++i)
        if (!std::isfinite(static_cast<double>(to_float(p[i]))))
          throw numeric_error(detail::cat(field, ": expected finite values, got ", to_float(p[i]), " at element ", i));
    };
    if (views_.router_weight) check(views_.router_weight, E * in, "adapter router.weight");
    if (views_.router_bias) check(views_.router_bias, E, "adapter router.bias");
    for (Index e = 0; e < E; ++e) {
      const auto i = static_cast<std::size_t>(e);
      const std::string a = detail::cat("adapter expert ", e, " lora_A"), b = detail::cat("adapter expert ", e, " lora_B");
      if (!views_.A_bf16.empty()) {
        check(views_.A_bf16[i], r * in, a);
        check(views_.Bt_bf16[i], r * out, b);
      } else if (!views_.A_f16.empty()) {
        check(views_.A_f16[i], r * in, a);
        check(views_.Bt_f16[i], r * out, b);
      } else {
        check(views_.A[i], r * in, a);
        check(views_.Bt[i], r * out, b);
      }
    }
  }

  SetAdapterViews<Scalar> views_;
  std::shared_ptr<const void> owner_;
  double scale_ = 1;
  Scalar effective_ = 0;
  const MoLoRAAdapter<Scalar>* molora_ = nullptr;
  const LoRA<Scalar>* lora_ = nullptr;
};

// The routing of a batch over a set, ragged (k differs between adapters): token t's pairs
// are [offsets[t], offsets[t+1]), each an expert of the token's own adapter and its weight.
template <class Scalar>
struct SetRouting {
  std::vector<std::int32_t> adapter;   // [T] adapter of each token, -1 = base only
  std::vector<Index> offsets;          // [T + 1]
  std::vector<std::int32_t> experts;   // [pairs] expert id within the token's adapter
  std::vector<Scalar> weights;         // [pairs] gate weight

  Index num_tokens() const { return static_cast<Index>(adapter.size()); }
  Index num_pairs() const { return offsets.empty() ? 0 : offsets.back(); }
  Index top_k(Index t) const { return offsets[static_cast<std::size_t>(t) + 1] - offsets[static_cast<std::size_t>(t)]; }
};

// Which adapter each token uses: a view of T int32 (-1 = base only). Converts from a
// std::vector; the caller's array must outlive the call.
struct TokenAdapters {
  const std::int32_t* ids = nullptr;
  Index size = 0;
  TokenAdapters(const std::int32_t* p, Index n) : ids(p), size(n) {}
  TokenAdapters(const std::vector<std::int32_t>& v) : ids(v.data()), size(static_cast<Index>(v.size())) {}  // NOLINT
};

// num_tokens consecutive tokens that use one adapter (Punica's segments).
struct AdapterSegment {
  Index num_tokens = 0;
  std::int32_t adapter = -1;
};

// Everything an adapter set's forward writes besides its output. One per thread, reused:
// a warm forward of the same or a smaller batch allocates nothing (buffers only grow).
template <class Scalar>
struct AdapterSetWorkspace {
  std::vector<std::int32_t> token_adapter;   // [T] from segments
  std::vector<Index> adapter_offsets;        // [N + 1] adapter a's tokens: adapter_tokens[offsets[a]..]
  std::vector<std::int32_t> adapter_tokens;  // adapted tokens grouped by adapter, ascending within one
  RowMatrix<Scalar> logits;                  // [>= adapted tokens, max E]: row i is token adapter_tokens[i]
  std::vector<Scalar> probs;                 // [max E] softmax scratch
  SetRouting<Scalar> routing;                // the routing of the last forward
  DispatchPlan<Scalar> plan;                 // pairs grouped by virtual expert; slots = pair index
  std::vector<Scalar> kernel_scratch;        // per thread: the fused kernel's h tile and spill
  RowMatrix<Scalar> x_copy;                  // [T, in] copy of x when x and y share memory
  Generator rng{0x6d6f6c6f7261ULL};          // the sampling selection's draws
  detail::InUseFlag in_use;

  void seed(std::uint64_t s) { rng.seed(s); }
};

template <class Scalar>
class AdapterSet {
  static_assert(detail::is_supported_scalar<Scalar>, "molora::AdapterSet supports float and double");

public:
  using Workspace = AdapterSetWorkspace<Scalar>;
  using AdapterPtr = typename SetAdapter<Scalar>::Ptr;

  // A set over in -> out. A null adapter is an empty slot (its tokens get the base only: a
  // tenant without an adapter for this projection). Throws config_error for zero sizes and
  // shape_error naming the adapter whose in/out differ.
  AdapterSet(Index in_features, Index out_features, std::vector<AdapterPtr> adapters = {})
      : in_(in_features), out_(out_features), adapters_(std::move(adapters)) {
    if (in_ <= 0) throw config_error(detail::mismatch("in_features", "a value >= 1", in_));
    if (out_ <= 0) throw config_error(detail::mismatch("out_features", "a value >= 1", out_));
    if (adapters_.size() > static_cast<std::size_t>(INT32_MAX))
      throw config_error(detail::mismatch("number of adapters", "at most 2^31 - 1", adapters_.size()));
    first_virtual_.push_back(0);
    for (std::size_t a = 0; a < adapters_.size(); ++a) {
      const auto& p = adapters_[a];
      if (p) {
        if (p->in_features() != in_)
          throw shape_error(detail::mismatch(detail::cat("adapter ", a, " in_features"), in_, p->in_features()));
        if (p->out_features() != out_)
          throw shape_error(detail::mismatch(detail::cat("adapter ", a, " out_features"), out_, p->out_features()));
        const auto& v = p->views();
        const Index tile = kernels::fused_tile<Scalar>(v.rank, in_, out_);
        for (Index e = 0; e < v.num_experts; ++e) {
          const auto i = static_cast<std::size_t>(e);
          kernels::VirtualExpert<Scalar> x{v.A.empty() ? nullptr : v.A[i], v.Bt.empty() ? nullptr : v.Bt[i], in_, out_,
                                           v.rank, tile, p->effective_scaling()};
          if (!v.A_bf16.empty()) {
            x.a_bf16 = v.A_bf16[i];
            x.bt_bf16 = v.Bt_bf16[i];
          } else if (!v.A_f16.empty()) {
            x.a_f16 = v.A_f16[i];
            x.bt_f16 = v.Bt_f16[i];
          }
          experts_.push_back(x);
        }
        max_rank_ = std::max(max_rank_, v.rank);
        max_experts_ = std::max(max_experts_, v.num_experts);
        max_top_k_ = std::max(max_top_k_, v.top_k);
      }
      first_virtual_.push_back(static_cast<Index>(experts_.size()));
    }
    if (experts_.size() > static_cast<std::size_t>(INT32_MAX))
      throw config_error(detail::mismatch("virtual experts", "at most 2^31 - 1", experts_.size()));
  }

  Index in_features() const { return in_; }
  Index out_features() const { return out_; }
  Index size() const { return static_cast<Index>(adapters_.size()); }
  // Adapter a (may be null: an empty slot). Throws shape_error for a outside [0, size()).
  const AdapterPtr& adapter(Index a) const { return adapters_[static_cast<std::size_t>(checked_adapter(a))]; }
  const std::vector<AdapterPtr>& adapters() const { return adapters_; }
  Index num_virtual_experts() const { return static_cast<Index>(experts_.size()); }
  // Virtual expert id of adapter a's expert e: first_virtual(a) + e.
  Index first_virtual(Index a) const { return first_virtual_[static_cast<std::size_t>(checked_adapter(a))]; }
  Index max_rank() const { return max_rank_; }
  Index max_experts() const { return max_experts_; }

  // y[t] += delta of adapter ids[t] for x[t] (nothing for -1), x [T, in], y [T, out]. Returns
  // the routing used (it lives in ws). x and y may share memory (x is then copied into ws).
  // Throws shape_error on shapes, numeric_error naming the token on an adapter id outside
  // [-1, size()) or non-finite router logits, state_error on a workspace in use; y is
  // unchanged when it throws (every check and the routing come before y is written).
  template <class Derived>
  const SetRouting<Scalar>& add_delta(const Eigen::MatrixBase<Derived>& x, TokenAdapters ids, RowRef<Scalar> y,
                                      Workspace& ws) const {
    const detail::WorkspaceGuard hold(ws.in_use, "AdapterSetWorkspace");
    const ConstRowRef<Scalar> xr(x);
    check_io(xr, y);
    if (ids.size != xr.rows())
      throw shape_error(detail::mismatch("adapter ids (one per token)", xr.rows(), ids.size));
    return run(xr, ids, y, ws);
  }
  // The same with segments of consecutive tokens (their lengths must sum to T).
  template <class Derived>
  const SetRouting<Scalar>& add_delta_segments(const Eigen::MatrixBase<Derived>& x,
                                               const std::vector<AdapterSegment>& segments, RowRef<Scalar> y,
                                               Workspace& ws) const {
    const detail::WorkspaceGuard hold(ws.in_use, "AdapterSetWorkspace");
    const ConstRowRef<Scalar> xr(x);
    check_io(xr, y);
    Index total = 0;
    for (std::size_t i = 0; i < segments.size(); ++i) {
      if (segments[i].num_tokens < 0)
        throw shape_error(detail::mismatch(detail::cat("segment ", i, " num_tokens"), "a value >= 0",
                                           segments[i].num_tokens));
      total += segments[i].num_tokens;
    }
    if (total != xr.rows()) throw shape_error(detail::mismatch("segments' total num_tokens", xr.rows(), total));
    ws.token_adapter.resize(static_cast<std::size_t>(total));
    Index t = 0;
    for (const AdapterSegment& s : segments)
      for (Index i = 0; i < s.num_tokens; ++i) ws.token_adapter[static_cast<std::size_t>(t++)] = s.adapter;
    return run(xr, TokenAdapters(ws.token_adapter.data(), total), y, ws);
  }

  // y += delta with the routing supplied by the caller (task-annotated serving, or a
  // benchmark's synthetic expert load): routing.adapter [T], offsets [T + 1], and for each
  // token between 1 and E_a distinct experts of its adapter with finite weights (none for -1
  // or an empty slot). Throws shape_error / numeric_error naming the token; y is then
  // unchanged. A non-finite x is not checked here (no router runs): it stays in its rows.
  template <class Derived>
  void add_delta_routed(const Eigen::MatrixBase<Derived>& x, const SetRouting<Scalar>& routing, RowRef<Scalar> y,
                        Workspace& ws) const {
    const detail::WorkspaceGuard hold(ws.in_use, "AdapterSetWorkspace");
    const ConstRowRef<Scalar> xr(x);
    check_io(xr, y);
    validate(routing, xr.rows());
    const ConstRowRef<Scalar> xs = unaliased(xr, y, ws);
    ws.routing.adapter = routing.adapter;  // same sizes when warm: no allocation
    ws.routing.offsets = routing.offsets;
    ws.routing.experts = routing.experts;
    ws.routing.weights = routing.weights;
    build_plan(ws);
    apply(xs, y, ws);
  }

  // Throws shape_error / numeric_error naming the token unless routing is a valid ragged
  // routing of T tokens over this set (see add_delta_routed).
  void validate(const SetRouting<Scalar>& r, Index T) const {
    if (r.num_tokens() != T) throw shape_error(detail::mismatch("routing.adapter (one per token)", T, r.num_tokens()));
    if (static_cast<Index>(r.offsets.size()) != T + 1 || r.offsets[0] != 0)
      throw shape_error(detail::mismatch("routing.offsets", detail::cat("T + 1 = ", T + 1, " offsets from 0"),
                                         detail::cat(r.offsets.size(), " offsets from ", r.offsets.empty() ? -1 : r.offsets[0])));
    if (static_cast<Index>(r.experts.size()) != r.offsets.back() || r.weights.size() != r.experts.size())
      throw shape_error(detail::mismatch("routing.experts and routing.weights sizes", r.offsets.back(),
                                         detail::cat(r.experts.size(), " and ", r.weights.size())));
    for (Index t = 0; t < T; ++t) {
      const std::int32_t a = r.adapter[static_cast<std::size_t>(t)];
      if (a < -1 || a >= size())
        throw numeric_error(detail::cat("routing.adapter of token ", t, ": expected -1 or an adapter id in [0, ", size(),
                                        "), got ", a));
      const Index b = r.offsets[static_cast<std::size_t>(t)], k = r.top_k(t);
      const bool adapted = a >= 0 && adapters_[static_cast<std::size_t>(a)];
      const Index E = adapted ? adapters_[static_cast<std::size_t>(a)]->num_experts() : 0;
      if (adapted ? (k < 1 || k > E) : k != 0)
        throw shape_error(detail::mismatch(detail::cat("routing pairs of token ", t),
                                           adapted ? detail::cat("1..", E) : std::string("0 (base only)"), k));
      for (Index s = 0; s < k; ++s) {
        const std::int32_t e = r.experts[static_cast<std::size_t>(b + s)];
        if (e < 0 || e >= E)
          throw numeric_error(detail::cat("routing.experts of token ", t, " slot ", s, ": expected an expert id in [0, ",
                                          E, "), got ", e));
        for (Index j = 0; j < s; ++j)
          if (r.experts[static_cast<std::size_t>(b + j)] == e)
            throw numeric_error(detail::cat("routing.experts of token ", t, ": expected distinct experts, got expert ", e,
                                            " in slots ", j, " and ", s));
        const Scalar g = r.weights[static_cast<std::size_t>(b + s)];
        if (!std::isfinite(static_cast<double>(g)))
          throw numeric_error(detail::cat("routing.weights of token ", t, " slot ", s, ": expected a finite value, got ", g));
      }
    }
  }

  // The routing alone (router logits into ws.logits, the pairs into ws.routing and ws.plan),
  // without touching any output. Throws as add_delta does.
  template <class Derived>
  const SetRouting<Scalar>& route_tokens(const Eigen::MatrixBase<Derived>& x, TokenAdapters ids,
                                         Workspace& ws) const {
    const detail::WorkspaceGuard hold(ws.in_use, "AdapterSetWorkspace");
    const ConstRowRef<Scalar> xr(x);
    check_x(xr);
    if (ids.size != xr.rows())
      throw shape_error(detail::mismatch("adapter ids (one per token)", xr.rows(), ids.size));
    compute_routing(xr, ids, ws);
    return ws.routing;
  }

private:
  Index checked_adapter(Index a) const {
    if (a < 0 || a >= size())
      throw shape_error(detail::mismatch("adapter index", detail::cat("[0, ", size(), ")"), a));
    return a;
  }
  void check_x(const ConstRowRef<Scalar>& x) const {
    if (x.cols() != in_) throw shape_error(detail::mismatch("x columns (in_features)", in_, x.cols()));
  }
  void check_io(const ConstRowRef<Scalar>& x, const RowRef<Scalar>& y) const {
    check_x(x);
    if (y.rows() != x.rows() || y.cols() != out_)
      throw shape_error(detail::mismatch("y shape", detail::shape_str(x.rows(), out_), detail::shape_str(y.rows(), y.cols())));
  }

  // x itself, or its copy in ws when it shares memory with y.
  static ConstRowRef<Scalar> unaliased(const ConstRowRef<Scalar>& x, const RowRef<Scalar>& y, Workspace& ws) {
    if (!detail::overlaps(x, y)) return x;
    ws.x_copy = x;
    return ConstRowRef<Scalar>(ws.x_copy);
  }

  const SetRouting<Scalar>& run(const ConstRowRef<Scalar>& x, TokenAdapters ids, RowRef<Scalar>& y,
                                Workspace& ws) const {
    const ConstRowRef<Scalar> xs = unaliased(x, y, ws);
    compute_routing(xs, ids, ws);
    apply(xs, y, ws);
    return ws.routing;
  }

  // Tokens grouped by adapter (counting sort), each adapter's router over its own tokens,
  // gating per token into the ragged routing, then all pairs grouped by virtual expert
  // (second counting sort) into ws.plan.
  void compute_routing(const ConstRowRef<Scalar>& x, TokenAdapters ids, Workspace& ws) const {
    const Index T = x.rows(), N = size();
    auto& rt = ws.routing;
    rt.adapter.resize(static_cast<std::size_t>(T));
    rt.offsets.resize(static_cast<std::size_t>(T) + 1);
    ws.adapter_offsets.assign(static_cast<std::size_t>(N) + 1, 0);
    rt.offsets[0] = 0;
    for (Index t = 0; t < T; ++t) {
      std::int32_t a = ids.ids[t];
      if (a < -1 || a >= N)
        throw numeric_error(detail::cat("adapter id of token ", t, ": expected -1 or an adapter id in [0, ", N,
                                        "), got ", a));
      if (a >= 0 && !adapters_[static_cast<std::size_t>(a)]) a = -1;  // empty slot: base only
      rt.adapter[static_cast<std::size_t>(t)] = a;
      Index k = 0;
      if (a >= 0) {
        ++ws.adapter_offsets[static_cast<std::size_t>(a) + 1];
        k = adapters_[static_cast<std::size_t>(a)]->top_k();
      }
      rt.offsets[static_cast<std::size_t>(t) + 1] = rt.offsets[static_cast<std::size_t>(t)] + k;
    }
    for (Index a = 0; a < N; ++a) ws.adapter_offsets[static_cast<std::size_t>(a) + 1] += ws.adapter_offsets[static_cast<std::size_t>(a)];
    const Index adapted = ws.adapter_offsets[static_cast<std::size_t>(N)];
    ws.adapter_tokens.resize(static_cast<std::size_t>(adapted));
    {
      // Places each token at its adapter's cursor; the cursors end at the next adapter's start.
      auto& cur = ws.adapter_offsets;
      for (Index t = 0; t < T; ++t) {
        const std::int32_t a = rt.adapter[static_cast<std::size_t>(t)];
        if (a >= 0) ws.adapter_tokens[static_cast<std::size_t>(cur[static_cast<std::size_t>(a)]++)] = static_cast<std::int32_t>(t);
      }
      for (Index a = N; a > 0; --a) cur[static_cast<std::size_t>(a)] = cur[static_cast<std::size_t>(a) - 1];
      cur[0] = 0;
    }
    const std::size_t pairs = static_cast<std::size_t>(rt.offsets.back());
    rt.experts.resize(pairs);
    rt.weights.resize(pairs);

    // Router logits of each adapter's tokens (rows of ws.logits in adapter order), by the
    // shrink kernel as a single adapter computes them, then gating.
    const Index Emax = std::max<Index>(max_experts_, 1);
    detail::reserve_rows(ws.logits, adapted, Emax);  // grows only
    reserve_scratch(ws, 1);
    ws.probs.resize(static_cast<std::size_t>(Emax));
    const Scalar* xp = x.data();
    const Index ldx = x.outerStride();
    for (Index a = 0; a < N; ++a) {
      const Index b = ws.adapter_offsets[static_cast<std::size_t>(a)], n = ws.adapter_offsets[static_cast<std::size_t>(a) + 1] - b;
      if (n == 0) continue;
      const SetAdapter<Scalar>& ad = *adapters_[static_cast<std::size_t>(a)];
      const std::int32_t* tok = ws.adapter_tokens.data() + b;
      if (!ad.has_router()) {  // E == 1: one pair of weight 1
        for (Index i = 0; i < n; ++i) {
          const auto p = static_cast<std::size_t>(rt.offsets[static_cast<std::size_t>(tok[i])]);
          rt.experts[p] = 0;
          rt.weights[p] = Scalar(1);
        }
        continue;
      }
      const auto& v = ad.views();
      const Index E = v.num_experts;
      const Scalar* xrows[kernels::kTile];
      for (Index i0 = 0; i0 < n; i0 += kernels::kTile) {
        const Index nt = std::min(kernels::kTile, n - i0);
        for (Index i = 0; i < nt; ++i) xrows[i] = xp + Index(tok[i0 + i]) * ldx;
        kernels::shrink(kernels::layer_arch{}, v.router_weight, in_, E, in_, xrows, nt, ws.logits.data() + (b + i0) * Emax,
                        Emax, ws.kernel_scratch.data());  // [nt, E] of rows stride Emax
      }
      const GatingOptions opt = ad.gating();
      for (Index i = 0; i < n; ++i) {
        Scalar* row = ws.logits.data() + (b + i) * Emax;
        if (v.router_bias)
          for (Index e = 0; e < E; ++e) row[e] += v.router_bias[e];
        const Index t = tok[i];
        for (Index e = 0; e < E; ++e)
          if (!std::isfinite(static_cast<double>(row[e]))) {
            detail::require_finite_token(x, t);  // a non-finite x is named as x
            throw numeric_error(detail::cat("router logits of token ", t, " (adapter ", a,
                                            "): expected finite values, got ", row[e], " for expert ", e));
          }
        const auto p = static_cast<std::size_t>(rt.offsets[static_cast<std::size_t>(t)]);
        detail::gate_row(static_cast<const Scalar*>(row), E, opt, rt.experts.data() + p, rt.weights.data() + p, &ws.rng,
                         ws.probs.data());
      }
    }
    build_plan(ws);
  }

  // Counting sort of all pairs by virtual expert (adapter's first virtual id + expert), tokens
  // ascending within each; plan.slots holds each pair's index in the ragged routing.
  void build_plan(Workspace& ws) const {
    const auto& rt = ws.routing;
    auto& p = ws.plan;
    const Index V = num_virtual_experts(), T = rt.num_tokens();
    p.offsets.assign(static_cast<std::size_t>(V) + 1, 0);
    for (Index t = 0; t < T; ++t) {
      const std::int32_t a = rt.adapter[static_cast<std::size_t>(t)];
      if (a < 0) continue;
      const Index v0 = first_virtual_[static_cast<std::size_t>(a)];
      for (Index q = rt.offsets[static_cast<std::size_t>(t)]; q < rt.offsets[static_cast<std::size_t>(t) + 1]; ++q)
        ++p.offsets[static_cast<std::size_t>(v0 + rt.experts[static_cast<std::size_t>(q)]) + 1];
    }
    p.active.clear();
    if (p.active.capacity() < static_cast<std::size_t>(V)) p.active.reserve(static_cast<std::size_t>(V));
    for (Index v = 0; v < V; ++v) {
      if (p.offsets[static_cast<std::size_t>(v) + 1] > 0) p.active.push_back(static_cast<std::int32_t>(v));
      p.offsets[static_cast<std::size_t>(v) + 1] += p.offsets[static_cast<std::size_t>(v)];
    }
    const auto pairs = static_cast<std::size_t>(rt.num_pairs());
    p.tokens.resize(pairs);
    p.slots.resize(pairs);
    p.gates.resize(pairs);
    for (Index t = 0; t < T; ++t) {
      const std::int32_t a = rt.adapter[static_cast<std::size_t>(t)];
      if (a < 0) continue;
      const Index v0 = first_virtual_[static_cast<std::size_t>(a)];
      for (Index q = rt.offsets[static_cast<std::size_t>(t)]; q < rt.offsets[static_cast<std::size_t>(t) + 1]; ++q) {
        const auto v = static_cast<std::size_t>(v0 + rt.experts[static_cast<std::size_t>(q)]);
        const auto at = static_cast<std::size_t>(p.offsets[v]++);
        p.tokens[at] = static_cast<std::int32_t>(t);
        p.slots[at] = static_cast<std::int32_t>(q);
        p.gates[at] = rt.weights[static_cast<std::size_t>(q)];
      }
    }
    for (Index v = V; v > 0; --v) p.offsets[static_cast<std::size_t>(v)] = p.offsets[static_cast<std::size_t>(v) - 1];
    p.offsets[0] = 0;
  }

  void reserve_scratch(Workspace& ws, int threads) const {
    using Arch = kernels::layer_arch;
    const Index per_thread = std::max(kernels::fused_scratch_size<Arch, Scalar>(std::max<Index>(max_rank_, 1)),
                                      kernels::fused_scratch_size<Arch, Scalar>(std::max<Index>(max_experts_, 1)));
    const auto need = static_cast<std::size_t>(per_thread * threads);
    if (ws.kernel_scratch.size() < need) ws.kernel_scratch.resize(need);
  }
  Index scratch_per_thread() const {
    using Arch = kernels::layer_arch;
    return std::max(kernels::fused_scratch_size<Arch, Scalar>(std::max<Index>(max_rank_, 1)),
                    kernels::fused_scratch_size<Arch, Scalar>(std::max<Index>(max_experts_, 1)));
  }

  // The fused kernel over all pairs; with OpenMP, one contiguous token range per thread
  // (each y row written by one thread, its experts in ascending order: the same bits for
  // any thread count).
  void apply(const ConstRowRef<Scalar>& x, RowRef<Scalar>& y, Workspace& ws) const {
    if (ws.plan.active.empty()) return;
    const Index T = x.rows();
    int threads = 1;
#if defined(MOLORA_USE_OPENMP)
    if (T >= 8 && !omp_in_parallel()) threads = std::max(1, omp_get_max_threads());
#endif
    reserve_scratch(ws, threads);
    const Index per_thread = scratch_per_thread();
    const auto& p = ws.plan;
    const kernels::PairGroups<Scalar> g{p.offsets.data(), p.tokens.data(), p.gates.data(), p.active.data(),
                                        static_cast<Index>(p.active.size())};
    const Scalar* xp = x.data();
    Scalar* yp = y.data();
    Scalar* scratch = ws.kernel_scratch.data();
    const Index ldx = x.outerStride(), ldy = y.outerStride();
    const kernels::VirtualExpert<Scalar>* ex = experts_.data();
#if defined(MOLORA_USE_OPENMP)
    if (threads > 1) {
#pragma omp parallel num_threads(threads)
      {
        const Index q = omp_get_thread_num(), Q = omp_get_num_threads();
        kernels::fused_set_tokens(kernels::layer_arch{}, ex, in_, out_, g, xp, ldx, yp, ldy, T * q / Q,
                                  T * (q + 1) / Q, scratch + q * per_thread);
      }
      return;
    }
#endif
    (void)per_thread;
    kernels::fused_set_tokens(kernels::layer_arch{}, ex, in_, out_, g, xp, ldx, yp, ldy, Index(0), T, scratch);
  }

  Index in_, out_;
  std::vector<AdapterPtr> adapters_;
  std::vector<Index> first_virtual_;                     // [N + 1]
  std::vector<kernels::VirtualExpert<Scalar>> experts_;  // [V]
  Index max_rank_ = 0, max_experts_ = 0, max_top_k_ = 0;
};

}  // namespace molora
