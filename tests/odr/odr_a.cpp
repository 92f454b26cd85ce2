// Two translation units that include every public header: a non-inline definition in a
// header would make this fail to link.
#include <molora/molora.hpp>
#include <molora/io/safetensors.hpp>
#include <molora/io/json_config.hpp>

float odr_b(int);

float odr_a(int n) {
  molora::MoLoRAConfig c;
  c.in_features = c.out_features = n;
  c.num_experts = 2;
  c.top_k = 1;
  c.rank = 1;
  molora::MoLoRALinear<float> l(c);
  return l.forward(molora::RowMatrix<float>::Ones(1, n)).sum();
}

int main() { return odr_a(3) == 0.0f && odr_b(3) == 0.0f ? 0 : 1; }
