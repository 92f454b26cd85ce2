// MixLoRAFeedForward: MixLoRA's mixture at the feed-forward block (TUDB-Labs/MixLoRA). Each
// expert is the frozen gated FFN with its own LoRA on gate (w1), up (w3) and down (w2):
//   expert_e(x) = (W2 + dW2_e) [ act((W1 + dW1_e) x) * ((W3 + dW3_e) x) ]
//   y = sum over the top-k of g_e * expert_e(x),   g = softmax over all E, top-k, renormalised
// The router (`moe_gate`, no bias) reads the block's input. As in MixLoRA, the base products
// W1 x and W3 x are computed once for all tokens and shared by the experts; the down
// projection runs per expert, on that expert's hidden activations. The experts' LoRA weights
// live in three MoLoRAAdapters (one per projection); each expert's rows go through the
// adapters' one-expert path (MoLoRAAdapter::apply_expert).
// MixLoRAFeedForward<float, bf16 | f16> keeps the router and the experts in 16 bits (their
// MoLoRAAdapter / Router storage; the fused kernels and the router's logits kernel widen them
// as they load); the base FFN weights stay Scalar, as for a float block. Inference only.
#pragma once

#include <cmath>
#include <string>
#include <type_traits>
#include <vector>

#include "detail/checks.hpp"
#include "dispatch.hpp"
#include "gating.hpp"
#include "molora_linear.hpp"
#include "router.hpp"

namespace molora {

enum class Activation { silu, gelu, gelu_tanh, relu };

inline Activation activation_from_string(const std::string& s) {
  if (s == "silu" || s == "swish") return Activation::silu;
  if (s == "gelu") return Activation::gelu;
  if (s == "gelu_new" || s == "gelu_pytorch_tanh" || s == "gelu_tanh") return Activation::gelu_tanh;
  if (s == "relu") return Activation::relu;
  throw config_error(detail::mismatch("act_fn", "silu, gelu, gelu_new, gelu_pytorch_tanh or relu", "\"" + s + "\""));
}

struct MixLoRAFeedForwardConfig {
  Index hidden_size = 0;
  Index intermediate_size = 0;
  Index num_experts = 8;
  Index top_k = 2;
  Index rank = 16;
  double lora_alpha = 32;
  bool use_rslora = false;
  Activation act = Activation::silu;

  void validate() const { adapter_config(hidden_size, intermediate_size).validate(); }

  // The per-projection adapter configuration (in -> out); its router is unused.
  MoLoRAConfig adapter_config(Index in, Index out) const {
    MoLoRAConfig c;
    c.in_features = in;
    c.out_features = out;
    c.num_experts = num_experts;
    c.top_k = top_k;
    c.rank = rank;
    c.lora_alpha = lora_alpha;
    c.use_rslora = use_rslora;
    c.router_bias = false;
    c.normalize_top_k = true;
    return c;
  }
};

template <class Scalar>
struct MixLoRAWorkspace {
  GrowingMatrix<Scalar> logits;       // [T, E], storage only grows
  Routing<Scalar> routing;            // [T, k]
  DispatchPlan<Scalar> plan;
  std::vector<Scalar> probs;          // [E]
  RowMatrix<Scalar> gate_base;        // [T, inter] x W1^T
  RowMatrix<Scalar> up_base;          // [T, inter] x W3^T
  RowMatrix<Scalar> xg;               // [>= n_e, hidden] gathered tokens of one expert
  RowMatrix<Scalar> gate;             // [>= n_e, inter]
  RowMatrix<Scalar> up;               // [>= n_e, inter]
  RowMatrix<Scalar> down;             // [>= n_e, hidden]
  MoLoRAWorkspace<Scalar> inner;      // for the per-projection adapters
  RowMatrix<Scalar> x_copy;
  std::vector<Scalar> router_scratch; // a 16-bit router's logits kernel scratch
  detail::InUseFlag in_use;           // held by the forward writing this workspace
};

// AdapterWeight: the storage of the router weight and the experts' A and B (Scalar, or bf16 /
// f16 for a float block; the default Scalar is on the declaration in molora_linear.hpp).
template <class Scalar, class AdapterWeight>
class MixLoRAFeedForward {
  static constexpr bool kHalf = !std::is_same_v<AdapterWeight, Scalar>;

public:
  using Workspace = MixLoRAWorkspace<Scalar>;
  using Adapter = MoLoRAAdapter<Scalar, AdapterWeight>;

  explicit MixLoRAFeedForward(const MixLoRAFeedForwardConfig& config)
      : config_((config.validate(), config)),
        router_(config.hidden_size, config.num_experts, false),
        gate_(config.adapter_config(config.hidden_size, config.intermediate_size)),
        up_(config.adapter_config(config.hidden_size, config.intermediate_size)),
        down_(config.adapter_config(config.intermediate_size, config.hidden_size)) {
    w_gate_.setZero(config.intermediate_size, config.hidden_size);
    w_up_.setZero(config.intermediate_size, config.hidden_size);
    w_down_.setZero(config.hidden_size, config.intermediate_size);
  }

  const MixLoRAFeedForwardConfig& config() const { return config_; }
  Router<Scalar, AdapterWeight>& router() { return router_; }
  const Router<Scalar, AdapterWeight>& router() const { return router_; }
  // Expert weights per projection: gate_proj (w1), up_proj (w3), down_proj (w2).
  Adapter& gate_proj() { return gate_; }
  Adapter& up_proj() { return up_; }
  Adapter& down_proj() { return down_; }
  const Adapter& gate_proj() const { return gate_; }
  const Adapter& up_proj() const { return up_; }
  const Adapter& down_proj() const { return down_; }
  const RowMatrix<Scalar>& base_gate() const { return w_gate_; }
  const RowMatrix<Scalar>& base_up() const { return w_up_; }
  const RowMatrix<Scalar>& base_down() const { return w_down_; }

  // Frozen base weights in PyTorch layout: gate/up [inter, hidden], down [hidden, inter].
  template <class D1, class D2, class D3>
  void set_base(const Eigen::MatrixBase<D1>& gate, const Eigen::MatrixBase<D2>& up, const Eigen::MatrixBase<D3>& down) {
    detail::require_shape(gate, config_.intermediate_size, config_.hidden_size, "gate_proj.weight");
    detail::require_shape(up, config_.intermediate_size, config_.hidden_size, "up_proj.weight");
    detail::require_shape(down, config_.hidden_size, config_.intermediate_size, "down_proj.weight");
    detail::require_finite(gate, "gate_proj.weight");
    detail::require_finite(up, "up_proj.weight");
    detail::require_finite(down, "down_proj.weight");
    w_gate_ = gate.template cast<Scalar>();
    w_up_ = up.template cast<Scalar>();
    w_down_ = down.template cast<Scalar>();
  }

  // y = sum_top-k g_e expert_e(x) for x [T, hidden], y [T, hidden] (overwritten). Returns the
  // routing. Throws shape_error / numeric_error / state_error as MoLoRALinear does; y is
  // unchanged when it throws.
  template <class Derived>
  const Routing<Scalar>& forward(const Eigen::MatrixBase<Derived>& x_in, RowRef<Scalar> y, Workspace& ws) const {
    const detail::WorkspaceGuard hold(ws.in_use, "MixLoRAWorkspace");
    check_live();
    const ConstRowRef<Scalar> x_ref(x_in);
    const Index T = x_ref.rows(), H = config_.hidden_size, I = config_.intermediate_size, E = config_.num_experts;
    if (x_ref.cols() != H) throw shape_error(detail::mismatch("x columns (hidden_size)", H, x_ref.cols()));
    detail::require_shape(y, T, H, "y shape");
    if (T == 0) {
      ws.routing.resize(0, config_.top_k);
      return ws.routing;
    }
    const bool alias = detail::overlaps(x_ref, y);
    if (alias) ws.x_copy = x_ref;
    const ConstRowRef<Scalar> x = alias ? ConstRowRef<Scalar>(ws.x_copy) : x_ref;
    if (ws.logits.rows() != T || ws.logits.cols() != E) ws.logits.resize(T, E);
    if constexpr (kHalf) {  // the logits kernel widens the 16-bit weight as it loads it
      const auto need = static_cast<std::size_t>(router_.logits_scratch_size());
      if (ws.router_scratch.size() < need) ws.router_scratch.resize(need);
      RowRef<Scalar> logits(ws.logits);
      router_.logits_rows(x, logits, 0, T, ws.router_scratch.data());  // [T, E]
    } else {
      router_.logits_into(x, ws.logits);  // [T, E], Eigen's product (logits_rows would move the last bits)
    }
    for (Index t = 0; t < T; ++t)  // name x when a non-finite x made the logits so
      if (!detail::all_finite(ws.logits.row(t))) detail::require_finite_token(x, t);
    ws.probs.resize(static_cast<std::size_t>(E));
    GatingOptions opt{E, config_.top_k, true, Selection::top_k};
    route<Scalar, Generator>(ConstRowRef<Scalar>(ws.logits), opt, ws.routing, nullptr, ws.probs.data());
    ws.plan.build(ws.routing, E);

    if (ws.gate_base.rows() != T || ws.gate_base.cols() != I) ws.gate_base.resize(T, I);
    if (ws.up_base.rows() != T || ws.up_base.cols() != I) ws.up_base.resize(T, I);
    ws.gate_base.noalias() = x * w_gate_.transpose();  // [T, inter]
    ws.up_base.noalias() = x * w_up_.transpose();      // [T, inter]
    y.setZero();

    const Index n_max = ws.plan.max_count();
    detail::reserve_rows(ws.xg, n_max, H);
    detail::reserve_rows(ws.gate, n_max, I);
    detail::reserve_rows(ws.up, n_max, I);
    detail::reserve_rows(ws.down, n_max, H);
    for (const std::int32_t e : ws.plan.active) {
      const Index n = ws.plan.count(e), b = ws.plan.begin(e);
      const auto* tok = ws.plan.tokens.data() + b;
      const auto* g = ws.plan.gates.data() + b;
      auto xg = ws.xg.topRows(n);      // [n, hidden]
      auto gate = ws.gate.topRows(n);  // [n, inter]
      auto up = ws.up.topRows(n);      // [n, inter]
      auto down = ws.down.topRows(n);  // [n, hidden]
      for (Index i = 0; i < n; ++i) {
        xg.row(i) = x.row(tok[i]);
        gate.row(i) = ws.gate_base.row(tok[i]);
        up.row(i) = ws.up_base.row(tok[i]);
      }
      // Expert e's LoRA on each projection, gate 1 (g multiplies the block's output below):
      // apply_expert's work without its checks, which this forward has made (shapes, a live
      // block, finite x; the hidden rows are its own buffers). ws.inner is held with ws.
      gate_.apply_expert_unchecked(e, xg, gate, nullptr, ws.inner);  // (W1 + dW1_e) x: [n, inter]
      up_.apply_expert_unchecked(e, xg, up, nullptr, ws.inner);      // (W3 + dW3_e) x: [n, inter]
      apply_activation(gate);
      gate.array() *= up.array();                                    // act(.) * up: [n, inter]
      down.noalias() = gate * w_down_.transpose();                   // [n, hidden]
      down_.apply_expert_unchecked(e, gate, down, nullptr, ws.inner);
      for (Index i = 0; i < n; ++i) y.row(tok[i]) += g[i] * down.row(i);
    }
    return ws.routing;
  }

  template <class Derived>
  RowMatrix<Scalar> forward(const Eigen::MatrixBase<Derived>& x) const {
    Workspace ws;
    RowMatrix<Scalar> y(x.rows(), config_.hidden_size);
    forward(x, y, ws);
    return y;
  }

  // Throws state_error if this block was moved from (its base weights or adapters no longer
  // have the configured shapes).
  void check_live() const {
    const Index H = config_.hidden_size, I = config_.intermediate_size;
    if (w_gate_.rows() != I || w_gate_.cols() != H || w_up_.rows() != I || w_up_.cols() != H ||
        w_down_.rows() != H || w_down_.cols() != I || !router_.live() || router_.in_features() != H ||
        router_.num_experts() != config_.num_experts)
      throw state_error(detail::cat("MixLoRAFeedForward: expected a live block with gate_proj.weight ",
                                    detail::shape_str(I, H), ", got a moved-from one with gate_proj.weight ",
                                    detail::shape_str(w_gate_.rows(), w_gate_.cols())));
    gate_.check_live();
    up_.check_live();
    down_.check_live();
  }

private:
  template <class Block>
  void apply_activation(Block& m) const {
    switch (config_.act) {
      case Activation::silu:
        m = m.array() / (Scalar(1) + (-m.array()).exp());
        break;
      case Activation::gelu:
        for (Index i = 0; i < m.rows(); ++i)
          for (Index j = 0; j < m.cols(); ++j) {
            const Scalar v = m(i, j);
            m(i, j) = Scalar(0.5) * v * (Scalar(1) + std::erf(v * Scalar(0.70710678118654752440)));
          }
        break;
      case Activation::gelu_tanh:
        for (Index i = 0; i < m.rows(); ++i)
          for (Index j = 0; j < m.cols(); ++j) {
            const Scalar v = m(i, j);
            m(i, j) = Scalar(0.5) * v *
                      (Scalar(1) + std::tanh(Scalar(0.79788456080286535588) * (v + Scalar(0.044715) * v * v * v)));
          }
        break;
      case Activation::relu:
        m = m.cwiseMax(Scalar(0));
        break;
    }
  }

  MixLoRAFeedForwardConfig config_;
  Router<Scalar, AdapterWeight> router_;
  Adapter gate_, up_, down_;
  RowMatrix<Scalar> w_gate_, w_up_, w_down_;
};

}  // namespace molora
