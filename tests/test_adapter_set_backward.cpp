// Training an adapter set: forward_train equals the set's inference forward (up to
// rounding); add_backward's gradients (router, A, B of each MoLoRA adapter, A and B of each
// LoRA) and dL/dx match central finite differences of L = sum(w .* y) in double, with
// per-adapter scales, base-only tokens and an unused adapter whose gradients stay zero.
#include <doctest/doctest.h>

#include <cmath>
#include <memory>
#include <random>
#include <vector>

#include <molora/adapter_set_backward.hpp>

namespace test_adapter_set_backward {

using molora::Index;
using molora::RowMatrix;

namespace {

RowMatrix<double> random_matrix(Index rows, Index cols, std::uint64_t seed, double scale = 1) {
  std::mt19937_64 g(seed);
  std::uniform_real_distribution<double> u(-scale, scale);
  RowMatrix<double> m(rows, cols);
  for (Index i = 0; i < m.size(); ++i) m.data()[i] = u(g);
  return m;
}

std::shared_ptr<molora::MoLoRAAdapter<double>> molora_adapter(Index in, Index out, Index E, Index k, Index r,
                                                              bool normalize, std::uint64_t seed) {
  molora::MoLoRAConfig c;
  c.in_features = in;
  c.out_features = out;
  c.num_experts = E;
  c.top_k = k;
  c.rank = r;
  c.normalize_top_k = normalize;
  auto a = std::make_shared<molora::MoLoRAAdapter<double>>(c);
  a->router().set_weight(random_matrix(E, in, seed));
  a->router().set_bias(random_matrix(1, E, seed + 1));
  for (Index e = 0; e < E; ++e) {
    a->set_expert_A(e, random_matrix(r, in, seed + 2 + std::uint64_t(e)));
    a->set_expert_B(e, random_matrix(out, r, seed + 50 + std::uint64_t(e)));
  }
  return a;
}

}  // namespace

TEST_CASE("adapter_set backward: gradients of every used adapter and dx against finite differences") {
  const Index in = 9, out = 7, T = 13;
  auto m0 = molora_adapter(in, out, 4, 2, 3, true, 10);
  auto m1 = molora_adapter(in, out, 3, 1, 5, false, 20);
  auto m_unused = molora_adapter(in, out, 2, 1, 2, true, 30);
  auto lora = std::make_shared<molora::LoRA<double>>(in, out, 4, 6.0);
  lora->set_A(random_matrix(4, in, 40));
  lora->set_B(random_matrix(out, 4, 41));
  using SA = molora::SetAdapter<double>;
  const molora::AdapterSet<double> set(
      in, out,
      {SA::share(std::shared_ptr<const molora::MoLoRAAdapter<double>>(m0), 1.0),
       SA::share(std::shared_ptr<const molora::MoLoRAAdapter<double>>(m1), 0.75), nullptr,
       SA::share(std::shared_ptr<const molora::LoRA<double>>(lora), -1.5),
       SA::share(std::shared_ptr<const molora::MoLoRAAdapter<double>>(m_unused))});
  const std::vector<std::int32_t> ids = {0, 1, 3, -1, 0, 2, 1, 3, 0, 0, 1, -1, 3};
  RowMatrix<double> x = random_matrix(T, in, 50);
  const RowMatrix<double> w = random_matrix(T, out, 51);  // L = sum(w .* y), so dL/dy = w

  // forward_train equals the inference forward.
  molora::AdapterSetTape<double> tape;
  RowMatrix<double> y_train = RowMatrix<double>::Zero(T, out), y_inf = y_train;
  forward_train(set, x, ids, y_train, tape);
  molora::AdapterSetWorkspace<double> ws;
  set.add_delta(x, ids, y_inf, ws);
  CHECK((y_train - y_inf).norm() <= 1e-13 * y_inf.norm());

  molora::AdapterSetGrads<double> grads(set);
  RowMatrix<double> dx = RowMatrix<double>::Zero(T, in);
  add_backward(set, tape, w, grads, dx);

  // The loss through the inference forward (routing is re-done, as it must be for FD).
  auto loss = [&] {
    RowMatrix<double> y = RowMatrix<double>::Zero(T, out);
    molora::AdapterSetWorkspace<double> lw;
    set.add_delta(x, ids, y, lw);
    return (y.array() * w.array()).sum();
  };
  const double h = 1e-6;
  auto fd_check = [&](double* value, Index n, const double* analytic, const char* what) {
    double err = 0, scale = 1;
    for (Index i = 0; i < n; ++i) scale = std::max(scale, std::abs(analytic[i]));
    for (Index i = 0; i < n; ++i) {
      const double keep = value[i];
      value[i] = keep + h;
      const double lp = loss();
      value[i] = keep - h;
      const double lm = loss();
      value[i] = keep;
      err = std::max(err, std::abs((lp - lm) / (2 * h) - analytic[i]) / scale);
    }
    INFO(what);
    CHECK(err < 1e-6);
  };
  // The set reads the adapters' weights in place, so perturbing them perturbs the set.
  struct M {
    std::shared_ptr<molora::MoLoRAAdapter<double>> a;
    std::size_t slot;
  };
  for (const M& m : {M{m0, 0}, M{m1, 1}}) {
    const auto& g = grads.molora[m.slot];
    CHECK(g.A.norm() > 0);
    fd_check(m.a->mutable_stacked_A().data(), g.A.size(), g.A.data(), "stacked A");
    fd_check(m.a->mutable_stacked_B().data(), g.B.size(), g.B.data(), "stacked B");
    fd_check(m.a->router().mutable_weight().data(), g.router_weight.size(), g.router_weight.data(), "router weight");
    fd_check(m.a->router().mutable_bias().data(), g.router_bias.size(), g.router_bias.data(), "router bias");
  }
  fd_check(lora->mutable_A().data(), grads.lora[3].A.size(), grads.lora[3].A.data(), "LoRA A");
  fd_check(lora->mutable_B().data(), grads.lora[3].B.size(), grads.lora[3].B.data(), "LoRA B");
  fd_check(x.data(), x.size(), dx.data(), "dx");
  // Base-only tokens get no x-gradient from the set; the unused adapter gets no gradient.
  CHECK(dx.row(3).isZero(0));
  CHECK(dx.row(5).isZero(0));  // the empty slot
  CHECK(grads.molora[4].A.isZero(0));
  CHECK(grads.molora[4].router_weight.isZero(0));
}

TEST_CASE("adapter_set backward: errors") {
  const Index in = 5, out = 4;
  auto m0 = molora_adapter(in, out, 2, 1, 2, true, 60);
  using SA = molora::SetAdapter<double>;
  const molora::AdapterSet<double> set(in, out, {SA::share(std::shared_ptr<const molora::MoLoRAAdapter<double>>(m0))});
  const RowMatrix<double> x = random_matrix(3, in, 61);
  RowMatrix<double> y = RowMatrix<double>::Zero(3, out), dx = RowMatrix<double>::Zero(3, in);
  molora::AdapterSetTape<double> tape;
  forward_train(set, x, std::vector<std::int32_t>{0, -1, 0}, y, tape);
  molora::AdapterSetGrads<double> wrong;  // not sized for the set
  CHECK_THROWS_WITH_AS(add_backward(set, tape, RowMatrix<double>::Zero(3, out), wrong, dx),
                       "molora shape error: grads adapters (AdapterSetGrads(set)): expected 1, got 0", molora::shape_error);
  molora::AdapterSetGrads<double> grads(set);
  CHECK_THROWS_WITH_AS(add_backward(set, tape, RowMatrix<double>::Zero(2, out), grads, dx),
                       "molora shape error: dy shape: expected [3, 4], got [2, 4]", molora::shape_error);
  CHECK(dx.isZero(0));
  CHECK(grads.molora[0].A.isZero(0));
  // Wrapped weights have no trainable object.
  molora::SetAdapterViews<double> v;
  v.in_features = in;
  v.out_features = out;
  v.rank = 2;
  v.scaling = 1;
  v.A = {m0->stacked_A().data()};
  v.Bt = {m0->stacked_B().data()};
  const molora::AdapterSet<double> wrapped(in, out, {SA::wrap(v, m0)});
  CHECK_THROWS_WITH_AS(forward_train(wrapped, x, std::vector<std::int32_t>{0, 0, 0}, y, tape),
                       "molora config error: adapter 0 (training): expected an adapter shared from a MoLoRAAdapter or "
                       "a LoRA, got wrapped weights without a trainable object",
                       molora::config_error);
}

}  // namespace test_adapter_set_backward
