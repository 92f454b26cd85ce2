// Tenants: adapters for every projection of a model added, replaced and dropped together;
// snapshots are immutable and outlive swaps; forwards running while another thread swaps
// snapshots see each tenant whole, with the rows its adapters alone give. Also built under
// ThreadSanitizer as test_tenants_tsan (tests/cmake/tenants.cmake, MOLORA_TSAN_TESTS).
#include <doctest/doctest.h>

#include <atomic>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include <molora/tenants.hpp>

#include "set_adapters.hpp"

namespace test_tenants {

using molora::Index;
using molora::RowMatrix;

namespace {

using molora_test::random_lora_adapter;
using molora_test::random_molora_adapter;
using molora_test::uniform_matrix;

using Ptr = molora::SetAdapter<float>::Ptr;

// A two-projection model: 40 -> 24 and 24 -> 40.
const std::vector<molora::ProjectionShape> kShapes = {{40, 24}, {24, 40}};

molora::Tenant<float> make_tenant(int i) {
  molora::Tenant<float> t;
  t.id = "tenant-" + std::to_string(i);
  const auto seed = std::uint64_t(1000 * (i + 1));
  if (i % 3 == 0)
    t.adapters = {random_molora_adapter(40, 24, 4, 2, 8, true, seed), random_lora_adapter(24, 40, 4, seed + 500)};
  else if (i % 3 == 1)
    t.adapters = {random_lora_adapter(40, 24, 16, seed), random_molora_adapter(24, 40, 3, 1, 5, true, seed + 500)};
  else
    t.adapters = {random_molora_adapter(40, 24, 8, 2, 3, true, seed), nullptr};  // base only in projection 1
  return t;
}

// The model's forward for a batch of requests: y1 = x + delta_0(x) (a stand-in base: the
// identity padded), then y2 = 0 + delta_1(y1); both projections run with one snapshot.
RowMatrix<float> model_forward(const molora::TenantSnapshot<float>& snap, const RowMatrix<float>& x,
                               const std::vector<std::string>& tenant_of_token,
                               molora::AdapterSetWorkspace<float>& ws) {
  std::vector<std::int32_t> ids;
  for (const auto& id : tenant_of_token) ids.push_back(snap.slot(id));
  RowMatrix<float> h = x.leftCols(24);
  snap.projection(0).add_delta(x, ids, h, ws);
  RowMatrix<float> y = RowMatrix<float>::Zero(x.rows(), 40);
  snap.projection(1).add_delta(h, ids, y, ws);
  return y;
}

}  // namespace

TEST_CASE("tenants: a snapshot puts each tenant's adapters in the same slot of every projection") {
  molora::TenantRegistry<float> reg(kShapes);
  for (int i = 0; i < 4; ++i) reg.add(make_tenant(i));
  CHECK(reg.version() == 4);
  const auto snap = reg.current();
  REQUIRE(snap->num_tenants() == 4);
  for (int i = 0; i < 4; ++i) {
    const std::int32_t s = snap->slot("tenant-" + std::to_string(i));
    CHECK(s == i);
    for (Index p = 0; p < 2; ++p) CHECK(snap->projection(p).adapter(s) == snap->tenant(s).adapters[std::size_t(p)]);
  }
  CHECK(snap->projection(1).adapter(2) == nullptr);
  // A mixed batch equals each tenant's batch alone, row by row, bitwise.
  const Index T = 23;
  const RowMatrix<float> x = uniform_matrix(T, 40, 7);
  std::vector<std::string> mix;
  for (Index t = 0; t < T; ++t) mix.push_back("tenant-" + std::to_string(t % 4));
  molora::AdapterSetWorkspace<float> ws;
  const RowMatrix<float> y = model_forward(*snap, x, mix, ws);
  for (int i = 0; i < 4; ++i) {
    const RowMatrix<float> yi = model_forward(*snap, x, std::vector<std::string>(std::size_t(T), "tenant-" + std::to_string(i)), ws);
    for (Index t = i; t < T; t += 4) CHECK((y.row(t).array() == yi.row(t).array()).all());
  }
}

TEST_CASE("tenants: replace, drop and scale swap whole tenants; old snapshots stay valid") {
  molora::TenantRegistry<float> reg(kShapes);
  for (int i = 0; i < 3; ++i) reg.add(make_tenant(i));
  const auto before = reg.current();
  const Index T = 9;
  const RowMatrix<float> x = uniform_matrix(T, 40, 8);
  const std::vector<std::string> ones(std::size_t(T), "tenant-1");
  molora::AdapterSetWorkspace<float> ws;
  const RowMatrix<float> y_before = model_forward(*before, x, ones, ws);

  CHECK(reg.drop("tenant-1"));
  CHECK_FALSE(reg.drop("tenant-1"));
  const auto after = reg.current();
  CHECK(after->num_tenants() == 2);
  CHECK(after->find("tenant-1") == -1);
  CHECK(after->slot("tenant-2") == 1);  // slots are per snapshot
  CHECK_THROWS_WITH_AS(after->slot("tenant-1"),
                       "molora config error: tenant id: expected a tenant of the current snapshot, got \"tenant-1\"",
                       molora::config_error);
  // The old snapshot still holds tenant-1's adapters and gives the same rows.
  CHECK(model_forward(*before, x, ones, ws) == y_before);

  // Replacing keeps the slot; scaling by 0 leaves the base (and here the padded identity).
  molora::Tenant<float> t0 = make_tenant(4);
  t0.id = "tenant-0";
  reg.add(t0);
  CHECK(reg.current()->slot("tenant-0") == 0);
  CHECK(reg.current()->tenant(0).adapters[0] == t0.adapters[0]);
  reg.set_scale("tenant-0", 0.0);
  const RowMatrix<float> y0 = model_forward(*reg.current(), x, std::vector<std::string>(std::size_t(T), "tenant-0"), ws);
  CHECK(y0.isZero(0));
  CHECK_THROWS_AS(reg.set_scale("nobody", 2.0), molora::config_error);
}

TEST_CASE("tenants: bad tenants are refused and the current snapshot is unchanged") {
  molora::TenantRegistry<float> reg(kShapes);
  reg.add(make_tenant(0));
  const auto snap = reg.current();
  molora::Tenant<float> wrong_count{"short", {random_lora_adapter(40, 24, 2, 9)}};
  CHECK_THROWS_WITH_AS(reg.add(wrong_count),
                       "molora shape error: tenant \"short\" adapters (one per projection): expected 2, got 1",
                       molora::shape_error);
  molora::Tenant<float> wrong_shape{"swapped", {random_lora_adapter(24, 40, 2, 9), random_lora_adapter(40, 24, 2, 10)}};
  CHECK_THROWS_WITH_AS(reg.add(wrong_shape),
                       "molora shape error: tenant \"swapped\" adapter for projection 0 shape (in, out): expected "
                       "40 -> 24, got 24 -> 40",
                       molora::shape_error);
  molora::Tenant<float> no_id{"", {nullptr, nullptr}};
  CHECK_THROWS_WITH_AS(reg.add(no_id), "molora config error: tenant 1 id: expected a non-empty id, got \"\"",
                       molora::config_error);
  CHECK(reg.current() == snap);
  CHECK(reg.version() == 1);
}

TEST_CASE("tenants: forwards on several threads while another thread adds and drops tenants") {
  molora::TenantRegistry<float> reg(kShapes);
  const int kTenants = 6;
  std::vector<molora::Tenant<float>> all;
  for (int i = 0; i < kTenants; ++i) all.push_back(make_tenant(i));
  // What each tenant's rows must be (each token's row depends only on its own adapters).
  const Index T = 12;
  const RowMatrix<float> x = uniform_matrix(T, 40, 9);
  std::vector<RowMatrix<float>> want;
  {
    const molora::TenantSnapshot<float> full(kShapes, all);
    molora::AdapterSetWorkspace<float> ws;
    for (int i = 0; i < kTenants; ++i)
      want.push_back(model_forward(full, x, std::vector<std::string>(std::size_t(T), all[std::size_t(i)].id), ws));
  }
  reg.add(all[0]);
  std::atomic<bool> stop{false};
  std::atomic<long> forwards{0}, mismatches{0};
  std::vector<std::thread> readers;
  for (int r = 0; r < 3; ++r)
    readers.emplace_back([&, r] {
      molora::AdapterSetWorkspace<float> ws;
      long n = 0;
      while (!stop.load(std::memory_order_acquire) || n < 20) {
        const auto snap = reg.current();
        std::vector<std::string> ids;
        std::vector<int> which;
        for (Index t = 0; t < T; ++t) {
          const std::int32_t s = static_cast<std::int32_t>((t + r + n) % snap->num_tenants());
          ids.push_back(snap->tenant(s).id);
          which.push_back(std::stoi(snap->tenant(s).id.substr(7)));
        }
        const RowMatrix<float> y = model_forward(*snap, x, ids, ws);
        for (Index t = 0; t < T; ++t)
          if (!(y.row(t).array() == want[std::size_t(which[std::size_t(t)])].row(t).array()).all()) ++mismatches;
        ++n;
      }
      forwards += n;
    });
  std::thread writer([&] {
    for (int round = 0; round < 60; ++round) {
      const int i = 1 + round % (kTenants - 1);
      if (reg.current()->find(all[std::size_t(i)].id) >= 0)
        reg.drop(all[std::size_t(i)].id);
      else
        reg.add(all[std::size_t(i)]);
    }
    stop.store(true, std::memory_order_release);
  });
  writer.join();
  for (auto& t : readers) t.join();
  CHECK(mismatches.load() == 0);
  CHECK(forwards.load() >= 60);
  CHECK(reg.version() == 61);
}

}  // namespace test_tenants
