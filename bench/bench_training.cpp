// Training step cost at MING-MOE's shape (in = out = 4096, E = 8, k = 2, r = 16), float:
//   adapter_forward   MoLoRAAdapter::add_delta (the inference adapter path: router + experts)
//   train_forward     add_delta_train (the same, saving the tape)
//   backward          add_backward (experts, router, the adapter's and router's dx)
//   train_step        train_forward + backward, timed alternately with adapter_forward in
//                     one loop (CPU time); step_over_fwd = median of the per-iteration
//                     ratios (target <= 3); fwd_ms, step_ms = the medians of each. Second
//                     argument: 0 as MING-MOE trains (no auxiliary loss, no dropout on
//                     the training path), 1 with the load-balancing loss (coef 0.01, as
//                     MixLoRA), 2 with LoRA dropout 0.05
//   base_dx           dy W0, the frozen base's x-gradient, reported separately
//   base_forward      x W0^T, for scale
//   ./bench_training --benchmark_repetitions=5 --benchmark_report_aggregates_only=true
//                    --benchmark_counters_tabular=true
#include <benchmark/benchmark.h>

#include <time.h>

#include <algorithm>
#include <memory>
#include <vector>

#include <molora/backward.hpp>
#include <molora/losses.hpp>
#include <molora/molora_linear.hpp>

namespace {

using molora::Index;
using Matrix = molora::RowMatrix<float>;

constexpr Index kIn = 4096, kOut = 4096;

// This thread's CPU time in seconds: on a shared machine it moves less than the wall clock.
double cpu_seconds() {
  timespec ts{};
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return static_cast<double>(ts.tv_sec) + 1e-9 * static_cast<double>(ts.tv_nsec);
}

struct Fixture {
  std::unique_ptr<molora::MoLoRALinear<float>> layer;
  Matrix x, y, dy, dx;
  molora::MoLoRAWorkspace<float> ws;
  molora::MoLoRATape<float> tape;
  std::unique_ptr<molora::MoLoRAGrads<float>> grads;

  explicit Fixture(Index T) {
    molora::MoLoRAConfig cfg;  // MING-MOE: E = 8, k = 2, r = 16, alpha = 32, router bias
    cfg.in_features = kIn;
    cfg.out_features = kOut;
    layer = std::make_unique<molora::MoLoRALinear<float>>(cfg);
    molora::Generator gen(7);
    layer->adapter().init_default(gen);
    auto B = layer->adapter().mutable_stacked_B();
    for (Index i = 0; i < B.size(); ++i) B.data()[i] = static_cast<float>(molora::detail::uniform(gen, -0.01, 0.01));
    Matrix w0(kOut, kIn);
    for (Index i = 0; i < w0.size(); ++i) w0(i) = static_cast<float>(molora::detail::uniform(gen, -0.015, 0.015));
    layer->set_base_weight(w0);
    x.resize(T, kIn);
    dy.resize(T, kOut);
    for (Index i = 0; i < x.size(); ++i) x(i) = static_cast<float>(molora::detail::normal01(gen));
    for (Index i = 0; i < dy.size(); ++i) dy(i) = static_cast<float>(molora::detail::normal01(gen));
    y.setZero(T, kOut);
    dx.setZero(T, kIn);
    grads = std::make_unique<molora::MoLoRAGrads<float>>(*layer);
  }

  void forward() { layer->adapter().add_delta(x, y, ws); }
  // mode: 0 plain, 1 with the load-balancing loss, 2 with LoRA dropout.
  void train_step(int mode = 0) {
    molora::add_delta_train(layer->adapter(), x, y, tape);
    if (mode == 1) benchmark::DoNotOptimize(molora::load_balancing_loss(tape, 0.01));
    molora::add_backward(layer->adapter(), tape, dy, *grads, dx);
  }
};

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0.0 : (v[(v.size() - 1) / 2] + v[v.size() / 2]) / 2;
}

void set_tokens(benchmark::State& state, Index T) {
  state.SetItemsProcessed(static_cast<std::int64_t>(state.iterations()) * T);
}

void adapter_forward(benchmark::State& state) {
  Fixture f(state.range(0));
  f.forward();
  for (auto _ : state) {
    f.forward();
    benchmark::DoNotOptimize(f.y.data());
  }
  set_tokens(state, state.range(0));
}

void train_forward(benchmark::State& state) {
  Fixture f(state.range(0));
  for (auto _ : state) {
    molora::add_delta_train(f.layer->adapter(), f.x, f.y, f.tape);
    benchmark::DoNotOptimize(f.y.data());
  }
  set_tokens(state, state.range(0));
}

void backward(benchmark::State& state) {
  Fixture f(state.range(0));
  molora::add_delta_train(f.layer->adapter(), f.x, f.y, f.tape);
  for (auto _ : state) {
    molora::add_backward(f.layer->adapter(), f.tape, f.dy, *f.grads, f.dx);
    benchmark::DoNotOptimize(f.dx.data());
  }
  set_tokens(state, state.range(0));
}

void train_step(benchmark::State& state) {
  Fixture f(state.range(0));
  const int mode = static_cast<int>(state.range(1));
  if (mode == 2) {
    f.tape.options.lora_dropout = 0.05;
    f.tape.seed(3);
  }
  f.train_step(mode);
  f.forward();
  // Each iteration times the adapter forward and then the step, by CPU time, so that the
  // clock and the other jobs of this shared machine move both alike; step_over_fwd is the
  // median of the per-iteration ratios.
  std::vector<double> ratio, fwd, step;
  for (auto _ : state) {
    const double a = cpu_seconds();
    f.forward();
    benchmark::DoNotOptimize(f.y.data());
    const double b = cpu_seconds();
    f.train_step(mode);
    benchmark::DoNotOptimize(f.dx.data());
    const double c = cpu_seconds();
    state.SetIterationTime(c - b);
    fwd.push_back(b - a);
    step.push_back(c - b);
    ratio.push_back((c - b) / (b - a));
  }
  set_tokens(state, state.range(0));
  state.counters["fwd_ms"] = median(fwd) * 1e3;
  state.counters["step_ms"] = median(step) * 1e3;
  state.counters["step_over_fwd"] = median(ratio);
}

void base_dx(benchmark::State& state) {
  Fixture f(state.range(0));
  for (auto _ : state) {
    molora::base_backward(*f.layer, f.dy, f.dx);
    benchmark::DoNotOptimize(f.dx.data());
  }
  set_tokens(state, state.range(0));
}

void base_forward(benchmark::State& state) {
  Fixture f(state.range(0));
  for (auto _ : state) {
    f.layer->forward_base(f.x, f.y);
    benchmark::DoNotOptimize(f.y.data());
  }
  set_tokens(state, state.range(0));
}

}  // namespace

BENCHMARK(adapter_forward)->Arg(64)->Arg(256)->Arg(1024)->Unit(benchmark::kMillisecond);
BENCHMARK(train_forward)->Arg(64)->Arg(256)->Arg(1024)->Unit(benchmark::kMillisecond);
BENCHMARK(backward)->Arg(64)->Arg(256)->Arg(1024)->Unit(benchmark::kMillisecond);
BENCHMARK(train_step)
    ->ArgsProduct({{64, 256, 1024}, {0, 1, 2}})
    ->ArgNames({"", "mode"})
    ->UseManualTime()
    ->Unit(benchmark::kMillisecond);
BENCHMARK(base_dx)->Arg(64)->Arg(256)->Arg(1024)->Unit(benchmark::kMillisecond);
BENCHMARK(base_forward)->Arg(64)->Arg(256)->Arg(1024)->Unit(benchmark::kMillisecond);

BENCHMARK_MAIN();
