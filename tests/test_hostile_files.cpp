// Files written to hurt the reader: huge headers, long keys, absurd expert counts, FIFOs,
// devices, directories, values a layer refuses, a file truncated under the reader. Each must
// end in a molora::format_error naming the file and what was wrong, quickly and without a
// large allocation. The ctest TIMEOUT set in tests/CMakeLists.txt is what catches a hang or a
// quadratic parse; no test measures time itself.
#include <doctest/doctest.h>

#include <molora/io/adapter_set.hpp>
#include <molora/io/checkpoint.hpp>

#include <cstdint>
#include <filesystem>
#include <initializer_list>
#include <map>
#include <string>
#include <vector>

#include <sys/stat.h>
#include <sys/types.h>
#include <unistd.h>

#include "test_util.hpp"

namespace test_hostile_files {

namespace fs = std::filesystem;
using molora::Index;
using molora::RowMatrix;
using molora::io::Limits;
using molora::io::Load;
using molora::io::SafetensorsReader;
using test_util::check_contains;
using test_util::error_of;
using test_util::read_bytes;
using test_util::read_text;
using test_util::TempDir;
using test_util::write_bytes;
using test_util::write_text;

namespace {

const std::string data_dir = MOLORA_TEST_DATA_DIR;

bool contains(const std::string& s, const std::string& needle) { return s.find(needle) != std::string::npos; }

// A safetensors file from its header text and data bytes.
std::vector<std::uint8_t> st_file(const std::string& header, std::size_t data_bytes = 0) {
  std::vector<std::uint8_t> b(8 + header.size() + data_bytes, 0);
  const std::uint64_t n = header.size();
  for (int i = 0; i < 8; ++i) b[static_cast<std::size_t>(i)] = static_cast<std::uint8_t>(n >> (8 * i));
  std::copy(header.begin(), header.end(), b.begin() + 8);
  return b;
}

// One F32 tensor entry of `rows` x `cols` at byte `begin`.
std::string entry(const std::string& name, std::uint64_t rows, std::uint64_t cols, std::uint64_t begin) {
  return molora::detail::cat("\"", name, "\":{\"dtype\":\"F32\",\"shape\":[", rows, ",", cols, "],\"data_offsets\":[", begin,
                             ",", begin + 4 * rows * cols, "]}");
}

// A MING-MOE tensor file with one module (in 3, out 2, rank r) and experts 0..E-1, and its config.
std::vector<std::uint8_t> ming_file(int E, std::uint64_t r) {
  const std::string m = "base_model.model.model.layers.0.mlp.up_proj.";
  std::string h = "{" + entry(m + "switch.weight", static_cast<std::uint64_t>(E), 3, 0) + "," +
                  molora::detail::cat("\"", m, "switch.bias\":{\"dtype\":\"F32\",\"shape\":[", E, "],\"data_offsets\":[",
                                      12 * E, ",", 16 * E, "]}");
  std::uint64_t at = 16 * static_cast<std::uint64_t>(E);
  for (int i = 0; i < E; ++i) {
    h += "," + entry(molora::detail::cat(m, "experts.", i, ".lora_A_", i, ".weight"), r, 3, at);
    at += 12 * r;
    h += "," + entry(molora::detail::cat(m, "experts.", i, ".lora_B_", i, ".weight"), 2, r, at);
    at += 8 * r;
  }
  auto b = st_file(h + "}", at);
  for (std::size_t i = 8 + h.size() + 1; i < b.size(); i += 4) b[i + 3] = 0x3e;  // 0.125-ish, finite
  return b;
}

std::string ming_config(const std::string& num_experts, const std::string& alpha = "2") {
  return "{\"num_experts\": " + num_experts + ", \"num_experts_per_token\": 1, \"lora_alpha\": " + alpha + "}";
}

}  // namespace

// ---- safetensors header ---------------------------------------------------------------------

TEST_CASE("hostile safetensors: a header of 200000 tensors parses in linear time") {
  // The duplicate-key callback used before made nlohmann rescan the object per entry: 100k
  // tensors took 80 s, 200k several minutes, past this test's ctest TIMEOUT.
  const std::size_t n = 200000;
  std::string h = "{";
  for (std::size_t i = 0; i < n; ++i) {
    if (i) h += ",";
    h += molora::detail::cat("\"layers.", i, ".w\":{\"dtype\":\"F32\",\"shape\":[0],\"data_offsets\":[0,0]}");
  }
  const auto b = st_file(h + "}");
  const SafetensorsReader r(b.data(), b.size(), "many.safetensors");
  CHECK(r.size() == n);
  CHECK(r.has("layers.199999.w"));
  // a duplicate at the very end is still found
  const auto d = st_file(h + ",\"layers.7.w\":{\"dtype\":\"F32\",\"shape\":[0],\"data_offsets\":[0,0]}}");
  check_contains(error_of([&] { SafetensorsReader(d.data(), d.size(), "dup.safetensors"); }),
                 {"dup.safetensors", "'layers.7.w'", "duplicate tensor name"});
}

TEST_CASE("hostile safetensors: the tensor count, name length and rank limits are checked and raisable") {
  std::string h = "{";
  for (int i = 0; i < 11; ++i) h += molora::detail::cat(i ? "," : "", "\"t", i, "\":{\"dtype\":\"U8\",\"shape\":[0],\"data_offsets\":[0,0]}");
  const auto b = st_file(h + "}");
  Limits l;
  l.max_tensors = 10;
  check_contains(error_of([&] { SafetensorsReader(b.data(), b.size(), "count.safetensors", l); }),
                 {"count.safetensors", "number of tensors: expected at most 10 (Limits::max_tensors)"});
  std::string md = "{\"__metadata__\":{";
  for (int i = 0; i < 11; ++i) md += molora::detail::cat(i ? "," : "", "\"k", i, "\":\"v\"");
  const auto mb = st_file(md + "}}");
  check_contains(error_of([&] { SafetensorsReader(mb.data(), mb.size(), "meta.safetensors", l); }),
                 {"meta.safetensors", "__metadata__: expected at most 10 entries (Limits::max_tensors)"});
  l.max_tensors = 11;
  CHECK(SafetensorsReader(b.data(), b.size(), "count.safetensors", l).size() == 11);
  CHECK(SafetensorsReader(mb.data(), mb.size(), "meta.safetensors", l).metadata().size() == 11);

  const std::string long_name(30000, 'k');
  const auto nb = st_file("{\"" + long_name + "\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1]}}", 1);
  check_contains(error_of([&] { SafetensorsReader(nb.data(), nb.size(), "name.safetensors"); }),
                 {"name.safetensors", "expected at most 1024 bytes (Limits::max_name_bytes), got 30000"});
  l.max_name_bytes = 30000;
  CHECK(SafetensorsReader(nb.data(), nb.size(), "name.safetensors", l).has(long_name));

  const auto rb = st_file("{\"cube\":{\"dtype\":\"U8\",\"shape\":[1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1],\"data_offsets\":[0,1]}}", 1);
  check_contains(error_of([&] { SafetensorsReader(rb.data(), rb.size(), "rank.safetensors"); }),
                 {"rank.safetensors", "'cube'", "rank: expected at most 16 (Limits::max_rank)"});
}

// ---- paths that are not regular files ---------------------------------------------------------

TEST_CASE("hostile paths: a FIFO, a device and a directory are refused without blocking or reading") {
  TempDir dir;
  const std::string fifo = dir.file("pipe");
  REQUIRE(::mkfifo(fifo.c_str(), 0600) == 0);
  // Before, open() waited forever for a writer; the ctest TIMEOUT would catch that.
  check_contains(error_of([&] { SafetensorsReader r(fifo); }), {"pipe", "expected a regular file, got a FIFO"});
  check_contains(error_of([&] { SafetensorsReader r(fifo, Load::read); }), {"pipe", "a FIFO"});
  check_contains(error_of([&] { (void)molora::io::MingMoeConfig::from_file(fifo); }), {"pipe", "a FIFO"});
  check_contains(error_of([&] { (void)molora::io::PeftLoraConfig::from_file(fifo); }), {"pipe", "a FIFO"});

  // /dev/zero: before, the config reader read 1 GB and threw std::bad_alloc.
  if (fs::exists("/dev/zero")) {
    check_contains(error_of([&] { (void)molora::io::MixLoRAConfig::from_file("/dev/zero"); }),
                   {"/dev/zero", "expected a regular file, got a character device"});
    check_contains(error_of([&] { SafetensorsReader r("/dev/zero", Load::read); }), {"/dev/zero", "character device"});
  }
  // A directory: before, the config reader said "not valid JSON" about empty input.
  check_contains(error_of([&] { (void)molora::io::PeftLoraConfig::from_file(dir.path.string()); }),
                 {dir.path.string().c_str(), "expected a regular file, got a directory"});
  check_contains(error_of([&] { SafetensorsReader r(dir.path.string(), Load::read); }), {"a directory"});
}

TEST_CASE("hostile configs: the config size limit is checked before reading, and raisable") {
  TempDir dir;
  const std::string big = dir.write("big.json", "{\"pad\": \"" + std::string(5000, 'x') + "\", \"num_experts\": 2}");
  Limits l;
  l.max_config_bytes = 4096;
  check_contains(error_of([&] { (void)molora::io::MingMoeConfig::from_file(big, l); }),
                 {"big.json", "file size: expected at most 4096 bytes (Limits::max_config_bytes), got 5029"});
  l.max_config_bytes = 8192;
  check_contains(error_of([&] { (void)molora::io::MingMoeConfig::from_file(big, l); }), {"big.json", "num_experts_per_token"});
  CHECK(Limits{}.max_config_bytes == 16u << 20);
}

// ---- MING-MOE keys and expert counts ---------------------------------------------------------

TEST_CASE("hostile MING-MOE: a very long key neither crashes the splitter nor passes unnoticed") {
  TempDir dir;
  const std::string cfg = dir.write("config.json", ming_config("1"));
  // One 30000-character key: std::regex recursed per character and overflowed the stack.
  const std::string key = std::string(30000, 'a') + ".experts.0.lora_A_0.weight";
  write_bytes(dir.file("long.safetensors"), st_file("{" + entry(key, 1, 3, 0) + "}", 12));
  check_contains(error_of([&] { (void)molora::io::load_ming_moe<float>(cfg, dir.file("long.safetensors")); }),
                 {"long.safetensors", "Limits::max_name_bytes", "got 30026"});
  molora::io::MingMoeLoadOptions o;
  o.limits.max_name_bytes = 1u << 20;
  check_contains(error_of([&] { (void)molora::io::load_ming_moe<float>(cfg, dir.file("long.safetensors"), o); }),
                 {"long.safetensors", "missing tensor 'switch.weight'"});
  // The splitter itself on a 2 MB key, and its corner cases.
  std::string module, rest;
  const std::string huge = std::string(2'000'000, 'm') + ".experts.12.lora_B_12.weight";
  REQUIRE(molora::io::internal::ming_split(huge, module, rest));
  CHECK(module.size() == 2'000'000);
  CHECK(rest == "experts.12.lora_B_12.weight");
  CHECK(molora::io::internal::ming_split("m.experts.experts.1.lora_A_1.weight", module, rest));
  CHECK(module == "m.experts");
  CHECK_FALSE(molora::io::internal::ming_split(".experts.1.lora_A_1.weight", module, rest));  // empty module
  CHECK_FALSE(molora::io::internal::ming_split("m.experts.1.lora_C_1.weight", module, rest));
  CHECK_FALSE(molora::io::internal::ming_split("m.experts..lora_A_1.weight", module, rest));
  CHECK_FALSE(molora::io::internal::ming_split("m.experts.1.lora_A_1.weightx", module, rest));
  Index i = -1;
  CHECK((molora::io::internal::ming_split("m.experts.01.lora_A_01.weight", module, rest) &&
         !molora::io::internal::ming_expert_index(rest, i)));  // leading zero: not expert 1
  CHECK((molora::io::internal::ming_split("m.experts.1.lora_A_2.weight", module, rest) &&
         !molora::io::internal::ming_expert_index(rest, i)));
  CHECK((molora::io::internal::ming_split("m.experts.99999999999999999999.lora_A_99999999999999999999.weight", module, rest) &&
         !molora::io::internal::ming_expert_index(rest, i)));  // does not fit: not an index
}

TEST_CASE("hostile MING-MOE: num_experts from the config is bounded and checked against the file first") {
  TempDir dir;
  const std::string w = dir.file("w.safetensors");
  write_bytes(w, ming_file(2, 1));
  CHECK(molora::io::load_ming_moe<float>(dir.write("ok.json", ming_config("2")), w).modules.size() == 1);
  // 1e12 experts: before, the loader built 2e12 key names first and ran out of memory.
  const std::string cfg12 = dir.write("e12.json", ming_config("1000000000000"));
  check_contains(error_of([&] { (void)molora::io::load_ming_moe<float>(cfg12, w); }),
                 {"e12.json", "num_experts", "expected at most 4096 (Limits::max_experts), got 1000000000000"});
  // With the limit raised the file still decides, without an allocation of E anything.
  molora::io::MingMoeLoadOptions o;
  o.limits.max_experts = Index(1) << 50;
  check_contains(error_of([&] { (void)molora::io::load_ming_moe<float>(cfg12, w, o); }),
                 {"w.safetensors", "module 'model.layers.0.mlp.up_proj'",
                  "switch.weight rows (num_experts from the config): expected 1000000000000, got 2"});
  const std::string cfg7 = dir.write("e7.json", ming_config("10000000"));
  check_contains(error_of([&] { (void)molora::io::load_ming_moe<float>(cfg7, w, o); }), {"expected 10000000, got 2"});
  // An expert index past E is named, however large.
  const std::string cfg1 = dir.write("e1.json", ming_config("1"));
  check_contains(error_of([&] { (void)molora::io::load_ming_moe<float>(cfg1, w); }),
                 {"unexpected tensor 'base_model.model.model.layers.0.mlp.up_proj.experts.1.lora_A_1.weight' for num_experts = 1"});
}

TEST_CASE("hostile MixLoRA: num_experts is bounded and checked against the file first") {
  const SafetensorsReader w(data_dir + "/mixlora/adapter_model.safetensors"), base(data_dir + "/mixlora/base.safetensors");
  const std::string text = read_text(data_dir + "/mixlora/adapter_config.json");
  auto with = [&](const std::string& from, const std::string& to) {
    const auto at = text.find(from);
    REQUIRE(at != std::string::npos);
    return molora::io::MixLoRAConfig::from_string(std::string(text).replace(at, from.size(), to), "mix.json");
  };
  auto load = [&](const molora::io::MixLoRAConfig& c, const Limits& l) {
    (void)molora::io::load_mixlora_ffn<float>(c, w, 0, base.matrix<float>("layers.0.mlp.gate_proj.weight"),
                                              base.matrix<float>("layers.0.mlp.up_proj.weight"),
                                              base.matrix<float>("layers.0.mlp.down_proj.weight"), "silu", l);
  };
  const auto huge = with("\"num_experts\": 4", "\"num_experts\": 1000000000000");
  check_contains(error_of([&] { load(huge, Limits{}); }), {"mix.json", "expected at most 4096 (Limits::max_experts)"});
  Limits l;
  l.max_experts = Index(1) << 50;
  check_contains(error_of([&] { load(huge, l); }),
                 {"module 'mixlora.layers.0.mlp'", "moe_gate.weight rows (num_experts): expected 1000000000000, got 4"});
  // an unknown act_fn: the layer's config_error leaves as a format_error naming file and module
  const auto act = with("\"act_fn\": \"silu\"", "\"act_fn\": \"swiglu_fancy\"");
  check_contains(error_of([&] { load(act, Limits{}); }),
                 {"adapter_model.safetensors", "module 'mixlora.layers.0.mlp'", "act_fn", "swiglu_fancy"});
}

// ---- 16-bit tensors ---------------------------------------------------------------------------

namespace {

// One tensor entry of dtype `dtype` (`size` bytes an element) and shape `shape` at byte `begin`.
std::string typed(const std::string& name, const char* dtype, std::uint64_t size, const std::string& shape,
                  std::uint64_t numel, std::uint64_t begin) {
  return molora::detail::cat("\"", name, "\":{\"dtype\":\"", dtype, "\",\"shape\":", shape, ",\"data_offsets\":[",
                             begin, ",", begin + size * numel, "]}");
}

}  // namespace

TEST_CASE("hostile 16-bit tensors: a wrong shape or dtype is a format_error naming the file and the tensor") {
  TempDir dir;
  const std::string peft = dir.file("peft");
  fs::create_directories(peft);
  write_text(peft + "/adapter_config.json", R"({"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["proj"]})");
  const std::string ka = "base_model.model.proj.lora_A.weight", kb = "base_model.model.proj.lora_B.weight";
  const std::string weights = peft + "/adapter_model.safetensors";
  // Every load (kept in bf16 or f16, or widened) gives the same format_error.
  auto each_load = [&](std::initializer_list<const char*> parts) {
    check_contains(error_of([&] { (void)molora::io::load_peft_lora<float, molora::bf16>(peft); }), parts);
    check_contains(error_of([&] { (void)molora::io::load_peft_lora<float, molora::f16>(peft); }), parts);
    check_contains(error_of([&] { (void)molora::io::load_peft_lora<float>(peft); }), parts);
  };
  // lora_A BF16 [3, 5] where the config says r = 2
  write_bytes(weights, st_file("{" + typed(ka, "BF16", 2, "[3,5]", 15, 0) + "," + typed(kb, "BF16", 2, "[4,2]", 8, 30) + "}", 46));
  each_load({"adapter_model.safetensors", "module 'proj'", ka.c_str(), "rows (r from the config): expected 2, got 3"});
  // lora_B F16 of rank 1
  write_bytes(weights, st_file("{" + typed(ka, "BF16", 2, "[2,5]", 10, 0) + "," + typed(kb, "F16", 2, "[8]", 8, 20) + "}", 36));
  each_load({"adapter_model.safetensors", "module 'proj'", kb.c_str(), "rank: expected 2, got 1"});
  // lora_B stored as I16 (16 bits, not a float)
  write_bytes(weights, st_file("{" + typed(ka, "BF16", 2, "[2,5]", 10, 0) + "," + typed(kb, "I16", 2, "[4,2]", 8, 20) + "}", 36));
  each_load({"adapter_model.safetensors", kb.c_str(), "I16"});
  // a BF16 tensor whose byte range disagrees with its shape
  write_bytes(weights, st_file("{" + typed(ka, "BF16", 2, "[2,5]", 9, 0) + "," + typed(kb, "BF16", 2, "[4,2]", 8, 18) + "}", 34));
  check_contains(error_of([&] { (void)molora::io::load_peft_lora<float, molora::bf16>(peft); }),
                 {"adapter_model.safetensors", ka.c_str()});

  // MING-MOE kept in bf16: a BF16 expert of the wrong shape
  const std::string m = "base_model.model.model.layers.0.mlp.up_proj.";
  const std::string ming = dir.file("ming.safetensors");
  write_bytes(ming, st_file("{" + typed(m + "switch.weight", "BF16", 2, "[1,3]", 3, 0) + "," +
                            typed(m + "switch.bias", "F32", 4, "[1]", 1, 6) + "," +
                            typed(m + "experts.0.lora_A_0.weight", "BF16", 2, "[1,4]", 4, 10) + "," +
                            typed(m + "experts.0.lora_B_0.weight", "BF16", 2, "[2,1]", 2, 18) + "}",
                            22));
  check_contains(error_of([&] {
                   (void)molora::io::load_ming_moe<float, molora::bf16>(dir.write("c.json", ming_config("1")), ming);
                 }),
                 {"ming.safetensors", "module 'model.layers.0.mlp.up_proj'", "experts.0.lora_A_0.weight",
                  "columns (in of switch.weight): expected 3, got 4"});

  // A set-adapter file: a BF16 experts.Bt of the wrong shape, and one stored as I16
  const std::string set = dir.file("set.safetensors");
  const std::map<std::string, std::string> meta = {{"molora.format", "set_adapter"}, {"num_experts", "1"}, {"top_k", "1"},
                                                   {"rank", "2"}, {"scaling", "1"}, {"normalize_top_k", "true"},
                                                   {"selection", "top_k"}};
  const std::vector<std::uint16_t> zeros(64, 0);
  auto save_set = [&](std::vector<std::uint64_t> bt_shape, molora::io::Dtype bt_dtype) {
    std::vector<molora::io::TensorToWrite> t;
    t.push_back(molora::io::make_tensor_raw("experts.A", molora::io::Dtype::BF16, {2, 5}, zeros.data()));
    t.push_back(molora::io::make_tensor_raw("experts.Bt", bt_dtype, std::move(bt_shape), zeros.data()));
    molora::io::save_safetensors(set, std::move(t), meta);
  };
  // Loaded widened, or kept in bf16 / f16: the same format_error.
  auto each_set_load = [&](std::initializer_list<const char*> parts) {
    check_contains(error_of([&] { (void)molora::load_set_adapter<float>(SafetensorsReader(set)); }), parts);
    check_contains(error_of([&] { (void)molora::load_set_adapter<float, molora::bf16>(SafetensorsReader(set)); }), parts);
    check_contains(error_of([&] { (void)molora::load_set_adapter<float, molora::f16>(SafetensorsReader(set)); }), parts);
  };
  save_set({3, 4}, molora::io::Dtype::BF16);
  each_set_load({"set.safetensors", "experts.Bt", "[2, 4]", "[3, 4]"});
  save_set({2, 4}, molora::io::Dtype::I16);
  each_set_load({"set.safetensors", "experts.Bt", "I16"});
  save_set({2, 4}, molora::io::Dtype::F16);
  CHECK(molora::load_set_adapter<float>(SafetensorsReader(set))->out_features() == 4);
  CHECK(molora::load_set_adapter<float, molora::bf16>(SafetensorsReader(set))->views().Bt_bf16.size() == 1);
}

// ---- values a layer would refuse, dims, and saving --------------------------------------------

TEST_CASE("hostile values: zero and 2^64-1 dimensions, and an alpha whose scaling is not a normal Scalar") {
  TempDir dir;
  // rank 0 in the file: the message names file, module and the shape as written
  const std::string w0 = dir.file("rank0.safetensors");
  write_bytes(w0, ming_file(1, 0));
  check_contains(error_of([&] { (void)molora::io::load_ming_moe<float>(dir.write("c.json", ming_config("1")), w0); }),
                 {"rank0.safetensors", "module 'model.layers.0.mlp.up_proj'", "experts.0.lora_A_0.weight' shape",
                  "got [0, 3]"});
  // a dimension of 2^64-1 (valid for the reader with a zero beside it) prints as in the file
  const std::string peft = dir.file("peft");
  fs::create_directories(peft);
  write_text(peft + "/adapter_config.json", R"({"peft_type": "LORA", "r": 1, "lora_alpha": 2, "target_modules": ["proj"]})");
  write_bytes(peft + "/adapter_model.safetensors",
              st_file("{\"base_model.model.proj.lora_A.weight\":{\"dtype\":\"F32\",\"shape\":[18446744073709551615,0],"
                      "\"data_offsets\":[0,0]}," + entry("base_model.model.proj.lora_B.weight", 2, 1, 0) + "}", 8));
  const std::string msg = error_of([&] { (void)molora::io::load_peft_lora<float>(peft); });
  check_contains(msg, {"adapter_model.safetensors", "module 'proj'", "[18446744073709551615, 0]"});
  CHECK_FALSE(contains(msg, "-1"));

  // lora_alpha 1e300: every float output would be inf or NaN
  const std::string w = dir.file("w.safetensors");
  write_bytes(w, ming_file(2, 1));
  const std::string big = dir.write("alpha.json", ming_config("2", "1e300"));
  check_contains(error_of([&] { (void)molora::io::load_ming_moe<float>(big, w); }),
                 {"alpha.json", "module 'model.layers.0.mlp.up_proj'", "lora_alpha = 1e+300", "scaling expected a finite normal float"});
  CHECK(molora::io::load_ming_moe<double>(big, w).modules.size() == 1);  // 1e300 is a normal double
  molora::io::MingMoeLoadOptions o;
  o.lora_alpha = 1e-300;  // too small for float's normal range
  check_contains(error_of([&] { (void)molora::io::load_ming_moe<float>(big, w, o); }),
                 {"MingMoeLoadOptions", "scaling expected a finite normal float"});
  write_text(peft + "/adapter_config.json", R"({"peft_type": "LORA", "r": 4, "lora_alpha": 1e300, "target_modules": ["proj", "other"]})");
  fs::copy_file(data_dir + "/peft_lora/adapter_model.safetensors", peft + "/adapter_model.safetensors",
                fs::copy_options::overwrite_existing);
  check_contains(error_of([&] { (void)molora::io::load_peft_lora<float>(peft); }),
                 {"adapter_config.json", "module 'layers.0.", "scaling expected a finite normal float"});
}

TEST_CASE("hostile PEFT target_modules: the regex is matched in linear time, bad patterns are format_errors") {
  TempDir dir;
  const std::string peft = dir.file("peft");
  fs::create_directories(peft);
  fs::copy_file(data_dir + "/peft_lora/adapter_model.safetensors", peft + "/adapter_model.safetensors");
  const auto with_pattern = [&](const std::string& pattern_json) {
    write_text(peft + "/adapter_config.json",
               R"({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": )" + pattern_json + "}");
  };
  // std::regex let regex_error escape here; the message names the file, field and construct
  with_pattern(R"("(?=layers).*")");
  check_contains(error_of([&] { (void)molora::io::load_peft_lora<float>(peft); }),
                 {"adapter_config.json: target_modules", "unsupported regex construct '(?='", "position 0"});
  with_pattern(R"("layers\\.(0")");
  check_contains(error_of([&] { (void)molora::io::load_peft_lora<float>(peft); }),
                 {"adapter_config.json: target_modules", "malformed regex"});
  CHECK_THROWS_AS((void)molora::io::PeftLoraConfig::from_file(peft + "/adapter_config.json"), molora::format_error);
  // a pattern that matches both modules, and one that matches only one (full match, as PEFT)
  with_pattern(R"j("layers\\.\\d+\\.(proj|other)")j");
  CHECK(molora::io::load_peft_lora<float>(peft).modules.size() == 2);
  with_pattern(R"("proj")");  // a string is a pattern, not a suffix: full match fails on both
  check_contains(error_of([&] { (void)molora::io::load_peft_lora<float>(peft); }), {"not among the config's target_modules"});
  // exponential for a backtracking engine: (a|aa)* over a 960-character module path
  const std::string m(960, 'a');
  write_bytes(peft + "/adapter_model.safetensors",
              st_file("{" + entry("base_model.model." + m + ".lora_A.weight", 1, 1, 0) + "," +
                      entry("base_model.model." + m + ".lora_B.weight", 1, 1, 4) + "}", 8));
  write_text(peft + "/adapter_config.json", R"({"peft_type": "LORA", "r": 1, "lora_alpha": 2, "target_modules": "(a|aa)*b"})");
  check_contains(error_of([&] { (void)molora::io::load_peft_lora<float>(peft); }), {"not among the config's target_modules"});
  write_text(peft + "/adapter_config.json", R"({"peft_type": "LORA", "r": 1, "lora_alpha": 2, "target_modules": "(a|aa)*"})");
  CHECK(molora::io::load_peft_lora<float>(peft).modules.count(m) == 1);
}

TEST_CASE("hostile save target: save_ming_moe onto a regular file is a format_error naming it") {
  TempDir dir;
  const std::string w = dir.file("w.safetensors");
  write_bytes(w, ming_file(2, 1));
  const auto ming = molora::io::load_ming_moe<float>(dir.write("c.json", ming_config("2")), w);
  const std::string target = dir.write("taken", "a file");
  const std::string msg = error_of(
      [&] { molora::io::save_ming_moe<float>(target, {{"model.layers.0.mlp.up_proj", &ming.at("model.layers.0.mlp.up_proj")}}); });
  check_contains(msg, {"taken", "expected a directory to save the checkpoint in, got an existing file that is not a directory"});
  CHECK(read_text(target) == "a file");
}

// ---- SIGBUS and the read mode -----------------------------------------------------------------

TEST_CASE("Load::read keeps the data when the file is truncated underneath, and is bounded") {
  TempDir dir;
  const std::string p = dir.file("w.safetensors");
  fs::copy_file(data_dir + "/ming_moe/non_lora_trainables.safetensors", p);
  const SafetensorsReader mapped(data_dir + "/ming_moe/non_lora_trainables.safetensors");
  const SafetensorsReader r(p, Load::read);
  fs::resize_file(p, 0);  // a mapped reader touching its data now would die of SIGBUS
  REQUIRE(r.names() == mapped.names());
  for (const auto& n : r.names()) CHECK(r.matrix<float>(n) == mapped.matrix<float>(n));

  fs::copy_file(data_dir + "/ming_moe/non_lora_trainables.safetensors", p, fs::copy_options::overwrite_existing);
  Limits l;
  l.max_read_bytes = 1000;
  check_contains(error_of([&] { SafetensorsReader(p, Load::read, l); }),
                 {"w.safetensors", "file size: expected at most 1000 bytes (Limits::max_read_bytes), got 21120"});
  // the loaders take the mode too and give the same layers
  const auto a = molora::io::load_peft_lora<float>(data_dir + "/peft_lora", Load::read);
  const auto b = molora::io::load_peft_lora<float>(data_dir + "/peft_lora");
  CHECK(a.at("layers.0.proj").A() == b.at("layers.0.proj").A());
  molora::io::MingMoeLoadOptions o;
  o.load = Load::read;
  const auto m = molora::io::load_ming_moe<float>(data_dir + "/ming_moe/config.json", p, o);
  CHECK(m.modules.size() == 3);
}

// ---- the fuzzer's seeds -------------------------------------------------------------------------

TEST_CASE("fuzz_checkpoints seed corpus: the fixtures load, the hostile seeds are format_errors") {
  // Same input layout as tests/fuzz/fuzz_checkpoints.cpp: options byte, u16 config length,
  // config, tensors. Only the load is replayed here; the fuzzer adds a forward.
  const fs::path corpus = fs::path(data_dir) / ".." / "fuzz" / "corpus" / "fuzz_checkpoints";
  REQUIRE(fs::is_directory(corpus));
  TempDir dir;
  int loaded = 0, refused = 0;
  for (const auto& e : fs::directory_iterator(corpus)) {
    const auto bytes = read_bytes(e.path().string());
    REQUIRE(bytes.size() >= 3);
    const unsigned opts = bytes[0];
    const std::size_t len = std::min<std::size_t>(bytes[1] | (std::size_t(bytes[2]) << 8), bytes.size() - 3);
    const std::string cfg = dir.file("config.json"), w = dir.file("w.safetensors");
    write_bytes(cfg, {bytes.begin() + 3, bytes.begin() + 3 + static_cast<std::ptrdiff_t>(len)});
    write_bytes(w, {bytes.begin() + 3 + static_cast<std::ptrdiff_t>(len), bytes.end()});
    const Load load = (opts & 4) ? Load::read : Load::map;
    CAPTURE(e.path().filename().string());
    try {
      if ((opts & 3) == 0) {
        (void)molora::io::load_peft_lora<float>(cfg, w, load);
      } else if ((opts & 3) != 2) {
        molora::io::MingMoeLoadOptions o;
        o.load = load;
        if ((opts & 3) == 3) o.lora_alpha = 16.0;
        (void)molora::io::load_ming_moe<float>(cfg, w, o);
      } else {
        const SafetensorsReader r(w, load), base(data_dir + "/mixlora/base.safetensors");
        const std::string p = (opts & 16) ? "layers.1.mlp." : "layers.0.mlp.";
        (void)molora::io::load_mixlora_ffn<float>(molora::io::MixLoRAConfig::from_file(cfg), r, (opts & 16) ? 1 : 0,
                                                  base.matrix<float>(p + "gate_proj.weight"),
                                                  base.matrix<float>(p + "up_proj.weight"),
                                                  base.matrix<float>(p + "down_proj.weight"));
      }
      ++loaded;
    } catch (const molora::format_error&) {
      ++refused;
    }
  }
  CHECK(loaded >= 8);    // the five fixtures (three twice) and two small MING files
  CHECK(refused >= 8);   // the hostile cases
}

}  // namespace test_hostile_files
