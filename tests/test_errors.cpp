// Every bad input of the core layers, one by one: the exception type and its whole message
// (field, expected, actual), and that nothing the caller holds is changed.
#include <molora/molora.hpp>

// The core headers include no JSON library: molora::molora does not link one, only molora::io.
#ifdef NLOHMANN_JSON_VERSION_MAJOR
#error "molora/molora.hpp includes nlohmann/json.hpp: only the io headers may"
#endif

#include <doctest/doctest.h>

#include <cmath>
#include <limits>

#include "reference.hpp"

namespace test_errors {

using molora::Index;
using molora::MoLoRAConfig;
using molora::MoLoRALinear;
using molora::RowMatrix;

namespace {

MoLoRAConfig good() {
  MoLoRAConfig c;
  c.in_features = 6;
  c.out_features = 5;
  c.num_experts = 4;
  c.top_k = 2;
  c.rank = 3;
  return c;
}

template <class F>
void check_config(F&& mutate, const char* message) {
  MoLoRAConfig c = good();
  mutate(c);
  CHECK_THROWS_WITH_AS(c.validate(), message, molora::config_error);
  CHECK_THROWS_WITH_AS(MoLoRALinear<float>{c}, message, molora::config_error);
  CHECK_THROWS_WITH_AS(molora::MoLoRAAdapter<double>{c}, message, molora::config_error);
  CHECK_THROWS_AS(MoLoRALinear<float>{c}, molora::error);  // the common base
}

}  // namespace

TEST_CASE("configuration errors name the field, the expected and the actual value") {
  CHECK_NOTHROW(good().validate());
  check_config([](MoLoRAConfig& c) { c.in_features = 0; },
               "molora config error: in_features: expected a value >= 1, got 0");
  check_config([](MoLoRAConfig& c) { c.out_features = 0; },
               "molora config error: out_features: expected a value >= 1, got 0");
  check_config([](MoLoRAConfig& c) { c.rank = 0; }, "molora config error: rank: expected a value >= 1, got 0");
  check_config([](MoLoRAConfig& c) { c.num_experts = 0; },
               "molora config error: num_experts: expected a value >= 1, got 0");
  check_config([](MoLoRAConfig& c) { c.top_k = 0; }, "molora config error: top_k: expected a value >= 1, got 0");
  check_config([](MoLoRAConfig& c) { c.in_features = -3; },
               "molora config error: in_features: expected a value >= 1, got -3");
  check_config([](MoLoRAConfig& c) { c.top_k = 5; },
               "molora config error: top_k: expected a value <= num_experts (4), got 5");
  check_config([](MoLoRAConfig& c) { c.lora_alpha = 0; },
               "molora config error: lora_alpha: expected a finite value > 0, got 0");
  check_config([](MoLoRAConfig& c) { c.lora_alpha = -2; },
               "molora config error: lora_alpha: expected a finite value > 0, got -2");
  check_config([](MoLoRAConfig& c) { c.lora_alpha = INFINITY; },
               "molora config error: lora_alpha: expected a finite value > 0, got inf");
  check_config([](MoLoRAConfig& c) { c.lora_alpha = std::nan(""); },
               "molora config error: lora_alpha: expected a finite value > 0, got nan");
  check_config([](MoLoRAConfig& c) { c.selection = static_cast<molora::Selection>(7); },
               "molora config error: selection: expected top_k or sampling, got 7");
}

TEST_CASE("x with the wrong width and y of the wrong shape are rejected; y is untouched") {
  const auto l = ref::random_layer<float>(good(), 1);
  MoLoRALinear<float>::Workspace ws;
  RowMatrix<float> y = RowMatrix<float>::Constant(3, 5, 42.f);
  const RowMatrix<float> x_wide = RowMatrix<float>::Ones(3, 7);
  CHECK_THROWS_WITH_AS(l.forward(x_wide, y, ws), "molora shape error: x columns (in_features): expected 6, got 7",
                       molora::shape_error);
  CHECK_THROWS_WITH_AS(l.adapter().add_delta(x_wide, y, ws),
                       "molora shape error: x columns (in_features): expected 6, got 7", molora::shape_error);
  CHECK_THROWS_WITH_AS(l.adapter().route_tokens(x_wide, ws),
                       "molora shape error: x columns (in_features): expected 6, got 7", molora::shape_error);
  const RowMatrix<float> x = RowMatrix<float>::Ones(3, 6);
  RowMatrix<float> y_rows = RowMatrix<float>::Constant(2, 5, 42.f), y_cols = RowMatrix<float>::Constant(3, 4, 42.f);
  CHECK_THROWS_WITH_AS(l.forward(x, y_rows, ws), "molora shape error: y shape: expected [3, 5], got [2, 5]",
                       molora::shape_error);
  CHECK_THROWS_WITH_AS(l.forward(x, y_cols, ws), "molora shape error: y shape: expected [3, 5], got [3, 4]",
                       molora::shape_error);
  CHECK_THROWS_WITH_AS(l.adapter().add_delta(x, y_cols, ws), "molora shape error: y shape: expected [3, 5], got [3, 4]",
                       molora::shape_error);
  CHECK_THROWS_AS(l.forward_base(x, y_cols), molora::shape_error);
  CHECK((y.array() == 42.f).all());
  CHECK((y_cols.array() == 42.f).all());
}

TEST_CASE("weights of the wrong shape, or non-finite, are rejected when set or wrapped; the layer is unchanged") {
  auto l = ref::random_layer<double>(good(), 2);
  const auto before = l;
  CHECK_THROWS_WITH_AS(l.set_base_weight(RowMatrix<double>::Ones(6, 5)),
                       "molora shape error: base weight: expected [5, 6], got [6, 5]", molora::shape_error);
  CHECK_THROWS_WITH_AS(l.set_base_bias(RowMatrix<double>::Ones(1, 6)),
                       "molora shape error: base bias: expected [5], got [1, 6]", molora::shape_error);
  CHECK_THROWS_WITH_AS(l.adapter().router().set_weight(RowMatrix<double>::Ones(3, 6)),
                       "molora shape error: router.weight: expected [4, 6], got [3, 6]", molora::shape_error);
  CHECK_THROWS_WITH_AS(l.adapter().router().set_bias(RowMatrix<double>::Ones(1, 5)),
                       "molora shape error: router.bias: expected [4], got [1, 5]", molora::shape_error);
  CHECK_THROWS_WITH_AS(l.adapter().set_expert_A(1, RowMatrix<double>::Ones(3, 5)),
                       "molora shape error: expert lora_A.weight: expected [3, 6], got [3, 5]", molora::shape_error);
  CHECK_THROWS_WITH_AS(l.adapter().set_expert_B(1, RowMatrix<double>::Ones(3, 5)),
                       "molora shape error: expert lora_B.weight: expected [5, 3], got [3, 5]", molora::shape_error);
  CHECK_THROWS_WITH_AS(l.adapter().set_expert_A(4, RowMatrix<double>::Ones(3, 6)),
                       "molora shape error: expert index: expected [0, 4), got 4", molora::shape_error);
  CHECK_THROWS_WITH_AS(l.adapter().expert_B(-1), "molora shape error: expert index: expected [0, 4), got -1",
                       molora::shape_error);
  std::vector<double> host(30);
  CHECK_THROWS_WITH_AS(l.wrap_base_weight(Eigen::Map<const RowMatrix<double>>(host.data(), 6, 5)),
                       "molora shape error: wrapped base weight: expected [5, 6], got [6, 5]", molora::shape_error);
  RowMatrix<double> nan_w = RowMatrix<double>::Ones(5, 6);
  nan_w(4, 2) = std::nan("");
  CHECK_THROWS_WITH_AS(l.set_base_weight(nan_w), "molora numeric error: base weight: expected finite values, got nan at [4, 2]",
                       molora::numeric_error);
  RowMatrix<double> inf_a = RowMatrix<double>::Ones(3, 6);
  inf_a(0, 0) = -INFINITY;
  CHECK_THROWS_WITH_AS(l.adapter().set_expert_A(0, inf_a),
                       "molora numeric error: expert lora_A.weight: expected finite values, got -inf at [0, 0]",
                       molora::numeric_error);
  CHECK_THROWS_AS(l.adapter().router().set_weight(RowMatrix<double>::Constant(4, 6, INFINITY)), molora::numeric_error);
  const RowMatrix<double> x = ref::random_x<double>(4, 6, 3);
  CHECK(l.forward(x) == before.forward(x));
}

TEST_CASE("caller routing with a bad id, a repeated expert or a non-finite weight is rejected; y untouched") {
  const auto l = ref::random_layer<float>(good(), 4);
  const RowMatrix<float> x = ref::random_x<float>(2, 6, 5);
  MoLoRALinear<float>::Workspace ws;
  molora::Routing<float> r;
  r.resize(2, 2);
  r.ids << 0, 1, 2, 3;
  r.weights << 0.5f, 0.5f, 0.5f, 0.5f;
  RowMatrix<float> y = RowMatrix<float>::Constant(2, 5, 42.f);
  CHECK_NOTHROW(l.forward_routed(x, r, y, ws));
  y.setConstant(42.f);
  r.ids(1, 1) = 4;
  CHECK_THROWS_WITH_AS(l.forward_routed(x, r, y, ws),
                       "molora numeric error: routing.ids of token 1 slot 1: expected an expert id in [0, 4), got 4",
                       molora::numeric_error);
  r.ids(1, 1) = 2;
  CHECK_THROWS_WITH_AS(l.adapter().add_delta_routed(x, r, y, ws),
                       "molora numeric error: routing.ids of token 1: expected distinct experts, got expert 2 in slots 0 and 1",
                       molora::numeric_error);
  r.ids(1, 1) = 3;
  r.weights(0, 0) = std::nanf("");
  CHECK_THROWS_WITH_AS(l.forward_routed(x, r, y, ws),
                       "molora numeric error: routing.weights of token 0 slot 0: expected a finite value, got nan",
                       molora::numeric_error);
  CHECK((y.array() == 42.f).all());
}

TEST_CASE("non-finite router logits are reported with the token; output untouched") {
  const auto l = ref::random_layer<float>(good(), 6);
  MoLoRALinear<float>::Workspace ws;
  RowMatrix<float> y = RowMatrix<float>::Constant(5, 5, 42.f);
  // A non-finite x is named as x (forward_routed says the same, having no logits).
  RowMatrix<float> x = ref::random_x<float>(5, 6, 7);
  x(3, 2) = INFINITY;
  const char* x_message = "molora numeric error: x of token 3: expected finite values, got inf at column 2";
  CHECK_THROWS_WITH_AS(l.adapter().add_delta(x, y, ws), x_message, molora::numeric_error);
  CHECK((y.array() == 42.f).all());
  CHECK_THROWS_WITH_AS(l.forward(x, y, ws), x_message, molora::numeric_error);
  CHECK((y.array() == 42.f).all());
  // A finite x whose logits overflow is named by its logits.
  auto big = l;
  big.adapter().router().set_weight(RowMatrix<float>::Constant(4, 6, 1.f));
  x.row(3).setConstant(1e38f);  // logit 6e38 overflows float
  try {
    big.forward(x, y, ws);
    FAIL("expected a numeric_error");
  } catch (const molora::numeric_error& e) {
    CHECK(std::string(e.what()).rfind("molora numeric error: router logits of token 3: expected finite values, got ", 0) == 0);
  }
  CHECK((y.array() == 42.f).all());
}

TEST_CASE("T = 0 is a valid empty batch") {
  const auto l = ref::random_layer<float>(good(), 8);
  MoLoRALinear<float>::Workspace ws;
  RowMatrix<float> x(0, 6), y(0, 5);
  const auto& r = l.forward(x, y, ws);
  CHECK(r.num_tokens() == 0);
  CHECK(r.top_k() == 2);
  CHECK(l.forward(x).rows() == 0);
  l.adapter().add_delta(x, y, ws);
  molora::Routing<float> empty;
  empty.resize(0, 2);
  l.forward_routed(x, empty, y, ws);
  // the wrong width is still wrong when empty
  RowMatrix<float> x7(0, 7);
  CHECK_THROWS_AS(l.forward(x7, y, ws), molora::shape_error);
}

TEST_CASE_TEMPLATE("require_finite_tokens: every non-finite value found, at any column of any width", Scalar, float, double) {
  // The check sums x * 0 per row: a value at any lane or tail position, inf, -inf or NaN,
  // must make it throw naming that token and column; huge and tiny finite values must not.
  const Scalar specials[] = {std::numeric_limits<Scalar>::infinity(), -std::numeric_limits<Scalar>::infinity(),
                             std::numeric_limits<Scalar>::quiet_NaN()};
  for (Index cols : {1, 3, 7, 8, 15, 16, 17, 31, 33, 64, 100}) {
    RowMatrix<Scalar> x = RowMatrix<Scalar>::Random(3, cols);
    x(0, 0) = std::numeric_limits<Scalar>::max();
    x(1, cols - 1) = -std::numeric_limits<Scalar>::max();
    x(2, cols / 2) = std::numeric_limits<Scalar>::denorm_min();
    molora::ConstRowRef<Scalar> clean(x);
    CHECK_NOTHROW(molora::detail::require_finite_tokens(clean));
    for (Index t = 0; t < 3; ++t)
      for (Index j = 0; j < cols; ++j)
        for (Scalar v : specials) {
          RowMatrix<Scalar> bad = x;
          bad(t, j) = v;
          molora::ConstRowRef<Scalar> br(bad);
          CAPTURE(cols);
          CAPTURE(t);
          CAPTURE(j);
          const std::string want =
              molora::detail::cat("x of token ", t, ": expected finite values, got ", v, " at column ", j);
          CHECK_THROWS_WITH_AS(molora::detail::require_finite_tokens(br), doctest::Contains(want.c_str()),
                               molora::numeric_error);
        }
  }
}

}  // namespace test_errors
