// MixLoRA checkpoints (TUDB-Labs' adapter_config.json + adapter_model.bin converted to
// safetensors): the config parser (MixLoRAConfig) and the loader of one decoder layer's
// mixture-of-experts feed-forward block (load_mixlora_ffn, a MixLoRAFeedForward over the
// caller's frozen FFN weights). The loader bounds num_experts by io::Limits and checks every
// MLP key of the layer and every shape against the config before it builds the block; the
// values are checked finite as the block is built from them. A bad file throws format_error
// naming the file, the module and the key, and nothing is returned.
// load_mixlora_ffn<float, bf16 | f16> keeps the router and the experts in 16 bits, as the
// file stores them (per tensor, as load_ming_moe does); the base FFN weights stay float.
#pragma once

#include <Eigen/Core>
#include <nlohmann/json.hpp>

#include <string>
#include <type_traits>
#include <vector>

#include "../errors.hpp"
#include "../mixlora_ffn.hpp"
#include "../molora_linear.hpp"
#include "../types.hpp"
#include "input.hpp"
#include "json_fields.hpp"
#include "loader.hpp"
#include "safetensors_reader.hpp"

namespace molora::io {

// ---- config --------------------------------------------------------------------------------

// MixLoRA (TUDB-Labs/MixLoRA, mixlora/config.py) adapter_config.json.
//
// MixLoRA 0.2.3 implements one routing strategy (softmax over all experts, top-k,
// renormalised), which the configs it writes call "mixlora" and its code also calls
// "mixtral"; both are accepted, anything else ("mixlora-dynamic", "mixlora-switch", ...) is
// rejected as unsupported.
// An "expert_lora" object overrides r / lora_alpha / lora_dropout / use_rslora for the experts
// only, as MixLoRA does; `attention` keeps the top-level values.
struct MixLoRAConfig {
  LoraParams attention;                    // q/k/v/o (and the top-level values)
  LoraParams expert;                       // each expert's FFN LoRA
  std::string routing_strategy = "mixtral";
  Index num_experts = 0;
  Index top_k = 2;                         // MixLoRA's default
  std::vector<std::string> target_modules; // the enabled ones (dict entries set true, or the list)
  std::string act_fn;                      // empty: use the FFN's own activation
  double jitter_noise = 0;
  double router_aux_loss_coef = 0.001;     // MixLoRA's code default
  double router_init_range = 0.02;
  bool router_loss = true;
  std::string base_model_name_or_path;
  std::string source;                      // where it was parsed from, for the loader's messages

  static MixLoRAConfig from_string(const std::string& text, const std::string& source = "<string>") {
    const nlohmann::json j = internal::JsonFields::parse_object(text, source);
    const internal::JsonFields f(j, source);
    internal::read_peft_type(f, "MIXLORA");
    MixLoRAConfig c;
    c.source = source;
    c.routing_strategy = f.string("routing_strategy");
    if (c.routing_strategy != "mixtral" && c.routing_strategy != "mixlora")
      f.fail("routing_strategy", "\"mixtral\" (other strategies are unsupported)", "\"" + c.routing_strategy + "\"");
    internal::reject_dora(f);
    c.attention.r = f.integer("r", 1);
    c.attention.lora_alpha = f.number("lora_alpha", 0, internal::kHuge, true);
    c.attention.lora_dropout = f.number_or("lora_dropout", 0, 1, false, 0.0);
    c.attention.use_rslora = f.boolean_or("use_rslora", false);
    c.expert = c.attention;
    if (f.has("expert_lora")) {
      const auto& e = f.at("expert_lora");
      if (!e.is_object()) f.fail("expert_lora", "an object", internal::JsonFields::describe(e));
      const internal::JsonFields ef(e, source, "expert_lora.");
      c.expert.r = ef.integer_or("r", 1, c.expert.r);
      c.expert.lora_alpha = ef.number_or("lora_alpha", 0, internal::kHuge, true, c.expert.lora_alpha);
      c.expert.lora_dropout = ef.number_or("lora_dropout", 0, 1, false, c.expert.lora_dropout);
      c.expert.use_rslora = ef.boolean_or("use_rslora", c.expert.use_rslora);
      internal::reject_dora(ef);
    }
    c.num_experts = f.integer("num_experts", 1);
    c.top_k = f.integer_or("top_k", 1, 2);
    if (c.top_k > c.num_experts)
      f.fail("top_k", molora::detail::cat("an integer in [1, num_experts = ", c.num_experts, "]"), std::to_string(c.top_k));
    const auto& t = f.at("target_modules");
    if (t.is_array()) {
      for (const auto& e : t) {
        if (!e.is_string()) f.fail("target_modules", "a list of strings or an object of string to bool", internal::JsonFields::describe(t));
        c.target_modules.push_back(e.get<std::string>());
      }
    } else if (t.is_object()) {
      for (auto it = t.begin(); it != t.end(); ++it) {
        if (!it.value().is_boolean())
          f.fail(molora::detail::cat("target_modules.", it.key()), "true or false", internal::JsonFields::describe(it.value()));
        if (it.value().get<bool>()) c.target_modules.push_back(it.key());
      }
    } else {
      f.fail("target_modules", "a list of strings or an object of string to bool", internal::JsonFields::describe(t));
    }
    c.act_fn = f.string_or("act_fn", "");
    c.jitter_noise = f.number_or("jitter_noise", 0, 1, false, 0.0);
    c.router_aux_loss_coef = f.number_or("router_aux_loss_coef", 0, internal::kHuge, false, 0.001);
    c.router_init_range = f.number_or("router_init_range", 0, internal::kHuge, false, 0.02);
    c.router_loss = f.boolean_or("router_loss", true);
    c.base_model_name_or_path = f.has("base_model_name_or_path") && f.at("base_model_name_or_path").is_string()
                                    ? f.at("base_model_name_or_path").get<std::string>()
                                    : std::string();
    return c;
  }

  // Reads `path` (a regular file of at most limits.max_config_bytes) and parses it.
  static MixLoRAConfig from_file(const std::string& path, const Limits& limits = {}) {
    return from_string(internal::JsonFields::read_file(path, limits.max_config_bytes), path);
  }
};

// ---- loader --------------------------------------------------------------------------------

// Loads MixLoRA's adapter_config.json and adapter weights (adapter_model.bin converted by
// tools/convert_checkpoint.py, same keys) for decoder layer `layer` into a
// MixLoRAFeedForward whose base FFN weights (gate/up [inter, hidden], down [hidden, inter])
// the caller gives. Keys: `mixlora.layers.{L}.mlp.moe_gate.weight` [E, hidden] and
// `mixlora.layers.{L}.mlp.{gate,up,down}_proj.experts.{e}.lora_A.weight` / `lora_B.weight`.
// Other layers' keys and attention LoRA keys (`...self_attn...`) are left for the caller
// (an attention LoRA is a plain LoRA: read its two tensors with the reader's matrix() and
// LoRA::set_A / set_B); unknown MLP keys of this layer are errors.
// num_experts must be at most limits.max_experts, and is checked against the file before
// anything depending on it is allocated.
// Weight (Scalar, or bf16 / f16 for float): the router's and the experts' storage. A tensor
// stored in Weight's dtype is kept as stored, one in another float dtype rounded to nearest
// even, tensor by tensor (an F32 value past f16's range: numeric_error naming the file, the
// module, the key and the index); Weight = Scalar widens every 16-bit tensor exactly.
template <class Scalar, class Weight = Scalar, class DG, class DU, class DD>
MixLoRAFeedForward<Scalar, Weight> load_mixlora_ffn(const MixLoRAConfig& cfg, const SafetensorsReader& r, Index layer,
                                            const Eigen::MatrixBase<DG>& w_gate, const Eigen::MatrixBase<DU>& w_up,
                                            const Eigen::MatrixBase<DD>& w_down, const std::string& act_fn = "silu",
                                            const Limits& limits = {}) {
  const std::string p = molora::detail::cat("mixlora.layers.", layer, ".mlp.");
  const std::string module = p.substr(0, p.size() - 1);
  const std::string cfg_source = cfg.source.empty() ? std::string("<MixLoRAConfig>") : cfg.source;
  const Index E = cfg.num_experts;
  if (E > limits.max_experts)
    throw format_error(molora::detail::cat(cfg_source, ": field 'num_experts': expected at most ", limits.max_experts,
                                           " (Limits::max_experts), got ", E));
  static const char* const projs[] = {"gate_proj", "up_proj", "down_proj"};
  // Every MLP key of this layer must be expected for E experts (decided from the key itself).
  auto expected = [&](const std::string& rest) {
    if (rest == "moe_gate.weight") return true;
    for (const char* proj : projs) {
      const std::string head = std::string(proj) + ".experts.";
      if (!internal::starts_with(rest, head)) continue;
      const std::size_t dot = rest.find('.', head.size());
      if (dot == std::string::npos) return false;
      const std::string tail = rest.substr(dot);
      Index e = 0;
      return (tail == ".lora_A.weight" || tail == ".lora_B.weight") && internal::parse_index(rest, head.size(), dot, e) && e < E;
    }
    return false;
  };
  for (const auto& key : r.names())
    if (internal::starts_with(key, p) && !expected(key.substr(p.size())))
      internal::fail(r.source(), module, molora::detail::cat("unexpected tensor '", key, "' for num_experts = ", E));
  auto key_of = [&](const char* proj, Index e, const char* ab) {
    return molora::detail::cat(p, proj, ".experts.", e, ".", ab, ".weight");
  };
  if (!r.has(p + "moe_gate.weight")) internal::fail(r.source(), module, "missing tensor '" + p + "moe_gate.weight'");
  const auto [er, hidden] = internal::dims2(r, p + "moe_gate.weight", module);
  if (er != E) internal::fail(r.source(), module, molora::detail::mismatch("moe_gate.weight rows (num_experts)", E, er));
  for (const char* proj : projs)  // E now agrees with a tensor in the file
    for (Index e = 0; e < E; ++e)
      for (const char* ab : {"lora_A", "lora_B"})
        if (!r.has(key_of(proj, e, ab))) internal::fail(r.source(), module, "missing tensor '" + key_of(proj, e, ab) + "'");
  const Index inter = w_gate.rows();
  if (w_gate.cols() != hidden)
    internal::fail(r.source(), module, molora::detail::mismatch("base gate_proj columns (hidden of moe_gate)", hidden, w_gate.cols()));
  internal::check_scaling<Scalar>(cfg_source, module, cfg.expert.lora_alpha, cfg.expert.r, cfg.expert.use_rslora);
  struct Proj {
    const char* name;
    Index in, out;
  };
  const Proj shapes[] = {{"gate_proj", hidden, inter}, {"up_proj", hidden, inter}, {"down_proj", inter, hidden}};
  for (const Proj& pr : shapes)
    for (Index e = 0; e < E; ++e) {
      internal::expect2(r, key_of(pr.name, e, "lora_A"), module, cfg.expert.r, pr.in);
      internal::expect2(r, key_of(pr.name, e, "lora_B"), module, pr.out, cfg.expert.r);
    }

  return internal::building(r.source(), module, [&, hid = hidden] {
    MixLoRAFeedForwardConfig fc;
    fc.hidden_size = hid;
    fc.intermediate_size = inter;
    fc.num_experts = E;
    fc.top_k = cfg.top_k;
    fc.rank = cfg.expert.r;
    fc.lora_alpha = cfg.expert.lora_alpha;
    fc.use_rslora = cfg.expert.use_rslora;
    fc.act = activation_from_string(cfg.act_fn.empty() ? act_fn : cfg.act_fn);
    MixLoRAFeedForward<Scalar, Weight> ffn(fc);
    ffn.set_base(w_gate, w_up, w_down);
    MoLoRAAdapter<Scalar, Weight>* adapters[] = {&ffn.gate_proj(), &ffn.up_proj(), &ffn.down_proj()};
    if constexpr (std::is_same_v<Weight, Scalar>) {
      ffn.router().set_weight(internal::finite_matrix<Scalar>(r, p + "moe_gate.weight", module));
      for (int j = 0; j < 3; ++j)
        for (Index e = 0; e < E; ++e) {
          adapters[j]->set_expert_A(e, internal::finite_matrix<Scalar>(r, key_of(projs[j], e, "lora_A"), module));
          adapters[j]->set_expert_B(e, internal::finite_matrix<Scalar>(r, key_of(projs[j], e, "lora_B"), module));
        }
    } else {
      ffn.router().set_weight_stored(internal::stored_weights<Weight>(r, p + "moe_gate.weight", module).data(), E, hid);
      for (int j = 0; j < 3; ++j)
        for (Index e = 0; e < E; ++e) {
          adapters[j]->set_expert_A_stored(e, internal::stored_weights<Weight>(r, key_of(projs[j], e, "lora_A"), module).data());
          adapters[j]->set_expert_B_stored(e, internal::stored_weights<Weight>(r, key_of(projs[j], e, "lora_B"), module).data());
        }
    }
    return ffn;
  });
}

}  // namespace molora::io
