// The adapter with its router and experts in 16 bits against the same adapter in float
// (docs/benchmarks.md, "Router and experts in 16 bits"):
//
//   adapter_in_layer_16/W/in/out/T   add_delta of MoLoRAAdapter<float, W> and of the float
//                                    adapter holding the widened weights, alternately in one
//                                    loop, each on its own cold copy (the copies rotate past
//                                    the L3); counters: the medians and half / float against
//                                    the ratio of the bytes read (0.5)
//
// E = 8, k = 2, r = 16 (the shapes of the other adapter benchmarks), one thread unless
// OMP_NUM_THREADS says otherwise.
#include <benchmark/benchmark.h>

#include <algorithm>
#include <cstdint>
#include <ctime>
#include <string>
#include <vector>

#include <molora/molora.hpp>

#include "bench_util.hpp"

namespace {

using molora::bf16;
using molora::f16;
using molora::Index;
template <class S>
using Mat = molora::RowMatrix<S>;

using bench_util::cpu_seconds;
using bench_util::fill;
using bench_util::median;

// Copies of each adapter (4096 x 4096: 4.1 MiB float, 2.1 MiB 16-bit; 375 MiB for 61 of
// each). One float and one 16-bit call per iteration read at least 0.9 MiB (T = 1: router and
// two experts), so a copy comes back after 54 MiB or more of other copies, past a 32 MiB L3.
constexpr int kCopies = 61;

template <class W>
void BM_adapter_in_layer_16(benchmark::State& st) {
  const Index in = st.range(0), out = st.range(1), T = st.range(2);
  molora::MoLoRAConfig c;
  c.in_features = in;
  c.out_features = out;
  c.num_experts = 8;
  c.top_k = 2;
  c.rank = 16;
  c.router_bias = true;
  molora::MoLoRAAdapter<float> a(c);
  Mat<float> rw(c.num_experts, in), A(c.rank, in), B(out, c.rank);
  fill(rw, 1, 0.05);
  a.router().set_weight(rw);
  for (Index e = 0; e < c.num_experts; ++e) {
    fill(A, 10 + std::uint64_t(e), 0.02);
    fill(B, 20 + std::uint64_t(e), 0.02);
    a.set_expert_A(e, A);
    a.set_expert_B(e, B);
  }
  const auto half = molora::convert_adapter<W>(a);
  auto wide = molora::convert_adapter<float>(half);  // the same values in float
  wide.set_strategy(molora::Strategy::fused);        // what the 16-bit adapter runs
  std::vector<molora::MoLoRAAdapter<float, W>> halves(kCopies, half);
  std::vector<molora::MoLoRAAdapter<float>> floats(kCopies, wide);
  Mat<float> x(T, in), y(T, out);
  fill(x, 5 + std::uint64_t(T), 1.0);
  y.setZero();
  molora::MoLoRAWorkspace<float> ws;
  floats[0].add_delta(x, y, ws);  // sizes the workspace
  halves[0].add_delta(x, y, ws);
  std::vector<double> tf, th, ratio;
  std::size_t i = 0;
  for (auto _ : st) {
    const std::size_t c0 = i % kCopies, c1 = (i + kCopies / 2) % kCopies;
    ++i;
    double t0 = cpu_seconds();
    floats[c0].add_delta(x, y, ws);
    benchmark::ClobberMemory();
    const double f = cpu_seconds() - t0;
    t0 = cpu_seconds();
    halves[c1].add_delta(x, y, ws);
    benchmark::ClobberMemory();
    const double h = cpu_seconds() - t0;
    st.SetIterationTime(f + h);
    tf.push_back(f);
    th.push_back(h);
    ratio.push_back(h / f);
  }
  benchmark::DoNotOptimize(y.data());
  st.counters["float_ms"] = median(tf) * 1e3;
  st.counters["half_ms"] = median(th) * 1e3;
  st.counters["half_over_float"] = median(ratio);
  st.counters["bytes_ratio"] = 0.5;
}

void register_all() {
  for (const Index T : {1, 4, 8}) {
    benchmark::RegisterBenchmark("adapter_in_layer_16/bf16", BM_adapter_in_layer_16<bf16>)
        ->Args({4096, 4096, T})
        ->UseManualTime()
        ->MinTime(1.0);
    benchmark::RegisterBenchmark("adapter_in_layer_16/f16", BM_adapter_in_layer_16<f16>)
        ->Args({4096, 4096, T})
        ->UseManualTime()
        ->MinTime(1.0);
  }
}

}  // namespace

int main(int argc, char** argv) {
  register_all();
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
