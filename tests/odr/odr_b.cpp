#include <molora/molora.hpp>
#include <molora/io/safetensors.hpp>
#include <molora/io/json_config.hpp>

float odr_b(int n) {
  molora::MoLoRAConfig c;
  c.in_features = c.out_features = n;
  c.num_experts = 2;
  c.top_k = 1;
  c.rank = 1;
  molora::MoLoRALinear<float> l(c);
  return l.forward(molora::RowMatrix<float>::Ones(2, n)).sum();
}
