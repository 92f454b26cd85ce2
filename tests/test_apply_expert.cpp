// MoLoRAAdapter::apply_expert (one expert on rows the caller chose, each with its own scale)
// against the loop-by-loop double reference, bit for bit against add_delta_routed with the
// equivalent one-expert routing, and its error cases. The in-use check is on so that the
// workspace case runs in every build.
#ifndef MOLORA_CHECK_WORKSPACE  // also set for the program this file is compiled into
#define MOLORA_CHECK_WORKSPACE
#endif
#include <doctest/doctest.h>

#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include <molora/molora.hpp>

#include "reference.hpp"
#include "test_util.hpp"

namespace test_apply_expert {

using molora::Index;
using molora::RowMatrix;
using molora::Strategy;

using test_util::config;
using test_util::message_of;
using test_util::same_bits;

namespace {

template <class Scalar>
Eigen::Matrix<Scalar, Eigen::Dynamic, 1> random_scales(Index n, std::uint64_t seed) {
  const auto m = ref::random_x<Scalar>(n, 1, seed);
  return m.col(0);
}


}  // namespace

TEST_CASE_TEMPLATE("apply_expert matches the double reference for every strategy and shape", Scalar, float, double) {
  const double tol = std::is_same_v<Scalar, float> ? 2e-5 : 1e-12;
  // in, out, E, r: ones, odd sizes, sizes that are not multiples of any SIMD width.
  const Index shapes[][4] = {{1, 1, 1, 1}, {7, 5, 3, 1}, {33, 17, 4, 5}, {64, 48, 8, 16}, {129, 67, 2, 3}, {300, 200, 5, 17}};
  std::uint64_t seed = 100;
  for (const auto& s : shapes) {
    auto layer = ref::random_layer<Scalar>(config(s[0], s[1], s[2], 1, s[3]), seed++);
    const ref::Layer L = ref::from_layer(layer);
    for (const Strategy st : {Strategy::automatic, Strategy::eigen, Strategy::dense_shrink, Strategy::fused}) {
      layer.set_strategy(st);
      for (const Index n : {1, 3, 8, 9, 70}) {
        const Index e = (n + s[2] - 1) % s[2];
        const auto x = ref::random_x<Scalar>(n, s[0], seed++);
        const auto scales = random_scales<Scalar>(n, seed++);
        RowMatrix<Scalar> y = ref::random_x<Scalar>(n, s[1], seed++);
        const ref::Mat y0 = ref::from_eigen(y);
        molora::MoLoRAWorkspace<Scalar> ws;
        layer.adapter().apply_expert(e, x, y, scales, ws);
        ref::Mat want = y0;
        const ref::Mat X = ref::from_eigen(x);
        for (Index i = 0; i < n; ++i) {
          const auto d = ref::delta(L, X[std::size_t(i)], {int(e)}, {double(scales(i))});
          for (Index o = 0; o < s[1]; ++o) want[std::size_t(i)][std::size_t(o)] += d[std::size_t(o)];
        }
        INFO("in=", s[0], " out=", s[1], " E=", s[2], " r=", s[3], " n=", n, " e=", e, " strategy=",
             std::string(molora::to_string(st)));
        CHECK(ref::rel_err(y, want) < tol);
      }
    }
  }
}

TEST_CASE_TEMPLATE("apply_expert equals add_delta_routed with the one-expert routing, bit for bit", Scalar, float,
                   double) {
  auto layer = ref::random_layer<Scalar>(config(45, 31, 5, 2, 7), 7);
  for (const Strategy st : {Strategy::automatic, Strategy::eigen, Strategy::fused})
    for (const Index n : {1, 13, 64}) {
      layer.set_strategy(st);
      const Index e = n % 5;
      const auto x = ref::random_x<Scalar>(n, 45, 8 + std::uint64_t(n));
      const auto scales = random_scales<Scalar>(n, 9);
      molora::Routing<Scalar> one;
      one.resize(n, 1);
      one.ids.setConstant(static_cast<std::int32_t>(e));
      one.weights = scales;
      RowMatrix<Scalar> y1 = ref::random_x<Scalar>(n, 31, 10), y2 = y1;
      molora::MoLoRAWorkspace<Scalar> ws;
      layer.adapter().apply_expert(e, x, y1, scales, ws);
      layer.adapter().add_delta_routed(x, one, y2, ws);
      INFO("strategy=", std::string(molora::to_string(st)), " n=", n);
      CHECK(same_bits(y1, y2));
    }
}

TEST_CASE("apply_expert: rows of a block, scales as a row, x and y in one buffer") {
  auto layer = ref::random_layer<double>(config(6, 6, 3, 1, 2), 21);
  const ref::Layer L = ref::from_layer(layer);
  RowMatrix<double> buf = ref::random_x<double>(10, 6, 22);
  const ref::Mat X = ref::from_eigen(buf);
  const RowMatrix<double> scales = ref::random_x<double>(1, 4, 23);  // [1, 4]
  molora::MoLoRAWorkspace<double> ws;
  // Rows 3..6 of buf are both x and y: x is read before y is written.
  layer.adapter().apply_expert(2, buf.middleRows(3, 4), buf.middleRows(3, 4), scales, ws);
  for (Index i = 0; i < 10; ++i) {
    std::vector<double> want = X[std::size_t(i)];
    if (i >= 3 && i < 7) {
      const auto d = ref::delta(L, X[std::size_t(i)], {2}, {scales(0, i - 3)});
      for (Index o = 0; o < 6; ++o) want[std::size_t(o)] += d[std::size_t(o)];
    }
    for (Index o = 0; o < 6; ++o) CHECK(buf(i, o) == doctest::Approx(want[std::size_t(o)]).epsilon(1e-12));
  }
  // n = 0 does nothing and throws nothing.
  RowMatrix<double> none(0, 6);
  CHECK_NOTHROW(layer.adapter().apply_expert(0, none, none, Eigen::VectorXd(0), ws));
}

TEST_CASE("apply_expert: bad arguments throw, naming the field, and leave y unchanged") {
  auto layer = ref::random_layer<float>(config(6, 5, 4, 2, 3), 31);
  const auto& a = layer.adapter();
  const auto x = ref::random_x<float>(3, 6, 32);
  const Eigen::VectorXf scales = Eigen::VectorXf::Ones(3);
  RowMatrix<float> y = ref::random_x<float>(3, 5, 33);
  const RowMatrix<float> y0 = y;
  molora::MoLoRAWorkspace<float> ws;

  CHECK(message_of<molora::shape_error>([&] { a.apply_expert(4, x, y, scales, ws); }) ==
        "molora shape error: expert index: expected [0, 4), got 4");
  CHECK(message_of<molora::shape_error>([&] { a.apply_expert(-1, x, y, scales, ws); }) ==
        "molora shape error: expert index: expected [0, 4), got -1");
  const auto x7 = ref::random_x<float>(3, 7, 34);
  CHECK(message_of<molora::shape_error>([&] { a.apply_expert(0, x7, y, scales, ws); }) ==
        "molora shape error: x columns (in_features): expected 6, got 7");
  RowMatrix<float> y_short(2, 5);
  CHECK(message_of<molora::shape_error>([&] { a.apply_expert(0, x, y_short, scales, ws); }) ==
        "molora shape error: y shape: expected [3, 5], got [2, 5]");
  CHECK(message_of<molora::shape_error>([&] { a.apply_expert(0, x, y, Eigen::VectorXf::Ones(2), ws); }) ==
        "molora shape error: scales: expected [3], got [2, 1]");
  CHECK(message_of<molora::shape_error>([&] { a.apply_expert(0, x, y, RowMatrix<float>::Ones(3, 2), ws); }) ==
        "molora shape error: scales: expected [3], got [3, 2]");
  Eigen::VectorXf bad_scales = scales;
  bad_scales(2) = std::numeric_limits<float>::infinity();
  CHECK(message_of<molora::numeric_error>([&] { a.apply_expert(0, x, y, bad_scales, ws); }) ==
        "molora numeric error: scales: expected finite values, got inf at [2, 0]");
  RowMatrix<float> x_nan = x;
  x_nan(2, 4) = std::numeric_limits<float>::quiet_NaN();
  CHECK(message_of<molora::numeric_error>([&] { a.apply_expert(1, x_nan, y, scales, ws); }) ==
        "molora numeric error: x of token 2: expected finite values, got nan at column 4");
  CHECK(same_bits(y, y0));

  // A workspace another call holds.
  ws.in_use.try_acquire();
  CHECK_THROWS_AS(a.apply_expert(0, x, y, scales, ws), molora::state_error);
  ws.in_use.release();
  // A moved-from adapter.
  auto adapter = layer.adapter();
  const auto taken = std::move(adapter);
  CHECK_THROWS_AS(adapter.apply_expert(0, x, y, scales, ws), molora::state_error);
  CHECK(same_bits(y, y0));
  CHECK_NOTHROW(a.apply_expert(0, x, y, scales, ws));
  CHECK_FALSE(same_bits(y, y0));
}

}  // namespace test_apply_expert
