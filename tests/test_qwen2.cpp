// The Qwen2 decoder of examples/qwen2.hpp against transformers' Qwen2ForCausalLM with
// MING-MOE adapters (tests/data/qwen2, made by tools/make_qwen2_fixture.py): logits at every
// prompt position and decode step, greedy tokens, expert load; KV cache against a full
// recompute; a ragged batch against each sequence alone; bad folders; the command line.
#include <doctest/doctest.h>

#include <cstring>
#include <sstream>

#include "../examples/qwen2.hpp"
#include "test_util.hpp"

namespace test_qwen2 {

namespace {

using molora::Index;
using qwen2::Matrix;

const std::string data_dir = std::string(MOLORA_TEST_DATA_DIR) + "/qwen2";

std::vector<int> read_ids(const molora::io::SafetensorsReader& r, const std::string& name) {
  const auto& info = r.info(name);
  REQUIRE(info.dtype == molora::io::Dtype::I32);
  std::vector<int> out(static_cast<std::size_t>(info.numel));
  for (std::size_t i = 0; i < out.size(); ++i) {
    std::int32_t v;
    std::memcpy(&v, r.bytes(name) + 4 * i, 4);
    out[i] = v;
  }
  return out;
}

// max |a - b| / max |b|; shapes must agree.
double rel_error(const Matrix& a, const Matrix& b) {
  REQUIRE(a.rows() == b.rows());
  REQUIRE(a.cols() == b.cols());
  return (a - b).cwiseAbs().maxCoeff() / b.cwiseAbs().maxCoeff();
}

struct Reference {
  molora::io::SafetensorsReader r{data_dir + "/reference.safetensors"};
  std::vector<int> prompt = read_ids(r, "input_ids");
  Matrix prompt_logits(const std::string& key) const { return r.matrix<float>(key + ".prompt_logits"); }
  Matrix step_logits(const std::string& key) const { return r.matrix<float>(key + ".step_logits"); }
  std::vector<int> tokens(const std::string& key) const { return read_ids(r, key + ".tokens"); }
};

qwen2::AdapterOptions adapter_for(const std::string& variant) {
  return {data_dir + "/adapter_" + variant, {}};
}

// Copies the fixture's model folder `variant` into tmp/name and returns that path.
std::string copy_model(const test_util::TempDir& tmp, const std::string& variant, const std::string& name) {
  const std::string dir = tmp.file(name);
  std::filesystem::create_directories(dir);
  for (const char* f : {"config.json", "model.safetensors"})
    std::filesystem::copy_file(data_dir + "/" + variant + "/" + f, dir + "/" + f);
  return dir;
}

// Rewrites dir/model.safetensors through edit(name -> tensor as read, or nullopt to drop).
template <class Edit>
void rewrite_model(const std::string& dir, Edit&& edit) {
  std::vector<molora::io::TensorToWrite> out;
  {
    const molora::io::SafetensorsReader r(dir + "/model.safetensors");
    for (const auto& name : r.names()) {
      Matrix m = r.matrix<float>(name);
      std::vector<std::uint64_t> shape = r.info(name).shape;
      if (!edit(name, m, shape)) continue;
      out.push_back(molora::io::make_tensor(name, shape, m.data(), molora::io::Dtype::F32));
    }
  }
  molora::io::save_safetensors(dir + "/model.safetensors", std::move(out));
}

// Prefill the reference prompt, decode 8 tokens greedily, and compare logits (within 1e-4
// of the largest |logit|) and tokens with the reference's entry `key`.
qwen2::Generation generate_and_compare(qwen2::Model& model, const Reference& ref, const std::string& key) {
  qwen2::Generation g = qwen2::generate(model, ref.prompt, 8);
  const double e_prompt = rel_error(g.prompt_logits, ref.prompt_logits(key));
  const double e_steps = rel_error(g.step_logits, ref.step_logits(key));
  MESSAGE(key << ": max |logit error| / max |logit|: prompt " << e_prompt << ", decode " << e_steps);
  CHECK(e_prompt < 1e-4);
  CHECK(e_steps < 1e-4);
  CHECK(g.tokens == ref.tokens(key));
  return g;
}

// Every projection and the LM head keep the file's dtype ("f32" or "bf16") and point into
// the mapped file, wrapped by their molora layer without a copy.
void check_kept_as_stored(const qwen2::Model& model, const std::string& dtype) {
  auto check = [&](const qwen2::Projection& p) {
    CHECK(std::string(p.weight_dtype()) == dtype);
    CHECK(p.weight().in_file);
    CHECK(p.layer_wraps_weight());
  };
  for (const auto& L : model.layers()) {
    for (const qwen2::Projection* p : {&L.q, &L.k, &L.v, &L.o}) check(*p);
    for (const qwen2::Projection& p : L.mlp) check(p);
  }
  check(model.lm_head());
}

// A copy of dir/model.safetensors whose header is one space longer, so that the data section
// starts at an odd offset and no BF16 tensor is 2-byte aligned in the mapping.
void shift_data_by_one(const std::string& dir) {
  const std::string path = dir + "/model.safetensors";
  std::string bytes = test_util::read_text(path);
  REQUIRE(bytes.size() > 8);
  std::uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | static_cast<unsigned char>(bytes[static_cast<std::size_t>(i)]);
  REQUIRE(n % 2 == 0);
  bytes.insert(8 + static_cast<std::size_t>(n), " ");
  ++n;
  for (int i = 0; i < 8; ++i) bytes[static_cast<std::size_t>(i)] = static_cast<char>((n >> (8 * i)) & 0xff);
  test_util::write_text(path, bytes);
}

}  // namespace

TEST_CASE("qwen2 keeps BF16 weights as bf16: the widened model gives the same logits") {
  const Reference ref;
  for (const bool adapted : {true, false}) {
    CAPTURE(adapted);
    const qwen2::AdapterOptions adapter = adapted ? adapter_for("bf16") : qwen2::AdapterOptions{};
    qwen2::Model kept(data_dir + "/bf16", adapter);
    qwen2::LoadOptions widen;
    widen.widen = true;
    qwen2::Model wide(data_dir + "/bf16", adapter, widen);
    check_kept_as_stored(kept, "bf16");
    // The adapter file is all BF16: kept as stored, its routers and experts are bf16 too.
    CHECK(std::string(kept.layers()[1].mlp[2].adapter_dtype()) == (adapted ? "bf16" : ""));
    CHECK(std::string(wide.layers()[1].mlp[2].adapter_dtype()) == (adapted ? "f32" : ""));
    CHECK(std::string(wide.layers()[1].mlp[2].weight_dtype()) == "f32");
    CHECK(std::string(wide.lm_head().weight_dtype()) == "f32");
    CHECK_FALSE(wide.layers()[0].q.weight().in_file);
    CHECK(2 * kept.projection_bytes() == wide.projection_bytes());
    const qwen2::Generation gk = generate_and_compare(kept, ref, adapted ? "bf16.adapter" : "bf16.plain");
    const qwen2::Generation gw = qwen2::generate(wide, ref.prompt, 8);
    CHECK(rel_error(gk.prompt_logits, gw.prompt_logits) < 1e-5);
    CHECK(rel_error(gk.step_logits, gw.step_logits) < 1e-5);
    CHECK(gk.tokens == gw.tokens);
  }
}

TEST_CASE("qwen2 handles dtypes per tensor (mixed F32 / BF16) and copies unaligned BF16 once") {
  const Reference ref;
  test_util::TempDir tmp;
  SUBCASE("mixed file") {
    // Layer 0's q_proj and down_proj and the LM head widened to F32 in the file, the rest BF16.
    const std::string dir = copy_model(tmp, "bf16", "mixed");
    const std::set<std::string> widened = {"model.layers.0.self_attn.q_proj.weight",
                                           "model.layers.0.mlp.down_proj.weight", "lm_head.weight"};
    std::vector<molora::io::TensorToWrite> out;
    std::vector<Matrix> keep;  // F32 data must live until the file is written
    {
      const molora::io::SafetensorsReader r(dir + "/model.safetensors");
      for (const auto& name : r.names()) {
        const auto& info = r.info(name);
        if (widened.count(name)) {
          keep.push_back(r.matrix<float>(name));
          out.push_back(molora::io::make_tensor(name, info.shape, keep.back().data(), molora::io::Dtype::F32));
        } else {
          out.push_back(molora::io::make_tensor_raw(name, info.dtype, info.shape, r.bytes(name)));
        }
      }
      molora::io::save_safetensors(dir + "/model.safetensors.new", std::move(out));
    }
    std::filesystem::rename(dir + "/model.safetensors.new", dir + "/model.safetensors");
    qwen2::Model model(dir, adapter_for("bf16"));
    const auto& L0 = model.layers()[0];
    CHECK(std::string(L0.q.weight_dtype()) == "f32");
    CHECK(std::string(L0.k.weight_dtype()) == "bf16");
    CHECK(std::string(L0.mlp[2].weight_dtype()) == "f32");
    CHECK(std::string(L0.mlp[1].weight_dtype()) == "bf16");
    CHECK(std::string(model.layers()[1].mlp[2].weight_dtype()) == "bf16");
    CHECK(std::string(model.lm_head().weight_dtype()) == "f32");
    CHECK(L0.q.weight().in_file);
    CHECK(L0.mlp[1].weight().in_file);
    generate_and_compare(model, ref, "bf16.adapter");
  }
  SUBCASE("mixed adapter file: routers and experts float") {
    // One router weight widened to F32 in the adapter file: the file is no longer all BF16,
    // so every adapter is loaded float (the BF16 tensors widened exactly).
    const std::string dir = tmp.file("adapter_mixed");
    std::filesystem::create_directories(dir);
    std::filesystem::copy_file(data_dir + "/adapter_bf16/config.json", dir + "/config.json");
    std::vector<molora::io::TensorToWrite> out;
    std::vector<Matrix> keep;
    {
      const molora::io::SafetensorsReader r(data_dir + "/adapter_bf16/non_lora_trainables.safetensors");
      for (const auto& name : r.names()) {
        const auto& info = r.info(name);
        if (keep.empty() && info.shape.size() == 2 && name.find("switch") != std::string::npos) {
          keep.push_back(r.matrix<float>(name));
          out.push_back(molora::io::make_tensor(name, info.shape, keep.back().data(), molora::io::Dtype::F32));
        } else {
          out.push_back(molora::io::make_tensor_raw(name, info.dtype, info.shape, r.bytes(name)));
        }
      }
      REQUIRE(keep.size() == 1);
      molora::io::save_safetensors(dir + "/non_lora_trainables.safetensors", std::move(out));
    }
    qwen2::Model model(data_dir + "/bf16", qwen2::AdapterOptions{dir, {}});
    CHECK(std::string(model.layers()[0].mlp[0].adapter_dtype()) == "f32");
    CHECK(std::string(model.layers()[1].mlp[2].adapter_dtype()) == "f32");
    generate_and_compare(model, ref, "bf16.adapter");
  }
  SUBCASE("unaligned BF16 data") {
    const std::string dir = copy_model(tmp, "bf16", "unaligned");
    shift_data_by_one(dir);
    qwen2::Model model(dir, adapter_for("bf16"));
    const auto& q = model.layers()[0].q;
    CHECK(std::string(q.weight_dtype()) == "bf16");
    CHECK_FALSE(q.weight().in_file);  // copied once
    CHECK(std::string(model.layers()[1].mlp[0].weight_dtype()) == "bf16");
    generate_and_compare(model, ref, "bf16.adapter");
  }
}

TEST_CASE("qwen2 with MING-MOE adapters: logits, greedy tokens and expert load equal transformers'") {
  const Reference ref;
  for (const char* variant : {"f32", "bf16"}) {
    CAPTURE(std::string(variant));
    qwen2::Model model(data_dir + "/" + variant, adapter_for(variant));
    CHECK(model.adapted());
    CHECK_FALSE(model.config().tie_word_embeddings);
    const std::string key = std::string(variant) + ".adapter";
    const qwen2::Generation g = generate_and_compare(model, ref, key);
    check_kept_as_stored(model, variant);

    // Tokens per expert over the prompt and the 7 decode steps, per layer and projection.
    const std::vector<int> load = read_ids(ref.r, key + ".expert_load");  // [layers, 3, E]
    const auto& counts = model.expert_load().counts;
    REQUIRE(load.size() == counts.size() * 3 * 4);
    std::size_t i = 0;
    for (const auto& layer : counts)
      for (const auto& proj : layer)
        for (long n : proj) CHECK(n == load[i++]);
  }
}

TEST_CASE("qwen2 without an adapter equals transformers' plain model") {
  const Reference ref;
  for (const char* variant : {"f32", "bf16"}) {
    CAPTURE(std::string(variant));
    qwen2::Model model(data_dir + "/" + variant);
    CHECK_FALSE(model.adapted());
    const std::string key = std::string(variant) + ".plain";
    const qwen2::Generation g = generate_and_compare(model, ref, key);
    // The adapter changes the logits (so the test above sees it).
    CHECK(rel_error(ref.prompt_logits(std::string(variant) + ".adapter"), g.prompt_logits) > 1e-2);
  }
}

TEST_CASE("qwen2 with its adapters switched off computes the plain model on the same weights") {
  const Reference ref;
  for (const char* variant : {"f32", "bf16"}) {
    CAPTURE(std::string(variant));
    qwen2::Model plain(data_dir + "/" + variant);
    qwen2::Model model(data_dir + "/" + variant, adapter_for(variant));
    model.enable_adapters(false);
    for (const auto& L : model.layers())
      for (const qwen2::Projection& p : L.mlp) {
        CHECK(p.adapted());
        CHECK_FALSE(p.adapter_enabled());
      }
    const qwen2::Generation off = generate_and_compare(model, ref, std::string(variant) + ".plain");
    // The same kernels over the same weights as the model without an adapter: the same bits.
    const qwen2::Generation g = qwen2::generate(plain, ref.prompt, 8);
    CHECK((off.prompt_logits.array() == g.prompt_logits.array()).all());
    CHECK((off.step_logits.array() == g.step_logits.array()).all());
    for (const auto& layer : model.expert_load().counts)
      for (const auto& proj : layer)
        for (long n : proj) CHECK(n == 0);
    // Switched back on, the adapters' logits again.
    model.enable_adapters(true);
    generate_and_compare(model, ref, std::string(variant) + ".adapter");
  }
}

TEST_CASE("qwen2 decoding with the KV cache equals running the whole sequence again") {
  const Reference ref;
  qwen2::Model model(data_dir + "/f32", adapter_for("f32"));
  const qwen2::Generation g = qwen2::generate(model, ref.prompt, 8);
  std::vector<int> all = ref.prompt;
  all.insert(all.end(), g.tokens.begin(), g.tokens.end() - 1);
  qwen2::KVCache fresh;
  const Matrix full = model.forward(all, fresh);  // [P + 7, V]
  const Index P = static_cast<Index>(ref.prompt.size());
  CHECK(rel_error(full.topRows(P), g.prompt_logits) < 1e-5);
  CHECK(rel_error(full.bottomRows(8), g.step_logits) < 1e-5);
  CHECK(fresh.length == P + 7);

  // A prompt prefilled in two chunks gives the same logits as in one.
  qwen2::KVCache chunked;
  const Matrix a = model.forward(std::vector<int>(all.begin(), all.begin() + 3), chunked);
  const Matrix b = model.forward(std::vector<int>(all.begin() + 3, all.end()), chunked);
  Matrix both(a.rows() + b.rows(), a.cols());
  both << a, b;
  CHECK(rel_error(both, full) < 1e-5);
}

TEST_CASE("qwen2 forward checks its arguments and changes nothing when it throws") {
  qwen2::Model model(data_dir + "/f32", adapter_for("f32"));
  qwen2::KVCache a, b;
  model.forward({1, 2, 3}, a);
  CHECK_THROWS_AS(model.forward({{4}, {5}}, {&a}), molora::shape_error);
  CHECK_THROWS_AS(model.forward({{4}, {}}, {&a, &b}), molora::shape_error);
  CHECK_THROWS_AS(model.forward({{4}, {512}}, {&a, &b}), molora::config_error);
  CHECK_THROWS_AS(model.forward({{-1}}, {&a}), molora::config_error);
  CHECK(a.length == 3);
  CHECK(b.length == 0);
  const molora::MoLoRAAdapter<float>& some = *model.layers()[0].mlp[0].adapter();
  CHECK_THROWS_AS(model.attach(2, 0, some), molora::config_error);
  CHECK_THROWS_AS(model.attach(0, 2, some), molora::format_error);  // gate's adapter on down_proj: wrong shape
}

TEST_CASE("qwen2 ragged batch of 4 sequences decodes as each alone") {
  const Reference ref;
  for (const char* variant : {"f32", "bf16"}) {
    CAPTURE(std::string(variant));
    qwen2::Model model(data_dir + "/" + variant, adapter_for(variant));
    // Prefixes of the reference prompt (their routing margins were checked by the generator)
    // and the prompt followed by its first greedy tokens.
    const std::vector<int> p = ref.prompt;
    std::vector<int> longer = p;
    const std::vector<int> gen = ref.tokens(std::string(variant) + ".adapter");
    longer.insert(longer.end(), gen.begin(), gen.begin() + 3);
    const std::vector<std::vector<int>> prompts = {{p.begin(), p.begin() + 5}, p, {p.begin(), p.begin() + 2}, longer};
    const auto batch = qwen2::generate_batch(model, prompts, 6);
    REQUIRE(batch.size() == 4);
    for (std::size_t s = 0; s < prompts.size(); ++s) {
      CAPTURE(s);
      const qwen2::Generation alone = qwen2::generate(model, prompts[s], 6);
      CHECK(rel_error(batch[s].prompt_logits, alone.prompt_logits) < 1e-5);
      CHECK(rel_error(batch[s].step_logits, alone.step_logits) < 1e-5);
      CHECK(batch[s].tokens == alone.tokens);
    }
    // The full prompt's continuation in the batch is the reference's.
    CHECK(std::vector<int>(gen.begin(), gen.begin() + 6) == batch[1].tokens);
  }
}

TEST_CASE("qwen2 with tie_word_embeddings uses embed_tokens as the LM head") {
  // A tied folder (no lm_head.weight) and an untied one whose lm_head.weight is a copy of
  // embed_tokens.weight are the same model.
  const Reference ref;
  test_util::TempDir tmp;
  const std::string tied = copy_model(tmp, "f32", "tied"), copied = copy_model(tmp, "f32", "copied");
  nlohmann::json cfg = nlohmann::json::parse(test_util::read_text(tied + "/config.json"));
  cfg["tie_word_embeddings"] = true;
  test_util::write_text(tied + "/config.json", cfg.dump(2));
  rewrite_model(tied, [](const std::string& n, Matrix&, std::vector<std::uint64_t>&) { return n != "lm_head.weight"; });
  const Matrix embed =
      molora::io::SafetensorsReader(copied + "/model.safetensors").matrix<float>("model.embed_tokens.weight");
  rewrite_model(copied, [&](const std::string& n, Matrix& m, std::vector<std::uint64_t>&) {
    if (n == "lm_head.weight") m = embed;
    return true;
  });
  qwen2::Model a(tied, adapter_for("f32")), b(copied, adapter_for("f32"));
  CHECK(a.config().tie_word_embeddings);
  const qwen2::Generation ga = qwen2::generate(a, ref.prompt, 8), gb = qwen2::generate(b, ref.prompt, 8);
  CHECK(ga.prompt_logits == gb.prompt_logits);
  CHECK(ga.step_logits == gb.step_logits);
  CHECK(ga.tokens == gb.tokens);
  // and it is not the untied fixture's head
  CHECK(rel_error(ga.prompt_logits, ref.prompt_logits("f32.adapter")) > 1e-2);
}

TEST_CASE("qwen2 reads the sharded form (model.safetensors.index.json) and gives the same logits") {
  const Reference ref;
  test_util::TempDir tmp;
  const std::string dir = tmp.file("sharded");
  std::filesystem::create_directories(dir);
  std::filesystem::copy_file(data_dir + "/bf16/config.json", dir + "/config.json");
  const molora::io::SafetensorsReader whole(data_dir + "/bf16/model.safetensors");
  std::vector<molora::io::TensorToWrite> shard[2];
  nlohmann::json map = nlohmann::json::object();
  int i = 0;
  for (const auto& name : whole.names()) {
    const int s = i++ % 2;
    const auto& info = whole.info(name);
    shard[s].push_back(molora::io::make_tensor_raw(name, info.dtype, info.shape, whole.bytes(name)));
    map[name] = s == 0 ? "model-00001-of-00002.safetensors" : "model-00002-of-00002.safetensors";
  }
  molora::io::save_safetensors(dir + "/model-00001-of-00002.safetensors", std::move(shard[0]));
  molora::io::save_safetensors(dir + "/model-00002-of-00002.safetensors", std::move(shard[1]));
  nlohmann::json index = {{"metadata", {{"total_size", 0}}}, {"weight_map", map}};
  test_util::write_text(dir + "/model.safetensors.index.json", index.dump(2));

  qwen2::Model sharded(dir, adapter_for("bf16"));
  const qwen2::Generation g = qwen2::generate(sharded, ref.prompt, 8);
  CHECK(rel_error(g.prompt_logits, ref.prompt_logits("bf16.adapter")) < 1e-4);
  CHECK(g.tokens == ref.tokens("bf16.adapter"));

  // An index that names a tensor the model needs in no shard.
  map.erase("model.layers.1.mlp.down_proj.weight");
  index["weight_map"] = map;
  test_util::write_text(dir + "/model.safetensors.index.json", index.dump(2));
  const std::string msg = test_util::error_of([&] { qwen2::Model m(dir); });
  CHECK(msg.find("model.safetensors.index.json") != std::string::npos);
  CHECK(msg.find("'model.layers.1.mlp.down_proj.weight'") != std::string::npos);
}

TEST_CASE("qwen2 bad folders are format errors naming the file and the tensor or field") {
  test_util::TempDir tmp;
  auto contains = [](const std::string& msg, const std::string& part) {
    CAPTURE(msg);
    CHECK(msg.find(part) != std::string::npos);
  };

  SUBCASE("missing tensor") {
    const std::string dir = copy_model(tmp, "f32", "missing");
    rewrite_model(dir, [](const std::string& n, Matrix&, std::vector<std::uint64_t>&) {
      return n != "model.layers.1.self_attn.k_proj.bias";
    });
    const std::string msg = test_util::error_of([&] { qwen2::Model m(dir); });
    contains(msg, dir + "/model.safetensors");
    contains(msg, "'model.layers.1.self_attn.k_proj.bias'");
  }
  SUBCASE("untied model without lm_head.weight") {
    const std::string dir = copy_model(tmp, "f32", "no_head");
    rewrite_model(dir,
                  [](const std::string& n, Matrix&, std::vector<std::uint64_t>&) { return n != "lm_head.weight"; });
    contains(test_util::error_of([&] { qwen2::Model m(dir); }), "'lm_head.weight'");
  }
  SUBCASE("a shape that disagrees with the config") {
    const std::string dir = copy_model(tmp, "f32", "shape");
    rewrite_model(dir, [](const std::string& n, Matrix& m, std::vector<std::uint64_t>& shape) {
      if (n == "model.layers.0.mlp.up_proj.weight") {
        m.conservativeResize(175, m.cols());
        shape = {175, 64};
      }
      return true;
    });
    const std::string msg = test_util::error_of([&] { qwen2::Model m(dir); });
    contains(msg, dir + "/model.safetensors");
    contains(msg, "'model.layers.0.mlp.up_proj.weight'");
    contains(msg, "expected [176, 64], got [175, 64]");
  }
  SUBCASE("an adapter for another hidden size") {
    // tests/data/ming_moe: a MING-MOE adapter for hidden 32, intermediate 48.
    const std::string other = std::string(MOLORA_TEST_DATA_DIR) + "/ming_moe";
    const std::string msg = test_util::error_of([&] { qwen2::Model m(data_dir + "/f32", {other, {}}); });
    contains(msg, other + "/non_lora_trainables.safetensors");
    contains(msg, "module 'model.layers.0.mlp.gate_proj'");
    contains(msg, "tensor 'experts.0.lora_A_0.weight' columns");
    contains(msg, "expected 64, got 32");
  }
  SUBCASE("an adapter without the last layer's projections, or with one too many") {
    const std::string src = data_dir + "/adapter_f32";
    for (const bool drop : {true, false}) {
      CAPTURE(drop);
      const std::string dir = tmp.file(drop ? "adapter_short" : "adapter_long");
      std::filesystem::create_directories(dir);
      std::filesystem::copy_file(src + "/config.json", dir + "/config.json");
      const molora::io::SafetensorsReader r(src + "/non_lora_trainables.safetensors");
      std::vector<molora::io::TensorToWrite> out;
      for (const auto& name : r.names()) {
        const auto& info = r.info(name);
        const bool layer1 = name.find(".layers.1.") != std::string::npos;
        if (drop && layer1) continue;
        out.push_back(molora::io::make_tensor_raw(name, info.dtype, info.shape, r.bytes(name)));
        if (!drop && layer1) {  // the same tensors again for a layer 2 the model lacks
          std::string n2 = name;
          n2.replace(n2.find(".layers.1."), 10, ".layers.2.");
          out.push_back(molora::io::make_tensor_raw(n2, info.dtype, info.shape, r.bytes(name)));
        }
      }
      molora::io::save_safetensors(dir + "/non_lora_trainables.safetensors", std::move(out));
      const std::string msg = test_util::error_of([&] { qwen2::Model m(data_dir + "/f32", {dir, {}}); });
      contains(msg, dir + "/non_lora_trainables.safetensors");
      contains(msg, drop ? "module 'model.layers.1.mlp.gate_proj'" : "module 'model.layers.2.mlp.");
    }
  }
  SUBCASE("config fields it cannot honour") {
    struct Bad {
      const char* field;
      nlohmann::json value;
    };
    const std::vector<Bad> bad = {
        {"rope_scaling", {{"rope_type", "linear"}, {"factor", 2.0}}},
        {"rope_parameters", {{"rope_type", "yarn"}, {"rope_theta", 1e6}, {"factor", 4.0}}},
        {"use_sliding_window", true},
        {"layer_types", {"full_attention", "sliding_attention"}},
        {"hidden_act", "gelu"},
        {"head_dim", 32},
        {"num_key_value_heads", 3},
        {"hidden_size", "64"},
    };
    for (const auto& b : bad) {
      CAPTURE(std::string(b.field));
      const std::string dir = copy_model(tmp, "f32", std::string("cfg_") + b.field);
      nlohmann::json cfg = nlohmann::json::parse(test_util::read_text(dir + "/config.json"));
      cfg[b.field] = b.value;
      test_util::write_text(dir + "/config.json", cfg.dump(2));
      const std::string msg = test_util::error_of([&] { qwen2::Model m(dir); });
      contains(msg, dir + "/config.json");
      contains(msg, std::string("field '") + b.field + "'");
    }
  }
}

TEST_CASE("qwen2_molora command line: prints the greedy tokens last, rejects bad flags") {
  const Reference ref;
  std::string prompt;
  for (std::size_t i = 0; i < ref.prompt.size(); ++i) prompt += (i ? "," : "") + std::to_string(ref.prompt[i]);
  std::ostringstream out, err;
  const int rc = qwen2::cli::run(
      {data_dir + "/f32", "--adapter", data_dir + "/adapter_f32", "--prompt", prompt, "--max-new-tokens", "8"}, out,
      err);
  CAPTURE(err.str());
  REQUIRE(rc == 0);
  std::string text = out.str(), last;
  std::istringstream lines(text);
  for (std::string line; std::getline(lines, line);) last = line;
  std::string want;
  for (int t : ref.tokens("f32.adapter")) want += (want.empty() ? "" : " ") + std::to_string(t);
  CHECK(last == want);
  CHECK(text.find("layer 1:") != std::string::npos);
  CHECK(text.find("tokens/s") != std::string::npos);

  // --lora-alpha overrides the adapter's alpha: a different model, other logits.
  std::ostringstream out2, err2;
  CHECK(qwen2::cli::run({data_dir + "/f32", "--adapter", data_dir + "/adapter_f32", "--lora-alpha", "0.001", "--prompt",
                         prompt, "--max-new-tokens", "8"},
                        out2, err2) == 0);
  std::string last2;
  std::istringstream lines2(out2.str());
  for (std::string line; std::getline(lines2, line);) last2 = line;
  std::string plain;
  for (int t : ref.tokens("f32.plain")) plain += (plain.empty() ? "" : " ") + std::to_string(t);
  CHECK(last2 == plain);  // a tiny alpha leaves the plain model

  // The bf16 folder runs as stored, and with --widen as float; both give the reference tokens.
  std::string want_bf16;
  for (int t : ref.tokens("bf16.adapter")) want_bf16 += (want_bf16.empty() ? "" : " ") + std::to_string(t);
  for (const bool widen : {false, true}) {
    CAPTURE(widen);
    std::vector<std::string> argv = {data_dir + "/bf16", "--adapter", data_dir + "/adapter_bf16",
                                     "--prompt",          prompt,     "--max-new-tokens",
                                     "8"};
    if (widen) argv.push_back("--widen");
    std::ostringstream o, e;
    CHECK(qwen2::cli::run(argv, o, e) == 0);
    const std::string t = o.str();
    CHECK(t.find(widen ? "weights: projections f32, LM head f32 (widened)"
                       : "weights: projections bf16, LM head bf16 (as stored)") != std::string::npos);
    std::string l;
    std::istringstream ls(t);
    for (std::string line; std::getline(ls, line);) l = line;
    CHECK(l == want_bf16);
  }

  const std::vector<std::vector<std::string>> bad = {
      {},
      {data_dir + "/f32", "--max-new-tokens", "3"},
      {data_dir + "/f32", "--prompt", "1,x", "--max-new-tokens", "3"},
      {data_dir + "/f32", "--prompt", "1,2", "--max-new-tokens", "-1"},
      {data_dir + "/f32", "--prompt", "1,2", "--max-new-tokens", "3", "--frobnicate"},
      {data_dir + "/f32", "--prompt", "1,512", "--max-new-tokens", "3"},
      {data_dir + "/f32", "--prompt", "1,2", "--max-new-tokens"},
  };
  for (const auto& argv : bad) {
    std::ostringstream o, e;
    CHECK(qwen2::cli::run(argv, o, e) == 2);
    CHECK(e.str().find("usage: qwen2_molora") != std::string::npos);
  }
#ifndef MOLORA_USE_OPENMP
  {
    std::ostringstream o, e;
    CHECK(qwen2::cli::run({data_dir + "/f32", "--prompt", "1", "--max-new-tokens", "1", "--threads", "2"}, o, e) == 2);
    CHECK(e.str().find("needs the OpenMP build") != std::string::npos);
  }
#endif
  std::ostringstream o, e;  // a folder that is not there: a format error, exit 1
  const int missing_rc = qwen2::cli::run({data_dir + "/no_such_model", "--prompt", "1", "--max-new-tokens", "1"}, o, e);
  const std::string missing_err = e.str();
  CAPTURE(missing_err);
  CHECK(missing_rc == 1);
  CHECK(missing_err.find("no_such_model/config.json") != std::string::npos);
}

}  // namespace test_qwen2
