// PEFT LoRA: adapter_config.json's parser (a realistic example, then each missing or
// mistyped field as a format_error naming the file and the field), the loader's parity with
// PEFT's outputs on the fixtures of tools/make_fixtures.py (tests/data/README.md), and
// configs that disagree with the tensors.
#include <doctest/doctest.h>

#include <molora/io/peft.hpp>
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
using molora::io::PeftLoraConfig;
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

}  // namespace

// ---- config parser ------------------------------------------------------------------------

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

TEST_CASE("json_config: PEFT LoRA from_file names the file, missing files are format_errors") {
  TempDir dir;
  const std::string p = dir.write("adapter_config.json", kPeftExample);
  CHECK(PeftLoraConfig::from_file(p).lora.r == 16);
  const std::string bad = dir.write("bad_config.json", edited(kPeftExample, {{"r", "x"}}));
  check_contains(error_of([&] { (void)PeftLoraConfig::from_file(bad); }), {"bad_config.json", "'r'"});
  const std::string missing = (dir.path / "nope.json").string();
  check_contains(error_of([&] { (void)PeftLoraConfig::from_file(missing); }), {"nope.json", "cannot open"});
}

TEST_CASE("json_config: the fuzz seed corpus parses as PeftLoraConfig or raises format_error") {
  const fs::path corpus = fs::path(MOLORA_TEST_DATA_DIR) / ".." / "fuzz" / "corpus" / "fuzz_json_config";
  REQUIRE(fs::is_directory(corpus));
  int parsed = 0;
  for (const auto& e : fs::directory_iterator(corpus)) {
    try { (void)molora::io::PeftLoraConfig::from_file(e.path().string()); ++parsed; } catch (const molora::format_error&) {}
  }
  CHECK(parsed >= 2);  // peft_lora, peft_regex
}

// ---- loader -------------------------------------------------------------------------------

TEST_CASE_TEMPLATE("PEFT LoRA: unmerged and merged forward match PEFT's outputs", Scalar, float, double) {
  for (const char* folder : {"peft_lora", "peft_lora_rslora"}) {
    CAPTURE(folder);
    const std::string dir = data_dir + "/" + folder;
    const auto adapter = molora::io::load_peft_lora<Scalar>(dir);
    const SafetensorsReader io(dir + "/io.safetensors"), base(dir + "/base.safetensors");
    REQUIRE(adapter.modules.size() == 2);
    CHECK(adapter.config.lora.use_rslora == (std::string(folder) == "peft_lora_rslora"));
    for (const auto& [module, lora] : adapter.modules) {
      CAPTURE(module);
      const RowMatrix<Scalar> x = io.matrix<Scalar>("x." + module);
      const auto layer = molora::io::lora_linear(lora, base.matrix<Scalar>(module + ".weight"),
                                                 base.vector<Scalar>(module + ".bias"));
      const RowMatrix<Scalar> y = layer.forward(x);
      const double e_unmerged = rel(y, io.matrix<double>("y." + module));
      CHECK(e_unmerged < 1e-5);
      RowMatrix<Scalar> w = base.matrix<Scalar>(module + ".weight");
      molora::io::merge_peft(lora, w);
      CHECK(rel(w, io.matrix<double>("merged_weight." + module)) < 1e-5);
      RowMatrix<Scalar> y_merged = x * w.transpose();
      y_merged.rowwise() += base.vector<Scalar>(module + ".bias").transpose();
      const double e_merged = rel(y_merged, io.matrix<double>("y_merged." + module));
      CHECK(e_merged < 1e-5);
      MESSAGE(std::string(folder), " ", module, ": rel. error unmerged ", e_unmerged, ", merged ", e_merged);
      // fan_in_fan_out: the base stored [in, out] gets the transposed update
      RowMatrix<Scalar> wt = base.matrix<Scalar>(module + ".weight").transpose();
      molora::io::merge_peft(lora, wt, true);
      CHECK(rel(RowMatrix<Scalar>(wt.transpose()), io.matrix<double>("merged_weight." + module)) < 1e-5);
    }
  }
}

TEST_CASE("PEFT LoRA: a config that disagrees with the tensors is a format error naming module and key") {
  TempDir tmp;
  // PEFT: rank in the config disagrees; a module outside target_modules
  const std::string peft = tmp.file("peft");
  copy_dir(data_dir + "/peft_lora", peft);
  const std::string ptext = read_text(peft + "/adapter_config.json");
  write_text(peft + "/adapter_config.json", std::regex_replace(ptext, std::regex("\"r\": 4"), "\"r\": 2"));
  CHECK(error_of([&] { molora::io::load_peft_lora<float>(peft); }).find("rows (r from the config): expected 2, got 4") !=
        std::string::npos);
  write_text(peft + "/adapter_config.json",
             std::regex_replace(ptext, std::regex("\"other\",\\s*"), ""));
  CHECK(error_of([&] { molora::io::load_peft_lora<float>(peft); })
            .find("module 'layers.0.other': not among the config's target_modules") != std::string::npos);
}
