// Set adapters saved in molora's set-adapter layout and loaded back: an F32 file is mapped
// and used in place (the set's output is bitwise the shared adapter's), BF16 is converted
// once (output within BF16's rounding), a tenant's projections live under prefixes of one
// file, the mapping outlives the reader, and malformed files name the file and the key.
#include <doctest/doctest.h>

#include <memory>
#include <random>
#include <string>
#include <vector>

#include <molora/io/adapter_set.hpp>
#include <molora/tenants.hpp>

#include "test_util.hpp"

using molora::Index;
using molora::RowMatrix;

namespace {

RowMatrix<float> random_matrix(Index rows, Index cols, std::uint64_t seed) {
  std::mt19937_64 g(seed);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  RowMatrix<float> m(rows, cols);
  for (Index i = 0; i < m.size(); ++i) m.data()[i] = u(g);
  return m;
}

molora::SetAdapter<float>::Ptr molora_adapter(Index in, Index out, Index E, Index k, Index r, bool bias,
                                              std::uint64_t seed) {
  molora::MoLoRAConfig c;
  c.in_features = in;
  c.out_features = out;
  c.num_experts = E;
  c.top_k = k;
  c.rank = r;
  c.router_bias = bias;
  c.normalize_top_k = !bias;
  auto a = std::make_shared<molora::MoLoRAAdapter<float>>(c);
  a->router().set_weight(random_matrix(E, in, seed));
  if (bias) a->router().set_bias(random_matrix(1, E, seed + 1));
  for (Index e = 0; e < E; ++e) {
    a->set_expert_A(e, random_matrix(r, in, seed + 2 + std::uint64_t(e)));
    a->set_expert_B(e, random_matrix(out, r, seed + 50 + std::uint64_t(e)));
  }
  return molora::SetAdapter<float>::share(std::shared_ptr<const molora::MoLoRAAdapter<float>>(a));
}

molora::SetAdapter<float>::Ptr lora_adapter(Index in, Index out, Index r, std::uint64_t seed) {
  auto l = std::make_shared<molora::LoRA<float>>(in, out, r, 8.0);
  l->set_A(random_matrix(r, in, seed));
  l->set_B(random_matrix(out, r, seed + 1));
  return molora::SetAdapter<float>::share(std::shared_ptr<const molora::LoRA<float>>(l));
}

RowMatrix<float> forward(const std::vector<molora::SetAdapter<float>::Ptr>& adapters, const RowMatrix<float>& x,
                         Index out) {
  const molora::AdapterSet<float> set(x.cols(), out, adapters);
  std::vector<std::int32_t> ids;
  for (Index t = 0; t < x.rows(); ++t) ids.push_back(static_cast<std::int32_t>(t % (set.size() + 1)) - 1);
  RowMatrix<float> y = RowMatrix<float>::Zero(x.rows(), out);
  molora::AdapterSetWorkspace<float> ws;
  set.add_delta(x, ids, y, ws);
  return y;
}

}  // namespace

TEST_CASE("adapter_set_io: an F32 file is mapped and used in place, bitwise as the shared adapters") {
  test_util::TempDir dir;
  const Index in = 45, out = 38;
  const std::vector<molora::SetAdapter<float>::Ptr> shared = {molora_adapter(in, out, 4, 2, 6, true, 1),
                                                              lora_adapter(in, out, 5, 2),
                                                              molora_adapter(in, out, 3, 3, 2, false, 3)};
  const std::string path = dir.file("tenant.safetensors");
  molora::save_set_adapters<float>(path, {{"q_proj", shared[0].get()}, {"v_proj", shared[1].get()}, {"o", shared[2].get()}});
  std::vector<molora::SetAdapter<float>::Ptr> loaded;
  {
    const molora::io::SafetensorsReader file(path);  // the adapters keep the mapping after it goes
    for (const char* prefix : {"q_proj", "v_proj", "o"}) {
      bool mapped = false;
      loaded.push_back(molora::load_set_adapter<float>(file, prefix, 1.0, true, &mapped));
      CHECK(mapped);
    }
  }
  CHECK(loaded[0]->num_experts() == 4);
  CHECK(loaded[0]->top_k() == 2);
  CHECK(loaded[1]->num_experts() == 1);
  CHECK_FALSE(loaded[1]->has_router());
  CHECK(loaded[2]->views().router_bias == nullptr);
  CHECK(loaded[2]->views().normalize_top_k);
  CHECK_FALSE(loaded[0]->views().normalize_top_k);
  CHECK(loaded[0]->effective_scaling() == shared[0]->effective_scaling());
  const RowMatrix<float> x = random_matrix(41, in, 9);
  CHECK(forward(loaded, x, out) == forward(shared, x, out));
  // A tenant built from the file's projections.
  molora::TenantRegistry<float> reg({{in, out}, {in, out}});
  reg.add({"from-file", {loaded[0], loaded[1]}});
  CHECK(reg.current()->projection(1).adapter(0) == loaded[1]);
}

TEST_CASE("adapter_set_io: BF16 is converted once; double sets convert F32; errors name file and key") {
  test_util::TempDir dir;
  const Index in = 16, out = 12;
  const auto a = molora_adapter(in, out, 2, 1, 4, true, 11);
  const std::string bf16 = dir.file("bf16.safetensors");
  molora::save_set_adapters<float>(bf16, {{"", a.get()}}, molora::io::Dtype::BF16);
  bool mapped = true;
  const auto loaded = molora::load_set_adapter<float>(molora::io::SafetensorsReader(bf16), "", 1.0, true, &mapped);
  CHECK_FALSE(mapped);
  const RowMatrix<float> x = random_matrix(20, in, 12);
  const RowMatrix<float> y_ref = forward({a}, x, out), y_bf16 = forward({loaded}, x, out);
  CHECK((y_bf16 - y_ref).norm() <= 0.05 * y_ref.norm());  // bf16 keeps 8 bits of mantissa
  const std::string f32 = dir.file("f32.safetensors");
  molora::save_set_adapters<float>(f32, {{"p", a.get()}});
  const auto as_double = molora::load_set_adapter<double>(molora::io::SafetensorsReader(f32), "p", 1.0, true, &mapped);
  CHECK_FALSE(mapped);
  CHECK(as_double->rank() == 4);
  CHECK_THROWS_WITH_AS(molora::load_set_adapter<float>(molora::io::SafetensorsReader(f32), "q"),
                       doctest::Contains("set adapter 'q': metadata q.num_experts: expected a value, got none"),
                       molora::format_error);
}
