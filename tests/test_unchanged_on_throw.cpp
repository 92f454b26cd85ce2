// README: forward, forward_routed and the training forwards leave y unchanged when they
// throw. Each case makes the call fail on its last token, after the earlier tokens have been
// routed (a non-finite x, router logits that overflow, a bad caller routing), and checks
// that y keeps every bit it had, also when x and y are one buffer.
#include <doctest/doctest.h>

#include <cstring>
#include <limits>
#include <string>

#include <molora/molora.hpp>

#include "reference.hpp"
#include "test_util.hpp"

namespace test_unchanged_on_throw {

using molora::Index;
using molora::RowMatrix;

using test_util::config;
using test_util::same_bits;

namespace {

// x with its last token poisoned: a NaN (the layer names x), or the largest finite value,
// which overflows the router's logits when its weights are 2 (see overflowing) while x stays
// finite (the gating names the logits).
template <class Scalar>
RowMatrix<Scalar> poisoned_x(Index T, Index in, bool overflow, std::uint64_t seed) {
  RowMatrix<Scalar> x = ref::random_x<Scalar>(T, in, seed);
  if (overflow)
    x.row(T - 1).setConstant(std::numeric_limits<Scalar>::max());
  else
    x(T - 1, in / 2) = std::numeric_limits<Scalar>::quiet_NaN();
  return x;
}

// A router whose every weight is 2: a token of poisoned_x's largest values gets infinite logits.
template <class Router>
void overflowing(Router& router) {
  router.set_weight(RowMatrix<double>::Constant(router.num_experts(), router.in_features(), 2.0));
}

}  // namespace

TEST_CASE_TEMPLATE("forward and forward_train leave y bitwise unchanged when they throw", Scalar, float, double) {
  const Index shapes[][5] = {{1, 1, 1, 1, 1}, {7, 5, 3, 2, 2}, {33, 17, 4, 4, 5}, {64, 48, 8, 2, 16}};
  std::uint64_t seed = 1;
  for (const auto& s : shapes) {
    const auto cfg = config(s[0], s[1], s[2], s[3], s[4]);
    const auto random = ref::random_layer<Scalar>(cfg, seed++);
    auto constant = random;
    overflowing(constant.adapter().router());
    for (const Index T : {1, 9, 70})
      for (const bool overflow : {false, true}) {
        const auto& layer = overflow ? constant : random;
        INFO("in=", s[0], " out=", s[1], " E=", s[2], " k=", s[3], " T=", T, " overflow=", overflow);
        const RowMatrix<Scalar> x = poisoned_x<Scalar>(T, s[0], overflow, seed++);
        const RowMatrix<Scalar> y0 = ref::random_x<Scalar>(T, s[1], seed++);
        RowMatrix<Scalar> y = y0;
        molora::MoLoRAWorkspace<Scalar> ws;
        molora::MoLoRATape<Scalar> tape;
        CHECK_THROWS_AS(layer.forward(x, y, ws), molora::numeric_error);
        CHECK(same_bits(y, y0));
        CHECK_THROWS_AS(layer.adapter().add_delta(x, y, ws), molora::numeric_error);
        CHECK(same_bits(y, y0));
        CHECK_THROWS_AS(molora::forward_train(layer, x, y, tape), molora::numeric_error);
        CHECK(same_bits(y, y0));
        CHECK_THROWS_AS(molora::add_delta_train(layer.adapter(), x, y, tape), molora::numeric_error);
        CHECK(same_bits(y, y0));
        // The layer still works with the same workspace and tape afterwards.
        const RowMatrix<Scalar> x_ok = ref::random_x<Scalar>(T, s[0], seed++);
        CHECK_NOTHROW(layer.forward(x_ok, y, ws));
        CHECK_NOTHROW(molora::forward_train(layer, x_ok, y, tape));
      }
  }
}

TEST_CASE_TEMPLATE("forward_routed and the routed training forward leave y unchanged on a bad routing", Scalar, float,
                   double) {
  const auto cfg = config(19, 11, 5, 2, 3);
  const auto layer = ref::random_layer<Scalar>(cfg, 40);
  for (const Index T : {1, 8, 65}) {
    const RowMatrix<Scalar> x = ref::random_x<Scalar>(T, 19, 41);
    molora::MoLoRAWorkspace<Scalar> ws;
    molora::Routing<Scalar> routing = layer.adapter().route_tokens(x, ws);
    routing.ids(T - 1, 1) = routing.ids(T - 1, 0);  // the last token names one expert twice
    const RowMatrix<Scalar> y0 = ref::random_x<Scalar>(T, 11, 42);
    RowMatrix<Scalar> y = y0;
    molora::MoLoRATape<Scalar> tape;
    INFO("T=", T);
    CHECK_THROWS_AS(layer.forward_routed(x, routing, y, ws), molora::numeric_error);
    CHECK(same_bits(y, y0));
    CHECK_THROWS_AS(layer.adapter().add_delta_routed(x, routing, y, ws), molora::numeric_error);
    CHECK(same_bits(y, y0));
    CHECK_THROWS_AS(molora::forward_routed_train(layer, x, routing, y, tape), molora::numeric_error);
    CHECK(same_bits(y, y0));
    CHECK_THROWS_AS(molora::add_delta_routed_train(layer.adapter(), x, routing, y, tape), molora::numeric_error);
    CHECK(same_bits(y, y0));
  }
}

TEST_CASE("x and y in one buffer: a throw leaves the buffer (x and y) unchanged") {
  const auto random = ref::random_layer<double>(config(12, 12, 4, 2, 3), 50);
  auto constant = random;
  overflowing(constant.adapter().router());
  for (const bool overflow : {false, true}) {
    const auto& layer = overflow ? constant : random;
    const RowMatrix<double> x0 = poisoned_x<double>(6, 12, overflow, 51);
    RowMatrix<double> xy = x0;
    molora::MoLoRAWorkspace<double> ws;
    molora::MoLoRATape<double> tape;
    CHECK_THROWS_AS(layer.forward(xy, xy, ws), molora::numeric_error);
    CHECK(same_bits(xy, x0));
    CHECK_THROWS_AS(molora::forward_train(layer, xy, xy, tape), molora::numeric_error);
    CHECK(same_bits(xy, x0));
  }
}

TEST_CASE("MixLoRAFeedForward leaves y unchanged when it throws") {
  molora::MixLoRAFeedForwardConfig fc;
  fc.hidden_size = 10;
  fc.intermediate_size = 14;
  fc.num_experts = 4;
  fc.top_k = 2;
  fc.rank = 3;
  molora::MixLoRAFeedForward<float> ffn(fc);
  molora::Generator gen(3);
  ffn.router().init_normal(gen, 0.5);
  for (const bool overflow : {false, true}) {
    if (overflow) overflowing(ffn.router());
    const RowMatrix<float> x = poisoned_x<float>(7, 10, overflow, 60);
    const RowMatrix<float> y0 = ref::random_x<float>(7, 10, 61);
    RowMatrix<float> y = y0;
    molora::MixLoRAWorkspace<float> ws;
    CHECK_THROWS_AS(ffn.forward(x, y, ws), molora::numeric_error);
    CHECK(same_bits(y, y0));
  }
}

}  // namespace test_unchanged_on_throw
