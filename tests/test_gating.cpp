// Gating: softmax, top-k with ties, renormalised and masked weights, dense k == E, sampling,
// caller routing validation, and the router's logits.
#include <doctest/doctest.h>

#include <cmath>
#include <map>

#include "reference.hpp"

namespace test_gating {

using molora::GatingOptions;
using molora::Index;
using molora::RowMatrix;
using molora::Selection;

namespace {

GatingOptions opts(Index E, Index k, bool normalize, Selection s = Selection::top_k) {
  return GatingOptions{E, k, normalize, s};
}

template <class Scalar>
void check_against_reference(const RowMatrix<Scalar>& z, const GatingOptions& o, double tol) {
  const auto r = molora::route<Scalar>(z, o);
  REQUIRE(r.ids.rows() == z.rows());
  REQUIRE(r.ids.cols() == o.top_k);
  for (Index t = 0; t < z.rows(); ++t) {
    std::vector<double> zt;
    for (Index e = 0; e < z.cols(); ++e) zt.push_back(double(z(t, e)));
    const auto sel = ref::top_k(zt, o.top_k);
    const auto w = ref::gate_weights(zt, sel, o.normalize_top_k);
    for (Index s = 0; s < o.top_k; ++s) {
      CHECK(r.ids(t, s) == sel[size_t(s)]);
      CHECK(double(r.weights(t, s)) == doctest::Approx(w[size_t(s)]).epsilon(tol));
    }
  }
}

}  // namespace

TEST_CASE("softmax is stable for large logits and sums to one") {
  RowMatrix<float> z(2, 3);
  z << 1000.f, 1001.f, 999.f, -1000.f, -1000.f, -1000.f;
  RowMatrix<float> p(2, 3);
  molora::softmax_rows<float>(z, p);
  CHECK(p.allFinite());
  CHECK(p.row(0).sum() == doctest::Approx(1.0f));
  CHECK(p(0, 1) == doctest::Approx(std::exp(1.0) / (1 + std::exp(1.0) + std::exp(-1.0))));
  CHECK(p(1, 0) == doctest::Approx(1.0f / 3));
}

TEST_CASE_TEMPLATE("top-k gating matches the reference for every mode and shape", Scalar, float, double) {
  const double tol = std::is_same_v<Scalar, float> ? 1e-5 : 1e-12;
  const Index shapes[][2] = {{1, 1}, {2, 1}, {2, 2}, {8, 2}, {8, 8}, {17, 3}, {64, 2}, {5, 5}};
  std::uint64_t seed = 1;
  for (const auto& s : shapes)
    for (bool normalize : {true, false})
      for (Index T : {0, 1, 9}) {
        CAPTURE(s[0]);
        CAPTURE(s[1]);
        CAPTURE(normalize);
        const RowMatrix<Scalar> z = ref::random_x<Scalar>(T, s[0], seed++) * Scalar(4);
        check_against_reference(z, opts(s[0], s[1], normalize), tol);
      }
}

TEST_CASE("top-k ties go to the lower expert index; weights split evenly") {
  RowMatrix<double> z(3, 4);
  z << 1, 2, 2, 0,   // tie for first between 1 and 2
       3, 3, 3, 3,   // all tied
       0, 5, 1, 5;   // tie at the top between 1 and 3
  const auto r = molora::route<double>(z, opts(4, 2, true));
  CHECK(r.ids(0, 0) == 1);
  CHECK(r.ids(0, 1) == 2);
  CHECK(r.ids(1, 0) == 0);
  CHECK(r.ids(1, 1) == 1);
  CHECK(r.ids(2, 0) == 1);
  CHECK(r.ids(2, 1) == 3);
  CHECK(r.weights(1, 0) == doctest::Approx(0.5));
  const auto m = molora::route<double>(z, opts(4, 2, false));
  CHECK(m.weights(1, 0) == doctest::Approx(0.25));
}

TEST_CASE("k == E is the dense soft mixture: every expert, weights = softmax") {
  const RowMatrix<double> z = ref::random_x<double>(6, 5, 3);
  RowMatrix<double> p(6, 5);
  molora::softmax_rows<double>(z, p);
  for (bool normalize : {true, false}) {
    const auto r = molora::route<double>(z, opts(5, 5, normalize));
    for (Index t = 0; t < 6; ++t) {
      double sum = 0;
      for (Index s = 0; s < 5; ++s) {
        CHECK(r.weights(t, s) == doctest::Approx(p(t, r.ids(t, s))).epsilon(1e-12));
        sum += r.weights(t, s);
      }
      CHECK(sum == doctest::Approx(1.0));
    }
  }
}

TEST_CASE("renormalised weights stay exact when probabilities underflow") {
  RowMatrix<double> z(1, 3);
  z << 0, -2000, -2001;  // p of experts 1 and 2 underflow to 0 in double
  const auto r = molora::route<double>(z, GatingOptions{3, 2, true, Selection::top_k});
  CHECK(r.ids(0, 0) == 0);
  CHECK(r.ids(0, 1) == 1);
  CHECK(r.weights(0, 0) == doctest::Approx(1.0));
  RowMatrix<double> z2(1, 3);
  z2 << -5000, -2000, -2001;  // top-2 {1, 2}: weights softmax([0, -1]) exactly
  const auto r2 = molora::route<double>(z2, GatingOptions{3, 2, true, Selection::top_k});
  CHECK(r2.ids(0, 0) == 1);
  CHECK(r2.weights(0, 0) == doctest::Approx(1 / (1 + std::exp(-1.0))));
  CHECK(r2.weights(0, 1) == doctest::Approx(std::exp(-1.0) / (1 + std::exp(-1.0))));
}

TEST_CASE("sampling draws k distinct experts with the softmax's frequencies, reproducibly") {
  const Index E = 4, k = 2, T = 20000;
  RowMatrix<double> z(T, E);
  for (Index t = 0; t < T; ++t) z.row(t) << 1.0, 0.0, -1.0, 0.5;
  molora::Generator g1(7), g2(7), g3(8);
  const auto o = opts(E, k, true, Selection::sampling);
  const auto a = molora::route<double>(z, o, &g1);
  const auto b = molora::route<double>(z, o, &g2);
  const auto c = molora::route<double>(z, o, &g3);
  CHECK(a.ids == b.ids);
  CHECK(a.ids != c.ids);
  std::vector<double> p = ref::softmax({1.0, 0.0, -1.0, 0.5});
  std::vector<double> first(E, 0.0);
  for (Index t = 0; t < T; ++t) {
    CHECK(a.ids(t, 0) != a.ids(t, 1));
    first[size_t(a.ids(t, 0))] += 1.0 / double(T);
    // weights: softmax over the drawn experts' logits
    const double l0 = z(t, a.ids(t, 0)), l1 = z(t, a.ids(t, 1));
    if (t < 50) CHECK(a.weights(t, 0) == doctest::Approx(std::exp(l0) / (std::exp(l0) + std::exp(l1))));
  }
  // The first draw follows p: binomial sd <= 0.0036 at T = 20000; allow 5 sd.
  for (Index e = 0; e < E; ++e) CHECK(std::abs(first[size_t(e)] - p[size_t(e)]) < 0.018);
  // Masked sampling reports the plain probabilities.
  molora::Generator g4(7);
  const auto m = molora::route<double>(z.topRows(5), opts(E, k, false, Selection::sampling), &g4);
  for (Index t = 0; t < 5; ++t) CHECK(m.weights(t, 0) == doctest::Approx(p[size_t(m.ids(t, 0))]));
  CHECK_THROWS_WITH_AS(molora::route<double>(z.topRows(1), o, static_cast<molora::Generator*>(nullptr)),
                       "molora config error: selection: sampling needs a generator, got none", molora::config_error);
}

TEST_CASE("sampling with k == E returns every expert once; a zero-probability expert comes last") {
  RowMatrix<double> z(50, 3);
  for (Index t = 0; t < 50; ++t) z.row(t) << 0.0, -1e4, 0.5;
  molora::Generator g(3);
  const auto r = molora::route<double>(z, opts(3, 3, true, Selection::sampling), &g);
  for (Index t = 0; t < 50; ++t) {
    CHECK(r.ids(t, 2) == 1);
    CHECK(r.ids(t, 0) + r.ids(t, 1) == 2);
  }
}

TEST_CASE("non-finite logits are reported with the token index") {
  RowMatrix<float> z = RowMatrix<float>::Zero(4, 3);
  z(2, 1) = std::nanf("");
  CHECK_THROWS_WITH_AS(molora::route<float>(z, opts(3, 1, true)),
                       "molora numeric error: router logits of token 2: expected finite values, got nan for expert 1",
                       molora::numeric_error);
  z(2, 1) = -INFINITY;
  CHECK_THROWS_AS(molora::route<float>(z, opts(3, 1, true)), molora::numeric_error);
}

TEST_CASE("caller routing is validated: shape, id range, repeats, non-finite weights") {
  molora::Routing<float> r;
  r.resize(2, 2);
  r.ids << 0, 1, 2, 0;
  r.weights << 0.5f, 0.5f, 1.f, 0.f;
  CHECK_NOTHROW(molora::validate_routing(r, 2, 3));
  CHECK_THROWS_WITH_AS(molora::validate_routing(r, 3, 3), "molora shape error: routing.ids rows: expected 3, got 2",
                       molora::shape_error);
  r.ids(1, 0) = 3;
  CHECK_THROWS_WITH_AS(molora::validate_routing(r, 2, 3),
                       "molora numeric error: routing.ids of token 1 slot 0: expected an expert id in [0, 3), got 3",
                       molora::numeric_error);
  r.ids(1, 0) = -1;
  CHECK_THROWS_AS(molora::validate_routing(r, 2, 3), molora::numeric_error);
  r.ids(1, 0) = 0;
  CHECK_THROWS_WITH_AS(molora::validate_routing(r, 2, 3),
                       "molora numeric error: routing.ids of token 1: expected distinct experts, got expert 0 in slots 0 and 1",
                       molora::numeric_error);
  r.ids(1, 0) = 2;
  r.weights(0, 1) = INFINITY;
  CHECK_THROWS_WITH_AS(molora::validate_routing(r, 2, 3),
                       "molora numeric error: routing.weights of token 0 slot 1: expected a finite value, got inf",
                       molora::numeric_error);
  r.weights(0, 1) = 0.5f;
  r.weights.resize(2, 1);
  CHECK_THROWS_WITH_AS(molora::validate_routing(r, 2, 3),
                       "molora shape error: routing.weights: expected [2, 2], got [2, 1]", molora::shape_error);
  molora::Routing<float> wide;
  wide.resize(1, 4);
  CHECK_THROWS_WITH_AS(molora::validate_routing(wide, 1, 3),
                       "molora shape error: routing.ids columns (k): expected 1..3, got 4", molora::shape_error);
}

TEST_CASE_TEMPLATE("router logits match the reference, with and without bias, from a Map", Scalar, float, double) {
  const double tol = std::is_same_v<Scalar, float> ? 1e-5 : 1e-12;
  for (bool bias : {true, false}) {
    molora::Router<Scalar> router(13, 5, bias);
    molora::Generator g(9);
    router.init_uniform(g);
    CHECK(router.bias().isZero(0) == !bias);
    const double bound = 1 / std::sqrt(13.0);
    CHECK(router.weight().cwiseAbs().maxCoeff() <= bound);
    std::vector<Scalar> buf(7 * 13);
    for (size_t i = 0; i < buf.size(); ++i) buf[i] = Scalar(std::sin(double(i)));
    Eigen::Map<const RowMatrix<Scalar>> x(buf.data(), 7, 13);
    const RowMatrix<Scalar> z = router.logits(x);
    RowMatrix<Scalar> z2(7, 5);
    router.logits_into(x, z2);
    ref::Layer L;
    L.in = 13;
    L.E = 5;
    L.Wr = ref::from_eigen(router.weight());
    for (Index e = 0; e < 5; ++e) L.br.push_back(double(router.bias()(e)));
    ref::Mat want;
    for (Index t = 0; t < 7; ++t) {
      std::vector<double> xt(buf.begin() + t * 13, buf.begin() + (t + 1) * 13);
      want.push_back(ref::logits(L, xt));
    }
    CHECK(ref::rel_err(z, want) < tol);
    CHECK(ref::rel_err(z2, want) < tol);
  }
  molora::Router<double> nb(3, 2, false);
  CHECK_THROWS_WITH_AS(nb.set_bias(Eigen::RowVector2d(1, 2)),
                       "molora config error: router.bias: expected no bias (router_bias = false), got a bias tensor",
                       molora::config_error);
  molora::Router<double> wb(3, 2, true);
  CHECK_THROWS_WITH_AS(wb.set_weight(RowMatrix<double>::Ones(3, 3)),
                       "molora shape error: router.weight: expected [2, 3], got [3, 3]", molora::shape_error);
  CHECK_THROWS_WITH_AS(wb.set_bias(Eigen::RowVector3d(1, 2, 3)),
                       "molora shape error: router.bias: expected [2], got [1, 3]", molora::shape_error);
}

TEST_CASE("MixLoRA-style normal router init has the asked standard deviation") {
  molora::Router<double> r(200, 50, false);
  molora::Generator g(1);
  r.init_normal(g, 0.02);
  const double mean = r.weight().mean();
  const double sd = std::sqrt((r.weight().array() - mean).square().mean());
  CHECK(std::abs(mean) < 0.002);
  CHECK(sd == doctest::Approx(0.02).epsilon(0.05));
}

// ---- the gating's backward ---------------------------------------------------------------

namespace {

// Logits whose experts are at least 0.5 apart within a token (a random order of 0.5 * e plus
// noise below 0.1), so no finite-difference step changes the top-k selection.
RowMatrix<double> separated_logits(Index T, Index E, std::uint64_t seed) {
  std::mt19937_64 g(seed);
  std::uniform_real_distribution<double> u(0.0, 0.1);
  RowMatrix<double> z(T, E);
  std::vector<int> order(static_cast<size_t>(E));
  for (Index t = 0; t < T; ++t) {
    std::iota(order.begin(), order.end(), 0);
    std::shuffle(order.begin(), order.end(), g);
    for (Index e = 0; e < E; ++e) z(t, e) = 0.5 * order[size_t(e)] - 0.25 * double(E) + u(g);
  }
  return z;
}

// L = sum_{t, s} c(t, s) * w(t, s), with each token's experts held at ids: the weights by
// the plain double reference (ref::gate_weights).
double gate_loss(const RowMatrix<double>& z, const molora::IdMatrix& ids, const RowMatrix<double>& c,
                 bool normalize) {
  double L = 0;
  for (Index t = 0; t < z.rows(); ++t) {
    std::vector<double> zt(z.row(t).data(), z.row(t).data() + z.cols());
    std::vector<int> sel(ids.row(t).data(), ids.row(t).data() + ids.cols());
    const auto w = ref::gate_weights(zt, sel, normalize);
    for (Index s = 0; s < ids.cols(); ++s) L += c(t, s) * w[size_t(s)];
  }
  return L;
}

}  // namespace

TEST_CASE("route_backward matches finite differences for every gating mode and shape") {
  const Index shapes[][2] = {{1, 1}, {2, 1}, {2, 2}, {3, 2}, {5, 5}, {7, 3}, {8, 2}, {8, 8}, {17, 4}};
  std::uint64_t seed = 100;
  double worst = 0;
  for (const auto& sh : shapes)
    for (bool normalize : {true, false})
      for (Selection sel : {Selection::top_k, Selection::sampling})
        for (Index T : {1, 4, 9}) {
          const Index E = sh[0], k = sh[1];
          CAPTURE(E);
          CAPTURE(k);
          CAPTURE(normalize);
          CAPTURE(T);
          CAPTURE(static_cast<int>(sel));
          const GatingOptions o = opts(E, k, normalize, sel);
          const RowMatrix<double> z = separated_logits(T, E, seed++);
          molora::Generator gen(seed++);
          molora::Routing<double> r;
          RowMatrix<double> probs;
          molora::route_keep_probs<double>(z, o, r, &gen, probs);
          // The kept probabilities are the softmax the forward used.
          for (Index t = 0; t < T; ++t) {
            const auto p = ref::softmax(std::vector<double>(z.row(t).data(), z.row(t).data() + E));
            for (Index e = 0; e < E; ++e) CHECK(probs(t, e) == doctest::Approx(p[size_t(e)]).epsilon(1e-14));
          }
          const RowMatrix<double> c = ref::random_x<double>(T, k, seed++);  // dL/dg
          const RowMatrix<double> base = ref::random_x<double>(T, E, seed++);
          RowMatrix<double> dl = base;  // route_backward adds into it
          molora::route_backward<double>(o, r, probs, c, dl);
          dl -= base;
          const double h = 1e-6;
          for (Index t = 0; t < T; ++t)
            for (Index j = 0; j < E; ++j) {
              RowMatrix<double> zp = z, zm = z;
              zp(t, j) += h;
              zm(t, j) -= h;
              if (sel == Selection::top_k) {  // the library's own selection does not move
                REQUIRE(molora::route<double>(zp, o).ids == r.ids);
                REQUIRE(molora::route<double>(zm, o).ids == r.ids);
              }
              const double fd = (gate_loss(zp, r.ids, c, normalize) - gate_loss(zm, r.ids, c, normalize)) / (2 * h);
              const double err = std::abs(fd - dl(t, j)) / std::max(1.0, std::abs(fd));
              worst = std::max(worst, err);
              CHECK(err < 1e-7);
              bool selected = false;
              for (Index s = 0; s < k; ++s) selected = selected || r.ids(t, s) == j;
              if (molora::route_backward_selected_only(o) && !selected) CHECK(dl(t, j) == 0.0);
            }
        }
  MESSAGE("route_backward: worst finite-difference error ", worst);
}

TEST_CASE("route_backward in float agrees with double; it checks its arguments") {
  const GatingOptions o = opts(6, 2, false);
  const RowMatrix<double> z = separated_logits(5, 6, 7);
  molora::Routing<double> rd;
  RowMatrix<double> pd;
  molora::route_keep_probs<double>(z, o, rd, static_cast<molora::Generator*>(nullptr), pd);
  const RowMatrix<double> c = ref::random_x<double>(5, 2, 8);
  RowMatrix<double> dld = RowMatrix<double>::Zero(5, 6);
  molora::route_backward<double>(o, rd, pd, c, dld);
  molora::Routing<float> rf;
  RowMatrix<float> pf;
  const RowMatrix<float> zf = z.cast<float>(), cf = c.cast<float>();
  molora::route_keep_probs<float>(zf, o, rf, static_cast<molora::Generator*>(nullptr), pf);
  REQUIRE(rf.ids == rd.ids);
  RowMatrix<float> dlf = RowMatrix<float>::Zero(5, 6);
  molora::route_backward<float>(o, rf, pf, cf, dlf);
  CHECK((dlf.cast<double>() - dld).cwiseAbs().maxCoeff() < 1e-6);

  RowMatrix<double> wrong(5, 5);
  CHECK_THROWS_WITH_AS(molora::route_backward<double>(o, rd, pd, c, wrong),
                       "molora shape error: dlogits: expected [5, 6], got [5, 5]", molora::shape_error);
  const RowMatrix<double> c3(5, 3);
  CHECK_THROWS_WITH_AS(molora::route_backward<double>(o, rd, pd, c3, dld),
                       "molora shape error: gate_grad: expected [5, 2], got [5, 3]", molora::shape_error);
  const RowMatrix<double> p_short(4, 6);
  CHECK_THROWS_WITH_AS(molora::route_backward<double>(o, rd, p_short, c, dld),
                       "molora shape error: probs: expected [5, 6], got [4, 6]", molora::shape_error);
  // Renormalised gating reads no probabilities: an empty probs is fine.
  CHECK_NOTHROW(molora::route_backward<double>(opts(6, 2, true), rd, RowMatrix<double>(), c, dld));
  CHECK_THROWS_AS(molora::route_backward<double>(opts(6, 3, false), rd, pd, c, dld), molora::shape_error);
  molora::Routing<double> bad = rd;
  bad.ids(2, 1) = 6;
  CHECK_THROWS_WITH_AS(molora::route_backward<double>(o, bad, pd, c, dld),
                       "molora numeric error: routing.ids of token 2 slot 1: expected an expert id in [0, 6), got 6",
                       molora::numeric_error);
}

}  // namespace test_gating
