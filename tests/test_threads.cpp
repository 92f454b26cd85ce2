// Threads. (1) A const layer's forward called from several std::threads at once, each with
// its own workspace, gives every thread the single-threaded result, bitwise, for every
// strategy. (2) Built with OpenMP (tests/cmake/threads.cmake), the adapter's results are
// bitwise identical with 1 and 2 OpenMP threads, and so is the whole layer at decode sizes
// (T below the token split: the base rows and the experts' output columns are split instead),
// f32 and bf16 base, and Linear, and above the skinny crossover (base product gemm or eigen); also
// with bf16 / f16 router and experts. Run under TSan by test_threads_tsan.
#include <doctest/doctest.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <thread>
#include <vector>

#include "reference.hpp"
#include "test_util.hpp"

#if defined(MOLORA_USE_OPENMP)
#include <omp.h>
#endif

using molora::Index;
using molora::Strategy;

namespace {

molora::MoLoRAConfig small_config() {
  molora::MoLoRAConfig c;
  c.in_features = 130;
  c.out_features = 67;
  c.rank = 17;
  return c;
}

}  // namespace

TEST_CASE("threads: concurrent const forwards with separate workspaces match the serial result") {
  auto layer = ref::random_layer<float>(small_config(), 21);
  const Index Ts[] = {1, 9, 40, 64};
  for (const Strategy st : {Strategy::eigen, Strategy::dense_shrink, Strategy::fused, Strategy::automatic}) {
    layer.set_strategy(st);
    const auto& l = layer;  // only const calls below
    std::vector<molora::RowMatrix<float>> xs, want;
    for (int i = 0; i < 4; ++i) {
      xs.push_back(ref::random_x<float>(Ts[i], l.in_features(), 30 + std::uint64_t(i)));
      want.push_back(l.forward(xs.back()));
    }
    std::atomic<int> mismatches{0};
    std::vector<std::thread> pool;
    for (int i = 0; i < 4; ++i)
      pool.emplace_back([&, i] {
        molora::MoLoRAWorkspace<float> ws;
        molora::RowMatrix<float> y(xs[std::size_t(i)].rows(), l.out_features());
        for (int rep = 0; rep < 10; ++rep) {
          l.forward(xs[std::size_t(i)], y, ws);
          if (y != want[std::size_t(i)]) ++mismatches;
        }
      });
    for (auto& t : pool) t.join();
    INFO("strategy=", std::string(molora::to_string(st)));
    CHECK(mismatches.load() == 0);
  }
}

#if defined(MOLORA_USE_OPENMP)
TEST_CASE("threads: 1 and 2 OpenMP threads give bitwise identical results") {
  const int saved = omp_get_max_threads();
  for (const auto& cfg : {small_config(), [] {
         auto c = small_config();
         c.num_experts = 4;
         c.top_k = 4;
         return c;
       }()})
    for (const Strategy st : {Strategy::fused, Strategy::dense_shrink, Strategy::automatic})
      for (Index T : {8, 37, 256, 300}) {
        auto layer = ref::random_layer<float>(cfg, 40);
        layer.set_strategy(st);
        const auto x = ref::random_x<float>(T, cfg.in_features, 41);
        molora::RowMatrix<float> y[2];
        molora::RowMatrix<float> d[2];
        molora::Routing<float> routing;
        {
          molora::MoLoRAWorkspace<float> ws;
          routing = layer.adapter().route_tokens(x, ws);
        }
        for (int n = 1; n <= 2; ++n) {
          omp_set_num_threads(n);
          molora::MoLoRAWorkspace<float> ws;
          y[n - 1].resize(T, cfg.out_features);
          layer.forward(x, y[n - 1], ws);
          d[n - 1] = molora::RowMatrix<float>::Zero(T, cfg.out_features);
          layer.adapter().add_delta_routed(x, routing, d[n - 1], ws);
        }
        INFO("strategy=", std::string(molora::to_string(st)), " T=", T, " k=", cfg.top_k);
        CHECK(d[0] == d[1]);  // the experts alone, same routing
        CHECK(y[0] == y[1]);  // the whole layer: router, base GEMM and experts
      }
  omp_set_num_threads(saved);
}

namespace {

// The layer's output for x with n OpenMP threads (a fresh workspace each time).
template <class Layer>
molora::RowMatrix<float> forward_with(const Layer& layer, const molora::RowMatrix<float>& x, int n) {
  omp_set_num_threads(n);
  molora::RowMatrix<float> y(x.rows(), layer.out_features());
  molora::MoLoRAWorkspace<float> ws;
  layer.forward(x, y, ws);
  return y;
}

}  // namespace

TEST_CASE("threads: above the skinny crossover, f32 / bf16 / f16 bases give the same bits with 1 and 2 threads") {
  // Strategy gemm (the default for float): the outputs split between the threads at
  // multiples of 64. Strategy eigen: Eigen's GEMM over blocks of widened rows, the blocks
  // shared out between the threads; out spans one block (40) or several, with a short last
  // block (1031 rows at in = 261).
  const int saved = omp_get_max_threads();
  for (const auto& shape : {std::pair<Index, Index>{261, 40}, {261, 1031}, {4099, 70}, {300, 130}}) {
    const Index in = shape.first, out = shape.second;  // (not a structured binding: the lambda below captures them)
    const auto cfg = test_util::config(in, out, 4, 2, 3);
    auto f32 = ref::random_layer<float>(cfg, 70 + std::uint64_t(out));
    molora::MoLoRALinear<float, molora::bf16> b16(cfg);
    molora::MoLoRALinear<float, molora::f16> h16(cfg);
    b16.set_base_weight(f32.base_weight());
    b16.set_base_bias(f32.base_bias());
    h16.set_base_weight(f32.base_weight());
    h16.set_base_bias(f32.base_bias());
    b16.adapter() = f32.adapter();
    h16.adapter() = f32.adapter();
    molora::Linear<float, molora::bf16> lin(in, out);
    lin.set_weight(f32.base_weight());
    const Index c = molora::kernels::skinny_crossover<float>();
    for (const auto s : {molora::BaseStrategy::gemm, molora::BaseStrategy::eigen})
      for (const Index T : {c, c + 37, 2 * c + 1}) {
        INFO("in=", in, " out=", out, " T=", T, " strategy=", molora::to_string(s));
        const auto x = ref::random_x<float>(T, in, 80 + std::uint64_t(T));
        b16.set_base_strategy(s);
        h16.set_base_strategy(s);
        f32.set_base_strategy(s);
        lin.set_strategy(s);
        const auto y1 = forward_with(b16, x, 1), y2 = forward_with(b16, x, 2);
        CHECK(y1 == y2);
        CHECK(forward_with(h16, x, 1) == forward_with(h16, x, 2));
        if (s == molora::BaseStrategy::gemm) CHECK(forward_with(f32, x, 1) == forward_with(f32, x, 2));
        molora::RowMatrix<float> l1(T, out), l2(T, out);
        omp_set_num_threads(1);
        lin.forward(x, l1);
        omp_set_num_threads(2);
        lin.forward(x, l2);
        CHECK(l1 == l2);
        // and the double reference of the rounded weights
        const ref::Layer want = [&] {
          ref::Layer r = ref::from_layer(f32);
          for (Index o = 0; o < out; ++o)
            for (Index i = 0; i < in; ++i)
              r.W0[std::size_t(o)][std::size_t(i)] = double(molora::to_float(b16.base_weight_data()[o * in + i]));
          return r;
        }();
        CHECK(ref::rel_err(y2, ref::forward(want, ref::from_eigen(x))) < 1e-4);
        b16.set_base_strategy(molora::BaseStrategy::automatic);
        h16.set_base_strategy(molora::BaseStrategy::automatic);
        f32.set_base_strategy(molora::BaseStrategy::automatic);
      }
  }
  omp_set_num_threads(saved);
}

TEST_CASE("threads: prefill sizes through the packed GEMM give the same bits with 1 and 2 threads") {
  // The gemm strategy at prompt lengths: outputs split between the threads at multiples of 64
  // (out = 64 stays on one thread, 100 and 1024 are split), the tokens in register blocks of
  // 12 with tails that take the 4- and 8-token blocks (122 = 10 x 12 + 2, 124: + 4, 126: + 6,
  // 128: + 8) or the 12-token block (129: + 9; 300 = 240 + 60, two blocks of tokens). f32 and
  // bf16 weights, with and without bias, against the double reference of the (rounded) weights.
  const int saved = omp_get_max_threads();
  for (const Index out : {64, 100, 1024})
    for (const Index in : {37, 300}) {
      const auto w = ref::random_x<float>(out, in, 110 + std::uint64_t(out + in));  // [out, in]
      const auto b = ref::random_x<float>(1, out, 120 + std::uint64_t(out));         // [1, out]
      molora::Linear<float> f32(in, out);
      molora::Linear<float, molora::bf16> b16(in, out);
      f32.set_weight(w);
      b16.set_weight(w);
      f32.set_strategy(molora::BaseStrategy::gemm);
      b16.set_strategy(molora::BaseStrategy::gemm);
      for (const bool bias : {false, true}) {
        if (bias) {
          f32.set_bias(b.row(0).transpose());
          b16.set_bias(b.row(0).transpose());
        }
        for (const Index T : {122, 124, 126, 128, 129, 300}) {
          INFO("in=", in, " out=", out, " T=", T, " bias=", bias);
          const auto x = ref::random_x<float>(T, in, 130 + std::uint64_t(T));
          molora::RowMatrix<float> y[2], h[2];
          for (int n = 1; n <= 2; ++n) {
            omp_set_num_threads(n);
            y[n - 1].resize(T, out);
            h[n - 1].resize(T, out);
            f32.forward(x, y[n - 1]);
            b16.forward(x, h[n - 1]);
          }
          CHECK(y[0] == y[1]);
          CHECK(h[0] == h[1]);
          double err32 = 0, err16 = 0, scale = 0;
          for (Index t = 0; t < T; ++t)
            for (Index o = 0; o < out; ++o) {
              double s32 = bias ? double(b(0, o)) : 0.0, s16 = s32;
              for (Index i = 0; i < in; ++i) {
                s32 += double(w(o, i)) * double(x(t, i));
                s16 += double(molora::to_float(molora::to_bf16(w(o, i)))) * double(x(t, i));
              }
              err32 = std::max(err32, std::abs(double(y[1](t, o)) - s32));
              err16 = std::max(err16, std::abs(double(h[1](t, o)) - s16));
              scale = std::max(scale, std::abs(s32));
            }
          CHECK(err32 <= 1e-5 * scale);
          CHECK(err16 <= 1e-5 * scale);
        }
      }
    }
  omp_set_num_threads(saved);
}

TEST_CASE("threads: decode sizes (T = 1..20) give the same bits with 1 and 2 threads, f32 and bf16 base") {
  const int saved = omp_get_max_threads();
  struct Shape {
    Index in, out, E, k, r;
  };
  // out >= 256 splits the experts' columns, >= 128 the one-token GEMV; odd sizes leave tails.
  for (const Shape sh : {Shape{1, 301, 3, 1, 1}, Shape{37, 517, 5, 2, 7}, Shape{261, 256, 4, 4, 16},
                         Shape{130, 1031, 8, 2, 3}}) {
    const auto cfg = test_util::config(sh.in, sh.out, sh.E, sh.k, sh.r);
    const auto f32 = ref::random_layer<float>(cfg, 50 + std::uint64_t(sh.out));
    molora::MoLoRALinear<float, molora::bf16> b16(cfg);
    b16.set_base_weight(f32.base_weight());
    b16.set_base_bias(f32.base_bias());
    b16.adapter() = f32.adapter();
    // The double reference of each: the bf16 layer's base holds the rounded weights.
    const ref::Layer want32 = ref::from_layer(f32);
    ref::Layer want16 = want32;
    const molora::bf16* wb = b16.base_weight_data();
    for (Index o = 0; o < sh.out; ++o)
      for (Index i = 0; i < sh.in; ++i)
        want16.W0[std::size_t(o)][std::size_t(i)] = double(molora::to_float(wb[o * sh.in + i]));
    molora::Linear<float> lin32(sh.in, sh.out);
    molora::Linear<float, molora::bf16> lin16(sh.in, sh.out);
    lin32.set_weight(f32.base_weight());
    lin16.set_weight(f32.base_weight());
    for (Index T = 1; T <= 20; ++T) {
      const auto x = ref::random_x<float>(T, sh.in, 60 + std::uint64_t(T));
      const auto X = ref::from_eigen(x);
      INFO("in=", sh.in, " out=", sh.out, " E=", sh.E, " k=", sh.k, " r=", sh.r, " T=", T);
      const auto y1 = forward_with(f32, x, 1), y2 = forward_with(f32, x, 2);
      CHECK(y1 == y2);
      CHECK(ref::rel_err(y2, ref::forward(want32, X)) < 1e-4);
      const auto h1 = forward_with(b16, x, 1), h2 = forward_with(b16, x, 2);
      CHECK(h1 == h2);
      CHECK(ref::rel_err(h2, ref::forward(want16, X)) < 1e-4);
      molora::RowMatrix<float> l1(T, sh.out), l2(T, sh.out), m1(T, sh.out), m2(T, sh.out);
      omp_set_num_threads(1);
      lin32.forward(x, l1);
      lin16.forward(x, m1);
      omp_set_num_threads(2);
      lin32.forward(x, l2);
      lin16.forward(x, m2);
      CHECK(l1 == l2);
      CHECK(m1 == m2);
      ref::Layer base_only = want32;
      base_only.b0.clear();
      ref::Mat lin_want;
      for (const auto& row : X) lin_want.push_back(ref::base(base_only, row));
      CHECK(ref::rel_err(l2, lin_want) < 1e-4);
      // The training forward keeps h = A_e x per pair: the same bits from the shared shrink.
      if (T <= 7) {
        molora::MoLoRATape<float> tape[2];
        molora::RowMatrix<float> ty[2];
        for (int n = 1; n <= 2; ++n) {
          omp_set_num_threads(n);
          ty[n - 1].resize(T, sh.out);
          molora::forward_train(f32, x, ty[n - 1], tape[n - 1]);
        }
        CHECK(ty[0] == y1);
        CHECK(ty[1] == y1);
        CHECK(tape[0].hidden == tape[1].hidden);
      }
    }
  }
  omp_set_num_threads(saved);
}

TEST_CASE("threads: bf16 / f16 router and experts give the same bits with 1 and 2 threads, equal to the float adapter's") {
  // Decode sizes (shared shrink, experts' columns split), T above the token split, and
  // above 128; the float layer holds the widened weights and runs strategy fused.
  const int saved = omp_get_max_threads();
  for (const auto& cfg : {test_util::config(37, 517, 5, 2, 7), test_util::config(130, 256, 4, 4, 16)}) {
    auto f32 = ref::random_layer<float>(cfg, 80 + std::uint64_t(cfg.out_features));
    f32.adapter() = molora::convert_adapter<float>(molora::convert_adapter<molora::bf16>(f32.adapter()));
    f32.set_strategy(Strategy::fused);
    molora::MoLoRALinear<float, float, molora::bf16> b16(cfg);
    b16.set_base_weight(f32.base_weight());
    b16.set_base_bias(f32.base_bias());
    b16.adapter() = molora::convert_adapter<molora::bf16>(f32.adapter());
    auto f32h = f32;
    f32h.adapter() = molora::convert_adapter<float>(molora::convert_adapter<molora::f16>(f32.adapter()));
    molora::MoLoRALinear<float, float, molora::f16> h16(cfg);
    h16.set_base_weight(f32.base_weight());
    h16.set_base_bias(f32.base_bias());
    h16.adapter() = molora::convert_adapter<molora::f16>(f32h.adapter());
    for (Index T : {1, 2, 3, 5, 7, 8, 9, 13, 20, 37, 129, 200}) {
      const auto x = ref::random_x<float>(T, cfg.in_features, 90 + std::uint64_t(T));
      INFO("out=", cfg.out_features, " T=", T);
      const auto y1 = forward_with(b16, x, 1), y2 = forward_with(b16, x, 2);
      CHECK(y1 == y2);
      CHECK(y2 == forward_with(f32, x, 2));
      const auto z1 = forward_with(h16, x, 1), z2 = forward_with(h16, x, 2);
      CHECK(z1 == z2);
      CHECK(z2 == forward_with(f32h, x, 2));
    }
  }
  omp_set_num_threads(saved);
}
#endif

#if defined(MOLORA_USE_OPENMP)
TEST_CASE("threads: bf16-dot mode gives the same bits with 1 and 2 threads, skinny and gemm bf16-dot kernels") {
  // Below kBf16DotGemmFrom the rounded activations through the exact skinny kernel (rows split
  // at multiples of 4), from it on the bf16-dot GEMM (outputs split at multiples of 64);
  // without AVX512_BF16 the rounded activations through the exact product.
  const int saved = omp_get_max_threads();
  for (const auto& shape : {std::pair<Index, Index>{261, 70}, {1031, 301}, {64, 1031}}) {
    const Index in = shape.first, out = shape.second;
    const auto cfg = test_util::config(in, out, 4, 2, 3);
    const auto f32 = ref::random_layer<float>(cfg, 90 + std::uint64_t(out));
    molora::MoLoRALinear<float, molora::bf16> b16(cfg);
    b16.set_base_weight(f32.base_weight());
    b16.set_base_bias(f32.base_bias());
    b16.adapter() = f32.adapter();
    b16.set_bf16_dot(true);
    molora::Linear<float, molora::bf16> lin(in, out);
    lin.set_weight(f32.base_weight());
    lin.set_bf16_dot(true);
    // T = 16 and 20 end on the GEMM's 4- and 8-token tail blocks.
    for (const Index T : {Index(1), Index(5), molora::detail::kBf16DotGemmFrom - 1, molora::detail::kBf16DotGemmFrom,
                          Index(16), Index(20), Index(37), Index(130), Index(261)}) {
      INFO("in=", in, " out=", out, " T=", T);
      const auto x = ref::random_x<float>(T, in, 100 + std::uint64_t(T));
      CHECK(forward_with(b16, x, 1) == forward_with(b16, x, 2));
      molora::RowMatrix<float> l1(T, out), l2(T, out);
      omp_set_num_threads(1);
      lin.forward(x, l1);
      omp_set_num_threads(2);
      lin.forward(x, l2);
      CHECK(l1 == l2);
    }
  }
  omp_set_num_threads(saved);
}
#endif
