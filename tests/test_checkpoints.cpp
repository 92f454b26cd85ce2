// Parity with the real packages: PEFT LoRA, MING-MOE (reference re-statement) and MixLoRA
// fixtures made by tools/make_fixtures.py (see tests/data/README.md), loaded through
// molora::io and compared with the outputs the packages computed; MING-MOE save/load round
// trip; configs that disagree with the tensors.
#include <doctest/doctest.h>

#include <molora/io/checkpoint.hpp>

#include <filesystem>
#include <regex>

#include "reference.hpp"
#include "test_util.hpp"

namespace fs = std::filesystem;
using molora::Index;
using molora::RowMatrix;
using molora::io::SafetensorsReader;
using test_util::error_of;
using test_util::read_text;
using test_util::TempDir;
using test_util::write_text;

namespace {

const std::string data_dir = MOLORA_TEST_DATA_DIR;

// max |got - want| / max(1e-30, max |want|)
template <class A, class B>
double rel(const A& got, const B& want) {
  return double((got.template cast<double>() - want.template cast<double>()).cwiseAbs().maxCoeff()) /
         std::max(1e-30, double(want.template cast<double>().cwiseAbs().maxCoeff()));
}

void copy_dir(const std::string& from, const std::string& to) {
  fs::create_directories(to);
  for (const auto& e : fs::directory_iterator(from)) fs::copy_file(e.path(), fs::path(to) / e.path().filename());
}

// Rewrites a safetensors file keeping the tensors that `keep` accepts, renamed by `rename`.
template <class Keep, class Rename>
void rewrite(const std::string& from, const std::string& to, Keep keep, Rename rename) {
  const SafetensorsReader r(from);
  std::vector<molora::io::TensorToWrite> out;
  for (const auto& n : r.names())
    if (keep(n)) {
      const auto& info = r.info(n);
      out.push_back(molora::io::make_tensor_raw(rename(n), info.dtype, info.shape, r.bytes(n)));
    }
  molora::io::save_safetensors(to, std::move(out));
}

}  // namespace

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

TEST_CASE("checkpoints whose config disagrees with the tensors are format errors naming module and key") {
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
