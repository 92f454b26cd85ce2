// PEFT LoRA checkpoints (a save_pretrained folder: adapter_config.json +
// adapter_model.safetensors): the config parser (PeftLoraConfig), the loader
// (load_peft_lora: one LoRA per target module), and the two ways to use a loaded LoRA on a
// base weight (merge_peft in place, lora_linear as a one-expert MoLoRALinear). The loader
// checks every key's form first; then, module by module, that the config and the tensors
// agree (target_modules, rank, shapes, missing keys) before it builds that module's LoRA
// from values checked finite as they are read. A bad file throws format_error naming the
// file, the module and the key, and nothing is returned.
// load_peft_lora<float, bf16 | f16> keeps A and B in 16 bits (LoRA<float, Weight>, as PEFT
// checkpoints usually ship): tensors stored in that dtype are kept as stored, others (a mixed
// file's F32 ones) rounded to nearest even, tensor by tensor (loader.hpp's stored_weights);
// load_peft_lora<float> widens any 16-bit tensor exactly.
#pragma once

#include <Eigen/Core>
#include <nlohmann/json.hpp>

#include <map>
#include <optional>
#include <set>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "../errors.hpp"
#include "../lora.hpp"
#include "../molora_linear.hpp"
#include "../types.hpp"
#include "input.hpp"
#include "json_fields.hpp"
#include "loader.hpp"
#include "regex.hpp"
#include "safetensors_reader.hpp"

namespace molora::io {

// ---- config --------------------------------------------------------------------------------

// PEFT adapter_config.json for a plain LoRA adapter.
struct PeftLoraConfig {
  LoraParams lora;
  bool fan_in_fan_out = false;             // weights stored [in, out] (GPT-2 Conv1D)
  std::vector<std::string> target_modules; // names when the file holds a list
  std::string target_modules_regex;        // the pattern when the file holds one string
  bool target_modules_is_regex = false;    // PEFT full-matches a string against module paths
  std::string bias = "none";               // only "none" is supported
  std::string base_model_name_or_path;     // informational
  std::string task_type;                   // informational

  // Parses the text of an adapter_config.json; `source` names it in messages.
  static PeftLoraConfig from_string(const std::string& text, const std::string& source = "<string>") {
    const nlohmann::json j = internal::JsonFields::parse_object(text, source);
    const internal::JsonFields f(j, source);
    internal::read_peft_type(f, "LORA");
    PeftLoraConfig c;
    c.lora.r = f.integer("r", 1);
    c.lora.lora_alpha = f.number("lora_alpha", 0, internal::kHuge, true);
    c.lora.lora_dropout = f.number_or("lora_dropout", 0, 1, false, 0.0);
    c.lora.use_rslora = f.boolean_or("use_rslora", false);
    c.fan_in_fan_out = f.boolean_or("fan_in_fan_out", false);
    c.bias = f.string_or("bias", "none");
    if (c.bias != "none") f.fail("bias", "\"none\" (\"all\" and \"lora_only\" are unsupported)", "\"" + c.bias + "\"");
    internal::reject_dora(f);
    for (const char* pattern : {"rank_pattern", "alpha_pattern"}) {
      if (!f.has(pattern)) continue;
      const auto& v = f.at(pattern);
      if (!v.is_object() || !v.empty())
        f.fail(pattern, "an empty object (per-module ranks/alphas are unsupported)", internal::JsonFields::describe(v));
    }
    const auto& t = f.at("target_modules");
    if (t.is_string()) {
      c.target_modules_is_regex = true;
      c.target_modules_regex = t.get<std::string>();
      // PEFT full-matches the string as a Python regex; compiling it here rejects a malformed
      // or unsupported pattern while the config's name is at hand.
      static_cast<void>(Regex(c.target_modules_regex, Regex::kDefaultMaxPatternLength, source + ": target_modules"));
    } else if (t.is_array()) {
      for (const auto& e : t) {
        if (!e.is_string()) f.fail("target_modules", "a list of strings or one regex string", internal::JsonFields::describe(t));
        c.target_modules.push_back(e.get<std::string>());
      }
    } else {
      f.fail("target_modules", "a list of strings or one regex string", internal::JsonFields::describe(t));
    }
    c.base_model_name_or_path = f.has("base_model_name_or_path") && f.at("base_model_name_or_path").is_string()
                                    ? f.at("base_model_name_or_path").get<std::string>()
                                    : std::string();
    c.task_type = f.has("task_type") && f.at("task_type").is_string() ? f.at("task_type").get<std::string>() : std::string();
    return c;
  }

  // Reads `path` (a regular file of at most limits.max_config_bytes) and parses it.
  static PeftLoraConfig from_file(const std::string& path, const Limits& limits = {}) {
    return from_string(internal::JsonFields::read_file(path, limits.max_config_bytes), path);
  }
};

// ---- loader --------------------------------------------------------------------------------

// A PEFT LoRA adapter: one LoRA per target module, keyed by its module path
// (`layers.0.proj` for the key `base_model.model.layers.0.proj.lora_A.weight`). Weight: the
// storage of A and B (Scalar, or bf16 / f16 for float).
template <class Scalar, class Weight = Scalar>
struct PeftLoraAdapter {
  PeftLoraConfig config;
  std::map<std::string, LoRA<Scalar, Weight>> modules;
  std::string source;

  const LoRA<Scalar, Weight>& at(const std::string& module) const {
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
// Weight: the LoRAs' storage (see the top of this header); a value of an F32 / F64 tensor
// past f16's range is then a numeric_error naming the file, module, key and index.
template <class Scalar, class Weight = Scalar>
PeftLoraAdapter<Scalar, Weight> load_peft_lora(const std::string& config_path, const std::string& weights_path,
                                               Load load = Load::map, const Limits& limits = {}) {
  PeftLoraAdapter<Scalar, Weight> out{PeftLoraConfig::from_file(config_path, limits), {}, weights_path};
  const PeftLoraConfig& cfg = out.config;
  const SafetensorsReader r(weights_path, load, limits);
  const std::string prefix = "base_model.model.";
  std::set<std::string> names;
  for (const auto& key : r.names()) {
    std::string module;
    if (internal::starts_with(key, prefix) && internal::ends_with(key, ".lora_A.weight"))
      module = key.substr(prefix.size(), key.size() - prefix.size() - std::string(".lora_A.weight").size());
    else if (internal::starts_with(key, prefix) && internal::ends_with(key, ".lora_B.weight"))
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
      for (const auto& t : cfg.target_modules) targeted = targeted || module == t || internal::ends_with(module, "." + t);
    }
    if (!targeted)
      internal::fail(weights_path, module, "not among the config's target_modules (" + config_path + ")");
    const std::string ka = prefix + module + ".lora_A.weight", kb = prefix + module + ".lora_B.weight";
    if (!r.has(ka)) internal::fail(weights_path, module, "missing tensor '" + ka + "'");
    if (!r.has(kb)) internal::fail(weights_path, module, "missing tensor '" + kb + "'");
    const auto [ra, in] = internal::dims2(r, ka, module);
    const auto [out_f, rb] = internal::dims2(r, kb, module);
    if (ra != cfg.lora.r)
      internal::fail(weights_path, module, molora::detail::mismatch("tensor '" + ka + "' rows (r from the config)", cfg.lora.r, ra));
    if (rb != cfg.lora.r)
      internal::fail(weights_path, module, molora::detail::mismatch("tensor '" + kb + "' columns (r from the config)", cfg.lora.r, rb));
    internal::check_scaling<Scalar>(config_path, module, cfg.lora.lora_alpha, cfg.lora.r, cfg.lora.use_rslora);
    internal::building(weights_path, module, [&, &mod = module, in_f = in, o = out_f] {
      LoRA<Scalar, Weight> lora(in_f, o, cfg.lora.r, cfg.lora.lora_alpha, cfg.lora.use_rslora);
      if constexpr (std::is_same_v<Weight, Scalar>) {
        lora.set_A(internal::finite_matrix<Scalar>(r, ka, mod));
        lora.set_B(internal::finite_matrix<Scalar>(r, kb, mod));
      } else {
        lora.set_A_stored(internal::stored_weights<Weight>(r, ka, mod).data());
        lora.set_B_stored(internal::stored_weights<Weight>(r, kb, mod).data());
      }
      out.modules.emplace(mod, std::move(lora));
    });
  }
  return out;
}

// From a folder holding adapter_config.json and adapter_model.safetensors (save_pretrained).
template <class Scalar, class Weight = Scalar>
PeftLoraAdapter<Scalar, Weight> load_peft_lora(const std::string& dir, Load load = Load::map, const Limits& limits = {}) {
  return load_peft_lora<Scalar, Weight>(internal::path_join(dir, "adapter_config.json"),
                                internal::path_join(dir, "adapter_model.safetensors"), load, limits);
}

// Merges a PEFT LoRA into its base weight in place (merge_and_unload). With
// fan_in_fan_out the base is stored [in, out] (GPT-2's Conv1D) and the transposed update
// is added. Throws (and leaves w untouched) on a shape mismatch or a non-finite result.
// A 16-bit LoRA's A and B are widened exactly and the merge is done in Scalar.
template <class Scalar, class Weight>
void merge_peft(const LoRA<Scalar, Weight>& lora, typename internal::identity<RowRef<Scalar>>::type w,
                bool fan_in_fan_out = false) {
  if (!fan_in_fan_out) {
    lora.merge(w);
    return;
  }
  RowMatrix<Scalar> wt = w.transpose();  // [out, in]
  lora.merge(wt);
  w = wt.transpose();
}

namespace internal {

// The base weight type of lora_linear: Scalar unless the caller names one.
template <class BaseWeight, class Scalar>
using lora_base_t = std::conditional_t<std::is_void_v<BaseWeight>, Scalar, BaseWeight>;

// A one-expert MoLoRALinear for `lora` (its router then gives weight 1 to the only expert,
// exactly), with a zero base weight; the adapter's A and B as the LoRA stores them.
template <class BaseWeight, class Scalar, class Weight>
MoLoRALinear<Scalar, BaseWeight, Weight> one_expert_layer(const LoRA<Scalar, Weight>& lora) {
  lora.check_live();
  MoLoRAConfig c;
  c.in_features = lora.in_features();
  c.out_features = lora.out_features();
  c.num_experts = 1;
  c.top_k = 1;
  c.rank = lora.rank();
  c.lora_alpha = static_cast<double>(lora.scaling()) * static_cast<double>(lora.rank());  // s = alpha / r
  c.router_bias = false;
  MoLoRALinear<Scalar, BaseWeight, Weight> layer(c);
  if constexpr (std::is_same_v<Weight, Scalar>) {
    layer.adapter().set_expert_A(0, lora.A());
    layer.adapter().set_expert_B(0, lora.B());
  } else {
    const Index out = lora.out_features(), r = lora.rank();
    std::vector<Weight> b(static_cast<std::size_t>(out * r));  // [out, r] row-major, from B^T [r, out]
    for (Index o = 0; o < out; ++o)
      for (Index j = 0; j < r; ++j) b[static_cast<std::size_t>(o * r + j)] = lora.B_data()[j * out + o];
    layer.adapter().set_expert_A_stored(0, lora.A_data());
    layer.adapter().set_expert_B_stored(0, b.data());
  }
  return layer;
}

}  // namespace internal

// A plain LoRA on a given base as a MoLoRALinear with one expert (its router then gives
// weight 1 to the only expert, exactly): y = x W0^T + b0 + s B A x. w0 [out, in] is copied,
// b0 [out] or an empty vector for no bias. The adapter keeps the LoRA's weight type (a
// 16-bit LoRA's bits as stored); BaseWeight (default Scalar, or bf16 / f16 for a float
// layer) is the base weight's storage, w0's values rounded to nearest even into it
// (lora_linear<bf16>(lora, w0, b0)). The layer's wrap_base_weight works as for any layer.
template <class BaseWeight = void, class Scalar, class Weight, class DW, class DB>
MoLoRALinear<Scalar, internal::lora_base_t<BaseWeight, Scalar>, Weight> lora_linear(const LoRA<Scalar, Weight>& lora,
                                                                                    const Eigen::MatrixBase<DW>& w0,
                                                                                    const Eigen::MatrixBase<DB>& b0) {
  auto layer = internal::one_expert_layer<internal::lora_base_t<BaseWeight, Scalar>>(lora);
  layer.set_base_weight(w0);
  if (b0.size() > 0) layer.set_base_bias(b0);
  return layer;
}

// The same over a host's 16-bit base weight w0 (row-major [out, in] bf16 / f16, e.g. a
// checkpoint's tensor as stored), wrapped without a copy as MoLoRALinear::wrap_base_weight
// does: the buffer must outlive the layer's use of it; its values are checked once, here.
// b0 [out] is copied (empty for no bias).
template <class Scalar, class Weight, class BaseWeight, class DB,
          class = std::enable_if_t<molora::detail::is_half<BaseWeight>>>
MoLoRALinear<Scalar, BaseWeight, Weight> lora_linear(const LoRA<Scalar, Weight>& lora, const BaseWeight* w0,
                                                     const Eigen::MatrixBase<DB>& b0) {
  auto layer = internal::one_expert_layer<BaseWeight>(lora);
  layer.wrap_base_weight(w0, lora.out_features(), lora.in_features());
  if (b0.size() > 0) layer.set_base_bias(b0);
  return layer;
}

}  // namespace molora::io
