// AdapterSet: a batch that mixes adapters (MoLoRA with different E, k, r, gating; plain
// LoRAs; empty slots; base-only tokens) gives every token exactly what its adapter alone
// gives it (bitwise: same kernels, same order per token), and what a loop-by-loop double
// reference gives; segments equal per-token ids; per-adapter scale; a tenant's non-finite
// values stay in its rows; errors name field, expected and actual value.
#include <doctest/doctest.h>

#include <cmath>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include <molora/adapter_set.hpp>

#include "reference.hpp"

namespace test_adapter_set {

using molora::Index;
using molora::RowMatrix;

namespace {

template <class Scalar>
std::shared_ptr<molora::MoLoRAAdapter<Scalar>> random_molora(Index in, Index out, Index E, Index k, Index r,
                                                             bool bias, bool normalize, std::uint64_t seed) {
  molora::MoLoRAConfig c;
  c.in_features = in;
  c.out_features = out;
  c.num_experts = E;
  c.top_k = k;
  c.rank = r;
  c.lora_alpha = 2.0 * double(r) + 1;
  c.router_bias = bias;
  c.normalize_top_k = normalize;
  auto a = std::make_shared<molora::MoLoRAAdapter<Scalar>>(c);
  std::mt19937_64 g(seed);
  std::uniform_real_distribution<double> u(-1.0, 1.0);
  auto rnd = [&](Index rows, Index cols) {
    RowMatrix<double> m(rows, cols);
    for (Index i = 0; i < rows; ++i)
      for (Index j = 0; j < cols; ++j) m(i, j) = u(g);
    return m;
  };
  a->router().set_weight(rnd(E, in));
  if (bias) a->router().set_bias(rnd(1, E));
  for (Index e = 0; e < E; ++e) {
    a->set_expert_A(e, rnd(r, in));
    a->set_expert_B(e, rnd(out, r));
  }
  a->set_strategy(molora::Strategy::fused);  // the set's kernel, for the bitwise comparison
  return a;
}

template <class Scalar>
std::shared_ptr<molora::LoRA<Scalar>> random_lora(Index in, Index out, Index r, std::uint64_t seed) {
  auto l = std::make_shared<molora::LoRA<Scalar>>(in, out, r, 3.0 * double(r));
  std::mt19937_64 g(seed);
  std::uniform_real_distribution<double> u(-1.0, 1.0);
  RowMatrix<double> a(r, in), b(out, r);
  for (Index i = 0; i < a.size(); ++i) a.data()[i] = u(g);
  for (Index i = 0; i < b.size(); ++i) b.data()[i] = u(g);
  l->set_A(a);
  l->set_B(b);
  return l;
}

// The set's adapters, kept with their trainable objects for the references.
template <class Scalar>
struct Fixture {
  Index in, out;
  std::vector<std::shared_ptr<molora::MoLoRAAdapter<Scalar>>> molora;  // null where not MoLoRA
  std::vector<std::shared_ptr<molora::LoRA<Scalar>>> lora;             // null where not LoRA
  std::vector<double> scale;
  std::shared_ptr<molora::AdapterSet<Scalar>> set;

  void build() {
    std::vector<typename molora::SetAdapter<Scalar>::Ptr> ptrs;
    for (std::size_t a = 0; a < molora.size(); ++a) {
      if (molora[a])
        ptrs.push_back(molora::SetAdapter<Scalar>::share(std::shared_ptr<const molora::MoLoRAAdapter<Scalar>>(molora[a]), scale[a]));
      else if (lora[a])
        ptrs.push_back(molora::SetAdapter<Scalar>::share(std::shared_ptr<const molora::LoRA<Scalar>>(lora[a]), scale[a]));
      else
        ptrs.push_back(nullptr);
    }
    set = std::make_shared<molora::AdapterSet<Scalar>>(in, out, ptrs);
  }
};

// Five slots: MoLoRA E=4 k=2 r=5 (bias, renormalised); MoLoRA E=3 k=1 r=16 (no bias, masked
// probabilities); plain LoRA r=7; an empty slot; MoLoRA E=5 k=5 r=1 (dense).
template <class Scalar>
Fixture<Scalar> mixed(Index in, Index out, std::uint64_t seed) {
  Fixture<Scalar> f{in, out, {}, {}, {}, nullptr};
  f.molora = {random_molora<Scalar>(in, out, 4, 2, 5, true, true, seed + 1),
              random_molora<Scalar>(in, out, 3, 1, 16, false, false, seed + 2), nullptr, nullptr,
              random_molora<Scalar>(in, out, 5, 5, 1, true, true, seed + 3)};
  f.lora = {nullptr, nullptr, random_lora<Scalar>(in, out, 7, seed + 4), nullptr, nullptr};
  f.scale = {1, 1, 1, 1, 1};
  f.build();
  return f;
}

std::vector<std::int32_t> random_ids(Index T, std::int32_t N, std::uint64_t seed) {
  std::mt19937_64 g(seed);
  std::uniform_int_distribution<int> u(-1, N - 1);
  std::vector<std::int32_t> ids(static_cast<std::size_t>(T));
  for (auto& v : ids) v = static_cast<std::int32_t>(u(g));
  return ids;
}

// The loop-by-loop double reference of one token's delta through a MoLoRA adapter or a LoRA.
template <class Scalar>
std::vector<double> ref_delta(const Fixture<Scalar>& f, std::size_t a, const std::vector<double>& x) {
  std::vector<double> d(static_cast<std::size_t>(f.out), 0.0);
  if (a >= f.molora.size()) return d;
  if (const auto& m = f.molora[a]) {
    ref::Layer L;
    L.in = f.in;
    L.out = f.out;
    L.E = m->num_experts();
    L.k = m->config().top_k;
    L.r = m->rank();
    L.scaling = double(m->scaling()) * f.scale[a];
    L.normalize = m->config().normalize_top_k;
    L.Wr = ref::from_eigen(m->router().weight());
    for (Index e = 0; e < L.E; ++e) {
      L.br.push_back(m->router().has_bias() ? double(m->router().bias()(e)) : 0.0);
      L.A.push_back(ref::from_eigen(m->expert_A(e)));
      L.B.push_back(ref::from_eigen(m->expert_B(e)));
    }
    const auto z = ref::logits(L, x);
    const auto sel = ref::top_k(z, L.k);
    return ref::delta(L, x, sel, ref::gate_weights(z, sel, L.normalize));
  }
  if (const auto& l = f.lora[a]) {
    for (Index o = 0; o < f.out; ++o) {
      double acc = 0;
      for (Index j = 0; j < l->rank(); ++j) {
        double h = 0;
        for (Index i = 0; i < f.in; ++i) h += double(l->A()(j, i)) * x[std::size_t(i)];
        acc += double(l->B()(o, j)) * h;
      }
      d[std::size_t(o)] = double(l->scaling()) * f.scale[a] * acc;
    }
  }
  return d;
}

template <class Scalar>
void check_against_alone_and_reference(Fixture<Scalar>& f, Index T, std::uint64_t seed) {
  const auto N = static_cast<std::int32_t>(f.molora.size());
  const auto x = ref::random_x<Scalar>(T, f.in, seed);
  const RowMatrix<Scalar> y0 = ref::random_x<Scalar>(T, f.out, seed + 100);  // a host's base output
  auto ids = random_ids(T, N, seed + 7);
  if (T > 2) ids[1] = 99 % N, ids[2] = -1;
  RowMatrix<Scalar> y = y0;
  molora::AdapterSetWorkspace<Scalar> ws;
  const auto& routing = f.set->add_delta(x, ids, y, ws);
  REQUIRE(routing.num_tokens() == T);

  // Each adapter alone on its own tokens (gathered into a batch of their own).
  for (std::int32_t a = 0; a < N; ++a) {
    std::vector<Index> toks;
    for (Index t = 0; t < T; ++t)
      if (ids[std::size_t(t)] == a) toks.push_back(t);
    if (toks.empty()) continue;
    const auto n = static_cast<Index>(toks.size());
    RowMatrix<Scalar> xa(n, f.in), ya(n, f.out);
    for (Index i = 0; i < n; ++i) {
      xa.row(i) = x.row(toks[std::size_t(i)]);
      ya.row(i) = y0.row(toks[std::size_t(i)]);
    }
    if (f.molora[std::size_t(a)]) {
      molora::MoLoRAWorkspace<Scalar> wa;
      f.molora[std::size_t(a)]->add_delta(xa, ya, wa);
      for (Index i = 0; i < n; ++i) {
        INFO("adapter ", a, " token ", toks[std::size_t(i)], " T=", T);
        CHECK((ya.row(i).array() == y.row(toks[std::size_t(i)]).array()).all());  // bitwise
      }
    } else if (f.lora[std::size_t(a)]) {
      ya += f.lora[std::size_t(a)]->delta(xa);  // Eigen's GEMMs: another order of accumulation
      RowMatrix<Scalar> got(n, f.out);
      for (Index i = 0; i < n; ++i) got.row(i) = y.row(toks[std::size_t(i)]);
      const double tol = std::is_same_v<Scalar, float> ? 1e-6 : 1e-12;
      CHECK(double((got - ya).norm()) <= tol * double(ya.norm()));
    } else {  // empty slot: base only
      for (Index i = 0; i < n; ++i) CHECK((y.row(toks[std::size_t(i)]).array() == y0.row(toks[std::size_t(i)]).array()).all());
    }
  }
  // Base-only tokens untouched; every token against the double reference.
  const double tol = std::is_same_v<Scalar, float> ? 2e-5 : 1e-11;
  for (Index t = 0; t < T; ++t) {
    const std::int32_t a = ids[std::size_t(t)];
    if (a < 0) {
      CHECK((y.row(t).array() == y0.row(t).array()).all());
      continue;
    }
    std::vector<double> xt(std::size_t(f.in));
    for (Index i = 0; i < f.in; ++i) xt[std::size_t(i)] = double(x(t, i));
    const auto d = ref_delta(f, std::size_t(a), xt);
    double scale = 1, err = 0;
    for (Index o = 0; o < f.out; ++o) {
      const double want = double(y0(t, o)) + d[std::size_t(o)];
      scale = std::max(scale, std::abs(want));
      err = std::max(err, std::abs(double(y(t, o)) - want));
    }
    INFO("token ", t, " adapter ", a, " T=", T);
    CHECK(err / scale < tol);
  }
}

}  // namespace

TEST_CASE_TEMPLATE("adapter_set: mixed adapters equal each adapter alone (bitwise) and the double reference", Scalar,
                   float, double) {
  struct Shape {
    Index in, out;
  };
  std::uint64_t seed = 1;
  for (const Shape s : {Shape{37, 29}, Shape{1, 1}, Shape{64, 48}, Shape{130, 67}, Shape{17, 200}}) {
    auto f = mixed<Scalar>(s.in, s.out, 1000 + seed);
    for (const Index T : {1, 2, 7, 33, 64, 129}) check_against_alone_and_reference(f, T, seed++);
  }
}

TEST_CASE("adapter_set: segments give the per-token result; T = 0; x and y may alias") {
  auto f = mixed<double>(23, 23, 5);
  const std::vector<molora::AdapterSegment> segs = {{3, 0}, {0, 2}, {5, -1}, {1, 4}, {4, 2}, {6, 1}, {2, 3}};
  std::vector<std::int32_t> ids;
  for (const auto& s : segs)
    for (Index i = 0; i < s.num_tokens; ++i) ids.push_back(s.adapter);
  const Index T = static_cast<Index>(ids.size());
  const auto x = ref::random_x<double>(T, 23, 6);
  RowMatrix<double> y1 = RowMatrix<double>::Zero(T, 23), y2 = y1;
  molora::AdapterSetWorkspace<double> ws;
  f.set->add_delta(x, ids, y1, ws);
  f.set->add_delta_segments(x, segs, y2, ws);
  CHECK(y1 == y2);
  // In place: y = x + delta(x) with y sharing x's memory.
  RowMatrix<double> xy = x;
  f.set->add_delta(xy, ids, xy, ws);
  CHECK((xy - (x + y1)).norm() <= 1e-14 * (x + y1).norm());
  // Empty batch.
  RowMatrix<double> x0(0, 23), y0(0, 23);
  CHECK(f.set->add_delta(x0, std::vector<std::int32_t>{}, y0, ws).num_pairs() == 0);
  // A set without adapters, and one whose adapters no token uses.
  molora::AdapterSet<double> empty(23, 23);
  RowMatrix<double> y3 = RowMatrix<double>::Zero(T, 23);
  empty.add_delta(x, std::vector<std::int32_t>(std::size_t(T), -1), y3, ws);
  CHECK(y3.isZero(0));
  f.set->add_delta(x, std::vector<std::int32_t>(std::size_t(T), 3), y3, ws);  // the empty slot
  CHECK(y3.isZero(0));
}

TEST_CASE("adapter_set: the routing record and the plan group pairs by (adapter, expert)") {
  auto f = mixed<double>(19, 11, 9);
  const Index T = 40;
  const auto x = ref::random_x<double>(T, 19, 10);
  const auto ids = random_ids(T, 5, 11);
  molora::AdapterSetWorkspace<double> ws;
  const auto& rt = f.set->route_tokens(x, ids, ws);
  const Index k_of[5] = {2, 1, 1, 0, 5};
  Index pairs = 0;
  for (Index t = 0; t < T; ++t) {
    const std::int32_t a = ids[std::size_t(t)];
    CHECK(rt.top_k(t) == (a < 0 ? 0 : k_of[a]));
    pairs += a < 0 ? 0 : k_of[a];
  }
  CHECK(rt.num_pairs() == pairs);
  CHECK(f.set->num_virtual_experts() == 4 + 3 + 1 + 5);
  const auto& p = ws.plan;
  for (Index v = 0; v < f.set->num_virtual_experts(); ++v)
    for (Index q = p.begin(v); q < p.begin(v) + p.count(v); ++q) {
      const auto t = p.tokens[std::size_t(q)];
      const auto pair = p.slots[std::size_t(q)];
      const std::int32_t a = ids[std::size_t(t)];
      REQUIRE(a >= 0);
      CHECK(f.set->first_virtual(a) + rt.experts[std::size_t(pair)] == v);
      if (q > p.begin(v)) CHECK(p.tokens[std::size_t(q) - 1] < t);
    }
}

TEST_CASE("adapter_set: per-adapter scale multiplies the adapter's delta") {
  auto f = mixed<double>(31, 13, 21);
  const Index T = 25;
  const auto x = ref::random_x<double>(T, 31, 22);
  const auto ids = random_ids(T, 5, 23);
  RowMatrix<double> y1 = RowMatrix<double>::Zero(T, 13), y2 = y1;
  molora::AdapterSetWorkspace<double> ws;
  f.set->add_delta(x, ids, y1, ws);
  f.scale = {0.5, -1.0, 2.5, 1, 0};
  f.build();
  f.set->add_delta(x, ids, y2, ws);
  const double want[5] = {0.5, -1.0, 2.5, 1, 0};
  for (Index t = 0; t < T; ++t) {
    const std::int32_t a = ids[std::size_t(t)];
    const double m = a < 0 ? 0.0 : want[a];
    CHECK((y2.row(t) - m * y1.row(t)).norm() <= 1e-12 * (1 + y1.row(t).norm()));
  }
  CHECK_THROWS_AS(f.set->adapter(0)->with_scale(std::nan("")), molora::config_error);
}

TEST_CASE("adapter_set: a non-finite value in one tenant's adapter never reaches another tenant's rows") {
  const Index in = 33, out = 21, T = 48;
  auto good = random_molora<float>(in, out, 4, 2, 8, true, true, 31);
  auto bad = random_molora<float>(in, out, 4, 2, 8, true, true, 32);
  // Finite weights whose products overflow: inf and NaN (inf - inf) in the bad tenant's rows.
  RowMatrix<float> huge = RowMatrix<float>::Constant(out, 8, 3e38f);
  for (Index i = 0; i < out; ++i) huge(i, i % 8) = -3e38f;
  for (Index e = 0; e < 4; ++e) {
    bad->set_expert_B(e, huge);
    bad->set_expert_A(e, RowMatrix<float>::Constant(8, in, 1e30f));
  }
  auto lora_nan = random_lora<float>(in, out, 4, 33);
  // A mapped file may hold anything: wrap a LoRA's views with a NaN, values unchecked.
  RowMatrix<float> a_nan = lora_nan->A();
  a_nan(1, 3) = std::nanf("");
  molora::ColMatrix<float> b_copy = lora_nan->B();
  molora::SetAdapterViews<float> v;
  v.in_features = in;
  v.out_features = out;
  v.rank = 4;
  v.scaling = 1.0;
  v.A = {a_nan.data()};
  v.Bt = {b_copy.data()};
  CHECK_THROWS_WITH_AS(molora::SetAdapter<float>::wrap(v, nullptr),
                       doctest::Contains("adapter expert 0 lora_A: expected finite values, got nan"),
                       molora::numeric_error);
  using Ptr = molora::SetAdapter<float>::Ptr;
  const std::vector<Ptr> only_good = {molora::SetAdapter<float>::share(std::shared_ptr<const molora::MoLoRAAdapter<float>>(good))};
  std::vector<Ptr> all = only_good;
  all.push_back(molora::SetAdapter<float>::share(std::shared_ptr<const molora::MoLoRAAdapter<float>>(bad)));
  all.push_back(molora::SetAdapter<float>::wrap(v, nullptr, 1.0, /*check_values=*/false));
  molora::AdapterSet<float> clean(in, out, only_good), mixed_set(in, out, all);
  const auto x = ref::random_x<float>(T, in, 34);
  std::vector<std::int32_t> ids(static_cast<std::size_t>(T)), ids_good(static_cast<std::size_t>(T));
  for (Index t = 0; t < T; ++t) {
    ids[std::size_t(t)] = static_cast<std::int32_t>(t % 4) - 1;  // -1, 0, 1, 2
    ids_good[std::size_t(t)] = ids[std::size_t(t)] == 0 ? 0 : -1;
  }
  RowMatrix<float> y = RowMatrix<float>::Zero(T, out), y_clean = y;
  molora::AdapterSetWorkspace<float> ws;
  mixed_set.add_delta(x, ids, y, ws);
  clean.add_delta(x, ids_good, y_clean, ws);
  Index bad_rows = 0;
  for (Index t = 0; t < T; ++t) {
    const std::int32_t a = ids[std::size_t(t)];
    if (a <= 0) {
      CHECK((y.row(t).array() == y_clean.row(t).array()).all());
      CHECK(y.row(t).allFinite());
    } else {
      bad_rows += y.row(t).allFinite() ? 0 : 1;
    }
  }
  CHECK(bad_rows == T / 2);  // every row of the two bad tenants is non-finite, no other row
}

TEST_CASE("adapter_set: errors name the field, the expected and the actual value; y unchanged") {
  auto f = mixed<float>(12, 10, 41);
  const Index T = 6;
  const auto x = ref::random_x<float>(T, 12, 42);
  RowMatrix<float> y = RowMatrix<float>::Ones(T, 10);
  const RowMatrix<float> y_before = y;
  molora::AdapterSetWorkspace<float> ws;
  CHECK_THROWS_WITH_AS(f.set->add_delta(x, std::vector<std::int32_t>{0, 1, 5, 2, 0, 0}, y, ws),
                       "molora numeric error: adapter id of token 2: expected -1 or an adapter id in [0, 5), got 5",
                       molora::numeric_error);
  CHECK_THROWS_WITH_AS(f.set->add_delta(x, std::vector<std::int32_t>{0, -2, 1, 2, 0, 0}, y, ws),
                       doctest::Contains("adapter id of token 1: expected -1 or an adapter id in [0, 5), got -2"),
                       molora::numeric_error);
  CHECK_THROWS_WITH_AS(f.set->add_delta(x, std::vector<std::int32_t>{0, 1}, y, ws),
                       "molora shape error: adapter ids (one per token): expected 6, got 2", molora::shape_error);
  RowMatrix<float> x_bad = ref::random_x<float>(T, 11, 43);
  CHECK_THROWS_WITH_AS(f.set->add_delta(x_bad, std::vector<std::int32_t>(6, 0), y, ws),
                       "molora shape error: x columns (in_features): expected 12, got 11", molora::shape_error);
  RowMatrix<float> y_bad(T, 9);
  CHECK_THROWS_WITH_AS(f.set->add_delta(x, std::vector<std::int32_t>(6, 0), y_bad, ws),
                       "molora shape error: y shape: expected [6, 10], got [6, 9]", molora::shape_error);
  CHECK_THROWS_WITH_AS(f.set->add_delta_segments(x, {{2, 0}, {3, 1}}, y, ws),
                       "molora shape error: segments' total num_tokens: expected 6, got 5", molora::shape_error);
  RowMatrix<float> x_inf = x;
  x_inf(4, 7) = INFINITY;
  CHECK_THROWS_WITH_AS(f.set->add_delta(x_inf, std::vector<std::int32_t>(6, 0), y, ws),
                       "molora numeric error: x of token 4: expected finite values, got inf at column 7",
                       molora::numeric_error);
  CHECK(y == y_before);
  // Adapters of another shape are refused when the set is built.
  auto other = random_molora<float>(11, 10, 2, 1, 3, true, true, 44);
  std::vector<molora::SetAdapter<float>::Ptr> ptrs = f.set->adapters();
  ptrs.push_back(molora::SetAdapter<float>::share(std::shared_ptr<const molora::MoLoRAAdapter<float>>(other)));
  CHECK_THROWS_WITH_AS(molora::AdapterSet<float>(12, 10, ptrs),
                       "molora shape error: adapter 5 in_features: expected 12, got 11", molora::shape_error);
  CHECK_THROWS_WITH_AS(f.set->adapter(7), "molora shape error: adapter index: expected [0, 5), got 7",
                       molora::shape_error);
  molora::SetAdapterViews<float> v;
  v.in_features = 12;
  v.out_features = 10;
  v.num_experts = 3;
  v.rank = 2;
  v.scaling = 1;
  CHECK_THROWS_WITH_AS(molora::SetAdapter<float>::wrap(v, nullptr),
                       "molora config error: adapter router_weight: expected a router for num_experts > 1, got null",
                       molora::config_error);
  v.num_experts = 1;
  v.top_k = 2;
  CHECK_THROWS_WITH_AS(molora::SetAdapter<float>::wrap(v, nullptr),
                       "molora config error: adapter top_k: expected a value in [1, 1], got 2", molora::config_error);
}

TEST_CASE("adapter_set: caller routing gives the routed forward's result; bad routings are refused") {
  auto f = mixed<double>(21, 15, 71);
  const Index T = 30;
  const auto x = ref::random_x<double>(T, 21, 72);
  const auto ids = random_ids(T, 5, 73);
  RowMatrix<double> y1 = RowMatrix<double>::Zero(T, 15), y2 = y1;
  molora::AdapterSetWorkspace<double> ws;
  const molora::SetRouting<double> routing = f.set->add_delta(x, ids, y1, ws);  // a copy
  f.set->add_delta_routed(x, routing, y2, ws);
  CHECK(y1 == y2);
  auto bad = routing;
  Index t_adapted = 0;
  while (bad.adapter[std::size_t(t_adapted)] < 0 || bad.adapter[std::size_t(t_adapted)] == 3) ++t_adapted;
  const auto E = f.set->adapter(bad.adapter[std::size_t(t_adapted)])->num_experts();
  bad.experts[std::size_t(bad.offsets[std::size_t(t_adapted)])] = static_cast<std::int32_t>(E);
  const std::string want = molora::detail::cat("molora numeric error: routing.experts of token ", t_adapted,
                                               " slot 0: expected an expert id in [0, ", E, "), got ", E);
  CHECK_THROWS_WITH_AS(f.set->add_delta_routed(x, bad, y2, ws), want.c_str(), molora::numeric_error);
  bad = routing;
  bad.adapter.pop_back();
  CHECK_THROWS_WITH_AS(f.set->add_delta_routed(x, bad, y2, ws),
                       "molora shape error: routing.adapter (one per token): expected 30, got 29", molora::shape_error);
  CHECK(y1 == y2);
}

}  // namespace test_adapter_set
