// molora's forward benchmarks (Google Benchmark). Every number the layer-level performance
// targets need comes out of this one binary in one run:
//   peak_fma                      this core's FMA peak (an FMA-chain kernel, same ISA flags)
//   read_bandwidth/KiB            one core's read bandwidth from L2 (1 MiB) and memory (64 MiB)
//   peak_share/in/out/T           fused experts' GFLOP/s over the FMA peak, both timed in one loop
//   decode_bound/in/out/T         eigen, fused and a plain read of their operands in one loop
//   base/in/out/T                 the base linear layer alone (Eigen GEMM)
//   adapter/S/in/out/E/k/r/T      MoLoRAAdapter::add_delta (router + gating + experts), S a Strategy
//   experts/S/in/out/E/k/r/T      the experts alone for a fixed routing (add_delta_routed)
//   ratio/S/in/out/T              MoLoRALinear::forward over forward_base, timed alternately in
//                                 one loop; counter `ratio` = median of the per-pair ratios
//   threads/S/in/out/T/n          the adapter with n OpenMP threads (OpenMP builds only)
//   threads_ratio/S/in/out/T/w    1 and 2 threads alternately in one loop; counter speedup
// Counters: tokens_per_s, GFLOPs (useful work: router 2*in*E and experts 2*k*r*(in+out) per
// token; the base's 2*in*out for base/ratio), weight_GBps (adapter/experts: bytes of the
// weights the call uses over its time), ratio, speedup (threads_ratio). Run:
//   bench_molora --benchmark_out=bench.json --benchmark_out_format=json

#include <benchmark/benchmark.h>

#include <algorithm>
#include <ctime>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include <molora/molora.hpp>

#if defined(MOLORA_USE_OPENMP)
#include <omp.h>
#endif

namespace {

using molora::Index;
using molora::Strategy;
using Mat = molora::RowMatrix<float>;

// Fast deterministic fill in [-scale, scale] (setRandom is slow for 45 M entries).
template <class Derived>
void fill(Eigen::MatrixBase<Derived>& m, std::uint64_t seed, float scale) {
  std::uint64_t s = seed * 0x9E3779B97F4A7C15ULL + 1;
  float* p = m.derived().data();
  for (Index i = 0; i < m.size(); ++i) {
    s = s * 6364136223846793005ULL + 1442695040888963407ULL;
    p[i] = scale * (static_cast<float>(static_cast<std::uint32_t>(s >> 40)) / 8388608.0f - 1.0f);
  }
}

struct Shape {
  Index in, out, E, k, r;
  bool operator<(const Shape& o) const {
    return std::tie(in, out, E, k, r) < std::tie(o.in, o.out, o.E, o.k, o.r);
  }
};

// The layer of the last shape asked for (one at a time: the 11008 ones hold 180 MB).
molora::MoLoRALinear<float>& layer_for(const Shape& s) {
  static std::unique_ptr<molora::MoLoRALinear<float>> cached;
  static Shape cached_shape{0, 0, 0, 0, 0};
  if (cached && !(cached_shape < s) && !(s < cached_shape)) return *cached;
  cached.reset();
  molora::MoLoRAConfig c;
  c.in_features = s.in;
  c.out_features = s.out;
  c.num_experts = s.E;
  c.top_k = s.k;
  c.rank = s.r;
  auto l = std::make_unique<molora::MoLoRALinear<float>>(c);
  Mat w(s.out, s.in);
  fill(w, 1, 0.02f);
  l->set_base_weight(w);
  Mat b(1, s.out);
  fill(b, 2, 0.02f);
  l->set_base_bias(b);
  auto& a = l->adapter();
  auto wr = a.router().mutable_weight();
  fill(wr, 3, 0.05f);
  auto A = a.mutable_stacked_A();
  fill(A, 4, 0.02f);
  auto B = a.mutable_stacked_B();
  fill(B, 5, 0.02f);
  cached = std::move(l);
  cached_shape = s;
  return *cached;
}

Mat tokens(Index T, Index in) {
  Mat x(T, in);
  fill(x, 7 + static_cast<std::uint64_t>(T), 1.0f);
  return x;
}

double adapter_flops(const Shape& s) { return 2.0 * double(s.in) * double(s.E) + 2.0 * double(s.k * s.r) * double(s.in + s.out); }
double expert_flops(const Shape& s) { return 2.0 * double(s.k * s.r) * double(s.in + s.out); }

// Bytes of weights one call reads at least once: the router's (adapter only) and those of
// the experts the routing of x uses. For decode (T = 1, 4) the call is bound by streaming
// them: counter weight_GBps = these bytes / time.
// Which experts the routing of x uses (1) or not (0).
std::vector<char> experts_used(const molora::MoLoRAAdapter<float>& a, const Mat& x) {
  molora::MoLoRAWorkspace<float> ws;
  const auto& routing = a.route_tokens(x, ws);
  std::vector<char> used(static_cast<std::size_t>(a.num_experts()), 0);
  for (Index t = 0; t < routing.num_tokens(); ++t)
    for (Index s = 0; s < routing.top_k(); ++s) used[static_cast<std::size_t>(routing.ids(t, s))] = 1;
  return used;
}

double weight_bytes(const molora::MoLoRAAdapter<float>& a, const Mat& x, bool with_router) {
  const std::vector<char> used = experts_used(a, x);
  double experts = 0;
  for (char u : used) experts += u;
  const double per_expert = double(a.rank()) * double(a.in_features() + a.out_features()) * sizeof(float);
  return experts * per_expert + (with_router ? double(a.num_experts() * a.in_features()) * sizeof(float) : 0.0);
}

void set_counters(benchmark::State& st, Index T, double flops_per_token) {
  st.counters["tokens_per_s"] = benchmark::Counter(double(T), benchmark::Counter::kIsIterationInvariantRate);
  st.counters["GFLOPs"] =
      benchmark::Counter(flops_per_token * double(T) * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
}

// ---- peak ---------------------------------------------------------------------------------

#if !defined(MOLORA_NO_XSIMD)
// 16 independent FMA chains of one register each, `steps` rounds: the issue rate of the FMA
// units. Returns the flops done.
double fma_chains(Index steps) {
  using B = xsimd::batch<float, molora::kernels::default_arch>;
  constexpr int chains = 16;
  B acc[chains];
  for (int i = 0; i < chains; ++i) acc[i] = B(float(i) * 1e-3f);
  const B m(0.999999f), a(1e-7f);
  for (Index s = 0; s < steps; ++s)
    for (int i = 0; i < chains; ++i) acc[i] = xsimd::fma(acc[i], m, a);
  for (int i = 0; i < chains; ++i) benchmark::DoNotOptimize(acc[i]);
  return 2.0 * chains * double(B::size) * double(steps);
}
#endif

void BM_peak_fma(benchmark::State& st) {
#if defined(MOLORA_NO_XSIMD)
  st.SkipWithError("built without xsimd");
#else
  const Index steps = 1 << 16;
  double flops = 0;
  for (auto _ : st) flops = fma_chains(steps);
  st.counters["GFLOPs"] = benchmark::Counter(flops * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
  st.SetLabel(molora::kernels::default_arch::name());
#endif
}
BENCHMARK(BM_peak_fma)->MinTime(0.3)->Repetitions(3);

#if !defined(MOLORA_NO_XSIMD)
// Sums every float of the spans once, 8 vectors in flight: the time any kernel needs just to
// read that data (the loop of BM_read_bandwidth).
float stream_spans(const std::vector<std::pair<const float*, Index>>& spans) {
  using B = xsimd::batch<float, molora::kernels::default_arch>;
  constexpr Index W = static_cast<Index>(B::size);
  constexpr int U = 8;
  B acc[U];
  for (int u = 0; u < U; ++u) acc[u] = B(0.f);
  float tail = 0;
  for (const auto& [p, n] : spans) {
    Index i = 0;
    for (; i + U * W <= n; i += U * W) {
      MOLORA_UNROLL
      for (int u = 0; u < U; ++u) acc[u] += B::load_unaligned(p + i + u * W);
    }
    for (; i < n; ++i) tail += p[i];
  }
  B sum = acc[0];
  for (int u = 1; u < U; ++u) sum += acc[u];
  alignas(64) float lanes[W];
  sum.store_aligned(lanes);
  for (Index l = 0; l < W; ++l) tail += lanes[l];
  return tail;
}
#endif

// Read bandwidth of one core over a buffer of KiB KiB (read again every iteration): from
// L2 when it fits (this machine: 2 MiB per core), from L3 / memory beyond. The bound of
// the decode cases, which stream their experts' weights once per call.
void BM_read_bandwidth(benchmark::State& st) {
#if defined(MOLORA_NO_XSIMD)
  st.SkipWithError("built without xsimd");
#else
  const Index n = st.range(0) * 256;  // floats
  std::vector<float, xsimd::aligned_allocator<float>> buf(static_cast<std::size_t>(n), 1e-3f);
  const std::vector<std::pair<const float*, Index>> spans{{buf.data(), n}};
  for (auto _ : st) benchmark::DoNotOptimize(stream_spans(spans));
  st.counters["GBps"] =
      benchmark::Counter(double(n) * sizeof(float) * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
#endif
}
BENCHMARK(BM_read_bandwidth)->Arg(1024)->Arg(65536)->MinTime(0.2)->Repetitions(3);

// ---- one expert, data in cache (the one-expert measurement) ---------------------------------

// kernel/<what>/n: what = 0 shrink, 1 expand, 2 fused, 3 Eigen's two GEMMs; in = out = 4096,
// r = 16, n tokens of one expert.
void BM_kernel(benchmark::State& st) {
  namespace k = molora::kernels;
  const int what = static_cast<int>(st.range(0));
  const Index n = st.range(1), in = 4096, out = 4096, r = 16;
  Mat a(r, in), bt(r, out), x(n, in), y = Mat::Zero(n, out), h(n, r);
  fill(h, 4, 0.5f);  // the expand alone reads h: never uninitialised (denormal garbage is slow)
  fill(a, 1, 0.02f);
  fill(bt, 2, 0.02f);
  fill(x, 3, 1.0f);
  std::vector<const float*> xr, hr;
  std::vector<float*> yr;
  std::vector<float> scale(static_cast<std::size_t>(n), 0.5f);
  for (Index i = 0; i < n; ++i) {
    xr.push_back(x.row(i).data());
    yr.push_back(y.row(i).data());
    hr.push_back(h.row(i).data());
  }
  std::vector<float> scratch(static_cast<std::size_t>(std::max<Index>(k::fused_scratch_size<k::layer_arch, float>(r),
                                                                      n * r * k::simd_width<k::layer_arch, float>())));
  Mat d(n, out);
  double flops = 0;
  for (auto _ : st) {
    switch (what) {
      case 0: k::shrink(k::layer_arch{}, a.data(), in, r, in, xr.data(), n, h.data(), r, scratch.data()); break;
      case 1: k::expand(k::layer_arch{}, bt.data(), out, r, out, hr.data(), scale.data(), n, yr.data()); break;
      case 2:
        k::fused(k::layer_arch{}, a.data(), in, bt.data(), out, r, in, out, xr.data(), yr.data(), scale.data(), n,
                 scratch.data(), k::kTile, static_cast<float*>(nullptr));
        break;
      default:
        h.noalias() = x * a.transpose();
        d.noalias() = h * bt;
        y += d;
        break;
    }
    benchmark::ClobberMemory();
  }
  flops = 2.0 * double(n * r) * (what == 0 ? double(in) : what == 1 ? double(out) : double(in + out));
  st.counters["GFLOPs"] = benchmark::Counter(flops * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
  static const char* names[] = {"shrink", "expand", "fused", "eigen"};
  st.SetLabel(names[what]);
}
BENCHMARK(BM_kernel)->ArgsProduct({{0, 1, 2, 3}, {1, 4, 16, 64}})->MinTime(0.1)->Repetitions(3);

// ---- base, adapter, experts ---------------------------------------------------------------

Strategy strategy_arg(int64_t v) { return static_cast<Strategy>(v); }

void BM_base(benchmark::State& st) {
  const Shape s{st.range(0), st.range(1), 8, 2, 16};
  const Index T = st.range(2);
  auto& l = layer_for(s);
  const Mat x = tokens(T, s.in);
  Mat y(T, s.out);
  for (auto _ : st) {
    l.forward_base(x, y);
    benchmark::ClobberMemory();
  }
  set_counters(st, T, 2.0 * double(s.in) * double(s.out));
}

void BM_adapter(benchmark::State& st) {
  const Strategy strat = strategy_arg(st.range(0));
  const Shape s{st.range(1), st.range(2), st.range(3), st.range(4), st.range(5)};
  const Index T = st.range(6);
  auto& l = layer_for(s);
  l.set_strategy(strat);
  const Mat x = tokens(T, s.in);
  Mat y = Mat::Zero(T, s.out);
  molora::MoLoRAWorkspace<float> ws;
  for (auto _ : st) {
    l.adapter().add_delta(x, y, ws);
    benchmark::ClobberMemory();
  }
  set_counters(st, T, adapter_flops(s));
  st.counters["weight_GBps"] =
      benchmark::Counter(weight_bytes(l.adapter(), x, true) * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
  st.SetLabel(molora::to_string(l.adapter().resolved_strategy(T, s.k)));
}

void BM_experts(benchmark::State& st) {
  const Strategy strat = strategy_arg(st.range(0));
  const Shape s{st.range(1), st.range(2), st.range(3), st.range(4), st.range(5)};
  const Index T = st.range(6);
  auto& l = layer_for(s);
  l.set_strategy(strat);
  const Mat x = tokens(T, s.in);
  Mat y = Mat::Zero(T, s.out);
  molora::MoLoRAWorkspace<float> ws;
  const molora::Routing<float> routing = l.adapter().route_tokens(x, ws);
  for (auto _ : st) {
    l.adapter().add_delta_routed(x, routing, y, ws);
    benchmark::ClobberMemory();
  }
  set_counters(st, T, expert_flops(s));
  st.counters["weight_GBps"] =
      benchmark::Counter(weight_bytes(l.adapter(), x, false) * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
  st.SetLabel(molora::to_string(l.adapter().resolved_strategy(T, s.k)));
}

// peak_share/in/out/T: each iteration times the fused experts (add_delta_routed, fixed
// routing, E = 8, k = 2, r = 16) and then the FMA-chain peak kernel for about as long, by
// CPU time. Counter share = median over iterations of the experts' useful GFLOP/s over the
// peak's measured next to it, so that the clock and the neighbours of this shared machine
// move both alike; experts_GFLOPs and peak_GFLOPs are the medians of each.
double cpu_seconds();
double median(std::vector<double> v);

void BM_peak_share(benchmark::State& st) {
#if defined(MOLORA_NO_XSIMD)
  st.SkipWithError("built without xsimd");
#else
  const Shape s{st.range(0), st.range(1), 8, 2, 16};
  const Index T = st.range(2);
  auto& l = layer_for(s);
  l.set_strategy(Strategy::fused);
  const Mat x = tokens(T, s.in);
  Mat y = Mat::Zero(T, s.out);
  molora::MoLoRAWorkspace<float> ws;
  const molora::Routing<float> routing = l.adapter().route_tokens(x, ws);
  const double flops = expert_flops(s) * double(T);
  l.adapter().add_delta_routed(x, routing, y, ws);  // warm
  // Peak rounds that take about as long as one call at 50 % of a 160 GFLOP/s core.
  const Index steps = std::max<Index>(1 << 10, static_cast<Index>(flops / 80e9 * 160e9 / 8192.0));
  std::vector<double> share, ours, peak;
  for (auto _ : st) {
    const double t0 = cpu_seconds();
    l.adapter().add_delta_routed(x, routing, y, ws);
    benchmark::ClobberMemory();
    const double t1 = cpu_seconds();
    const double pf = fma_chains(steps);
    const double t2 = cpu_seconds();
    st.SetIterationTime(t1 - t0);
    ours.push_back(flops / (t1 - t0) * 1e-9);
    peak.push_back(pf / (t2 - t1) * 1e-9);
    share.push_back(ours.back() / peak.back());
  }
  st.counters["share"] = median(share);
  st.counters["experts_GFLOPs"] = median(ours);
  st.counters["peak_GFLOPs"] = median(peak);
#endif
}

// ---- the decode bound, in one loop ---------------------------------------------------------

// decode_bound/in/out/T: each iteration times, by CPU time, the adapter (E = 8, k = 2,
// r = 16) with the eigen strategy and with the fused one (in turns first), then a plain
// read of the data either must read at least once: the router's weights, the A_e and B_e of every expert the
// routing uses, the x rows and the y rows (y += ... reads y). Counters, medians of the
// per-iteration ratios: fused_over_eigen (the speedup), bound_over_eigen (eigen's time over
// the read's: the speedup of a kernel that did nothing but read its operands once; no
// kernel can beat eigen by more) and fused_of_bound (the read's time over fused's).
void BM_decode_bound(benchmark::State& st) {
#if defined(MOLORA_NO_XSIMD)
  st.SkipWithError("built without xsimd");
#else
  const Shape s{st.range(0), st.range(1), 8, 2, 16};
  const Index T = st.range(2);
  auto& l = layer_for(s);
  auto& a = l.adapter();
  const Mat x = tokens(T, s.in);
  Mat y = Mat::Zero(T, s.out);
  molora::MoLoRAWorkspace<float> ws_e, ws_f;
  std::vector<std::pair<const float*, Index>> spans{{a.router().weight().data(), s.E * s.in}};
  const std::vector<char> used = experts_used(a, x);
  for (Index e = 0; e < s.E; ++e) {
    if (!used[static_cast<std::size_t>(e)]) continue;
    spans.emplace_back(a.stacked_A().data() + e * s.r * s.in, s.r * s.in);     // A_e [r, in]
    spans.emplace_back(a.stacked_B().data() + e * s.r * s.out, s.r * s.out);  // B_e, column-major
  }
  spans.emplace_back(x.data(), T * s.in);
  spans.emplace_back(y.data(), T * s.out);
  std::vector<double> speedup, bound, share;
  float sink = 0;
  bool fused_first = false;
  for (auto _ : st) {
    // Alternate which strategy runs first, so that neither always finds the cache as the
    // other left it.
    double te = 0, tf = 0;
    for (int pass = 0; pass < 2; ++pass) {
      const bool fused = (pass == 0) == fused_first;
      l.set_strategy(fused ? Strategy::fused : Strategy::eigen);
      const double t0 = cpu_seconds();
      a.add_delta(x, y, fused ? ws_f : ws_e);
      benchmark::ClobberMemory();
      (fused ? tf : te) = cpu_seconds() - t0;
    }
    fused_first = !fused_first;
    const double t2 = cpu_seconds();
    sink += stream_spans(spans);
    const double tr = cpu_seconds() - t2;
    st.SetIterationTime(tf);
    speedup.push_back(te / tf);
    bound.push_back(te / tr);
    share.push_back(tr / tf);
  }
  benchmark::DoNotOptimize(sink);
  st.counters["fused_over_eigen"] = median(speedup);
  st.counters["bound_over_eigen"] = median(bound);
  st.counters["fused_of_bound"] = median(share);
#endif
}

// ---- adapted / base in one loop -----------------------------------------------------------

// CPU time of the whole process (all threads): unlike wall time it does not count the time
// other jobs on this shared machine hold the cores.
double cpu_seconds() {
  timespec ts{};
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
  return double(ts.tv_sec) + 1e-9 * double(ts.tv_nsec);
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0.0 : (v[(v.size() - 1) / 2] + v[v.size() / 2]) / 2;
}

// Each iteration times, back to back and in alternating order, the base layer
// (forward_base), the adapted layer (forward) and the adapter alone (add_delta). Counters:
// ratio = median over iterations of adapted/base; ratio_composed = median of
// (base + adapter)/base, which is what forward does and less exposed to noise in the
// large base time; base_ms, adapted_ms, adapter_ms medians (CPU time).
void BM_ratio(benchmark::State& st) {
  const Strategy strat = strategy_arg(st.range(0));
  const Shape s{st.range(1), st.range(2), 8, 2, 16};
  const Index T = st.range(3);
  auto& l = layer_for(s);
  l.set_strategy(strat);
  const Mat x = tokens(T, s.in);
  Mat y(T, s.out);
  molora::MoLoRAWorkspace<float> ws;
  l.forward(x, y, ws);  // warm the workspace
  std::vector<double> ratios, composed, base_t, adapted_t, adapter_t;
  int order = 0;
  for (auto _ : st) {
    double t[3] = {0, 0, 0};
    for (int step = 0; step < 3; ++step) {
      const int which = (step + order) % 3;
      const double t0 = cpu_seconds();
      if (which == 0)
        l.forward_base(x, y);
      else if (which == 1)
        l.forward(x, y, ws);
      else
        l.adapter().add_delta(x, y, ws);
      benchmark::ClobberMemory();
      t[which] = cpu_seconds() - t0;
    }
    order = (order + 1) % 3;  // rotate so that no part always runs first
    st.SetIterationTime(t[1]);
    ratios.push_back(t[1] / t[0]);
    composed.push_back((t[0] + t[2]) / t[0]);
    base_t.push_back(t[0]);
    adapted_t.push_back(t[1]);
    adapter_t.push_back(t[2]);
  }
  st.counters["ratio"] = median(ratios);
  st.counters["ratio_composed"] = median(composed);
  st.counters["base_ms"] = median(base_t) * 1e3;
  st.counters["adapted_ms"] = median(adapted_t) * 1e3;
  st.counters["adapter_ms"] = median(adapter_t) * 1e3;
  st.counters["tokens_per_s"] = double(T) / median(adapted_t);
  st.SetLabel(molora::to_string(l.adapter().resolved_strategy(T, s.k)));
}

// ---- threads ------------------------------------------------------------------------------

#if defined(MOLORA_USE_OPENMP)
// One threads case: strategy S, in x out, T tokens, the adapter (whole = 0) or the layer
// (whole = 1); run(n) calls it with n OpenMP (and Eigen) threads. Restores the thread
// counts it found when it goes.
struct ThreadsCase {
  molora::MoLoRALinear<float>& layer;
  Shape shape;
  Index T;
  bool whole_layer;
  Mat x, y;
  molora::MoLoRAWorkspace<float> ws;
  int saved = omp_get_max_threads();

  ThreadsCase(Strategy strat, Index in, Index out, Index tokens_, bool whole)
      : layer(layer_for(Shape{in, out, 8, 2, 16})), shape{in, out, 8, 2, 16}, T(tokens_), whole_layer(whole),
        x(tokens(tokens_, in)), y(Mat::Zero(tokens_, out)) {
    layer.set_strategy(strat);
  }
  ~ThreadsCase() {
    omp_set_num_threads(saved);
    Eigen::setNbThreads(saved);
  }
  static void set_threads(int n) {
    omp_set_num_threads(n);
    Eigen::setNbThreads(n);
  }
  void call() {
    if (whole_layer)
      layer.forward(x, y, ws);
    else
      layer.adapter().add_delta(x, y, ws);
    benchmark::ClobberMemory();
  }
  double flops_per_token() const {
    return whole_layer ? adapter_flops(shape) + 2.0 * double(shape.in) * double(shape.out) : adapter_flops(shape);
  }
  const char* label() const { return whole_layer ? "layer" : "adapter"; }
};

double wall_seconds() {
  timespec ts{};
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return double(ts.tv_sec) + 1e-9 * double(ts.tv_nsec);
}
#endif

// threads/S/in/out/T/n/whole: n OpenMP threads, wall time.
void BM_threads(benchmark::State& st) {
#if defined(MOLORA_USE_OPENMP)
  ThreadsCase c(strategy_arg(st.range(0)), st.range(1), st.range(2), st.range(3), st.range(5) != 0);
  ThreadsCase::set_threads(static_cast<int>(st.range(4)));
  for (auto _ : st) c.call();
  set_counters(st, c.T, c.flops_per_token());
  st.SetLabel(c.label());
#else
  st.SkipWithError("built without MOLORA_OPENMP");
#endif
}

// threads_ratio/S/in/out/T/whole: each iteration runs the adapter (whole = 0) or the layer
// (whole = 1) once with one OpenMP thread and once with two, in alternating order, timing
// each by the wall clock. Counter speedup = median over iterations of t(1) / t(2): both
// sides of every pair see the same machine, so other jobs move it much less than two
// separate benchmarks' times.
void BM_threads_ratio(benchmark::State& st) {
#if defined(MOLORA_USE_OPENMP)
  ThreadsCase c(strategy_arg(st.range(0)), st.range(1), st.range(2), st.range(3), st.range(4) != 0);
  const auto run = [&](int threads) {
    ThreadsCase::set_threads(threads);
    const double t0 = wall_seconds();
    c.call();
    return wall_seconds() - t0;
  };
  run(2);  // warm the workspace and the thread pool
  std::vector<double> speedup, one, two;
  bool two_first = false;
  for (auto _ : st) {
    double t1 = 0, t2 = 0;
    if (two_first) {
      t2 = run(2);
      t1 = run(1);
    } else {
      t1 = run(1);
      t2 = run(2);
    }
    two_first = !two_first;
    st.SetIterationTime(t1 + t2);
    speedup.push_back(t1 / t2);
    one.push_back(t1);
    two.push_back(t2);
  }
  st.counters["speedup"] = median(speedup);
  st.counters["one_ms"] = median(one) * 1e3;
  st.counters["two_ms"] = median(two) * 1e3;
  st.SetLabel(c.label());
#else
  st.SkipWithError("built without MOLORA_OPENMP");
#endif
}

// ---- registration -------------------------------------------------------------------------

const std::vector<int64_t> kTokens = {1, 4, 16, 64, 256, 1024};
const std::vector<std::pair<int64_t, int64_t>> kShapes = {{4096, 4096}, {4096, 11008}, {11008, 4096}};
const std::vector<Strategy> kCompared = {Strategy::eigen, Strategy::dense_shrink, Strategy::fused};

// Fewer iterations for the big cases: the machine is shared and the base at T = 1024 takes
// about a second.
double min_time_for(double flops) { return flops > 2e10 ? 0.05 : 0.15; }

// The adapter-only cases are cheap: three repetitions each, of which tools/plot_bench.py
// keeps the fastest (on a shared machine the other jobs only ever add time).
constexpr int kRepetitions = 3;

void register_all() {
  for (const auto& [in, out] : kShapes) {
    for (int64_t T : kTokens) {
      const double base_flops = 2.0 * double(in) * double(out) * double(T);
      benchmark::RegisterBenchmark("base", BM_base)->Args({in, out, T})->MinTime(min_time_for(base_flops))
          ->Unit(benchmark::kMicrosecond);
      for (Strategy s : kCompared) {
        const auto si = static_cast<int64_t>(s);
        benchmark::RegisterBenchmark("adapter", BM_adapter)->Args({si, in, out, 8, 2, 16, T})->MinTime(0.1)
            ->Repetitions(kRepetitions)->Unit(benchmark::kMicrosecond);
        benchmark::RegisterBenchmark("experts", BM_experts)->Args({si, in, out, 8, 2, 16, T})->MinTime(0.1)
            ->Repetitions(kRepetitions)->Unit(benchmark::kMicrosecond);
      }
      // The adapted layer over its base, with the default strategy everywhere and with every
      // strategy at MING-MOE's shape.
      const int64_t pairs = base_flops > 5e10 ? 5 : base_flops > 5e9 ? 9 : base_flops > 5e8 ? 25 : 101;
      for (Strategy s : {Strategy::automatic, Strategy::eigen, Strategy::dense_shrink}) {
        if (s != Strategy::automatic && in != out) continue;
        benchmark::RegisterBenchmark("ratio", BM_ratio)->Args({static_cast<int64_t>(s), in, out, T})
            ->Iterations(pairs)->UseManualTime()->Unit(benchmark::kMicrosecond);
      }
    }
  }
  // Sweeps at MING-MOE's in/out, k = 2: rank, then number of experts.
  for (int64_t T : {1, 16, 256})
    for (Strategy s : kCompared) {
      const auto si = static_cast<int64_t>(s);
      for (int64_t r : {4, 8, 16, 64})
        benchmark::RegisterBenchmark("sweep_rank", BM_adapter)->Args({si, 4096, 4096, 8, 2, r, T})->MinTime(0.1)
            ->Repetitions(kRepetitions)->Unit(benchmark::kMicrosecond);
      for (int64_t E : {4, 8, 16, 64})
        benchmark::RegisterBenchmark("sweep_experts", BM_adapter)->Args({si, 4096, 4096, E, 2, 16, T})
            ->MinTime(0.1)->Repetitions(kRepetitions)->Unit(benchmark::kMicrosecond);
    }
  // Dense routing (k == E): where the dense shrink does no extra work.
  for (int64_t T : {1, 16, 256})
    for (int64_t E : {4, 8})
      for (Strategy s : kCompared)
        benchmark::RegisterBenchmark("dense_routing", BM_adapter)
            ->Args({static_cast<int64_t>(s), 4096, 4096, E, E, 16, T})->MinTime(0.1)->Repetitions(kRepetitions)
            ->Unit(benchmark::kMicrosecond);
  // The fused experts' share of the FMA peak, both measured in one loop.
  for (const auto& [in, out] : kShapes)
    for (int64_t T : {64, 256, 1024})
      benchmark::RegisterBenchmark("peak_share", BM_peak_share)->Args({in, out, T})
          ->Iterations(T >= 1024 ? 41 : 101)->UseManualTime()->Unit(benchmark::kMicrosecond);
  // Decode: fused over eigen beside the bound of reading the operands once, in one loop.
  for (int64_t T : {1, 4, 16})
    benchmark::RegisterBenchmark("decode_bound", BM_decode_bound)->Args({4096, 4096, T})->Iterations(401)
        ->UseManualTime()->Unit(benchmark::kMicrosecond);
  // Threads at T = 256 (and 64, 1024): the adapter and the whole layer, 1 and 2 threads.
  for (int64_t T : {64, 256, 1024})
    for (int64_t whole : {0, 1})
      for (int64_t n : {1, 2})
        benchmark::RegisterBenchmark("threads", BM_threads)
            ->Args({static_cast<int64_t>(Strategy::automatic), 4096, 4096, T, n, whole})
            ->MinTime(whole ? 0.3 : 0.15)->UseRealTime()->Unit(benchmark::kMicrosecond);
  // T = 1, 4, 16: decode, where the base rows and the experts' columns are split instead of
  // the tokens.
  for (int64_t T : {1, 4, 16, 64, 256, 1024})
    for (int64_t whole : {0, 1})
      benchmark::RegisterBenchmark("threads_ratio", BM_threads_ratio)
          ->Args({static_cast<int64_t>(Strategy::automatic), 4096, 4096, T, whole})
          ->Iterations(whole ? (T >= 1024 ? 9 : T >= 64 ? 25 : 101) : 101)->UseManualTime()
          ->Unit(benchmark::kMicrosecond);
}

}  // namespace

int main(int argc, char** argv) {
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  register_all();
  benchmark::AddCustomContext("molora_kernel_isa", molora::kernels::active_isa());
  // BM_peak_fma and BM_read_bandwidth use the compile-time ISA (-march), not the dispatched one.
  benchmark::AddCustomContext("molora_compile_isa", molora::kernels::isa_name<molora::kernels::default_arch>());
#if defined(MOLORA_USE_OPENMP)
  benchmark::AddCustomContext("molora_openmp", "on");
#else
  benchmark::AddCustomContext("molora_openmp", "off");
#endif
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
