// Misuse of the public API, one case per kind: each must throw a molora::error (the exact
// subclass, a message naming the field and the values) in every build, never read or write
// outside a buffer, and leave the caller's output unchanged. Run under ASan+UBSan in CI.
//
// The workspace in-use check is on here even in a Release build (it is off by default with
// NDEBUG), so that its test runs in every configuration.
#ifndef MOLORA_CHECK_WORKSPACE  // also set for the program this file is compiled into
#define MOLORA_CHECK_WORKSPACE
#endif
#include <doctest/doctest.h>

#include <cmath>
#include <limits>
#include <string>
#include <utility>
#include <vector>

#include <molora/molora.hpp>

#include "reference.hpp"
#include "test_util.hpp"

namespace test_misuse {

using molora::Index;
using molora::MoLoRAConfig;
using molora::MoLoRALinear;
using molora::RowMatrix;
using test_util::message_of;

namespace {

MoLoRAConfig small(Index rank = 3) {
  MoLoRAConfig c;
  c.in_features = 6;
  c.out_features = 5;
  c.num_experts = 4;
  c.top_k = 2;
  c.rank = rank;
  return c;
}

bool contains(const std::string& s, const std::string& part) { return s.find(part) != std::string::npos; }

}  // namespace

TEST_CASE("lora_alpha must give a normal scaling in the layer's scalar type") {
  MoLoRAConfig c = small(3);
  c.lora_alpha = 2e39;  // finite in double; 2e39 / 3 overflows float
  CHECK_NOTHROW(c.validate());
  CHECK_NOTHROW(MoLoRALinear<double>{c});
  const std::string m = message_of<molora::config_error>([&] { MoLoRALinear<float>{c}; });
  CHECK(m ==
        "molora config error: lora_alpha: expected a value in [3.52648e-38, 1.02085e+39] (scaling lora_alpha / rank "
        "must be a normal float), got 2e+39");
  CHECK_THROWS_AS(molora::MoLoRAAdapter<float>{c}, molora::config_error);
  CHECK_THROWS_WITH_AS(molora::LoRA<float>(6, 5, 3, 2e39), m.c_str(), molora::config_error);

  // Too small: 1e-300 / 3 is zero in float, a normal double.
  c.lora_alpha = 1e-300;
  CHECK_NOTHROW(MoLoRALinear<double>{c});
  const std::string tiny = message_of<molora::config_error>([&] { MoLoRALinear<float>{c}; });
  CHECK(contains(tiny, "lora_alpha: expected a value in [3.52648e-38, "));
  CHECK(contains(tiny, "got 1e-300"));
  CHECK_THROWS_AS(molora::LoRA<float>(6, 5, 3, 1e-300), molora::config_error);
  // A subnormal double scaling is refused in a double layer too.
  c.lora_alpha = 1e-310;
  CHECK_THROWS_AS(MoLoRALinear<double>{c}, molora::config_error);
  CHECK_THROWS_AS(molora::LoRA<double>(6, 5, 3, 1e-310), molora::config_error);

  // rsLoRA divides by sqrt(r) = 2: 7e38 / 2 overflows float.
  MoLoRAConfig rs = small(4);
  rs.use_rslora = true;
  rs.lora_alpha = 7e38;
  const std::string mr = message_of<molora::config_error>([&] { MoLoRALinear<float>{rs}; });
  CHECK(contains(mr, "lora_alpha / sqrt(rank) must be a normal float"));
  CHECK(contains(mr, "got 7e+38"));
  CHECK_THROWS_AS(molora::LoRA<float>(6, 5, 4, 7e38, true), molora::config_error);

  molora::MixLoRAFeedForwardConfig f;
  f.hidden_size = 6;
  f.intermediate_size = 10;
  f.num_experts = 4;
  f.rank = 3;
  f.lora_alpha = 2e39;
  CHECK_THROWS_WITH_AS(molora::MixLoRAFeedForward<float>{f}, m.c_str(), molora::config_error);
  CHECK_NOTHROW(molora::MixLoRAFeedForward<double>{f});

  // A usual alpha still gives a finite forward.
  c.lora_alpha = 3.0;
  const auto l = ref::random_layer<float>(c, 1);
  CHECK(l.forward(ref::random_x<float>(3, 6, 2)).allFinite());
}

TEST_CASE("backward validates the tape against the layer before touching memory") {
  const MoLoRAConfig c = small(3);
  const auto layer = ref::random_layer<double>(c, 3);
  const RowMatrix<double> x = ref::random_x<double>(7, 6, 4);
  RowMatrix<double> y(7, 5);
  molora::MoLoRATape<double> tape;
  molora::forward_train(layer, x, y, tape);
  const RowMatrix<double> dy = ref::random_x<double>(7, 5, 5);

  // A layer of another rank: the tape's h has 3 columns, this layer's experts 5.
  const auto wide = ref::random_layer<double>(small(5), 6);
  molora::MoLoRAGrads<double> g(wide);
  RowMatrix<double> dx = RowMatrix<double>::Constant(7, 6, 42.0);
  CHECK_THROWS_WITH_AS(molora::backward(wide, tape, dy, g, dx),
                       "molora shape error: tape.hidden shape (pairs, rank): expected [14, 5], got [14, 3]",
                       molora::shape_error);
  CHECK((dx.array() == 42.0).all());  // checked before the base's dx is written
  CHECK((g.A.array() == 0.0).all());
  CHECK_THROWS_AS(molora::add_backward(wide.adapter(), tape, dy, g, dx), molora::shape_error);
  CHECK_THROWS_AS(molora::backward(wide, tape, dy, g), molora::shape_error);

  // More experts.
  MoLoRAConfig c6 = small(3);
  c6.num_experts = 6;
  const auto more = ref::random_layer<double>(c6, 7);
  molora::MoLoRAGrads<double> g6(more);
  CHECK_THROWS_WITH_AS(molora::backward(more, tape, dy, g6, dx),
                       "molora shape error: tape.plan experts (num_experts): expected 6, got 4", molora::shape_error);

  // Another in_features.
  MoLoRAConfig c8 = small(3);
  c8.in_features = 8;
  const auto in8 = ref::random_layer<double>(c8, 8);
  molora::MoLoRAGrads<double> g8(in8);
  RowMatrix<double> dx8(7, 8);
  CHECK_THROWS_WITH_AS(molora::backward(in8, tape, dy, g8, dx8),
                       "molora shape error: tape.x columns (in_features): expected 8, got 6", molora::shape_error);

  // Another T (dy of 9 rows), and a tape whose routing was recorded for fewer experts per
  // token than its plan claims (a tape edited by hand).
  molora::MoLoRAGrads<double> gl(layer);
  CHECK_THROWS_WITH_AS(molora::backward(layer, tape, RowMatrix<double>::Zero(9, 5), gl, dx),
                       "molora shape error: dy shape: expected [7, 5], got [9, 5]", molora::shape_error);
  molora::MoLoRATape<double> edited = tape;
  edited.routing.resize(7, 1);
  edited.routing.ids.setZero();
  edited.routing.weights.setOnes();
  CHECK_THROWS_WITH_AS(molora::backward(layer, edited, dy, gl, dx),
                       "molora shape error: tape.plan pairs (tokens * top_k): expected 7, got 14", molora::shape_error);
  CHECK((dx.array() == 42.0).all());

  // A never-recorded tape.
  molora::MoLoRATape<double> empty;
  CHECK_THROWS_AS(molora::backward(layer, empty, dy, gl, dx), molora::shape_error);

  // The right layer still works with the same tape.
  CHECK_NOTHROW(molora::backward(layer, tape, dy, gl, dx));

  // Plain LoRA: a tape from a LoRA of another rank.
  molora::LoRA<double> l3(6, 5, 3, 6.0), l5(6, 5, 5, 6.0);
  molora::LoRATape<double> lt;
  RowMatrix<double> ly = RowMatrix<double>::Zero(7, 5);
  molora::add_delta_train(l3, x, ly, lt);
  molora::LoRAGrads<double> lg(l5);
  RowMatrix<double> ldx = RowMatrix<double>::Zero(7, 6);
  CHECK_THROWS_WITH_AS(molora::add_backward(l5, lt, dy, lg, ldx),
                       "molora shape error: tape.hidden shape (tokens, rank): expected [7, 5], got [7, 3]",
                       molora::shape_error);
}

TEST_CASE("public functions check their arguments in every build") {
  using molora::GatingOptions;
  const RowMatrix<float> logits = ref::random_x<float>(3, 4, 9);
  molora::Routing<float> r;
  std::vector<float> scratch(8);
  const auto route_into = [&](const RowMatrix<float>& l, const GatingOptions& o) {
    molora::route<float, molora::Generator>(l, o, r, nullptr, scratch.data());
  };

  // route(): top_k 0, top_k > E, E = 0, E disagreeing with the logits.
  GatingOptions opt{4, 0, true, molora::Selection::top_k};
  CHECK_THROWS_WITH_AS(route_into(logits, opt),
                       "molora config error: top_k: expected a value in [1, num_experts (4)], got 0",
                       molora::config_error);
  opt.top_k = 5;
  CHECK_THROWS_WITH_AS(molora::route<float>(logits, opt),
                       "molora config error: top_k: expected a value in [1, num_experts (4)], got 5",
                       molora::config_error);
  const RowMatrix<float> none(3, 0);
  GatingOptions zero{0, 1, true, molora::Selection::top_k};
  CHECK_THROWS_WITH_AS(route_into(none, zero),
                       "molora config error: num_experts: expected a value >= 1, got 0", molora::config_error);
  GatingOptions six{6, 2, true, molora::Selection::top_k};
  CHECK_THROWS_WITH_AS(route_into(logits, six),
                       "molora shape error: router logits columns (num_experts): expected 6, got 4",
                       molora::shape_error);

  // softmax_rows: probs of another shape, logits without columns.
  RowMatrix<float> probs = RowMatrix<float>::Constant(3, 3, 7.f);
  CHECK_THROWS_WITH_AS(molora::softmax_rows<float>(logits, probs),
                       "molora shape error: softmax probs: expected [3, 4], got [3, 3]", molora::shape_error);
  CHECK((probs.array() == 7.f).all());
  RowMatrix<float> probs0(3, 0);
  CHECK_THROWS_WITH_AS(molora::softmax_rows<float>(none, probs0),
                       "molora shape error: softmax logits columns: expected a value >= 1, got 0", molora::shape_error);

  // Router: x of the wrong width, out of the wrong shape; the expression form too.
  molora::Router<float> router(6, 4, true);
  const RowMatrix<float> x5 = ref::random_x<float>(3, 5, 10), x6 = ref::random_x<float>(3, 6, 11);
  RowMatrix<float> out(3, 4);
  CHECK_THROWS_WITH_AS(router.logits_into(x5, out),
                       "molora shape error: router x columns (in_features): expected 6, got 5", molora::shape_error);
  RowMatrix<float> out_small = RowMatrix<float>::Constant(2, 4, 7.f);
  CHECK_THROWS_WITH_AS(router.logits_into(x6, out_small),
                       "molora shape error: router logits: expected [3, 4], got [2, 4]", molora::shape_error);
  CHECK((out_small.array() == 7.f).all());
  CHECK_THROWS_AS(router.logits(x5), molora::shape_error);
  CHECK_NOTHROW(router.logits_into(x6, out));

  // LoRA::delta: checked when the expression is made.
  const molora::LoRA<float> lora(6, 5, 2, 4.0);
  CHECK_THROWS_WITH_AS(lora.delta(x5), "molora shape error: x columns (in_features): expected 6, got 5",
                       molora::shape_error);
  CHECK(RowMatrix<float>(lora.delta(x6)).rows() == 3);

  // DispatchPlan::build: an expert id out of range.
  molora::Routing<float> bad;
  bad.resize(2, 1);
  bad.ids << 0, 4;
  bad.weights.setOnes();
  molora::DispatchPlan<float> plan;
  CHECK_THROWS_WITH_AS(plan.build(bad, 4),
                       "molora numeric error: routing.ids of token 1 slot 0: expected an expert id in [0, 4), got 4",
                       molora::numeric_error);

  // Parameter views in the other element order; gradient blocks of a missing expert.
  auto layer = ref::random_layer<float>(small(3), 12);
  molora::MoLoRAGrads<float> grads(layer);
  auto params = molora::parameters(layer, grads);
  CHECK_THROWS_WITH_AS(params[0].shaped_col_major(),
                       "molora shape error: router.weight element order: expected column-major, got row-major",
                       molora::shape_error);
  CHECK_THROWS_AS(params.back().shaped_row_major(), molora::shape_error);
  CHECK_THROWS_WITH_AS(grads.expert_A(4), "molora shape error: expert index: expected [0, 4), got 4",
                       molora::shape_error);
  CHECK(grads.expert_B(3).cols() == 3);
}

TEST_CASE("a moved-from layer, adapter, LoRA or MixLoRA block throws state_error naming it") {
  const MoLoRAConfig c = small(3);
  const RowMatrix<float> x = ref::random_x<float>(4, 6, 13);
  RowMatrix<float> y = RowMatrix<float>::Constant(4, 5, 42.f);
  MoLoRALinear<float>::Workspace ws;

  auto layer = ref::random_layer<float>(c, 14);
  const auto taken = std::move(layer);
  CHECK_THROWS_WITH_AS(layer.forward(x, y, ws),
                       "molora state error: MoLoRALinear: expected a live layer with base weight [5, 6], got a "
                       "moved-from one with base weight [0, 0]",
                       molora::state_error);
  CHECK((y.array() == 42.f).all());
  CHECK_THROWS_AS(layer.forward_base(x, y), molora::state_error);
  CHECK_THROWS_AS(layer.base_weight(), molora::state_error);
  molora::MoLoRATape<float> tape;
  CHECK_THROWS_AS(molora::forward_train(layer, x, y, tape), molora::state_error);
  CHECK((y.array() == 42.f).all());
  CHECK_NOTHROW(taken.forward(x, y, ws));
  y.setConstant(42.f);

  // Move assignment leaves the source with the target's old weights under its own config.
  MoLoRAConfig c8 = small(3);
  c8.in_features = 8;
  auto target = ref::random_layer<float>(c, 15);
  auto source = ref::random_layer<float>(c8, 16);
  target = std::move(source);
  RowMatrix<float> y8 = RowMatrix<float>::Constant(4, 5, 42.f);
  CHECK_THROWS_AS(source.forward(ref::random_x<float>(4, 8, 17), y8, ws), molora::state_error);
  CHECK((y8.array() == 42.f).all());

  molora::MoLoRAAdapter<float> adapter(c);
  const auto adapter2 = std::move(adapter);
  CHECK_THROWS_WITH_AS(adapter.add_delta(x, y, ws),
                       "molora state error: MoLoRAAdapter: expected a live adapter with stacked A [12, 6], got a "
                       "moved-from one with stacked A [0, 0]",
                       molora::state_error);
  CHECK_THROWS_AS(adapter.route_tokens(x, ws), molora::state_error);
  CHECK((y.array() == 42.f).all());
  CHECK_THROWS_AS(adapter.set_expert_A(0, RowMatrix<float>::Zero(3, 6)), molora::state_error);
  molora::MoLoRAGrads<float> grads(adapter2);
  CHECK_THROWS_AS(molora::parameters(adapter, grads), molora::state_error);

  molora::LoRA<float> lora(6, 5, 3, 6.0);
  const auto lora2 = std::move(lora);
  CHECK_THROWS_WITH_AS(lora.delta(x),
                       "molora state error: LoRA: expected a live adapter with lora_A [3, 6], got a moved-from one "
                       "with lora_A [0, 0]",
                       molora::state_error);
  molora::LoRATape<float> lt;
  CHECK_THROWS_AS(molora::add_delta_train(lora, x, y, lt), molora::state_error);
  molora::LoRAGrads<float> lgrads(lora2);
  CHECK_THROWS_AS(molora::parameters(lora, lgrads), molora::state_error);
  CHECK((y.array() == 42.f).all());

  molora::MixLoRAFeedForwardConfig f;
  f.hidden_size = 6;
  f.intermediate_size = 10;
  f.num_experts = 4;
  f.rank = 3;
  molora::MixLoRAFeedForward<float> ffn(f);
  const auto ffn2 = std::move(ffn);
  molora::MixLoRAFeedForward<float>::Workspace fws;
  RowMatrix<float> fy = RowMatrix<float>::Constant(4, 6, 42.f);
  CHECK_THROWS_WITH_AS(ffn.forward(x, fy, fws),
                       "molora state error: MixLoRAFeedForward: expected a live block with gate_proj.weight [10, 6], "
                       "got a moved-from one with gate_proj.weight [0, 0]",
                       molora::state_error);
  CHECK((fy.array() == 42.f).all());
  CHECK_THROWS_AS(ffn.forward(x, fy, fws), molora::error);  // the common base
}

TEST_CASE("x and y sharing memory through a negative stride are seen to overlap") {
  MoLoRAConfig c = small(3);
  c.out_features = 6;  // x and y of the same width, rows of one buffer
  const auto layer = ref::random_layer<float>(c, 18);
  using View = Eigen::Map<RowMatrix<float>, 0, Eigen::OuterStride<>>;
  using ConstView = Eigen::Map<const RowMatrix<float>, 0, Eigen::OuterStride<>>;
  std::vector<float> buf(60);
  const RowMatrix<float> init = ref::random_x<float>(10, 6, 19);
  std::copy(init.data(), init.data() + 60, buf.begin());

  // y is rows 0, 1, 2 of the buffer; x walks rows 6, 4, 2 backwards: x's last row is y's last.
  View y(buf.data(), 3, 6, Eigen::OuterStride<>(6));
  ConstView x(buf.data() + 36, 3, 6, Eigen::OuterStride<>(-12));
  CHECK(molora::detail::overlaps(x, y));
  CHECK(molora::detail::overlaps(y, x));
  // Rows 9, 7, 5 backwards do not touch rows 0..2; neither do rows 3..4 forwards.
  CHECK_FALSE(molora::detail::overlaps(ConstView(buf.data() + 54, 3, 6, Eigen::OuterStride<>(-12)), y));
  CHECK_FALSE(molora::detail::overlaps(ConstView(buf.data() + 18, 2, 6, Eigen::OuterStride<>(6)), y));
  // One element shared at the far end of a backward view.
  CHECK(molora::detail::overlaps(ConstView(buf.data() + 29, 2, 6, Eigen::OuterStride<>(-12)), y));

  const RowMatrix<float> x_values = x;
  const RowMatrix<float> want = layer.forward(x_values);
  MoLoRALinear<float>::Workspace ws;
  layer.forward(x, y, ws);
  CHECK(ref::rel_err(RowMatrix<float>(y), ref::from_eigen(want)) < 1e-6);

  // The training forward keeps its own copy of such an x.
  std::copy(init.data(), init.data() + 60, buf.begin());
  molora::MoLoRATape<float> tape;
  molora::forward_train(layer, x, y, tape);
  CHECK(tape.x.owned);
  CHECK(ref::rel_err(RowMatrix<float>(y), ref::from_eigen(want)) < 1e-5);
}

TEST_CASE("wrap_base_weight refuses NaN as set_base_weight does; forward_routed names a non-finite token as forward") {
  const MoLoRAConfig c = small(3);
  auto layer = ref::random_layer<float>(c, 20);
  RowMatrix<float> host = ref::random_x<float>(5, 6, 21);
  host(1, 2) = std::numeric_limits<float>::quiet_NaN();
  CHECK_THROWS_WITH_AS(layer.set_base_weight(host),
                       "molora numeric error: base weight: expected finite values, got nan at [1, 2]",
                       molora::numeric_error);
  CHECK_THROWS_WITH_AS(layer.wrap_base_weight(MoLoRALinear<float>::BaseWeightMap(host.data(), 5, 6)),
                       "molora numeric error: wrapped base weight: expected finite values, got nan at [1, 2]",
                       molora::numeric_error);
  CHECK_FALSE(layer.wraps_base());
  std::vector<float> bias(5, 0.f);
  bias[4] = INFINITY;
  CHECK_THROWS_WITH_AS(layer.wrap_base_bias(Eigen::Map<const molora::Vector<float>>(bias.data(), 5)),
                       "molora numeric error: wrapped base bias: expected finite values, got inf at [4, 0]",
                       molora::numeric_error);

  RowMatrix<float> x = ref::random_x<float>(5, 6, 22);
  x(3, 2) = std::numeric_limits<float>::quiet_NaN();
  MoLoRALinear<float>::Workspace ws;
  RowMatrix<float> y = RowMatrix<float>::Constant(5, 5, 42.f);
  const char* message = "molora numeric error: x of token 3: expected finite values, got nan at column 2";
  CHECK_THROWS_WITH_AS(layer.forward(x, y, ws), message, molora::numeric_error);
  CHECK((y.array() == 42.f).all());
  molora::Routing<float> r;
  r.resize(5, 2);
  for (Index t = 0; t < 5; ++t) {
    r.ids(t, 0) = 0;
    r.ids(t, 1) = 2;
  }
  r.weights.setConstant(0.5f);
  CHECK_THROWS_WITH_AS(layer.forward_routed(x, r, y, ws), message, molora::numeric_error);
  CHECK_THROWS_WITH_AS(layer.adapter().add_delta_routed(x, r, y, ws), message, molora::numeric_error);
  CHECK((y.array() == 42.f).all());
  molora::MoLoRATape<float> tape;
  CHECK_THROWS_WITH_AS(molora::forward_train(layer, x, y, tape), message, molora::numeric_error);
  CHECK_THROWS_WITH_AS(molora::forward_routed_train(layer, x, r, y, tape), message, molora::numeric_error);
  CHECK((y.array() == 42.f).all());
}

TEST_CASE("a workspace or tape already in use is refused, and released on return and on throw") {
  const MoLoRAConfig c = small(3);
  const auto layer = ref::random_layer<float>(c, 23);
  const RowMatrix<float> x = ref::random_x<float>(4, 6, 24);
  RowMatrix<float> y = RowMatrix<float>::Constant(4, 5, 42.f);
  MoLoRALinear<float>::Workspace ws;
  molora::Routing<float> r = layer.forward(x, y, ws);
  y.setConstant(42.f);
  {
    // Another call holding the workspace (as a second thread, or a re-entrant call, would).
    const molora::detail::WorkspaceGuard other(ws.in_use, "test");
    CHECK(ws.in_use.in_use());
    CHECK_THROWS_WITH_AS(layer.forward(x, y, ws),
                         "molora state error: MoLoRAWorkspace: expected a workspace no other call is using, got one "
                         "already in use (by another thread, or by a re-entrant call); use one per thread",
                         molora::state_error);
    CHECK_THROWS_AS(layer.forward_routed(x, r, y, ws), molora::state_error);
    CHECK_THROWS_AS(layer.adapter().add_delta(x, y, ws), molora::state_error);
    CHECK_THROWS_AS(layer.adapter().add_delta_routed(x, r, y, ws), molora::state_error);
    CHECK_THROWS_AS(layer.adapter().route_tokens(x, ws), molora::state_error);
    CHECK((y.array() == 42.f).all());
    CHECK(ws.in_use.in_use());  // a refused call does not release another's hold
  }
  CHECK_FALSE(ws.in_use.in_use());
  CHECK_NOTHROW(layer.forward(x, y, ws));
  // Released when a call throws.
  RowMatrix<float> y_bad(4, 4);
  CHECK_THROWS_AS(layer.forward(x, y_bad, ws), molora::shape_error);
  CHECK_FALSE(ws.in_use.in_use());
  CHECK_NOTHROW(layer.forward(x, y, ws));

  // Training tapes.
  molora::MoLoRATape<float> tape;
  molora::forward_train(layer, x, y, tape);
  molora::MoLoRAGrads<float> g(layer);
  RowMatrix<float> dx(4, 6);
  const RowMatrix<float> dy = ref::random_x<float>(4, 5, 25);
  {
    const molora::detail::WorkspaceGuard other(tape.in_use, "test");
    CHECK_THROWS_WITH_AS(molora::forward_train(layer, x, y, tape),
                         "molora state error: MoLoRATape: expected a workspace no other call is using, got one "
                         "already in use (by another thread, or by a re-entrant call); use one per thread",
                         molora::state_error);
    CHECK_THROWS_AS(molora::backward(layer, tape, dy, g, dx), molora::state_error);
    CHECK_THROWS_AS(molora::add_backward(layer.adapter(), tape, dy, g), molora::state_error);
    CHECK_THROWS_AS(molora::router_z_loss(tape, 0.1), molora::state_error);
    CHECK_THROWS_AS(molora::load_balancing_loss(tape, 0.1), molora::state_error);
  }
  CHECK_NOTHROW(molora::backward(layer, tape, dy, g, dx));
  // One tape twice in one load-balancing call is not a concurrent use.
  molora::forward_train(layer, x, y, tape);
  CHECK_NOTHROW(molora::load_balancing_loss(std::vector<molora::MoLoRATape<float>*>{&tape, &tape}, 0.1));

  molora::LoRA<float> lora(6, 5, 3, 6.0);
  molora::LoRATape<float> lt;
  {
    const molora::detail::WorkspaceGuard other(lt.in_use, "test");
    CHECK_THROWS_AS(molora::add_delta_train(lora, x, y, lt), molora::state_error);
  }
  CHECK_NOTHROW(molora::add_delta_train(lora, x, y, lt));

  molora::MixLoRAFeedForwardConfig f;
  f.hidden_size = 6;
  f.intermediate_size = 10;
  f.num_experts = 4;
  f.rank = 3;
  const molora::MixLoRAFeedForward<float> ffn(f);
  molora::MixLoRAFeedForward<float>::Workspace fws;
  RowMatrix<float> fy(4, 6);
  {
    const molora::detail::WorkspaceGuard other(fws.in_use, "test");
    CHECK_THROWS_WITH_AS(ffn.forward(x, fy, fws),
                         "molora state error: MixLoRAWorkspace: expected a workspace no other call is using, got one "
                         "already in use (by another thread, or by a re-entrant call); use one per thread",
                         molora::state_error);
  }
  CHECK_NOTHROW(ffn.forward(x, fy, fws));

  // A copy of a held workspace is a new, free one.
  const molora::detail::WorkspaceGuard hold(ws.in_use, "test");
  MoLoRALinear<float>::Workspace copy = ws;
  CHECK_FALSE(copy.in_use.in_use());
  CHECK_NOTHROW(layer.forward(x, y, copy));
}

}  // namespace test_misuse
