// A Qwen2 decoder with MING-MOE adapters (examples/qwen2.hpp): prefills a prompt of token
// ids, decodes greedily, and prints the tokens, each layer's expert load and tokens/s.
//
//   qwen2_molora MODEL_DIR [--adapter DIR] [--lora-alpha A] --prompt 5,17,250
//                --max-new-tokens N [--threads N]
//
// The last output line is the generated token ids separated by single spaces.
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

#ifdef MOLORA_USE_OPENMP
#include <omp.h>
#endif

#include "qwen2.hpp"

namespace {

const char* const kUsage =
    "usage: qwen2_molora MODEL_DIR [--adapter DIR] [--lora-alpha A] --prompt ID,ID,... "
    "--max-new-tokens N [--threads N]";

struct BadFlag : std::runtime_error {
  using std::runtime_error::runtime_error;
};

long parse_long(const std::string& flag, const std::string& text, long min) {
  std::size_t used = 0;
  long v = 0;
  try {
    v = std::stol(text, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  if (used == 0 || used != text.size() || v < min)
    throw BadFlag(flag + ": expected an integer >= " + std::to_string(min) + ", got '" + text + "'");
  return v;
}

struct Args {
  std::string model_dir;
  qwen2::AdapterOptions adapter;
  std::vector<int> prompt;
  long max_new_tokens = -1;
  long threads = 0;
};

Args parse(int argc, char** argv) {
  Args a;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) throw BadFlag(arg + ": expected a value");
      return argv[++i];
    };
    if (arg == "--adapter") {
      a.adapter.dir = value();
    } else if (arg == "--lora-alpha") {
      const std::string v = value();
      char* end = nullptr;
      const double alpha = std::strtod(v.c_str(), &end);
      if (v.empty() || *end != '\0' || !(alpha > 0) || !std::isfinite(alpha))
        throw BadFlag("--lora-alpha: expected a number > 0, got '" + v + "'");
      a.adapter.lora_alpha = alpha;
    } else if (arg == "--prompt") {
      std::stringstream ss(value());
      std::string id;
      while (std::getline(ss, id, ','))
        a.prompt.push_back(static_cast<int>(parse_long("--prompt", id, 0)));
      if (a.prompt.empty()) throw BadFlag("--prompt: expected comma-separated token ids, got none");
    } else if (arg == "--max-new-tokens") {
      a.max_new_tokens = parse_long(arg, value(), 0);
    } else if (arg == "--threads") {
      a.threads = parse_long(arg, value(), 1);
#ifndef MOLORA_USE_OPENMP
      throw BadFlag("--threads: needs the OpenMP build (configure with -DMOLORA_OPENMP=ON)");
#endif
    } else if (!arg.empty() && arg[0] == '-') {
      throw BadFlag("unknown flag '" + arg + "'");
    } else if (a.model_dir.empty()) {
      a.model_dir = arg;
    } else {
      throw BadFlag("unexpected argument '" + arg + "'");
    }
  }
  if (a.model_dir.empty()) throw BadFlag("missing MODEL_DIR");
  if (a.prompt.empty()) throw BadFlag("missing --prompt");
  if (a.max_new_tokens < 0) throw BadFlag("missing --max-new-tokens");
  return a;
}

}  // namespace

int main(int argc, char** argv) {
  Args args;
  try {
    args = parse(argc, argv);
  } catch (const BadFlag& e) {
    std::fprintf(stderr, "qwen2_molora: %s\n%s\n", e.what(), kUsage);
    return 2;
  }
#ifdef MOLORA_USE_OPENMP
  if (args.threads > 0) omp_set_num_threads(static_cast<int>(args.threads));
#endif
  try {
    qwen2::Model model(args.model_dir, args.adapter);
    const qwen2::Config& c = model.config();
    std::printf("model: %lld layers, hidden %lld, %lld heads (%lld kv), vocab %lld, %s head; %s\n",
                static_cast<long long>(c.num_hidden_layers), static_cast<long long>(c.hidden_size),
                static_cast<long long>(c.num_attention_heads), static_cast<long long>(c.num_key_value_heads),
                static_cast<long long>(c.vocab_size), c.tie_word_embeddings ? "tied" : "untied",
                model.adapted() ? "MING-MOE adapter on gate/up/down" : "no adapter");
    const qwen2::Generation g = qwen2::generate(model, args.prompt, args.max_new_tokens);

    if (model.adapted()) {
      std::printf("expert load (tokens per expert, prompt + decode) gate | up | down:\n");
      const auto& counts = model.expert_load().counts;
      for (std::size_t l = 0; l < counts.size(); ++l) {
        std::printf("  layer %zu:", l);
        for (std::size_t p = 0; p < 3; ++p) {
          std::printf(p ? " |" : "");
          for (long n : counts[l][p]) std::printf(" %ld", n);
        }
        std::printf("\n");
      }
    }
    const double prefill_rate = static_cast<double>(args.prompt.size()) / std::max(g.prefill_seconds, 1e-12);
    std::printf("prefill: %zu tokens, %.1f tokens/s\n", args.prompt.size(), prefill_rate);
    if (args.max_new_tokens > 1)  // the first token comes from the prefill's logits
      std::printf("decode: %ld steps, %.1f tokens/s\n", args.max_new_tokens - 1,
                  static_cast<double>(args.max_new_tokens - 1) / std::max(g.decode_seconds, 1e-12));
    std::string line;
    for (std::size_t i = 0; i < g.tokens.size(); ++i) line += (i ? " " : "") + std::to_string(g.tokens[i]);
    std::printf("%s\n", line.c_str());
  } catch (const std::invalid_argument& e) {
    std::fprintf(stderr, "qwen2_molora: %s\n%s\n", e.what(), kUsage);
    return 2;
  } catch (const molora::error& e) {
    std::fprintf(stderr, "qwen2_molora: %s\n", e.what());
    return 1;
  }
  return 0;
}
