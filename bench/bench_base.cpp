// The base product at decode sizes (Google Benchmark, not run by ctest):
//   whole_layer/D/in/out/T/cold     MoLoRALinear<float, D>::forward (E = 8, k = 2, r = 16; the
//                                   base weight stored as D = f32, bf16 or f16) and a
//                                   plain read of the weights it must read (W0, the router,
//                                   the A_e and B_e of the experts the routing uses), timed
//                                   alternately in one loop; cold = 1 rotates over enough
//                                   layer copies to leave the last-level cache, cold = 0
//                                   uses one copy. Counter read_share = median over
//                                   iterations of forward time / read time. With the suffix
//                                   /eigen_base: the same with BaseStrategy::eigen (before).
//   base_product/S/in/out/T/cold    the base product alone, skinny_product against Eigen's
//                                   GEMM (+ bias) alternately in one loop, S = f32 or f64.
//                                   Counter skinny_over_eigen = median of skinny / eigen
//                                   time (below 1: skinny is faster), with read_share of each.
//   adapter_in_layer/D/in/out/T     the adapter at its own limit inside the layer, weights
//                                   cold: forward, forward_base, the adapter alone
//                                   (add_delta on the base's output) and a plain read of
//                                   the router and the routed experts' A_e, B_e, each on its
//                                   own cold copy in one loop. Counters: added_ms = median
//                                   forward - median base, adapter_ms, read_ms (medians),
//                                   added_over_read and adapter_over_read (target <= 1.2).
//   skinny/D/in/out/T/cold          skinny_product alone with W0 stored as D = f32, bf16 or f16
//                                   (f32 activations), then a plain read of another copy of
//                                   W0's bytes, alternately in one loop. Counters read_share =
//                                   median of kernel / read time, kernel_gbs and read_gbs
//                                   (W0's bytes over each median time), gflops (2 in out T
//                                   over the kernel's median time).
//   skinny_paths/D/in/out/T/cold    the two paths of skinny_product (kernels compiled for this
//                                   binary's ISA), W0 in D: streamed (pairs of rows one
//                                   after the other, what skinny_product runs for T = 5-8)
//                                   and blocked (4 rows x 4 tokens, 8 rows at T = 1: the
//                                   kernel before, still used for T = 1-4 and from 9),
//                                   each on its own copy, then a plain read of a third,
//                                   alternately in one loop. Counters streamed_over_blocked
//                                   (median of the ratio), streamed_read_share and
//                                   blocked_read_share, and the three median times.
//   shrink_rows/D/in/T/cold         one expert's shrink (r = 16) for 1-4 tokens, A_e cold:
//                                   as the layers run it, the blocks before it (8 rank rows
//                                   side by side for 1-2 tokens, 4 for 3-4), and a plain
//                                   read. Counters kernel_share and before_share.
//   expand_rows/D/out/n/warm|cold   one expert's expand (r = 16) for n = 1-4 tokens, B_e^T
//                                   [16, out] in D, cold copies or one warm copy: as the
//                                   layers run it (2-4 tokens expand_few: the rank rows
//                                   side by side a vector at a time, in passes of 8 where
//                                   rows are a multiple of 4 KiB apart), the blocks before
//                                   it (8 or 4 vectors of one row at a time; one vector for
//                                   one token off 4 KiB strides, which the kernel still
//                                   runs), and a plain read. Counters kernel_share and
//                                   before_share.
//   skinny_limit/D/in/out/T         skinny_product as the layer runs it (x staged, rows
//                                   staged_stride apart) on cold copies of W0, the same
//                                   product with W0's bytes kept in L2 (blocks of 32 rows
//                                   of one buffer, so memory costs nothing), and a plain
//                                   read of a cold copy, alternately in one loop. Counters
//                                   cold_over_read, hot_over_read (the compute alone over the
//                                   read: cold_over_read cannot go below it) and hot_gflops.
//   crossover/D/in/out/T/cold       the base product for T tokens, W0 stored as D, cold: the
//                                   skinny kernel on x in place (aligned, then 16 bytes off
//                                   a line), base_product's skinny (x staged) and its gemm,
//                                   alternately. Counters: the medians and the ratios
//                                   staged_over_inplace, staged_over_misaligned and
//                                   gemm_over_staged (below 1: the GEMM is faster).
//   gemm/D/in/out/T                 the base product above the crossover with W0 stored as
//                                   D = f32, bf16 or f16 (f32 activations, bias, weights
//                                   warm): kernels::gemm_product (BaseStrategy::gemm) against
//                                   Eigen's GEMM (BaseStrategy::eigen, over widened row blocks
//                                   for 16-bit weights) alternately in one loop. Counters
//                                   gemm_over_eigen = median of gemm / eigen time (below 1:
//                                   gemm is faster), gemm_gflops and eigen_gflops (2 in out T
//                                   over each median time).
// Times are CPU time of the process (other jobs on a shared machine do not count), wall
// time when built with OpenMP. Run:
//   bench_base --benchmark_repetitions=5 --benchmark_report_aggregates_only=true

#include <benchmark/benchmark.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <ctime>
#include <memory>
#include <numeric>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include <molora/molora.hpp>

#include "bench_util.hpp"
#include "fma_peak.hpp"

#if defined(MOLORA_USE_OPENMP)
#include <omp.h>
#endif

namespace {

using molora::Index;
template <class Scalar>
using Mat = molora::RowMatrix<Scalar>;
using Spans = std::vector<std::pair<const void*, Index>>;  // (data, bytes)

// Bytes of all layer copies of a cold run: well past this machine's 480 MiB of L3.
constexpr double kColdBytes = 720.0 * (1 << 20);

using bench_util::cpu_seconds;
using bench_util::fill;
using bench_util::median;

// Reads every byte of the spans once as floats, 8 vectors in flight (what any kernel needs
// just to bring that data in). Spans are whole floats (f32 and f64 data alike).
float stream_spans(const Spans& spans) {
#if defined(MOLORA_NO_XSIMD)
  float s = 0;
  for (const auto& [p, bytes] : spans)
    for (Index i = 0; i < bytes / Index(sizeof(float)); ++i) s += static_cast<const float*>(p)[i];
  return s;
#else
  using B = xsimd::batch<float, molora::kernels::default_arch>;
  constexpr Index W = static_cast<Index>(B::size);
  constexpr int U = 8;
  B acc[U];
  for (int u = 0; u < U; ++u) acc[u] = B(0.f);
  float tail = 0;
  for (const auto& [v, bytes] : spans) {
    const float* p = static_cast<const float*>(v);
    const Index n = bytes / Index(sizeof(float));
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
#endif
}

template <class W>
using Layer = molora::MoLoRALinear<float, W>;

template <class W>
std::unique_ptr<Layer<W>> make_layer(Index in, Index out) {
  molora::MoLoRAConfig c;
  c.in_features = in;
  c.out_features = out;
  c.num_experts = 8;
  c.top_k = 2;
  c.rank = 16;
  auto l = std::make_unique<Layer<W>>(c);
  Mat<float> w(out, in);
  fill(w, 1, 0.02);
  l->set_base_weight(w);  // rounded to W
  Mat<float> b(1, out);
  fill(b, 2, 0.02);
  l->set_base_bias(b);
  auto& a = l->adapter();
  auto wr = a.router().mutable_weight();
  fill(wr, 3, 0.05);
  auto A = a.mutable_stacked_A();
  fill(A, 4, 0.02);
  auto Bm = a.mutable_stacked_B();
  fill(Bm, 5, 0.02);
  return l;
}

// Layer copies for a cold (enough copies to exceed the LLC, at least 2) or a warm (one) run.
// Kept between benchmarks of the same shape and dtype; the copies of another dtype are freed.
// The one set of layer copies alive, whatever its dtype, and a count of the sets made: a
// dtype's cached set is still alive only if no set was made after it (comparing addresses
// would not do: a new set may be allocated where a freed one was).
struct LiveCopies {
  std::shared_ptr<void> copies;
  std::uint64_t generation = 0;
};
LiveCopies& live_copies() {
  static LiveCopies live;
  return live;
}

template <class W>
std::vector<std::unique_ptr<Layer<W>>>& layers_for(Index in, Index out, bool cold) {
  using Copies = std::vector<std::unique_ptr<Layer<W>>>;
  static Copies* cached = nullptr;
  static std::uint64_t c_generation = 0;
  static Index c_in = 0, c_out = 0;
  const double bytes = double(in) * double(out) * sizeof(W);
  const auto want = static_cast<std::size_t>(cold ? std::max(2.0, kColdBytes / bytes + 1) : 1);
  LiveCopies& live = live_copies();
  if (cached == nullptr || live.generation != c_generation || c_in != in || c_out != out || cached->size() < want) {
    live.copies.reset();
    auto fresh = std::make_shared<Copies>();
    fresh->push_back(make_layer<W>(in, out));
    for (std::size_t i = 1; i < want; ++i) fresh->push_back(std::make_unique<Layer<W>>(*fresh->front()));
    cached = fresh.get();
    live.copies = fresh;
    c_generation = ++live.generation;
    c_in = in;
    c_out = out;
  }
  return *cached;
}

// The weights forward must read at least once for x: W0 (in its own type), its bias, the
// router and the A_e, B_e of every expert the routing uses.
template <class W>
Spans weight_spans(const Layer<W>& l, const Mat<float>& x) {
  const auto& a = l.adapter();
  const Index in = l.in_features(), out = l.out_features(), r = a.rank();
  Spans s{{l.base_weight_data(), in * out * Index(sizeof(W))},
          {l.base_bias().data(), out * Index(sizeof(float))},
          {a.router().weight().data(), a.num_experts() * in * Index(sizeof(float))}};
  molora::MoLoRAWorkspace<float> ws;
  const auto& routing = a.route_tokens(x, ws);
  std::vector<char> used(static_cast<std::size_t>(a.num_experts()), 0);
  for (Index t = 0; t < routing.num_tokens(); ++t)
    for (Index k = 0; k < routing.top_k(); ++k) used[static_cast<std::size_t>(routing.ids(t, k))] = 1;
  for (Index e = 0; e < a.num_experts(); ++e) {
    if (!used[static_cast<std::size_t>(e)]) continue;
    s.emplace_back(a.stacked_A().data() + e * r * in, r * in * Index(sizeof(float)));
    s.emplace_back(a.stacked_B().data() + e * r * out, r * out * Index(sizeof(float)));
  }
  return s;
}

// whole_layer/D/in/out/T/cold. With n copies, iteration i runs forward on copy 2i and
// reads copy 2i + 1 (mod n, n even when cold): each copy comes back after all the others.
template <class W>
void BM_whole_layer(benchmark::State& st) {
  const Index in = st.range(0), out = st.range(1), T = st.range(2);
  const bool cold = st.range(3) != 0;
  const auto base = st.range(4) != 0 ? molora::BaseStrategy::eigen : molora::BaseStrategy::automatic;
  auto& layers = layers_for<W>(in, out, cold);
  const std::size_t n = cold ? layers.size() / 2 * 2 : 1;
  Mat<float> x(T, in);
  fill(x, 7 + static_cast<std::uint64_t>(T), 1.0);
  Mat<float> y(T, out);
  molora::MoLoRAWorkspace<float> ws;
  std::vector<Spans> spans;
  for (std::size_t i = 0; i < n; ++i) {
    layers[i]->set_base_strategy(base);
    spans.push_back(weight_spans(*layers[i], x));
  }
  layers[0]->forward(x, y, ws);  // sizes the workspace
  std::vector<double> share, fwd, rd;
  float sink = 0;
  std::size_t i = 0;
  for (auto _ : st) {
    const std::size_t f = cold ? (2 * i) % n : 0, r = cold ? (2 * i + 1) % n : 0;
    ++i;
    const double t0 = cpu_seconds();
    layers[f]->forward(x, y, ws);
    benchmark::ClobberMemory();
    const double t1 = cpu_seconds();
    sink += stream_spans(spans[r]);
    const double t2 = cpu_seconds();
    st.SetIterationTime(t1 - t0);
    share.push_back((t1 - t0) / (t2 - t1));
    fwd.push_back(t1 - t0);
    rd.push_back(t2 - t1);
  }
  benchmark::DoNotOptimize(sink);
  benchmark::DoNotOptimize(y.data());
  st.counters["read_share"] = median(share);
  st.counters["forward_ms"] = median(fwd) * 1e3;
  st.counters["read_ms"] = median(rd) * 1e3;
}

// base_product/S/in/out/T/cold: skinny_product and Eigen's GEMM + bias (what forward_base
// does with BaseStrategy::eigen) on the same W0 copy in turns first, then a read of another
// copy. Cold: W0 copies past the LLC, as in whole_layer.
template <class Scalar>
void BM_base_product(benchmark::State& st) {
  const Index in = st.range(0), out = st.range(1), T = st.range(2);
  const bool cold = st.range(3) != 0;
  const double bytes = double(in) * double(out) * sizeof(Scalar);
  // Three copies per iteration, stepping by 3: n prime to 3 visits every copy in turn.
  std::size_t n = cold ? static_cast<std::size_t>(std::max(4.0, kColdBytes / bytes + 1)) : 1;
  while (cold && n % 3 == 0) ++n;
  std::vector<Mat<Scalar>> w(n, Mat<Scalar>(out, in));
  for (auto& m : w) fill(m, 1, 0.02);
  Eigen::Matrix<Scalar, 1, Eigen::Dynamic> b(out);
  fill(b, 2, 0.02);
  Mat<Scalar> x(T, in), y(T, out);
  fill(x, 3, 1.0);
  std::vector<double> ratio, share_s, share_e;
  float sink = 0;
  std::size_t i = 0;
  bool skinny_first = false;
  for (auto _ : st) {
    double ts = 0, te = 0;
    for (int pass = 0; pass < 2; ++pass) {
      const bool skinny = (pass == 0) == skinny_first;
      // Each product gets its own copy, untouched since the others all passed.
      const std::size_t c = cold ? (3 * i + std::size_t(pass)) % n : 0;
      const double t0 = cpu_seconds();
      if (skinny) {
        molora::kernels::skinny_product(molora::kernels::default_arch{}, w[c].data(), in, in, x.data(), in, T,
                                        b.data(), y.data(), out, Index(0), out);
      } else {
        y.noalias() = x * w[c].transpose();  // [T, out]
        y.rowwise() += b;
      }
      benchmark::ClobberMemory();
      (skinny ? ts : te) = cpu_seconds() - t0;
    }
    const std::size_t c = cold ? (3 * i + 2) % n : 0;
    skinny_first = !skinny_first;
    ++i;
    const double t0 = cpu_seconds();
    sink += stream_spans({{w[c].data(), in * out * Index(sizeof(Scalar))}});
    const double tr = cpu_seconds() - t0;
    st.SetIterationTime(ts);
    ratio.push_back(ts / te);
    share_s.push_back(ts / tr);
    share_e.push_back(te / tr);
  }
  benchmark::DoNotOptimize(sink);
  benchmark::DoNotOptimize(y.data());
  st.counters["skinny_over_eigen"] = median(ratio);
  st.counters["skinny_read_share"] = median(share_s);
  st.counters["eigen_read_share"] = median(share_e);
}

// W0 [out, in] filled as make_layer fills it, rounded to Wt, row-major.
template <class Wt>
std::vector<Wt> weights_as(Index in, Index out) {
  Mat<float> w32(out, in);
  fill(w32, 1, 0.02);
  std::vector<Wt> w(static_cast<std::size_t>(in * out));
  for (std::size_t i = 0; i < w.size(); ++i) {
    if constexpr (std::is_same_v<Wt, float>)
      w[i] = w32.data()[i];
    else if constexpr (std::is_same_v<Wt, molora::bf16>)
      w[i] = molora::to_bf16(w32.data()[i]);
    else
      w[i] = molora::to_f16(w32.data()[i]);
  }
  return w;
}

// skinny/D/in/out/T/cold: the skinny kernel with W0 in D against a plain read of the same
// number of bytes, as whole_layer does for the layer; cold rotates over copies past the LLC
// (iteration i runs the kernel on copy 2i and reads copy 2i + 1, n even).
template <class Wt>
void BM_skinny(benchmark::State& st) {
  const Index in = st.range(0), out = st.range(1), T = st.range(2);
  const bool cold = st.range(3) != 0;
  const Index bytes = in * out * Index(sizeof(Wt));
  std::size_t n = cold ? static_cast<std::size_t>(std::max(4.0, kColdBytes / double(bytes) + 1)) : 1;
  if (cold && n % 2 == 1) ++n;
  std::vector<std::vector<Wt>> w(n, weights_as<Wt>(in, out));
  Eigen::Matrix<float, 1, Eigen::Dynamic> b(out);
  fill(b, 2, 0.02);
  Mat<float> x(T, in), y(T, out);
  fill(x, 3, 1.0);
  std::vector<double> share, tk, tr;
  float sink = 0;
  std::size_t i = 0;
  for (auto _ : st) {
    const std::size_t f = cold ? (2 * i) % n : 0, r = cold ? (2 * i + 1) % n : 0;
    ++i;
    const double t0 = cpu_seconds();
    molora::kernels::skinny_product(molora::kernels::layer_arch{}, w[f].data(), in, in, x.data(), in, T, b.data(),
                                    y.data(), out, Index(0), out);  // [T, out]
    benchmark::ClobberMemory();
    const double t1 = cpu_seconds();
    sink += stream_spans({{w[r].data(), bytes}});
    const double t2 = cpu_seconds();
    st.SetIterationTime(t1 - t0);
    share.push_back((t1 - t0) / (t2 - t1));
    tk.push_back(t1 - t0);
    tr.push_back(t2 - t1);
  }
  benchmark::DoNotOptimize(sink);
  benchmark::DoNotOptimize(y.data());
  st.counters["read_share"] = median(share);
  st.counters["kernel_gbs"] = double(bytes) / median(tk) * 1e-9;
  st.counters["read_gbs"] = double(bytes) / median(tr) * 1e-9;
  st.counters["gflops"] = 2.0 * double(in) * double(out) * double(T) / median(tk) * 1e-9;
}

// skinny_paths/D/in/out/T/cold: three copies per iteration (the two paths, in alternating
// order, and the read), stepping by 3 over n copies with n prime to 3.
template <class Wt>
void BM_skinny_paths(benchmark::State& st) {
  namespace kd = molora::kernels::detail;
  using Arch = molora::kernels::default_arch;
  const Index in = st.range(0), out = st.range(1), T = st.range(2);
  const bool cold = st.range(3) != 0;
  const Index bytes = in * out * Index(sizeof(Wt));
  std::size_t n = cold ? static_cast<std::size_t>(std::max(4.0, kColdBytes / double(bytes) + 1)) : 1;
  while (cold && n % 3 == 0) ++n;
  std::vector<std::vector<Wt>> w(n, weights_as<Wt>(in, out));
  Eigen::Matrix<float, 1, Eigen::Dynamic> b(out);
  fill(b, 2, 0.02);
  Mat<float> x(T, in), y(T, out);
  fill(x, 3, 1.0);
  std::vector<double> ratio, share_s, share_b, ts_all, tb_all, tr_all;
  float sink = 0;
  std::size_t i = 0;
  bool streamed_first = false;
  for (auto _ : st) {
    double ts = 0, tb = 0;
    for (int pass = 0; pass < 2; ++pass) {
      const bool streamed = (pass == 0) == streamed_first;
      const std::size_t c = cold ? (3 * i + std::size_t(pass)) % n : 0;
      const double t0 = cpu_seconds();
      if (streamed)
        kd::skinny_product_streamed<Arch>(w[c].data(), in, in, x.data(), in, T, b.data(), y.data(), out, Index(0), out);
      else
        kd::skinny_product_blocked<Arch>(w[c].data(), in, in, x.data(), in, T, b.data(), y.data(), out, Index(0), out);
      benchmark::ClobberMemory();
      (streamed ? ts : tb) = cpu_seconds() - t0;
    }
    const std::size_t c = cold ? (3 * i + 2) % n : 0;
    streamed_first = !streamed_first;
    ++i;
    const double t0 = cpu_seconds();
    sink += stream_spans({{w[c].data(), bytes}});
    const double tr = cpu_seconds() - t0;
    st.SetIterationTime(ts);
    ratio.push_back(ts / tb);
    share_s.push_back(ts / tr);
    share_b.push_back(tb / tr);
    ts_all.push_back(ts);
    tb_all.push_back(tb);
    tr_all.push_back(tr);
  }
  benchmark::DoNotOptimize(sink);
  benchmark::DoNotOptimize(y.data());
  st.counters["streamed_over_blocked"] = median(ratio);
  st.counters["streamed_read_share"] = median(share_s);
  st.counters["blocked_read_share"] = median(share_b);
  st.counters["streamed_ms"] = median(ts_all) * 1e3;
  st.counters["blocked_ms"] = median(tb_all) * 1e3;
  st.counters["read_ms"] = median(tr_all) * 1e3;
}

// one_token/D/in/out/cold: one token's base product, W0 stored as D on 64-byte aligned
// copies (as the layers store it), six ways each on its own cold copy in rotating order,
// then a plain read of another: the rows one after the other (skinny_stream_rows<1>, what
// short rows take), pairs of rows one after the other, the blocked path (kSkinnyOneTokenRows
// rows side by side, what long rows take), the rows one after the other prefetching 4 KiB
// ahead (tried, not used), 8 rows side by side (the blocked path before with AVX-512; with
// 16 registers the blocked path is these 8 rows, and was them with a prefetch), and for f32
// Eigen's GEMV. Counters: each way's median time and median share of the paired read, and
// over_blocked (median per-iteration ratio to the blocked path).
template <class Wt>
void BM_one_token(benchmark::State& st) {
  namespace kd = molora::kernels::detail;
  using Arch = molora::kernels::default_arch;
  const Index in = st.range(0), out = st.range(1);
  const Index bytes = in * out * Index(sizeof(Wt));
  constexpr int kWays = 6;  // rows1, rows2, blocked, rows1_pf4k, rows8, eigen (f32 only)
  const int ways = std::is_same_v<Wt, float> ? kWays : kWays - 1;
  std::size_t n = static_cast<std::size_t>(std::max(6.0, kColdBytes / double(bytes) + 1));
  while (n % std::size_t(ways + 1) == 0) ++n;
  const std::vector<Wt> w0 = weights_as<Wt>(in, out);
  std::vector<molora::detail::aligned_vector<Wt>> w(n, molora::detail::aligned_vector<Wt>(w0.begin(), w0.end()));
  Eigen::Matrix<float, 1, Eigen::Dynamic> b(out);
  fill(b, 2, 0.02);
  Mat<float> x(1, in), y(1, out);
  fill(x, 3, 1.0);
  alignas(64) float spill[8 * 16];  // unused by one pass of one token
  std::vector<double> t[kWays + 1], share[kWays], over[kWays];
  float sink = 0;
  std::size_t i = 0;
  for (auto _ : st) {
    double tw[kWays + 1] = {};
    for (int pass = 0; pass < ways; ++pass) {
      const int way = (pass + int(i)) % ways;  // rotate which way goes first
      const Wt* wc = w[(std::size_t(ways + 1) * i + std::size_t(pass)) % n].data();
      const double t0 = cpu_seconds();
      if (way == 0)
        kd::skinny_stream_rows<1, Arch, 0>(wc, in, in, x.data(), in, Index(1), b.data(), y.data(), out, Index(0), out);
      else if (way == 1)
        kd::skinny_stream_rows<2, Arch, 0>(wc, in, in, x.data(), in, Index(1), b.data(), y.data(), out, Index(0), out);
      else if (way == 2)
        kd::skinny_product_blocked<Arch>(wc, in, in, x.data(), in, Index(1), b.data(), y.data(), out, Index(0), out);
      else if (way == 3)
        kd::skinny_stream_rows<1, Arch, 4096>(wc, in, in, x.data(), in, Index(1), b.data(), y.data(), out, Index(0), out);
      else if (way == 4)
        kd::skinny_rows_range<8, 1, 0, Arch>(wc, in, in, x.data(), in, Index(1), b.data(), y.data(), out, Index(0), out,
                                             spill);
      else if constexpr (std::is_same_v<Wt, float>) {
        Eigen::Map<const Mat<float>> W(wc, out, in);
        y.noalias() = x * W.transpose();
        y += b;
      }
      benchmark::ClobberMemory();
      tw[way] = cpu_seconds() - t0;
    }
    const Wt* wr = w[(std::size_t(ways + 1) * i + std::size_t(ways)) % n].data();
    ++i;
    const double t0 = cpu_seconds();
    sink += stream_spans({{wr, bytes}});
    tw[kWays] = cpu_seconds() - t0;
    st.SetIterationTime(tw[2]);
    for (int k = 0; k < ways; ++k) {
      t[k].push_back(tw[k]);
      share[k].push_back(tw[k] / tw[kWays]);
      over[k].push_back(tw[k] / tw[2]);
    }
    t[kWays].push_back(tw[kWays]);
  }
  benchmark::DoNotOptimize(sink);
  benchmark::DoNotOptimize(y.data());
  const char* names[kWays] = {"rows1", "rows2", "blocked", "rows1_pf4k", "rows8", "eigen"};
  for (int k = 0; k < ways; ++k) {
    st.counters[std::string(names[k]) + "_ms"] = median(t[k]) * 1e3;
    st.counters[std::string(names[k]) + "_share"] = median(share[k]);
    if (k != 2) st.counters[std::string(names[k]) + "_over_blocked"] = median(over[k]);
  }
  st.counters["read_ms"] = median(t[kWays]) * 1e3;
}

// crossover/D/in/out/T/cold: the layers' base product for T tokens four ways, W0 stored as D
// on 64-byte aligned copies, each way on its own cold copy in rotating order: the skinny
// kernel on x in place (rows in floats apart, as a contiguous [T, in] matrix gives them:
// 64-byte aligned here, so at in = 1024, 2048, 4096 every row in the same L1 sets), the same
// on x 16 bytes off a cache line (Eigen's alignment without -march), detail::base_product's
// skinny (x staged from kStageXFrom tokens) and its gemm (kernels::gemm_product). Counters:
// each way's median time and the medians of staged / in place, staged / misaligned and gemm /
// staged per iteration (below 1: the first is faster).
template <class Wt>
void BM_crossover(benchmark::State& st) {
  const Index in = st.range(0), out = st.range(1), T = st.range(2);
  const Index bytes = in * out * Index(sizeof(Wt));
  constexpr int kWays = 4;
  std::size_t n = static_cast<std::size_t>(std::max(6.0, kColdBytes / double(bytes) + 1));
  while (n % std::size_t(kWays) == 0) ++n;
  const std::vector<Wt> w0 = weights_as<Wt>(in, out);
  std::vector<molora::detail::aligned_vector<Wt>> w(n, molora::detail::aligned_vector<Wt>(w0.begin(), w0.end()));
  std::vector<float> b(static_cast<std::size_t>(out), 0.01f);
  molora::detail::aligned_vector<float> xbuf(static_cast<std::size_t>(T * in + 16));
  for (std::size_t i = 0; i < xbuf.size(); ++i) xbuf[i] = 0.001f * float(i % 997) - 0.5f;
  Mat<float> y(T, out);
  molora::RowRef<float> yr(y);
  std::vector<double> t[kWays], staged_over_inplace, staged_over_misaligned, gemm_over_staged;
  std::size_t i = 0;
  for (auto _ : st) {
    double tw[kWays] = {};
    for (int pass = 0; pass < kWays; ++pass) {
      const int way = (pass + int(i)) % kWays;  // rotate which way goes first
      const Wt* wc = w[(std::size_t(kWays) * i + std::size_t(pass)) % n].data();
      const float* xp = xbuf.data() + (way == 1 ? 4 : 0);
      const double t0 = cpu_seconds();
      if (way <= 1) {
        molora::kernels::skinny_product(molora::kernels::layer_arch{}, wc, in, in, xp, in, T, b.data(), y.data(), out,
                                        Index(0), out);
      } else {
        const Eigen::Map<const Mat<float>> xm(xp, T, in);
        molora::detail::base_product(wc, in, out, b.data(), molora::ConstRowRef<float>(xm), yr,
                                     way == 2 ? molora::BaseStrategy::skinny : molora::BaseStrategy::gemm);
      }
      benchmark::ClobberMemory();
      tw[way] = cpu_seconds() - t0;
    }
    ++i;
    st.SetIterationTime(tw[2]);
    for (int k = 0; k < kWays; ++k) t[k].push_back(tw[k]);
    staged_over_inplace.push_back(tw[2] / tw[0]);
    staged_over_misaligned.push_back(tw[2] / tw[1]);
    gemm_over_staged.push_back(tw[3] / tw[2]);
  }
  benchmark::DoNotOptimize(y.data());
  const char* names[kWays] = {"inplace", "misaligned", "staged", "gemm"};
  for (int k = 0; k < kWays; ++k) st.counters[std::string(names[k]) + "_ms"] = median(t[k]) * 1e3;
  st.counters["staged_over_inplace"] = median(staged_over_inplace);
  st.counters["staged_over_misaligned"] = median(staged_over_misaligned);
  st.counters["gemm_over_staged"] = median(gemm_over_staged);
}

template <class W>
void register_crossover(const char* dtype) {
  const std::vector<std::pair<Index, Index>> shapes = {{4096, 4096}, {1024, 2816}, {2816, 1024}};
  for (const auto& [in, out] : shapes)
    for (Index T : {4, 8, 10, 12, 16, 20, 24, 32, 48, 64, 96})
      benchmark::RegisterBenchmark((std::string("crossover/") + dtype + "/" + std::to_string(in) + "/" +
                                    std::to_string(out) + "/" + std::to_string(T) + "/cold")
                                       .c_str(),
                                   BM_crossover<W>)
          ->Args({in, out, T})
          ->UseManualTime()
          ->MinTime(0.5)
          ->Unit(benchmark::kMillisecond);
}

// `copies` back-to-back copies of one weight block, 64-byte aligned (cold rotation).
template <class Wt>
molora::detail::aligned_vector<Wt> weight_copies(const std::vector<Wt>& one, std::size_t copies) {
  molora::detail::aligned_vector<Wt> all(copies * one.size());
  for (std::size_t c = 0; c < copies; ++c)
    std::copy(one.begin(), one.end(), all.begin() + std::ptrdiff_t(c * one.size()));
  return all;
}

// N ways timed alternately, their order rotating every iteration: run(way) does one timed
// batch of `calls` calls of way 0 .. N - 1. Returns each way's time per call, one entry per
// iteration; the iteration time reported is way `reported`'s batch.
template <std::size_t N, class Run>
std::array<std::vector<double>, N> time_ways(benchmark::State& st, int calls, Run&& run, std::size_t reported = 0) {
  std::array<std::vector<double>, N> t;
  std::size_t i = 0;
  for (auto _ : st) {
    double tw[N] = {};
    for (std::size_t pass = 0; pass < N; ++pass) {
      const std::size_t way = (pass + i) % N;
      const double t0 = cpu_seconds();
      run(static_cast<int>(way));
      benchmark::ClobberMemory();
      tw[way] = cpu_seconds() - t0;
    }
    ++i;
    st.SetIterationTime(tw[reported]);
    for (std::size_t k = 0; k < N; ++k) t[k].push_back(tw[k] / calls);
  }
  return t;
}

// Three ways, way 0's time reported.
template <class Run>
std::array<std::vector<double>, 3> time_three_ways(benchmark::State& st, int calls, Run&& run) {
  return time_ways<3>(st, calls, std::forward<Run>(run));
}

// Counters of a time_three_ways result whose way 2 is the read: <name>_<unit> for each way's
// median time (times `scale`: 1e6 for us, 1e3 for ms), and <name><share> for ways 0 and 1:
// their median over the read's.
inline void three_way_counters(benchmark::State& st, const std::array<std::vector<double>, 3>& t,
                               const std::array<const char*, 3>& names, const char* unit, double scale,
                               const char* share) {
  const double read = median(t[2]);
  for (std::size_t k = 0; k < 3; ++k) st.counters[std::string(names[k]) + "_" + unit] = median(t[k]) * scale;
  for (std::size_t k = 0; k < 2; ++k) st.counters[std::string(names[k]) + share] = median(t[k]) / read;
}

// shrink_rows/D/in/T/cold: one expert's shrink h = A_e x (r = 16, A_e [16, in] stored as D)
// for T = 1-4 tokens, on cold copies of A_e in rotating order, 40 copies per timed batch:
// kernels::shrink as the layers run it, the register blocks before it (shrink_block<8, T>
// for T <= 2, shrink_block<4, T> for T = 3-4; same bits), and a plain read of the same
// bytes. Counters: each median time per call and its share of the read.
template <int RJ, int RT, class Arch, class Wt>
void shrink_blocks_before(const Wt* a, Index r, Index in, const float* const* xs, Index in_vec, float* spill,
                          float* h) {
  for (Index j = 0; j < r; j += RJ)
    molora::kernels::detail::shrink_block<RJ, RT, Arch>(a + j * in, in, xs, Index(0), in_vec, in_vec, in, true, true,
                                                        spill, r * 16, h + j, r);
}

template <class Wt>
void BM_shrink_rows(benchmark::State& st) {
  using Arch = molora::kernels::default_arch;
  const Index in = st.range(0), T = st.range(1), r = 16;
  const Index per = r * in, bytes = per * Index(sizeof(Wt));
  const std::size_t copies = static_cast<std::size_t>(kColdBytes / double(bytes)) + 1;
  const auto a = weight_copies(weights_as<Wt>(in, r), copies);
  Mat<float> x(4, in);
  fill(x, 5, 1.0);
  const float* xs[4] = {x.data(), x.data() + in, x.data() + 2 * in, x.data() + 3 * in};
  alignas(64) float h[4 * 16];
  std::vector<float> spill(static_cast<std::size_t>(4 * r * 16));
  const Index in_vec = in - in % molora::kernels::simd_width<Arch, float>();
  constexpr int kBatch = 40;
  std::size_t c = 0;
  float sink = 0;
  const auto t = time_three_ways(st, kBatch, [&](int way) {
    for (int k = 0; k < kBatch; ++k, c = (c + 1) % copies) {
      const Wt* ac = a.data() + std::ptrdiff_t(c) * per;
      if (way == 0) {
        molora::kernels::shrink(Arch{}, ac, in, r, in, xs, T, h, r, spill.data());
      } else if (way == 1) {
        switch (T) {
          case 1: shrink_blocks_before<8, 1, Arch>(ac, r, in, xs, in_vec, spill.data(), h); break;
          case 2: shrink_blocks_before<8, 2, Arch>(ac, r, in, xs, in_vec, spill.data(), h); break;
          case 3: shrink_blocks_before<4, 3, Arch>(ac, r, in, xs, in_vec, spill.data(), h); break;
          default: shrink_blocks_before<4, 4, Arch>(ac, r, in, xs, in_vec, spill.data(), h); break;
        }
      } else {
        sink += stream_spans({{ac, bytes}});
      }
    }
  });
  benchmark::DoNotOptimize(sink);
  benchmark::DoNotOptimize(h);
  three_way_counters(st, t, {"kernel", "before", "read"}, "us", 1e6, "_share");
}

// The expand's register blocks before expand_few, for n = 1-4 tokens on 32-register ISAs:
// one token off 4 KiB strides one vector per block; otherwise 8 vectors (n <= 2) or 4, then
// 2 and 1, then the scalar columns as the kernel runs them. Same bits as the kernel.
template <class Arch, class Wt>
void expand_before(const Wt* bt, Index ldb, Index r, Index out, const float* const* h, const float* scale, Index n,
                   float* const* y) {
  using molora::kernels::detail::expand_block;
  using molora::kernels::detail::expand_columns;
  constexpr Index W = molora::kernels::simd_width<Arch, float>();
  const Index out_vec = out - out % W;
  Index o = 0;
  if (n == 1 && (ldb * Index(sizeof(Wt))) % 4096 != 0)
    for (; o + W <= out_vec; o += W) expand_block<1, 1, Arch>(bt, ldb, r, h, scale, y, o);
  if (n <= 2)
    for (; o + 8 * W <= out_vec; o += 8 * W) expand_columns<8, Arch>(bt, ldb, r, h, scale, n, y, o);
  for (; o + 4 * W <= out_vec; o += 4 * W) expand_columns<4, Arch>(bt, ldb, r, h, scale, n, y, o);
  if (o + 2 * W <= out_vec) {
    expand_columns<2, Arch>(bt, ldb, r, h, scale, n, y, o);
    o += 2 * W;
  }
  if (o < out_vec) {
    expand_columns<1, Arch>(bt, ldb, r, h, scale, n, y, o);
    o += W;
  }
  if (o < out) {
    float* tail[4];
    for (Index t = 0; t < n; ++t) tail[t] = y[t] + o;
    molora::kernels::expand(Arch{}, bt + o, ldb, r, out - o, h, scale, n, tail);
  }
}

// expand_rows/D/out/n/warm|cold: one expert's expand y += s * B_e^T h for n = 1-4 tokens
// (r = 16, B_e^T [16, out] stored as D, rows out apart), on cold copies in rotating order or
// on one warm copy, 40 calls per timed batch: kernels::expand as the layers run it, the
// blocks before it (expand_before) and a plain read of the same bytes. Counters: each median
// time per call and its share of the read.
template <class Wt>
void BM_expand_rows(benchmark::State& st) {
  using Arch = molora::kernels::default_arch;
  const Index out = st.range(0), n = st.range(1), r = 16;
  const bool cold = st.range(2) != 0;
  const Index per = r * out, bytes = per * Index(sizeof(Wt));
  const std::size_t copies = cold ? static_cast<std::size_t>(kColdBytes / double(bytes)) + 1 : 1;
  const auto b = weight_copies(weights_as<Wt>(out, r), copies);
  alignas(64) float h[4][16];
  for (Index t = 0; t < 4; ++t)
    for (Index j = 0; j < r; ++j) h[t][j] = 0.25f - 0.03f * float(j) + 0.01f * float(t);
  const float* hs[4] = {h[0], h[1], h[2], h[3]};
  const float scale[4] = {0.5f, 0.4f, 0.3f, 0.2f};
  std::vector<float> y(static_cast<std::size_t>(4 * out), 0.f);
  float* ys[4] = {y.data(), y.data() + out, y.data() + 2 * out, y.data() + 3 * out};
  constexpr int kBatch = 40;
  std::size_t c = 0;
  float sink = 0;
  const auto t = time_three_ways(st, kBatch, [&](int way) {
    for (int k = 0; k < kBatch; ++k, c = (c + 1) % copies) {
      const Wt* bc = b.data() + std::ptrdiff_t(c) * per;
      if (way == 0)
        molora::kernels::expand(Arch{}, bc, out, r, out, hs, scale, n, ys);
      else if (way == 1)
        expand_before<Arch>(bc, out, r, out, hs, scale, n, ys);
      else
        sink += stream_spans({{bc, bytes}});
    }
  });
  benchmark::DoNotOptimize(sink);
  benchmark::DoNotOptimize(y.data());
  three_way_counters(st, t, {"kernel", "before", "read"}, "us", 1e6, "_share");
}

// skinny_limit/D/in/out/T: where the skinny product's cold time is bounded from below. Three
// ways alternately, each iteration rotating their order: (0) skinny_product over a cold copy
// of W0 [out, in] on x staged as base_product stages it (rows staged_stride apart, from 5
// tokens), (1) the same product with its weight bytes already in L2: out / 32 calls over
// blocks of 32 rows of one buffer (512 KiB of f32 at in = 4096), the same arithmetic and
// loads with memory taken out, (2) a plain read of a cold copy. If (1) is near (2), the
// product can reach the read only by overlapping its arithmetic with memory completely.
// Beside them the time of the product's FMAs at the core's FMA peak (peak_ms, and over the
// read) and the hot way's share of that peak.
template <class Wt>
void BM_skinny_limit(benchmark::State& st) {
  using Arch = molora::kernels::layer_arch;
  const Index in = st.range(0), out = st.range(1), T = st.range(2), hot_rows = 32;
  const Index per = in * out, bytes = per * Index(sizeof(Wt));
  const std::size_t copies = static_cast<std::size_t>(kColdBytes / double(bytes)) + 1;
  const auto w = weight_copies(weights_as<Wt>(in, out), copies);
  const Index ldx = T >= molora::detail::kStageXFrom ? molora::detail::staged_stride<float>(in) : in;
  molora::detail::aligned_vector<float> x(static_cast<std::size_t>(T * ldx));
  for (Index i = 0; i < T * ldx; ++i) x[static_cast<std::size_t>(i)] = 0.5f - 0.001f * float(i % 997);
  Mat<float> y(T, out);
  std::size_t c = 0;
  float sink = 0;
  const auto t = time_three_ways(st, 1, [&](int way) {
    const Wt* wc = w.data() + std::ptrdiff_t(c) * per;
    c = (c + 1) % copies;
    if (way == 0) {
      molora::kernels::skinny_product(Arch{}, wc, in, in, x.data(), ldx, T, static_cast<const float*>(nullptr),
                                      y.data(), out, Index(0), out);
    } else if (way == 1) {
      for (Index o = 0; o < out; o += hot_rows)
        molora::kernels::skinny_product(Arch{}, w.data(), in, in, x.data(), ldx, T, static_cast<const float*>(nullptr),
                                        y.data() + o, out, Index(0), std::min(hot_rows, out - o));
    } else {
      sink += stream_spans({{wc, bytes}});
    }
  });
  benchmark::DoNotOptimize(sink);
  benchmark::DoNotOptimize(y.data());
  three_way_counters(st, t, {"cold", "hot", "read"}, "ms", 1e3, "_over_read");
  const double flop = 2.0 * double(in) * double(out) * double(T), peak = bench_peak::measure_fma_peak(1) * 1e9;
  st.counters["hot_gflops"] = flop / median(t[1]) * 1e-9;
  // the product's FMAs at this core's peak (register-only FMAs, measured here): no kernel
  // that does them on one core can take less, cold or hot
  st.counters["peak_ms"] = flop / peak * 1e3;
  st.counters["peak_over_read"] = flop / peak / median(t[2]);
  st.counters["hot_of_peak"] = flop / median(t[1]) / peak;
}

template <class W>
void register_skinny_limit(const char* dtype) {
  for (Index T : {1, 2, 4, 8})
    benchmark::RegisterBenchmark((std::string("skinny_limit/") + dtype + "/4096/4096/" + std::to_string(T)).c_str(),
                                 BM_skinny_limit<W>)
        ->Args({4096, 4096, T})
        ->UseManualTime()
        ->MinTime(0.5)
        ->Unit(benchmark::kMillisecond);
}

template <class W>
void register_expand_rows(const char* dtype) {
  for (int cold : {1, 0})
    for (Index out : {1024, 2816, 4096, 11008})
      for (Index n : {1, 2, 3, 4})
        benchmark::RegisterBenchmark((std::string("expand_rows/") + dtype + "/" + std::to_string(out) + "/" +
                                      std::to_string(n) + (cold ? "/cold" : "/warm"))
                                         .c_str(),
                                     BM_expand_rows<W>)
            ->Args({out, n, cold})
            ->UseManualTime()
            ->MinTime(0.3)
            ->Unit(benchmark::kMicrosecond);
}

template <class W>
void register_shrink_rows(const char* dtype) {
  for (Index in : {512, 1024, 2816, 4096})
    for (Index T : {1, 2, 3, 4})
      benchmark::RegisterBenchmark((std::string("shrink_rows/") + dtype + "/" + std::to_string(in) + "/" +
                                    std::to_string(T) + "/cold")
                                       .c_str(),
                                   BM_shrink_rows<W>)
          ->Args({in, T})
          ->UseManualTime()
          ->MinTime(0.3)
          ->Unit(benchmark::kMicrosecond);
}

template <class W>
void register_one_token(const char* dtype) {
  for (auto [in, out] : {std::pair<Index, Index>{1024, 4096}, {2816, 4096}, {4096, 4096}, {2816, 1024}})
    benchmark::RegisterBenchmark((std::string("one_token/") + dtype + "/" + std::to_string(in) + "/" +
                                  std::to_string(out) + "/cold")
                                     .c_str(),
                                 BM_one_token<W>)
        ->Args({in, out})
        ->UseManualTime()
        ->MinTime(0.5)
        ->Unit(benchmark::kMillisecond);
}

template <class W>
void register_skinny_paths(const char* dtype) {
  for (int cold : {1, 0})
    for (Index T : {1, 2, 4, 6, 8})
      benchmark::RegisterBenchmark((std::string("skinny_paths/") + dtype + "/4096/4096/" + std::to_string(T) +
                                    (cold ? "/cold" : "/warm"))
                                       .c_str(),
                                   BM_skinny_paths<W>)
          ->Args({4096, 4096, T, cold})
          ->UseManualTime()
          ->MinTime(0.3)
          ->Unit(benchmark::kMillisecond);
}

template <class W>
void register_skinny(const char* dtype) {
  for (int cold : {1, 0})
    for (Index T : {1, 2, 4, 8})
      benchmark::RegisterBenchmark(
          (std::string("skinny/") + dtype + "/4096/4096/" + std::to_string(T) + (cold ? "/cold" : "/warm")).c_str(),
          BM_skinny<W>)
          ->Args({4096, 4096, T, cold})
          ->UseManualTime()
          ->MinTime(0.3)
          ->Unit(benchmark::kMillisecond);
}

template <class W>
void register_whole_layer(const char* dtype) {
  for (int eigen_base : {0, 1})
    for (int cold : {1, 0})
      for (Index T : {1, 2, 4, 8, 12, 16, 24, 32, 64, 256}) {
        if (eigen_base && (!cold || T > 8 || !std::is_same_v<W, float>)) continue;
        benchmark::RegisterBenchmark((std::string("whole_layer/") + dtype + "/4096/4096/" + std::to_string(T) +
                                      (cold ? "/cold" : "/warm") + (eigen_base ? "/eigen_base" : ""))
                                         .c_str(),
                                     BM_whole_layer<W>)
            ->Args({4096, 4096, T, cold, eigen_base})
            ->UseManualTime()
            ->MinTime(0.5)
            ->Unit(benchmark::kMillisecond);
      }
}

// The router and the A_e, B_e of the experts x routes to (weight_spans without the base).
template <class W>
Spans adapter_spans(const Layer<W>& l, const Mat<float>& x) {
  Spans s = weight_spans(l, x);
  s.erase(s.begin(), s.begin() + 2);  // W0 and its bias
  return s;
}

// adapter_in_layer/D/in/out/T: four copies per iteration (the forward, the base alone, the
// adapter alone, the read), stepping by 4 over n copies with n odd, so every copy comes back
// only after all the others (cold). The adapter alone adds its delta to y as forward does
// after the base product; y is reset to the base's output outside the timing.
template <class W>
void BM_adapter_in_layer(benchmark::State& st) {
  const Index in = st.range(0), out = st.range(1), T = st.range(2);
  auto& layers = layers_for<W>(in, out, true);
  std::size_t n = layers.size();
  if (n % 2 == 0) --n;  // odd: prime to the step of 4
  if (n < 5) {
    st.SkipWithError("needs at least 5 cold layer copies");
    return;
  }
  Mat<float> x(T, in);
  fill(x, 11 + static_cast<std::uint64_t>(T), 1.0);
  Mat<float> y(T, out), base_y(T, out);
  molora::MoLoRAWorkspace<float> ws;
  std::vector<Spans> spans;
  for (std::size_t i = 0; i < n; ++i) spans.push_back(adapter_spans(*layers[i], x));
  layers[0]->forward(x, y, ws);  // sizes the workspace
  layers[0]->forward_base(x, base_y);
  std::vector<double> fwd, base, adapter, rd, added_ratio, adapter_ratio;
  float sink = 0;
  std::size_t i = 0;
  for (auto _ : st) {
    const std::size_t c0 = (4 * i) % n, c1 = (4 * i + 1) % n, c2 = (4 * i + 2) % n, c3 = (4 * i + 3) % n;
    ++i;
    double t0 = cpu_seconds();
    layers[c0]->forward(x, y, ws);
    benchmark::ClobberMemory();
    const double tf = cpu_seconds() - t0;
    t0 = cpu_seconds();
    layers[c1]->forward_base(x, base_y);
    benchmark::ClobberMemory();
    const double tb = cpu_seconds() - t0;
    y = base_y;
    t0 = cpu_seconds();
    layers[c2]->adapter().add_delta(x, y, ws);
    benchmark::ClobberMemory();
    const double ta = cpu_seconds() - t0;
    t0 = cpu_seconds();
    sink += stream_spans(spans[c3]);
    const double tr = cpu_seconds() - t0;
    st.SetIterationTime(tf);
    fwd.push_back(tf);
    base.push_back(tb);
    adapter.push_back(ta);
    rd.push_back(tr);
    added_ratio.push_back((tf - tb) / tr);
    adapter_ratio.push_back(ta / tr);
  }
  benchmark::DoNotOptimize(sink);
  benchmark::DoNotOptimize(y.data());
  const double read = median(rd);
  st.counters["forward_ms"] = median(fwd) * 1e3;
  st.counters["base_ms"] = median(base) * 1e3;
  st.counters["added_ms"] = (median(fwd) - median(base)) * 1e3;
  st.counters["adapter_ms"] = median(adapter) * 1e3;
  st.counters["read_ms"] = read * 1e3;
  st.counters["added_over_read"] = (median(fwd) - median(base)) / read;
  st.counters["adapter_over_read"] = median(adapter_ratio);
}

// gemm/D/in/out/T: both strategies of detail::base_product on the same weights, in turns.
template <class W>
void BM_gemm(benchmark::State& st) {
  const Index in = st.range(0), out = st.range(1), T = st.range(2);
  Mat<float> wf(out, in), x(T, in), bias(1, out), y(T, out);
  fill(wf, 3, 0.05);
  fill(x, 5 + static_cast<std::uint64_t>(T), 1.0);
  fill(bias, 7, 0.1);
  std::vector<W> w(static_cast<std::size_t>(in * out));
  for (Index i = 0; i < in * out; ++i) {
    if constexpr (std::is_same_v<W, float>)
      w[static_cast<std::size_t>(i)] = wf.data()[i];
    else if constexpr (std::is_same_v<W, molora::bf16>)
      w[static_cast<std::size_t>(i)] = molora::to_bf16(wf.data()[i]);
    else
      w[static_cast<std::size_t>(i)] = molora::to_f16(wf.data()[i]);
  }
  const molora::ConstRowRef<float> xr(x);
  molora::RowRef<float> yr(y);
  auto run = [&](molora::BaseStrategy how) {
    const double t0 = cpu_seconds();
    molora::detail::base_product(w.data(), in, out, bias.data(), xr, yr, how);
    benchmark::ClobberMemory();
    return cpu_seconds() - t0;
  };
  run(molora::BaseStrategy::gemm);  // warms the weights and the scratch
  run(molora::BaseStrategy::eigen);
  std::vector<double> tg, te, ratio;
  for (auto _ : st) {
    const double g = run(molora::BaseStrategy::gemm);
    const double e = run(molora::BaseStrategy::eigen);
    st.SetIterationTime(g);
    tg.push_back(g);
    te.push_back(e);
    ratio.push_back(g / e);
  }
  benchmark::DoNotOptimize(y.data());
  const double flop = 2.0 * double(in) * double(out) * double(T);
  st.counters["gemm_over_eigen"] = median(ratio);
  st.counters["gemm_gflops"] = flop / median(tg) * 1e-9;
  st.counters["eigen_gflops"] = flop / median(te) * 1e-9;
}

template <class W>
void register_gemm(const std::string& d) {
  const std::vector<std::pair<Index, Index>> shapes = {{4096, 4096}, {1024, 2816}, {2816, 1024}, {1024, 1024},
                                                       {1024, 128}};
  for (const auto& [in, out] : shapes)
    for (Index T : {128, 256, 512, 1024})
      benchmark::RegisterBenchmark(
          ("gemm/" + d + "/" + std::to_string(in) + "/" + std::to_string(out) + "/" + std::to_string(T)).c_str(),
          BM_gemm<W>)
          ->Args({in, out, T})
          ->UseManualTime()
          ->MinTime(0.2)
          ->Unit(benchmark::kMillisecond);
}

// ---- few tokens at the memory limit: the yardstick, cache-set aliasing, two threads --------
//   read_variants/D/4096/4096/cold  plain reads of W0's bytes (D = f32 or bf16), each on its
//                                   own cold copy, alternately in one loop: stream_spans (one
//                                   sequential stream, 8 vectors of the widest ISA in
//                                   flight), the same with 256-bit vectors, and R = 4, 8, 16
//                                   rows side by side (R streams, as a GEMV over R rows
//                                   reads W0). Counters: each median time and its median
//                                   ratio to stream_spans.
//   skinny_ldw/D/4096/4096/T/cold   skinny_product (as the layer runs it) over W0 stored with
//                                   leading dimension in, in + 16 and in + 32 (rows 16 KiB
//                                   apart for f32 map to the same L1 sets), alternately.
//                                   Counters: each median time, pad16_over_ldw and
//                                   pad32_over_ldw (medians of the ratios).
//   layer_reads/D/4096/4096/T/cold  whole_layer with two yardsticks in one loop: forward,
//                                   stream_spans over its weights (read_share, as
//                                   whole_layer) and the best read above (W0 in 8 rows side
//                                   by side, then the other spans; rows_read_share).
//   threads_read/4096/4096/cold     (OpenMP builds) a plain read of a cold 64 MiB W0 by one
//                                   thread, then by two threads each reading half of the
//                                   rows (8 rows side by side); counter two_over_one =
//                                   median of one-thread time / two-thread time.
//   threads_base/D/4096/4096/T      (OpenMP builds) the base product alone on 1 and 2 threads
//                                   beside a sequential read of W0 by one core and by two
//   threads_layer/D/4096/4096/T     (OpenMP builds) whole-layer forward with 1 and with 2
//                                   threads, each on its own cold copy, alternately;
//                                   counter speedup = median of 1-thread / 2-thread time.

// Reads `rows` rows of row_bytes (a multiple of 4 floats' width) R at a time side by side,
// one vector accumulator per row: R streams through memory.
template <int R>
float stream_rows(const void* data, Index rows, Index row_bytes) {
#if defined(MOLORA_NO_XSIMD)
  return stream_spans({{data, rows * row_bytes}});
#else
  using B = xsimd::batch<float, molora::kernels::default_arch>;
  constexpr Index W = static_cast<Index>(B::size);
  const Index n = row_bytes / Index(sizeof(float)) / W * W;
  B acc[R];
  for (int u = 0; u < R; ++u) acc[u] = B(0.f);
  const auto* p = static_cast<const float*>(data);
  const Index ld = row_bytes / Index(sizeof(float));
  Index o = 0;
  for (; o + R <= rows; o += R)
    for (Index i = 0; i < n; i += W) {
      MOLORA_UNROLL
      for (int u = 0; u < R; ++u) acc[u] += B::load_unaligned(p + (o + u) * ld + i);
    }
  float tail = o < rows ? stream_spans({{p + o * ld, (rows - o) * row_bytes}}) : 0.f;
  B sum = acc[0];
  for (int u = 1; u < R; ++u) sum += acc[u];
  return tail + xsimd::hadd(sum);
#endif
}

// One sequential stream, 8 vectors of 256 bits in flight (stream_spans with half-width loads).
float stream_256(const void* data, Index bytes) {
#if defined(MOLORA_NO_XSIMD) || !defined(__AVX__)
  return stream_spans({{data, bytes}});
#else
  using B = xsimd::batch<float, xsimd::avx>;
  B acc[8];
  for (auto& a : acc) a = B(0.f);
  const auto* p = static_cast<const float*>(data);
  const Index n = bytes / Index(sizeof(float)) / 64 * 64;
  for (Index i = 0; i < n; i += 64) {
    MOLORA_UNROLL
    for (int u = 0; u < 8; ++u) acc[u] += B::load_unaligned(p + i + 8 * u);
  }
  B sum = acc[0];
  for (int u = 1; u < 8; ++u) sum += acc[u];
  return xsimd::hadd(sum);
#endif
}

// Copies of W0 (rows of `ld` values, the first `in` of them set) for a cold rotation of
// at least `min_copies` copies per pass, n prime to `step`.
template <class Wt>
std::vector<std::vector<Wt>> cold_copies(Index in, Index ld, Index out, bool cold, std::size_t step) {
  const double bytes = double(ld) * double(out) * sizeof(Wt);
  std::size_t n = cold ? static_cast<std::size_t>(std::max(double(step) + 1, kColdBytes / bytes + 1)) : 1;
  while (cold && std::gcd(n, step) != 1) ++n;
  const std::vector<Wt> packed = weights_as<Wt>(in, out);
  std::vector<Wt> w(static_cast<std::size_t>(ld * out), Wt{});
  for (Index o = 0; o < out; ++o)
    std::copy(packed.begin() + o * in, packed.begin() + (o + 1) * in, w.begin() + o * ld);
  return std::vector<std::vector<Wt>>(n, w);
}

// Times V kernels (run(v, weights)) and a plain read in one loop, each on a copy of W0 of its
// own (cold copies rotate past the LLC; a warm run has one copy), the order of the V rotating
// from one iteration to the next. Returns each way's per-iteration times, the read's last;
// way `manual` gives the iteration's time.
template <std::size_t V, class Wt, class Run>
std::array<std::vector<double>, V + 1> time_rotating(benchmark::State& st, const std::vector<std::vector<Wt>>& w,
                                                     Index bytes, std::size_t manual, Run&& run) {
  std::array<std::vector<double>, V + 1> t;
  const std::size_t n = w.size();
  float sink = 0;
  std::size_t i = 0;
  for (auto _ : st) {
    double tv[V];
    for (std::size_t k = 0; k < V; ++k) {
      const std::size_t v = (k + i) % V;
      const double t0 = cpu_seconds();
      run(v, w[((V + 1) * i + k) % n].data());
      benchmark::ClobberMemory();
      tv[v] = cpu_seconds() - t0;
    }
    const std::size_t c = ((V + 1) * i + V) % n;
    ++i;
    const double t0 = cpu_seconds();
    sink += stream_spans({{w[c].data(), bytes}});
    t[V].push_back(cpu_seconds() - t0);
    st.SetIterationTime(tv[manual]);
    for (std::size_t v = 0; v < V; ++v) t[v].push_back(tv[v]);
  }
  benchmark::DoNotOptimize(sink);
  return t;
}

// The median over iterations of a[i] / b[i].
inline double median_ratio(const std::vector<double>& a, const std::vector<double>& b) {
  std::vector<double> r(a.size());
  for (std::size_t i = 0; i < a.size(); ++i) r[i] = a[i] / b[i];
  return median(r);
}

template <class Wt>
void BM_read_variants(benchmark::State& st) {
  const Index in = st.range(0), out = st.range(1);
  const Index row_bytes = in * Index(sizeof(Wt)), bytes = out * row_bytes;
  const char* names[] = {"stream_spans", "stream_256", "rows4", "rows8", "rows16"};
  constexpr std::size_t V = 5;
  auto w = cold_copies<Wt>(in, in, out, true, V);
  const std::size_t n = w.size();
  std::vector<double> t[V], ratio[V];
  float sink = 0;
  std::size_t i = 0;
  for (auto _ : st) {
    double tv[V];
    for (std::size_t v = 0; v < V; ++v) {
      const void* p = w[(V * i + v) % n].data();
      const double t0 = cpu_seconds();
      switch (v) {
        case 0: sink += stream_spans({{p, bytes}}); break;
        case 1: sink += stream_256(p, bytes); break;
        case 2: sink += stream_rows<4>(p, out, row_bytes); break;
        case 3: sink += stream_rows<8>(p, out, row_bytes); break;
        default: sink += stream_rows<16>(p, out, row_bytes); break;
      }
      tv[v] = cpu_seconds() - t0;
      t[v].push_back(tv[v]);
      ratio[v].push_back(tv[v] / tv[0]);
    }
    ++i;
    st.SetIterationTime(tv[0]);
  }
  benchmark::DoNotOptimize(sink);
  for (std::size_t v = 0; v < V; ++v) {
    st.counters[std::string(names[v]) + "_ms"] = median(t[v]) * 1e3;
    if (v) st.counters[std::string(names[v]) + "_over_spans"] = median(ratio[v]);
  }
}

template <class Wt>
void BM_skinny_ldw(benchmark::State& st) {
  const Index in = st.range(0), out = st.range(1), T = st.range(2);
  const Index ld = in + 32;
  auto w = cold_copies<Wt>(in, ld, out, true, 3);
  const std::size_t n = w.size();
  Eigen::Matrix<float, 1, Eigen::Dynamic> b(out);
  fill(b, 2, 0.02);
  Mat<float> x(T, in), y(T, out);
  fill(x, 3, 1.0);
  const Index lds[3] = {in, in + 16, in + 32};
  std::vector<double> t[3], r16, r32;
  std::size_t i = 0;
  for (auto _ : st) {
    double tv[3];
    for (int v = 0; v < 3; ++v) {
      const int k = (v + int(i)) % 3;  // rotating order
      const Wt* p = w[(3 * i + std::size_t(v)) % n].data();
      const double t0 = cpu_seconds();
      molora::kernels::skinny_product(molora::kernels::layer_arch{}, p, lds[k], in, x.data(), in, T, b.data(), y.data(),
                                      out, Index(0), out);  // [T, out]
      benchmark::ClobberMemory();
      tv[k] = cpu_seconds() - t0;
    }
    ++i;
    for (int k = 0; k < 3; ++k) t[k].push_back(tv[k]);
    r16.push_back(tv[1] / tv[0]);
    r32.push_back(tv[2] / tv[0]);
    st.SetIterationTime(tv[0]);
  }
  benchmark::DoNotOptimize(y.data());
  st.counters["ldw_ms"] = median(t[0]) * 1e3;
  st.counters["pad16_ms"] = median(t[1]) * 1e3;
  st.counters["pad32_ms"] = median(t[2]) * 1e3;
  st.counters["pad16_over_ldw"] = median(r16);
  st.counters["pad32_over_ldw"] = median(r32);
}

// The best plain read of the layer's weights (read_variants): W0 in 8 rows side by side, then the rest.
template <class W>
float read_rows_then_rest(const Layer<W>& l, const Spans& spans) {
  float s = stream_rows<8>(l.base_weight_data(), l.out_features(), l.in_features() * Index(sizeof(W)));
  return s + stream_spans(Spans(spans.begin() + 1, spans.end()));
}

template <class W>
void BM_layer_reads(benchmark::State& st) {
  const Index in = st.range(0), out = st.range(1), T = st.range(2);
  auto& layers = layers_for<W>(in, out, true);
  std::size_t n = layers.size();
  while (n % 3 == 0) --n;
  Mat<float> x(T, in);
  fill(x, 7 + static_cast<std::uint64_t>(T), 1.0);
  Mat<float> y(T, out);
  molora::MoLoRAWorkspace<float> ws;
  std::vector<Spans> spans;
  for (std::size_t i = 0; i < n; ++i) {
    layers[i]->set_base_strategy(molora::BaseStrategy::automatic);
    spans.push_back(weight_spans(*layers[i], x));
  }
  layers[0]->forward(x, y, ws);
  std::vector<double> fwd, rd, rr, share, rshare;
  float sink = 0;
  std::size_t i = 0;
  for (auto _ : st) {
    const std::size_t c0 = (3 * i) % n, c1 = (3 * i + 1) % n, c2 = (3 * i + 2) % n;
    ++i;
    const double t0 = cpu_seconds();
    layers[c0]->forward(x, y, ws);
    benchmark::ClobberMemory();
    const double t1 = cpu_seconds();
    sink += stream_spans(spans[c1]);
    const double t2 = cpu_seconds();
    sink += read_rows_then_rest(*layers[c2], spans[c2]);
    const double t3 = cpu_seconds();
    st.SetIterationTime(t1 - t0);
    fwd.push_back(t1 - t0);
    rd.push_back(t2 - t1);
    rr.push_back(t3 - t2);
    share.push_back((t1 - t0) / (t2 - t1));
    rshare.push_back((t1 - t0) / (t3 - t2));
  }
  benchmark::DoNotOptimize(sink);
  benchmark::DoNotOptimize(y.data());
  st.counters["forward_ms"] = median(fwd) * 1e3;
  st.counters["read_ms"] = median(rd) * 1e3;
  st.counters["rows_read_ms"] = median(rr) * 1e3;
  st.counters["read_share"] = median(share);
  st.counters["rows_read_share"] = median(rshare);
}

#if defined(MOLORA_USE_OPENMP)
void BM_threads_read(benchmark::State& st) {
  const Index in = st.range(0), out = st.range(1);
  auto w = cold_copies<float>(in, in, out, true, 2);
  const std::size_t n = w.size();
  const Index row_bytes = in * Index(sizeof(float));
  std::vector<double> t1s, t2s, ratio;
  float sink = 0;
  std::size_t i = 0;
  for (auto _ : st) {
    const float* a = w[(2 * i) % n].data();
    const float* b = w[(2 * i + 1) % n].data();
    ++i;
    double t0 = cpu_seconds();
    sink += stream_rows<8>(a, out, row_bytes);
    const double one = cpu_seconds() - t0;
    float s2 = 0;
    t0 = cpu_seconds();
#pragma omp parallel num_threads(2) reduction(+ : s2)
    {
      const Index p = omp_get_thread_num(), P = omp_get_num_threads();
      const Index o0 = out * p / P, o1 = out * (p + 1) / P;
      s2 += stream_rows<8>(b + o0 * in, o1 - o0, row_bytes);
    }
    const double two = cpu_seconds() - t0;
    sink += s2;
    t1s.push_back(one);
    t2s.push_back(two);
    ratio.push_back(one / two);
    st.SetIterationTime(two);
  }
  benchmark::DoNotOptimize(sink);
  st.counters["one_ms"] = median(t1s) * 1e3;
  st.counters["two_ms"] = median(t2s) * 1e3;
  st.counters["two_over_one"] = median(ratio);
}

// threads_base/D/in/out/T: the base product alone (detail::base_product, strategy skinny, as
// the layer runs it: rows split between the threads) on 1 and on 2 threads, beside a plain
// sequential read of W0 by one core and by two (each its half), four ways on cold copies,
// their order rotating every iteration. two_over_read2 is how close two threads come to what
// two cores can read; read_speedup what the memory gives a second core at all.
template <class Wt>
void BM_threads_base(benchmark::State& st) {
  const Index in = st.range(0), out = st.range(1), T = st.range(2);
  const Index per = in * out, bytes = per * Index(sizeof(Wt));
  const std::size_t copies = static_cast<std::size_t>(kColdBytes / double(bytes)) + 1;
  const auto w = weight_copies(weights_as<Wt>(in, out), copies);
  Mat<float> x(T, in);
  fill(x, 11 + static_cast<std::uint64_t>(T), 1.0);
  Mat<float> y(T, out);
  const molora::ConstRowRef<float> xr(x);
  molora::RowRef<float> yr(y);
  const int max_threads = omp_get_max_threads();
  std::size_t c = 0;
  float sink = 0;
  // ways: 0 base on 1 thread, 1 base on 2, 2 read by one core, 3 read by two; two threads' time reported
  const auto t = time_ways<4>(
      st, 1,
      [&](int way) {
        const Wt* wc = w.data() + std::ptrdiff_t(c) * per;
        c = (c + 1) % copies;
        if (way < 2) {
          omp_set_num_threads(way + 1);
          molora::detail::base_product(wc, in, out, static_cast<const float*>(nullptr), xr, yr,
                                       molora::BaseStrategy::skinny);
        } else if (way == 2) {
          sink += stream_spans({{wc, bytes}});
        } else {
          float s2 = 0;
#pragma omp parallel num_threads(2) reduction(+ : s2)
          {
            const Index half = bytes / 2 / 64 * 64, p = omp_get_thread_num();
            s2 += stream_spans({{reinterpret_cast<const char*>(wc) + p * half, p == 0 ? half : bytes - half}});
          }
          sink += s2;
        }
      },
      1);
  omp_set_num_threads(max_threads);
  benchmark::DoNotOptimize(sink);
  benchmark::DoNotOptimize(y.data());
  std::vector<double> speedup, read_speedup, two_over_read2, one_over_read1;
  for (std::size_t j = 0; j < t[0].size(); ++j) {
    speedup.push_back(t[0][j] / t[1][j]);
    read_speedup.push_back(t[2][j] / t[3][j]);
    two_over_read2.push_back(t[1][j] / t[3][j]);
    one_over_read1.push_back(t[0][j] / t[2][j]);
  }
  st.counters["one_ms"] = median(t[0]) * 1e3;
  st.counters["two_ms"] = median(t[1]) * 1e3;
  st.counters["read1_ms"] = median(t[2]) * 1e3;
  st.counters["read2_ms"] = median(t[3]) * 1e3;
  st.counters["speedup"] = median(speedup);
  st.counters["read_speedup"] = median(read_speedup);
  st.counters["one_over_read1"] = median(one_over_read1);
  st.counters["two_over_read2"] = median(two_over_read2);
}

template <class W>
void BM_threads_layer(benchmark::State& st) {
  const Index in = st.range(0), out = st.range(1), T = st.range(2);
  auto& layers = layers_for<W>(in, out, true);
  const std::size_t n = layers.size() / 2 * 2 - 1;  // odd: prime to the step of 2
  Mat<float> x(T, in);
  fill(x, 7 + static_cast<std::uint64_t>(T), 1.0);
  Mat<float> y(T, out);
  molora::MoLoRAWorkspace<float> ws;
  for (std::size_t c = 0; c < n; ++c) layers[c]->set_base_strategy(molora::BaseStrategy::automatic);
  const int max_threads = omp_get_max_threads();
  omp_set_num_threads(2);
  layers[0]->forward(x, y, ws);
  std::vector<double> t1s, t2s, ratio;
  std::size_t i = 0;
  for (auto _ : st) {
    double tv[2];
    for (int k = 0; k < 2; ++k) {
      const int threads = (k + int(i)) % 2 + 1;  // alternating order
      omp_set_num_threads(threads);
      const std::size_t c = (2 * i + std::size_t(k)) % n;
      const double t0 = cpu_seconds();
      layers[c]->forward(x, y, ws);
      benchmark::ClobberMemory();
      tv[threads - 1] = cpu_seconds() - t0;
    }
    ++i;
    t1s.push_back(tv[0]);
    t2s.push_back(tv[1]);
    ratio.push_back(tv[0] / tv[1]);
    st.SetIterationTime(tv[1]);
  }
  omp_set_num_threads(max_threads);
  benchmark::DoNotOptimize(y.data());
  st.counters["one_ms"] = median(t1s) * 1e3;
  st.counters["two_ms"] = median(t2s) * 1e3;
  st.counters["speedup"] = median(ratio);
}
#endif

void register_few_tokens_limits() {
  auto reg = [](const std::string& name, auto fn, std::vector<int64_t> args) {
    benchmark::RegisterBenchmark(name.c_str(), fn)->Args(args)->UseManualTime()->MinTime(0.3)->Unit(
        benchmark::kMillisecond);
  };
  reg("read_variants/f32/4096/4096/cold", BM_read_variants<float>, {4096, 4096});
  reg("read_variants/bf16/4096/4096/cold", BM_read_variants<molora::bf16>, {4096, 4096});
  // One dtype after the other: layers_for keeps the layer copies of one dtype only.
  for (Index T : {1, 2, 4, 8})
    reg("skinny_ldw/f32/4096/4096/" + std::to_string(T) + "/cold", BM_skinny_ldw<float>, {4096, 4096, T});
  for (Index T : {1, 2, 4, 8})
    reg("skinny_ldw/bf16/4096/4096/" + std::to_string(T) + "/cold", BM_skinny_ldw<molora::bf16>, {4096, 4096, T});
  for (Index T : {1, 2, 4, 8})
    reg("layer_reads/f32/4096/4096/" + std::to_string(T) + "/cold", BM_layer_reads<float>, {4096, 4096, T});
  for (Index T : {1, 2, 4, 8})
    reg("layer_reads/bf16/4096/4096/" + std::to_string(T) + "/cold", BM_layer_reads<molora::bf16>, {4096, 4096, T});
#if defined(MOLORA_USE_OPENMP)
  reg("threads_read/4096/4096/cold", BM_threads_read, {4096, 4096});
  for (Index T : {1, 2, 4, 8})
    reg("threads_layer/f32/4096/4096/" + std::to_string(T), BM_threads_layer<float>, {4096, 4096, T});
  for (Index T : {1, 2, 4, 8})
    reg("threads_layer/bf16/4096/4096/" + std::to_string(T), BM_threads_layer<molora::bf16>, {4096, 4096, T});
  for (Index T : {1, 2, 4, 8})
    reg("threads_base/f32/4096/4096/" + std::to_string(T), BM_threads_base<float>, {4096, 4096, T});
  for (Index T : {1, 2, 4, 8})
    reg("threads_base/bf16/4096/4096/" + std::to_string(T), BM_threads_base<molora::bf16>, {4096, 4096, T});
#endif
}

void register_all() {
  register_gemm<float>("f32");
  register_gemm<molora::bf16>("bf16");
  register_gemm<molora::f16>("f16");
  register_whole_layer<float>("f32");
  register_whole_layer<molora::bf16>("bf16");
  register_whole_layer<molora::f16>("f16");
  for (Index T : {1, 2, 4, 8})
    benchmark::RegisterBenchmark(("adapter_in_layer/f32/4096/4096/" + std::to_string(T)).c_str(),
                                 BM_adapter_in_layer<float>)
        ->Args({4096, 4096, T})
        ->UseManualTime()
        ->MinTime(1.0)
        ->Unit(benchmark::kMillisecond);
  register_skinny<float>("f32");
  register_skinny<molora::bf16>("bf16");
  register_skinny<molora::f16>("f16");
  register_crossover<float>("f32");
  register_crossover<molora::bf16>("bf16");
  register_crossover<molora::f16>("f16");
  register_one_token<float>("f32");
  register_one_token<molora::bf16>("bf16");
  register_shrink_rows<float>("f32");
  register_shrink_rows<molora::bf16>("bf16");
  register_expand_rows<float>("f32");
  register_expand_rows<molora::bf16>("bf16");
  register_skinny_limit<float>("f32");
  register_skinny_limit<molora::bf16>("bf16");
  register_skinny_limit<molora::f16>("f16");
  register_skinny_paths<float>("f32");
  register_skinny_paths<molora::bf16>("bf16");
  register_skinny_paths<molora::f16>("f16");
  for (int cold : {1, 0})
    for (Index T : {1, 2, 4, 8, 16, 32, 48, 64, 96, 128, 192}) {
      benchmark::RegisterBenchmark(("base_product/f32/4096/4096/" + std::to_string(T) + (cold ? "/cold" : "/warm")).c_str(),
                                   BM_base_product<float>)
          ->Args({4096, 4096, T, cold})
          ->UseManualTime()
          ->MinTime(0.3)
          ->Unit(benchmark::kMillisecond);
      benchmark::RegisterBenchmark(("base_product/f64/4096/4096/" + std::to_string(T) + (cold ? "/cold" : "/warm")).c_str(),
                                   BM_base_product<double>)
          ->Args({4096, 4096, T, cold})
          ->UseManualTime()
          ->MinTime(0.3)
          ->Unit(benchmark::kMillisecond);
    }
  register_few_tokens_limits();
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

// ---- bf16-dot cells (a block of their own, registered at static initialisation) -------------
//   gemm_bf16dot/in/out/T           the bf16-dot mode's GEMM (detail::base_product_bf16dot,
//                                   strategy gemm: x rounded to bf16, VDPBF16PS) against the
//                                   exact bf16 GEMM (detail::base_product, strategy gemm: W
//                                   widened while packed), W0 bf16, f32 activations, bias,
//                                   weights warm, alternately in one loop. Counters
//                                   dot_over_exact = median of bf16-dot / exact time,
//                                   dot_gflops and exact_gflops (2 in out T over each median).
//   bf16dot_crossover/in/out/T      the bf16-dot mode's two kernels on one thread, called
//                                   directly: gemm_product_bf16dot against
//                                   skinny_product_bf16dot, alternately. Counter
//                                   gemm_over_skinny (below 1: the GEMM is faster; what
//                                   detail::kBf16DotGemmFrom is set from), and both GFLOP/s.
// Both cells skip (with an error message) without AVX512_BF16.
namespace bf16dot_cells {

using molora::bf16;

struct Problem {
  Index in, out, T;
  Mat<float> x, bias, y;
  std::vector<bf16> w;
  Problem(Index in_, Index out_, Index T_) : in(in_), out(out_), T(T_), x(T_, in_), bias(1, out_), y(T_, out_) {
    Mat<float> wf(out, in);
    fill(wf, 3, 0.05);
    fill(x, 5 + static_cast<std::uint64_t>(T), 1.0);
    fill(bias, 7, 0.1);
    w.resize(static_cast<std::size_t>(in * out));
    for (Index i = 0; i < in * out; ++i) w[static_cast<std::size_t>(i)] = molora::to_bf16(wf.data()[i]);
  }
};

template <class F, class G>
void alternate(benchmark::State& st, F&& first, G&& second, const char* ratio_name, const char* first_name,
               const char* second_name, double flop) {
  first();
  second();  // warm the weights and the scratch
  std::vector<double> ta, tb, ratio;
  for (auto _ : st) {
    double t0 = cpu_seconds();
    first();
    benchmark::ClobberMemory();
    const double a = cpu_seconds() - t0;
    t0 = cpu_seconds();
    second();
    benchmark::ClobberMemory();
    const double b = cpu_seconds() - t0;
    st.SetIterationTime(a);
    ta.push_back(a);
    tb.push_back(b);
    ratio.push_back(a / b);
  }
  st.counters[ratio_name] = median(ratio);
  st.counters[first_name] = flop / median(ta) * 1e-9;
  st.counters[second_name] = flop / median(tb) * 1e-9;
}

void BM_gemm_bf16dot(benchmark::State& st) {
  if (!molora::kernels::bf16_dot_available()) return st.SkipWithError("no AVX512_BF16");
  Problem p(st.range(0), st.range(1), st.range(2));
  const molora::ConstRowRef<float> xr(p.x);
  molora::RowRef<float> yr(p.y);
  const auto gemm = molora::BaseStrategy::gemm;
  alternate(
      st, [&] { molora::detail::base_product_bf16dot(p.w.data(), p.in, p.out, p.bias.data(), xr, yr, gemm); },
      [&] { molora::detail::base_product(p.w.data(), p.in, p.out, p.bias.data(), xr, yr, gemm); }, "dot_over_exact",
      "dot_gflops", "exact_gflops", 2.0 * double(p.in) * double(p.out) * double(p.T));
  benchmark::DoNotOptimize(p.y.data());
}

void BM_bf16dot_crossover(benchmark::State& st) {
  if (!molora::kernels::bf16_dot_available()) return st.SkipWithError("no AVX512_BF16");
  Problem p(st.range(0), st.range(1), st.range(2));
  std::vector<float> scratch(static_cast<std::size_t>(molora::kernels::gemm_scratch_size<float>()));
  const molora::kernels::layer_arch arch{};
  alternate(
      st,
      [&] {
        molora::kernels::gemm_product_bf16dot(arch, p.w.data(), p.in, p.in, p.x.data(), p.in, p.T, p.bias.data(),
                                              p.y.data(), p.out, Index(0), p.out, scratch.data());
      },
      [&] {
        molora::kernels::skinny_product_bf16dot(arch, p.w.data(), p.in, p.in, p.x.data(), p.in, p.T, p.bias.data(),
                                                p.y.data(), p.out, Index(0), p.out);
      },
      "gemm_over_skinny", "gemm_gflops", "skinny_gflops", 2.0 * double(p.in) * double(p.out) * double(p.T));
  benchmark::DoNotOptimize(p.y.data());
}

bool register_cells() {
  const std::vector<std::pair<Index, Index>> shapes = {{4096, 4096}, {1024, 2816}, {2816, 1024}};
  for (const auto& [in, out] : shapes) {
    const std::string shape = std::to_string(in) + "/" + std::to_string(out) + "/";
    for (Index T : {16, 32, 64, 128, 256, 512, 1024})
      benchmark::RegisterBenchmark(("gemm_bf16dot/" + shape + std::to_string(T)).c_str(), BM_gemm_bf16dot)
          ->Args({in, out, T})
          ->UseManualTime()
          ->MinTime(0.2)
          ->Unit(benchmark::kMillisecond);
    for (Index T : {1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128})
      benchmark::RegisterBenchmark(("bf16dot_crossover/" + shape + std::to_string(T)).c_str(), BM_bf16dot_crossover)
          ->Args({in, out, T})
          ->UseManualTime()
          ->MinTime(0.2)
          ->Unit(benchmark::kMillisecond);
  }
  return true;
}

const bool registered = register_cells();

}  // namespace bf16dot_cells

// ---- bf16-dot at few tokens (a block of their own, registered at static initialisation) ------
//   bf16dot_few/in/out/T/{warm,cold}  one thread, W0 bf16, f32 activations, bias; four products
//                                   alternately in one loop, each on the next of a rotation of
//                                   copies of W0 (cold: enough copies to pass the L3; warm: one):
//                                     exact     detail::base_product, skinny (the exact bf16 path
//                                               below skinny_crossover)
//                                     rounded   x rounded to bf16 (detail::rounded_to_bf16), then
//                                               the same exact skinny product: the bf16-dot
//                                               mode's numerics through the exact kernel
//                                     skinny    kernels::skinny_product_bf16dot
//                                     gemm      kernels::gemm_product_bf16dot
//                                   Counters: each median time (ms) and X_over_exact (median of
//                                   the per-iteration ratio). What detail::kBf16DotGemmFrom and
//                                   the bf16-dot mode's choice below it are set from.
// Skips (with an error message) without AVX512_BF16.
namespace bf16dot_few {

using molora::bf16;

void BM_bf16dot_few(benchmark::State& st) {
  if (!molora::kernels::bf16_dot_available()) return st.SkipWithError("no AVX512_BF16");
  const Index in = st.range(0), out = st.range(1), T = st.range(2);
  const bool cold = st.range(3) != 0;
  const auto copies = cold_copies<bf16>(in, in, out, cold, 4);
  Mat<float> x(T, in), y(T, out), bias(1, out);
  fill(x, 5 + static_cast<std::uint64_t>(T), 1.0);
  fill(bias, 7, 0.1);
  std::vector<float> scratch(static_cast<std::size_t>(molora::kernels::gemm_scratch_size<float>()));
  const molora::kernels::layer_arch arch{};
  const molora::ConstRowRef<float> xr(x);
  molora::RowRef<float> yr(y);
  const auto skinny = molora::BaseStrategy::skinny;
  std::size_t next = 0;
  auto weights = [&] {
    const bf16* w = copies[next].data();
    next = (next + 1) % copies.size();
    return w;
  };
  auto exact = [&](const bf16* w) { molora::detail::base_product(w, in, out, bias.data(), xr, yr, skinny); };
  auto rounded = [&](const bf16* w) {
    const auto xb = molora::detail::rounded_to_bf16(xr);  // [T, in]
    molora::detail::base_product(w, in, out, bias.data(), molora::ConstRowRef<float>(xb), yr, skinny);
  };
  auto skinny_dot = [&](const bf16* w) {
    molora::kernels::skinny_product_bf16dot(arch, w, in, in, x.data(), in, T, bias.data(), y.data(), out, Index(0),
                                            out);
  };
  auto gemm_dot = [&](const bf16* w) {
    molora::kernels::gemm_product_bf16dot(arch, w, in, in, x.data(), in, T, bias.data(), y.data(), out, Index(0), out,
                                          scratch.data());
  };
  auto timed = [&](auto&& f) {
    const bf16* w = weights();
    const double t0 = cpu_seconds();
    f(w);
    benchmark::ClobberMemory();
    return cpu_seconds() - t0;
  };
  for (int warm = 0; warm < 2; ++warm) {
    exact(weights());
    rounded(weights());
    skinny_dot(weights());
    gemm_dot(weights());
  }
  std::vector<double> te, tr, ts, tg, rr, rs, rg;
  for (auto _ : st) {
    const double e = timed(exact), r = timed(rounded), s = timed(skinny_dot), g = timed(gemm_dot);
    st.SetIterationTime(e);
    te.push_back(e);
    tr.push_back(r);
    ts.push_back(s);
    tg.push_back(g);
    rr.push_back(r / e);
    rs.push_back(s / e);
    rg.push_back(g / e);
  }
  st.counters["exact_ms"] = 1e3 * median(te);
  st.counters["rounded_ms"] = 1e3 * median(tr);
  st.counters["skinny_ms"] = 1e3 * median(ts);
  st.counters["gemm_ms"] = 1e3 * median(tg);
  st.counters["rounded_over_exact"] = median(rr);
  st.counters["skinny_over_exact"] = median(rs);
  st.counters["gemm_over_exact"] = median(rg);
  benchmark::DoNotOptimize(y.data());
}

bool register_cells() {
  const std::vector<std::pair<Index, Index>> shapes = {{4096, 4096}, {1024, 1024}, {2816, 1024}, {1024, 2816}};
  for (const auto& [in, out] : shapes)
    for (const int cold : {1, 0})
      for (Index T : {1, 2, 4, 8, 12, 16, 24, 32, 48, 64})
        benchmark::RegisterBenchmark(("bf16dot_few/" + std::to_string(in) + "/" + std::to_string(out) + "/" +
                                      std::to_string(T) + (cold ? "/cold" : "/warm"))
                                         .c_str(),
                                     BM_bf16dot_few)
            ->Args({in, out, T, cold})
            ->UseManualTime()
            ->MinTime(0.1)
            ->Unit(benchmark::kMillisecond);
  return true;
}

const bool registered = register_cells();

}  // namespace bf16dot_few

// dot4
// ---- the bf16-dot GEMM's two drivers, and the layer around it ---------------------------------
//   dot4_wt/in/out/T              one thread, W0 bf16, f32 activations, bias, weights warm: the
//                                 bf16-dot GEMM reading W in place
//                                 (kernels::detail::gemm_product_bf16dot_wt) against the one
//                                 packing W (gemm_product_bf16dot_packed), alternately in one
//                                 loop. Counters wt_over_packed (median of the per-iteration
//                                 ratio), wt_gflops, packed_gflops. What detail::kBf16DotWtUpTo is
//                                 set from.
//   dot4_layer/T                  MoLoRALinear<float, bf16> 4096 x 4096 (E = 8, k = 2, r = 16) in
//                                 bf16-dot mode, forward against forward_base alternately, warm:
//                                 the adapters' share of the layer. Counters layer_ms, base_ms,
//                                 adapters_ms (difference of the medians), base_gflops.
// Both skip (with an error message) without AVX512_BF16.
namespace dot4_cells {

using molora::bf16;

void BM_dot4_wt(benchmark::State& st) {
  if (!molora::kernels::bf16_dot_available()) return st.SkipWithError("no AVX512_BF16");
#if defined(__AVX512BF16__) && defined(__AVX512BW__) && !defined(MOLORA_NO_XSIMD)
  bf16dot_cells::Problem p(st.range(0), st.range(1), st.range(2));
  std::vector<float> scratch(static_cast<std::size_t>(molora::kernels::gemm_scratch_size<float>()));
  namespace kd = molora::kernels::detail;
  bf16dot_cells::alternate(
      st,
      [&] {
        kd::gemm_product_bf16dot_wt(p.w.data(), p.in, p.in, p.x.data(), p.in, p.T, p.bias.data(), p.y.data(), p.out,
                                    Index(0), p.out, scratch.data());
      },
      [&] {
        kd::gemm_product_bf16dot_packed(p.w.data(), p.in, p.in, p.x.data(), p.in, p.T, p.bias.data(), p.y.data(),
                                        p.out, Index(0), p.out, scratch.data());
      },
      "wt_over_packed", "wt_gflops", "packed_gflops", 2.0 * double(p.in) * double(p.out) * double(p.T));
  benchmark::DoNotOptimize(p.y.data());
#else
  st.SkipWithError("built without AVX512_BF16");
#endif
}

void BM_dot4_layer(benchmark::State& st) {
  if (!molora::kernels::bf16_dot_available()) return st.SkipWithError("no AVX512_BF16");
  const Index in = 4096, out = 4096, T = st.range(0);
  auto layer = make_layer<bf16>(in, out);
  layer->set_bf16_dot(true);
  Mat<float> x(T, in), y(T, out);
  fill(x, 7 + static_cast<std::uint64_t>(T), 1.0);
  molora::MoLoRAWorkspace<float> ws;
  layer->forward(x, y, ws);
  layer->forward_base(x, y);  // warm
  std::vector<double> tl, tb;
  for (auto _ : st) {
    double t0 = cpu_seconds();
    layer->forward(x, y, ws);
    benchmark::ClobberMemory();
    const double a = cpu_seconds() - t0;
    t0 = cpu_seconds();
    layer->forward_base(x, y);
    benchmark::ClobberMemory();
    const double b = cpu_seconds() - t0;
    st.SetIterationTime(a);
    tl.push_back(a);
    tb.push_back(b);
  }
  st.counters["layer_ms"] = 1e3 * median(tl);
  st.counters["base_ms"] = 1e3 * median(tb);
  st.counters["adapters_ms"] = 1e3 * (median(tl) - median(tb));
  st.counters["base_gflops"] = 2.0 * double(in) * double(out) * double(T) / median(tb) * 1e-9;
  benchmark::DoNotOptimize(y.data());
}

bool register_cells() {
  const std::vector<std::pair<Index, Index>> shapes = {{4096, 4096}, {1024, 2816}, {2816, 1024}};
  for (const auto& [in, out] : shapes)
    for (Index T : {16, 20, 32, 48, 64, 128, 256, 512, 1024})
      benchmark::RegisterBenchmark(("dot4_wt/" + std::to_string(in) + "/" + std::to_string(out) + "/" +
                                    std::to_string(T))
                                       .c_str(),
                                   BM_dot4_wt)
          ->Args({in, out, T})
          ->UseManualTime()
          ->MinTime(0.2)
          ->Unit(benchmark::kMillisecond);
  for (Index T : {16, 64, 256, 1024})
    benchmark::RegisterBenchmark(("dot4_layer/" + std::to_string(T)).c_str(), BM_dot4_layer)
        ->Args({T})
        ->UseManualTime()
        ->MinTime(0.2)
        ->Unit(benchmark::kMillisecond);
  return true;
}

const bool registered = register_cells();

}  // namespace dot4_cells

// skinny8
// ---- the wide path of the skinny kernel (a block of its own, registered at static
// initialisation) --------------------------------------------------------------------------
//   skinny8/D/4096/4096/T/cold|warm  the kernels behind skinny_product on this binary's ISA
//                                   (32 vector registers), W0 stored as D = f32 or bf16, f32
//                                   activations, bias: before (8 rows x 2 tokens over chunks
//                                   of `in` up to 8 tokens, 4 rows x 4 tokens with prefetch
//                                   from 9: what skinny_product ran before the wide path),
//                                   wide3 (3 rows x 8 tokens, no software prefetch), wide3pf
//                                   (the same with prefetch kSkinnyPrefetch ahead: what
//                                   skinny_product runs for 5-8 tokens), r6t4pf (6 rows x 4
//                                   tokens over chunks, prefetch) and wide3pf_xpad (wide3pf
//                                   on a copy of x whose rows are in + 16 floats apart, off
//                                   the 4 KiB L1 aliasing), each on its own copy (cold: past
//                                   the LLC), then a plain read of another copy, the order of
//                                   the five rotating from one iteration to the next.
//                                   Counters: each median time (ms), its median ratio to
//                                   before (X_over_before) and to the read (X_read_share).
//                                   Skips without 32 registers.
namespace skinny8_cells {

namespace kd = molora::kernels::detail;

template <class Wt>
void BM_skinny8(benchmark::State& st) {
#if defined(MOLORA_NO_XSIMD)
  st.SkipWithError("needs xsimd");
#else
  using Arch = molora::kernels::default_arch;
  if constexpr (kd::vector_registers<Arch>() < 32) {
    st.SkipWithError("needs an ISA with 32 vector registers");
  } else {
    const Index in = st.range(0), out = st.range(1), T = st.range(2);
    const bool cold = st.range(3) != 0;
    constexpr std::size_t V = 5;
    auto w = cold_copies<Wt>(in, in, out, cold, V + 1);
    Eigen::Matrix<float, 1, Eigen::Dynamic> b(out);
    fill(b, 2, 0.02);
    Mat<float> x(T, in), y(T, out);
    fill(x, 3, 1.0);
    std::vector<float> xpad(static_cast<std::size_t>(T * (in + 16)));  // x with rows 64 bytes apart from 16 KiB
    for (Index t = 0; t < T; ++t) std::copy(x.data() + t * in, x.data() + (t + 1) * in, xpad.data() + t * (in + 16));
    constexpr Index W = molora::kernels::simd_width<Arch, float>();
    alignas(64) static float spill[molora::kernels::kSkinnyGroup * 8 * W];
    auto run = [&](std::size_t v, const Wt* p) {
      const float* xp = x.data();
      float* yp = y.data();
      switch (v) {
        case 0:
          if (T <= molora::kernels::kSkinnyStreamTokens)
            kd::skinny_rows_range<8, 2, 0, Arch>(p, in, in, xp, in, T, b.data(), yp, out, Index(0), out, spill);
          else
            kd::skinny_rows_range<4, 4, molora::kernels::kSkinnyPrefetch, Arch>(p, in, in, xp, in, T, b.data(), yp,
                                                                                out, Index(0), out, spill);
          break;
        case 1: kd::skinny_wide_range<3, 0, Arch>(p, in, in, xp, in, T, b.data(), yp, out, Index(0), out, spill); break;
        case 2:
          kd::skinny_wide_range<3, molora::kernels::kSkinnyPrefetch, Arch>(p, in, in, xp, in, T, b.data(), yp, out,
                                                                           Index(0), out, spill);
          break;
        case 3:
          kd::skinny_rows_range<6, 4, molora::kernels::kSkinnyPrefetch, Arch>(p, in, in, xp, in, T, b.data(), yp, out,
                                                                              Index(0), out, spill);
          break;
        default:
          kd::skinny_wide_range<3, molora::kernels::kSkinnyPrefetch, Arch>(p, in, in, xpad.data(), in + 16, T,
                                                                           b.data(), yp, out, Index(0), out, spill);
      }
    };
    const auto t = time_rotating<V>(st, w, in * out * Index(sizeof(Wt)), 1, run);
    benchmark::DoNotOptimize(y.data());
    const char* names[V] = {"before", "wide3", "wide3pf", "r6t4pf", "wide3pf_xpad"};
    for (std::size_t v = 0; v < V; ++v) {
      st.counters[std::string(names[v]) + "_ms"] = median(t[v]) * 1e3;
      st.counters[std::string(names[v]) + "_read_share"] = median_ratio(t[v], t[V]);
      if (v > 0) st.counters[std::string(names[v]) + "_over_before"] = median_ratio(t[v], t[0]);
    }
    st.counters["read_ms"] = median(t[V]) * 1e3;
  }
#endif
}

bool register_cells() {
  for (const int cold : {1, 0})
    for (Index T : {5, 6, 7, 8, 12, 16}) {
      const std::string tail = "/4096/4096/" + std::to_string(T) + (cold ? "/cold" : "/warm");
      benchmark::RegisterBenchmark(("skinny8/f32" + tail).c_str(), BM_skinny8<float>)
          ->Args({4096, 4096, T, cold})
          ->UseManualTime()
          ->MinTime(0.5)
          ->Unit(benchmark::kMillisecond);
      benchmark::RegisterBenchmark(("skinny8/bf16" + tail).c_str(), BM_skinny8<molora::bf16>)
          ->Args({4096, 4096, T, cold})
          ->UseManualTime()
          ->MinTime(0.5)
          ->Unit(benchmark::kMillisecond);
    }
  return true;
}

const bool registered = register_cells();

}  // namespace skinny8_cells

// skinny_ahead
// ---- the next block's rows fetched in address order (a block of its own, registered at
// static initialisation) --------------------------------------------------------------------
//   skinny_ahead/D/in/out/T/cold    the one-pass paths of skinny_product on this binary's ISA
//                                   (32 vector registers; W0 stored as D = f32 or bf16, f32
//                                   activations, bias): T = 1 kSkinnyOneTokenRows rows, 2-4
//                                   8 rows x T, 5-8 the wide path (3 rows x 8, prefetch
//                                   kSkinnyPrefetch ahead in each row), each without (plain)
//                                   and with (ahead) the rows kSkinnyAhead blocks on fetched
//                                   into L2 in address order, and for T = 2-4 6 rows x T with
//                                   it (ahead6; skinny_product runs it at T = 4), each on its
//                                   own cold copy, then a plain read of another, the order
//                                   rotating. Counters: the median times, X_read_share,
//                                   ahead_over_plain and ahead6_over_ahead (medians of the
//                                   ratios; ahead6 is ahead again outside T = 2-4). Skips
//                                   without 32 registers.
namespace skinny_ahead_cells {

namespace kd = molora::kernels::detail;

template <class Wt>
void BM_skinny_ahead(benchmark::State& st) {
#if defined(MOLORA_NO_XSIMD)
  st.SkipWithError("needs xsimd");
#else
  using Arch = molora::kernels::default_arch;
  if constexpr (kd::vector_registers<Arch>() < 32) {
    st.SkipWithError("needs an ISA with 32 vector registers");
  } else {
    const Index in = st.range(0), out = st.range(1), T = st.range(2);
    constexpr std::size_t V = 3;
    auto w = cold_copies<Wt>(in, in, out, true, V + 1);
    Eigen::Matrix<float, 1, Eigen::Dynamic> b(out);
    fill(b, 2, 0.02);
    Mat<float> x(T, in), y(T, out);
    fill(x, 3, 1.0);
    constexpr Index W = molora::kernels::simd_width<Arch, float>();
    alignas(64) static float spill[molora::kernels::kSkinnyGroup * 8 * W];
    auto run = [&](std::size_t v, const Wt* p) {
      auto go = [&](auto ahead) {
        constexpr bool A = decltype(ahead)::value;
        const float* xp = x.data();
        float* yp = y.data();
        if (T == 1)
          kd::skinny_rows_range<kd::kSkinnyOneTokenRows, 1, 0, Arch, A>(p, in, in, xp, in, T, b.data(),
                                                                                   yp, out, Index(0), out, spill);
        else if (T <= 4)
          kd::skinny_rows_range<8, 4, 0, Arch, A>(p, in, in, xp, in, T, b.data(), yp, out, Index(0), out, spill);
        else
          kd::skinny_wide_range<kd::kSkinnyWideRows, molora::kernels::kSkinnyPrefetch, Arch, A>(
              p, in, in, xp, in, T, b.data(), yp, out, Index(0), out, spill);
      };
      if (v == 0) go(std::false_type{});
      else if (v == 1 || T < 2 || T > 4) go(std::true_type{});
      else  // 6 rows x T tokens with the ahead prefetch (24 accumulators at T = 4)
        kd::skinny_rows_range<6, 4, 0, Arch, true>(p, in, in, x.data(), in, T, b.data(), y.data(), out, Index(0), out,
                                                   spill);
    };
    const auto t = time_rotating<V>(st, w, in * out * Index(sizeof(Wt)), 1, run);
    benchmark::DoNotOptimize(y.data());
    const char* names[V] = {"plain", "ahead", "ahead6"};
    for (std::size_t v = 0; v < V; ++v) {
      st.counters[std::string(names[v]) + "_ms"] = median(t[v]) * 1e3;
      st.counters[std::string(names[v]) + "_read_share"] = median_ratio(t[v], t[V]);
    }
    st.counters["ahead_over_plain"] = median_ratio(t[1], t[0]);
    st.counters["ahead6_over_ahead"] = median_ratio(t[2], t[1]);
    st.counters["read_ms"] = median(t[V]) * 1e3;
  }
#endif
}

bool register_cells() {
  const Index shapes[][2] = {{4096, 4096}, {1024, 2816}, {2816, 1024}};
  for (const auto& sh : shapes)
    for (Index T : {1, 2, 3, 4, 8}) {
      const std::string tail =
          "/" + std::to_string(sh[0]) + "/" + std::to_string(sh[1]) + "/" + std::to_string(T) + "/cold";
      benchmark::RegisterBenchmark(("skinny_ahead/f32" + tail).c_str(), BM_skinny_ahead<float>)
          ->Args({sh[0], sh[1], T})
          ->UseManualTime()
          ->MinTime(0.5)
          ->Unit(benchmark::kMillisecond);
      benchmark::RegisterBenchmark(("skinny_ahead/bf16" + tail).c_str(), BM_skinny_ahead<molora::bf16>)
          ->Args({sh[0], sh[1], T})
          ->UseManualTime()
          ->MinTime(0.5)
          ->Unit(benchmark::kMillisecond);
    }
  return true;
}

const bool registered = register_cells();

}  // namespace skinny_ahead_cells

// skinny16
// ---- register blocks for 16 vector registers (a block of its own, registered at static
// initialisation) --------------------------------------------------------------------------
//   skinny16/D/in/out/T/cold   the AVX2 + FMA kernels (built into this binary when its flags
//                              include AVX2 and FMA, whatever the CPU's best ISA), W0 stored as
//                              D = f32 / bf16 / f16, f32 activations staged as base_product
//                              stages them (rows staged_stride apart from kStageXFrom tokens),
//                              bias: cur (kernels::skinny_product as the layers run it), then
//                              blocks of the wide pattern (a block's RO weight vectors loaded
//                              and widened first, then each token's x vector for its RO FMAs),
//                              RO rows x TB tokens with the rows kSkinnyAhead blocks on fetched
//                              into L2 in address order: w4x2a, w3x4a, w2x6a; w3x4 without the
//                              ahead fetch; r4x2a (skinny_rows_range's pattern, x loaded first,
//                              4 rows x 2 tokens, ahead fetch); r8x1a (8 rows, one token a
//                              pass, ahead fetch). Each on its own cold copy, then
//                              a plain read of another, the order rotating. Counters: median
//                              times (ms), X_read_share, X_over_cur (medians of the ratios).
namespace skinny16_cells {

namespace kd = molora::kernels::detail;

template <class Wt>
void BM_skinny16(benchmark::State& st) {
#if defined(MOLORA_NO_XSIMD) || !defined(__AVX2__) || !defined(__FMA__)
  st.SkipWithError("needs xsimd and a build with AVX2 and FMA");
#else
  using Arch = xsimd::fma3<xsimd::avx2>;
  const Index in = st.range(0), out = st.range(1), T = st.range(2);
  constexpr std::size_t V = 7;
  auto w = cold_copies<Wt>(in, in, out, true, V + 1);
  Eigen::Matrix<float, 1, Eigen::Dynamic> b(out);
  fill(b, 2, 0.02);
  const Index ldx = T >= molora::detail::kStageXFrom ? molora::detail::staged_stride<float>(in) : in;
  molora::detail::aligned_vector<float> x(static_cast<std::size_t>(T * ldx), 0.f);
  for (Index t = 0; t < T; ++t)
    for (Index i = 0; i < in; ++i) x[static_cast<std::size_t>(t * ldx + i)] = 0.5f - 0.001f * float((t * in + i) % 997);
  Mat<float> y(T, out);
  constexpr Index W = molora::kernels::simd_width<Arch, float>();
  alignas(64) static float spill[molora::kernels::kSkinnyGroup * 8 * W];
  auto run = [&](std::size_t v, const Wt* p) {
    const float* xp = x.data();
    float* yp = y.data();
    switch (v) {
      case 0: molora::kernels::skinny_product(Arch{}, p, in, in, xp, ldx, T, b.data(), yp, out, Index(0), out); break;
      case 1: kd::skinny_wide_range<4, 0, Arch, true, 2>(p, in, in, xp, ldx, T, b.data(), yp, out, Index(0), out, spill); break;
      case 2: kd::skinny_wide_range<3, 0, Arch, true, 4>(p, in, in, xp, ldx, T, b.data(), yp, out, Index(0), out, spill); break;
      case 3: kd::skinny_wide_range<2, 0, Arch, true, 6>(p, in, in, xp, ldx, T, b.data(), yp, out, Index(0), out, spill); break;
      case 4: kd::skinny_wide_range<3, 0, Arch, false, 4>(p, in, in, xp, ldx, T, b.data(), yp, out, Index(0), out, spill); break;
      case 5: kd::skinny_rows_range<4, 2, 0, Arch, true>(p, in, in, xp, ldx, T, b.data(), yp, out, Index(0), out, spill); break;
      default: kd::skinny_rows_range<8, 1, 0, Arch, true>(p, in, in, xp, ldx, T, b.data(), yp, out, Index(0), out, spill);
    }
  };
  // every variant computes the same bits as the layers' kernel (checked once, outside the timing)
  {
    Mat<float> ref(T, out);
    run(0, w[0].data());
    ref = y;
    for (std::size_t v = 1; v < V; ++v) {
      y.setZero();
      run(v, w[0].data());
      if (!(y.array() == ref.array()).all()) {
        st.SkipWithError("a variant's bits differ from skinny_product's");
        return;
      }
    }
  }
  const auto t = time_rotating<V>(st, w, in * out * Index(sizeof(Wt)), 0, run);
  benchmark::DoNotOptimize(y.data());
  const char* names[V] = {"cur", "w4x2a", "w3x4a", "w2x6a", "w3x4", "r4x2a", "r8x1a"};
  for (std::size_t v = 0; v < V; ++v) {
    st.counters[std::string(names[v]) + "_ms"] = median(t[v]) * 1e3;
    st.counters[std::string(names[v]) + "_read_share"] = median_ratio(t[v], t[V]);
    if (v > 0) st.counters[std::string(names[v]) + "_over_cur"] = median_ratio(t[v], t[0]);
  }
  st.counters["read_ms"] = median(t[V]) * 1e3;
#endif
}

template <class Wt>
void register_dtype(const char* dtype) {
  for (auto [in, out] : {std::pair<Index, Index>{4096, 4096}, {1024, 2816}, {2816, 1024}})
    for (Index T : {1, 2, 3, 4, 5, 6, 8})
      benchmark::RegisterBenchmark((std::string("skinny16/") + dtype + "/" + std::to_string(in) + "/" +
                                    std::to_string(out) + "/" + std::to_string(T) + "/cold")
                                       .c_str(),
                                   BM_skinny16<Wt>)
          ->Args({in, out, T})
          ->UseManualTime()
          ->MinTime(0.5)
          ->Unit(benchmark::kMillisecond);
}

bool register_cells() {
  register_dtype<float>("f32");
  register_dtype<molora::bf16>("bf16");
  register_dtype<molora::f16>("f16");
  return true;
}

const bool registered = register_cells();

}  // namespace skinny16_cells
