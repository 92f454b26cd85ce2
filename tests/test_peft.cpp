// PEFT LoRA: adapter_config.json's parser (a realistic example, then each missing or
// mistyped field as a format_error naming the file and the field), the loader's parity with
// PEFT's outputs on the fixtures of tools/make_fixtures.py (tests/data/README.md), configs
// that disagree with the tensors, and bf16 / mixed-dtype files loaded into 16-bit LoRAs.
#include <doctest/doctest.h>

#include <molora/io/peft.hpp>
#include <molora/io/safetensors.hpp>

#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <initializer_list>
#include <regex>
#include <string>
#include <type_traits>
#include <vector>

#include "io_test_util.hpp"
#include "reference.hpp"
#include "test_util.hpp"

namespace test_peft {

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
      const std::string& module_name = module;  // a structured binding cannot be captured in C++17
      CAPTURE(module_name);
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

// ---- 16-bit files --------------------------------------------------------------------------

namespace {

using molora::bf16;
using molora::f16;
using molora::io::Dtype;

// The peft_lora fixture with its adapter rewritten by molora's writer, each tensor in the
// dtype dtype_of(key) gives (rounded to nearest even from the fixture's F32 values).
template <class DtypeOf>
std::string peft_copy(const TempDir& tmp, const std::string& name, DtypeOf dtype_of) {
  const std::string dir = tmp.file(name);
  fs::create_directories(dir);
  fs::copy_file(data_dir + "/peft_lora/adapter_config.json", dir + "/adapter_config.json");
  const SafetensorsReader r(data_dir + "/peft_lora/adapter_model.safetensors");
  std::vector<molora::io::TensorToWrite> t;
  for (const auto& n : r.names()) t.push_back(molora::io::make_tensor(n, r.matrix<float>(n), dtype_of(n)));
  molora::io::save_safetensors(dir + "/adapter_model.safetensors", std::move(t));
  return dir;
}

// A 2-D 16-bit tensor's bits as stored in the file, row-major.
std::vector<std::uint16_t> file_bits(const SafetensorsReader& r, const std::string& key) {
  const auto& info = r.info(key);
  std::vector<std::uint16_t> v(static_cast<std::size_t>(info.shape[0] * info.shape[1]));
  std::memcpy(v.data(), r.bytes(key), v.size() * 2);
  return v;
}

// Bits of a 16-bit LoRA's A [r, in] and B [out, r], row-major (PyTorch's layout).
template <class W>
std::vector<std::uint16_t> bits_A(const molora::LoRA<float, W>& l) {
  std::vector<std::uint16_t> v;
  for (Index i = 0; i < l.rank() * l.in_features(); ++i) v.push_back(l.A_data()[i].bits);
  return v;
}
template <class W>
std::vector<std::uint16_t> bits_B(const molora::LoRA<float, W>& l) {
  std::vector<std::uint16_t> v;
  for (Index o = 0; o < l.out_features(); ++o)
    for (Index j = 0; j < l.rank(); ++j) v.push_back(l.B_data()[j * l.out_features() + o].bits);
  return v;
}
// Bits of m's values rounded to nearest even into W, row-major.
template <class W, class M>
std::vector<std::uint16_t> rounded_bits(const M& m) {
  std::vector<std::uint16_t> v;
  for (Index i = 0; i < m.rows(); ++i)
    for (Index j = 0; j < m.cols(); ++j) {
      if constexpr (std::is_same_v<W, bf16>)
        v.push_back(molora::to_bf16(float(m(i, j))).bits);
      else
        v.push_back(molora::to_f16(float(m(i, j))).bits);
    }
  return v;
}

// A float LoRA holding a 16-bit LoRA's weights widened.
template <class W>
molora::LoRA<float> widened(const molora::LoRA<float, W>& l, const PeftLoraConfig& c) {
  molora::LoRA<float> w(l.in_features(), l.out_features(), l.rank(), c.lora.lora_alpha, c.lora.use_rslora);
  w.set_A(l.widened_A());
  w.set_B(l.widened_B());
  return w;
}

// s * B A as [out, in] in double, by plain loops.
template <class MA, class MB>
ref::Mat update(double s, const MA& A, const MB& B) {
  ref::Mat u = ref::zeros(B.rows(), A.cols());
  for (Index o = 0; o < B.rows(); ++o)
    for (Index i = 0; i < A.cols(); ++i)
      for (Index j = 0; j < A.rows(); ++j)
        u[std::size_t(o)][std::size_t(i)] += s * double(B(o, j)) * double(A(j, i));
  return u;
}

// want + s (B'A' - BA) x^T per row (x [T, in]) or, without x, want + s (B'A' - BA): the
// fixture's output moved by the change of the adapter's weights, in double.
RowMatrix<double> shifted(const RowMatrix<double>& want, const ref::Mat& u_new, const ref::Mat& u_old,
                          const RowMatrix<double>* x) {
  RowMatrix<double> out = want;
  for (Index t = 0; t < out.rows(); ++t)
    for (Index o = 0; o < out.cols(); ++o) {
      if (!x) {
        out(t, o) += u_new[std::size_t(t)][std::size_t(o)] - u_old[std::size_t(t)][std::size_t(o)];
        continue;
      }
      for (Index i = 0; i < x->cols(); ++i)
        out(t, o) += (u_new[std::size_t(o)][std::size_t(i)] - u_old[std::size_t(o)][std::size_t(i)]) * (*x)(t, i);
    }
  return out;
}

}  // namespace

TEST_CASE("PEFT LoRA: bf16 / mixed files load into 16-bit LoRAs as stored and into float ones widened") {
  TempDir tmp;
  const std::string all_bf16 = peft_copy(tmp, "bf16", [](const std::string&) { return Dtype::BF16; });
  // layers.0.proj: A F32, B F16; layers.0.other: A BF16, B F64.
  const std::string mixed = peft_copy(tmp, "mixed", [](const std::string& k) {
    if (k.find(".proj.lora_A") != std::string::npos) return Dtype::F32;
    if (k.find(".proj.lora_B") != std::string::npos) return Dtype::F16;
    if (k.find(".other.lora_B") != std::string::npos) return Dtype::F64;
    return Dtype::BF16;
  });
  const SafetensorsReader io(data_dir + "/peft_lora/io.safetensors"), base(data_dir + "/peft_lora/base.safetensors");
  const SafetensorsReader fixture(data_dir + "/peft_lora/adapter_model.safetensors");
  for (const std::string& dir : {all_bf16, mixed}) {
    INFO(dir);
    const auto wide = molora::io::load_peft_lora<float>(dir);
    const auto kept = molora::io::load_peft_lora<float, bf16>(dir);
    const auto half = molora::io::load_peft_lora<float, f16>(dir);
    const SafetensorsReader file(dir + "/adapter_model.safetensors");
    REQUIRE(kept.modules.size() == 2);
    REQUIRE(half.modules.size() == 2);
    const double s = kept.config.lora.scaling();
    for (const auto& [module, lora] : kept.modules) {
      const std::string& module_name = module;  // a structured binding cannot be captured in C++17
      CAPTURE(module_name);
      const std::string ka = "base_model.model." + module + ".lora_A.weight";
      const std::string kb = "base_model.model." + module + ".lora_B.weight";
      const auto& w = wide.at(module);
      const auto& h = half.at(module);
      // The float load holds the file's values exactly; the 16-bit loads hold them rounded
      // to nearest even, tensor by tensor (the file's own bits where it stores that dtype).
      CHECK(w.A() == file.matrix<float>(ka));
      CHECK(RowMatrix<float>(w.B()) == file.matrix<float>(kb));
      CHECK(bits_A(lora) == rounded_bits<bf16>(w.A()));
      CHECK(bits_B(lora) == rounded_bits<bf16>(w.B()));
      CHECK(bits_A(h) == rounded_bits<f16>(w.A()));
      CHECK(bits_B(h) == rounded_bits<f16>(w.B()));
      if (file.info(ka).dtype == Dtype::BF16) CHECK(bits_A(lora) == file_bits(file, ka));
      if (file.info(kb).dtype == Dtype::BF16) CHECK(bits_B(lora) == file_bits(file, kb));
      if (file.info(kb).dtype == Dtype::F16) CHECK(bits_B(h) == file_bits(file, kb));
      CHECK(lora.scaling() == w.scaling());

      // The 16-bit layer's output is the float layer's on the widened weights, bit for bit,
      // over a float or a bf16 base (copied or wrapped), for T = 1, 5 (the fixture's x), 70.
      const auto fl = widened(lora, kept.config);
      const RowMatrix<float> w0 = base.matrix<float>(module + ".weight");
      const molora::Vector<float> b0 = base.vector<float>(module + ".bias");
      std::vector<bf16> w0_bf16;
      for (Index o = 0; o < w0.rows(); ++o)
        for (Index i = 0; i < w0.cols(); ++i) w0_bf16.push_back(molora::to_bf16(w0(o, i)));
      auto l16 = molora::io::lora_linear(lora, w0, b0);
      auto lf = molora::io::lora_linear(fl, w0, b0);
      auto l16b = molora::io::lora_linear<bf16>(lora, w0, b0);
      auto lfb = molora::io::lora_linear<bf16>(fl, w0, b0);
      const auto l16w = molora::io::lora_linear(lora, w0_bf16.data(), b0);
      static_assert(std::is_same_v<decltype(l16b), molora::MoLoRALinear<float, bf16, bf16>>);
      static_assert(std::is_same_v<decltype(l16w), const molora::MoLoRALinear<float, bf16, bf16>>);
      CHECK(l16w.wraps_base());
      CHECK(l16w.base_weight_data() == w0_bf16.data());
      lf.set_strategy(molora::Strategy::fused);  // what a 16-bit adapter runs
      lfb.set_strategy(molora::Strategy::fused);
      const RowMatrix<float> x5 = io.matrix<float>("x." + module);
      for (const RowMatrix<float>& x : {RowMatrix<float>(ref::random_x<float>(1, w0.cols(), 3)), x5,
                                        RowMatrix<float>(ref::random_x<float>(70, w0.cols(), 4))}) {
        CAPTURE(x.rows());
        const RowMatrix<float> y = l16.forward(x);
        CHECK(test_util::same_bits(y, lf.forward(x)));
        const RowMatrix<float> yb = l16b.forward(x);
        CHECK(test_util::same_bits(yb, lfb.forward(x)));
        CHECK(test_util::same_bits(yb, l16w.forward(x)));
        RowMatrix<float> d = lora.delta(x), df = fl.delta(x);
        CHECK(test_util::same_bits(d, df));
      }
      // Against PEFT's output, moved by the rounding of the adapter's weights (in double).
      const RowMatrix<double> xd = io.matrix<double>("x." + module);
      const ref::Mat u16 = update(s, lora.widened_A(), lora.widened_B());
      const ref::Mat u32 = update(s, fixture.matrix<double>(ka), fixture.matrix<double>(kb));
      const RowMatrix<double> want = shifted(io.matrix<double>("y." + module), u16, u32, &xd);
      const double e = rel(l16.forward(x5), want);
      CHECK(e < 1e-5);
      // The rounding moves the output well past that tolerance: the check sees the 16-bit weights.
      const double moved = rel(want, io.matrix<double>("y." + module));
      if (dir == all_bf16) CHECK(moved > 1e-4);
      MESSAGE(module, " (16-bit weights) rel. error against PEFT's output moved by the rounding: ", e,
              "; moved by ", moved);

      // merge_peft: widened exactly, merged in float: bitwise the float LoRA's merge, and
      // PEFT's merged weight moved by the rounding.
      RowMatrix<float> m16 = w0, mf = w0;
      molora::io::merge_peft(lora, m16);
      molora::io::merge_peft(fl, mf);
      CHECK(test_util::same_bits(m16, mf));
      CHECK(rel(m16, shifted(io.matrix<double>("merged_weight." + module), u16, u32, nullptr)) < 1e-5);
      RowMatrix<float> t16 = w0.transpose(), tf = w0.transpose();
      molora::io::merge_peft(lora, t16, true);
      molora::io::merge_peft(fl, tf, true);
      CHECK(test_util::same_bits(t16, tf));
      CHECK(test_util::same_bits(RowMatrix<float>(t16.transpose()), m16));
    }
  }
}

TEST_CASE("PEFT LoRA: a value past f16's range, a non-finite 16-bit value") {
  TempDir tmp;
  // An F32 value past f16's range: a numeric_error naming the file, the key, the index and
  // the value for f16 storage; bf16 storage holds it.
  const std::string dir = tmp.file("over");
  fs::create_directories(dir);
  fs::copy_file(data_dir + "/peft_lora/adapter_config.json", dir + "/adapter_config.json");
  const std::string key = "base_model.model.layers.0.proj.lora_A.weight";
  {
    const SafetensorsReader r(data_dir + "/peft_lora/adapter_model.safetensors");
    std::vector<molora::io::TensorToWrite> t;
    for (const auto& n : r.names()) {
      RowMatrix<float> m = r.matrix<float>(n);
      if (n == key) m(1, 2) = 1e5f;
      t.push_back(molora::io::make_tensor(n, m, n == key ? Dtype::F32 : Dtype::BF16));
    }
    molora::io::save_safetensors(dir + "/adapter_model.safetensors", std::move(t));
  }
  const std::string msg =
      test_util::message_of<molora::numeric_error>([&] { (void)molora::io::load_peft_lora<float, f16>(dir); });
  check_contains(msg, {"adapter_model.safetensors", "module 'layers.0.proj'", key.c_str(), "[1, 2]", "100000", "f16"});
  const auto kept = molora::io::load_peft_lora<float, bf16>(dir);
  CHECK(molora::to_float(kept.at("layers.0.proj").A_data()[1 * 24 + 2]) == 99840.0f);  // 1e5 rounded to bf16
  CHECK(kept.at("layers.0.proj").widened_A()(1, 2) == 99840.0f);

  // A NaN stored in bf16: a format_error naming the file, module and key, either way.
  const std::string nan_dir = peft_copy(tmp, "nan", [](const std::string&) { return Dtype::BF16; });
  {
    const SafetensorsReader r(nan_dir + "/adapter_model.safetensors");
    std::vector<molora::io::TensorToWrite> t;
    for (const auto& n : r.names()) {
      auto raw = molora::io::make_tensor_raw(n, Dtype::BF16, r.info(n).shape, r.bytes(n));
      if (n == "base_model.model.layers.0.other.lora_B.weight") {
        raw.bytes[2 * 3] = 0xc0;
        raw.bytes[2 * 3 + 1] = 0x7f;  // 0x7fc0: NaN at [0, 3]
      }
      t.push_back(std::move(raw));
    }
    molora::io::save_safetensors(nan_dir + "/adapter_model.safetensors", std::move(t));
  }
  for (const std::string& m : {error_of([&] { (void)molora::io::load_peft_lora<float, bf16>(nan_dir); }),
                               error_of([&] { (void)molora::io::load_peft_lora<float, f16>(nan_dir); }),
                               error_of([&] { (void)molora::io::load_peft_lora<float>(nan_dir); })})
    check_contains(m, {"adapter_model.safetensors", "layers.0.other", "lora_B.weight", "finite"});
}

TEST_CASE("LoRA<float, bf16 | f16>: set, widen, delta and merge against a double reference") {
  molora::Generator gen(11);
  using Shape = std::array<Index, 3>;  // in, out, r
  for (const Shape& shape : {Shape{1, 1, 1}, Shape{17, 9, 3}, Shape{33, 40, 8}}) {
    const Index in = shape[0], out = shape[1], r = shape[2];
    CAPTURE(in);
    RowMatrix<float> a(r, in), b(out, r), x(5, in);
    test_util::fill(a, gen, 1.0);
    test_util::fill(b, gen, 1.0);
    test_util::fill(x, gen, 1.0);
    molora::LoRA<float, bf16> l(in, out, r, 3.0 * double(r));
    l.set_A(a);
    l.set_B(b);
    CHECK(bits_A(l) == rounded_bits<bf16>(a));
    CHECK(bits_B(l) == rounded_bits<bf16>(b));
    const RowMatrix<float> wa = l.widened_A();
    const RowMatrix<float> wb = l.widened_B();
    // delta against a loop-by-loop double reference on the widened weights
    const RowMatrix<float> d = l.delta(x);
    RowMatrix<double> want = RowMatrix<double>::Zero(5, out);
    for (Index t = 0; t < 5; ++t)
      for (Index o = 0; o < out; ++o)
        for (Index j = 0; j < r; ++j) {
          double hj = 0;
          for (Index i = 0; i < in; ++i) hj += double(wa(j, i)) * double(x(t, i));
          want(t, o) += 3.0 * double(wb(o, j)) * hj;
        }
    CHECK(rel(d, want) < 1e-5);
    // from stored bits: the same LoRA
    molora::LoRA<float, bf16> s(in, out, r, 3.0 * double(r));
    std::vector<bf16> sa(l.A_data(), l.A_data() + r * in), sb;
    for (Index o = 0; o < out; ++o)
      for (Index j = 0; j < r; ++j) sb.push_back(l.B_data()[j * out + o]);
    s.set_A_stored(sa.data());
    s.set_B_stored(sb.data());
    CHECK(bits_A(s) == bits_A(l));
    CHECK(bits_B(s) == bits_B(l));
    // f16: a value past its range is refused with the index, and changes nothing
    molora::LoRA<float, f16> h(in, out, r, 2.0);
    h.set_A(a);
    RowMatrix<float> big = a;
    big(r - 1, in - 1) = 7e4f;
    const std::string msg = test_util::message_of<molora::numeric_error>([&] { h.set_A(big); });
    check_contains(msg, {"lora_A.weight", "70000"});
    CHECK(bits_A(h) == rounded_bits<f16>(a));
    sb[0] = molora::bf16_from_bits(0x7fc0);  // NaN
    CHECK_THROWS_AS(s.set_B_stored(sb.data()), molora::numeric_error);
    CHECK(bits_B(s) == bits_B(l));
  }
  // moved from: state_error
  molora::LoRA<float, bf16> l(4, 3, 2, 2.0);
  const auto l2 = std::move(l);
  CHECK_THROWS_AS((void)l.delta(RowMatrix<float>::Zero(1, 4)), molora::state_error);
  CHECK_THROWS_AS((void)molora::io::lora_linear(l, RowMatrix<float>::Zero(3, 4), molora::Vector<float>()),
                  molora::state_error);
  CHECK(l2.widened_A().rows() == 2);
}

}  // namespace test_peft
