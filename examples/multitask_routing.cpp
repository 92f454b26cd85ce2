// Multi-task learning without task labels (MING-MOE's claim, on data we make): four tasks
// change one frozen linear map in four different low-rank ways; their tokens are mixed with
// no label. A MoLoRALinear (E = 8, k = 2) trained with AdamW learns all four because its
// router sorts the tokens by task; a single LoRA with as many trainable values cannot, since
// it must apply one change to every token. Prints both held-out losses and the
// task-by-expert routing table. The progress bar (stderr) shows only on a terminal or with
// --progress.
//
//   ./multitask_routing [--progress] [--steps N]
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "multitask.hpp"

int main(int argc, char** argv) {
  bool show_progress = isatty(fileno(stderr)) != 0;
  multitask::TaskSpec task_spec;
  task_spec.dim = 64;
  multitask::TrainSpec train_spec;
  train_spec.rank = 4;
  train_spec.steps = 4000;
  train_spec.batch = 128;
  train_spec.eval_tokens = 8192;
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--progress") == 0) show_progress = true;
    else if (std::strcmp(argv[i], "--steps") == 0 && i + 1 < argc) train_spec.steps = std::atol(argv[++i]);
    else {
      std::fprintf(stderr, "usage: %s [--progress] [--steps N]\n", argv[0]);
      return 2;
    }
  }

  const multitask::Tasks tasks(task_spec);
  multitask::Progress bar;
  if (show_progress)
    bar = [](molora::Index step, molora::Index steps, double moe, double lora) {
      const int width = 30;
      const int filled = static_cast<int>(width * step / steps);
      std::fprintf(stderr, "\r[%.*s%*s] %5ld/%ld  loss MoLoRA %.4f  LoRA %.4f", filled,
                   "##############################", width - filled, "", static_cast<long>(step),
                   static_cast<long>(steps), moe, lora);
      if (step == steps) std::fprintf(stderr, "\n");
      std::fflush(stderr);
    };
  const multitask::Result r = multitask::train_and_evaluate(tasks, train_spec, bar);

  std::printf("tasks: K = %ld, d = %ld, each a rank-%ld change of a shared frozen map; no task labels\n",
              static_cast<long>(task_spec.num_tasks), static_cast<long>(task_spec.dim),
              static_cast<long>(task_spec.task_rank));
  std::printf("trainable values: MoLoRA (E = %ld, k = %ld, r = %ld, router included) %ld; LoRA (r = %ld) %ld\n",
              static_cast<long>(train_spec.num_experts), static_cast<long>(train_spec.top_k),
              static_cast<long>(train_spec.rank), static_cast<long>(r.molora_params), static_cast<long>(r.lora_rank),
              static_cast<long>(r.lora_params));
  std::printf("held-out MSE after %ld AdamW steps of %ld tokens:\n", static_cast<long>(train_spec.steps),
              static_cast<long>(train_spec.batch));
  std::printf("  base alone   %.5f\n  single LoRA  %.5f\n  MoLoRA       %.5f  (%.3fx the LoRA's)\n", r.base_loss,
              r.lora_loss, r.molora_loss, r.molora_loss / r.lora_loss);
  std::printf("routing table (share of each task's routed pairs per expert):\n        ");
  for (molora::Index e = 0; e < r.routing_table.cols(); ++e) std::printf("  e%ld  ", static_cast<long>(e));
  std::printf("\n");
  for (molora::Index j = 0; j < r.routing_table.rows(); ++j) {
    std::printf("task %ld ", static_cast<long>(j));
    for (molora::Index e = 0; e < r.routing_table.cols(); ++e) std::printf(" %5.2f ", static_cast<double>(r.routing_table(j, e)));
    std::printf("   top-%ld share %.2f\n", static_cast<long>(train_spec.top_k),
                multitask::top_share(r.routing_table, j, train_spec.top_k));
  }
  return 0;
}
