// MoLoRALinear and MoLoRAAdapter against the double reference: random shapes, every gating
// mode, Map inputs, T = 0 and 1, x aliasing y, wrapped base weights, caller routing, a
// hand-computed case with literal numbers, and workspace reuse.
#include <doctest/doctest.h>

#include <cmath>

#include "reference.hpp"

namespace test_layers {

using molora::Index;
using molora::MoLoRAConfig;
using molora::MoLoRALinear;
using molora::RowMatrix;
using molora::Selection;

namespace {

MoLoRAConfig cfg(Index in, Index out, Index E, Index k, Index r, bool router_bias = true, bool normalize = true) {
  MoLoRAConfig c;
  c.in_features = in;
  c.out_features = out;
  c.num_experts = E;
  c.top_k = k;
  c.rank = r;
  c.lora_alpha = 2.0 * double(r) + 1;
  c.router_bias = router_bias;
  c.normalize_top_k = normalize;
  return c;
}

template <class Scalar>
double tolerance() {
  return std::is_same_v<Scalar, float> ? 2e-5 : 1e-12;
}

// Reference forward given the routing the layer reports (ids and weights from the reference
// gating must agree with it too).
template <class Scalar>
void check_forward(const MoLoRALinear<Scalar>& l, const RowMatrix<Scalar>& x) {
  const ref::Layer L = ref::from_layer(l);
  std::vector<std::vector<int>> ids;
  ref::Mat w;
  const ref::Mat want = ref::forward(L, ref::from_eigen(x), &ids, &w);
  typename MoLoRALinear<Scalar>::Workspace ws;
  RowMatrix<Scalar> y(x.rows(), l.out_features());
  const auto& routing = l.forward(x, y, ws);
  REQUIRE(routing.num_tokens() == x.rows());
  for (Index t = 0; t < x.rows(); ++t)
    for (Index s = 0; s < L.k; ++s) {
      CHECK(routing.ids(t, s) == ids[size_t(t)][size_t(s)]);
      CHECK(double(routing.weights(t, s)) == doctest::Approx(w[size_t(t)][size_t(s)]).epsilon(tolerance<Scalar>()));
    }
  CHECK(ref::rel_err(y, want) < tolerance<Scalar>());
}

}  // namespace

TEST_CASE_TEMPLATE("MoLoRALinear matches the reference on random shapes and gating modes", Scalar, float, double) {
  // {in, out, E, k, r}
  const Index shapes[][5] = {{1, 1, 1, 1, 1}, {1, 5, 3, 2, 1},   {7, 1, 2, 1, 3},    {16, 16, 8, 2, 16},
                             {17, 33, 8, 8, 4}, {31, 18, 5, 3, 17}, {40, 24, 64, 2, 2}, {3, 65, 4, 4, 1}};
  std::uint64_t seed = 100;
  for (const auto& s : shapes)
    for (bool bias : {true, false})
      for (bool normalize : {true, false})
        for (Index T : {0, 1, 2, 37}) {
          CAPTURE(s[0]);
          CAPTURE(s[1]);
          CAPTURE(s[2]);
          CAPTURE(s[3]);
          CAPTURE(s[4]);
          CAPTURE(bias);
          CAPTURE(normalize);
          CAPTURE(T);
          const auto l = ref::random_layer<Scalar>(cfg(s[0], s[1], s[2], s[3], s[4], bias, normalize), seed, bias);
          check_forward(l, ref::random_x<Scalar>(T, s[0], seed + 1));
          seed += 2;
        }
}

TEST_CASE_TEMPLATE("experts above 1 MiB take the large fused tile and still match the reference", Scalar, float,
                   double) {
  // r * (in + out) * sizeof > 1 MiB: fused_tile is kMaxTile for these, 8 below.
  const Index r = 64, in = 2053, out = 2051;
  REQUIRE(molora::kernels::fused_tile<Scalar>(r, in, out) == molora::kernels::kMaxTile);
  REQUIRE(molora::kernels::fused_tile<float>(16, 4096, 4096) == molora::kernels::kTile);  // 512 KiB
  auto l = ref::random_layer<Scalar>(cfg(in, out, 4, 2, r), 900, true);
  l.set_strategy(molora::Strategy::fused);
  for (Index T : {1, 33, 150}) {
    CAPTURE(T);
    check_forward(l, ref::random_x<Scalar>(T, in, 901 + std::uint64_t(T)));
  }
}

TEST_CASE("a hand-computed tiny layer gives the literal numbers") {
  // in = out = 2, E = 2, k = 1, r = 1, alpha = 1 (s = 1). W0 = I, b0 = [0.5, -0.5],
  // router W_r = I, no bias; A_0 = [1 1], B_0 = [1 0]^T; A_1 = [1 -1], B_1 = [0 2]^T.
  MoLoRAConfig c = cfg(2, 2, 2, 1, 1, false, true);
  c.lora_alpha = 1;
  MoLoRALinear<double> l(c);
  l.set_base_weight(Eigen::Matrix2d::Identity());
  l.set_base_bias(Eigen::RowVector2d(0.5, -0.5));
  l.adapter().router().set_weight(Eigen::Matrix2d::Identity());
  l.adapter().set_expert_A(0, Eigen::RowVector2d(1, 1));
  l.adapter().set_expert_B(0, Eigen::Vector2d(1, 0));
  l.adapter().set_expert_A(1, Eigen::RowVector2d(1, -1));
  l.adapter().set_expert_B(1, Eigen::Vector2d(0, 2));
  RowMatrix<double> x(2, 2);
  x << 3, 1,   // logits [3, 1] -> expert 0, h = 4, delta = [4, 0]
       1, 2;   // logits [1, 2] -> expert 1, h = -1, delta = [0, -2]
  const RowMatrix<double> y = l.forward(x);
  CHECK(y(0, 0) == doctest::Approx(7.5));
  CHECK(y(0, 1) == doctest::Approx(0.5));
  CHECK(y(1, 0) == doctest::Approx(1.5));
  CHECK(y(1, 1) == doctest::Approx(-0.5));
  // Masked (Switch) gating keeps p = softmax([3, 1])_0 = 1 / (1 + e^-2) = 0.8807970779778823.
  c.normalize_top_k = false;
  MoLoRALinear<double> m(c);
  m.set_base_weight(l.base_weight());
  m.set_base_bias(l.base_bias());
  m.adapter().router().set_weight(Eigen::Matrix2d::Identity());
  for (Index e = 0; e < 2; ++e) {
    m.adapter().set_expert_A(e, l.adapter().expert_A(e));
    m.adapter().set_expert_B(e, l.adapter().expert_B(e));
  }
  const RowMatrix<double> ym = m.forward(x);
  CHECK(ym(0, 0) == doctest::Approx(3.5 + 4 * 0.8807970779778823).epsilon(1e-14));
  CHECK(ym(0, 0) == doctest::Approx(7.023188311911529).epsilon(1e-14));
  CHECK(ym(1, 1) == doctest::Approx(1.5 - 2 * 0.7310585786300049).epsilon(1e-14));
}

TEST_CASE_TEMPLATE("inputs as Eigen::Map over row-major buffers, with strides, and column-major x", Scalar, float,
                   double) {
  const auto l = ref::random_layer<Scalar>(cfg(19, 11, 6, 2, 3), 5);
  const RowMatrix<Scalar> x = ref::random_x<Scalar>(9, 19, 6);
  const RowMatrix<Scalar> want = l.forward(x);
  // x inside a wider host buffer (outer stride 25), y likewise (outer stride 14).
  std::vector<Scalar> xbuf(9 * 25, Scalar(-7)), ybuf(9 * 14, Scalar(-9));
  Eigen::Map<RowMatrix<Scalar>, 0, Eigen::OuterStride<>> xm(xbuf.data(), 9, 19, Eigen::OuterStride<>(25));
  xm = x;
  Eigen::Map<RowMatrix<Scalar>, 0, Eigen::OuterStride<>> ym(ybuf.data(), 9, 11, Eigen::OuterStride<>(14));
  typename MoLoRALinear<Scalar>::Workspace ws;
  l.forward(xm, ym, ws);
  CHECK(RowMatrix<Scalar>(ym) == want);
  CHECK(ybuf[11] == Scalar(-9));  // padding untouched
  // column-major x (copied into a row-major temporary by the Ref)
  const Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic> xc = x;
  RowMatrix<Scalar> y2(9, 11);
  l.forward(xc, y2, ws);
  CHECK(y2 == want);
  // an expression
  RowMatrix<Scalar> y3(9, 11);
  l.forward(x * Scalar(1), y3, ws);
  CHECK(y3 == want);
}

TEST_CASE_TEMPLATE("x and y sharing memory gives the same result as separate buffers", Scalar, float, double) {
  const auto l = ref::random_layer<Scalar>(cfg(12, 12, 4, 2, 5), 8);
  const RowMatrix<Scalar> x = ref::random_x<Scalar>(7, 12, 9);
  const RowMatrix<Scalar> want = l.forward(x);
  RowMatrix<Scalar> inplace = x;
  typename MoLoRALinear<Scalar>::Workspace ws;
  l.forward(inplace, inplace, ws);
  CHECK(inplace == want);
  // partial overlap: y is x shifted by one row
  RowMatrix<Scalar> buf(8, 12);
  buf.topRows(7) = x;
  l.forward(buf.topRows(7), buf.bottomRows(7), ws);
  CHECK(RowMatrix<Scalar>(buf.bottomRows(7)) == want);
  // adapter alone, in place: y = x + delta(x)
  RowMatrix<Scalar> base_plus = x, sep = x;
  l.adapter().add_delta(x, sep, ws);
  l.adapter().add_delta(base_plus, base_plus, ws);
  CHECK(base_plus == sep);
  // base alone in place
  RowMatrix<Scalar> b1(7, 12), b2 = x;
  l.forward_base(x, b1);
  l.forward_base(b2, b2);
  CHECK(b1 == b2);
}

TEST_CASE("a wrapped base weight is used without a copy and follows the host's buffer") {
  const auto owned = ref::random_layer<float>(cfg(10, 6, 3, 1, 2), 12);
  std::vector<float> w(60), b(6);
  Eigen::Map<RowMatrix<float>>(w.data(), 6, 10) = owned.base_weight();
  Eigen::Map<Eigen::VectorXf>(b.data(), 6) = owned.base_bias().transpose();
  MoLoRALinear<float> l = owned;
  l.wrap_base_weight(Eigen::Map<const RowMatrix<float>>(w.data(), 6, 10));
  l.wrap_base_bias(Eigen::Map<const Eigen::VectorXf>(b.data(), 6));
  CHECK(l.wraps_base());
  CHECK(l.base_weight().data() == w.data());
  CHECK(l.base_bias().data() == b.data());
  const RowMatrix<float> x = ref::random_x<float>(4, 10, 13);
  CHECK(l.forward(x) == owned.forward(x));
  w[0] += 1.0f;  // the host updates its weight: the layer sees it
  RowMatrix<float> want = owned.forward(x);
  want.col(0) += x.col(0);
  CHECK(ref::rel_err(l.forward(x), ref::from_eigen(want)) < 1e-6);
  // copies of the layer keep pointing at the host buffer; set_base_weight takes ownership
  MoLoRALinear<float> copy = l;
  CHECK(copy.base_weight().data() == w.data());
  copy.set_base_weight(owned.base_weight());
  CHECK(!copy.wraps_base());
  CHECK(copy.base_weight().data() != w.data());
  CHECK_THROWS_WITH_AS(l.wrap_base_weight(Eigen::Map<const RowMatrix<float>>(w.data(), 10, 6)),
                       "molora shape error: wrapped base weight: expected [6, 10], got [10, 6]", molora::shape_error);
  CHECK_THROWS_WITH_AS(l.wrap_base_bias(Eigen::Map<const Eigen::VectorXf>(b.data(), 5)),
                       "molora shape error: wrapped base bias: expected [6], got [5]", molora::shape_error);
}

TEST_CASE_TEMPLATE("MoLoRAAdapter adds only its delta to an output the caller holds", Scalar, float, double) {
  const auto l = ref::random_layer<Scalar>(cfg(21, 13, 5, 2, 4, true), 20);
  const RowMatrix<Scalar> x = ref::random_x<Scalar>(11, 21, 21);
  RowMatrix<Scalar> base(11, 13);
  l.forward_base(x, base);
  RowMatrix<Scalar> y = base;
  typename MoLoRALinear<Scalar>::Workspace ws;
  const auto& r = l.adapter().add_delta(x, y, ws);
  CHECK(r.num_tokens() == 11);
  CHECK(ref::rel_err(y, ref::from_eigen(l.forward(x))) < tolerance<Scalar>());
  // route_tokens gives the same routing without writing anything
  typename MoLoRALinear<Scalar>::Workspace ws2;
  const auto& r2 = l.adapter().route_tokens(x, ws2);
  CHECK(r2.ids == ws.routing.ids);
  CHECK(r2.weights == ws.routing.weights);
}

TEST_CASE_TEMPLATE("caller-supplied routing: each token names its experts and weights", Scalar, float, double) {
  const auto l = ref::random_layer<Scalar>(cfg(9, 7, 4, 2, 3), 30);
  const RowMatrix<Scalar> x = ref::random_x<Scalar>(5, 9, 31);
  const ref::Layer L = ref::from_layer(l);
  for (Index k : {1, 3, 4}) {
    molora::Routing<Scalar> routing;
    routing.resize(5, k);
    ref::Mat want;
    for (Index t = 0; t < 5; ++t) {
      std::vector<int> sel;
      std::vector<double> w;
      for (Index s = 0; s < k; ++s) {
        sel.push_back(int((t + 3 * s) % 4));
        w.push_back(0.25 * double(s + 1) - 0.1 * double(t));
        routing.ids(t, s) = sel.back();
        routing.weights(t, s) = Scalar(w.back());
      }
      auto y = ref::base(L, ref::from_eigen(x)[size_t(t)]);
      const auto d = ref::delta(L, ref::from_eigen(x)[size_t(t)], sel, w);
      for (size_t o = 0; o < y.size(); ++o) y[o] += d[o];
      want.push_back(y);
    }
    // task-annotated rows with repeated experts in different slots would be rejected:
    if (k == 1) routing.ids(0, 0) = 3;
    if (k == 1) want[0] = [&] {
      auto y = ref::base(L, ref::from_eigen(x)[0]);
      const auto d = ref::delta(L, ref::from_eigen(x)[0], {3}, {double(routing.weights(0, 0))});
      for (size_t o = 0; o < y.size(); ++o) y[o] += d[o];
      return y;
    }();
    typename MoLoRALinear<Scalar>::Workspace ws;
    RowMatrix<Scalar> y(5, 7);
    l.forward_routed(x, routing, y, ws);
    CHECK(ref::rel_err(y, want) < tolerance<Scalar>());
  }
}

TEST_CASE("sampling selection is reproducible from the workspace seed and matches its own routing") {
  MoLoRAConfig c = cfg(14, 9, 6, 2, 3);
  c.selection = Selection::sampling;
  const auto l = ref::random_layer<double>(c, 40);
  const RowMatrix<double> x = ref::random_x<double>(50, 14, 41);
  MoLoRALinear<double>::Workspace w1, w2, w3;
  w1.seed(5);
  w2.seed(5);
  w3.seed(6);
  RowMatrix<double> y1(50, 9), y2(50, 9), y3(50, 9);
  l.forward(x, y1, w1);
  l.forward(x, y2, w2);
  l.forward(x, y3, w3);
  CHECK(y1 == y2);
  CHECK(w1.routing.ids == w2.routing.ids);
  CHECK(w1.routing.ids != w3.routing.ids);
  // Replaying the sampled routing through the caller-routing path gives the same output.
  RowMatrix<double> y4(50, 9);
  l.forward_routed(x, w1.routing, y4, w3);
  CHECK(ref::rel_err(y4, ref::from_eigen(y1)) < 1e-13);
}

TEST_CASE("a reused workspace gives identical results across batch sizes") {
  const auto l = ref::random_layer<float>(cfg(33, 17, 8, 2, 16), 50);
  MoLoRALinear<float>::Workspace ws;
  for (Index T : {64, 1, 17, 0, 64, 3}) {
    const RowMatrix<float> x = ref::random_x<float>(T, 33, std::uint64_t(T) + 51);
    RowMatrix<float> y(T, 17);
    l.forward(x, y, ws);
    CHECK(y == l.forward(x));
  }
}

TEST_CASE("init_default leaves the adapted layer equal to its base (B = 0), MING-MOE defaults") {
  MoLoRAConfig c;
  c.in_features = 24;
  c.out_features = 20;
  CHECK(c.num_experts == 8);
  CHECK(c.top_k == 2);
  CHECK(c.rank == 16);
  CHECK(c.lora_alpha == 32);
  CHECK(c.router_bias);
  CHECK(c.normalize_top_k);
  MoLoRALinear<float> l(c);
  l.set_base_weight(ref::random_x<float>(20, 24, 60));
  molora::Generator g(61);
  l.adapter().init_default(g);
  CHECK(!l.adapter().router().weight().isZero(0));
  CHECK(!l.adapter().stacked_A().isZero(0));
  CHECK(l.adapter().stacked_B().isZero(0));
  const RowMatrix<float> x = ref::random_x<float>(6, 24, 62);
  RowMatrix<float> base(6, 20);
  l.forward_base(x, base);
  CHECK(l.forward(x) == base);
}

}  // namespace test_layers
