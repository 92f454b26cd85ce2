// MING-MOE: config.json's parser (Qwen1.5's fields plus MING-MOE's; a realistic example,
// then each missing or mistyped field as a format_error naming the file and the field), the
// loader's parity with the reference re-statement's outputs and routing (tests/data/README.md),
// the save/load round trip, and configs that disagree with the tensors.
#include <doctest/doctest.h>

#include <molora/io/ming_moe.hpp>
#include <molora/io/safetensors.hpp>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <initializer_list>
#include <regex>
#include <string>

#include "io_test_util.hpp"
#include "reference.hpp"
#include "test_util.hpp"

namespace test_ming_moe {

namespace fs = std::filesystem;
using molora::Index;
using molora::RowMatrix;
using molora::io::SafetensorsReader;
using molora::io::MingMoeConfig;
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

}  // namespace

// ---- config parser ------------------------------------------------------------------------

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

TEST_CASE("json_config: MING-MOE from_file reads the file, a missing file is a format_error naming it") {
  TempDir dir;
  const std::string missing = (dir.path / "nope.json").string();
  check_contains(error_of([&] { (void)MingMoeConfig::from_file(missing); }), {"nope.json"});
  const std::string ming = dir.write("config.json", kMingExample);
  CHECK(MingMoeConfig::from_file(ming).num_experts == 8);
}

TEST_CASE("json_config: the fuzz seed corpus parses as MingMoeConfig or raises format_error") {
  const fs::path corpus = fs::path(MOLORA_TEST_DATA_DIR) / ".." / "fuzz" / "corpus" / "fuzz_json_config";
  REQUIRE(fs::is_directory(corpus));
  int parsed = 0;
  for (const auto& e : fs::directory_iterator(corpus)) {
    try { (void)molora::io::MingMoeConfig::from_file(e.path().string()); ++parsed; } catch (const molora::format_error&) {}
  }
  CHECK(parsed >= 1);  // ming_moe
}

// ---- loader -------------------------------------------------------------------------------

TEST_CASE_TEMPLATE("MING-MOE: each projection and the whole MLP match the reference outputs and routing", Scalar,
                   float, double) {
  for (const char* folder : {"ming_moe", "ming_moe_rslora"}) {
    CAPTURE(folder);
    const std::string dir = data_dir + "/" + folder;
    const auto ming = molora::io::load_ming_moe<Scalar>(dir + "/config.json", dir + "/non_lora_trainables.safetensors");
    const SafetensorsReader io(dir + "/io.safetensors"), base(dir + "/base.safetensors");
    REQUIRE(ming.modules.size() == 3);
    for (const char* proj : {"gate_proj", "up_proj", "down_proj"}) {
      const std::string module = std::string("model.layers.0.mlp.") + proj;
      CAPTURE(module);
      const auto& adapter = ming.at(module);
      CHECK(adapter.num_experts() == 4);
      CHECK(adapter.config().top_k == 2);
      CHECK(adapter.rank() == 4);
      const RowMatrix<Scalar> x = io.matrix<Scalar>(std::string("x.") + proj);
      molora::MoLoRALinear<Scalar> layer(adapter.config());
      layer.adapter() = adapter;
      layer.set_base_weight(base.matrix<Scalar>(module + ".weight"));
      typename molora::MoLoRALinear<Scalar>::Workspace ws;
      RowMatrix<Scalar> y(x.rows(), layer.out_features());
      const auto& routing = layer.forward(x, y, ws);
      const double e = rel(y, io.matrix<double>(std::string("y.") + proj));
      CHECK(e < 1e-5);
      MESSAGE(std::string(folder), " ", std::string(proj), ": rel. error ", e);
      CHECK(rel(ws.logits, io.matrix<double>(std::string("router_logits.") + proj)) < 1e-5);
      const auto& ids_info = io.info(std::string("routing_ids.") + proj);
      REQUIRE(ids_info.dtype == molora::io::Dtype::I32);
      const auto* ids = reinterpret_cast<const std::int32_t*>(io.bytes(std::string("routing_ids.") + proj));
      const RowMatrix<double> w = io.matrix<double>(std::string("routing_weights.") + proj);
      for (Index t = 0; t < x.rows(); ++t)
        for (Index s = 0; s < 2; ++s) {
          std::int32_t id;
          std::memcpy(&id, ids + t * 2 + s, 4);
          CHECK(routing.ids(t, s) == id);
          CHECK(double(routing.weights(t, s)) == doctest::Approx(w(t, s)).epsilon(1e-5));
        }
    }
    // The whole MLP: down(silu(gate(x)) * up(x)).
    auto make = [&](const char* proj) {
      const std::string module = std::string("model.layers.0.mlp.") + proj;
      molora::MoLoRALinear<Scalar> l(ming.at(module).config());
      l.adapter() = ming.at(module);
      l.set_base_weight(base.matrix<Scalar>(module + ".weight"));
      return l;
    };
    const auto gate = make("gate_proj"), up = make("up_proj"), down = make("down_proj");
    const RowMatrix<Scalar> x = io.matrix<Scalar>("x.gate_proj");
    const RowMatrix<Scalar> g = gate.forward(x), u = up.forward(x);
    const RowMatrix<Scalar> h = (g.array() / (Scalar(1) + (-g.array()).exp()) * u.array()).matrix();
    CHECK(rel(down.forward(h), io.matrix<double>("y.mlp")) < 1e-5);
  }
}

TEST_CASE_TEMPLATE("MING-MOE layout: save then load is bit for bit", Scalar, float, double) {
  molora::MoLoRAConfig c;
  c.in_features = 13;
  c.out_features = 9;
  c.num_experts = 3;
  c.top_k = 2;
  c.rank = 5;
  c.lora_alpha = 7;
  const auto a = ref::random_layer<Scalar>(c, 1).adapter();
  c.in_features = 9;
  c.out_features = 13;
  const auto b = ref::random_layer<Scalar>(c, 2).adapter();
  TempDir tmp;
  molora::io::save_ming_moe<Scalar>(tmp.file("ckpt"), {{"model.layers.0.mlp.up_proj", &a}, {"model.layers.0.mlp.down_proj", &b}},
                                    nlohmann::json{{"model_type", "qwen2"}});
  const auto back = molora::io::load_ming_moe<Scalar>(tmp.file("ckpt/config.json"), tmp.file("ckpt/non_lora_trainables.safetensors"));
  REQUIRE(back.modules.size() == 2);
  for (const auto& [name, orig] : std::map<std::string, const molora::MoLoRAAdapter<Scalar>*>{
           {"model.layers.0.mlp.up_proj", &a}, {"model.layers.0.mlp.down_proj", &b}}) {
    const auto& got = back.at(name);
    CHECK(got.stacked_A() == orig->stacked_A());
    CHECK(got.stacked_B() == orig->stacked_B());
    CHECK(got.router().weight() == orig->router().weight());
    CHECK(got.router().bias() == orig->router().bias());
    CHECK(got.scaling() == orig->scaling());
    CHECK(got.config().top_k == 2);
  }
  CHECK(back.config.model_type == "qwen2");
  // adapters that MING's single config cannot describe are refused, and nothing is written
  c.rank = 4;
  const auto other = ref::random_layer<Scalar>(c, 3).adapter();
  CHECK_THROWS_AS(molora::io::save_ming_moe<Scalar>(tmp.file("bad"), {{"model.a", &a}, {"model.b", &other}}),
                  molora::format_error);
  CHECK(!fs::exists(tmp.file("bad/non_lora_trainables.safetensors")));
}

TEST_CASE("MING-MOE: a config that disagrees with the tensors is a format error naming module and key") {
  TempDir tmp;
  const std::string ming = data_dir + "/ming_moe";
  const std::string w = ming + "/non_lora_trainables.safetensors";
  auto load = [&](const std::string& cfg, const std::string& weights) {
    return molora::io::load_ming_moe<float>(cfg, weights);
  };
  auto expect = [&](const std::string& cfg, const std::string& weights, const std::string& needle) {
    const std::string msg = error_of([&] { load(cfg, weights); });
    CHECK_MESSAGE(msg.find(needle) != std::string::npos, msg);
  };
  // expert count: config says 3, the file holds 4 experts
  const std::string cfg3 = tmp.file("cfg3.json");
  std::string text = read_text(ming + "/config.json");
  write_text(cfg3, std::regex_replace(text, std::regex("\"num_experts\": 4"), "\"num_experts\": 3"));
  expect(cfg3, w, "unexpected tensor 'base_model.model.model.layers.0.mlp.down_proj.experts.3.lora_A_3.weight' for num_experts = 3");
  // expert count: config says 5
  const std::string cfg5 = tmp.file("cfg5.json");
  write_text(cfg5, std::regex_replace(text, std::regex("\"num_experts\": 4"), "\"num_experts\": 5"));
  expect(cfg5, w, "module 'model.layers.0.mlp.down_proj': switch.weight rows (num_experts from the config): expected 5, got 4");
  // rank: config says 8
  const std::string cfgr = tmp.file("cfgr.json");
  write_text(cfgr, std::regex_replace(text, std::regex("\"r\": 4"), "\"r\": 8"));
  expect(cfgr, w, "(r from the config): expected 8, got 4");
  // a missing tensor
  const std::string missing = tmp.file("missing.safetensors");
  rewrite(w, missing, [](const std::string& n) { return n.find("up_proj.experts.2.lora_B_2") == std::string::npos; },
          [](const std::string& n) { return n; });
  expect(ming + "/config.json", missing, "module 'model.layers.0.mlp.up_proj': missing tensor 'experts.2.lora_B_2.weight'");
  // an extra, unknown tensor
  const std::string extra = tmp.file("extra.safetensors");
  rewrite(w, extra, [](const std::string&) { return true; },
          [](const std::string& n) { return n.find("gate_proj.switch.bias") != std::string::npos ? n + "_extra" : n; });
  expect(ming + "/config.json", extra, "switch.bias_extra");
  // a wrongly shaped expert
  const std::string swapped = tmp.file("swapped.safetensors");
  rewrite(w, swapped, [](const std::string&) { return true; }, [](const std::string& n) {
    if (n.find("gate_proj.experts.1.lora_A_1") != std::string::npos) return std::string("base_model.model.model.layers.0.mlp.down_proj.experts.1.lora_A_1.weight");
    if (n.find("down_proj.experts.1.lora_A_1") != std::string::npos) return std::string("base_model.model.model.layers.0.mlp.gate_proj.experts.1.lora_A_1.weight");
    return n;
  });
  expect(ming + "/config.json", swapped, "experts.1.lora_A_1.weight' shape: expected [4, 48], got [4, 32]");
}

namespace {

// MING-MOE's keys of one module's tensors, with each tensor's dtype chosen by `dtype_of`.
template <class DtypeOf>
std::vector<molora::io::TensorToWrite> ming_tensors(const std::string& module, const molora::MoLoRAAdapter<float>& a,
                                                    DtypeOf dtype_of) {
  using molora::io::make_tensor;
  const std::string p = "base_model.model." + module + ".";
  std::vector<molora::io::TensorToWrite> t;
  t.push_back(make_tensor(p + "switch.weight", a.router().weight(), dtype_of("switch.weight", 0)));
  const molora::Vector<float> bias = a.router().bias().transpose();
  t.push_back(make_tensor(p + "switch.bias", bias, molora::io::Dtype::F32));
  for (Index i = 0; i < a.num_experts(); ++i) {
    const RowMatrix<float> A = a.expert_A(i), B = a.expert_B(i);
    t.push_back(make_tensor(molora::detail::cat(p, "experts.", i, ".lora_A_", i, ".weight"), A, dtype_of("A", i)));
    t.push_back(make_tensor(molora::detail::cat(p, "experts.", i, ".lora_B_", i, ".weight"), B, dtype_of("B", i)));
  }
  return t;
}

template <class W>
bool same_storage(const molora::MoLoRAAdapter<float, W>& a, const molora::MoLoRAAdapter<float, W>& b) {
  const auto n_a = std::size_t(a.num_experts() * a.rank() * a.in_features());
  const auto n_b = std::size_t(a.num_experts() * a.rank() * a.out_features());
  const auto n_r = std::size_t(a.num_experts() * a.in_features());
  return std::memcmp(a.stacked_A_data(), b.stacked_A_data(), n_a * sizeof(W)) == 0 &&
         std::memcmp(a.stacked_B_data(), b.stacked_B_data(), n_b * sizeof(W)) == 0 &&
         std::memcmp(a.router().weight_data(), b.router().weight_data(), n_r * sizeof(W)) == 0 &&
         a.router().bias() == b.router().bias() && a.scaling() == b.scaling();
}

}  // namespace

TEST_CASE("MING-MOE: bf16 / mixed files load into 16-bit adapters as stored and into float ones widened") {
  using molora::bf16;
  using molora::f16;
  using molora::io::Dtype;
  molora::MoLoRAConfig c;
  c.in_features = 19;
  c.out_features = 11;
  c.num_experts = 3;
  c.top_k = 2;
  c.rank = 5;
  c.lora_alpha = 7;
  const auto a = ref::random_layer<float>(c, 4).adapter();
  const std::string module = "model.layers.0.mlp.up_proj";
  TempDir tmp;
  molora::io::save_ming_moe<float>(tmp.file("ckpt"), {{module, &a}});
  const std::string cfg = tmp.file("ckpt/config.json");
  const std::string all_bf16 = tmp.file("bf16.safetensors"), mixed = tmp.file("mixed.safetensors");
  molora::io::save_safetensors(all_bf16, ming_tensors(module, a, [](const char*, Index) { return Dtype::BF16; }));
  // Router bf16, A of expert 1 F32, B of expert 2 F16, the rest bf16.
  auto mixed_dtype = [](const char* what, Index i) {
    const std::string w = what;
    return w == "A" && i == 1 ? Dtype::F32 : w == "B" && i == 2 ? Dtype::F16 : Dtype::BF16;
  };
  molora::io::save_safetensors(mixed, ming_tensors(module, a, mixed_dtype));

  for (const std::string& file : {all_bf16, mixed}) {
    INFO(file);
    const auto wide = molora::io::load_ming_moe<float>(cfg, file).at(module);
    const auto kept = molora::io::load_ming_moe<float, bf16>(cfg, file).at(module);
    // Kept as stored, or rounded per tensor: the bits of the widened load rounded to bf16
    // (exact for the bf16 tensors, rounding for the F32 / F16 ones).
    CHECK(same_storage(kept, molora::convert_adapter<bf16>(wide)));
    // The bf16 tensors of the file, as stored.
    const auto ra = molora::convert_adapter<bf16>(a);
    CHECK(std::memcmp(kept.router().weight_data(), ra.router().weight_data(), 3 * 19 * sizeof(bf16)) == 0);
    CHECK(std::memcmp(kept.stacked_A_data(), ra.stacked_A_data(), 5 * 19 * sizeof(bf16)) == 0);  // expert 0
    // The widened load holds exactly the file's values: F32 tensors unchanged.
    if (file == mixed) CHECK(wide.expert_A(1) == a.expert_A(1));
    // The kept adapter's output is the float adapter's on the widened weights, bit for bit.
    auto widened = molora::convert_adapter<float>(kept);
    widened.set_strategy(molora::Strategy::fused);
    const auto x = ref::random_x<float>(9, 19, 8);
    RowMatrix<float> y1 = RowMatrix<float>::Zero(9, 11), y2 = y1;
    kept.add_delta(x, y1);
    widened.add_delta(x, y2);
    CHECK(test_util::same_bits(y1, y2));
    if (file == all_bf16) {
      CHECK(same_storage(molora::convert_adapter<bf16>(wide), kept));
      // A bf16 file into f16 storage: each value rounded from its widened bf16 value.
      const auto h = molora::io::load_ming_moe<float, f16>(cfg, file).at(module);
      CHECK(same_storage(h, molora::convert_adapter<f16>(wide)));
    }
  }

  // Saved from a 16-bit adapter: the file holds its bits as stored, and loads back as them.
  const auto kept = molora::io::load_ming_moe<float, bf16>(cfg, mixed).at(module);
  molora::io::save_ming_moe<float, bf16>(tmp.file("again"), {{module, &kept}});
  const SafetensorsReader again(tmp.file("again/non_lora_trainables.safetensors"));
  CHECK(again.info("base_model.model." + module + ".experts.1.lora_A_1.weight").dtype == Dtype::BF16);
  CHECK(same_storage(molora::io::load_ming_moe<float, bf16>(tmp.file("again/config.json"),
                                                            tmp.file("again/non_lora_trainables.safetensors"))
                         .at(module),
                     kept));

  // An F32 value past f16's range: a numeric_error naming the file, the key and the index;
  // bf16 storage holds it.
  auto big = a;
  RowMatrix<float> A1 = a.expert_A(1);
  A1(2, 3) = 1e5f;
  big.set_expert_A(1, A1);
  const std::string over = tmp.file("over.safetensors");
  molora::io::save_safetensors(over, ming_tensors(module, big, mixed_dtype));
  const std::string msg =
      test_util::message_of<molora::numeric_error>([&] { (void)molora::io::load_ming_moe<float, f16>(cfg, over); });
  CHECK(msg.find(over) != std::string::npos);
  CHECK(msg.find("experts.1.lora_A_1.weight") != std::string::npos);
  CHECK(msg.find("[2, 3]") != std::string::npos);
  CHECK(msg.find("100000") != std::string::npos);
  CHECK_NOTHROW((void)molora::io::load_ming_moe<float, bf16>(cfg, over));
  // A non-finite stored bf16 value is a format_error, as for a float load.
  auto nan = a;
  RowMatrix<float> B0 = a.expert_B(0);
  B0(1, 1) = std::nanf("");
  CHECK_THROWS(nan.set_expert_B(0, B0));  // the layer refuses it: write the file by hand
  auto tensors = ming_tensors(module, a, [](const char*, Index) { return Dtype::BF16; });
  for (auto& t : tensors)
    if (t.name.find("experts.0.lora_B_0") != std::string::npos) {
      t.bytes[2 * (1 * 5 + 1)] = 0xc0;
      t.bytes[2 * (1 * 5 + 1) + 1] = 0x7f;  // 0x7fc0: NaN
    }
  const std::string bad = tmp.file("nan.safetensors");
  molora::io::save_safetensors(bad, std::move(tensors));
  CHECK_THROWS_AS(((void)molora::io::load_ming_moe<float, bf16>(cfg, bad)), molora::format_error);
  CHECK_THROWS_AS((void)molora::io::load_ming_moe<float>(cfg, bad), molora::format_error);
}

}  // namespace test_ming_moe
