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

#include "set_adapters.hpp"
#include "test_util.hpp"

using molora::Index;
using molora::RowMatrix;

namespace {

using molora_test::random_lora_adapter;
using molora_test::random_molora_adapter;
using molora_test::uniform_matrix;

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
  const std::vector<molora::SetAdapter<float>::Ptr> shared = {random_molora_adapter(in, out, 4, 2, 6, true, 1),
                                                              random_lora_adapter(in, out, 5, 2),
                                                              random_molora_adapter(in, out, 3, 3, 2, false, 3)};
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
  const RowMatrix<float> x = uniform_matrix(41, in, 9);
  CHECK(forward(loaded, x, out) == forward(shared, x, out));
  // A tenant built from the file's projections.
  molora::TenantRegistry<float> reg({{in, out}, {in, out}});
  reg.add({"from-file", {loaded[0], loaded[1]}});
  CHECK(reg.current()->projection(1).adapter(0) == loaded[1]);
}

TEST_CASE("adapter_set_io: BF16 is converted once; double sets convert F32; errors name file and key") {
  test_util::TempDir dir;
  const Index in = 16, out = 12;
  const auto a = random_molora_adapter(in, out, 2, 1, 4, true, 11);
  const std::string bf16 = dir.file("bf16.safetensors");
  molora::save_set_adapters<float>(bf16, {{"", a.get()}}, molora::io::Dtype::BF16);
  bool mapped = true;
  const auto loaded = molora::load_set_adapter<float>(molora::io::SafetensorsReader(bf16), "", 1.0, true, &mapped);
  CHECK_FALSE(mapped);
  const RowMatrix<float> x = uniform_matrix(20, in, 12);
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
