// The Qwen2 decoder of examples/qwen2.hpp at a Qwen1.5-0.5B-like shape (hidden 1024, 24
// layers, 16 heads, intermediate 2816, vocab 32000), random weights made in memory, with and
// without MING-MOE adapters (E = 8, k = 2, r = 16) on every MLP projection: prefill tokens/s
// (prompt 128) and decode tokens/s at batch 1 and 4, with the projection weights in float or
// kept in bf16 (as a BF16 checkpoint is kept), one OpenMP thread or two; the read bound: the
// time to read once the bytes of every projection weight and the LM head (what one decode
// step must read), cold (the caches flushed before each read); and the prefill projections'
// GFLOP/s beside the FMA peak of the widest ISA the kernels dispatch to, measured in the same
// process, so their ratio is one run's. tools/bench_qwen2_peers.py makes the same weights for
// PyTorch; docs/benchmarks.md has the figures.
//
// Arguments: adapter (0 plain, 1 MING-MOE), bf16 (0 float weights, 1 bf16 weights and bf16
// routers and experts), threads
// (2 only in the OpenMP build); decode also the batch size. Times are wall time ("Time") and
// the CPU time of the whole process, every thread ("CPU"); rates are per wall second.
// BM_adapter_cost times plain and adapted decode steps alternately in one loop (the
// adapters' cost as one run's ratio): one adapted model with its adapters switched off and
// on, so both steps read the same base weights from the same memory.
#include <benchmark/benchmark.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#ifdef MOLORA_USE_OPENMP
#include <omp.h>
#endif

#include "../examples/qwen2.hpp"
#include "bench_util.hpp"
#include "fma_peak.hpp"

namespace {

using bench_peak::fma_loop_threads;
using bench_peak::measure_fma_peak;
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
          if (bf16)  // as a BF16 checkpoint keeps them (the example loads such a file so)
            m->attach(l, p, molora::convert_adapter<molora::bf16>(a));
          else
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

// The OpenMP threads the layers use for the rest of a benchmark (1 without OpenMP).
void use_threads(benchmark::State& state, Index threads) {
#ifdef MOLORA_USE_OPENMP
  (void)state;
  omp_set_num_threads(static_cast<int>(threads));
#else
  if (threads != 1) state.SkipWithError("threads > 1 needs the OpenMP build (-DMOLORA_OPENMP=ON)");
#endif
}

void BM_fma_peak(benchmark::State& state) {
  const Index threads = state.range(0);
  use_threads(state, threads);
  const std::string isa = molora::kernels::active_isa();
  double flop = 0;
  for (auto _ : state) flop += fma_loop_threads(isa, 1L << 20, threads);
  state.SetLabel(isa);
  state.counters["GFLOP/s"] = benchmark::Counter(flop / 1e9, benchmark::Counter::kIsRate);
}

// ---- prefill ----------------------------------------------------------------------------------

// Multiply-adds of every projection (attention q/k/v/o, MLP gate/up/down, the LM head) for
// one token: the useful work of a prefill's products, not counting attention or the adapters.
double projection_macs_per_token(const qwen2::Model& m) {
  double macs = static_cast<double>(m.lm_head().rows() * m.lm_head().cols());
  for (const qwen2::Model::Layer& L : m.layers()) {
    for (const qwen2::Projection* p : {&L.q, &L.k, &L.v, &L.o}) macs += static_cast<double>(p->rows() * p->cols());
    for (const qwen2::Projection& p : L.mlp) macs += static_cast<double>(p.rows() * p.cols());
  }
  return macs;
}

constexpr Index kPrompt = 128;

// One 128-token prompt through the whole model. GFLOP/s counts only the projections' work,
// over the whole prefill's time (attention, norms and the adapters included in the time).
void BM_prefill(benchmark::State& state) {
  qwen2::Model& m = model(state.range(0) != 0, state.range(1) != 0);
  use_threads(state, state.range(2));
  const std::vector<int> prompt = tokens(kPrompt, 1);
  qwen2::KVCache cache;
  m.forward(prompt, cache);  // warm-up: the cache and the workspaces reach their size
  for (auto _ : state) {
    cache.clear();
    benchmark::DoNotOptimize(m.forward(prompt, cache).data());
  }
  const double it = static_cast<double>(state.iterations());
  state.counters["tokens/s"] = benchmark::Counter(static_cast<double>(kPrompt) * it, benchmark::Counter::kIsRate);
  state.counters["GFLOP/s"] = benchmark::Counter(2.0 * projection_macs_per_token(m) * static_cast<double>(kPrompt) * it / 1e9,
                                                 benchmark::Counter::kIsRate);
}

// The prefill's projections alone: every layer's seven products and the LM head of the plain
// model over 128 rows, as prefill runs them (the same layers and weights), then the FMA peak
// with as many threads. of_peak = projections' GFLOP/s / peak GFLOP/s, both wall time,
// measured back to back. (128 rows go to Eigen's GEMM, compiled for the build's ISA: in a
// build without -march=native that is below the dispatched ISA whose peak is measured.)
void BM_prefill_projections(benchmark::State& state) {
  const qwen2::Model& m = model(false, state.range(0) != 0);
  const Index threads = state.range(1);
  use_threads(state, threads);
  const qwen2::Config& c = m.config();
  qwen2::Matrix x(kPrompt, c.hidden_size), xi(kPrompt, c.intermediate_size), y;  // [T, H], [T, I]
  RandomWeights::fill(x.data(), x.size(), 3, 1.0f, 0);
  RandomWeights::fill(xi.data(), xi.size(), 5, 1.0f, 0);
  molora::MoLoRAWorkspace<float> ws;
  double seconds = 0;
  for (auto _ : state) {
    const auto t0 = std::chrono::steady_clock::now();
    for (const qwen2::Model::Layer& L : m.layers()) {
      for (const qwen2::Projection* p : {&L.q, &L.k, &L.v, &L.o, &L.mlp[0], &L.mlp[1]}) p->forward(x, y, ws);
      L.mlp[2].forward(xi, y, ws);
    }
    m.lm_head().forward(x, y, ws);
    benchmark::DoNotOptimize(y.data());
    seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  }
  const double flop = 2.0 * projection_macs_per_token(m) * static_cast<double>(kPrompt) *
                      static_cast<double>(state.iterations());
  const double gflops = flop / seconds / 1e9, peak = measure_fma_peak(threads);
  state.SetLabel(molora::kernels::active_isa());
  state.counters["GFLOP/s"] = gflops;
  state.counters["peak_GFLOP/s"] = peak;
  state.counters["of_peak"] = gflops / peak;
}

// ---- decode ------------------------------------------------------------------------------------

// Reads every projection weight and the LM head of m once (8-byte words, summed so the reads
// cannot be dropped; each buffer split between the threads); returns the sum.
std::uint64_t read_weights(const qwen2::Model& m) {
  std::uint64_t total = 0;
  m.for_each_projection_weight([&](const void* p, std::size_t bytes) {
    const auto* w = static_cast<const std::uint64_t*>(p);
    const auto n = static_cast<std::int64_t>(bytes / 8);
    std::uint64_t sum = 0;
#ifdef MOLORA_USE_OPENMP
#pragma omp parallel for schedule(static) reduction(+ : sum)
#endif
    for (std::int64_t i = 0; i < n; ++i) sum += w[i];
    total += sum;
  });
  return total;
}

double routed_adapter_bytes(const qwen2::Model& m);

// One decode step of `batch` sequences with contexts of 32, 40, 48, 56 tokens (each step
// rewinds the caches, so every step sees the same context lengths).
void BM_decode(benchmark::State& state) {
  qwen2::Model& m = model(state.range(0) != 0, state.range(1) != 0);
  const std::size_t batch = static_cast<std::size_t>(state.range(2));
  use_threads(state, state.range(3));
  std::vector<qwen2::KVCache> caches(batch);
  std::vector<qwen2::KVCache*> ptrs;
  std::vector<std::vector<int>> prompts, next;
  for (std::size_t s = 0; s < batch; ++s) {
    ptrs.push_back(&caches[s]);
    prompts.push_back(tokens(32 + 8 * static_cast<Index>(s), static_cast<int>(s) + 2));
    next.push_back({static_cast<int>(s) + 11});
  }
  m.forward(prompts, ptrs);
  // At batch 1 each step is paired with a read of the bytes it needs, just before it (outside
  // the timing): the weights stream through caches far smaller than them, so both are cold.
  // over_read_bound = the steps' time over the reads' (scaled to the adapted bytes when
  // adapted), paired step by step so that the machine's drift hits both.
  const bool pair = batch == 1;
  double step_s = 0, read_s = 0;
  for (auto _ : state) {
    if (pair) {
      state.PauseTiming();
      const auto r0 = std::chrono::steady_clock::now();
      benchmark::DoNotOptimize(read_weights(m));
      read_s += std::chrono::duration<double>(std::chrono::steady_clock::now() - r0).count();
      state.ResumeTiming();
    }
    const auto t0 = std::chrono::steady_clock::now();
    for (std::size_t s = 0; s < batch; ++s) caches[s].length = static_cast<Index>(prompts[s].size());
    benchmark::DoNotOptimize(m.forward(next, ptrs).data());
    step_s += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  }
  state.counters["tokens/s"] = benchmark::Counter(static_cast<double>(batch) * static_cast<double>(state.iterations()),
                                                  benchmark::Counter::kIsRate);
  if (pair) {
    const double bytes = static_cast<double>(m.projection_bytes());
    const double needed = bytes + (m.adapted() ? routed_adapter_bytes(m) : 0.0);
    state.counters["over_read_bound"] = step_s / (read_s * needed / bytes);
    state.counters["read_GB/s"] = bytes * static_cast<double>(state.iterations()) / read_s / 1e9;
  }
}

// The adapters' cost in one run: a decode step of the plain model and one of the adapted model
// (the same random base weights, each model its own copy, so both steps read their weights
// cold) alternately, the order swapped every iteration so that neither always follows the
// other. cost_pct = median over iterations of (adapted step / plain step) - 1, in percent:
// the machine's drift moves both steps of a pair alike. The reported time is the pair's.
void BM_adapter_cost(benchmark::State& state) {
  const bool bf16 = state.range(0) != 0;
  qwen2::Model& m = model(true, bf16);
  const std::size_t batch = static_cast<std::size_t>(state.range(1));
  use_threads(state, state.range(2));
  // A plain step is the adapted model with its adapters off (Model::enable_adapters): two
  // models would read two copies of the weights, whose places in memory moved a paired step
  // by +-6-10 % (docs/benchmarks.md), more than the adapters' routed bytes.
  struct Run {
    bool adapters;
    std::vector<qwen2::KVCache> caches;
    std::vector<qwen2::KVCache*> ptrs;
  };
  std::vector<std::vector<int>> prompts, next;
  for (std::size_t s = 0; s < batch; ++s) {
    prompts.push_back(tokens(32 + 8 * static_cast<Index>(s), static_cast<int>(s) + 2));
    next.push_back({static_cast<int>(s) + 11});
  }
  Run runs[2] = {{false, std::vector<qwen2::KVCache>(batch), {}}, {true, std::vector<qwen2::KVCache>(batch), {}}};
  for (Run& r : runs) {
    for (qwen2::KVCache& c : r.caches) r.ptrs.push_back(&c);
    m.enable_adapters(r.adapters);
    m.forward(prompts, r.ptrs);
  }
  auto step = [&](Run& r) {
    m.enable_adapters(r.adapters);
    const auto t0 = std::chrono::steady_clock::now();
    for (std::size_t s = 0; s < batch; ++s) r.caches[s].length = static_cast<Index>(prompts[s].size());
    benchmark::DoNotOptimize(m.forward(next, r.ptrs).data());
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  };
  std::vector<double> ratio, t_plain, t_adapted;
  bool plain_first = true;
  for (auto _ : state) {
    double tp = 0, ta = 0;
    if (plain_first) {
      tp = step(runs[0]);
      ta = step(runs[1]);
    } else {
      ta = step(runs[1]);
      tp = step(runs[0]);
    }
    plain_first = !plain_first;
    ratio.push_back(ta / tp);
    t_plain.push_back(tp);
    t_adapted.push_back(ta);
  }
  m.enable_adapters(true);
  using bench_util::median;
  state.counters["cost_pct"] = 100.0 * (median(ratio) - 1.0);
  state.counters["plain_ms"] = 1e3 * median(t_plain);
  state.counters["adapted_ms"] = 1e3 * median(t_adapted);
}

// Bytes one token at batch 1 reads of the adapters the benchmark attaches (MoLoRAConfig's
// defaults; router weight and experts float, or bf16 beside bf16 weights; the router's bias
// float): per MLP projection the router [E, in] + [E], and the A [r, in] and B [out, r] of
// the k experts the token picks.
double routed_adapter_bytes(const qwen2::Model& m) {
  const molora::MoLoRAConfig mc;
  const double E = static_cast<double>(mc.num_experts), k = static_cast<double>(mc.top_k);
  const double r = static_cast<double>(mc.rank);
  double b = 0;
  for (const qwen2::Model::Layer& L : m.layers())
    for (const qwen2::Projection& p : L.mlp) {
      const double in = static_cast<double>(p.cols()), out = static_cast<double>(p.rows());
      const double w = std::string(p.adapter_dtype()) == "bf16" ? 2.0 : 4.0;
      b += w * (E * in + k * r * (in + out)) + 4.0 * E;
    }
  return b;
}

// Reads every projection weight and the LM head of the plain model once (read_weights), after
// writing a 256 MB buffer outside the timing so that nothing of the weights is left in the caches.
// tokens/s is the bound a plain decode step cannot beat at batch 1; GB/s the bandwidth the
// threads reached; adapted_tokens/s the same bandwidth over the bytes plus what an adapted
// token also reads (routers and the routed experts' A and B).
void BM_read_bound(benchmark::State& state) {
  const qwen2::Model& m = model(false, state.range(0) != 0);
  use_threads(state, state.range(1));
  std::vector<std::uint64_t> flush(std::size_t(32) << 20);  // 256 MB
  std::uint64_t salt = 0;
  for (auto _ : state) {
    state.PauseTiming();
    for (std::size_t i = 0; i < flush.size(); i += 8) flush[i] = ++salt;
    benchmark::ClobberMemory();
    state.ResumeTiming();
    benchmark::DoNotOptimize(read_weights(m));
  }
  const double bytes = static_cast<double>(m.projection_bytes());
  const double adapted = bytes + routed_adapter_bytes(m);
  const double it = static_cast<double>(state.iterations());
  state.counters["tokens/s"] = benchmark::Counter(it, benchmark::Counter::kIsRate);
  state.counters["adapted_tokens/s"] = benchmark::Counter(it * bytes / adapted, benchmark::Counter::kIsRate);
  state.counters["GB/s"] = benchmark::Counter(bytes * it / 1e9, benchmark::Counter::kIsRate);
  state.counters["MB"] = bytes / 1e6;
  state.counters["adapted_MB"] = adapted / 1e6;
}

// ---- one projection shape alone ---------------------------------------------------------------

// Sums the 8-byte words of [p, p + bytes) (one thread): a plain read of a weight.
std::uint64_t read_bytes(const void* p, std::size_t bytes) {
  const auto* w = static_cast<const std::uint64_t*>(p);
  std::uint64_t sum = 0;
  for (std::size_t i = 0; i < bytes / 8; ++i) sum += w[i];
  return sum;
}

// Bytes of weight copies a cold run rotates over: far past the 32 MB L3 of this machine.
constexpr double kShapeColdBytes = 384.0 * (1 << 20);

// shape/rows/cols/bf16/T/skinny: one decoder projection alone (molora::Linear<float, W> over
// a [rows, cols] weight, float or bf16, as the example's plain layers are), cold: n copies of
// the weight (n odd, their bytes past kShapeColdBytes), iteration i runs forward on copy 2i
// mod n and then reads copy 2i + 1 mod n (read_bytes), each timed; over_read = the forwards'
// time over the reads'. skinny = 1 forces the skinny kernel (T = 1 with float weights
// otherwise takes Eigen's GEMV). One thread. us = median forward time per call.
void BM_shape(benchmark::State& state) {
  const Index rows = state.range(0), cols = state.range(1), T = state.range(3);
  const bool bf16 = state.range(2) != 0, skinny = state.range(4) != 0;
  use_threads(state, 1);
  const std::size_t bytes = static_cast<std::size_t>(rows * cols) * (bf16 ? 2 : 4);
  std::size_t n = std::max<std::size_t>(3, static_cast<std::size_t>(kShapeColdBytes / static_cast<double>(bytes)) + 1);
  if (n % 2 == 0) ++n;
  qwen2::Matrix w0(rows, cols);  // [rows, cols]
  RandomWeights::fill(w0.data(), w0.size(), 17, std::sqrt(3.0f / static_cast<float>(cols)), 0);
  std::vector<molora::bf16> b0;
  if (bf16) {
    b0.resize(static_cast<std::size_t>(w0.size()));
    for (Index i = 0; i < w0.size(); ++i) b0[static_cast<std::size_t>(i)] = molora::to_bf16(w0.data()[i]);
  }
  std::vector<std::vector<char>> copies(n);
  std::vector<molora::Linear<float>> f32;
  std::vector<molora::Linear<float, molora::bf16>> b16;
  for (std::size_t c = 0; c < n; ++c) {
    copies[c].resize(bytes);
    std::memcpy(copies[c].data(), bf16 ? static_cast<const void*>(b0.data()) : static_cast<const void*>(w0.data()),
                bytes);
    if (bf16) {
      b16.emplace_back(cols, rows);
      b16.back().wrap_weight(reinterpret_cast<const molora::bf16*>(copies[c].data()), rows, cols);
      if (skinny) b16.back().set_strategy(molora::BaseStrategy::skinny);
    } else {
      f32.emplace_back(cols, rows);
      f32.back().wrap_weight(reinterpret_cast<const float*>(copies[c].data()), rows, cols);
      if (skinny) f32.back().set_strategy(molora::BaseStrategy::skinny);
    }
  }
  qwen2::Matrix x(T, cols), y(T, rows);  // [T, cols], [T, rows]
  RandomWeights::fill(x.data(), x.size(), 19, 1.0f, 0);
  std::vector<double> fwd;
  double fwd_s = 0, read_s = 0;
  std::uint64_t sink = 0;
  std::size_t c = 0;
  for (auto _ : state) {
    const auto t0 = std::chrono::steady_clock::now();
    if (bf16)
      b16[c].forward(x, y);
    else
      f32[c].forward(x, y);
    benchmark::DoNotOptimize(y.data());
    const auto t1 = std::chrono::steady_clock::now();
    sink += read_bytes(copies[(c + 1) % n].data(), bytes);
    const auto t2 = std::chrono::steady_clock::now();
    fwd.push_back(std::chrono::duration<double>(t1 - t0).count());
    fwd_s += fwd.back();
    read_s += std::chrono::duration<double>(t2 - t1).count();
    c = (c + 2) % n;
  }
  benchmark::DoNotOptimize(sink);
  const double it = static_cast<double>(state.iterations());
  state.counters["us"] = 1e6 * bench_util::median(fwd);
  state.counters["read_us"] = 1e6 * read_s / it;
  state.counters["over_read"] = fwd_s / read_s;
  state.counters["GB/s"] = static_cast<double>(bytes) * it / fwd_s / 1e9;
  state.counters["read_GB/s"] = static_cast<double>(bytes) * it / read_s / 1e9;
}

void shape_args(benchmark::internal::Benchmark* b) {
  const Index shapes[][2] = {{1024, 1024}, {2816, 1024}, {1024, 2816}, {32000, 1024}};
  for (Index bf16 : {0, 1})
    for (Index T : {1, 4})
      for (const auto& s : shapes) {
        b->Args({s[0], s[1], bf16, T, 0});
        if (T == 1 && bf16 == 0) b->Args({s[0], s[1], bf16, T, 1});
      }
}

#ifdef MOLORA_USE_OPENMP
constexpr Index kMaxThreads = 2;
#else
constexpr Index kMaxThreads = 1;
#endif

void fma_args(benchmark::internal::Benchmark* b) {
  for (Index t = 1; t <= kMaxThreads; ++t) b->Args({t});
}
void prefill_args(benchmark::internal::Benchmark* b) {
  for (Index t = 1; t <= kMaxThreads; ++t)
    for (Index bf16 : {0, 1})
      for (Index adapter : {0, 1}) b->Args({adapter, bf16, t});
}
void projection_args(benchmark::internal::Benchmark* b) {
  for (Index t = 1; t <= kMaxThreads; ++t)
    for (Index bf16 : {0, 1}) b->Args({bf16, t});
}
void decode_args(benchmark::internal::Benchmark* b) {
  for (Index t = 1; t <= kMaxThreads; ++t)
    for (Index batch : {1, 4})
      for (Index bf16 : {0, 1})
        for (Index adapter : {0, 1}) b->Args({adapter, bf16, batch, t});
}
void cost_args(benchmark::internal::Benchmark* b) {
  for (Index t = 1; t <= kMaxThreads; ++t)
    for (Index batch : {1, 4})
      for (Index bf16 : {0, 1}) b->Args({bf16, batch, t});
}
void read_args(benchmark::internal::Benchmark* b) {
  for (Index t = 1; t <= kMaxThreads; ++t)
    for (Index bf16 : {0, 1}) b->Args({bf16, t});
}

}  // namespace

// Wall time for the rates (a process's threads run at once), and the CPU time of every thread.
BENCHMARK(BM_fma_peak)->ArgName("threads")->Apply(fma_args)->UseRealTime()->MeasureProcessCPUTime()->Iterations(20);
BENCHMARK(BM_prefill_projections)
    ->ArgNames({"bf16", "threads"})
    ->Apply(projection_args)
    ->UseRealTime()
    ->MeasureProcessCPUTime()
    ->Unit(benchmark::kMillisecond)
    ->Iterations(3);
BENCHMARK(BM_prefill)
    ->ArgNames({"adapter", "bf16", "threads"})
    ->Apply(prefill_args)
    ->UseRealTime()
    ->MeasureProcessCPUTime()
    ->Unit(benchmark::kMillisecond)
    ->Iterations(3);
BENCHMARK(BM_decode)
    ->ArgNames({"adapter", "bf16", "batch", "threads"})
    ->Apply(decode_args)
    ->UseRealTime()
    ->MeasureProcessCPUTime()
    ->Unit(benchmark::kMillisecond)
    ->Iterations(20);
BENCHMARK(BM_adapter_cost)
    ->ArgNames({"bf16", "batch", "threads"})
    ->Apply(cost_args)
    ->UseRealTime()
    ->MeasureProcessCPUTime()
    ->Unit(benchmark::kMillisecond)
    ->Iterations(40);
BENCHMARK(BM_shape)
    ->ArgNames({"rows", "cols", "bf16", "T", "skinny"})
    ->Apply(shape_args)
    ->UseRealTime()
    ->Unit(benchmark::kMicrosecond)
    ->MinTime(0.5);
BENCHMARK(BM_read_bound)
    ->ArgNames({"bf16", "threads"})
    ->Apply(read_args)
    ->UseRealTime()
    ->MeasureProcessCPUTime()
    ->Unit(benchmark::kMillisecond)
    ->Iterations(10);

// prefill2 ---------------------------------------------------------------------------------------

namespace {

// The prefill's projections of one kind over 128 rows, every layer's (kind 0: q/k/v/o, 1024 ->
// 1024; 1: gate/up, 1024 -> 2816; 2: down, 2816 -> 1024; 3: the LM head, 1024 -> 32000, once),
// as BM_prefill_projections runs them: which shapes lose at two threads. of_peak as there.
// warm = 1: layer 0's projections of the kind only, their weights in the caches.
void BM_projection_kind(benchmark::State& state) {
  const Index kind = state.range(0);
  const qwen2::Model& m = model(false, state.range(1) != 0);
  const Index threads = state.range(2);
  use_threads(state, threads);
  const qwen2::Config& c = m.config();
  qwen2::Matrix x(kPrompt, c.hidden_size), xi(kPrompt, c.intermediate_size), y;  // [T, H], [T, I]
  RandomWeights::fill(x.data(), x.size(), 3, 1.0f, 0);
  RandomWeights::fill(xi.data(), xi.size(), 5, 1.0f, 0);
  molora::MoLoRAWorkspace<float> ws;
  std::vector<const qwen2::Projection*> ps;
  const bool warm = state.range(3) != 0;  // layer 0's weights only, over and over (cached)
  for (const qwen2::Model::Layer& L : m.layers()) {
    if (warm && &L != &m.layers().front()) break;
    if (kind == 0) ps.insert(ps.end(), {&L.q, &L.k, &L.v, &L.o});
    if (kind == 1) ps.insert(ps.end(), {&L.mlp[0], &L.mlp[1]});
    if (kind == 2) ps.push_back(&L.mlp[2]);
  }
  if (kind == 3) ps.push_back(&m.lm_head());
  double macs = 0;
  for (const qwen2::Projection* p : ps) macs += static_cast<double>(p->rows() * p->cols());
  for (const qwen2::Projection* p : ps) p->forward(kind == 2 ? xi : x, y, ws);  // warm-up
  double seconds = 0;
  for (auto _ : state) {
    const auto t0 = std::chrono::steady_clock::now();
    for (const qwen2::Projection* p : ps) p->forward(kind == 2 ? xi : x, y, ws);
    benchmark::DoNotOptimize(y.data());
    seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  }
  const double gflops = 2.0 * macs * static_cast<double>(kPrompt) * static_cast<double>(state.iterations()) / seconds / 1e9;
  state.SetLabel(molora::kernels::active_isa());
  state.counters["GFLOP/s"] = gflops;
  // The peak measured right after each cell, as BM_prefill_projections does: measured once
  // per process, one moment when the host took the second vCPU set every two-thread cell's
  // of_peak against a one-core peak.
  state.counters["of_peak"] = gflops / measure_fma_peak(threads);
  state.counters["ms_per_call"] = 1e3 * seconds / static_cast<double>(state.iterations() * ps.size());
}

void kind_args(benchmark::internal::Benchmark* b) {
  for (Index bf16 : {0, 1})
    for (Index kind : {0, 1, 2, 3})
      for (Index t = 1; t <= kMaxThreads; ++t)
        for (Index warm : {0, 1}) b->Args({kind, bf16, t, warm});
}

}  // namespace

BENCHMARK(BM_projection_kind)
    ->ArgNames({"kind", "bf16", "threads", "warm"})
    ->Apply(kind_args)
    ->UseRealTime()
    ->MeasureProcessCPUTime()
    ->Unit(benchmark::kMillisecond)
    ->Iterations(5);

// dec14 -------------------------------------------------------------------------------------------

namespace {

// The one-token f32 product's row orders, each over one decoder shape, cold: n copies of a
// float weight [rows, cols] (past kShapeColdBytes), every iteration runs each variant once on
// its own copy, each forward followed by a plain read (read_bytes) of another copy, both
// timed; over_read_V = variant V's time over the reads' time (all reads of the run, so the
// variants share one denominator and their ratios are one run's). Variants (the kernels'
// templates at the build's ISA, called directly, one thread): 0 Eigen's GEMV as
// base_product's T == 1 branch runs it; 1 the skinny kernel's 8 rows side by side; 2 one row
// after the other (skinny_stream_rows<1>); 3 one row after the other with the software
// prefetch kSkinnyPrefetch ahead; 4 4 rows side by side; 5 pairs of rows one after the other.
// The order of the variants rotates every iteration.
constexpr int kRouteVariants = 6;

void run_route_variant(int v, const float* w, Index rows, Index cols, const float* x, float* y) {
  using A = molora::kernels::default_arch;
  namespace kd = molora::kernels::detail;
  const float* none = nullptr;      // no bias
  alignas(64) float spill[8 * 16];  // unused for one token (one pass along `in`)
  switch (v) {
    case 0: {
      Eigen::Map<const molora::RowMatrix<float>> xm(x, 1, cols);  // [1, cols]
      Eigen::Map<molora::RowMatrix<float>> ym(y, 1, rows);        // [1, rows]
      ym.noalias() = xm * Eigen::Map<const molora::RowMatrix<float>>(w, rows, cols).transpose();
      break;
    }
    case 1: kd::skinny_rows_range<8, 1, 0, A>(w, cols, cols, x, cols, 1, none, y, rows, 0, rows, spill); break;
    case 2: kd::skinny_stream_rows<1, A, 0>(w, cols, cols, x, cols, 1, none, y, rows, 0, rows); break;
    case 3:
      kd::skinny_stream_rows<1, A, molora::kernels::kSkinnyPrefetch>(w, cols, cols, x, cols, 1, none, y, rows, 0, rows);
      break;
    case 4: kd::skinny_rows_range<4, 1, 0, A>(w, cols, cols, x, cols, 1, none, y, rows, 0, rows, spill); break;
    default: kd::skinny_stream_rows<2, A, 0>(w, cols, cols, x, cols, 1, none, y, rows, 0, rows); break;
  }
}

void BM_route_shape(benchmark::State& state) {
  const Index rows = state.range(0), cols = state.range(1);
  use_threads(state, 1);
  const std::size_t bytes = static_cast<std::size_t>(rows * cols) * sizeof(float);
  std::size_t n = std::max<std::size_t>(kRouteVariants + 1,
                                        static_cast<std::size_t>(kShapeColdBytes / static_cast<double>(bytes)) + 1);
  if (n % 2 == 0) ++n;
  std::vector<qwen2::Matrix> copies(n, qwen2::Matrix(rows, cols));  // each [rows, cols]
  for (qwen2::Matrix& m : copies)
    RandomWeights::fill(m.data(), m.size(), 17, std::sqrt(3.0f / static_cast<float>(cols)), 0);
  qwen2::Matrix x(1, cols), y(1, rows);  // [1, cols], [1, rows]
  RandomWeights::fill(x.data(), x.size(), 19, 1.0f, 0);
  double fwd_s[kRouteVariants] = {}, read_s = 0;
  std::uint64_t sink = 0, reads = 0;
  std::size_t c = 0, it = 0;
  for (auto _ : state) {
    for (int k = 0; k < kRouteVariants; ++k) {
      const int v = static_cast<int>((it + static_cast<std::size_t>(k)) % kRouteVariants);
      const auto t0 = std::chrono::steady_clock::now();
      run_route_variant(v, copies[c].data(), rows, cols, x.data(), y.data());
      benchmark::DoNotOptimize(y.data());
      const auto t1 = std::chrono::steady_clock::now();
      sink += read_bytes(copies[(c + 1) % n].data(), bytes);
      const auto t2 = std::chrono::steady_clock::now();
      fwd_s[v] += std::chrono::duration<double>(t1 - t0).count();
      read_s += std::chrono::duration<double>(t2 - t1).count();
      ++reads;
      c = (c + 2) % n;
    }
    ++it;
  }
  benchmark::DoNotOptimize(sink);
  const double per_read = read_s / static_cast<double>(reads);
  const double iters = static_cast<double>(state.iterations());
  state.SetLabel(molora::kernels::isa_name<molora::kernels::default_arch>());
  state.counters["read_us"] = 1e6 * per_read;
  for (int v = 0; v < kRouteVariants; ++v)
    state.counters["over_read_" + std::to_string(v)] = fwd_s[v] / iters / per_read;
}

// A batch-1 f32 decode step of the adapted model with every projection's base product run
// by `automatic` (route 0) and by `skinny` (route 1) alternately in one loop, each step
// paired with a read of the bytes it needs just before it, as BM_decode pairs them;
// over_read_R = route R's steps over their reads (scaled to the adapted bytes), skinny_over_auto
// the steps' time ratio. One thread.
void BM_decode_routes(benchmark::State& state) {
  qwen2::Model& m = model(true, false);
  use_threads(state, 1);
  std::vector<qwen2::KVCache> caches(1);
  std::vector<qwen2::KVCache*> ptrs{&caches[0]};
  const std::vector<std::vector<int>> prompts{tokens(32, 2)}, next{{11}};
  m.forward(prompts, ptrs);
  const molora::BaseStrategy routes[2] = {molora::BaseStrategy::automatic, molora::BaseStrategy::skinny};
  double step_s[2] = {}, read_s[2] = {};
  std::size_t it = 0;
  for (auto _ : state) {
    for (int k = 0; k < 2; ++k) {
      const int r = static_cast<int>((it + static_cast<std::size_t>(k)) % 2);
      m.set_base_strategy(routes[r]);
      const auto r0 = std::chrono::steady_clock::now();
      benchmark::DoNotOptimize(read_weights(m));
      const auto t0 = std::chrono::steady_clock::now();
      caches[0].length = static_cast<Index>(prompts[0].size());
      benchmark::DoNotOptimize(m.forward(next, ptrs).data());
      const auto t1 = std::chrono::steady_clock::now();
      read_s[r] += std::chrono::duration<double>(t0 - r0).count();
      step_s[r] += std::chrono::duration<double>(t1 - t0).count();
    }
    ++it;
  }
  m.set_base_strategy(molora::BaseStrategy::automatic);
  const double bytes = static_cast<double>(m.projection_bytes());
  const double scale = (bytes + routed_adapter_bytes(m)) / bytes;
  const double iters = static_cast<double>(state.iterations());
  for (int r = 0; r < 2; ++r) {
    state.counters["over_read_" + std::to_string(r)] = step_s[r] / (read_s[r] * scale);
    state.counters["ms_" + std::to_string(r)] = 1e3 * step_s[r] / iters;
  }
  state.counters["skinny_over_auto"] = step_s[1] / step_s[0];
}

#ifdef MOLORA_USE_OPENMP
// The prefill's projections of the plain f32 model over 128 rows at two threads, two ways
// alternately in one loop: as BM_prefill_projections runs them (each layer's forward, one
// OpenMP region per product, the layer's checks between them on the master thread) and in one
// region for the whole pass (each thread calls kernels::gemm_product on its own outputs, cut
// as split_ranges cuts them, a barrier after every product, as a model whose products depend
// on each other would need). of_peak_R as BM_prefill_projections' over the FMA peak of two
// threads (measured once per process); region_over_calls = the one region's time over the
// calls'. What one region per pass would gain at most.
void BM_prefill_regions(benchmark::State& state) {
  const qwen2::Model& m = model(false, false);
  constexpr Index kThreads = 2;
  use_threads(state, kThreads);
  const qwen2::Config& c = m.config();
  qwen2::Matrix x(kPrompt, c.hidden_size), xi(kPrompt, c.intermediate_size), y;  // [T, H], [T, I]
  RandomWeights::fill(x.data(), x.size(), 3, 1.0f, 0);
  RandomWeights::fill(xi.data(), xi.size(), 5, 1.0f, 0);
  molora::MoLoRAWorkspace<float> ws;
  std::vector<const qwen2::Projection*> ps;
  for (const qwen2::Model::Layer& L : m.layers())
    ps.insert(ps.end(), {&L.q, &L.k, &L.v, &L.o, &L.mlp[0], &L.mlp[1], &L.mlp[2]});
  ps.push_back(&m.lm_head());
  std::vector<float> yr(static_cast<std::size_t>(kPrompt * c.vocab_size));  // [T, out] per product
  auto calls = [&] {
    for (const qwen2::Projection* p : ps) p->forward(p->cols() == c.hidden_size ? x : xi, y, ws);
    benchmark::DoNotOptimize(y.data());
  };
  auto region = [&] {
#pragma omp parallel num_threads(static_cast<int>(kThreads))
    {
      thread_local std::vector<float> scratch;
      scratch.resize(static_cast<std::size_t>(molora::kernels::gemm_scratch_size<float>()));
      const Index t = omp_get_thread_num(), P = omp_get_num_threads();
      for (const qwen2::Projection* p : ps) {
        const qwen2::Matrix& in = p->cols() == c.hidden_size ? x : xi;
        const Index out = p->rows(), o0 = out * t / P / 64 * 64, o1 = t + 1 == P ? out : out * (t + 1) / P / 64 * 64;
        const float* b = p->bias().size() > 0 ? p->bias().data() : nullptr;
        molora::kernels::gemm_product(molora::kernels::layer_arch{}, p->weight().f32, p->cols(), p->cols(), in.data(),
                                      in.cols(), kPrompt, b, yr.data(), out, o0, o1, scratch.data());  // [T, out]
#pragma omp barrier
      }
    }
    benchmark::DoNotOptimize(yr.data());
  };
  calls();  // warm-up: scratch and y at their sizes
  region();
  double secs[2] = {};
  std::size_t it = 0;
  for (auto _ : state) {
    for (int k = 0; k < 2; ++k) {
      const int w = static_cast<int>((it + static_cast<std::size_t>(k)) % 2);
      const auto t0 = std::chrono::steady_clock::now();
      if (w == 0)
        calls();
      else
        region();
      secs[w] += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    }
    ++it;
  }
  const double flop = 2.0 * projection_macs_per_token(m) * static_cast<double>(kPrompt) *
                      static_cast<double>(state.iterations());
  const double peak = measure_fma_peak(kThreads);  // right after the cell (see BM_projection_kind)
  state.counters["of_peak_calls"] = flop / secs[0] / 1e9 / peak;
  state.counters["of_peak_region"] = flop / secs[1] / 1e9 / peak;
  state.counters["region_over_calls"] = secs[1] / secs[0];
}
#endif

void route_shape_args(benchmark::internal::Benchmark* b) {
  for (const auto& s : {std::array<Index, 2>{1024, 1024}, {2816, 1024}, {1024, 2816}, {32000, 1024}})
    b->Args({s[0], s[1]});
}

}  // namespace

BENCHMARK(BM_route_shape)
    ->ArgNames({"rows", "cols"})
    ->Apply(route_shape_args)
    ->UseRealTime()
    ->Unit(benchmark::kMicrosecond)
    ->MinTime(0.5);
BENCHMARK(BM_decode_routes)->UseRealTime()->Unit(benchmark::kMillisecond)->Iterations(20);
#ifdef MOLORA_USE_OPENMP
BENCHMARK(BM_prefill_regions)->UseRealTime()->Unit(benchmark::kMillisecond)->Iterations(4);
#endif

BENCHMARK_MAIN();
