// AdamW against hand-computed steps with literal numbers (torch.optim.AdamW's formula), and
// the named parameter views of the layers: names, shapes, aliasing, zero_grad.
#include <doctest/doctest.h>

#include <cstdio>
#include <fstream>
#include <sstream>
#include <string>

#include <molora/backward.hpp>
#include <molora/losses.hpp>
#include <molora/optim.hpp>
#include <molora/params.hpp>

#include "test_util.hpp"

namespace test_optim {

using namespace molora;

TEST_CASE("AdamW: two steps match a hand computation") {
  // p = [1, -2], lr 0.1, betas 0.9 / 0.999, eps 1e-8, weight_decay 0.01.
  // Step 1, g = [0.5, -0.1]: p <- p * 0.999; m = 0.1 g; v = 0.001 g^2; bias corrections 0.1
  // and 0.001 make the update lr * g / (|g| + eps): p = [0.999 - 0.05 / 0.50000001,
  // -1.998 + 0.01 / 0.10000001] = [0.899000002, -1.89800001].
  // Step 2, g = [-0.3, 0.2]: m = [0.015, 0.011], v = [3.3975e-4, 4.999e-5], corrections
  // 0.19 and 0.001999: p = [0.87895119893977, -1.93271236037849].
  Vector<double> p(2), g(2);
  p << 1.0, -2.0;
  ParameterList<double> list;
  list.emplace_back("p", p.data(), g.data(), 2, 1, false);
  AdamWOptions opt;
  opt.lr = 0.1;
  opt.weight_decay = 0.01;
  AdamW<double> adam(list, opt);
  g << 0.5, -0.1;
  adam.step();
  CHECK(p(0) == doctest::Approx(0.899000002).epsilon(1e-14));
  CHECK(p(1) == doctest::Approx(-1.898000009999999).epsilon(1e-14));
  CHECK(adam.exp_avg(0)(0) == doctest::Approx(0.05).epsilon(1e-14));
  CHECK(adam.exp_avg_sq(0)(1) == doctest::Approx(1e-5).epsilon(1e-12));
  g << -0.3, 0.2;
  adam.step();
  CHECK(p(0) == doctest::Approx(0.8789511989397751).epsilon(1e-14));
  CHECK(p(1) == doctest::Approx(-1.9327123603784888).epsilon(1e-14));
  CHECK(adam.steps() == 2);
  adam.zero_grad();
  CHECK(g.isZero(0));
}

TEST_CASE("AdamW: zero gradient leaves only the decoupled decay; float works too") {
  Eigen::VectorXf p(3), g = Eigen::VectorXf::Zero(3);
  p << 1.0f, -4.0f, 0.5f;
  ParameterList<float> list;
  list.emplace_back("w", p.data(), g.data(), 3, 1, false);
  AdamWOptions opt;
  opt.lr = 0.5;
  opt.weight_decay = 0.1;
  AdamW<float> adam(list, opt);
  adam.step();
  CHECK(p(0) == doctest::Approx(0.95f));
  CHECK(p(1) == doctest::Approx(-3.8f));
  CHECK(p(2) == doctest::Approx(0.475f));
  AdamWOptions bad;
  bad.beta2 = 1.0;
  CHECK_THROWS_AS((AdamW<float>(list, bad)), config_error);
}

TEST_CASE("parameters: names, shapes and views into the layer's storage") {
  MoLoRAConfig cfg;
  cfg.in_features = 5;
  cfg.out_features = 3;
  cfg.num_experts = 4;
  cfg.top_k = 2;
  cfg.rank = 2;
  MoLoRALinear<double> layer(cfg);
  MoLoRAGrads<double> grads(layer);
  auto list = parameters(layer, grads, "mlp.up_proj.");
  REQUIRE(list.size() == 2 + 2 * 4);
  CHECK(list[0].name == "mlp.up_proj.router.weight");
  CHECK(list[1].name == "mlp.up_proj.router.bias");
  CHECK(list[2].name == "mlp.up_proj.experts.0.lora_A.weight");
  CHECK(list[9].name == "mlp.up_proj.experts.3.lora_B.weight");
  CHECK(count_values(list) == 4 * 5 + 4 + 4 * 2 * (5 + 3));
  // Writing through a view changes the layer: expert 2's B [3, 2] in column-major order.
  auto& b2 = list[7];
  CHECK(b2.name == "mlp.up_proj.experts.2.lora_B.weight");
  CHECK((b2.rows == 3 && b2.cols == 2 && b2.column_major));
  for (Index i = 0; i < b2.size(); ++i) b2.value(i) = static_cast<double>(i + 1);
  const ColMatrix<double> B2 = layer.adapter().expert_B(2);
  CHECK(B2(0, 0) == 1.0);
  CHECK(B2(1, 0) == 2.0);
  CHECK(B2(0, 1) == 4.0);
  CHECK(b2.shaped_col_major()(2, 1) == 6.0);
  auto& a1 = list[4];
  CHECK(a1.name == "mlp.up_proj.experts.1.lora_A.weight");
  a1.value.setConstant(0.5);
  CHECK(layer.adapter().expert_A(1).isConstant(0.5));
  CHECK(layer.adapter().expert_A(0).isZero(0));
  // Gradient views alias the grads buffer.
  list[0].grad.setOnes();
  CHECK(grads.router_weight.isOnes(0));
  zero_grad(list);
  CHECK(grads.router_weight.isZero(0));

  cfg.router_bias = false;
  MoLoRALinear<double> nobias(cfg);
  MoLoRAGrads<double> g2(nobias);
  CHECK(parameters(nobias, g2).size() == 1 + 2 * 4);

  LoRA<double> lora(5, 3, 2, 4.0);
  LoRAGrads<double> lg(lora);
  auto ll = parameters(lora, lg);
  REQUIRE(ll.size() == 2);
  CHECK(ll[0].name == "lora_A.weight");
  CHECK(ll[1].name == "lora_B.weight");
  ll[1].value.setConstant(2.0);
  CHECK(lora.B().isConstant(2.0));
  MoLoRAGrads<double> wrong;
  CHECK_THROWS_AS(parameters(layer, wrong), shape_error);
}

TEST_CASE("AdamW drives a MoLoRA layer's views: a step on a toy regression lowers the loss") {
  MoLoRAConfig cfg;
  cfg.in_features = 6;
  cfg.out_features = 4;
  cfg.num_experts = 4;
  cfg.top_k = 2;
  cfg.rank = 2;
  MoLoRALinear<double> layer(cfg);
  Generator gen(1);
  layer.adapter().init_default(gen);
  MoLoRAGrads<double> grads(layer);
  AdamWOptions opt;
  opt.lr = 1e-2;
  AdamW<double> adam(parameters(layer, grads), opt);
  RowMatrix<double> x(16, 6), target(16, 4), y(16, 4), dy(16, 4);
  test_util::fill(x, gen, 1.0);
  test_util::fill(target, gen, 1.0);
  MoLoRATape<double> tape;
  auto loss = [&] {
    forward_train(layer, x, y, tape);
    return (y - target).squaredNorm() / static_cast<double>(y.size());
  };
  const double before = loss();
  for (int step = 0; step < 50; ++step) {
    const double l = loss();
    (void)l;
    dy = (y - target) * (2.0 / static_cast<double>(y.size()));
    adam.zero_grad();
    backward(layer, tape, dy, grads);
    adam.step();
  }
  CHECK(loss() < 0.9 * before);
}

TEST_CASE("docs/training.md: the training loop compiles, runs, learns, and matches the page") {
  // The host's data: a fixed linear target the adapter can fit.
  molora::Generator data(3);
  molora::RowMatrix<float> teacher(64, 64);
  for (molora::Index i = 0; i < teacher.size(); ++i) teacher(i) = 0.05f * static_cast<float>(molora::detail::normal01(data));
  auto next_batch = [&](molora::RowMatrix<float>& xb, molora::RowMatrix<float>& tb) {
    for (molora::Index i = 0; i < xb.size(); ++i) xb(i) = static_cast<float>(molora::detail::normal01(data));
    tb.noalias() = xb * teacher;
  };
  double before = 0, after = 0;
  {
    // doc:training-loop begin
    molora::MoLoRAConfig cfg;  // MING-MOE's defaults: E = 8, k = 2, r = 16, alpha = 32
    cfg.in_features = 64;
    cfg.out_features = 64;
    molora::MoLoRALinear<float> layer(cfg);
    molora::Generator gen(0);
    layer.adapter().init_default(gen);  // router as nn.Linear, A kaiming-uniform, B zero

    molora::MoLoRAGrads<float> grads(layer);  // same layouts as the parameters
    molora::AdamWOptions opt;                 // torch.optim.AdamW's defaults
    opt.lr = 1e-3;
    molora::AdamW<float> adam(molora::parameters(layer, grads), opt);
    molora::MoLoRATape<float> tape;  // one per layer; reused every step
    tape.options.lora_dropout = 0.05;
    tape.seed(1);

    const molora::Index T = 32;
    molora::RowMatrix<float> x(T, 64), target(T, 64), y(T, 64), dy(T, 64), dx(T, 64);
    const float n = static_cast<float>(T * 64);
    for (int step = 0; step < 200; ++step) {
      next_batch(x, target);
      molora::forward_train(layer, x, y, tape);  // y = x W0^T + b0 + delta(x)
      const float mse = (y - target).squaredNorm() / n;
      const double aux = molora::load_balancing_loss(tape, 0.01);  // adds its gradient to the tape
      dy = (y - target) * (2.0f / n);
      adam.zero_grad();
      molora::backward(layer, tape, dy, grads, dx);  // dx = dL/dx for the layer below
      adam.step();
      if (step % 50 == 0) std::printf("step %d  mse %.4f  aux %.4f\n", step, mse, aux);
    }
    // doc:training-loop end
    CHECK(dx.allFinite());
    // Held-out: the untrained layer (zero base, zero B) predicts 0.
    next_batch(x, target);
    before = target.squaredNorm() / n;
    after = (layer.forward(x) - target).squaredNorm() / n;
  }
  CHECK(after < 0.9 * before);

  // The page shows exactly the code above.
  auto read = [](const std::string& path) {
    std::ifstream in(path);
    std::stringstream ss;
    ss << in.rdbuf();
    return ss.str();
  };
  const std::string doc = read(MOLORA_TEST_DATA_DIR "/../../docs/training.md");
  const std::string self = read(__FILE__);
  REQUIRE(!doc.empty());
  REQUIRE(!self.empty());
  const auto d0 = doc.find("```cpp\n", doc.find("<!-- training-loop -->")) + 7;
  const std::string page = doc.substr(d0, doc.find("```", d0) - d0);
  const std::string begin = "// doc:training-loop begin\n", end_marker = "    // doc:training-loop end";
  const auto s0 = self.find(begin, self.find("TEST_CASE(\"docs/training.md")) + begin.size();
  std::istringstream code(self.substr(s0, self.find(end_marker, s0) - s0));
  std::string line, unindented;
  while (std::getline(code, line)) unindented += (line.size() >= 4 ? line.substr(4) : line) + "\n";
  CHECK(unindented == page);
}

}  // namespace test_optim
