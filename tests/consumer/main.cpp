// Built against the installed package: a layer's forward, then its adapter saved in MING-MOE's
// layout and loaded back through molora::io, which must give the same adapter bit for bit.
#include <molora/io/ming_moe.hpp>
#include <molora/molora.hpp>

#include <cstdio>
#include <string>

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: consumer <scratch directory>\n");
    return 2;
  }
  molora::MoLoRAConfig c;
  c.in_features = 8;
  c.out_features = 4;
  molora::MoLoRALinear<float> layer(c);
  molora::Generator gen(1);
  layer.adapter().init_default(gen);
  for (molora::Index e = 0; e < c.num_experts; ++e)  // B = 0 after init: give the experts a delta
    layer.adapter().set_expert_B(e, molora::RowMatrix<float>::Constant(4, c.rank, 0.01f * static_cast<float>(e + 1)));
  const molora::RowMatrix<float> x = molora::RowMatrix<float>::Ones(3, 8);
  const molora::RowMatrix<float> y = layer.forward(x);

  const std::string dir = std::string(argv[1]) + "/ming_moe";
  const std::string module = "model.layers.0.mlp.up_proj";
  molora::io::save_ming_moe<float>(dir, {{module, &layer.adapter()}});
  const auto loaded = molora::io::load_ming_moe<float>(dir + "/config.json", dir + "/non_lora_trainables.safetensors");
  molora::MoLoRALinear<float> again(loaded.at(module).config());
  again.adapter() = loaded.at(module);
  const molora::RowMatrix<float> y2 = again.forward(x);  // base weight 0 in both: the delta alone

  const bool same = y.rows() == 3 && y.cols() == 4 && y2 == y && layer.adapter().expert_B(7) == again.adapter().expert_B(7);
  std::printf("molora %s consumer: y is %ldx%ld, reloaded adapter %s, kernels: %s (%s)\n", MOLORA_VERSION_STRING,
              long(y.rows()), long(y.cols()), same ? "equal" : "DIFFERENT", molora::kernels::active_isa().c_str(),
              MOLORA_RUNTIME_DISPATCH ? "chosen at run time" : "compile-time");
  return same ? 0 : 1;
}
