// Checkpoint layouts: PEFT LoRA, MING-MOE and MixLoRA adapters loaded into molora's layers,
// and molora's own layers saved in MING-MOE's layout (see ../shared/REFERENCES.md for the key
// names). Loaders read the whole checkpoint, check that config and tensors agree (expert
// count, rank, shapes, missing or extra keys) and only then build and return new layers, so
// a bad file leaves nothing half-loaded. Every failure is a format_error naming the file,
// the module and the key.
#pragma once

#include <filesystem>
#include <fstream>
#include <map>
#include <optional>
#include <regex>
#include <set>
#include <string>
#include <vector>

#include "../lora.hpp"
#include "../mixlora_ffn.hpp"
#include "../molora_linear.hpp"
#include "json_config.hpp"
#include "safetensors.hpp"

namespace molora::io {

namespace detail {

// Keeps a parameter out of template deduction (std::type_identity before C++20).
template <class T>
struct identity {
  using type = T;
};

inline bool starts_with(const std::string& s, const std::string& p) { return s.compare(0, p.size(), p) == 0; }
inline bool ends_with(const std::string& s, const std::string& p) {
  return s.size() >= p.size() && s.compare(s.size() - p.size(), p.size(), p) == 0;
}

[[noreturn]] inline void fail(const std::string& file, const std::string& module, const std::string& what) {
  throw format_error(molora::detail::cat(file, ": module '", module, "': ", what));
}

// Shape of a tensor as [rows, cols]; format_error unless it is 2-D.
inline std::pair<Index, Index> dims2(const SafetensorsReader& r, const std::string& key, const std::string& module) {
  const auto& s = r.info(key).shape;
  if (s.size() != 2)
    fail(r.source(), module, molora::detail::mismatch("tensor '" + key + "' rank", 2, s.size()));
  return {static_cast<Index>(s[0]), static_cast<Index>(s[1])};
}

inline void expect2(const SafetensorsReader& r, const std::string& key, const std::string& module, Index rows,
                    Index cols) {
  const auto d = dims2(r, key, module);
  if (d.first != rows || d.second != cols)
    fail(r.source(), module,
         molora::detail::mismatch("tensor '" + key + "' shape", molora::detail::shape_str(rows, cols),
                                  molora::detail::shape_str(d.first, d.second)));
}

// Reads a float tensor and rejects non-finite entries, naming the key.
template <class Scalar>
RowMatrix<Scalar> finite_matrix(const SafetensorsReader& r, const std::string& key, const std::string& module) {
  RowMatrix<Scalar> m = r.matrix<Scalar>(key);
  for (Index i = 0; i < m.size(); ++i)
    if (!std::isfinite(static_cast<double>(m.data()[i])))
      fail(r.source(), module,
           molora::detail::cat("tensor '", key, "': expected finite values, got ", m.data()[i], " at flat index ", i));
  return m;
}

inline std::string path_join(const std::string& dir, const std::string& file) {
  return (std::filesystem::path(dir) / file).string();
}

}  // namespace detail

// ---- PEFT LoRA ----------------------------------------------------------------------------

// A PEFT LoRA adapter: one LoRA per target module, keyed by its module path
// (`layers.0.proj` for the key `base_model.model.layers.0.proj.lora_A.weight`).
template <class Scalar>
struct PeftLoraAdapter {
  PeftLoraConfig config;
  std::map<std::string, LoRA<Scalar>> modules;
  std::string source;

  const LoRA<Scalar>& at(const std::string& module) const {
    auto it = modules.find(module);
    if (it == modules.end()) throw format_error(molora::detail::cat(source, ": no LoRA for module '", module, "'"));
    return it->second;
  }
};

// Loads `config_path` (adapter_config.json) and `weights_path` (adapter_model.safetensors).
// Keys must be `base_model.model.<module>.lora_A.weight` [r, in] and `.lora_B.weight`
// [out, r] with r from the config, both present for every module, and each module must be
// one the config's target_modules names (PEFT's rule: the module path equals a target or
// ends with "." + target; a single string is a regex that must match the whole path).
template <class Scalar>
PeftLoraAdapter<Scalar> load_peft_lora(const std::string& config_path, const std::string& weights_path) {
  PeftLoraAdapter<Scalar> out{PeftLoraConfig::from_file(config_path), {}, weights_path};
  const PeftLoraConfig& cfg = out.config;
  const SafetensorsReader r(weights_path);
  const std::string prefix = "base_model.model.";
  std::set<std::string> names;
  for (const auto& key : r.names()) {
    std::string module;
    if (detail::starts_with(key, prefix) && detail::ends_with(key, ".lora_A.weight"))
      module = key.substr(prefix.size(), key.size() - prefix.size() - std::string(".lora_A.weight").size());
    else if (detail::starts_with(key, prefix) && detail::ends_with(key, ".lora_B.weight"))
      module = key.substr(prefix.size(), key.size() - prefix.size() - std::string(".lora_B.weight").size());
    else
      throw format_error(molora::detail::cat(weights_path, ": tensor '", key,
                                             "': expected a key base_model.model.<module>.lora_A.weight or .lora_B.weight"));
    names.insert(module);
  }
  if (names.empty()) throw format_error(weights_path + ": expected LoRA tensors, got none");
  for (const auto& module : names) {
    bool targeted = false;
    if (cfg.target_modules_is_regex) {
      targeted = std::regex_match(module, std::regex(cfg.target_modules_regex));
    } else {
      for (const auto& t : cfg.target_modules) targeted = targeted || module == t || detail::ends_with(module, "." + t);
    }
    if (!targeted)
      detail::fail(weights_path, module, "not among the config's target_modules (" + config_path + ")");
    const std::string ka = prefix + module + ".lora_A.weight", kb = prefix + module + ".lora_B.weight";
    if (!r.has(ka)) detail::fail(weights_path, module, "missing tensor '" + ka + "'");
    if (!r.has(kb)) detail::fail(weights_path, module, "missing tensor '" + kb + "'");
    const auto [ra, in] = detail::dims2(r, ka, module);
    const auto [out_f, rb] = detail::dims2(r, kb, module);
    if (ra != cfg.lora.r)
      detail::fail(weights_path, module, molora::detail::mismatch("tensor '" + ka + "' rows (r from the config)", cfg.lora.r, ra));
    if (rb != cfg.lora.r)
      detail::fail(weights_path, module, molora::detail::mismatch("tensor '" + kb + "' columns (r from the config)", cfg.lora.r, rb));
    LoRA<Scalar> lora(in, out_f, cfg.lora.r, cfg.lora.lora_alpha, cfg.lora.use_rslora);
    lora.set_A(detail::finite_matrix<Scalar>(r, ka, module));
    lora.set_B(detail::finite_matrix<Scalar>(r, kb, module));
    out.modules.emplace(module, std::move(lora));
  }
  return out;
}

// From a folder holding adapter_config.json and adapter_model.safetensors (save_pretrained).
template <class Scalar>
PeftLoraAdapter<Scalar> load_peft_lora(const std::string& dir) {
  return load_peft_lora<Scalar>(detail::path_join(dir, "adapter_config.json"),
                                detail::path_join(dir, "adapter_model.safetensors"));
}

// Merges a PEFT LoRA into its base weight in place (merge_and_unload). With
// fan_in_fan_out the base is stored [in, out] (GPT-2's Conv1D) and the transposed update
// is added. Throws (and leaves w untouched) on a shape mismatch or a non-finite result.
template <class Scalar>
void merge_peft(const LoRA<Scalar>& lora, typename detail::identity<RowRef<Scalar>>::type w, bool fan_in_fan_out = false) {
  if (!fan_in_fan_out) {
    lora.merge(w);
    return;
  }
  RowMatrix<Scalar> wt = w.transpose();  // [out, in]
  lora.merge(wt);
  w = wt.transpose();
}

// A plain LoRA on a given base as a MoLoRALinear with one expert (its router then gives
// weight 1 to the only expert, exactly): y = x W0^T + b0 + s B A x. w0 [out, in], b0 [out]
// or an empty vector for no bias.
template <class Scalar, class DW, class DB>
MoLoRALinear<Scalar> lora_linear(const LoRA<Scalar>& lora, const Eigen::MatrixBase<DW>& w0,
                                 const Eigen::MatrixBase<DB>& b0) {
  MoLoRAConfig c;
  c.in_features = lora.in_features();
  c.out_features = lora.out_features();
  c.num_experts = 1;
  c.top_k = 1;
  c.rank = lora.rank();
  c.lora_alpha = static_cast<double>(lora.scaling()) * static_cast<double>(lora.rank());  // s = alpha / r
  c.router_bias = false;
  MoLoRALinear<Scalar> layer(c);
  layer.set_base_weight(w0);
  if (b0.size() > 0) layer.set_base_bias(b0);
  layer.adapter().set_expert_A(0, lora.A());
  layer.adapter().set_expert_B(0, lora.B());
  return layer;
}

// ---- MING-MOE -----------------------------------------------------------------------------

struct MingMoeLoadOptions {
  // MING keeps lora_alpha / r in its training arguments; config.json may lack them. These
  // override (alpha) or fill in what the config does not say.
  std::optional<double> lora_alpha;
  std::optional<bool> use_rslora;
};

// MING-MOE's MoLoRA adapters, one per projection, keyed by module path after MING's loader
// strips "base_model." and then the leading "model." (e.g. "model.layers.0.mlp.gate_proj").
template <class Scalar>
struct MingMoeAdapters {
  MingMoeConfig config;
  std::map<std::string, MoLoRAAdapter<Scalar>> modules;
  std::string source;

  const MoLoRAAdapter<Scalar>& at(const std::string& module) const {
    auto it = modules.find(module);
    if (it == modules.end()) throw format_error(molora::detail::cat(source, ": no MoLoRA adapter for module '", module, "'"));
    return it->second;
  }
};

namespace detail {

// MING's key prefix for a module name, and the module name of a key.
inline std::string ming_strip(const std::string& key) {
  std::string k = key;
  if (starts_with(k, "base_model.")) k = k.substr(11);
  if (starts_with(k, "model.")) k = k.substr(6);
  return k;
}

// Splits "<module>.switch.weight", "<module>.switch.bias", "<module>.experts.<i>.lora_A_<i>.weight"
// and "..lora_B_<i>.weight" into module and the rest; returns false for other keys.
inline bool ming_split(const std::string& stripped, std::string& module, std::string& rest) {
  for (const char* tail : {".switch.weight", ".switch.bias"})
    if (ends_with(stripped, tail)) {
      module = stripped.substr(0, stripped.size() - std::string(tail).size());
      rest = tail + 1;
      return true;
    }
  static const std::regex expert_re(R"((.+)\.(experts\.(\d+)\.lora_([AB])_(\d+)\.weight))");
  std::smatch m;
  if (std::regex_match(stripped, m, expert_re)) {
    module = m[1];
    rest = m[2];
    return true;
  }
  return false;
}

}  // namespace detail

// Loads MING-MOE's config.json and the MoLoRA tensors (non_lora_trainables converted to
// safetensors by tools/convert_checkpoint.py; BF16, F16, F32 or F64). Every module must have
// a router `switch.weight` [E, in] and `switch.bias` [E], and for each expert i < E
// `experts.i.lora_A_i.weight` [r, in] and `experts.i.lora_B_i.weight` [out, r] with one r
// for all (equal to the config's r when it has one), and nothing else.
template <class Scalar>
MingMoeAdapters<Scalar> load_ming_moe(const std::string& config_path, const std::string& weights_path,
                                      const MingMoeLoadOptions& options = {}) {
  MingMoeAdapters<Scalar> out{MingMoeConfig::from_file(config_path), {}, weights_path};
  const MingMoeConfig& cfg = out.config;
  if (cfg.share_expert)
    throw format_error(config_path + ": share_expert: expected false (molora has no shared expert yet), got true");
  std::optional<double> alpha = options.lora_alpha ? options.lora_alpha : cfg.lora_alpha;
  if (!alpha)
    throw format_error(config_path + ": lora_alpha: expected a value in the config or in MingMoeLoadOptions, got none");
  const bool rslora = options.use_rslora.value_or(cfg.use_rslora);

  const SafetensorsReader r(weights_path);
  std::map<std::string, std::set<std::string>> keys_of;  // module -> rest-of-key
  std::map<std::string, std::string> full_key;           // module + "|" + rest -> key in file
  for (const auto& key : r.names()) {
    std::string module, rest;
    if (!detail::ming_split(detail::ming_strip(key), module, rest))
      throw format_error(molora::detail::cat(weights_path, ": tensor '", key,
                                             "': expected <module>.switch.weight|bias or <module>.experts.<i>.lora_A_<i>|lora_B_<i>.weight"));
    if (!keys_of[module].insert(rest).second)
      throw format_error(molora::detail::cat(weights_path, ": tensor '", key, "': module '", module,
                                             "' has '", rest, "' twice (after stripping prefixes)"));
    full_key[module + "|" + rest] = key;
  }
  if (keys_of.empty()) throw format_error(weights_path + ": expected MoLoRA tensors, got none");

  const Index E = cfg.num_experts;
  for (const auto& [module, rests] : keys_of) {
    auto key = [&, &mod = module](const std::string& rest) -> std::string {
      auto it = full_key.find(mod + "|" + rest);
      if (it == full_key.end()) detail::fail(weights_path, mod, "missing tensor '" + rest + "'");
      return it->second;
    };
    // Every key must be one we expect for E experts.
    std::set<std::string> expected{"switch.weight", "switch.bias"};
    for (Index i = 0; i < E; ++i) {
      expected.insert(molora::detail::cat("experts.", i, ".lora_A_", i, ".weight"));
      expected.insert(molora::detail::cat("experts.", i, ".lora_B_", i, ".weight"));
    }
    for (const auto& rest : rests)
      if (!expected.count(rest))
        detail::fail(weights_path, module,
                     molora::detail::cat("unexpected tensor '", full_key[module + "|" + rest], "' for num_experts = ", E,
                                         " (", config_path, ")"));
    const auto [er, in] = detail::dims2(r, key("switch.weight"), module);
    if (er != E)
      detail::fail(weights_path, module,
                   molora::detail::mismatch("switch.weight rows (num_experts from the config)", E, er));
    r.expect_shape(key("switch.bias"), E);
    const auto [rank, in_a] = detail::dims2(r, key("experts.0.lora_A_0.weight"), module);
    const auto [out_f, rank_b] = detail::dims2(r, key("experts.0.lora_B_0.weight"), module);
    if (cfg.r && *cfg.r != rank)
      detail::fail(weights_path, module, molora::detail::mismatch("experts.0.lora_A_0.weight rows (r from the config)", *cfg.r, rank));
    if (in_a != in)
      detail::fail(weights_path, module, molora::detail::mismatch("experts.0.lora_A_0.weight columns (in of switch.weight)", in, in_a));
    if (rank_b != rank)
      detail::fail(weights_path, module, molora::detail::mismatch("experts.0.lora_B_0.weight columns (r)", rank, rank_b));

    MoLoRAConfig c;
    c.in_features = in;
    c.out_features = out_f;
    c.num_experts = E;
    c.top_k = cfg.num_experts_per_token;
    c.rank = rank;
    c.lora_alpha = *alpha;
    c.use_rslora = rslora;
    c.router_bias = true;
    c.normalize_top_k = true;
    c.selection = cfg.sampling() ? Selection::sampling : Selection::top_k;
    MoLoRAAdapter<Scalar> adapter(c);
    adapter.router().set_weight(detail::finite_matrix<Scalar>(r, key("switch.weight"), module));
    adapter.router().set_bias(detail::finite_matrix<Scalar>(r, key("switch.bias"), module));
    for (Index i = 0; i < E; ++i) {
      const std::string ka = key(molora::detail::cat("experts.", i, ".lora_A_", i, ".weight"));
      const std::string kb = key(molora::detail::cat("experts.", i, ".lora_B_", i, ".weight"));
      detail::expect2(r, ka, module, rank, in);
      detail::expect2(r, kb, module, out_f, rank);
      adapter.set_expert_A(i, detail::finite_matrix<Scalar>(r, ka, module));
      adapter.set_expert_B(i, detail::finite_matrix<Scalar>(r, kb, module));
    }
    out.modules.emplace(module, std::move(adapter));
  }
  return out;
}

// Saves adapters in MING-MOE's layout: `dir/non_lora_trainables.safetensors` with keys
// `base_model.model.<module>.switch.weight`, ... (module as load_ming_moe returns it, e.g.
// "model.layers.0.mlp.gate_proj"), in the Scalar's dtype (F32 or F64: a reload is bit for bit),
// and `dir/config.json` with num_experts, num_experts_per_token, expert_selection,
// share_expert, r, lora_alpha, use_rslora plus `extra_config` fields (e.g. the base model's).
// All adapters must share E, k, r, alpha, rsLoRA and selection, and use MING's gating (router
// bias, renormalised top-k): otherwise format_error, and nothing is written.
template <class Scalar>
void save_ming_moe(const std::string& dir, const std::map<std::string, const MoLoRAAdapter<Scalar>*>& modules,
                   const nlohmann::json& extra_config = nlohmann::json::object()) {
  if (modules.empty()) throw format_error(dir + ": expected at least one module to save, got none");
  const MoLoRAConfig& c0 = modules.begin()->second->config();
  std::vector<TensorToWrite> tensors;
  for (const auto& [module, adapter] : modules) {
    const MoLoRAConfig& c = adapter->config();
    if (!detail::starts_with(module, "model."))
      detail::fail(dir, module, "expected a module path starting with \"model.\" (as load_ming_moe names them)");
    if (c.num_experts != c0.num_experts || c.top_k != c0.top_k || c.rank != c0.rank || c.lora_alpha != c0.lora_alpha ||
        c.use_rslora != c0.use_rslora || c.selection != c0.selection)
      detail::fail(dir, module, "expected the same num_experts, top_k, rank, lora_alpha, use_rslora and selection as '" +
                                    modules.begin()->first + "' (MING's config.json holds one set)");
    if (!c.router_bias || !c.normalize_top_k)
      detail::fail(dir, module, "expected router_bias = true and normalize_top_k = true (MING-MOE's gating)");
    const std::string p = "base_model.model." + module + ".";
    tensors.push_back(make_tensor(p + "switch.weight", adapter->router().weight()));
    tensors.push_back(make_tensor<Scalar>(p + "switch.bias", {static_cast<std::uint64_t>(c.num_experts)},
                                          adapter->router().bias().data(), io::detail::dtype_of<Scalar>()));
    for (Index i = 0; i < c.num_experts; ++i) {
      tensors.push_back(make_tensor(molora::detail::cat(p, "experts.", i, ".lora_A_", i, ".weight"), adapter->expert_A(i)));
      tensors.push_back(make_tensor(molora::detail::cat(p, "experts.", i, ".lora_B_", i, ".weight"), adapter->expert_B(i)));
    }
  }
  nlohmann::json config = extra_config.is_object() ? extra_config : nlohmann::json::object();
  config["num_experts"] = c0.num_experts;
  config["num_experts_per_token"] = c0.top_k;
  config["expert_selection"] = c0.selection == Selection::sampling ? "sampling" : "top_k";
  config["share_expert"] = false;
  config["r"] = c0.rank;
  config["lora_alpha"] = c0.lora_alpha;
  config["use_rslora"] = c0.use_rslora;
  std::filesystem::create_directories(dir);
  save_safetensors(detail::path_join(dir, "non_lora_trainables.safetensors"), std::move(tensors), {{"format", "pt"}});
  const std::string cfg_path = detail::path_join(dir, "config.json"), tmp = cfg_path + ".tmp";
  {
    std::ofstream f(tmp, std::ios::binary | std::ios::trunc);
    f << config.dump(2) << "\n";
    if (!f) throw format_error(tmp + ": could not write the config");
  }
  std::filesystem::rename(tmp, cfg_path);
}

// ---- MixLoRA ------------------------------------------------------------------------------

// Loads MixLoRA's adapter_config.json and adapter weights (adapter_model.bin converted by
// tools/convert_checkpoint.py, same keys) for decoder layer `layer` into a
// MixLoRAFeedForward whose base FFN weights (gate/up [inter, hidden], down [hidden, inter])
// the caller gives. Keys: `mixlora.layers.{L}.mlp.moe_gate.weight` [E, hidden] and
// `mixlora.layers.{L}.mlp.{gate,up,down}_proj.experts.{e}.lora_A.weight` / `lora_B.weight`.
// Other layers' keys and attention LoRA keys (`...self_attn...`) are left for the caller
// (see the README: attention LoRA loads with load_lora_tensor); unknown MLP keys are errors.
template <class Scalar, class DG, class DU, class DD>
MixLoRAFeedForward<Scalar> load_mixlora_ffn(const MixLoRAConfig& cfg, const SafetensorsReader& r, Index layer,
                                            const Eigen::MatrixBase<DG>& w_gate, const Eigen::MatrixBase<DU>& w_up,
                                            const Eigen::MatrixBase<DD>& w_down, const std::string& act_fn = "silu") {
  const std::string p = molora::detail::cat("mixlora.layers.", layer, ".mlp.");
  const std::string module = p.substr(0, p.size() - 1);
  const Index E = cfg.num_experts;
  // Every MLP key of this layer must be expected.
  std::set<std::string> expected{p + "moe_gate.weight"};
  for (const char* proj : {"gate_proj", "up_proj", "down_proj"})
    for (Index e = 0; e < E; ++e)
      for (const char* ab : {"lora_A", "lora_B"}) expected.insert(molora::detail::cat(p, proj, ".experts.", e, ".", ab, ".weight"));
  for (const auto& key : r.names())
    if (detail::starts_with(key, p) && !expected.count(key))
      detail::fail(r.source(), module, molora::detail::cat("unexpected tensor '", key, "' for num_experts = ", E));
  for (const auto& key : expected)
    if (!r.has(key)) detail::fail(r.source(), module, "missing tensor '" + key + "'");
  const auto [er, hidden] = detail::dims2(r, p + "moe_gate.weight", module);
  if (er != E) detail::fail(r.source(), module, molora::detail::mismatch("moe_gate.weight rows (num_experts)", E, er));
  const Index inter = w_gate.rows();
  if (w_gate.cols() != hidden)
    detail::fail(r.source(), module, molora::detail::mismatch("base gate_proj columns (hidden of moe_gate)", hidden, w_gate.cols()));

  MixLoRAFeedForwardConfig fc;
  fc.hidden_size = hidden;
  fc.intermediate_size = inter;
  fc.num_experts = E;
  fc.top_k = cfg.top_k;
  fc.rank = cfg.expert.r;
  fc.lora_alpha = cfg.expert.lora_alpha;
  fc.use_rslora = cfg.expert.use_rslora;
  fc.act = activation_from_string(cfg.act_fn.empty() ? act_fn : cfg.act_fn);
  MixLoRAFeedForward<Scalar> ffn(fc);
  ffn.set_base(w_gate, w_up, w_down);
  ffn.router().set_weight(detail::finite_matrix<Scalar>(r, p + "moe_gate.weight", module));
  struct Proj {
    const char* name;
    MoLoRAAdapter<Scalar>* adapter;
    Index in, out;
  };
  for (const Proj& pr : {Proj{"gate_proj", &ffn.gate_proj(), hidden, inter}, Proj{"up_proj", &ffn.up_proj(), hidden, inter},
                         Proj{"down_proj", &ffn.down_proj(), inter, hidden}})
    for (Index e = 0; e < E; ++e) {
      const std::string ka = molora::detail::cat(p, pr.name, ".experts.", e, ".lora_A.weight");
      const std::string kb = molora::detail::cat(p, pr.name, ".experts.", e, ".lora_B.weight");
      detail::expect2(r, ka, module, fc.rank, pr.in);
      detail::expect2(r, kb, module, pr.out, fc.rank);
      pr.adapter->set_expert_A(e, detail::finite_matrix<Scalar>(r, ka, module));
      pr.adapter->set_expert_B(e, detail::finite_matrix<Scalar>(r, kb, module));
    }
  return ffn;
}

}  // namespace molora::io
