// Threads. (1) A const layer's forward called from several std::threads at once, each with
// its own workspace, gives every thread the single-threaded result, bitwise, for every
// strategy. (2) Built with OpenMP (tests/cmake/threads.cmake), the adapter's results are
// bitwise identical with 1 and 2 OpenMP threads. Run under TSan by test_threads_tsan.
#include <doctest/doctest.h>

#include <atomic>
#include <thread>
#include <vector>

#include "reference.hpp"

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
#endif
