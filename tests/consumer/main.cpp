#include <molora/molora.hpp>

#include <cstdio>

int main() {
  molora::MoLoRAConfig c;
  c.in_features = 8;
  c.out_features = 4;
  molora::MoLoRALinear<float> layer(c);
  molora::Generator gen(1);
  layer.adapter().init_default(gen);
  const molora::RowMatrix<float> y = layer.forward(molora::RowMatrix<float>::Ones(3, 8));
  std::printf("molora %s consumer: y is %ldx%ld, kernels: %s (%s)\n", MOLORA_VERSION_STRING, long(y.rows()),
              long(y.cols()), molora::kernels::active_isa().c_str(),
              MOLORA_RUNTIME_DISPATCH ? "chosen at run time" : "compile-time");
  return y.rows() == 3 && y.cols() == 4 ? 0 : 1;
}
