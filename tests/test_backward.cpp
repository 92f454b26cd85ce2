// Backward passes against central finite differences in double, for dL/dx and
// every parameter, in every gating mode, with dropout and jitter, on random shapes including
// 1 and odd sizes. Inputs are resampled until no top-k set is within reach of a flip, and
// every perturbed evaluation checks that the selected experts did not change.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <vector>

#include <molora/backward.hpp>
#include <molora/losses.hpp>
#include <molora/params.hpp>

#include "test_util.hpp"

namespace test_backward {

using namespace molora;

namespace {

using test_util::fd_error;
using test_util::fill;

struct Case {
  Index T = 4, in = 5, out = 3, E = 4, k = 2, r = 2;
  bool bias = true, normalize = true, caller_routing = false;
  Selection selection = Selection::top_k;
  double dropout = 0, jitter = 0, lb_coef = 0, z_coef = 0;
  std::uint64_t seed = 1;
};

MoLoRAConfig config_of(const Case& c) {
  MoLoRAConfig cfg;
  cfg.in_features = c.in;
  cfg.out_features = c.out;
  cfg.num_experts = c.E;
  cfg.top_k = c.k;
  cfg.rank = c.r;
  cfg.lora_alpha = 3.0;
  cfg.router_bias = c.bias;
  cfg.normalize_top_k = c.normalize;
  cfg.selection = c.selection;
  return cfg;
}

void randomise(MoLoRALinear<double>& layer, Generator& gen, bool base_bias) {
  const auto& cfg = layer.config();
  RowMatrix<double> w0(cfg.out_features, cfg.in_features);
  fill(w0, gen, 0.5);
  layer.set_base_weight(w0);
  if (base_bias) {
    Vector<double> b0(cfg.out_features);
    fill(b0, gen, 0.5);
    layer.set_base_bias(b0);
  }
  auto wr = layer.adapter().router().mutable_weight();
  fill(wr, gen, 1.0);
  auto br = layer.adapter().router().mutable_bias();
  if (cfg.router_bias) fill(br, gen, 0.5);
  auto A = layer.adapter().mutable_stacked_A();
  fill(A, gen, 0.5);
  auto B = layer.adapter().mutable_stacked_B();
  fill(B, gen, 0.5);
}

// Smallest gap between a selected and an unselected logit over all tokens (infinity for k == E).
double top_k_margin(const MoLoRATape<double>& tape) {
  double margin = INFINITY;
  for (Index t = 0; t < tape.num_tokens(); ++t) {
    double lo = INFINITY, hi = -INFINITY;
    for (Index e = 0; e < tape.logits.cols(); ++e) {
      bool sel = false;
      for (Index s = 0; s < tape.routing.top_k(); ++s) sel = sel || tape.routing.ids(t, s) == e;
      if (sel)
        lo = std::min(lo, tape.logits(t, e));
      else
        hi = std::max(hi, tape.logits(t, e));
    }
    margin = std::min(margin, lo - hi);
  }
  return margin;
}

struct Harness {
  Case c;
  MoLoRALinear<double> layer;
  RowMatrix<double> x, w;  // input, and dL/dy of the linear part of the loss
  Routing<double> caller;
  IdMatrix ids;            // the routing every evaluation must reproduce
  RowMatrix<double> y;
  MoLoRATape<double> tape;

  explicit Harness(const Case& cs) : c(cs), layer(config_of(cs)) {
    Generator gen(c.seed * 7919 + 17);
    randomise(layer, gen, c.seed % 2 == 0);
    w.resize(c.T, c.out);
    fill(w, gen, 1.0);
    if (c.caller_routing) {
      caller.resize(c.T, c.k);
      for (Index t = 0; t < c.T; ++t) {
        std::vector<std::int32_t> perm(static_cast<std::size_t>(c.E));
        for (Index e = 0; e < c.E; ++e) perm[static_cast<std::size_t>(e)] = static_cast<std::int32_t>(e);
        for (Index e = c.E - 1; e > 0; --e)
          std::swap(perm[static_cast<std::size_t>(e)],
                    perm[static_cast<std::size_t>(detail::bits64(gen) % static_cast<std::uint64_t>(e + 1))]);
        for (Index s = 0; s < c.k; ++s) {
          caller.ids(t, s) = perm[static_cast<std::size_t>(s)];
          caller.weights(t, s) = detail::uniform(gen, -1.0, 1.0);
        }
      }
    }
    // Resample x until the top-k sets sit at least 1e-2 away from a flip.
    for (int attempt = 0;; ++attempt) {
      REQUIRE(attempt < 200);
      x.resize(c.T, c.in);
      fill(x, gen, 1.0);
      eval();
      if (c.caller_routing || c.selection == Selection::sampling || c.k == c.E || top_k_margin(tape) > 1e-2) break;
    }
    ids = tape.routing.ids;
  }

  double eval() {
    tape.options.lora_dropout = c.dropout;
    tape.options.router_jitter = c.jitter;
    tape.seed(c.seed);
    y.resize(c.T, c.out);
    if (c.caller_routing)
      forward_routed_train(layer, x, caller, y, tape);
    else
      forward_train(layer, x, y, tape);
    double L = (w.array() * y.array()).sum();
    if (c.lb_coef != 0) L += load_balancing_loss(tape, c.lb_coef);
    if (c.z_coef != 0) L += router_z_loss(tape, c.z_coef);
    return L;
  }

  double eval_checked() {
    const double L = eval();
    REQUIRE(tape.routing.ids == ids);
    return L;
  }
};

double worst_error = 0;

// Checks dL/dx and every parameter's gradient of one case; returns the worst error.
double check_case(const Case& c) {
  Harness hs(c);
  MoLoRAGrads<double> grads(hs.layer);
  hs.eval();
  RowMatrix<double> dx(c.T, c.in);
  backward(hs.layer, hs.tape, hs.w, grads, dx);
  double worst = 0;
  auto f = [&] { return hs.eval_checked(); };
  for (auto& p : parameters(hs.layer, grads)) {
    const Vector<double> analytic = p.grad;
    const double err = fd_error(p.value, analytic, f);
    INFO(p.name);
    CHECK(err < 1e-6);
    worst = std::max(worst, err);
  }
  Eigen::Map<Vector<double>> xv(hs.x.data(), hs.x.size());
  const Vector<double> dxv = Eigen::Map<const Vector<double>>(dx.data(), dx.size());
  const double ex = fd_error(xv, dxv, f);
  CHECK(ex < 1e-6);
  worst = std::max(worst, ex);
  worst_error = std::max(worst_error, worst);
  return worst;
}

std::vector<Case> random_cases(Selection sel, bool normalize, bool dense, std::uint64_t seed0, int n) {
  const Index Ts[] = {1, 3, 7};
  const Index ins[] = {1, 4, 9};
  const Index outs[] = {1, 3, 6};
  const Index Es[] = {1, 2, 3, 5, 8};
  const Index rs[] = {1, 2, 3};
  std::vector<Case> out;
  Generator gen(seed0);
  for (int i = 0; i < n; ++i) {
    Case c;
    c.T = Ts[detail::bits64(gen) % 3];
    c.in = ins[detail::bits64(gen) % 3];
    c.out = outs[detail::bits64(gen) % 3];
    c.E = Es[detail::bits64(gen) % 5];
    c.r = rs[detail::bits64(gen) % 3];
    c.k = dense ? c.E : 1 + static_cast<Index>(detail::bits64(gen) % static_cast<std::uint64_t>(c.E));
    c.bias = detail::bits64(gen) % 2 == 0;
    c.normalize = normalize;
    c.selection = sel;
    c.seed = seed0 * 100 + static_cast<std::uint64_t>(i);
    out.push_back(c);
  }
  return out;
}

void run_mode(const char* name, Selection sel, bool normalize, bool dense, bool caller, std::uint64_t seed0) {
  double worst = 0;
  for (int noise = 0; noise < 2; ++noise)
    for (Case c : random_cases(sel, normalize, dense, seed0 + static_cast<std::uint64_t>(noise), 6)) {
      c.caller_routing = caller;
      if (noise) {
        c.dropout = 0.3;
        c.jitter = 0.2;
      }
      CAPTURE(c.T);
      CAPTURE(c.in);
      CAPTURE(c.out);
      CAPTURE(c.E);
      CAPTURE(c.k);
      CAPTURE(c.r);
      CAPTURE(noise);
      worst = std::max(worst, check_case(c));
    }
  MESSAGE(std::string(name) << ": max finite-difference error " << worst);
}

}  // namespace

TEST_CASE("backward: top-k renormalised matches finite differences") {
  run_mode("top-k renormalised", Selection::top_k, true, false, false, 11);
}
TEST_CASE("backward: top-k masked (normalize_top_k = false) matches finite differences") {
  run_mode("top-k masked", Selection::top_k, false, false, false, 21);
}
TEST_CASE("backward: dense k = E matches finite differences") {
  run_mode("dense k=E renormalised", Selection::top_k, true, true, false, 31);
  run_mode("dense k=E masked", Selection::top_k, false, true, false, 35);
}
TEST_CASE("backward: sampling with the drawn experts fixed matches finite differences") {
  run_mode("sampling renormalised", Selection::sampling, true, false, false, 41);
  run_mode("sampling masked", Selection::sampling, false, false, false, 45);
}
TEST_CASE("backward: caller-supplied routing matches finite differences, router gets nothing") {
  run_mode("caller routing", Selection::top_k, true, false, true, 51);
  Case c;
  c.caller_routing = true;
  Harness hs(c);
  MoLoRAGrads<double> grads(hs.layer);
  hs.eval();
  backward(hs.layer, hs.tape, hs.w, grads);
  CHECK(grads.router_weight.isZero(0));
  CHECK(grads.router_bias.isZero(0));
  CHECK_THROWS_AS(load_balancing_loss(hs.tape, 0.01), config_error);
}

TEST_CASE("backward: the MING-MOE shape in miniature (E = 8, k = 2) with odd sizes") {
  Case c;
  c.T = 13;
  c.in = 17;
  c.out = 11;
  c.E = 8;
  c.k = 2;
  c.r = 3;
  c.seed = 99;
  const double err = check_case(c);
  MESSAGE("E=8 k=2 T=13 in=17 out=11 r=3: max finite-difference error " << err);
}

// Renormalised top-k without an auxiliary loss leaves dL/dlogits zero off each token's k
// experts, and the backward then runs the router's term as one row of W_r per pair. A
// logit gradient of 1e-300 off the selection (far below the rounding of anything else)
// switches it back to the dense form over all E rows: both must agree.
TEST_CASE("backward: the router's sparse form equals its dense form") {
  const Index Ts[] = {1, 9, 40};
  std::uint64_t seed = 71;
  for (const Index T : Ts)
    for (int noise = 0; noise < 2; ++noise)
      for (const Index E : {4, 5, 8}) {
        Case c;
        c.T = T;
        c.in = 19;
        c.out = 6;
        c.E = E;
        c.k = 2;
        c.r = 3;
        c.seed = ++seed;
        if (noise) {
          c.dropout = 0.3;
          c.jitter = 0.2;
        }
        CAPTURE(T);
        CAPTURE(E);
        CAPTURE(noise);
        Harness hs(c);
        MoLoRAGrads<double> sparse(hs.layer), dense(hs.layer);
        RowMatrix<double> dx_sparse(T, c.in), dx_dense(T, c.in);
        hs.eval();
        backward(hs.layer, hs.tape, hs.w, sparse, dx_sparse);
        hs.eval();
        for (Index t = 0; t < T; ++t)
          for (Index e = 0; e < E; ++e) {
            bool selected = false;
            for (Index s = 0; s < c.k; ++s) selected = selected || hs.tape.routing.ids(t, s) == e;
            if (!selected) hs.tape.logit_grad(t, e) = 1e-300;
          }
        backward(hs.layer, hs.tape, hs.w, dense, dx_dense);
        const auto ps = parameters(hs.layer, sparse), pd = parameters(hs.layer, dense);
        REQUIRE(ps.size() == pd.size());
        for (std::size_t i = 0; i < ps.size(); ++i) {
          INFO(ps[i].name);
          const Vector<double> a = ps[i].grad, b = pd[i].grad;
          CHECK((a - b).cwiseAbs().maxCoeff() <= 1e-12 * std::max(1.0, b.cwiseAbs().maxCoeff()));
        }
        CHECK((dx_sparse - dx_dense).cwiseAbs().maxCoeff() <= 1e-12 * std::max(1.0, dx_dense.cwiseAbs().maxCoeff()));
      }
}

TEST_CASE("backward: worst error over all cases") {
  MESSAGE("worst finite-difference error so far: " << worst_error);
}

TEST_CASE("training forward equals the layer's forward in every mode") {
  for (int mode = 0; mode < 5; ++mode) {
    Case c;
    c.T = 9;
    c.in = 7;
    c.out = 5;
    c.E = 5;
    c.k = mode == 2 ? 5 : 2;
    c.normalize = mode != 1;
    c.selection = mode == 3 ? Selection::sampling : Selection::top_k;
    c.caller_routing = mode == 4;
    c.seed = 5 + static_cast<std::uint64_t>(mode);
    Harness hs(c);
    hs.eval();
    RowMatrix<double> ref(c.T, c.out);
    MoLoRAWorkspace<double> ws;
    ws.seed(c.seed);
    if (c.caller_routing)
      hs.layer.forward_routed(hs.x, hs.caller, ref, ws);
    else
      hs.layer.forward(hs.x, ref, ws);
    CAPTURE(mode);
    CHECK((hs.y - ref).cwiseAbs().maxCoeff() <= 1e-12 * std::max(1.0, ref.cwiseAbs().maxCoeff()));
    if (!c.caller_routing) CHECK(ws.routing.ids == hs.tape.routing.ids);

    // The adapter alone adds the same delta.
    RowMatrix<double> d1 = RowMatrix<double>::Zero(c.T, c.out), d2 = d1;
    MoLoRATape<double> tape;
    tape.seed(c.seed);
    ws.seed(c.seed);
    if (c.caller_routing) {
      add_delta_routed_train(hs.layer.adapter(), hs.x, hs.caller, d1, tape);
      hs.layer.adapter().add_delta_routed(hs.x, hs.caller, d2, ws);
    } else {
      add_delta_train(hs.layer.adapter(), hs.x, d1, tape);
      hs.layer.adapter().add_delta(hs.x, d2, ws);
    }
    CHECK((d1 - d2).cwiseAbs().maxCoeff() <= 1e-12 * std::max(1.0, d2.cwiseAbs().maxCoeff()));
  }
}

TEST_CASE("training forward in float equals the layer's forward") {
  MoLoRAConfig cfg;
  cfg.in_features = 33;
  cfg.out_features = 19;
  cfg.rank = 4;
  MoLoRALinear<float> layer(cfg);
  Generator gen(3);
  layer.adapter().init_default(gen);
  auto B = layer.adapter().mutable_stacked_B();
  fill(B, gen, 0.1);
  RowMatrix<float> x(21, 33), w0(19, 33);
  fill(x, gen, 1.0);
  fill(w0, gen, 0.2);
  layer.set_base_weight(w0);
  RowMatrix<float> y(21, 19), ref(21, 19);
  MoLoRATape<float> tape;
  forward_train(layer, x, y, tape);
  layer.forward(x, ref);
  CHECK((y - ref).cwiseAbs().maxCoeff() <= 1e-5f * std::max(1.0f, ref.cwiseAbs().maxCoeff()));
}

// One forward: the training forward runs the layer's router, gating, plan and fused kernels,
// so without noise its y and routing are the fused forward's bit for bit, and what it keeps
// (h per pair, probabilities) matches a double reference.
TEST_CASE_TEMPLATE("training forward is the layer's fused forward, bit for bit, and keeps h and p", Scalar, float,
                   double) {
  struct Shape {
    Index T, in, out, E, k, r;
    bool normalize;
    Selection selection;
  };
  const Shape shapes[] = {{1, 1, 1, 1, 1, 1, true, Selection::top_k},
                          {5, 17, 9, 4, 2, 3, true, Selection::top_k},
                          {37, 33, 19, 8, 2, 16, false, Selection::top_k},
                          {70, 20, 31, 3, 3, 5, true, Selection::top_k},
                          {13, 40, 7, 6, 2, 1, true, Selection::sampling},
                          {9, 65, 130, 5, 3, 7, false, Selection::sampling}};
  std::uint64_t seed = 40;
  for (const Shape& sh : shapes) {
    CAPTURE(sh.T);
    CAPTURE(sh.E);
    CAPTURE(sh.k);
    MoLoRAConfig cfg;
    cfg.in_features = sh.in;
    cfg.out_features = sh.out;
    cfg.num_experts = sh.E;
    cfg.top_k = sh.k;
    cfg.rank = sh.r;
    cfg.normalize_top_k = sh.normalize;
    cfg.selection = sh.selection;
    MoLoRALinear<Scalar> layer(cfg);
    layer.set_strategy(Strategy::fused);
    Generator gen(seed++);
    layer.adapter().init_default(gen);
    auto B = layer.adapter().mutable_stacked_B();
    fill(B, gen, 0.3);
    auto br = layer.adapter().router().mutable_bias();
    fill(br, gen, 0.5);
    RowMatrix<Scalar> x(sh.T, sh.in), w0(sh.out, sh.in);
    fill(x, gen, 1.0);
    fill(w0, gen, 0.3);
    layer.set_base_weight(w0);

    RowMatrix<Scalar> y(sh.T, sh.out), ref(sh.T, sh.out);
    MoLoRATape<Scalar> tape;
    MoLoRAWorkspace<Scalar> ws;
    tape.seed(seed);
    ws.seed(seed);
    forward_train(layer, x, y, tape);
    layer.forward(x, ref, ws);
    CHECK(y == ref);
    CHECK(tape.routing.ids == ws.routing.ids);
    CHECK(tape.routing.weights == ws.routing.weights);
    CHECK(tape.logits == ws.logits);

    // The adapter alone: the same delta, bit for bit.
    RowMatrix<Scalar> d1 = RowMatrix<Scalar>::Zero(sh.T, sh.out), d2 = d1;
    MoLoRATape<Scalar> tape2;
    tape2.seed(seed);
    ws.seed(seed);
    add_delta_train(layer.adapter(), x, d1, tape2);
    layer.adapter().add_delta(x, d2, ws);
    CHECK(d1 == d2);

    // What the tape keeps, against plain double loops.
    const double tol = std::is_same_v<Scalar, float> ? 1e-5 : 1e-12;
    double worst_p = 0, worst_h = 0;
    for (Index t = 0; t < sh.T; ++t) {
      double m = -1e300, z = 0;
      for (Index e = 0; e < sh.E; ++e) m = std::max(m, double(tape.logits(t, e)));
      for (Index e = 0; e < sh.E; ++e) z += std::exp(double(tape.logits(t, e)) - m);
      for (Index e = 0; e < sh.E; ++e)
        worst_p = std::max(worst_p, std::abs(double(tape.probs(t, e)) - std::exp(double(tape.logits(t, e)) - m) / z));
    }
    const auto& A = layer.adapter().stacked_A();
    REQUIRE(tape.hidden.rows() == sh.T * sh.k);
    for (std::size_t p = 0; p < tape.plan.tokens.size(); ++p) {
      const Index t = tape.plan.tokens[p];
      const Index e = tape.routing.ids(t, tape.plan.slots[p]);
      for (Index j = 0; j < sh.r; ++j) {
        double h = 0, scale = 0;
        for (Index c = 0; c < sh.in; ++c) {
          h += double(A(e * sh.r + j, c)) * double(x(t, c));
          scale += std::abs(double(A(e * sh.r + j, c)) * double(x(t, c)));
        }
        worst_h = std::max(worst_h, std::abs(double(tape.hidden(Index(p), j)) - h) / std::max(1.0, scale));
      }
    }
    CHECK(worst_p <= tol);
    CHECK(worst_h <= tol);
  }
}

TEST_CASE("backward: experts without tokens get exactly zero gradient") {
  Case c;
  c.T = 1;
  c.E = 8;
  c.k = 2;
  Harness hs(c);
  MoLoRAGrads<double> grads(hs.layer);
  hs.eval();
  backward(hs.layer, hs.tape, hs.w, grads);
  int nonzero = 0;
  for (Index e = 0; e < c.E; ++e) {
    const bool used = hs.tape.routing.ids(0, 0) == e || hs.tape.routing.ids(0, 1) == e;
    CHECK(grads.expert_A(e).isZero(0) == !used);
    CHECK(grads.expert_B(e).isZero(0) == !used);
    nonzero += used;
  }
  CHECK(nonzero == 2);
}

TEST_CASE("backward: x shared with y (in-place forward) still differentiates the input") {
  Case c;
  c.in = 6;
  c.out = 6;
  c.seed = 8;
  Harness hs(c);
  RowMatrix<double> buf = hs.x;
  MoLoRATape<double> tape;
  tape.seed(c.seed);
  forward_train(hs.layer, buf, buf, tape);  // buf now holds y
  MoLoRAGrads<double> g1(hs.layer), g2(hs.layer);
  RowMatrix<double> dx1(c.T, c.in), dx2(c.T, c.in);
  backward(hs.layer, tape, hs.w, g1, dx1);
  hs.eval();
  backward(hs.layer, hs.tape, hs.w, g2, dx2);
  CHECK((buf - hs.y).cwiseAbs().maxCoeff() < 1e-12);
  CHECK((dx1 - dx2).cwiseAbs().maxCoeff() < 1e-12);
  CHECK((g1.A - g2.A).cwiseAbs().maxCoeff() < 1e-12);
  CHECK((g1.router_weight - g2.router_weight).cwiseAbs().maxCoeff() < 1e-12);
}

TEST_CASE("backward: shape errors name the field") {
  Case c;
  Harness hs(c);
  MoLoRAGrads<double> grads(hs.layer);
  hs.eval();
  RowMatrix<double> bad_dy(c.T + 1, c.out), dx(c.T, c.in);
  CHECK_THROWS_AS(backward(hs.layer, hs.tape, bad_dy, grads, dx), shape_error);
  RowMatrix<double> bad_dx(c.T, c.in + 1);
  CHECK_THROWS_AS(backward(hs.layer, hs.tape, hs.w, grads, bad_dx), shape_error);
  MoLoRAGrads<double> wrong;
  CHECK_THROWS_AS(backward(hs.layer, hs.tape, hs.w, wrong), shape_error);
  hs.tape.options.lora_dropout = 1.0;
  CHECK_THROWS_AS(forward_train(hs.layer, hs.x, hs.y, hs.tape), config_error);
}

TEST_CASE("plain LoRA backward matches finite differences, with and without dropout") {
  double worst = 0;
  const Index shapes[][4] = {{1, 1, 1, 1}, {3, 5, 2, 4}, {7, 9, 3, 1}, {2, 4, 6, 3}};  // T, in, r, out
  for (int noise = 0; noise < 2; ++noise)
    for (const auto& s : shapes) {
      const Index T = s[0], in = s[1], r = s[2], out = s[3];
      LoRA<double> lora(in, out, r, 4.0);
      Generator gen(static_cast<std::uint64_t>(T * 31 + in));
      RowMatrix<double> a(r, in), x(T, in), w(T, out);
      ColMatrix<double> b(out, r);
      fill(a, gen, 1.0);
      fill(b, gen, 1.0);
      fill(x, gen, 1.0);
      fill(w, gen, 1.0);
      lora.set_A(a);
      lora.set_B(b);
      LoRATape<double> tape;
      tape.options.lora_dropout = noise ? 0.4 : 0.0;
      RowMatrix<double> y(T, out);
      auto f = [&] {
        tape.seed(5);
        y.setZero();
        add_delta_train(lora, x, y, tape);
        return (w.array() * y.array()).sum();
      };
      f();
      LoRAGrads<double> grads(lora);
      RowMatrix<double> dx = RowMatrix<double>::Zero(T, in);
      add_backward(lora, tape, w, grads, dx);
      for (auto& p : parameters(lora, grads)) {
        const Vector<double> an = p.grad;
        const double err = fd_error(p.value, an, f);
        CHECK(err < 1e-6);
        worst = std::max(worst, err);
      }
      Eigen::Map<Vector<double>> xv(x.data(), x.size());
      const Vector<double> dxv = Eigen::Map<const Vector<double>>(dx.data(), dx.size());
      const double ex = fd_error(xv, dxv, f);
      CHECK(ex < 1e-6);
      worst = std::max(worst, ex);
    }
  MESSAGE("plain LoRA: max finite-difference error " << worst);
}

TEST_CASE("dropout and jitter are reproducible from their seed") {
  Case c;
  c.T = 6;
  c.in = 8;
  c.out = 4;
  c.E = 4;
  c.dropout = 0.5;
  c.jitter = 0.3;
  Harness hs(c);
  auto run = [&](std::uint64_t seed, RowMatrix<double>& mask, RowMatrix<double>& jit, RowMatrix<double>& y) {
    MoLoRATape<double> tape;
    tape.options.lora_dropout = c.dropout;
    tape.options.router_jitter = c.jitter;
    tape.seed(seed);
    y.resize(c.T, c.out);
    forward_train(hs.layer, hs.x, y, tape);
    mask = tape.dropout_scale;
    jit = tape.jitter;
  };
  RowMatrix<double> m1, j1, y1, m2, j2, y2, m3, j3, y3;
  run(42, m1, j1, y1);
  run(42, m2, j2, y2);
  run(43, m3, j3, y3);
  CHECK(m1 == m2);
  CHECK(j1 == j2);
  CHECK(y1 == y2);
  CHECK(m1 != m3);
  CHECK(j1 != j3);
  CHECK(y1 != y3);
  // Inverted dropout: kept values are scaled by 1/(1-p); jitter lies in [1-eps, 1+eps).
  for (Index i = 0; i < m1.size(); ++i) CHECK((m1(i) == 0.0 || m1(i) == doctest::Approx(2.0)));
  CHECK(j1.minCoeff() >= 1 - c.jitter);
  CHECK(j1.maxCoeff() < 1 + c.jitter);
  // The LoRA tape's dropout too.
  LoRA<double> lora(8, 4, 2, 2.0);
  RowMatrix<double> x(5, 8), y(5, 4);
  x.setOnes();
  auto lora_mask = [&](std::uint64_t seed) {
    LoRATape<double> tape;
    tape.options.lora_dropout = 0.5;
    tape.seed(seed);
    y.setZero();
    add_delta_train(lora, x, y, tape);
    return RowMatrix<double>(tape.dropout_scale);
  };
  CHECK(lora_mask(1) == lora_mask(1));
  CHECK(lora_mask(1) != lora_mask(2));
}

// The draws' statistics over 64 x 1001 elements (an odd row length, so each row's last
// element takes the tail path): the dropped share within 5 standard deviations of p, the
// jitter's mean and variance those of U(1 - eps, 1 + eps), and no two rows alike.
TEST_CASE("dropout drops a share p and jitter is uniform") {
  const Index rows = 64, cols = 1001;
  const double n = double(rows * cols);
  Generator gen(9);
  for (const double p : {0.05, 0.3, 0.5}) {
    RowMatrix<double> m;
    detail::draw_dropout(m, rows, cols, p, gen);
    const double dropped = double((m.array() == 0.0).count()) / n;
    CAPTURE(p);
    CHECK(std::abs(dropped - p) < 5 * std::sqrt(p * (1 - p) / n));
    CHECK(((m.array() == 0.0) || (m.array() == 1.0 / (1.0 - p))).all());
    for (Index i = 1; i < rows; ++i) CHECK(m.row(i) != m.row(i - 1));
    // The last column is drawn apart from the pairs: it drops a share p too (over 64 rows,
    // within 5 standard deviations).
    const double last = double((m.col(cols - 1).array() == 0.0).count()) / double(rows);
    CHECK(std::abs(last - p) < 5 * std::sqrt(p * (1 - p) / double(rows)) + 1.0 / double(rows));
  }
  const double eps = 0.2;
  RowMatrix<double> j;
  detail::draw_jitter(j, rows, cols, eps, gen);
  CHECK(j.minCoeff() >= 1 - eps);
  CHECK(j.maxCoeff() < 1 + eps);
  const double mean = j.mean(), var = (j.array() - mean).square().sum() / n;
  const double var_u = (2 * eps) * (2 * eps) / 12;
  CHECK(std::abs(mean - 1.0) < 5 * std::sqrt(var_u / n));
  CHECK(std::abs(var - var_u) < 0.02 * var_u);
}

TEST_CASE("training forward and backward of an empty batch do nothing") {
  Case c;
  Harness hs(c);
  RowMatrix<double> x0(0, c.in), y0(0, c.out), dy0(0, c.out), dx0(0, c.in);
  MoLoRATape<double> tape;
  forward_train(hs.layer, x0, y0, tape);
  CHECK(tape.routing.num_tokens() == 0);
  MoLoRAGrads<double> grads(hs.layer);
  backward(hs.layer, tape, dy0, grads, dx0);
  CHECK(grads.A.isZero(0));
  CHECK(load_balancing_loss(tape, 0.1) == 0.0);
  CHECK(router_z_loss(tape, 0.1) == 0.0);
}

TEST_CASE("a backward refuses a tape whose gating does not fit the routing") {
  Case c;
  Harness hs(c);
  hs.eval();
  MoLoRAGrads<double> grads(hs.layer);
  MoLoRATape<double> edited = hs.tape;
  edited.gating.top_k = 3;
  CHECK_THROWS_WITH_AS(backward(hs.layer, edited, hs.w, grads),
                       "molora shape error: tape.gating (num_experts, top_k): expected (4, 2), got (4, 3)",
                       shape_error);
  CHECK(grads.A.isZero(0));
  CHECK_NOTHROW(backward(hs.layer, hs.tape, hs.w, grads));
}

}  // namespace test_backward
