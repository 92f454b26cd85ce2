// The Qwen2 decoder of examples/qwen2.hpp at a Qwen1.5-0.5B-like shape (hidden 1024, 24
// layers, 16 heads, intermediate 2816, vocab 32000), random weights made in memory, with and
// without MING-MOE adapters (E = 8, k = 2, r = 16) on every MLP projection: prefill tokens/s
// (prompt 128) and decode tokens/s at batch 1 and 4, with the projection weights in float or
// kept in bf16 (as a BF16 checkpoint is kept), and the read bound: the time to read once the
// bytes of every projection weight and the LM head (what one decode step must read), cold
// (the caches flushed before each read). docs/benchmarks.md has the figures.
//
// Arguments: adapter (0 plain, 1 MING-MOE), bf16 (0 float weights, 1 bf16 weights); decode
// also the batch size.
#include <benchmark/benchmark.h>

#include <cstdint>
#include <memory>

#include "../examples/qwen2.hpp"

namespace {

using molora::Index;

qwen2::Config bench_config() {
  qwen2::Config c;
  c.vocab_size = 32000;
  c.hidden_size = 1024;
  c.intermediate_size = 2816;
  c.num_hidden_layers = 24;
  c.num_attention_heads = 16;
  c.num_key_value_heads = 16;
  c.head_dim = 64;
  c.rope_theta = 1e6;
  c.tie_word_embeddings = true;  // as Qwen1.5-0.5B
  return c;
}

// Random weights: uniform with the variance of N(0, 1/cols) (norm weights near 1), from a
// 64-bit LCG per tensor so 400 M values fill in seconds.
struct RandomWeights {
  bool bf16 = false;  // projection weights rounded to bf16 (embedding, norms stay float)

  static std::uint64_t seed_of(const std::string& name) {
    std::uint64_t h = 1469598103934665603ull;
    for (char ch : name) h = (h ^ static_cast<unsigned char>(ch)) * 1099511628211ull;
    return h;
  }
  static void fill(float* p, Index n, std::uint64_t seed, float scale, float offset) {
    std::uint64_t s = seed | 1;
    for (Index i = 0; i < n; ++i) {
      s = s * 6364136223846793005ull + 1442695040888963407ull;
      const float u = static_cast<float>(s >> 40) / static_cast<float>(1ull << 24);  // [0, 1)
      p[i] = offset + scale * (2 * u - 1);
    }
  }
  qwen2::Matrix matrix(const std::string& name, Index rows, Index cols) const {
    qwen2::Matrix m(rows, cols);  // [rows, cols]
    fill(m.data(), m.size(), seed_of(name), std::sqrt(3.0f / static_cast<float>(cols)), 0);
    return m;
  }
  qwen2::WeightData weight(const std::string& name, Index rows, Index cols) const {
    qwen2::Matrix m = matrix(name, rows, cols);  // [rows, cols]
    if (!bf16) return qwen2::WeightData::owned(std::move(m));
    std::vector<molora::bf16> v(static_cast<std::size_t>(m.size()));  // [rows * cols]
    for (Index i = 0; i < m.size(); ++i) v[static_cast<std::size_t>(i)] = molora::to_bf16(m.data()[i]);
    return qwen2::WeightData::owned_bf16(std::move(v), rows, cols);
  }
  qwen2::Vec vector(const std::string& name, Index n) const {
    qwen2::Vec v(n);  // [n]
    const bool norm = name.find("norm") != std::string::npos;
    fill(v.data(), n, seed_of(name), norm ? 0.1f : 0.02f, norm ? 1.0f : 0.0f);
    return v;
  }
};

// The models, each built once when first used (about 1.36 GB of float projection weights,
// 0.68 GB in bf16, plus a float embedding table of 131 MB).
qwen2::Model& model(bool adapted, bool bf16 = false) {
  static std::unique_ptr<qwen2::Model> models[2][2];
  auto& m = models[adapted ? 1 : 0][bf16 ? 1 : 0];
  if (!m) {
    RandomWeights w;
    w.bf16 = bf16;
    m = std::make_unique<qwen2::Model>(bench_config(), w);
    if (adapted) {
      molora::Generator gen(7);
      const qwen2::Config& c = m->config();
      for (std::size_t l = 0; l < static_cast<std::size_t>(c.num_hidden_layers); ++l)
        for (std::size_t p = 0; p < 3; ++p) {
          molora::MoLoRAConfig mc;  // MING-MOE's defaults: E = 8, k = 2, r = 16, alpha = 32
          mc.in_features = p == 2 ? c.intermediate_size : c.hidden_size;
          mc.out_features = p == 2 ? c.hidden_size : c.intermediate_size;
          molora::MoLoRAAdapter<float> a(mc);
          a.init_default(gen);
          for (Index e = 0; e < mc.num_experts; ++e) {
            qwen2::Matrix b(mc.out_features, mc.rank);  // [out, r], non-zero so the experts work
            RandomWeights::fill(b.data(), b.size(), gen(), 0.01f, 0);
            a.set_expert_B(e, b);
          }
          m->attach(l, p, a);
        }
    }
  }
  return *m;
}

std::vector<int> tokens(Index n, int salt) {
  std::vector<int> t(static_cast<std::size_t>(n));
  for (Index i = 0; i < n; ++i) t[static_cast<std::size_t>(i)] = static_cast<int>((i * 7919 + salt * 104729) % 32000);
  return t;
}

void BM_prefill(benchmark::State& state) {
  qwen2::Model& m = model(state.range(0) != 0);
  const std::vector<int> prompt = tokens(128, 1);
  qwen2::KVCache cache;
  for (auto _ : state) {
    cache.clear();
    benchmark::DoNotOptimize(m.forward(prompt, cache).data());
  }
  state.counters["tokens/s"] =
      benchmark::Counter(128.0 * static_cast<double>(state.iterations()), benchmark::Counter::kIsRate);
}

// One decode step of `batch` sequences with contexts of 32, 40, 48, 56 tokens (each step
// rewinds the caches, so every step sees the same context lengths).
void BM_decode(benchmark::State& state) {
  qwen2::Model& m = model(state.range(0) != 0, state.range(1) != 0);
  const std::size_t batch = static_cast<std::size_t>(state.range(2));
  std::vector<qwen2::KVCache> caches(batch);
  std::vector<qwen2::KVCache*> ptrs;
  std::vector<std::vector<int>> prompts, next;
  for (std::size_t s = 0; s < batch; ++s) {
    ptrs.push_back(&caches[s]);
    prompts.push_back(tokens(32 + 8 * static_cast<Index>(s), static_cast<int>(s) + 2));
    next.push_back({static_cast<int>(s) + 11});
  }
  m.forward(prompts, ptrs);
  for (auto _ : state) {
    for (std::size_t s = 0; s < batch; ++s) caches[s].length = static_cast<Index>(prompts[s].size());
    benchmark::DoNotOptimize(m.forward(next, ptrs).data());
  }
  state.counters["tokens/s"] = benchmark::Counter(static_cast<double>(batch) * static_cast<double>(state.iterations()),
                                                  benchmark::Counter::kIsRate);
}

// Reads every projection weight and the LM head of the plain model once (8-byte words, summed
// so the reads cannot be dropped), after writing a 256 MB buffer outside the timing so that
// nothing of the weights is left in the caches. tokens/s is the bound a decode step cannot
// beat at batch 1; GB/s the bandwidth one thread reached.
void BM_read_bound(benchmark::State& state) {
  const qwen2::Model& m = model(false, state.range(0) != 0);
  std::vector<std::uint64_t> flush(std::size_t(32) << 20);  // 256 MB
  std::uint64_t salt = 0;
  for (auto _ : state) {
    state.PauseTiming();
    for (std::size_t i = 0; i < flush.size(); i += 8) flush[i] = ++salt;
    benchmark::ClobberMemory();
    state.ResumeTiming();
    std::uint64_t acc[4] = {0, 0, 0, 0};
    m.for_each_projection_weight([&](const void* p, std::size_t bytes) {
      const auto* w = static_cast<const std::uint64_t*>(p);
      const std::size_t n = bytes / 8;
      std::size_t i = 0;
      for (; i + 4 <= n; i += 4) {
        acc[0] += w[i];
        acc[1] += w[i + 1];
        acc[2] += w[i + 2];
        acc[3] += w[i + 3];
      }
      for (; i < n; ++i) acc[0] += w[i];
    });
    benchmark::DoNotOptimize(acc[0] + acc[1] + acc[2] + acc[3]);
  }
  const double bytes = static_cast<double>(m.projection_bytes());
  state.counters["tokens/s"] = benchmark::Counter(static_cast<double>(state.iterations()), benchmark::Counter::kIsRate);
  state.counters["GB/s"] =
      benchmark::Counter(bytes * static_cast<double>(state.iterations()) / 1e9, benchmark::Counter::kIsRate);
  state.counters["MB"] = bytes / 1e6;
}

}  // namespace

BENCHMARK(BM_prefill)->ArgName("adapter")->Arg(0)->Arg(1)->Unit(benchmark::kMillisecond)->Iterations(4);
BENCHMARK(BM_decode)
    ->ArgNames({"adapter", "bf16", "batch"})
    ->Args({0, 0, 1})
    ->Args({1, 0, 1})
    ->Args({0, 1, 1})
    ->Args({1, 1, 1})
    ->Args({0, 0, 4})
    ->Args({1, 0, 4})
    ->Args({0, 1, 4})
    ->Args({1, 1, 4})
    ->Unit(benchmark::kMillisecond)
    ->Iterations(20);
BENCHMARK(BM_read_bound)->ArgName("bf16")->Arg(0)->Arg(1)->Unit(benchmark::kMillisecond)->Iterations(10);

BENCHMARK_MAIN();
