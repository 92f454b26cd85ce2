// Training over a frozen bf16 / f16 base (MoLoRALinear<float, Weight>): the training forward
// and the backward equal the float layer holding the rounded base (the adapter's gradients
// bit for bit, since the base does not enter them; y and dx up to the order of the base
// product's summation), and the base's x-gradient alone matches a double loop over the
// widened weights, across several blocks of widened rows.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <type_traits>
#include <utility>
#include <vector>

#include <molora/backward.hpp>
#include <molora/half.hpp>
#include <molora/molora_linear.hpp>
#include <molora/optim.hpp>
#include <molora/params.hpp>

#include "reference.hpp"
#include "test_util.hpp"

namespace test_half_training {

namespace {

using molora::Index;
using molora::RowMatrix;

// max |a - b| / max(1, max |b|)
template <class A, class B>
double rel_diff(const A& a, const B& b) {
  const double scale = std::max(1.0, double(b.cwiseAbs().maxCoeff()));
  return double((a - b).cwiseAbs().maxCoeff()) / scale;
}

// The float layer holding exactly the 16-bit layer's (rounded) base and the same adapter.
template <class Weight>
molora::MoLoRALinear<float> widened_copy(const molora::MoLoRALinear<float, Weight>& half,
                                         const molora::MoLoRALinear<float>& source) {
  molora::MoLoRALinear<float> rounded = source;
  const Index in = half.in_features(), out = half.out_features();
  RowMatrix<float> w(out, in);
  for (Index o = 0; o < out; ++o)
    for (Index i = 0; i < in; ++i) w(o, i) = molora::to_float(half.base_weight_data()[o * in + i]);
  rounded.set_base_weight(w);
  return rounded;
}

template <class Weight>
void training_suite() {
  std::uint64_t seed = 400;
  for (const Index in : {1, 19, 133})
    for (const Index out : {1, 9, 70}) {
      molora::MoLoRAConfig cfg = test_util::config(in, out, 4, 2, 3);
      const auto f32 = ref::random_layer<float>(cfg, ++seed);
      molora::MoLoRALinear<float, Weight> half(cfg);
      half.adapter() = f32.adapter();
      half.set_base_weight(f32.base_weight());
      half.set_base_bias(f32.base_bias());
      const auto rounded = widened_copy(half, f32);
      // Some base weights must differ from f32's, or the test could not tell the base apart.
      if (in * out >= 100) CHECK(rounded.base_weight() != f32.base_weight());
      for (const Index T : {1, 3, 17, 130}) {
        INFO("in=", in, " out=", out, " T=", T);
        const auto x = ref::random_x<float>(T, in, seed * 31 + std::uint64_t(T));
        const auto dy = ref::random_x<float>(T, out, seed * 37 + std::uint64_t(T));
        RowMatrix<float> yh(T, out), yr(T, out), dxh(T, in), dxr(T, in);
        molora::MoLoRATape<float> th, tr;
        const molora::IdMatrix ids_h = molora::forward_train(half, x, yh, th).ids;
        const molora::IdMatrix ids_r = molora::forward_train(rounded, x, yr, tr).ids;
        CHECK(ids_h == ids_r);
        CHECK(rel_diff(yh, yr) <= 1e-5);
        // The training forward is the layer's forward.
        RowMatrix<float> y_fwd(T, out);
        molora::MoLoRAWorkspace<float> ws;
        half.forward(x, y_fwd, ws);
        CHECK(rel_diff(yh, y_fwd) <= 1e-5);

        molora::MoLoRAGrads<float> gh(half), gr(rounded);
        molora::backward(half, th, dy, gh, dxh);
        molora::backward(rounded, tr, dy, gr, dxr);
        CHECK(rel_diff(dxh, dxr) <= 1e-5);
        CHECK(test_util::same_bits(gh.A, gr.A));
        CHECK(test_util::same_bits(gh.B, gr.B));
        CHECK(test_util::same_bits(gh.router_weight, gr.router_weight));
        CHECK(test_util::same_bits(gh.router_bias, gr.router_bias));

        // Without dx (a first layer): the same parameter gradients.
        molora::MoLoRAGrads<float> g1(half);
        molora::forward_train(half, x, yh, th);
        molora::backward(half, th, dy, g1);
        CHECK(test_util::same_bits(g1.A, gh.A));
        CHECK(test_util::same_bits(g1.B, gh.B));
      }
    }
}

// dx = dy W0 in double over the widened weights, against base_backward. in = 4099 makes the
// widened block 127 rows, so out = 300 takes three blocks (127, 127, 46).
template <class Weight>
void base_backward_suite() {
  std::uint64_t seed = 900;
  for (const auto& shape : {std::pair<Index, Index>{1, 1}, {7, 33}, {129, 17}, {4099, 300}}) {
    const Index in = shape.first, out = shape.second;  // (not a structured binding: INFO captures them)
    molora::MoLoRAConfig cfg = test_util::config(in, out, 2, 1, 1);
    molora::MoLoRALinear<float, Weight> half(cfg);
    std::mt19937_64 g(++seed);
    std::uniform_real_distribution<double> u(-1.0, 1.0);
    RowMatrix<double> w(out, in);
    for (Index o = 0; o < out; ++o)
      for (Index i = 0; i < in; ++i) w(o, i) = u(g);
    half.set_base_weight(w);
    for (const Index T : {1, 5}) {
      INFO("in=", in, " out=", out, " T=", T);
      const auto dy = ref::random_x<float>(T, out, seed + std::uint64_t(T));
      RowMatrix<float> dx(T, in);
      dx.setConstant(7.0f);  // overwritten, not added to
      molora::base_backward(half, dy, dx);
      double worst = 0;
      for (Index t = 0; t < T; ++t)
        for (Index i = 0; i < in; ++i) {
          double ref = 0, mag = 0;
          for (Index o = 0; o < out; ++o) {
            const double wi = molora::to_float(half.base_weight_data()[o * in + i]);
            ref += double(dy(t, o)) * wi;
            mag += std::abs(double(dy(t, o)) * wi);
          }
          worst = std::max(worst, std::abs(double(dx(t, i)) - ref) / std::max(1.0, mag));
        }
      CHECK(worst <= 1e-6);
    }
  }
}

// A few AdamW steps through parameters(): the 16-bit layer's adapter follows the float
// layer's (holding the rounded base) bit for bit, and its base stays as it was.
template <class Weight>
void optimiser_suite() {
  const molora::MoLoRAConfig cfg = test_util::config(37, 21, 4, 2, 3);
  const auto f32 = ref::random_layer<float>(cfg, 77);
  molora::MoLoRALinear<float, Weight> half(cfg);
  half.adapter() = f32.adapter();
  half.set_base_weight(f32.base_weight());
  auto rounded = widened_copy(half, f32);
  const std::vector<std::uint16_t> base_before(reinterpret_cast<const std::uint16_t*>(half.base_weight_data()),
                                               reinterpret_cast<const std::uint16_t*>(half.base_weight_data()) + 37 * 21);
  molora::MoLoRAGrads<float> gh(half), gr(rounded);
  molora::AdamW<float> oh(molora::parameters(half, gh, "mlp.")), orr(molora::parameters(rounded, gr, "mlp."));
  CHECK(oh.parameters().size() == orr.parameters().size());
  CHECK(oh.parameters().front().name == "mlp.router.weight");
  for (int step = 0; step < 3; ++step) {
    INFO("step ", step);
    const auto x = ref::random_x<float>(9, 37, 500 + std::uint64_t(step));
    const auto dy = ref::random_x<float>(9, 21, 600 + std::uint64_t(step));
    RowMatrix<float> yh(9, 21), yr(9, 21);
    molora::MoLoRATape<float> th, tr;
    oh.zero_grad();
    orr.zero_grad();
    molora::forward_train(half, x, yh, th);
    molora::forward_train(rounded, x, yr, tr);
    molora::backward(half, th, dy, gh);
    molora::backward(rounded, tr, dy, gr);
    oh.step();
    orr.step();
    CHECK(test_util::same_bits(half.adapter().stacked_A(), rounded.adapter().stacked_A()));
    CHECK(test_util::same_bits(half.adapter().stacked_B(), rounded.adapter().stacked_B()));
    CHECK(test_util::same_bits(half.adapter().router().weight(), rounded.adapter().router().weight()));
  }
  // The adapter moved, the frozen base did not.
  CHECK(!test_util::same_bits(half.adapter().stacked_A(), f32.adapter().stacked_A()));
  CHECK(std::equal(base_before.begin(), base_before.end(),
                   reinterpret_cast<const std::uint16_t*>(half.base_weight_data())));
}

}  // namespace

TEST_CASE_TEMPLATE("AdamW through parameters() trains the adapter over a frozen 16-bit base", Weight, molora::bf16,
                   molora::f16) {
  optimiser_suite<Weight>();
}

TEST_CASE_TEMPLATE("training over a frozen 16-bit base equals the float layer holding the rounded base", Weight,
                   molora::bf16, molora::f16) {
  training_suite<Weight>();
}

TEST_CASE_TEMPLATE("base_backward of a 16-bit base matches a double loop over the widened weights", Weight,
                   molora::bf16, molora::f16) {
  base_backward_suite<Weight>();
}

TEST_CASE("base_backward of a 16-bit base names the bad shape and writes nothing") {
  molora::MoLoRALinear<float, molora::bf16> half(test_util::config(5, 3, 2, 1, 1));
  RowMatrix<float> dy(2, 4), dx(2, 5);
  dy.setOnes();
  dx.setConstant(3.0f);
  CHECK_THROWS_WITH_AS(molora::base_backward(half, dy, dx), doctest::Contains("dy shape"), molora::shape_error);
  RowMatrix<float> dy_ok(2, 3), dx_bad(2, 4);
  dy_ok.setOnes();
  dx_bad.setConstant(3.0f);
  CHECK_THROWS_WITH_AS(molora::base_backward(half, dy_ok, dx_bad), doctest::Contains("dx shape"),
                       molora::shape_error);
  CHECK((dx.array() == 3.0f).all());
  CHECK((dx_bad.array() == 3.0f).all());
}

}  // namespace test_half_training
