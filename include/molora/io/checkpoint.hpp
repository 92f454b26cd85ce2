// Checkpoint layouts: PEFT LoRA, MING-MOE and MixLoRA adapters loaded into molora's layers,
// and molora's own layers saved in MING-MOE's layout. Loaders check that the file's keys
// agree with its config (no unexpected key) and then, module by module, that the module's
// tensors agree with it (expert count, rank, shapes, missing keys) before they build that
// module's layer, whose setters check the values (finite) as they copy them in. The layers
// are returned only when every module passed, so a bad file leaves nothing half-loaded. A number taken
// from a config (num_experts) is bounded by io::Limits and confirmed by the tensors before
// anything is allocated from it. Every failure is a format_error naming the file, the module
// and the key, including a layer's own refusal of a value that came from the file.
#pragma once

#include <cmath>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <system_error>
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

// Shape of a tensor as [rows, cols]; format_error unless it is 2-D with both dimensions in
// [1, max Index] (every loaded weight has in, out, r, E >= 1). Dims print as in the file.
inline std::pair<Index, Index> dims2(const SafetensorsReader& r, const std::string& key, const std::string& module) {
  const auto& s = r.info(key).shape;
  if (s.size() != 2)
    fail(r.source(), module, molora::detail::mismatch("tensor '" + key + "' rank", 2, s.size()));
  for (const std::uint64_t d : s)
    if (d == 0 || d > static_cast<std::uint64_t>(std::numeric_limits<Index>::max()))
      fail(r.source(), module,
           molora::detail::mismatch("tensor '" + key + "' shape",
                                    molora::detail::cat("dimensions in [1, ", std::numeric_limits<Index>::max(), "]"),
                                    shape_to_string(s)));
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

// Runs f(). A molora::error other than format_error (a layer refusing a value that came from
// the file) leaves as a format_error naming the file and the module.
template <class F>
auto building(const std::string& file, const std::string& module, F&& f) -> decltype(f()) {
  try {
    return f();
  } catch (const format_error&) {
    throw;
  } catch (const molora::error& e) {
    fail(file, module, e.what());
  }
}

// The LoRA scaling alpha / r (alpha / sqrt(r) with rsLoRA) must be a finite, normal value of
// Scalar: 1e300 would turn every output into inf or NaN. `file` is where alpha came from.
template <class Scalar>
void check_scaling(const std::string& file, const std::string& module, double alpha, Index rank, bool rslora) {
  const double s = lora_scaling(alpha, rank, rslora);
  const double hi = static_cast<double>(std::numeric_limits<Scalar>::max());
  const double lo = static_cast<double>(std::numeric_limits<Scalar>::min());
  if (!(std::isfinite(s) && s <= hi && s >= lo))
    fail(file, module,
         molora::detail::cat("lora_alpha = ", alpha, " with r = ", rank, rslora ? " (rsLoRA)" : "", ": scaling expected a finite ",
                             "normal ", sizeof(Scalar) == 4 ? "float" : "double", " in [", lo, ", ", hi, "], got ", s));
}

// Parses s[b, e) as a canonical decimal index (digits only, no leading zero, at most 18 digits).
inline bool parse_index(const std::string& s, std::size_t b, std::size_t e, Index& out) {
  if (b >= e || e - b > 18 || (s[b] == '0' && e - b > 1)) return false;
  Index v = 0;
  for (std::size_t i = b; i < e; ++i) {
    if (s[i] < '0' || s[i] > '9') return false;
    v = v * 10 + (s[i] - '0');
  }
  out = v;
  return true;
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
// `load` and `limits` say how the files are read (see Load and Limits).
template <class Scalar>
PeftLoraAdapter<Scalar> load_peft_lora(const std::string& config_path, const std::string& weights_path,
                                       Load load = Load::map, const Limits& limits = {}) {
  PeftLoraAdapter<Scalar> out{PeftLoraConfig::from_file(config_path, limits), {}, weights_path};
  const PeftLoraConfig& cfg = out.config;
  const SafetensorsReader r(weights_path, load, limits);
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
  std::optional<Regex> target_re;  // linear-time matcher: the pattern comes from the file
  if (cfg.target_modules_is_regex)
    target_re.emplace(cfg.target_modules_regex, Regex::kDefaultMaxPatternLength, config_path + ": target_modules");
  for (const auto& module : names) {
    bool targeted = false;
    if (target_re) {
      targeted = target_re->full_match(module);
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
    detail::check_scaling<Scalar>(config_path, module, cfg.lora.lora_alpha, cfg.lora.r, cfg.lora.use_rslora);
    detail::building(weights_path, module, [&, &mod = module, in_f = in, o = out_f] {
      LoRA<Scalar> lora(in_f, o, cfg.lora.r, cfg.lora.lora_alpha, cfg.lora.use_rslora);
      lora.set_A(detail::finite_matrix<Scalar>(r, ka, mod));
      lora.set_B(detail::finite_matrix<Scalar>(r, kb, mod));
      out.modules.emplace(mod, std::move(lora));
    });
  }
  return out;
}

// From a folder holding adapter_config.json and adapter_model.safetensors (save_pretrained).
template <class Scalar>
PeftLoraAdapter<Scalar> load_peft_lora(const std::string& dir, Load load = Load::map, const Limits& limits = {}) {
  return load_peft_lora<Scalar>(detail::path_join(dir, "adapter_config.json"),
                                detail::path_join(dir, "adapter_model.safetensors"), load, limits);
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
  Load load = Load::map;  // Load::read for files the host does not control
  Limits limits;          // bounds on the files (and num_experts <= limits.max_experts)
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

// MING's expert key after the module: "experts.<i>.lora_<A|B>_<j>.weight". Returns false for
// any other text; i and j are any digit strings here (expert_index checks them).
inline bool ming_expert_rest(const std::string& rest) {
  std::size_t p = 0;
  auto lit = [&](const char* t) {
    const std::size_t n = std::char_traits<char>::length(t);
    if (rest.compare(p, n, t) != 0) return false;
    p += n;
    return true;
  };
  auto digits = [&] {
    const std::size_t b = p;
    while (p < rest.size() && rest[p] >= '0' && rest[p] <= '9') ++p;
    return p > b;
  };
  if (!lit("experts.") || !digits() || !lit(".lora_")) return false;
  if (p >= rest.size() || (rest[p] != 'A' && rest[p] != 'B')) return false;
  ++p;
  return lit("_") && digits() && lit(".weight") && p == rest.size();
}

// The expert i of a rest that ming_expert_rest accepted, when both indices are the same
// canonical number; false otherwise.
inline bool ming_expert_index(const std::string& rest, Index& i) {
  const std::size_t b = 8, e = rest.find('.', b);  // after "experts."
  const std::size_t b2 = e + 8, e2 = rest.size() - 7;  // after ".lora_X_", before ".weight"
  Index j = -1;
  return parse_index(rest, b, e, i) && parse_index(rest, b2, e2, j) && i == j;
}

// Splits "<module>.switch.weight", "<module>.switch.bias", "<module>.experts.<i>.lora_A_<i>.weight"
// and "..lora_B_<i>.weight" into module and the rest; returns false for other keys. One pass
// over the key, no recursion: any key length is safe (the reader bounds it anyway).
inline bool ming_split(const std::string& stripped, std::string& module, std::string& rest) {
  for (const char* tail : {".switch.weight", ".switch.bias"})
    if (ends_with(stripped, tail)) {
      module = stripped.substr(0, stripped.size() - std::string(tail).size());
      rest = tail + 1;
      return true;
    }
  // The expert part holds no ".experts.", so only the last occurrence can start it.
  const std::size_t pos = stripped.rfind(".experts.");
  if (pos == std::string::npos || pos == 0) return false;
  std::string tail = stripped.substr(pos + 1);
  if (!ming_expert_rest(tail)) return false;
  module = stripped.substr(0, pos);
  rest = std::move(tail);
  return true;
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
  MingMoeAdapters<Scalar> out{MingMoeConfig::from_file(config_path, options.limits), {}, weights_path};
  const MingMoeConfig& cfg = out.config;
  if (cfg.share_expert)
    throw format_error(config_path + ": share_expert: expected false (molora has no shared expert yet), got true");
  std::optional<double> alpha = options.lora_alpha ? options.lora_alpha : cfg.lora_alpha;
  if (!alpha)
    throw format_error(config_path + ": lora_alpha: expected a value in the config or in MingMoeLoadOptions, got none");
  const bool rslora = options.use_rslora.value_or(cfg.use_rslora);
  const Index E = cfg.num_experts;
  if (E > options.limits.max_experts)
    throw format_error(molora::detail::cat(config_path, ": field 'num_experts': expected at most ", options.limits.max_experts,
                                           " (Limits::max_experts), got ", E));

  const SafetensorsReader r(weights_path, options.load, options.limits);
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

  for (const auto& [module, rests] : keys_of) {
    auto key = [&, &mod = module](const std::string& rest) -> std::string {
      auto it = full_key.find(mod + "|" + rest);
      if (it == full_key.end()) detail::fail(weights_path, mod, "missing tensor '" + rest + "'");
      return it->second;
    };
    auto expert_key = [](Index i, char ab) { return molora::detail::cat("experts.", i, ".lora_", ab, "_", i, ".weight"); };
    // Every key must be one we expect for E experts (decided from the key, not from a list
    // of 2E names: E comes from the config and is only trusted once the file agrees).
    for (const auto& rest : rests) {
      Index i = 0;
      if (rest == "switch.weight" || rest == "switch.bias" || (detail::ming_expert_index(rest, i) && i < E)) continue;
      detail::fail(weights_path, module,
                   molora::detail::cat("unexpected tensor '", full_key[module + "|" + rest], "' for num_experts = ", E,
                                       " (", config_path, ")"));
    }
    const auto [er, in] = detail::dims2(r, key("switch.weight"), module);
    if (er != E)
      detail::fail(weights_path, module,
                   molora::detail::mismatch("switch.weight rows (num_experts from the config)", E, er));
    r.expect_shape(key("switch.bias"), E);
    const auto [rank, in_a] = detail::dims2(r, key(expert_key(0, 'A')), module);
    const auto [out_f, rank_b] = detail::dims2(r, key(expert_key(0, 'B')), module);
    if (cfg.r && *cfg.r != rank)
      detail::fail(weights_path, module, molora::detail::mismatch("experts.0.lora_A_0.weight rows (r from the config)", *cfg.r, rank));
    if (in_a != in)
      detail::fail(weights_path, module, molora::detail::mismatch("experts.0.lora_A_0.weight columns (in of switch.weight)", in, in_a));
    if (rank_b != rank)
      detail::fail(weights_path, module, molora::detail::mismatch("experts.0.lora_B_0.weight columns (r)", rank, rank_b));
    // All 2E tensors present and shaped before the layer allocates E experts.
    for (Index i = 0; i < E; ++i) {
      detail::expect2(r, key(expert_key(i, 'A')), module, rank, in);
      detail::expect2(r, key(expert_key(i, 'B')), module, out_f, rank);
    }
    detail::check_scaling<Scalar>(options.lora_alpha ? std::string("MingMoeLoadOptions") : config_path, module, *alpha, rank,
                                  rslora);

    detail::building(weights_path, module, [&, &mod = module, in_f = in, o = out_f, rk = rank] {
      MoLoRAConfig c;
      c.in_features = in_f;
      c.out_features = o;
      c.num_experts = E;
      c.top_k = cfg.num_experts_per_token;
      c.rank = rk;
      c.lora_alpha = *alpha;
      c.use_rslora = rslora;
      c.router_bias = true;
      c.normalize_top_k = true;
      c.selection = cfg.sampling() ? Selection::sampling : Selection::top_k;
      MoLoRAAdapter<Scalar> adapter(c);
      adapter.router().set_weight(detail::finite_matrix<Scalar>(r, key("switch.weight"), mod));
      adapter.router().set_bias(detail::finite_matrix<Scalar>(r, key("switch.bias"), mod));
      for (Index i = 0; i < E; ++i) {
        adapter.set_expert_A(i, detail::finite_matrix<Scalar>(r, key(expert_key(i, 'A')), mod));
        adapter.set_expert_B(i, detail::finite_matrix<Scalar>(r, key(expert_key(i, 'B')), mod));
      }
      out.modules.emplace(mod, std::move(adapter));
    });
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
  std::error_code ec, ec2;
  std::filesystem::create_directories(dir, ec);
  if (ec || !std::filesystem::is_directory(dir, ec2)) {
    const bool file = std::filesystem::exists(dir, ec2) && !std::filesystem::is_directory(dir, ec2);
    throw format_error(molora::detail::cat(dir, ": expected a directory to save the checkpoint in, got ",
                                           file ? "an existing file that is not a directory" : "an error: " + ec.message()));
  }
  save_safetensors(detail::path_join(dir, "non_lora_trainables.safetensors"), std::move(tensors), {{"format", "pt"}});
  const std::string cfg_path = detail::path_join(dir, "config.json"), tmp = cfg_path + ".tmp";
  {
    std::ofstream f(tmp, std::ios::binary | std::ios::trunc);
    f << config.dump(2) << "\n";
    if (!f) throw format_error(tmp + ": could not write the config");
  }
  std::filesystem::rename(tmp, cfg_path, ec);
  if (ec) {
    std::filesystem::remove(tmp, ec);
    throw format_error(molora::detail::cat(cfg_path, ": cannot rename ", tmp, " into place: ", ec.message()));
  }
}

// ---- MixLoRA ------------------------------------------------------------------------------

// Loads MixLoRA's adapter_config.json and adapter weights (adapter_model.bin converted by
// tools/convert_checkpoint.py, same keys) for decoder layer `layer` into a
// MixLoRAFeedForward whose base FFN weights (gate/up [inter, hidden], down [hidden, inter])
// the caller gives. Keys: `mixlora.layers.{L}.mlp.moe_gate.weight` [E, hidden] and
// `mixlora.layers.{L}.mlp.{gate,up,down}_proj.experts.{e}.lora_A.weight` / `lora_B.weight`.
// Other layers' keys and attention LoRA keys (`...self_attn...`) are left for the caller
// (the README: read an attention LoRA's two tensors with the reader and LoRA::set_A/set_B);
// unknown MLP keys are errors.
// num_experts must be at most limits.max_experts, and is checked against the file before
// anything depending on it is allocated.
template <class Scalar, class DG, class DU, class DD>
MixLoRAFeedForward<Scalar> load_mixlora_ffn(const MixLoRAConfig& cfg, const SafetensorsReader& r, Index layer,
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
      if (!detail::starts_with(rest, head)) continue;
      const std::size_t dot = rest.find('.', head.size());
      if (dot == std::string::npos) return false;
      const std::string tail = rest.substr(dot);
      Index e = 0;
      return (tail == ".lora_A.weight" || tail == ".lora_B.weight") && detail::parse_index(rest, head.size(), dot, e) && e < E;
    }
    return false;
  };
  for (const auto& key : r.names())
    if (detail::starts_with(key, p) && !expected(key.substr(p.size())))
      detail::fail(r.source(), module, molora::detail::cat("unexpected tensor '", key, "' for num_experts = ", E));
  auto key_of = [&](const char* proj, Index e, const char* ab) {
    return molora::detail::cat(p, proj, ".experts.", e, ".", ab, ".weight");
  };
  if (!r.has(p + "moe_gate.weight")) detail::fail(r.source(), module, "missing tensor '" + p + "moe_gate.weight'");
  const auto [er, hidden] = detail::dims2(r, p + "moe_gate.weight", module);
  if (er != E) detail::fail(r.source(), module, molora::detail::mismatch("moe_gate.weight rows (num_experts)", E, er));
  for (const char* proj : projs)  // E now agrees with a tensor in the file
    for (Index e = 0; e < E; ++e)
      for (const char* ab : {"lora_A", "lora_B"})
        if (!r.has(key_of(proj, e, ab))) detail::fail(r.source(), module, "missing tensor '" + key_of(proj, e, ab) + "'");
  const Index inter = w_gate.rows();
  if (w_gate.cols() != hidden)
    detail::fail(r.source(), module, molora::detail::mismatch("base gate_proj columns (hidden of moe_gate)", hidden, w_gate.cols()));
  detail::check_scaling<Scalar>(cfg_source, module, cfg.expert.lora_alpha, cfg.expert.r, cfg.expert.use_rslora);
  struct Proj {
    const char* name;
    Index in, out;
  };
  const Proj shapes[] = {{"gate_proj", hidden, inter}, {"up_proj", hidden, inter}, {"down_proj", inter, hidden}};
  for (const Proj& pr : shapes)
    for (Index e = 0; e < E; ++e) {
      detail::expect2(r, key_of(pr.name, e, "lora_A"), module, cfg.expert.r, pr.in);
      detail::expect2(r, key_of(pr.name, e, "lora_B"), module, pr.out, cfg.expert.r);
    }

  return detail::building(r.source(), module, [&, hid = hidden] {
    MixLoRAFeedForwardConfig fc;
    fc.hidden_size = hid;
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
    MoLoRAAdapter<Scalar>* adapters[] = {&ffn.gate_proj(), &ffn.up_proj(), &ffn.down_proj()};
    for (int j = 0; j < 3; ++j)
      for (Index e = 0; e < E; ++e) {
        adapters[j]->set_expert_A(e, detail::finite_matrix<Scalar>(r, key_of(projs[j], e, "lora_A"), module));
        adapters[j]->set_expert_B(e, detail::finite_matrix<Scalar>(r, key_of(projs[j], e, "lora_B"), module));
      }
    return ffn;
  });
}

}  // namespace molora::io
