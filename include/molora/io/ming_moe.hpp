// MING-MOE checkpoints (its config.json + non_lora_trainables converted to safetensors):
// the config parser (MingMoeConfig), the loader (load_ming_moe: one MoLoRAAdapter per
// projection) and the writer of molora's adapters in MING-MOE's layout (save_ming_moe).
// The loader bounds num_experts by io::Limits and splits every key of the file into module
// and tensor; then, module by module, it checks that the config and the tensors agree
// (expert count, rank, shapes, missing or extra keys) before it allocates that module's
// experts, and builds its adapter from values checked finite as they are read. A bad file
// throws format_error naming the file, the module and the key, and nothing is returned.
// load_ming_moe<float, bf16 | f16> keeps the router weight and the experts in 16 bits:
// tensors stored in that dtype are kept as stored, others (e.g. a mixed file's F32 ones)
// rounded to nearest even, tensor by tensor; load_ming_moe<float> widens any 16-bit tensor.
#pragma once

#include <Eigen/Core>
#include <nlohmann/json.hpp>

#include <cstdint>
#include <filesystem>
#include <fstream>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <system_error>
#include <type_traits>
#include <utility>
#include <vector>

#include "../config.hpp"
#include "../errors.hpp"
#include "../molora_linear.hpp"
#include "../types.hpp"
#include "input.hpp"
#include "json_fields.hpp"
#include "loader.hpp"
#include "safetensors_reader.hpp"
#include "safetensors_writer.hpp"

namespace molora::io {

// ---- config --------------------------------------------------------------------------------

// MING-MOE (MediaBrain-SJTU/MING, branch ming-moe) config.json: a Qwen2 config plus the MoLoRA
// fields. MING's loader falls back to num_experts = 4 and num_experts_per_token = 2 when they
// are absent; we require both, so a plain Qwen2 config.json is not mistaken for a MING-MOE one.
// expert_selection is "top_k" (MING's default; "topk" is accepted and stored as "top_k") or
// "sampling", the values MING's code uses (it tests == 'sampling'); other strings are rejected.
struct MingMoeConfig {
  Index num_experts = 0;
  Index num_experts_per_token = 0;         // k
  std::string expert_selection = "top_k";  // "top_k" or "sampling" (normalised)
  bool share_expert = false;
  Index num_share_experts = 1;             // only meaningful with share_expert
  bool use_rslora = false;
  std::optional<Index> r;                  // "r" or "lora_r" (MING keeps LoRA params in its
  std::optional<double> lora_alpha;        //  training args; the deploy config may have them)
  std::optional<double> lora_dropout;
  std::optional<Index> hidden_size;
  std::optional<Index> intermediate_size;
  std::optional<Index> num_hidden_layers;
  std::string model_type;                  // e.g. "qwen2"
  std::string hidden_act;                  // e.g. "silu"

  bool sampling() const { return expert_selection == "sampling"; }

  static MingMoeConfig from_string(const std::string& text, const std::string& source = "<string>") {
    const nlohmann::json j = internal::JsonFields::parse_object(text, source);
    const internal::JsonFields f(j, source);
    MingMoeConfig c;
    c.num_experts = f.integer("num_experts", 1);
    c.num_experts_per_token = f.integer("num_experts_per_token", 1);
    if (c.num_experts_per_token > c.num_experts)
      f.fail("num_experts_per_token", molora::detail::cat("an integer in [1, num_experts = ", c.num_experts, "]"),
             std::to_string(c.num_experts_per_token));
    c.expert_selection = f.string_or("expert_selection", "top_k");
    // MING's code only tests for "sampling"; anything else means top-k. We accept the two
    // spellings of top-k seen in MING-style configs and reject other strings as typos.
    if (c.expert_selection != "top_k" && c.expert_selection != "topk" && c.expert_selection != "sampling")
      f.fail("expert_selection", "\"top_k\", \"topk\" or \"sampling\"", "\"" + c.expert_selection + "\"");
    if (c.expert_selection == "topk") c.expert_selection = "top_k";  // one spelling downstream
    c.share_expert = f.boolean_or("share_expert", false);
    c.num_share_experts = f.integer_or("num_share_experts", 1, 1);
    c.use_rslora = f.boolean_or("use_rslora", false);
    if (f.has("r") && f.has("lora_r")) {
      const Index a = f.integer("r", 1), b = f.integer("lora_r", 1);
      if (a != b) f.fail("lora_r", molora::detail::cat("the same value as r (", a, ")"), std::to_string(b));
    }
    c.r = f.has("r") ? f.optional_integer("r", 1) : f.optional_integer("lora_r", 1);
    if (f.has("lora_alpha")) c.lora_alpha = f.number("lora_alpha", 0, internal::kHuge, true);
    if (f.has("lora_dropout")) c.lora_dropout = f.number("lora_dropout", 0, 1, false);
    c.hidden_size = f.optional_integer("hidden_size", 1);
    c.intermediate_size = f.optional_integer("intermediate_size", 1);
    c.num_hidden_layers = f.optional_integer("num_hidden_layers", 1);
    c.model_type = f.string_or("model_type", "");
    c.hidden_act = f.string_or("hidden_act", "");
    return c;
  }

  // Reads `path` (a regular file of at most limits.max_config_bytes) and parses it.
  static MingMoeConfig from_file(const std::string& path, const Limits& limits = {}) {
    return from_string(internal::JsonFields::read_file(path, limits.max_config_bytes), path);
  }
};

// ---- loader and writer ---------------------------------------------------------------------

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
template <class Scalar, class Weight = Scalar>
struct MingMoeAdapters {
  MingMoeConfig config;
  std::map<std::string, MoLoRAAdapter<Scalar, Weight>> modules;
  std::string source;

  const MoLoRAAdapter<Scalar, Weight>& at(const std::string& module) const {
    auto it = modules.find(module);
    if (it == modules.end()) throw format_error(molora::detail::cat(source, ": no MoLoRA adapter for module '", module, "'"));
    return it->second;
  }
};

namespace internal {

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

}  // namespace internal

// Loads MING-MOE's config.json and the MoLoRA tensors (non_lora_trainables converted to
// safetensors by tools/convert_checkpoint.py; BF16, F16, F32 or F64). Every module must have
// a router `switch.weight` [E, in] and `switch.bias` [E], and for each expert i < E
// `experts.i.lora_A_i.weight` [r, in] and `experts.i.lora_B_i.weight` [out, r] with one r
// for all (equal to the config's r when it has one), and nothing else.
// Weight: the adapters' storage (see the top of this header); a value of an F32 / F64 tensor
// past f16's range is then a numeric_error naming the file, module, key and index.
template <class Scalar, class Weight = Scalar>
MingMoeAdapters<Scalar, Weight> load_ming_moe(const std::string& config_path, const std::string& weights_path,
                                              const MingMoeLoadOptions& options = {}) {
  MingMoeAdapters<Scalar, Weight> out{MingMoeConfig::from_file(config_path, options.limits), {}, weights_path};
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
    if (!internal::ming_split(internal::ming_strip(key), module, rest))
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
      if (it == full_key.end()) internal::fail(weights_path, mod, "missing tensor '" + rest + "'");
      return it->second;
    };
    auto expert_key = [](Index i, char ab) { return molora::detail::cat("experts.", i, ".lora_", ab, "_", i, ".weight"); };
    // Every key must be one we expect for E experts (decided from the key, not from a list
    // of 2E names: E comes from the config and is only trusted once the file agrees).
    for (const auto& rest : rests) {
      Index i = 0;
      if (rest == "switch.weight" || rest == "switch.bias" || (internal::ming_expert_index(rest, i) && i < E)) continue;
      internal::fail(weights_path, module,
                   molora::detail::cat("unexpected tensor '", full_key[module + "|" + rest], "' for num_experts = ", E,
                                       " (", config_path, ")"));
    }
    const auto [er, in] = internal::dims2(r, key("switch.weight"), module);
    if (er != E)
      internal::fail(weights_path, module,
                   molora::detail::mismatch("switch.weight rows (num_experts from the config)", E, er));
    r.expect_shape(key("switch.bias"), E);
    const auto [rank, in_a] = internal::dims2(r, key(expert_key(0, 'A')), module);
    const auto [out_f, rank_b] = internal::dims2(r, key(expert_key(0, 'B')), module);
    if (cfg.r && *cfg.r != rank)
      internal::fail(weights_path, module, molora::detail::mismatch("experts.0.lora_A_0.weight rows (r from the config)", *cfg.r, rank));
    if (in_a != in)
      internal::fail(weights_path, module, molora::detail::mismatch("experts.0.lora_A_0.weight columns (in of switch.weight)", in, in_a));
    if (rank_b != rank)
      internal::fail(weights_path, module, molora::detail::mismatch("experts.0.lora_B_0.weight columns (r)", rank, rank_b));
    // All 2E tensors present and shaped before the layer allocates E experts.
    for (Index i = 0; i < E; ++i) {
      internal::expect2(r, key(expert_key(i, 'A')), module, rank, in);
      internal::expect2(r, key(expert_key(i, 'B')), module, out_f, rank);
    }
    internal::check_scaling<Scalar>(options.lora_alpha ? std::string("MingMoeLoadOptions") : config_path, module, *alpha, rank,
                                  rslora);

    internal::building(weights_path, module, [&, &mod = module, in_f = in, o = out_f, rk = rank] {
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
      MoLoRAAdapter<Scalar, Weight> adapter(c);
      if constexpr (std::is_same_v<Weight, Scalar>) {
        adapter.router().set_weight(internal::finite_matrix<Scalar>(r, key("switch.weight"), mod));
        for (Index i = 0; i < E; ++i) {
          adapter.set_expert_A(i, internal::finite_matrix<Scalar>(r, key(expert_key(i, 'A')), mod));
          adapter.set_expert_B(i, internal::finite_matrix<Scalar>(r, key(expert_key(i, 'B')), mod));
        }
      } else {
        adapter.router().set_weight_stored(internal::stored_weights<Weight>(r, key("switch.weight"), mod).data(), E, in_f);
        for (Index i = 0; i < E; ++i) {
          adapter.set_expert_A_stored(i, internal::stored_weights<Weight>(r, key(expert_key(i, 'A')), mod).data());
          adapter.set_expert_B_stored(i, internal::stored_weights<Weight>(r, key(expert_key(i, 'B')), mod).data());
        }
      }
      adapter.router().set_bias(internal::finite_matrix<Scalar>(r, key("switch.bias"), mod));
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
// bias, renormalised top-k): otherwise format_error, and nothing is written. Adapters stored
// in bf16 / f16 (Weight) write their router weight and experts in that dtype, as stored.
template <class Scalar, class Weight = Scalar>
void save_ming_moe(const std::string& dir, const std::map<std::string, const MoLoRAAdapter<Scalar, Weight>*>& modules,
                   const nlohmann::json& extra_config = nlohmann::json::object()) {
  if (modules.empty()) throw format_error(dir + ": expected at least one module to save, got none");
  const MoLoRAConfig& c0 = modules.begin()->second->config();
  std::vector<TensorToWrite> tensors;
  for (const auto& [module, adapter] : modules) {
    const MoLoRAConfig& c = adapter->config();
    if (!internal::starts_with(module, "model."))
      internal::fail(dir, module, "expected a module path starting with \"model.\" (as load_ming_moe names them)");
    if (c.num_experts != c0.num_experts || c.top_k != c0.top_k || c.rank != c0.rank || c.lora_alpha != c0.lora_alpha ||
        c.use_rslora != c0.use_rslora || c.selection != c0.selection)
      internal::fail(dir, module, "expected the same num_experts, top_k, rank, lora_alpha, use_rslora and selection as '" +
                                    modules.begin()->first + "' (MING's config.json holds one set)");
    if (!c.router_bias || !c.normalize_top_k)
      internal::fail(dir, module, "expected router_bias = true and normalize_top_k = true (MING-MOE's gating)");
    const std::string p = "base_model.model." + module + ".";
    if constexpr (!std::is_same_v<Weight, Scalar>) {
      // The widened values round back to the stored bits.
      const auto wide = convert_adapter<Scalar>(*adapter);
      constexpr Dtype d = internal::half_dtype<Weight>();
      tensors.push_back(make_tensor(p + "switch.weight", wide.router().weight(), d));
      tensors.push_back(make_tensor<Scalar>(p + "switch.bias", {static_cast<std::uint64_t>(c.num_experts)},
                                            adapter->router().bias().data(), io::internal::dtype_of<Scalar>()));
      for (Index i = 0; i < c.num_experts; ++i) {
        tensors.push_back(make_tensor(molora::detail::cat(p, "experts.", i, ".lora_A_", i, ".weight"), wide.expert_A(i), d));
        tensors.push_back(make_tensor(molora::detail::cat(p, "experts.", i, ".lora_B_", i, ".weight"), wide.expert_B(i), d));
      }
    } else {
      tensors.push_back(make_tensor(p + "switch.weight", adapter->router().weight()));
      tensors.push_back(make_tensor<Scalar>(p + "switch.bias", {static_cast<std::uint64_t>(c.num_experts)},
                                            adapter->router().bias().data(), io::internal::dtype_of<Scalar>()));
      for (Index i = 0; i < c.num_experts; ++i) {
        tensors.push_back(make_tensor(molora::detail::cat(p, "experts.", i, ".lora_A_", i, ".weight"), adapter->expert_A(i)));
        tensors.push_back(make_tensor(molora::detail::cat(p, "experts.", i, ".lora_B_", i, ".weight"), adapter->expert_B(i)));
      }
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
  save_safetensors(internal::path_join(dir, "non_lora_trainables.safetensors"), std::move(tensors), {{"format", "pt"}});
  const std::string cfg_path = internal::path_join(dir, "config.json"), tmp = cfg_path + ".tmp";
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

}  // namespace molora::io
