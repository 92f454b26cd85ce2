// AdapterStore: at most budget bytes of adapters resident, the least recently used evicted
// first (checked against a plain list model over a random sequence of gets), an evicted
// adapter reloaded from its file with the same bits, errors naming the id, and gets from
// several threads (also built under ThreadSanitizer as test_adapter_store_tsan).
#include <doctest/doctest.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include <molora/adapter_store.hpp>
#include <molora/io/adapter_set.hpp>

#include "set_adapters.hpp"
#include "test_util.hpp"

namespace test_adapter_store {

using molora::Index;
using molora::RowMatrix;

namespace {

using molora_test::random_lora_adapter;
using molora_test::random_molora_adapter;
using molora_test::uniform_matrix;

using Ptr = molora::SetAdapter<float>::Ptr;

// Every weight of a and b (router, bias, each expert's A and B^T) bitwise equal, and the
// same configuration.
bool same_bits(const molora::SetAdapter<float>& a, const molora::SetAdapter<float>& b) {
  const auto &va = a.views(), &vb = b.views();
  if (va.in_features != vb.in_features || va.out_features != vb.out_features || va.num_experts != vb.num_experts ||
      va.top_k != vb.top_k || va.rank != vb.rank || va.scaling != vb.scaling ||
      va.normalize_top_k != vb.normalize_top_k || (va.router_weight == nullptr) != (vb.router_weight == nullptr) ||
      (va.router_bias == nullptr) != (vb.router_bias == nullptr))
    return false;
  const Index E = va.num_experts, r = va.rank, in = va.in_features, out = va.out_features;
  auto eq = [](const float* p, const float* q, Index n) {
    return std::memcmp(p, q, static_cast<std::size_t>(n) * sizeof(float)) == 0;
  };
  if (va.router_weight && !eq(va.router_weight, vb.router_weight, E * in)) return false;
  if (va.router_bias && !eq(va.router_bias, vb.router_bias, E)) return false;
  for (std::size_t e = 0; e < static_cast<std::size_t>(E); ++e)
    if (!eq(va.A[e], vb.A[e], r * in) || !eq(va.Bt[e], vb.Bt[e], r * out)) return false;
  return true;
}

// y = delta of one adapter for every row of x (a set of one adapter).
RowMatrix<float> forward_one(const Ptr& a, const RowMatrix<float>& x) {
  const molora::AdapterSet<float> set(a->in_features(), a->out_features(), {a});
  RowMatrix<float> y = RowMatrix<float>::Zero(x.rows(), a->out_features());
  const std::vector<std::int32_t> ids(static_cast<std::size_t>(x.rows()), 0);
  molora::AdapterSetWorkspace<float> ws;
  set.add_delta(x, ids, y, ws);
  return y;
}

// A LoRA's delta loop by loop in double: s * B (A x).
RowMatrix<double> lora_reference(const molora::SetAdapter<float>& a, const RowMatrix<float>& x) {
  const auto& v = a.views();
  const Index r = v.rank, in = v.in_features, out = v.out_features;
  RowMatrix<double> y = RowMatrix<double>::Zero(x.rows(), out);
  for (Index t = 0; t < x.rows(); ++t)
    for (Index j = 0; j < r; ++j) {
      double h = 0;
      for (Index c = 0; c < in; ++c) h += double(v.A[0][j * in + c]) * double(x(t, c));
      for (Index o = 0; o < out; ++o) y(t, o) += double(a.effective_scaling()) * double(v.Bt[0][j * out + o]) * h;
    }
  return y;
}

// The adapters of the tests, one per id: MoLoRA and LoRA, odd sizes and ranks, so their
// byte counts differ.
std::map<std::string, Ptr> make_adapters(Index in, Index out, int n, std::uint64_t seed) {
  std::mt19937_64 g(seed);
  std::map<std::string, Ptr> m;
  for (int i = 0; i < n; ++i) {
    const Index r = 1 + Index(g() % 9);
    const std::string id = "tenant-" + std::to_string(i);
    if (i % 3 == 1)
      m[id] = random_lora_adapter(in, out, r, seed + 100 * std::uint64_t(i));
    else {
      const Index E = 1 + Index(g() % 5), k = 1 + Index(g() % std::uint64_t(E));
      m[id] = random_molora_adapter(in, out, E, k, r, i % 2 == 0, seed + 100 * std::uint64_t(i));
    }
  }
  return m;
}

}  // namespace

TEST_CASE("adapter_store: weight_bytes counts router, bias and every expert") {
  const auto a = random_molora_adapter(13, 7, 3, 2, 5, true, 2);
  CHECK(a->weight_bytes() == sizeof(float) * std::size_t(3 * 13 + 3 + 3 * 5 * (13 + 7)));
  const auto l = random_lora_adapter(13, 7, 4, 3);
  CHECK(l->weight_bytes() == sizeof(float) * std::size_t(4 * (13 + 7)));
}

TEST_CASE("adapter_store: least recently used evicted first, budget never exceeded (random gets vs a list model)") {
  for (const std::uint64_t seed : {1u, 2u, 3u}) {
    const Index in = 1 + Index(seed * 17 % 41), out = 1 + Index(seed * 29 % 37);
    const auto adapters = make_adapters(in, out, 7, seed);
    std::size_t largest = 0, total = 0;
    for (const auto& kv : adapters) {
      largest = std::max(largest, kv.second->weight_bytes());
      total += kv.second->weight_bytes();
    }
    const std::size_t budget = std::max(largest, total / 3);  // about a third resident
    molora::AdapterStore<float> store(budget);
    std::map<std::string, int> loads;
    for (const auto& kv : adapters) {
      const std::string id = kv.first;
      const Ptr a = kv.second;
      store.add(id, [id, a, &loads] {
        ++loads[id];
        return a;
      });
    }
    CHECK(store.resident_bytes() == 0);
    std::vector<std::string> model;  // resident ids, most recently used first
    std::size_t model_bytes = 0;
    std::uint64_t model_loads = 0, model_evictions = 0;
    std::mt19937_64 g(seed + 7);
    for (int step = 0; step < 300; ++step) {
      const std::string id = "tenant-" + std::to_string(g() % adapters.size());
      const std::size_t bytes = adapters.at(id)->weight_bytes();
      const auto it = std::find(model.begin(), model.end(), id);
      if (it != model.end()) {
        model.erase(it);
      } else {
        while (model_bytes + bytes > budget) {
          model_bytes -= adapters.at(model.back())->weight_bytes();
          model.pop_back();
          ++model_evictions;
        }
        model_bytes += bytes;
        ++model_loads;
      }
      model.insert(model.begin(), id);
      const Ptr got = store.get(id);
      REQUIRE(got == adapters.at(id));
      REQUIRE(store.resident_ids() == model);
      REQUIRE(store.resident_bytes() == model_bytes);
      REQUIRE(store.resident_bytes() <= budget);
      REQUIRE(store.loads() == model_loads);
      REQUIRE(store.evictions() == model_evictions);
    }
    int sum = 0;
    for (const auto& kv : loads) sum += kv.second;
    CHECK(std::uint64_t(sum) == model_loads);
    CHECK(model_evictions > 0);  // the sequence did evict
  }
}

TEST_CASE("adapter_store: an evicted adapter is reloaded from its file with the same bits") {
  test_util::TempDir dir;
  const Index in = 37, out = 23;
  const std::vector<Ptr> originals = {random_molora_adapter(in, out, 4, 2, 6, true, 10), random_lora_adapter(in, out, 3, 11),
                                      random_molora_adapter(in, out, 1, 1, 1, false, 12), random_lora_adapter(in, out, 1, 13)};
  std::size_t largest = 0;
  for (const auto& a : originals) largest = std::max(largest, a->weight_bytes());
  molora::AdapterStore<float> store(largest);  // room for one of the largest at a time
  for (std::size_t i = 0; i < originals.size(); ++i) {
    const std::string path = dir.file("a" + std::to_string(i) + ".safetensors");
    molora::save_set_adapters<float>(path, {{"proj", originals[i].get()}});
    store.add("a" + std::to_string(i), molora::set_adapter_loader<float>(path, "proj"));
  }
  const RowMatrix<float> x = uniform_matrix(9, in, 5);
  std::vector<std::weak_ptr<const molora::SetAdapter<float>>> first(originals.size());
  for (int pass = 0; pass < 2; ++pass)
    for (std::size_t i = 0; i < originals.size(); ++i) {
      const std::string id = "a" + std::to_string(i);
      if (pass == 1) CHECK(first[i].expired());  // evicted since, and let go of
      const auto loads = store.loads();
      const Ptr loaded = store.get(id);
      CHECK(store.loads() == loads + 1);  // loaded from the file (the largest evicted the rest)
      if (pass == 0) first[i] = loaded;
      CHECK(same_bits(*loaded, *originals[i]));
      CHECK(forward_one(loaded, x) == forward_one(originals[i], x));
      if (!loaded->has_router()) {
        const RowMatrix<double> ref = lora_reference(*originals[i], x);
        CHECK((forward_one(loaded, x).cast<double>() - ref).cwiseAbs().maxCoeff() <= 1e-4 * (1 + ref.cwiseAbs().maxCoeff()));
      }
      CHECK(store.resident_ids().front() == id);
      CHECK(store.resident_bytes() <= store.budget_bytes());
    }
  CHECK(store.evictions() > 0);
  // An adapter a caller still holds stays valid after its eviction.
  const Ptr held = store.get("a0");
  store.get("a1");
  CHECK_FALSE(store.resident("a0"));
  CHECK(same_bits(*held, *originals[0]));
}

TEST_CASE("adapter_store: errors name the id; a failed get changes nothing") {
  const auto a = random_molora_adapter(11, 5, 2, 1, 3, false, 1), b = random_lora_adapter(11, 5, 2, 2);
  CHECK_THROWS_AS(molora::AdapterStore<float>(0), molora::config_error);
  molora::AdapterStore<float> store(a->weight_bytes());
  store.add("a", [a] { return a; });
  CHECK_THROWS_WITH_AS(store.add("a", [b] { return b; }), doctest::Contains("\"a\" again"), molora::config_error);
  CHECK_THROWS_AS(store.add("", [b] { return b; }), molora::config_error);
  CHECK_THROWS_AS(store.add("empty", molora::AdapterStore<float>::Loader{}), molora::config_error);
  CHECK_THROWS_WITH_AS(store.get("nobody"), doctest::Contains("\"nobody\""), molora::config_error);
  store.add("null", [] { return Ptr{}; });
  store.add("big", [] { return random_molora_adapter(11, 5, 4, 2, 8, false, 3); });
  store.add("bad-file", molora::set_adapter_loader<float>("/nonexistent/dir/x.safetensors"));
  CHECK_THROWS_WITH_AS(molora::set_adapter_loader<float>(""), doctest::Contains("path"), molora::config_error);
  CHECK_THROWS_WITH_AS(molora::set_adapter_loader<float>("x.safetensors", "", std::nan("")),
                       doctest::Contains("scale"), molora::config_error);
  CHECK(store.get("a") == a);
  CHECK_THROWS_WITH_AS(store.get("null"), doctest::Contains("\"null\""), molora::config_error);
  CHECK_THROWS_WITH_AS(store.get("big"), doctest::Contains("\"big\" weight bytes"), molora::config_error);
  CHECK_THROWS_AS(store.get("bad-file"), molora::format_error);
  CHECK(store.resident_ids() == std::vector<std::string>{"a"});  // nothing evicted by the failures
  CHECK(store.loads() == 1);
  CHECK(store.remove("a"));
  CHECK_FALSE(store.remove("a"));
  CHECK(store.resident_bytes() == 0);
  CHECK_THROWS_AS(store.get("a"), molora::config_error);
}

TEST_CASE("adapter_store: gets and forwards on several threads") {
  const Index in = 29, out = 19;
  const auto adapters = make_adapters(in, out, 6, 21);
  std::size_t largest = 0;
  for (const auto& kv : adapters) largest = std::max(largest, kv.second->weight_bytes());
  molora::AdapterStore<float> store(2 * largest);
  for (const auto& kv : adapters) {
    const Ptr a = kv.second;
    store.add(kv.first, [a] { return a; });
  }
  const RowMatrix<float> x = uniform_matrix(5, in, 3);
  std::map<std::string, RowMatrix<float>> expected;
  for (const auto& kv : adapters) expected[kv.first] = forward_one(kv.second, x);
  std::atomic<int> wrong{0}, over_budget{0};
  std::vector<std::thread> threads;
  for (int th = 0; th < 3; ++th)
    threads.emplace_back([&, th] {
      std::mt19937_64 g(std::uint64_t(th) + 100);
      for (int i = 0; i < 60; ++i) {
        const std::string id = "tenant-" + std::to_string(g() % adapters.size());
        const Ptr a = store.get(id);
        if (forward_one(a, x) != expected.at(id)) ++wrong;
        if (store.resident_bytes() > store.budget_bytes()) ++over_budget;
      }
    });
  for (auto& t : threads) t.join();
  CHECK(wrong.load() == 0);
  CHECK(over_budget.load() == 0);
  CHECK(store.resident_bytes() <= store.budget_bytes());
}

}  // namespace test_adapter_store
