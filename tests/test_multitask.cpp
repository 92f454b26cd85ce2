// The multitask_routing example in small (examples/multitask.hpp): with no task labels, a
// MoLoRALinear (E = 8, k = 2) must beat a single LoRA with as many trainable values by a
// clear margin on held-out data, and its router must send each task's tokens mostly to an
// expert of its own. Fixed seeds; thresholds leave a wide margin over what is observed
// (see the MESSAGE lines).
#include <doctest/doctest.h>

#include <set>
#include <sstream>

#include "../examples/multitask.hpp"

namespace test_multitask {

TEST_CASE("multitask: MoLoRA learns four unlabelled tasks that one LoRA cannot, routing by task") {
  multitask::TaskSpec task_spec;
  task_spec.dim = 32;
  multitask::TrainSpec train_spec;
  train_spec.rank = 4;
  train_spec.steps = 1200;
  train_spec.batch = 64;
  train_spec.eval_tokens = 2048;
  const multitask::Tasks tasks(task_spec);
  const multitask::Result r = multitask::train_and_evaluate(tasks, train_spec);

  std::ostringstream table;
  for (molora::Index j = 0; j < r.routing_table.rows(); ++j) {
    table << "\n  task " << j << ":";
    for (molora::Index e = 0; e < r.routing_table.cols(); ++e) table << " " << r.routing_table(j, e);
  }
  MESSAGE("params MoLoRA " << r.molora_params << ", LoRA " << r.lora_params << " (r = " << r.lora_rank
                           << "); held-out MSE base " << r.base_loss << ", LoRA " << r.lora_loss << ", MoLoRA "
                           << r.molora_loss << table.str());

  CHECK(r.molora_params == r.lora_params);
  CHECK(r.lora_loss < r.base_loss);
  CHECK(r.molora_loss < 0.3 * r.lora_loss);  // observed 0.09-0.14 over eight seeds
  // Each task has an expert of its own that sees most of its tokens (a token's two slots hold
  // distinct experts, so a share of 0.5 of the pairs means every token), and no two tasks
  // share that expert.
  std::set<molora::Index> own;
  for (molora::Index j = 0; j < r.routing_table.rows(); ++j) {
    molora::Index best = 0;
    const float share = r.routing_table.row(j).maxCoeff(&best);
    CAPTURE(j);
    CHECK(2 * share >= 0.8f);  // >= 80 % of its tokens use its own expert (observed >= 96 %)
    own.insert(best);
  }
  CHECK(own.size() == static_cast<std::size_t>(r.routing_table.rows()));
}

}  // namespace test_multitask
