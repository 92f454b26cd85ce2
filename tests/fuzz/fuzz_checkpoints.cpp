// libFuzzer target: the three checkpoint loaders (PEFT LoRA, MING-MOE, MixLoRA) fed a config
// and a safetensors file cut from the input, then a small forward through whatever loaded.
// molora::error is the only exception allowed out; anything else is a finding.
//
// Input: byte 0 = options (bits 0-1 format: 0 PEFT, 1 MING-MOE, 2 MixLoRA, 3 MING-MOE with
// alpha from the options; bit 2 Load::read instead of mmap; bit 3 double instead of float;
// bit 4 MixLoRA layer 1 instead of 0; bits 5-6, float only: 1 keep the adapter's weights in
// bf16, 2 in f16, as the 16-bit loaders do), bytes 1-2 = config length L (little-endian), then L
// bytes of config JSON, then the safetensors bytes. Both go to files in a scratch directory
// because the loaders take paths.
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>

#include <unistd.h>

#include <molora/io/checkpoint.hpp>

namespace {

// A directory of its own per process, emptied and removed at exit.
struct Scratch {
  std::string dir;
  Scratch() {
    char tmpl[] = "/tmp/molora_fuzz_ckpt_XXXXXX";
    if (!::mkdtemp(tmpl)) std::abort();
    dir = tmpl;
  }
  ~Scratch() {
    std::remove((dir + "/config.json").c_str());
    std::remove((dir + "/weights.safetensors").c_str());
    ::rmdir(dir.c_str());
  }
};

const std::string& scratch_dir() {
  static const Scratch s;
  return s.dir;
}

void write_file(const std::string& path, const std::uint8_t* p, std::size_t n) {
  std::FILE* f = std::fopen(path.c_str(), "wb");
  if (!f) std::abort();
  if (n && std::fwrite(p, 1, n, f) != n) std::abort();
  std::fclose(f);
}

template <class Scalar>
molora::RowMatrix<Scalar> tokens(molora::Index in) {
  return molora::RowMatrix<Scalar>::Constant(2, in, Scalar(0.5));  // [2, in]
}

template <class Scalar, class Weight = Scalar>
void run(unsigned opts, const std::string& cfg, const std::string& weights) {
  using molora::Index;
  const molora::io::Load load = (opts & 4) ? molora::io::Load::read : molora::io::Load::map;
  switch (opts & 3) {
    case 0: {
      const auto peft = molora::io::load_peft_lora<Scalar, Weight>(cfg, weights, load);
      for (const auto& [name, lora] : peft.modules) {
        const molora::RowMatrix<Scalar> d = lora.delta(tokens<Scalar>(lora.in_features()));  // [2, out]
        if (d.rows() != 2 || d.cols() != lora.out_features()) __builtin_trap();
      }
      break;
    }
    case 1:
    case 3: {
      molora::io::MingMoeLoadOptions o;
      o.load = load;
      if ((opts & 3) == 3) o.lora_alpha = 16.0;
      const auto ming = molora::io::load_ming_moe<Scalar, Weight>(cfg, weights, o);
      for (const auto& [name, adapter] : ming.modules) {
        molora::RowMatrix<Scalar> y = molora::RowMatrix<Scalar>::Zero(2, adapter.out_features());  // [2, out]
        try {
          adapter.add_delta(tokens<Scalar>(adapter.in_features()), y);
        } catch (const molora::numeric_error&) {  // huge but finite weights may overflow
        }
      }
      break;
    }
    default: {
      const auto mcfg = molora::io::MixLoRAConfig::from_file(cfg);
      const molora::io::SafetensorsReader r(weights, load);
      const Index layer = (opts & 16) ? 1 : 0;
      const std::string p = molora::detail::cat("mixlora.layers.", layer, ".mlp.");
      // Base FFN sizes from the file where it says them (the loader checks them again).
      Index hidden = 3, inter = 5;
      if (r.has(p + "moe_gate.weight") && r.info(p + "moe_gate.weight").shape.size() == 2)
        hidden = static_cast<Index>(r.info(p + "moe_gate.weight").shape[1]);
      const std::string kb = p + "gate_proj.experts.0.lora_B.weight";
      if (r.has(kb) && !r.info(kb).shape.empty()) inter = static_cast<Index>(r.info(kb).shape[0]);
      if (hidden < 1 || inter < 1 || hidden > 4096 || inter > 4096) return;
      const molora::RowMatrix<Scalar> wg = molora::RowMatrix<Scalar>::Constant(inter, hidden, Scalar(0.01));  // [inter, hidden]
      const molora::RowMatrix<Scalar> wd = molora::RowMatrix<Scalar>::Constant(hidden, inter, Scalar(0.01));  // [hidden, inter]
      const auto ffn = molora::io::load_mixlora_ffn<Scalar, Weight>(mcfg, r, layer, wg, wg, wd);
      try {
        const molora::RowMatrix<Scalar> y = ffn.forward(tokens<Scalar>(hidden));  // [2, hidden]
        if (y.rows() != 2 || y.cols() != hidden) __builtin_trap();
      } catch (const molora::numeric_error&) {
      }
      break;
    }
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size < 3) return 0;
  const unsigned opts = data[0];
  std::size_t len = static_cast<std::size_t>(data[1]) | (static_cast<std::size_t>(data[2]) << 8);
  if (len > size - 3) len = size - 3;
  const std::string& dir = scratch_dir();
  const std::string cfg = dir + "/config.json", weights = dir + "/weights.safetensors";
  write_file(cfg, data + 3, len);
  write_file(weights, data + 3 + len, size - 3 - len);
  try {
    if (opts & 8)
      run<double>(opts, cfg, weights);
    else if (((opts >> 5) & 3) == 1)
      run<float, molora::bf16>(opts, cfg, weights);
    else if (((opts >> 5) & 3) == 2)
      run<float, molora::f16>(opts, cfg, weights);
    else
      run<float>(opts, cfg, weights);
  } catch (const molora::error&) {
  }
  return 0;
}
