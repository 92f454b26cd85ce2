// Parsers for the JSON configs that come with the checkpoints molora loads: PEFT's LoRA
// adapter_config.json, MixLoRA's adapter_config.json and MING-MOE's config.json. Each one
// becomes a plain validated struct; turning it into a MoLoRAConfig is the loaders' job.
// Every problem (bad JSON, missing field, wrong type, value out of range, an option molora
// does not implement) is a molora::format_error naming the file and the field with the
// expected and the actual value; no nlohmann exception escapes.
//
// Fields not listed in a struct are ignored, except for options that would change the math
// if ignored (DoRA, per-module rank/alpha patterns, other routing strategies): those are
// rejected as unsupported rather than silently dropped.
#pragma once

#include <nlohmann/json.hpp>

#include <cmath>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "../errors.hpp"
#include "../numeric.hpp"
#include "../types.hpp"
#include "input.hpp"
#include "regex.hpp"

namespace molora::io {

namespace detail {

// Reads typed fields of one JSON object, turning each problem into a format_error of the form
// "<source>: field 'name': expected ..., got ...".
class JsonFields {
public:
  JsonFields(const nlohmann::json& obj, std::string source, std::string prefix = "")
      : obj_(obj), source_(std::move(source)), prefix_(std::move(prefix)) {}

  // Parses `text`; the top level must be an object.
  static nlohmann::json parse_object(const std::string& text, const std::string& source) {
    nlohmann::json j;
    try {
      j = nlohmann::json::parse(text);
    } catch (const nlohmann::json::exception& e) {
      throw format_error(molora::detail::cat(source, ": not valid JSON: ", e.what()));
    }
    if (!j.is_object()) throw format_error(molora::detail::cat(source, ": top level: expected a JSON object, got ", j.type_name()));
    return j;
  }

  // The whole file, which must be a regular file of at most `max_bytes` (a FIFO, a device or
  // a directory is refused before anything is read).
  static std::string read_file(const std::string& path, std::uint64_t max_bytes) {
    std::string text;
    RegularFile(path).read_all(text, max_bytes, "Limits::max_config_bytes");
    return text;
  }

  bool has(const char* field) const {
    auto it = obj_.find(field);
    return it != obj_.end() && !it->is_null();
  }

  const nlohmann::json& at(const char* field) const {
    auto it = obj_.find(field);
    if (it == obj_.end() || it->is_null()) fail(field, "a value", "nothing (the field is missing or null)");
    return *it;
  }

  [[noreturn]] void fail(const std::string& field, const std::string& expected, const std::string& actual) const {
    throw format_error(molora::detail::cat(source_, ": field '", prefix_, field, "': expected ", expected, ", got ", actual));
  }

  // "16 (string)" style description of a value for messages; long values are cut.
  static std::string describe(const nlohmann::json& v) {
    std::string s = v.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
    if (s.size() > 60) s = s.substr(0, 57) + "...";
    return molora::detail::cat(s, " (", v.type_name(), ")");
  }

  std::string string(const char* field) const {
    const auto& v = at(field);
    if (!v.is_string()) fail(field, "a string", describe(v));
    return v.get<std::string>();
  }
  std::string string_or(const char* field, const std::string& fallback) const { return has(field) ? string(field) : fallback; }

  bool boolean_or(const char* field, bool fallback) const {
    if (!has(field)) return fallback;
    const auto& v = at(field);
    if (!v.is_boolean()) fail(field, "true or false", describe(v));
    return v.get<bool>();
  }

  // An integer >= min (JSON integers only: 16.0 or "16" are rejected).
  Index integer(const char* field, std::int64_t min) const {
    const auto& v = at(field);
    const std::string want = molora::detail::cat("an integer >= ", min);
    if (!v.is_number_integer()) fail(field, want, describe(v));
    if (v.is_number_unsigned()) {
      const auto u = v.get<std::uint64_t>();
      if (u > static_cast<std::uint64_t>(INT64_MAX)) fail(field, want + " that fits 64 bits", describe(v));
    }
    const auto i = v.get<std::int64_t>();
    if (i < min) fail(field, want, describe(v));
    return static_cast<Index>(i);
  }
  Index integer_or(const char* field, std::int64_t min, Index fallback) const { return has(field) ? integer(field, min) : fallback; }
  std::optional<Index> optional_integer(const char* field, std::int64_t min) const {
    if (!has(field)) return std::nullopt;
    return integer(field, min);
  }

  // A finite number (integer or float) in [lo, hi] or, with strict_lo, in (lo, hi].
  double number(const char* field, double lo, double hi, bool strict_lo) const {
    const auto& v = at(field);
    const std::string want = molora::detail::cat("a number in ", strict_lo ? "(" : "[", lo, ", ", hi, "]");
    if (!v.is_number()) fail(field, want, describe(v));
    const double d = v.get<double>();
    if (!std::isfinite(d) || d > hi || d < lo || (strict_lo && d == lo)) fail(field, want, describe(v));
    return d;
  }
  double number_or(const char* field, double lo, double hi, bool strict_lo, double fallback) const {
    return has(field) ? number(field, lo, hi, strict_lo) : fallback;
  }

  const std::string& source() const { return source_; }

private:
  const nlohmann::json& obj_;
  std::string source_;
  std::string prefix_;
};

inline constexpr double kHuge = 1e300;

// The LoRA hyper-parameters shared by the three formats' parsers.
inline void read_peft_type(const JsonFields& f, const char* want) {
  const std::string t = f.string("peft_type");
  if (t != want) f.fail("peft_type", molora::detail::cat("\"", want, "\""), molora::detail::cat("\"", t, "\""));
}

inline void reject_dora(const JsonFields& f) {
  if (f.boolean_or("use_dora", false)) f.fail("use_dora", "false (DoRA is unsupported)", "true");
}

}  // namespace detail

// LoRA hyper-parameters of one adapted Linear.
struct LoraParams {
  Index r = 0;               // rank
  double lora_alpha = 0;     // scaling = lora_alpha / r (or / sqrt(r) with use_rslora)
  double lora_dropout = 0;   // training only
  bool use_rslora = false;

  double scaling() const { return lora_scaling(lora_alpha, r, use_rslora); }
};

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
    const nlohmann::json j = detail::JsonFields::parse_object(text, source);
    const detail::JsonFields f(j, source);
    detail::read_peft_type(f, "LORA");
    PeftLoraConfig c;
    c.lora.r = f.integer("r", 1);
    c.lora.lora_alpha = f.number("lora_alpha", 0, detail::kHuge, true);
    c.lora.lora_dropout = f.number_or("lora_dropout", 0, 1, false, 0.0);
    c.lora.use_rslora = f.boolean_or("use_rslora", false);
    c.fan_in_fan_out = f.boolean_or("fan_in_fan_out", false);
    c.bias = f.string_or("bias", "none");
    if (c.bias != "none") f.fail("bias", "\"none\" (\"all\" and \"lora_only\" are unsupported)", "\"" + c.bias + "\"");
    detail::reject_dora(f);
    for (const char* pattern : {"rank_pattern", "alpha_pattern"}) {
      if (!f.has(pattern)) continue;
      const auto& v = f.at(pattern);
      if (!v.is_object() || !v.empty())
        f.fail(pattern, "an empty object (per-module ranks/alphas are unsupported)", detail::JsonFields::describe(v));
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
        if (!e.is_string()) f.fail("target_modules", "a list of strings or one regex string", detail::JsonFields::describe(t));
        c.target_modules.push_back(e.get<std::string>());
      }
    } else {
      f.fail("target_modules", "a list of strings or one regex string", detail::JsonFields::describe(t));
    }
    c.base_model_name_or_path = f.has("base_model_name_or_path") && f.at("base_model_name_or_path").is_string()
                                    ? f.at("base_model_name_or_path").get<std::string>()
                                    : std::string();
    c.task_type = f.has("task_type") && f.at("task_type").is_string() ? f.at("task_type").get<std::string>() : std::string();
    return c;
  }

  // Reads `path` (a regular file of at most limits.max_config_bytes) and parses it.
  static PeftLoraConfig from_file(const std::string& path, const Limits& limits = {}) {
    return from_string(detail::JsonFields::read_file(path, limits.max_config_bytes), path);
  }
};

// MixLoRA (TUDB-Labs/MixLoRA, mixlora/config.py) adapter_config.json.
//
// MixLoRA itself only implements routing_strategy "mixtral" (softmax over all experts, top-k,
// renormalised); that is what its files contain. "mixlora" is accepted as a synonym (it is how
// our own references name the strategy); anything else ("switch", "dynamic", ...) is rejected.
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
    const nlohmann::json j = detail::JsonFields::parse_object(text, source);
    const detail::JsonFields f(j, source);
    detail::read_peft_type(f, "MIXLORA");
    MixLoRAConfig c;
    c.source = source;
    c.routing_strategy = f.string("routing_strategy");
    if (c.routing_strategy != "mixtral" && c.routing_strategy != "mixlora")
      f.fail("routing_strategy", "\"mixtral\" (other strategies are unsupported)", "\"" + c.routing_strategy + "\"");
    detail::reject_dora(f);
    c.attention.r = f.integer("r", 1);
    c.attention.lora_alpha = f.number("lora_alpha", 0, detail::kHuge, true);
    c.attention.lora_dropout = f.number_or("lora_dropout", 0, 1, false, 0.0);
    c.attention.use_rslora = f.boolean_or("use_rslora", false);
    c.expert = c.attention;
    if (f.has("expert_lora")) {
      const auto& e = f.at("expert_lora");
      if (!e.is_object()) f.fail("expert_lora", "an object", detail::JsonFields::describe(e));
      const detail::JsonFields ef(e, source, "expert_lora.");
      c.expert.r = ef.integer_or("r", 1, c.expert.r);
      c.expert.lora_alpha = ef.number_or("lora_alpha", 0, detail::kHuge, true, c.expert.lora_alpha);
      c.expert.lora_dropout = ef.number_or("lora_dropout", 0, 1, false, c.expert.lora_dropout);
      c.expert.use_rslora = ef.boolean_or("use_rslora", c.expert.use_rslora);
      detail::reject_dora(ef);
    }
    c.num_experts = f.integer("num_experts", 1);
    c.top_k = f.integer_or("top_k", 1, 2);
    if (c.top_k > c.num_experts)
      f.fail("top_k", molora::detail::cat("an integer in [1, num_experts = ", c.num_experts, "]"), std::to_string(c.top_k));
    const auto& t = f.at("target_modules");
    if (t.is_array()) {
      for (const auto& e : t) {
        if (!e.is_string()) f.fail("target_modules", "a list of strings or an object of string to bool", detail::JsonFields::describe(t));
        c.target_modules.push_back(e.get<std::string>());
      }
    } else if (t.is_object()) {
      for (auto it = t.begin(); it != t.end(); ++it) {
        if (!it.value().is_boolean())
          f.fail(molora::detail::cat("target_modules.", it.key()), "true or false", detail::JsonFields::describe(it.value()));
        if (it.value().get<bool>()) c.target_modules.push_back(it.key());
      }
    } else {
      f.fail("target_modules", "a list of strings or an object of string to bool", detail::JsonFields::describe(t));
    }
    c.act_fn = f.string_or("act_fn", "");
    c.jitter_noise = f.number_or("jitter_noise", 0, 1, false, 0.0);
    c.router_aux_loss_coef = f.number_or("router_aux_loss_coef", 0, detail::kHuge, false, 0.001);
    c.router_init_range = f.number_or("router_init_range", 0, detail::kHuge, false, 0.02);
    c.router_loss = f.boolean_or("router_loss", true);
    c.base_model_name_or_path = f.has("base_model_name_or_path") && f.at("base_model_name_or_path").is_string()
                                    ? f.at("base_model_name_or_path").get<std::string>()
                                    : std::string();
    return c;
  }

  // Reads `path` (a regular file of at most limits.max_config_bytes) and parses it.
  static MixLoRAConfig from_file(const std::string& path, const Limits& limits = {}) {
    return from_string(detail::JsonFields::read_file(path, limits.max_config_bytes), path);
  }
};

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
    const nlohmann::json j = detail::JsonFields::parse_object(text, source);
    const detail::JsonFields f(j, source);
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
    if (f.has("lora_alpha")) c.lora_alpha = f.number("lora_alpha", 0, detail::kHuge, true);
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
    return from_string(detail::JsonFields::read_file(path, limits.max_config_bytes), path);
  }
};

}  // namespace molora::io
