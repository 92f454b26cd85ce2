// MixLoRA: adapter_config.json's parser (what MixLoraConfig.export() writes; a realistic
// example, then each missing or mistyped field as a format_error naming the file and the
// field), the feed-forward block's parity with the package's outputs (tests/data/README.md),
// and a config that disagrees with the tensors.
#include <doctest/doctest.h>

#include <molora/io/mixlora.hpp>
#include <molora/io/safetensors.hpp>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <initializer_list>
#include <regex>
#include <string>
#include <vector>

#include "io_test_util.hpp"
#include "reference.hpp"
#include "test_util.hpp"

namespace test_mixlora {

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

// ---- 16-bit files --------------------------------------------------------------------------

namespace {

// The mixlora fixture's adapter rewritten by molora's writer, each tensor in dtype_of(key).
template <class DtypeOf>
std::string mixlora_copy(const TempDir& tmp, const std::string& name, DtypeOf dtype_of) {
  const SafetensorsReader r(data_dir + "/mixlora/adapter_model.safetensors");
  std::vector<molora::io::TensorToWrite> t;
  for (const auto& n : r.names()) {
    const RowMatrix<float> m = r.matrix<float>(n);
    t.push_back(molora::io::make_tensor<float>(n, r.info(n).shape, m.data(), dtype_of(n)));
  }
  const std::string path = tmp.file(name);
  molora::io::save_safetensors(path, std::move(t));
  return path;
}

template <class W>
bool same_adapter_bits(const molora::MoLoRAAdapter<float, W>& a, const molora::MoLoRAAdapter<float, W>& b) {
  const auto n_a = std::size_t(a.num_experts() * a.rank() * a.in_features());
  const auto n_b = std::size_t(a.num_experts() * a.rank() * a.out_features());
  return std::memcmp(a.stacked_A_data(), b.stacked_A_data(), n_a * sizeof(W)) == 0 &&
         std::memcmp(a.stacked_B_data(), b.stacked_B_data(), n_b * sizeof(W)) == 0 && a.scaling() == b.scaling();
}

// The block loop by loop in double, on the 16-bit block's widened weights: softmax over all
// E, top-k renormalised, y = sum g_e (W2 + s B2 A2) [silu((W1 + s B1 A1) x) * ((W3 + s B3 A3) x)].
template <class W>
RowMatrix<double> reference_ffn(const molora::MixLoRAFeedForward<float, W>& f, const RowMatrix<float>& x,
                                std::vector<std::vector<int>>& chosen) {
  const Index H = f.config().hidden_size, I = f.config().intermediate_size, E = f.config().num_experts;
  const Index k = f.config().top_k, r = f.config().rank;
  const double s = double(f.gate_proj().scaling());
  const molora::MoLoRAAdapter<float, W>* ad[] = {&f.gate_proj(), &f.up_proj(), &f.down_proj()};
  const RowMatrix<float>* base[] = {&f.base_gate(), &f.base_up(), &f.base_down()};
  RowMatrix<float> A[3], B[3];
  for (int j = 0; j < 3; ++j) {
    A[j] = ad[j]->widened_stacked_A();  // [E*r, in]
    B[j] = ad[j]->widened_stacked_B();  // [out, E*r]
  }
  auto proj = [&](int j, Index e, const std::vector<double>& v) {  // (W + s B_e A_e) v
    const Index out = base[j]->rows(), in = base[j]->cols();
    std::vector<double> h(std::size_t(r), 0.0), o(std::size_t(out), 0.0);
    for (Index q = 0; q < r; ++q)
      for (Index i = 0; i < in; ++i) h[std::size_t(q)] += double(A[j](e * r + q, i)) * v[std::size_t(i)];
    for (Index m = 0; m < out; ++m) {
      for (Index i = 0; i < in; ++i) o[std::size_t(m)] += double((*base[j])(m, i)) * v[std::size_t(i)];
      for (Index q = 0; q < r; ++q) o[std::size_t(m)] += s * double(B[j](m, e * r + q)) * h[std::size_t(q)];
    }
    return o;
  };
  RowMatrix<double> y = RowMatrix<double>::Zero(x.rows(), H);
  chosen.assign(std::size_t(x.rows()), {});
  for (Index t = 0; t < x.rows(); ++t) {
    std::vector<double> xv(static_cast<std::size_t>(H)), z(static_cast<std::size_t>(E), 0.0);
    for (Index i = 0; i < H; ++i) xv[std::size_t(i)] = double(x(t, i));
    for (Index e = 0; e < E; ++e)
      for (Index i = 0; i < H; ++i) z[std::size_t(e)] += double(molora::to_float(f.router().weight_data()[e * H + i])) * xv[std::size_t(i)];
    const std::vector<double> p = ref::softmax(z);
    const std::vector<int> sel = ref::top_k(z, k);
    chosen[std::size_t(t)] = sel;
    double sum = 0;
    for (int e : sel) sum += p[std::size_t(e)];
    for (int e : sel) {
      const std::vector<double> g = proj(0, e, xv), u = proj(1, e, xv);
      std::vector<double> hmid(static_cast<std::size_t>(I));
      for (Index i = 0; i < I; ++i) {
        const double v = g[std::size_t(i)];
        hmid[std::size_t(i)] = v / (1.0 + std::exp(-v)) * u[std::size_t(i)];
      }
      const std::vector<double> d = proj(2, e, hmid);
      for (Index m = 0; m < H; ++m) y(t, m) += p[std::size_t(e)] / sum * d[std::size_t(m)];
    }
  }
  return y;
}

}  // namespace

TEST_CASE("MixLoRA: bf16 / mixed files load into a 16-bit block as stored and into a float one widened") {
  using molora::bf16;
  using molora::f16;
  using molora::io::Dtype;
  TempDir tmp;
  const std::string all_bf16 = mixlora_copy(tmp, "bf16.safetensors", [](const std::string&) { return Dtype::BF16; });
  // Layer 0's router F32, its up_proj experts F16, layer 1's down_proj lora_B F64, the rest BF16.
  const std::string mixed = mixlora_copy(tmp, "mixed.safetensors", [](const std::string& k) {
    if (k == "mixlora.layers.0.mlp.moe_gate.weight") return Dtype::F32;
    if (k.find("layers.0.mlp.up_proj") != std::string::npos) return Dtype::F16;
    if (k.find("layers.1.mlp.down_proj") != std::string::npos && k.find("lora_B") != std::string::npos) return Dtype::F64;
    return Dtype::BF16;
  });
  const auto cfg = MixLoRAConfig::from_file(data_dir + "/mixlora/adapter_config.json");
  const SafetensorsReader io(data_dir + "/mixlora/io.safetensors"), base(data_dir + "/mixlora/base.safetensors");
  for (const std::string& path : {all_bf16, mixed}) {
    INFO(path);
    const SafetensorsReader file(path);
    for (Index L : {0, 1}) {
      CAPTURE(L);
      const std::string p = "layers." + std::to_string(L) + ".mlp.";
      const RowMatrix<float> wg = base.matrix<float>(p + "gate_proj.weight"), wu = base.matrix<float>(p + "up_proj.weight"),
                             wd = base.matrix<float>(p + "down_proj.weight");
      const auto wide = molora::io::load_mixlora_ffn<float>(cfg, file, L, wg, wu, wd);
      const auto kept = molora::io::load_mixlora_ffn<float, bf16>(cfg, file, L, wg, wu, wd);
      const auto half = molora::io::load_mixlora_ffn<float, f16>(cfg, file, L, wg, wu, wd);
      // The float load holds the file's values; the 16-bit ones hold them rounded, tensor by
      // tensor (the file's own bits where it stores that dtype).
      CHECK(wide.router().weight() == file.matrix<float>("mixlora." + p + "moe_gate.weight"));
      CHECK(same_adapter_bits(kept.gate_proj(), molora::convert_adapter<bf16>(wide.gate_proj())));
      CHECK(same_adapter_bits(kept.up_proj(), molora::convert_adapter<bf16>(wide.up_proj())));
      CHECK(same_adapter_bits(kept.down_proj(), molora::convert_adapter<bf16>(wide.down_proj())));
      CHECK(same_adapter_bits(half.up_proj(), molora::convert_adapter<f16>(wide.up_proj())));
      CHECK(same_adapter_bits(half.down_proj(), molora::convert_adapter<f16>(wide.down_proj())));
      bool router_rounded = true;
      for (Index i = 0; i < wide.router().weight().size(); ++i)
        router_rounded = router_rounded && kept.router().weight_data()[i].bits == molora::to_bf16(wide.router().weight().data()[i]).bits;
      CHECK(router_rounded);
      const std::string ka0 = "mixlora." + p + "gate_proj.experts.0.lora_A.weight";
      if (file.info(ka0).dtype == Dtype::BF16)
        CHECK(std::memcmp(kept.gate_proj().stacked_A_data(), file.bytes(ka0), std::size_t(file.info(ka0).shape[0] * file.info(ka0).shape[1]) * 2) == 0);
      CHECK(kept.base_gate() == wg);  // the base stays float

      // The forward against a loop-by-loop double reference on the widened weights, and the
      // float block holding the same values: the same experts for every token.
      const RowMatrix<float> x = io.matrix<float>("x." + std::to_string(L));
      auto check_block = [&](const auto& f, const char* what) {
        CAPTURE(what);
        std::vector<std::vector<int>> chosen;
        RowMatrix<float> y(x.rows(), x.cols());
        molora::MixLoRAWorkspace<float> ws;
        f.forward(x, y, ws);
        const double e = rel(y, reference_ffn(f, x, chosen));
        CHECK(e < 1e-5);
        MESSAGE(std::string(what), " mixlora layer ", L, ": rel. error against the double reference ", e);
        bool same_experts = true;
        for (Index t = 0; t < x.rows(); ++t) {
          std::vector<int> got;
          for (Index j = 0; j < cfg.top_k; ++j) got.push_back(int(ws.routing.ids(t, j)));
          std::vector<int> ref_sel = chosen[std::size_t(t)];
          std::sort(got.begin(), got.end());
          std::sort(ref_sel.begin(), ref_sel.end());
          same_experts = same_experts && got == ref_sel;
        }
        CHECK(same_experts);
      };
      check_block(kept, "bf16");
      check_block(half, "f16");
      // From the all-bf16 file the float block holds the same values, widened.
      if (path == all_bf16) CHECK(rel(wide.forward(x), kept.forward(x)) < 1e-5);
    }
  }
  // An F32 value past f16's range: numeric_error naming the file, the key and the index.
  const std::string over = mixlora_copy(tmp, "over.safetensors", [](const std::string& k) {
    return k == "mixlora.layers.0.mlp.moe_gate.weight" ? Dtype::F32 : Dtype::BF16;
  });
  {
    const SafetensorsReader r(over);
    std::vector<molora::io::TensorToWrite> t;
    for (const auto& n : r.names()) {
      RowMatrix<float> m = r.matrix<float>(n);
      if (n == "mixlora.layers.0.mlp.moe_gate.weight") m(2, 5) = -8e4f;
      t.push_back(molora::io::make_tensor<float>(n, r.info(n).shape, m.data(), r.info(n).dtype));
    }
    molora::io::save_safetensors(over, std::move(t));
  }
  const SafetensorsReader ov(over);
  const std::string msg = test_util::message_of<molora::numeric_error>([&] {
    (void)molora::io::load_mixlora_ffn<float, f16>(cfg, ov, 0, base.matrix<float>("layers.0.mlp.gate_proj.weight"),
                                                   base.matrix<float>("layers.0.mlp.up_proj.weight"),
                                                   base.matrix<float>("layers.0.mlp.down_proj.weight"));
  });
  check_contains(msg, {"over.safetensors", "mixlora.layers.0.mlp.moe_gate.weight", "[2, 5]", "-80000"});
}

}  // namespace test_mixlora
