// Random adapters for the adapter-set tests (sets, their files, tenants, the store): a
// MoLoRA adapter with every tensor drawn uniformly from [-1, 1] and a plain LoRA, each
// wrapped as a SetAdapter<float>. Seeds make every tensor reproducible.
#pragma once

#include <cstdint>
#include <memory>
#include <random>

#include <molora/adapter_set.hpp>

#include "test_util.hpp"

namespace molora_test {

inline molora::RowMatrix<float> uniform_matrix(molora::Index rows, molora::Index cols, std::uint64_t seed) {
  std::mt19937_64 g(seed);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  molora::RowMatrix<float> m(rows, cols);
  for (molora::Index i = 0; i < m.size(); ++i) m.data()[i] = u(g);
  return m;
}

// E experts of rank r, top k; with a router bias the gates are not renormalised, without
// one they are, so both gating variants are exercised.
inline molora::SetAdapter<float>::Ptr random_molora_adapter(molora::Index in, molora::Index out, molora::Index E,
                                                            molora::Index k, molora::Index r, bool bias,
                                                            std::uint64_t seed) {
  molora::MoLoRAConfig c = test_util::config(in, out, E, k, r);
  c.router_bias = bias;
  c.normalize_top_k = !bias;
  auto a = std::make_shared<molora::MoLoRAAdapter<float>>(c);
  a->router().set_weight(uniform_matrix(E, in, seed));
  if (bias) a->router().set_bias(uniform_matrix(1, E, seed + 1));
  for (molora::Index e = 0; e < E; ++e) {
    a->set_expert_A(e, uniform_matrix(r, in, seed + 2 + std::uint64_t(e)));
    a->set_expert_B(e, uniform_matrix(out, r, seed + 50 + std::uint64_t(e)));
  }
  return molora::SetAdapter<float>::share(std::shared_ptr<const molora::MoLoRAAdapter<float>>(a));
}

// A plain LoRA of rank r, alpha = 2 r.
inline molora::SetAdapter<float>::Ptr random_lora_adapter(molora::Index in, molora::Index out, molora::Index r,
                                                          std::uint64_t seed) {
  auto l = std::make_shared<molora::LoRA<float>>(in, out, r, 2.0 * double(r));
  l->set_A(uniform_matrix(r, in, seed));
  l->set_B(uniform_matrix(out, r, seed + 1));
  return molora::SetAdapter<float>::share(std::shared_ptr<const molora::LoRA<float>>(l));
}

}  // namespace molora_test
