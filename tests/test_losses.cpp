// Load-balancing and router z-loss: values against literal numbers, gradients against central
// finite differences in double (through the softmax into W_r, b_r and x; f is a constant),
// and the multi-layer aggregation against one layer fed the concatenated tokens.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <memory>
#include <vector>

#include <molora/backward.hpp>
#include <molora/losses.hpp>
#include <molora/params.hpp>

#include "test_util.hpp"

namespace test_losses {

using namespace molora;
using test_util::fd_error;
using test_util::fill;

namespace {

MoLoRAConfig small_config(Index in, Index E, Index k, bool normalize, Selection sel) {
  MoLoRAConfig cfg;
  cfg.in_features = in;
  cfg.out_features = 3;
  cfg.num_experts = E;
  cfg.top_k = k;
  cfg.rank = 2;
  cfg.normalize_top_k = normalize;
  cfg.selection = sel;
  return cfg;
}

void randomise(MoLoRALinear<double>& layer, Generator& gen) {
  auto wr = layer.adapter().router().mutable_weight();
  fill(wr, gen, 1.0);
  auto br = layer.adapter().router().mutable_bias();
  fill(br, gen, 0.5);
  auto A = layer.adapter().mutable_stacked_A();
  fill(A, gen, 0.5);
  auto B = layer.adapter().mutable_stacked_B();
  fill(B, gen, 0.5);
}

// Several layers, each with its own x; loss = lb_coef * LB(all layers) + z_coef * sum Z(layer).
struct Stack {
  std::vector<std::unique_ptr<MoLoRALinear<double>>> layers;
  std::vector<RowMatrix<double>> xs;
  std::vector<MoLoRATape<double>> tapes;
  std::vector<IdMatrix> ids;
  double lb_coef, z_coef;
  double jitter = 0;

  double eval() {
    std::vector<MoLoRATape<double>*> ptrs;
    for (std::size_t l = 0; l < layers.size(); ++l) {
      RowMatrix<double> y(xs[l].rows(), layers[l]->out_features());
      tapes[l].options.router_jitter = jitter;
      tapes[l].seed(77 + l);
      forward_train(*layers[l], xs[l], y, tapes[l]);
      ptrs.push_back(&tapes[l]);
    }
    double L = load_balancing_loss(ptrs, lb_coef);
    for (auto& t : tapes) L += router_z_loss(t, z_coef);
    return L;
  }
};

}  // namespace

TEST_CASE("load-balancing and z-loss values match hand-computed numbers") {
  // Router weight 0, bias [1, 2, 3, 4]: every token has logits [1, 2, 3, 4], picks {3, 2}.
  MoLoRAConfig cfg = small_config(5, 4, 2, true, Selection::top_k);
  MoLoRALinear<double> layer(cfg);
  layer.adapter().router().set_bias(Vector<double>::LinSpaced(4, 1.0, 4.0));
  RowMatrix<double> x = RowMatrix<double>::Ones(3, 5), y(3, 3);
  MoLoRATape<double> tape;
  forward_train(layer, x, y, tape);
  // f = [0, 0, 1, 1], P = softmax([1, 2, 3, 4]); L = 0.01 * 4 * (P_2 + P_3).
  CHECK(load_balancing_loss(tape, 0.01) == doctest::Approx(0.0352318831191153).epsilon(1e-12));
  // logsumexp([1, 2, 3, 4])^2 * 0.001.
  CHECK(router_z_loss(tape, 0.001) == doctest::Approx(0.01971528455920896).epsilon(1e-12));
}

TEST_CASE("load-balancing loss is k * coef when routing and probabilities are uniform over experts") {
  // E = 4, k = 2, four tokens whose logits are rotations of one another: every expert is
  // selected by exactly two tokens and P is uniform.
  MoLoRAConfig cfg = small_config(4, 4, 2, true, Selection::top_k);
  cfg.router_bias = false;
  MoLoRALinear<double> layer(cfg);
  layer.adapter().router().set_weight(RowMatrix<double>::Identity(4, 4));
  RowMatrix<double> x(4, 4), y(4, 3);
  const double base[4] = {0.4, 0.3, 0.2, 0.1};
  for (Index t = 0; t < 4; ++t)
    for (Index e = 0; e < 4; ++e) x(t, e) = base[(e + t) % 4];
  MoLoRATape<double> tape;
  forward_train(layer, x, y, tape);
  CHECK(load_balancing_loss(tape, 0.01) == doctest::Approx(0.02).epsilon(1e-12));
}

TEST_CASE("balancing and z-loss gradients match finite differences in every gating mode") {
  double worst = 0;
  struct Mode {
    Index E, k;
    bool normalize;
    Selection sel;
    double jitter;
  };
  const Mode modes[] = {{4, 2, true, Selection::top_k, 0},     {5, 1, false, Selection::top_k, 0},
                        {3, 3, true, Selection::top_k, 0},     {8, 2, true, Selection::sampling, 0},
                        {6, 2, true, Selection::top_k, 0.25},  {1, 1, true, Selection::top_k, 0}};
  for (const Mode& m : modes) {
    Generator gen(static_cast<std::uint64_t>(m.E * 13 + m.k));
    Stack st;
    st.lb_coef = 0.37;
    st.z_coef = 0.11;
    st.jitter = m.jitter;
    const Index Ts[] = {5, 1, 8};
    for (int l = 0; l < 3; ++l) {
      st.layers.push_back(std::make_unique<MoLoRALinear<double>>(small_config(6, m.E, m.k, m.normalize, m.sel)));
      randomise(*st.layers.back(), gen);
      st.tapes.emplace_back();
    }
    // Resample inputs until the top-k sets are 1e-2 away from a flip.
    for (int attempt = 0;; ++attempt) {
      REQUIRE(attempt < 500);
      st.xs.clear();
      for (int l = 0; l < 3; ++l) {
        st.xs.emplace_back(Ts[l], 6);
        fill(st.xs.back(), gen, 1.0);
      }
      st.eval();
      bool ok = true;
      for (const auto& tape : st.tapes)
        for (Index t = 0; t < tape.num_tokens() && m.k < m.E && m.sel == Selection::top_k; ++t) {
          double lo = INFINITY, hi = -INFINITY;
          for (Index e = 0; e < m.E; ++e) {
            bool sel = false;
            for (Index s = 0; s < m.k; ++s) sel = sel || tape.routing.ids(t, s) == e;
            (sel ? lo : hi) = sel ? std::min(lo, tape.logits(t, e)) : std::max(hi, tape.logits(t, e));
          }
          ok = ok && lo - hi > 1e-2;
        }
      if (ok) break;
    }
    st.ids.clear();
    for (const auto& tape : st.tapes) st.ids.push_back(tape.routing.ids);

    st.eval();
    std::vector<MoLoRAGrads<double>> grads;
    std::vector<RowMatrix<double>> dxs;
    for (std::size_t l = 0; l < 3; ++l) {
      grads.emplace_back(*st.layers[l]);
      dxs.emplace_back(st.xs[l].rows(), 6);
      const RowMatrix<double> zero_dy = RowMatrix<double>::Zero(st.xs[l].rows(), 3);
      backward(*st.layers[l], st.tapes[l], zero_dy, grads[l], dxs[l]);
    }
    auto f = [&] {
      const double L = st.eval();
      for (std::size_t l = 0; l < 3; ++l) REQUIRE(st.tapes[l].routing.ids == st.ids[l]);
      return L;
    };
    for (std::size_t l = 0; l < 3; ++l) {
      for (auto& p : parameters(*st.layers[l], grads[l])) {
        const Vector<double> an = p.grad;
        const double err = fd_error(p.value, an, f);
        CAPTURE(p.name);
        CAPTURE(m.E);
        CHECK(err < 1e-6);
        worst = std::max(worst, err);
      }
      const Vector<double> an = Eigen::Map<const Vector<double>>(dxs[l].data(), dxs[l].size());
      const double err = fd_error(Eigen::Map<Vector<double>>(st.xs[l].data(), st.xs[l].size()), an, f);
      CHECK(err < 1e-6);
      worst = std::max(worst, err);
    }
  }
  MESSAGE("auxiliary losses: max finite-difference error " << worst);
}

TEST_CASE("the multi-layer balancing loss is the loss over the concatenated router outputs") {
  const MoLoRAConfig cfg = small_config(7, 6, 2, true, Selection::top_k);
  MoLoRALinear<double> a(cfg), b(cfg), both(cfg);
  Generator gen(4);
  randomise(a, gen);
  b.adapter().router().set_weight(a.adapter().router().weight());
  b.adapter().router().set_bias(a.adapter().router().bias());
  both.adapter().router().set_weight(a.adapter().router().weight());
  both.adapter().router().set_bias(a.adapter().router().bias());
  RowMatrix<double> x1(5, 7), x2(9, 7);
  fill(x1, gen, 1.0);
  fill(x2, gen, 1.0);
  RowMatrix<double> x12(14, 7);
  x12 << x1, x2;
  RowMatrix<double> y1(5, 3), y2(9, 3), y12(14, 3);
  MoLoRATape<double> t1, t2, t12;
  forward_train(a, x1, y1, t1);
  forward_train(b, x2, y2, t2);
  forward_train(both, x12, y12, t12);
  const double split = load_balancing_loss(std::vector<MoLoRATape<double>*>{&t1, &t2}, 0.01);
  const double joint = load_balancing_loss(t12, 0.01);
  CHECK(split == doctest::Approx(joint).epsilon(1e-14));
  RowMatrix<double> g12(14, 6);
  g12 << t1.logit_grad, t2.logit_grad;
  CHECK((g12 - t12.logit_grad).cwiseAbs().maxCoeff() < 1e-15);
}

TEST_CASE("losses need a tape whose forward ran the router, and one E across layers") {
  const MoLoRAConfig cfg = small_config(4, 3, 1, true, Selection::top_k);
  MoLoRALinear<double> layer(cfg);
  RowMatrix<double> x = RowMatrix<double>::Ones(2, 4), y(2, 3);
  Routing<double> r;
  r.resize(2, 1);
  r.ids << 0, 2;
  r.weights << 1.0, 0.5;
  MoLoRATape<double> routed;
  forward_routed_train(layer, x, r, y, routed);
  CHECK_THROWS_AS(router_z_loss(routed, 0.1), config_error);
  CHECK_THROWS_AS(load_balancing_loss(routed, 0.1), config_error);
  MoLoRALinear<double> other(small_config(4, 5, 1, true, Selection::top_k));
  MoLoRATape<double> t1, t2;
  forward_train(layer, x, y, t1);
  forward_train(other, x, y, t2);
  CHECK_THROWS_AS(load_balancing_loss(std::vector<MoLoRATape<double>*>{&t1, &t2}, 0.1), shape_error);
}

}  // namespace test_losses
