// A label-free multi-task problem and the training loop that the multitask_routing example
// and tests/test_multitask.cpp share.
//
// K tasks share one frozen linear map W0 [d, d]. Task j changes it by a low-rank U_j V_j
// (U_j [d, q], V_j [q, d]): its target is y = W0 x + U_j V_j x. Task j's inputs are
// x = mu_j + z with z ~ N(0, I) and its own mean mu_j (|mu_j| = mean_scale), so x alone says
// which task it comes from, but every task's inputs span the whole space: no single linear
// change fits all K at once, whatever its rank. Tokens of all tasks are mixed in each batch
// with no task label. A MoLoRALinear (its router has to discover the tasks) and a plain LoRA
// with the same number of trainable values are trained with AdamW on the mean squared error.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <vector>

#include <molora/backward.hpp>
#include <molora/losses.hpp>
#include <molora/molora_linear.hpp>
#include <molora/optim.hpp>
#include <molora/params.hpp>

namespace multitask {

using molora::Index;
using Matrix = molora::RowMatrix<float>;

struct TaskSpec {
  Index dim = 32;           // d = in = out
  Index num_tasks = 4;      // K
  Index task_rank = 2;      // q, rank of each task's change
  double mean_scale = 3.0;  // |mu_j|
  double change_scale = 1.0;
  std::uint64_t seed = 1;
};

struct TrainSpec {
  Index num_experts = 8;
  Index top_k = 2;
  Index rank = 4;             // of each expert
  Index steps = 1500;
  Index batch = 64;           // tokens per step, tasks mixed at random
  double lr = 1e-2;
  double weight_decay = 0.0;
  double balance_coef = 0.01;  // load-balancing loss coefficient (0 = off)
  Index eval_tokens = 2048;    // held-out tokens
  std::uint64_t seed = 2;
};

// The K tasks: base map, means and low-rank changes.
struct Tasks {
  TaskSpec spec;
  Matrix W0;                    // [d, d]
  std::vector<Matrix> mean;     // K x [1, d]
  std::vector<Matrix> change;   // K x [d, d] = (U_j V_j)^T, so y += x * change

  explicit Tasks(const TaskSpec& s) : spec(s) {
    molora::Generator gen(s.seed);
    const Index d = s.dim;
    auto normal = [&] { return static_cast<float>(molora::detail::normal01(gen)); };
    W0.resize(d, d);
    for (Index i = 0; i < W0.size(); ++i) W0(i) = normal() / std::sqrt(static_cast<float>(d));
    for (Index j = 0; j < s.num_tasks; ++j) {
      Matrix mu(1, d);
      for (Index i = 0; i < d; ++i) mu(i) = normal();
      mean.push_back(mu * static_cast<float>(s.mean_scale / mu.norm()));
      Matrix U(d, s.task_rank), V(s.task_rank, d);
      const float scale = static_cast<float>(s.change_scale / std::sqrt(static_cast<double>(d)));
      for (Index i = 0; i < U.size(); ++i) U(i) = normal() * scale;
      for (Index i = 0; i < V.size(); ++i) V(i) = normal();
      change.push_back((U * V).transpose() / std::sqrt(static_cast<float>(s.task_rank)));  // [d, d]
    }
  }

  // n tokens with tasks drawn uniformly: x [n, d], target [n, d], task of each token.
  void sample(Index n, molora::Generator& gen, Matrix& x, Matrix& target, std::vector<int>& task) const {
    const Index d = spec.dim;
    x.resize(n, d);
    target.resize(n, d);
    task.resize(static_cast<std::size_t>(n));
    for (Index t = 0; t < n; ++t) {
      const int j = static_cast<int>(molora::detail::bits64(gen) % static_cast<std::uint64_t>(spec.num_tasks));
      task[static_cast<std::size_t>(t)] = j;
      for (Index i = 0; i < d; ++i) x(t, i) = mean[static_cast<std::size_t>(j)](i) + static_cast<float>(molora::detail::normal01(gen));
      target.row(t).noalias() = x.row(t) * W0.transpose() + x.row(t) * change[static_cast<std::size_t>(j)];
    }
  }
};

struct Result {
  Index molora_params = 0, lora_params = 0, lora_rank = 0;
  double base_loss = 0;    // held-out MSE of W0 alone (no adapter)
  double molora_loss = 0;  // held-out MSE after training
  double lora_loss = 0;
  Matrix routing_table;    // [K, E]: share of task j's routed (token, slot) pairs sent to expert e
};

inline double mse(const Matrix& y, const Matrix& target) {
  return static_cast<double>((y - target).squaredNorm()) / static_cast<double>(y.size());
}

// progress(step, steps, running MoLoRA loss, running LoRA loss), called every few steps.
using Progress = std::function<void(Index, Index, double, double)>;

inline Result train_and_evaluate(const Tasks& tasks, const TrainSpec& ts, const Progress& progress = {}) {
  const Index d = tasks.spec.dim, E = ts.num_experts;
  molora::MoLoRAConfig cfg;
  cfg.in_features = d;
  cfg.out_features = d;
  cfg.num_experts = E;
  cfg.top_k = ts.top_k;
  cfg.rank = ts.rank;
  cfg.lora_alpha = 2.0 * static_cast<double>(ts.rank);
  cfg.router_bias = false;  // MixLoRA's router; keeps the parameter counts exactly equal
  molora::MoLoRALinear<float> moe(cfg);
  moe.set_base_weight(tasks.W0);
  molora::Generator init(ts.seed);
  moe.adapter().init_default(init);

  // The single LoRA's rank: as many trainable values as the MoLoRA layer (router included).
  molora::MoLoRAGrads<float> moe_grads(moe);
  molora::AdamWOptions opt;
  opt.lr = ts.lr;
  opt.weight_decay = ts.weight_decay;
  molora::AdamW<float> moe_adam(molora::parameters(moe, moe_grads), opt);
  Result res;
  res.molora_params = molora::count_values(moe_adam.parameters());
  res.lora_rank = (res.molora_params + 2 * d - 1) / (2 * d);
  molora::LoRA<float> lora(d, d, res.lora_rank, 2.0 * static_cast<double>(res.lora_rank));
  lora.init_peft(init);
  molora::LoRAGrads<float> lora_grads(lora);
  molora::AdamW<float> lora_adam(molora::parameters(lora, lora_grads), opt);
  res.lora_params = molora::count_values(lora_adam.parameters());

  molora::Generator data(ts.seed + 1);
  Matrix x, target, y(ts.batch, d), y_lora(ts.batch, d), dy(ts.batch, d);
  std::vector<int> task;
  molora::MoLoRATape<float> tape;
  molora::LoRATape<float> lora_tape;
  double run_moe = 0, run_lora = 0;
  const float grad_scale = 2.0f / static_cast<float>(ts.batch * d);
  for (Index step = 1; step <= ts.steps; ++step) {
    tasks.sample(ts.batch, data, x, target, task);
    // MoLoRA: forward, balancing loss, backward, step.
    molora::forward_train(moe, x, y, tape);
    if (ts.balance_coef > 0) molora::load_balancing_loss(tape, ts.balance_coef);
    const double l_moe = mse(y, target);
    dy = (y - target) * grad_scale;
    moe_adam.zero_grad();
    molora::backward(moe, tape, dy, moe_grads);
    moe_adam.step();
    // LoRA on the same batch: y = x W0^T + s B A x.
    y_lora.noalias() = x * tasks.W0.transpose();
    molora::add_delta_train(lora, x, y_lora, lora_tape);
    const double l_lora = mse(y_lora, target);
    dy = (y_lora - target) * grad_scale;
    lora_adam.zero_grad();
    molora::add_backward(lora, lora_tape, dy, lora_grads);
    lora_adam.step();

    const double a = step == 1 ? 1.0 : 0.02;  // exponential running mean
    run_moe += a * (l_moe - run_moe);
    run_lora += a * (l_lora - run_lora);
    if (progress && (step % 10 == 0 || step == ts.steps)) progress(step, ts.steps, run_moe, run_lora);
  }

  // Held-out evaluation with the inference forward.
  molora::Generator held(ts.seed + 7);
  tasks.sample(ts.eval_tokens, held, x, target, task);
  Matrix out(ts.eval_tokens, d);
  molora::MoLoRAWorkspace<float> ws;
  const molora::Routing<float>& routing = moe.forward(x, out, ws);
  res.molora_loss = mse(out, target);
  out.noalias() = x * tasks.W0.transpose();
  res.base_loss = mse(out, target);
  out.noalias() += lora.delta(x);
  res.lora_loss = mse(out, target);
  res.routing_table.setZero(tasks.spec.num_tasks, E);
  for (Index t = 0; t < ts.eval_tokens; ++t)
    for (Index s = 0; s < routing.top_k(); ++s) res.routing_table(task[static_cast<std::size_t>(t)], routing.ids(t, s)) += 1;
  for (Index j = 0; j < tasks.spec.num_tasks; ++j) res.routing_table.row(j) /= res.routing_table.row(j).sum();
  return res;
}

// Share of task j's routed pairs that go to its `top` most used experts.
inline double top_share(const Matrix& table, Index task, Index top) {
  Eigen::RowVectorXf row = table.row(task);
  std::sort(row.data(), row.data() + row.size(), [](float a, float b) { return a > b; });
  return static_cast<double>(row.head(top).sum());
}

}  // namespace multitask
