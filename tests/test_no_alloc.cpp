// A warm forward with a reused workspace allocates nothing. Two counters see every heap
// allocation: a replaced global operator new (std::vector and friends) and Eigen's own
// allocator (Eigen calls std::malloc, not operator new), which EIGEN_RUNTIME_NO_MALLOC lets
// us trap: with malloc disallowed, Eigen's check goes through eigen_assert, redefined here
// to count instead of abort. Works under ASan too (no malloc interposition).
// gcc 12 sees the replaced operator delete inlined next to malloc and reports a false
// -Wmismatched-new-delete; these replacements pair malloc with free by design.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmismatched-new-delete"
#endif
#include <atomic>
#include <cstddef>
#include <cstdlib>
#include <new>


namespace {
std::atomic<long> g_new_count{0};
std::atomic<long> g_eigen_heap{0};
}  // namespace

#define EIGEN_RUNTIME_NO_MALLOC
#define eigen_assert(x)          \
  do {                           \
    if (!(x)) ++g_eigen_heap;    \
  } while (false)

#include <doctest/doctest.h>

#include <molora/adapter_set.hpp>
#include <molora/molora.hpp>

#include "reference.hpp"
#include "test_util.hpp"

void* operator new(std::size_t n) {
  ++g_new_count;
  if (void* p = std::malloc(n ? n : 1)) return p;
  throw std::bad_alloc();
}
void* operator new[](std::size_t n) { return operator new(n); }
void* operator new(std::size_t n, const std::nothrow_t&) noexcept {
  ++g_new_count;
  return std::malloc(n ? n : 1);
}
void* operator new[](std::size_t n, const std::nothrow_t& t) noexcept { return operator new(n, t); }
void operator delete(void* p) noexcept { std::free(p); }
void operator delete[](void* p) noexcept { std::free(p); }
void operator delete(void* p, std::size_t) noexcept { std::free(p); }
void operator delete[](void* p, std::size_t) noexcept { std::free(p); }

using molora::Index;
using molora::Strategy;
using test_util::config;

namespace {

struct Counts {
  long news = 0, eigen = 0;
};

// Runs f with both counters armed.
template <class F>
Counts count_allocations(F&& f) {
  const long n0 = g_new_count.load(), e0 = g_eigen_heap.load();
  Eigen::internal::set_is_malloc_allowed(false);
  f();
  Eigen::internal::set_is_malloc_allowed(true);
  return {g_new_count.load() - n0, g_eigen_heap.load() - e0};
}

}  // namespace

TEST_CASE("no_alloc: the counters see std::vector and Eigen allocations") {
  const Counts c = count_allocations([] {
    std::vector<int> v(100);
    Eigen::MatrixXf m(50, 50);
    (void)v;
    (void)m;
  });
  CHECK(c.news >= 1);
  CHECK(c.eigen >= 1);
}

// automatic resolves to fused except for dense routing (k == E) at T >= 64, where it uses
// dense_shrink, whose Eigen GEMM may take its packing buffers from the heap.
TEST_CASE("no_alloc: warm MoLoRAAdapter::add_delta, strategy fused / automatic, same batch size") {
  for (const auto& cfg : {config(64, 48, 8, 2, 16), config(1024, 1024, 8, 2, 16), config(4096, 512, 8, 2, 16),
                          config(300, 200, 4, 4, 17), config(4096, 100, 4, 4, 16)}) {
    auto layer = ref::random_layer<float>(cfg, 11);
    for (const Strategy st : {Strategy::fused, Strategy::automatic})
      for (Index T : {1, 7, 64, 256}) {
        if (st == Strategy::automatic && cfg.top_k == cfg.num_experts && T >= 64) continue;
        layer.set_strategy(st);
        const auto x = ref::random_x<float>(T, cfg.in_features, 12);
        molora::RowMatrix<float> y = molora::RowMatrix<float>::Zero(T, cfg.out_features);
        molora::MoLoRAWorkspace<float> ws;
        layer.adapter().add_delta(x, y, ws);  // warm-up sizes the workspace
        const Counts c = count_allocations([&] {
          for (int rep = 0; rep < 3; ++rep) layer.adapter().add_delta(x, y, ws);
        });
        INFO("strategy=", std::string(molora::to_string(st)), " in=", cfg.in_features, " E=", cfg.num_experts, " T=", T);
        CHECK(c.news == 0);
        CHECK(c.eigen == 0);
      }
  }
}

TEST_CASE("no_alloc: warm add_delta_routed (caller routing), strategy fused") {
  const auto cfg = config(515, 333, 8, 2, 17);
  auto layer = ref::random_layer<float>(cfg, 13);
  layer.set_strategy(Strategy::fused);
  const auto x = ref::random_x<float>(100, cfg.in_features, 14);
  molora::RowMatrix<float> y = molora::RowMatrix<float>::Zero(100, cfg.out_features);
  molora::MoLoRAWorkspace<float> ws;
  const molora::Routing<float> routing = layer.adapter().route_tokens(x, ws);
  layer.adapter().add_delta_routed(x, routing, y, ws);
  const Counts c = count_allocations([&] { layer.adapter().add_delta_routed(x, routing, y, ws); });
  CHECK(c.news == 0);
  CHECK(c.eigen == 0);
}

TEST_CASE("no_alloc: warm MoLoRALinear::forward at one token (decode), every strategy") {
  const auto cfg = config(1024, 1024, 8, 2, 16);
  auto layer = ref::random_layer<float>(cfg, 18);
  const auto x = ref::random_x<float>(1, cfg.in_features, 19);
  molora::RowMatrix<float> y(1, cfg.out_features);
  for (const Strategy st : {Strategy::eigen, Strategy::dense_shrink, Strategy::fused, Strategy::automatic}) {
    layer.set_strategy(st);
    molora::MoLoRAWorkspace<float> ws;
    layer.forward(x, y, ws);
    const Counts c = count_allocations([&] {
      for (int rep = 0; rep < 3; ++rep) layer.forward(x, y, ws);
    });
    INFO("strategy=", std::string(molora::to_string(st)));
    CHECK(c.news == 0);
    CHECK(c.eigen == 0);
  }
}

// Below 128 tokens the float base product is the skinny kernel or, from its crossover on,
// the packed GEMM: neither takes Eigen's packing buffers, and their own scratch (the GEMM's
// panels, the skinny kernel's staged x) is allocated on the first call and kept.
TEST_CASE("no_alloc: warm MoLoRALinear::forward below 128 tokens, strategy fused") {
  for (const auto& cfg : {config(1024, 1024, 8, 2, 16), config(300, 200, 4, 4, 17)}) {
    auto layer = ref::random_layer<float>(cfg, 20);
    layer.set_strategy(Strategy::fused);
    for (const Index T : {2, 7, 64, 127}) {
      const auto x = ref::random_x<float>(T, cfg.in_features, 21);
      molora::RowMatrix<float> y(T, cfg.out_features);
      molora::MoLoRAWorkspace<float> ws;
      layer.forward(x, y, ws);
      const Counts c = count_allocations([&] { layer.forward(x, y, ws); });
      INFO("in=", cfg.in_features, " T=", T);
      CHECK(c.news == 0);
      CHECK(c.eigen == 0);
    }
  }
}

// Not a requirement, a record: what the other strategies, smaller batches and the base
// GEMM do (Eigen's GEMM takes its packing buffers from the heap when they exceed
// EIGEN_STACK_ALLOCATION_LIMIT, 128 KB by default).
TEST_CASE("no_alloc: record of Eigen heap use in the other paths") {
  const auto cfg = config(2048, 512, 8, 2, 16);
  auto layer = ref::random_layer<float>(cfg, 15);
  for (const Strategy st : {Strategy::eigen, Strategy::dense_shrink, Strategy::fused})
    for (Index T : {1, 16, 64, 256}) {
      layer.set_strategy(st);
      const auto x = ref::random_x<float>(T, cfg.in_features, 16);
      molora::RowMatrix<float> y(T, cfg.out_features);
      molora::MoLoRAWorkspace<float> ws;
      layer.forward(x, y, ws);
      const Counts adapter = count_allocations([&] { layer.adapter().add_delta(x, y, ws); });
      const Counts linear = count_allocations([&] { layer.forward(x, y, ws); });
      MESSAGE("strategy=", std::string(molora::to_string(st)), " T=", T, ": add_delta new=", adapter.news,
              " eigen_heap=", adapter.eigen, "; MoLoRALinear::forward new=", linear.news, " eigen_heap=", linear.eigen);
    }
}

// A smaller batch after a larger one in the same workspace: the dispatch plan, the softmax
// scratch, the kernels' scratch, the gathered rows, the router logits and the routing's ids
// and weights (GrowingMatrix) all keep their capacity, so nothing allocates.
TEST_CASE("no_alloc: a smaller batch after a larger one allocates nothing") {
  for (const auto& cfg : {config(515, 333, 8, 2, 17), config(64, 48, 4, 4, 16), config(1, 1, 1, 1, 1)}) {
    auto layer = ref::random_layer<float>(cfg, 15);
    {
      const Strategy st = Strategy::fused;
      layer.set_strategy(st);
      molora::MoLoRAWorkspace<float> ws;
      const auto x = ref::random_x<float>(64, cfg.in_features, 17);
      molora::RowMatrix<float> y = molora::RowMatrix<float>::Zero(64, cfg.out_features);
      layer.adapter().add_delta(x, y, ws);
      for (const Index T : {63, 16, 7, 1}) {
        const Counts c = count_allocations([&] { layer.adapter().add_delta(x.topRows(T), y.topRows(T), ws); });
        INFO("strategy=", std::string(molora::to_string(st)), " in=", cfg.in_features, " T=", T, " after a larger T");
        CHECK(c.news == 0);
        CHECK(c.eigen == 0);
        // The same smaller T again allocates nothing at all.
        const Counts again = count_allocations([&] { layer.adapter().add_delta(x.topRows(T), y.topRows(T), ws); });
        CHECK(again.news == 0);
        CHECK(again.eigen == 0);
      }
      // apply_expert keeps its plan's capacity: a smaller row count allocates nothing.
      const Eigen::VectorXf scales = Eigen::VectorXf::Ones(64);
      layer.adapter().apply_expert(0, x, y, scales, ws);
      const Counts one = count_allocations(
          [&] { layer.adapter().apply_expert(0, x.topRows(9), y.topRows(9), scales.head(9), ws); });
      CHECK(one.news == 0);
      CHECK(one.eigen == 0);
    }
  }
}

// An adapter set's warm forward (same batch, same adapter ids) allocates nothing either.
TEST_CASE("no_alloc: warm AdapterSet::add_delta (mixed adapters, per-token ids and segments)") {
  const Index in = 515, out = 333;
  std::vector<molora::SetAdapter<float>::Ptr> adapters;
  for (const auto& cfg : {config(in, out, 8, 2, 16), config(in, out, 4, 1, 7), config(in, out, 3, 3, 33)}) {
    auto layer = ref::random_layer<float>(cfg, 20);
    adapters.push_back(molora::SetAdapter<float>::share(
        std::make_shared<const molora::MoLoRAAdapter<float>>(layer.adapter())));
  }
  auto lora = std::make_shared<molora::LoRA<float>>(in, out, 5, 10.0);
  lora->set_A(ref::random_x<float>(5, in, 21));
  lora->set_B(ref::random_x<float>(out, 5, 22));
  adapters.push_back(molora::SetAdapter<float>::share(std::shared_ptr<const molora::LoRA<float>>(lora)));
  const molora::AdapterSet<float> set(in, out, adapters);
  for (const Index T : {1, 7, 64, 200}) {
    const auto x = ref::random_x<float>(T, in, 23);
    std::vector<std::int32_t> ids(static_cast<std::size_t>(T));
    for (Index t = 0; t < T; ++t) ids[static_cast<std::size_t>(t)] = static_cast<std::int32_t>((t * 7) % 5) - 1;
    const std::vector<molora::AdapterSegment> segs = {{T / 2, 0}, {T - T / 2, 3}};
    molora::RowMatrix<float> y = molora::RowMatrix<float>::Zero(T, out);
    molora::AdapterSetWorkspace<float> ws;
    set.add_delta(x, ids, y, ws);
    set.add_delta_segments(x, segs, y, ws);
    const Counts c = count_allocations([&] {
      for (int rep = 0; rep < 3; ++rep) {
        set.add_delta(x, ids, y, ws);
        set.add_delta_segments(x, segs, y, ws);
      }
    });
    INFO("T=", T);
    CHECK(c.news == 0);
    CHECK(c.eigen == 0);
  }
}

// GrowingMatrix, the storage behind the workspace's logits and the routing: a smaller shape
// reuses the buffer, a larger one grows it; copies and moves carry the live values only.
TEST_CASE("no_alloc: GrowingMatrix keeps its capacity and copies its values") {
  molora::GrowingMatrix<double> m(5, 3);
  for (Index i = 0; i < 5; ++i)
    for (Index j = 0; j < 3; ++j) m(i, j) = double(10 * i + j);
  const double* buffer = m.data();
  const Counts smaller = count_allocations([&] { m.resize(2, 7); });
  CHECK(smaller.news == 0);
  CHECK(m.rows() == 2);
  CHECK(m.cols() == 7);
  CHECK(m.data() == buffer);
  CHECK(m.capacity() == 15);
  m.resize(4, 4);  // 16 > 15: grows
  CHECK(m.capacity() == 16);
  const molora::RowMatrix<double> v = molora::RowMatrix<double>::Random(3, 2);
  m = v;  // an expression resizes to its shape
  CHECK(m.rows() == 3);
  CHECK(m.cols() == 2);
  CHECK(m == v);
  const molora::GrowingMatrix<double> copy = m;
  CHECK(copy == v);
  CHECK(copy.data() != m.data());
  molora::GrowingMatrix<double> moved = std::move(m);
  CHECK(moved == v);
  CHECK(m.size() == 0);
  molora::GrowingMatrix<std::int32_t> ids;
  ids.resize(2, 2);
  ids << 0, 1, 2, 3;
  CHECK(ids(1, 0) == 2);
  CHECK(ids.row(1).sum() == 5);
}

// The bf16-dot mode of a bf16 base: the skinny bf16-dot kernel, the bf16-dot GEMM (its packing
// scratch per thread, kept between calls) and, without AVX512_BF16, the rounded activations in
// a per-thread scratch: a warm call allocates nothing, also after a larger T.
TEST_CASE("no_alloc: warm bf16-dot mode (Linear and MoLoRALinear with a bf16 base)") {
  MESSAGE("AVX512_BF16 dot products: ", std::string(molora::kernels::bf16_dot_available() ? "yes" : "no"));
  for (const auto& cfg : {config(1024, 1024, 8, 2, 16), config(301, 77, 4, 2, 5)}) {
    const auto f32 = ref::random_layer<float>(cfg, 22);
    molora::MoLoRALinear<float, molora::bf16> layer(cfg);
    layer.set_base_weight(f32.base_weight());
    layer.set_base_bias(f32.base_bias());
    layer.adapter() = f32.adapter();
    layer.set_strategy(Strategy::fused);
    layer.set_bf16_dot(true);
    molora::Linear<float, molora::bf16> lin(cfg.in_features, cfg.out_features);
    lin.set_weight(f32.base_weight());
    lin.set_bf16_dot(true);
    const auto x = ref::random_x<float>(300, cfg.in_features, 23);
    molora::RowMatrix<float> y(300, cfg.out_features);
    molora::MoLoRAWorkspace<float> ws;
    lin.forward(x, y);
    for (const Index T : {300, 1, 2, 7, 15, 16, 64, 127, 128, 200}) {
      lin.forward(x.topRows(T), y.topRows(T));
      const Counts c = count_allocations([&] { lin.forward(x.topRows(T), y.topRows(T)); });
      INFO("Linear in=", cfg.in_features, " T=", T);
      CHECK(c.news == 0);
      CHECK(c.eigen == 0);
    }
    for (const Index T : {1, 2, 7, 15, 16, 64, 127}) {
      const auto xt = ref::random_x<float>(T, cfg.in_features, 24);
      molora::RowMatrix<float> yt(T, cfg.out_features);
      layer.forward(xt, yt, ws);
      const Counts c = count_allocations([&] { layer.forward(xt, yt, ws); });
      INFO("MoLoRALinear in=", cfg.in_features, " T=", T);
      CHECK(c.news == 0);
      CHECK(c.eigen == 0);
    }
  }
}
