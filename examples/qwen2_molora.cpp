// A Qwen2 decoder with MING-MOE adapters (examples/qwen2.hpp): prefills a prompt of token
// ids, decodes greedily, and prints the tokens, each layer's expert load and tokens/s.
//
//   qwen2_molora MODEL_DIR [--adapter DIR] [--lora-alpha A] --prompt 5,17,250
//                --max-new-tokens N [--threads N] [--widen]
//
// Projection weights are used as stored (BF16 stays bf16, read from the mapped file);
// --widen converts every tensor to float at load instead.
//
// The last output line is the generated token ids separated by single spaces. The program
// lives in qwen2::cli::run so that tests/test_qwen2.cpp runs exactly this code.
#include <iostream>
#include <string>
#include <vector>

#include "qwen2.hpp"

int main(int argc, char** argv) {
  return qwen2::cli::run(std::vector<std::string>(argv + 1, argv + argc), std::cout, std::cerr);
}
