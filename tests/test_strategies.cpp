// Every expert strategy (eigen, dense_shrink, fused, automatic) against the double
// loop-by-loop reference of tests/reference.hpp: ranks 1, 3, 16, 17, 64, 200; in/out that are
// not multiples of the SIMD width (including 1); T from 0 to 300; every gating mode (top-k
// renormalised, masked, k == E, sampling with a fixed seed, caller routing). Run once per
// ISA, forced at run time by tests/cmake/isa.cmake.
#include <doctest/doctest.h>

#include <array>
#include <cstdint>
#include <vector>

#include "reference.hpp"

using molora::Index;
using molora::MoLoRAConfig;
using molora::Strategy;

namespace {

constexpr std::array<Strategy, 4> kStrategies = {Strategy::eigen, Strategy::dense_shrink, Strategy::fused,
                                                 Strategy::automatic};

template <class Scalar>
double tolerance() {
  return std::is_same_v<Scalar, float> ? 1e-4 : 1e-10;
}

// The double delta for the routing ids the layer chose; gate weights recomputed in double
// from double logits (so the gating's values are checked too).
template <class Scalar>
ref::Mat reference_delta(const ref::Layer& L, const molora::RowMatrix<Scalar>& x, const molora::IdMatrix& ids,
                         const molora::RowMatrix<Scalar>* caller_weights) {
  ref::Mat out;
  for (Index t = 0; t < x.rows(); ++t) {
    std::vector<double> xt(static_cast<std::size_t>(x.cols()));
    for (Index i = 0; i < x.cols(); ++i) xt[static_cast<std::size_t>(i)] = double(x(t, i));
    std::vector<int> sel;
    for (Index s = 0; s < ids.cols(); ++s) sel.push_back(ids(t, s));
    std::vector<double> w;
    if (caller_weights)
      for (Index s = 0; s < ids.cols(); ++s) w.push_back(double((*caller_weights)(t, s)));
    else
      w = ref::gate_weights(ref::logits(L, xt), sel, L.normalize);
    out.push_back(ref::delta(L, xt, sel, w));
  }
  return out;
}

struct Case {
  Index in, out, E, k, r, T;
  bool normalize;
  molora::Selection selection;
};

template <class Scalar>
void check_case(const Case& c, std::uint64_t seed) {
  MoLoRAConfig cfg;
  cfg.in_features = c.in;
  cfg.out_features = c.out;
  cfg.num_experts = c.E;
  cfg.top_k = c.k;
  cfg.rank = c.r;
  cfg.lora_alpha = 2.0 * double(c.r);
  cfg.normalize_top_k = c.normalize;
  cfg.selection = c.selection;
  auto layer = ref::random_layer<Scalar>(cfg, seed);
  const ref::Layer L = ref::from_layer(layer);
  const auto x = ref::random_x<Scalar>(c.T, c.in, seed + 1);
  molora::RowMatrix<Scalar> y0 = ref::random_x<Scalar>(c.T, c.out, seed + 2);
  auto& adapter = layer.adapter();

  molora::IdMatrix eigen_ids;
  molora::RowMatrix<Scalar> eigen_y;
  for (const Strategy st : kStrategies) {
    adapter.set_strategy(st);
    CHECK(adapter.strategy() == st);
    typename molora::MoLoRAAdapter<Scalar>::Workspace ws;
    ws.seed(seed + 3);
    molora::RowMatrix<Scalar> y = y0;
    const auto& routing = adapter.add_delta(x, y, ws);
    INFO("strategy=", molora::to_string(st), " in=", c.in, " out=", c.out, " E=", c.E, " k=", c.k, " r=", c.r,
         " T=", c.T, " normalize=", c.normalize, " selection=", molora::to_string(c.selection));
    REQUIRE(routing.num_tokens() == c.T);
    const ref::Mat want = reference_delta<Scalar>(L, x, routing.ids, nullptr);
    molora::RowMatrix<Scalar> got = y - y0;
    if (c.T > 0) CHECK(ref::rel_err(got, want) <= tolerance<Scalar>());
    // Sampling: every strategy draws the same experts as strategy eigen from the same seed.
    if (st == Strategy::eigen) {
      eigen_ids = routing.ids;
      eigen_y = y;
    } else {
      CHECK(routing.ids == eigen_ids);
      if (c.T > 0) CHECK(ref::rel_err(y, ref::from_eigen(eigen_y)) <= 10 * tolerance<Scalar>());
    }
    // Second, warm call with the same workspace gives the same bits.
    if (c.selection == molora::Selection::top_k) {
      molora::RowMatrix<Scalar> y2 = y0;
      adapter.add_delta(x, y2, ws);
      CHECK(y2 == y);
    }
  }
}

template <class Scalar>
void check_caller_routing(Index in, Index out, Index E, Index r, Index T, Index k, std::uint64_t seed) {
  MoLoRAConfig cfg;
  cfg.in_features = in;
  cfg.out_features = out;
  cfg.num_experts = E;
  cfg.top_k = 1;
  cfg.rank = r;
  auto layer = ref::random_layer<Scalar>(cfg, seed);
  const ref::Layer L = ref::from_layer(layer);
  const auto x = ref::random_x<Scalar>(T, in, seed + 1);
  const molora::RowMatrix<Scalar> y0 = ref::random_x<Scalar>(T, out, seed + 2);
  // Each token: k distinct experts (a rotation), arbitrary weights of either sign.
  molora::Routing<Scalar> routing;
  routing.resize(T, k);
  std::mt19937_64 g(seed + 4);
  for (Index t = 0; t < T; ++t) {
    const Index start = static_cast<Index>(g() % static_cast<std::uint64_t>(E));
    for (Index s = 0; s < k; ++s) {
      routing.ids(t, s) = static_cast<std::int32_t>((start + s) % E);
      routing.weights(t, s) = Scalar(double(g() % 2001) / 1000.0 - 1.0);
    }
  }
  const molora::RowMatrix<Scalar> routing_weights = routing.weights;
  const ref::Mat want = reference_delta<Scalar>(L, x, routing.ids, &routing_weights);
  for (const Strategy st : kStrategies) {
    layer.set_strategy(st);
    typename molora::MoLoRAAdapter<Scalar>::Workspace ws;
    molora::RowMatrix<Scalar> y = y0;
    layer.adapter().add_delta_routed(x, routing, y, ws);
    INFO("caller routing, strategy=", molora::to_string(st), " in=", in, " out=", out, " E=", E, " k=", k,
         " r=", r, " T=", T);
    molora::RowMatrix<Scalar> got = y - y0;
    if (T > 0) CHECK(ref::rel_err(got, want) <= tolerance<Scalar>());
  }
}

template <class Scalar>
void suite() {
  std::uint64_t seed = 100;
  // Shapes: every rank, in/out including 1 and odd sizes around SIMD widths.
  const Index ranks[] = {1, 3, 16, 17, 64, 200};
  const Index ins[] = {1, 5, 33, 67};
  const Index outs[] = {1, 7, 31, 130};
  const Index Ts[] = {0, 1, 2, 5, 16, 37, 300};
  Index i = 0;
  for (Index r : ranks)
    for (Index T : Ts) {
      const Index in = ins[i % 4], out = outs[(i / 4 + i) % 4];
      ++i;
      if (r >= 64 && T == 300 && in * out > 1000) continue;  // keep the double reference quick
      check_case<Scalar>({in, out, 8, 2, r, T, true, molora::Selection::top_k}, seed++);
    }
  // Every gating mode at a few shapes.
  for (Index T : {1, 13, 64, 300}) {
    check_case<Scalar>({45, 37, 8, 2, 16, T, false, molora::Selection::top_k}, seed++);       // masked
    check_case<Scalar>({45, 37, 4, 4, 3, T, true, molora::Selection::top_k}, seed++);         // k == E
    check_case<Scalar>({45, 37, 4, 4, 17, T, false, molora::Selection::top_k}, seed++);       // k == E, masked
    check_case<Scalar>({45, 37, 8, 2, 16, T, true, molora::Selection::sampling}, seed++);     // sampling
    check_case<Scalar>({45, 37, 16, 3, 17, T, false, molora::Selection::sampling}, seed++);   // sampling, masked
    check_case<Scalar>({1, 1, 8, 1, 1, T, true, molora::Selection::top_k}, seed++);           // all sizes 1
    check_case<Scalar>({130, 129, 64, 2, 4, T, true, molora::Selection::top_k}, seed++);      // many experts
  }
  for (Index T : {0, 1, 7, 300}) {
    check_caller_routing<Scalar>(33, 17, 8, 16, T, 3, seed++);
    check_caller_routing<Scalar>(1, 65, 4, 200, T, 1, seed++);
    check_caller_routing<Scalar>(70, 3, 6, 17, T, 6, seed++);
  }
}

}  // namespace

TEST_CASE_TEMPLATE("strategies: eigen, dense_shrink, fused and automatic match the double reference", Scalar, float,
                   double) {
  suite<Scalar>();
}

TEST_CASE("strategies: MoLoRALinear forward with every strategy matches the double reference") {
  MoLoRAConfig cfg;
  cfg.in_features = 67;
  cfg.out_features = 33;
  cfg.rank = 17;
  auto layer = ref::random_layer<float>(cfg, 7);
  const ref::Layer L = ref::from_layer(layer);
  const auto x = ref::random_x<float>(41, cfg.in_features, 8);
  const ref::Mat want = ref::forward(L, ref::from_eigen(x));
  for (const Strategy st : kStrategies) {
    layer.set_strategy(st);
    CHECK(layer.strategy() == st);
    INFO("strategy=", molora::to_string(st));
    CHECK(ref::rel_err(layer.forward(x), want) <= 1e-4);
  }
}

TEST_CASE("strategies: automatic resolves to fused, or to dense_shrink for dense routing") {
  MoLoRAConfig cfg;
  cfg.in_features = 64;
  cfg.out_features = 64;
  molora::MoLoRAAdapter<float> a(cfg);
  CHECK(a.strategy() == Strategy::automatic);
  CHECK(a.resolved_strategy(1, 2) == Strategy::fused);
  CHECK(a.resolved_strategy(1024, 2) == Strategy::fused);
  CHECK(a.resolved_strategy(1024, 8) == Strategy::dense_shrink);
  CHECK(a.resolved_strategy(64, 8) == Strategy::dense_shrink);
  CHECK(a.resolved_strategy(63, 8) == Strategy::fused);
  a.set_strategy(Strategy::eigen);
  CHECK(a.resolved_strategy(1024, 8) == Strategy::eigen);
}
