// JSON config parsers: a realistic example of each real file (PEFT LoRA adapter_config.json,
// MixLoRA adapter_config.json, MING-MOE config.json), then each missing or mistyped field,
// checked to be a molora::format_error naming the file and the field.
#include <doctest/doctest.h>

#include <molora/io/json_config.hpp>

#include <cmath>
#include <filesystem>
#include <initializer_list>
#include <string>

#include "test_util.hpp"

namespace fs = std::filesystem;
using namespace molora::io;
using nlohmann::json;
using test_util::error_of;
using test_util::TempDir;

namespace {

// What PEFT 0.10 writes for a Qwen1.5 chat LoRA (MING-MOE's attention adapter).
const char* const kPeftExample = R"({
  "alpha_pattern": {},
  "auto_mapping": null,
  "base_model_name_or_path": "Qwen/Qwen1.5-1.8B-Chat",
  "bias": "none",
  "fan_in_fan_out": false,
  "inference_mode": true,
  "init_lora_weights": true,
  "layer_replication": null,
  "layers_pattern": null,
  "layers_to_transform": null,
  "loftq_config": {},
  "lora_alpha": 32,
  "lora_dropout": 0.05,
  "megatron_config": null,
  "megatron_core": "megatron.core",
  "modules_to_save": null,
  "peft_type": "LORA",
  "r": 16,
  "rank_pattern": {},
  "revision": null,
  "target_modules": ["o_proj", "v_proj", "k_proj", "q_proj"],
  "task_type": "CAUSAL_LM",
  "use_dora": false,
  "use_rslora": false
})";

// What mixlora's MixLoraConfig.export() writes (target_modules as a list).
const char* const kMixLoraExample = R"({
  "bias": "none",
  "peft_type": "MIXLORA",
  "task_type": "CAUSAL_LM",
  "base_model_name_or_path": "meta-llama/Llama-2-7b-hf",
  "r": 8,
  "lora_alpha": 16,
  "lora_dropout": 0.05,
  "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj", "up_proj"],
  "routing_strategy": "mixtral",
  "num_experts": 8,
  "act_fn": "silu",
  "top_k": 2
})";

// Qwen1.5-1.8B-Chat's config.json plus MING-MOE's fields.
const char* const kMingExample = R"({
  "architectures": ["MoLoRAQwenForCausalLM"],
  "attention_dropout": 0.0,
  "bos_token_id": 151643,
  "eos_token_id": 151645,
  "hidden_act": "silu",
  "hidden_size": 2048,
  "initializer_range": 0.02,
  "intermediate_size": 5504,
  "max_position_embeddings": 32768,
  "max_window_layers": 21,
  "model_type": "qwen2",
  "num_attention_heads": 16,
  "num_hidden_layers": 24,
  "num_key_value_heads": 16,
  "rms_norm_eps": 1e-06,
  "rope_theta": 1000000.0,
  "sliding_window": 32768,
  "tie_word_embeddings": false,
  "torch_dtype": "bfloat16",
  "transformers_version": "4.37.0",
  "use_cache": true,
  "use_sliding_window": false,
  "vocab_size": 151936,
  "num_experts": 8,
  "num_experts_per_token": 2,
  "expert_selection": "top_k",
  "share_expert": false,
  "r": 16,
  "lora_alpha": 32,
  "lora_dropout": 0.05
})";

// `base` with `patch` merged in (a null value in patch removes the key).
std::string edited(const char* base, const json& patch) {
  json j = json::parse(base);
  for (auto it = patch.begin(); it != patch.end(); ++it) {
    if (it.value().is_null())
      j.erase(it.key());
    else
      j[it.key()] = it.value();
  }
  return j.dump();
}

void check_contains(const std::string& msg, std::initializer_list<const char*> parts) {
  for (const char* p : parts) {
    INFO("message: " << msg);
    CHECK(msg.find(p) != std::string::npos);
  }
}

template <class Config>
void check_error(const std::string& text, std::initializer_list<const char*> parts) {
  const std::string msg = error_of([&] { (void)Config::from_string(text, "cfg.json"); });
  check_contains(msg, {"cfg.json"});
  check_contains(msg, parts);
}

}  // namespace

// ---- PEFT LoRA -----------------------------------------------------------------------------

TEST_CASE("json_config: PEFT LoRA adapter_config.json") {
  const auto c = PeftLoraConfig::from_string(kPeftExample);
  CHECK(c.lora.r == 16);
  CHECK(c.lora.lora_alpha == 32.0);
  CHECK(c.lora.lora_dropout == doctest::Approx(0.05));
  CHECK_FALSE(c.lora.use_rslora);
  CHECK(c.lora.scaling() == 2.0);
  CHECK_FALSE(c.fan_in_fan_out);
  CHECK_FALSE(c.target_modules_is_regex);
  CHECK(c.target_modules == std::vector<std::string>{"o_proj", "v_proj", "k_proj", "q_proj"});
  CHECK(c.bias == "none");
  CHECK(c.base_model_name_or_path == "Qwen/Qwen1.5-1.8B-Chat");
  CHECK(c.task_type == "CAUSAL_LM");

  // Minimal file: defaults, float alpha, rsLoRA, a regex string for target_modules.
  const auto m = PeftLoraConfig::from_string(
      R"({"peft_type":"LORA","r":4,"lora_alpha":6.5,"use_rslora":true,"target_modules":".*\\.(q|v)_proj"})");
  CHECK(m.lora.lora_dropout == 0.0);
  CHECK(m.lora.scaling() == doctest::Approx(6.5 / 2.0));
  CHECK(m.target_modules_is_regex);
  CHECK(m.target_modules_regex == ".*\\.(q|v)_proj");
  CHECK(m.target_modules.empty());
  CHECK(m.bias == "none");
  CHECK_FALSE(m.fan_in_fan_out);
}

TEST_CASE("json_config: PEFT LoRA field errors") {
  using C = PeftLoraConfig;
  check_error<C>(edited(kPeftExample, {{"peft_type", nullptr}}), {"'peft_type'", "missing"});
  check_error<C>(edited(kPeftExample, {{"peft_type", "IA3"}}), {"'peft_type'", "expected \"LORA\", got \"IA3\""});
  check_error<C>(edited(kPeftExample, {{"r", nullptr}}), {"'r'", "missing"});
  check_error<C>(edited(kPeftExample, {{"r", "16"}}), {"'r'", "expected an integer >= 1", "\"16\" (string)"});
  check_error<C>(edited(kPeftExample, {{"r", 0}}), {"'r'", "got 0"});
  check_error<C>(edited(kPeftExample, {{"r", -3}}), {"'r'", "got -3"});
  check_error<C>(edited(kPeftExample, {{"r", 16.5}}), {"'r'", "16.5"});
  check_error<C>(edited(kPeftExample, {{"r", 18446744073709551615ull}}), {"'r'", "fits 64 bits"});
  check_error<C>(edited(kPeftExample, {{"lora_alpha", nullptr}}), {"'lora_alpha'", "missing"});
  check_error<C>(edited(kPeftExample, {{"lora_alpha", 0}}), {"'lora_alpha'", "a number in (0,"});
  check_error<C>(edited(kPeftExample, {{"lora_alpha", -1.5}}), {"'lora_alpha'", "-1.5"});
  check_error<C>(edited(kPeftExample, {{"lora_alpha", "32"}}), {"'lora_alpha'", "(string)"});
  check_error<C>(edited(kPeftExample, {{"lora_dropout", 1.5}}), {"'lora_dropout'", "[0, 1]"});
  check_error<C>(edited(kPeftExample, {{"use_rslora", "true"}}), {"'use_rslora'", "true or false", "(string)"});
  check_error<C>(edited(kPeftExample, {{"fan_in_fan_out", 1}}), {"'fan_in_fan_out'", "true or false"});
  check_error<C>(edited(kPeftExample, {{"target_modules", nullptr}}), {"'target_modules'", "missing"});
  check_error<C>(edited(kPeftExample, {{"target_modules", 5}}), {"'target_modules'", "list of strings"});
  check_error<C>(edited(kPeftExample, {{"target_modules", json::array({"q_proj", 1})}}), {"'target_modules'", "list of strings"});
  check_error<C>(edited(kPeftExample, {{"bias", "all"}}), {"'bias'", "unsupported", "\"all\""});
  check_error<C>(edited(kPeftExample, {{"bias", "lora_only"}}), {"'bias'", "unsupported"});
  check_error<C>(edited(kPeftExample, {{"use_dora", true}}), {"'use_dora'", "unsupported"});
  check_error<C>(edited(kPeftExample, {{"rank_pattern", {{"q_proj", 8}}}}), {"'rank_pattern'", "unsupported"});
  check_error<C>(edited(kPeftExample, {{"alpha_pattern", {{"q_proj", 8}}}}), {"'alpha_pattern'", "unsupported"});
  check_error<C>("{\"peft_type\": \"LORA\", ", {"not valid JSON"});
  check_error<C>("[1, 2, 3]", {"top level", "expected a JSON object, got array"});
  check_error<C>("", {"not valid JSON"});
}

TEST_CASE("json_config: from_file names the file, missing files are format_errors") {
  TempDir dir;
  const std::string p = dir.write("adapter_config.json", kPeftExample);
  CHECK(PeftLoraConfig::from_file(p).lora.r == 16);
  const std::string bad = dir.write("bad_config.json", edited(kPeftExample, {{"r", "x"}}));
  check_contains(error_of([&] { (void)PeftLoraConfig::from_file(bad); }), {"bad_config.json", "'r'"});
  const std::string missing = (dir.path / "nope.json").string();
  check_contains(error_of([&] { (void)PeftLoraConfig::from_file(missing); }), {"nope.json", "cannot open"});
  check_contains(error_of([&] { (void)MixLoRAConfig::from_file(missing); }), {"nope.json"});
  check_contains(error_of([&] { (void)MingMoeConfig::from_file(missing); }), {"nope.json"});
  const std::string mix = dir.write("mix.json", kMixLoraExample);
  CHECK(MixLoRAConfig::from_file(mix).num_experts == 8);
  const std::string ming = dir.write("config.json", kMingExample);
  CHECK(MingMoeConfig::from_file(ming).num_experts == 8);
}

// ---- MixLoRA ---------------------------------------------------------------------------------

TEST_CASE("json_config: MixLoRA adapter_config.json") {
  const auto c = MixLoRAConfig::from_string(kMixLoraExample);
  CHECK(c.routing_strategy == "mixtral");
  CHECK(c.num_experts == 8);
  CHECK(c.top_k == 2);
  CHECK(c.attention.r == 8);
  CHECK(c.attention.lora_alpha == 16.0);
  CHECK(c.attention.scaling() == 2.0);
  CHECK(c.expert.r == 8);  // no expert_lora: experts share the top-level values
  CHECK(c.expert.lora_alpha == 16.0);
  CHECK(c.target_modules.size() == 7);
  CHECK(c.act_fn == "silu");
  CHECK(c.jitter_noise == 0.0);
  CHECK(c.router_aux_loss_coef == doctest::Approx(0.001));
  CHECK(c.router_init_range == doctest::Approx(0.02));
  CHECK(c.router_loss);
  CHECK(c.base_model_name_or_path == "meta-llama/Llama-2-7b-hf");

  // The dict form of target_modules, expert_lora overrides, defaults for top_k and act_fn.
  const auto d = MixLoRAConfig::from_string(edited(
      kMixLoraExample,
      {{"target_modules", {{"q_proj", true}, {"k_proj", false}, {"v_proj", true}, {"gate_proj", true}}},
       {"expert_lora", {{"r", 16}, {"lora_alpha", 32}, {"lora_dropout", 0.1}}},
       {"top_k", nullptr},
       {"act_fn", nullptr},
       {"jitter_noise", 0.01},
       {"router_aux_loss_coef", 0.01},
       {"use_rslora", true}}));
  CHECK(d.top_k == 2);
  CHECK(d.act_fn.empty());
  CHECK(d.target_modules == std::vector<std::string>{"gate_proj", "q_proj", "v_proj"});
  CHECK(d.attention.r == 8);
  CHECK(d.expert.r == 16);
  CHECK(d.expert.lora_alpha == 32.0);
  CHECK(d.expert.lora_dropout == doctest::Approx(0.1));
  CHECK(d.expert.use_rslora);  // inherited from the top level
  CHECK(d.expert.scaling() == doctest::Approx(32.0 / 4.0));
  CHECK(d.jitter_noise == doctest::Approx(0.01));
  CHECK(d.router_aux_loss_coef == doctest::Approx(0.01));

  // "mixlora" is accepted as a synonym of "mixtral"; top_k == num_experts is allowed.
  const auto s = MixLoRAConfig::from_string(edited(kMixLoraExample, {{"routing_strategy", "mixlora"}, {"top_k", 8}}));
  CHECK(s.top_k == 8);
}

TEST_CASE("json_config: MixLoRA field errors") {
  using C = MixLoRAConfig;
  check_error<C>(edited(kMixLoraExample, {{"peft_type", "LORA"}}), {"'peft_type'", "expected \"MIXLORA\""});
  check_error<C>(edited(kMixLoraExample, {{"routing_strategy", nullptr}}), {"'routing_strategy'", "missing"});
  check_error<C>(edited(kMixLoraExample, {{"routing_strategy", "mixlora-dynamic"}}),
                 {"'routing_strategy'", "unsupported", "\"mixlora-dynamic\""});
  check_error<C>(edited(kMixLoraExample, {{"routing_strategy", "mixlora-switch"}}), {"'routing_strategy'", "unsupported"});
  check_error<C>(edited(kMixLoraExample, {{"routing_strategy", "switch"}}), {"'routing_strategy'", "unsupported"});
  check_error<C>(edited(kMixLoraExample, {{"num_experts", nullptr}}), {"'num_experts'", "missing"});
  check_error<C>(edited(kMixLoraExample, {{"num_experts", "8"}}), {"'num_experts'", "(string)"});
  check_error<C>(edited(kMixLoraExample, {{"num_experts", 0}}), {"'num_experts'", "got 0"});
  check_error<C>(edited(kMixLoraExample, {{"top_k", 0}}), {"'top_k'", "got 0"});
  check_error<C>(edited(kMixLoraExample, {{"top_k", 9}}), {"'top_k'", "num_experts = 8", "got 9"});
  check_error<C>(edited(kMixLoraExample, {{"r", nullptr}}), {"'r'", "missing"});
  check_error<C>(edited(kMixLoraExample, {{"r", true}}), {"'r'", "(boolean)"});
  check_error<C>(edited(kMixLoraExample, {{"lora_alpha", nullptr}}), {"'lora_alpha'", "missing"});
  check_error<C>(edited(kMixLoraExample, {{"use_rslora", 0}}), {"'use_rslora'"});
  check_error<C>(edited(kMixLoraExample, {{"target_modules", nullptr}}), {"'target_modules'", "missing"});
  check_error<C>(edited(kMixLoraExample, {{"target_modules", "q_proj"}}), {"'target_modules'", "object of string to bool"});
  check_error<C>(edited(kMixLoraExample, {{"target_modules", {{"q_proj", "yes"}}}}), {"'target_modules.q_proj'", "true or false"});
  check_error<C>(edited(kMixLoraExample, {{"act_fn", 3}}), {"'act_fn'", "a string"});
  check_error<C>(edited(kMixLoraExample, {{"jitter_noise", -0.1}}), {"'jitter_noise'"});
  check_error<C>(edited(kMixLoraExample, {{"router_aux_loss_coef", "0.01"}}), {"'router_aux_loss_coef'", "(string)"});
  check_error<C>(edited(kMixLoraExample, {{"expert_lora", 4}}), {"'expert_lora'", "an object"});
  check_error<C>(edited(kMixLoraExample, {{"expert_lora", {{"r", "x"}}}}), {"'expert_lora.r'", "(string)"});
  check_error<C>(edited(kMixLoraExample, {{"use_dora", true}}), {"'use_dora'", "unsupported"});
}

// ---- MING-MOE ---------------------------------------------------------------------------------

TEST_CASE("json_config: MING-MOE config.json") {
  const auto c = MingMoeConfig::from_string(kMingExample);
  CHECK(c.num_experts == 8);
  CHECK(c.num_experts_per_token == 2);
  CHECK(c.expert_selection == "top_k");
  CHECK_FALSE(c.sampling());
  CHECK_FALSE(c.share_expert);
  CHECK(c.num_share_experts == 1);
  CHECK_FALSE(c.use_rslora);
  REQUIRE(c.r.has_value());
  CHECK(*c.r == 16);
  REQUIRE(c.lora_alpha.has_value());
  CHECK(*c.lora_alpha == 32.0);
  REQUIRE(c.lora_dropout.has_value());
  CHECK(*c.lora_dropout == doctest::Approx(0.05));
  CHECK(c.hidden_size == 2048);
  CHECK(c.intermediate_size == 5504);
  CHECK(c.num_hidden_layers == 24);
  CHECK(c.model_type == "qwen2");
  CHECK(c.hidden_act == "silu");

  // Optional fields absent; lora_r spelling; sampling; shared expert.
  const auto m = MingMoeConfig::from_string(
      R"({"num_experts":4,"num_experts_per_token":4,"expert_selection":"sampling","share_expert":true,"lora_r":8})");
  CHECK(m.sampling());
  CHECK(m.share_expert);
  CHECK(m.r == 8);
  CHECK_FALSE(m.lora_alpha.has_value());
  CHECK_FALSE(m.hidden_size.has_value());
  CHECK(m.model_type.empty());
  CHECK(MingMoeConfig::from_string(edited(kMingExample, {{"expert_selection", "topk"}})).expert_selection == "top_k");
  const auto d = MingMoeConfig::from_string(R"({"num_experts":2,"num_experts_per_token":1})");
  CHECK(d.expert_selection == "top_k");
  CHECK_FALSE(d.r.has_value());
}

TEST_CASE("json_config: MING-MOE field errors") {
  using C = MingMoeConfig;
  check_error<C>(edited(kMingExample, {{"num_experts", nullptr}}), {"'num_experts'", "missing"});
  check_error<C>(edited(kMingExample, {{"num_experts", 8.0}}), {"'num_experts'", "(number)"});
  check_error<C>(edited(kMingExample, {{"num_experts_per_token", nullptr}}), {"'num_experts_per_token'", "missing"});
  check_error<C>(edited(kMingExample, {{"num_experts_per_token", 9}}), {"'num_experts_per_token'", "num_experts = 8", "got 9"});
  check_error<C>(edited(kMingExample, {{"num_experts_per_token", 0}}), {"'num_experts_per_token'", "got 0"});
  check_error<C>(edited(kMingExample, {{"expert_selection", "top-k"}}), {"'expert_selection'", "\"sampling\"", "\"top-k\""});
  check_error<C>(edited(kMingExample, {{"expert_selection", 1}}), {"'expert_selection'", "a string"});
  check_error<C>(edited(kMingExample, {{"share_expert", "yes"}}), {"'share_expert'", "true or false"});
  check_error<C>(edited(kMingExample, {{"r", "16"}}), {"'r'", "(string)"});
  check_error<C>(edited(kMingExample, {{"lora_r", 8}}), {"'lora_r'", "same value as r"});
  check_error<C>(edited(kMingExample, {{"lora_alpha", 0}}), {"'lora_alpha'"});
  check_error<C>(edited(kMingExample, {{"lora_dropout", "0.05"}}), {"'lora_dropout'"});
  check_error<C>(edited(kMingExample, {{"hidden_size", "2048"}}), {"'hidden_size'", "(string)"});
  check_error<C>(edited(kMingExample, {{"intermediate_size", -1}}), {"'intermediate_size'", "got -1"});
  check_error<C>(edited(kMingExample, {{"num_hidden_layers", 0}}), {"'num_hidden_layers'"});
  check_error<C>(edited(kMingExample, {{"use_rslora", "no"}}), {"'use_rslora'"});
  check_error<C>("{\"num_experts\": 8,}", {"not valid JSON"});
  check_error<C>("\"config\"", {"expected a JSON object, got string"});
}

TEST_CASE("json_config: the fuzz seed corpus parses or raises format_error") {
  const fs::path corpus = fs::path(MOLORA_TEST_DATA_DIR) / ".." / "fuzz" / "corpus" / "fuzz_json_config";
  REQUIRE(fs::is_directory(corpus));
  int parsed = 0;
  for (const auto& e : fs::directory_iterator(corpus)) {
    const std::string p = e.path().string();
    try { (void)PeftLoraConfig::from_file(p); ++parsed; } catch (const molora::format_error&) {}
    try { (void)MixLoRAConfig::from_file(p); ++parsed; } catch (const molora::format_error&) {}
    try { (void)MingMoeConfig::from_file(p); ++parsed; } catch (const molora::format_error&) {}
  }
  CHECK(parsed >= 4);  // peft_lora, peft_regex, mixlora, ming_moe
}
