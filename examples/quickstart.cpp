// Quickstart: a MoLoRA-adapted linear layer with MING-MOE's settings (in = out = 4096,
// 8 experts, top-2, rank 16, alpha 32, router with bias) on a batch of 64 tokens. Prints the
// expert load and the output's norm, and checks itself against the unadapted base layer.
#include <molora/molora.hpp>

#include <chrono>
#include <cstdio>

int main() {
  using molora::RowMatrix;
  molora::MoLoRAConfig config;
  config.in_features = 4096;
  config.out_features = 4096;
  config.num_experts = 8;
  config.top_k = 2;
  config.rank = 16;
  config.lora_alpha = 32;
  config.router_bias = true;

  molora::MoLoRALinear<float> layer(config);
  molora::Generator gen(2024);
  // A frozen base weight (in a real model: a Map over the host's weight, see README).
  RowMatrix<float> w0(4096, 4096);
  for (Eigen::Index i = 0; i < w0.size(); ++i) w0.data()[i] = float(molora::detail::uniform(gen, -0.02, 0.02));
  layer.set_base_weight(w0);
  layer.adapter().init_default(gen);  // router as nn.Linear, A kaiming-uniform, B = 0

  const Eigen::Index T = 64;
  RowMatrix<float> x(T, 4096);
  for (Eigen::Index i = 0; i < x.size(); ++i) x.data()[i] = float(molora::detail::normal01(gen));

  molora::MoLoRALinear<float>::Workspace ws;
  RowMatrix<float> y(T, 4096), base(T, 4096);
  layer.forward_base(x, base);

  // 1. Freshly initialised (B = 0), the adapted layer equals its base exactly.
  layer.forward(x, y, ws);
  const bool fresh_ok = (y == base);
  std::printf("fresh adapter (B = 0): output %s the base layer\n", fresh_ok ? "equals" : "DIFFERS FROM");

  // 2. Give the experts trained-looking B and run again.
  for (Eigen::Index e = 0; e < config.num_experts; ++e) {
    RowMatrix<float> b(4096, 16);
    for (Eigen::Index i = 0; i < b.size(); ++i) b.data()[i] = float(0.01 * molora::detail::normal01(gen));
    layer.adapter().set_expert_B(e, b);
  }
  const auto t0 = std::chrono::steady_clock::now();
  const molora::Routing<float>& routing = layer.forward(x, y, ws);
  const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();

  std::printf("expert load over %ld tokens x top-%ld:", long(T), long(config.top_k));
  std::vector<int> load(8, 0);
  for (Eigen::Index t = 0; t < T; ++t)
    for (Eigen::Index s = 0; s < config.top_k; ++s) ++load[size_t(routing.ids(t, s))];
  for (int e = 0; e < 8; ++e) std::printf(" e%d=%d", e, load[size_t(e)]);
  std::printf("\n|y| = %.6f, |base| = %.6f, |y - base| = %.6f  (forward: %.2f ms)\n", double(y.norm()),
              double(base.norm()), double((y - base).norm()), ms);

  // 3. y - base must be sum_k g * s * B_e A_e x for each token, computed here token by token.
  double max_err = 0, max_delta = 0;
  for (Eigen::Index t = 0; t < T; ++t) {
    Eigen::RowVectorXd d = Eigen::RowVectorXd::Zero(4096);
    for (Eigen::Index s = 0; s < config.top_k; ++s) {
      const auto e = routing.ids(t, s);
      const Eigen::VectorXd h = layer.adapter().expert_A(e).cast<double>() * x.row(t).transpose().cast<double>();
      d += double(routing.weights(t, s)) * config.scaling() *
           (layer.adapter().expert_B(e).cast<double>() * h).transpose();
    }
    const Eigen::RowVectorXd got = (y.row(t) - base.row(t)).cast<double>();
    max_err = std::max(max_err, (got - d).cwiseAbs().maxCoeff());
    max_delta = std::max(max_delta, d.cwiseAbs().maxCoeff());
  }
  const bool delta_ok = max_delta > 0 && max_err <= 1e-4 * max_delta + 1e-5;
  std::printf("adapted - base vs per-token expert sum: max error %.3g (max |delta| %.3g): %s\n", max_err, max_delta,
              delta_ok ? "ok" : "FAILED");
  return fresh_ok && delta_ok ? 0 : 1;
}
