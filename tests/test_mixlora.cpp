// MixLoRA: adapter_config.json's parser (what MixLoraConfig.export() writes; a realistic
// example, then each missing or mistyped field as a format_error naming the file and the
// field), the feed-forward block's parity with the package's outputs (tests/data/README.md),
// and a config that disagrees with the tensors.
#include <doctest/doctest.h>

#include <molora/io/mixlora.hpp>
#include <molora/io/safetensors.hpp>

#include <filesystem>
#include <initializer_list>
#include <regex>
#include <string>

#include "io_test_util.hpp"
#include "reference.hpp"
#include "test_util.hpp"

namespace fs = std::filesystem;
using molora::Index;
using molora::RowMatrix;
using molora::io::SafetensorsReader;
using molora::io::MixLoRAConfig;
using test_util::check_contains;
using test_util::copy_dir;
using test_util::error_of;
using test_util::read_text;
using test_util::rel;
using test_util::TempDir;
using test_util::write_text;
using io_test_util::check_error;
using io_test_util::edited;
using io_test_util::rewrite;
using nlohmann::json;

namespace {

const std::string data_dir = MOLORA_TEST_DATA_DIR;

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

}  // namespace

// ---- config parser ------------------------------------------------------------------------

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

TEST_CASE("json_config: MixLoRA from_file reads the file, a missing file is a format_error naming it") {
  TempDir dir;
  const std::string missing = (dir.path / "nope.json").string();
  check_contains(error_of([&] { (void)MixLoRAConfig::from_file(missing); }), {"nope.json"});
  const std::string mix = dir.write("mix.json", kMixLoraExample);
  CHECK(MixLoRAConfig::from_file(mix).num_experts == 8);
}

TEST_CASE("json_config: the fuzz seed corpus parses as MixLoRAConfig or raises format_error") {
  const fs::path corpus = fs::path(MOLORA_TEST_DATA_DIR) / ".." / "fuzz" / "corpus" / "fuzz_json_config";
  REQUIRE(fs::is_directory(corpus));
  int parsed = 0;
  for (const auto& e : fs::directory_iterator(corpus)) {
    try { (void)molora::io::MixLoRAConfig::from_file(e.path().string()); ++parsed; } catch (const molora::format_error&) {}
  }
  CHECK(parsed >= 1);  // mixlora
}

// ---- loader -------------------------------------------------------------------------------

TEST_CASE_TEMPLATE("MixLoRA: the feed-forward block matches the package's output, layer by layer", Scalar, float,
                   double) {
  const std::string dir = data_dir + "/mixlora";
  const auto cfg = molora::io::MixLoRAConfig::from_file(dir + "/adapter_config.json");
  const SafetensorsReader weights(dir + "/adapter_model.safetensors"), io(dir + "/io.safetensors"),
      base(dir + "/base.safetensors");
  for (Index L : {0, 1}) {
    CAPTURE(L);
    const std::string p = "layers." + std::to_string(L) + ".mlp.";
    const auto ffn = molora::io::load_mixlora_ffn<Scalar>(cfg, weights, L, base.matrix<Scalar>(p + "gate_proj.weight"),
                                                          base.matrix<Scalar>(p + "up_proj.weight"),
                                                          base.matrix<Scalar>(p + "down_proj.weight"));
    const RowMatrix<Scalar> x = io.matrix<Scalar>("x." + std::to_string(L));
    typename molora::MixLoRAFeedForward<Scalar>::Workspace ws;
    RowMatrix<Scalar> y(x.rows(), x.cols());
    ffn.forward(x, y, ws);
    CHECK(rel(ws.logits, io.matrix<double>("router_logits." + std::to_string(L))) < 1e-5);
    const double e = rel(y, io.matrix<double>("y." + std::to_string(L)));
    CHECK(e < 1e-5);
    MESSAGE("mixlora layer ", L, ": rel. error ", e);
    // in place (x and y the same buffer) gives the same
    RowMatrix<Scalar> inplace = x;
    ffn.forward(inplace, inplace, ws);
    CHECK(inplace == y);
  }
}

TEST_CASE("MixLoRA: a config that disagrees with the tensors is a format error naming module and key") {
  // MixLoRA: top-k/num_experts disagreeing with the tensors
  const auto mcfg_text = read_text(data_dir + "/mixlora/adapter_config.json");
  auto mcfg = molora::io::MixLoRAConfig::from_string(
      std::regex_replace(mcfg_text, std::regex("\"num_experts\": 4"), "\"num_experts\": 3"), "mixlora-edited");
  const SafetensorsReader mw(data_dir + "/mixlora/adapter_model.safetensors"), mb(data_dir + "/mixlora/base.safetensors");
  const std::string msg = error_of([&] {
    molora::io::load_mixlora_ffn<float>(mcfg, mw, 0, mb.matrix<float>("layers.0.mlp.gate_proj.weight"),
                                        mb.matrix<float>("layers.0.mlp.up_proj.weight"),
                                        mb.matrix<float>("layers.0.mlp.down_proj.weight"));
  });
  CHECK(msg.find("module 'mixlora.layers.0.mlp': unexpected tensor") != std::string::npos);
}
