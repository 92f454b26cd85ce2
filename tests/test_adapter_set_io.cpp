// Set adapters saved in molora's set-adapter layout and loaded back: an F32 file is mapped
// and used in place (the set's output is bitwise the shared adapter's), BF16 is converted
// once (output within BF16's rounding), a tenant's projections live under prefixes of one
// file, the mapping outlives the reader, and malformed files name the file and the key;
// 16-bit adapters (SetAdapter::widen) and 16-bit or mixed files are widened exactly.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <map>
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

TEST_CASE("adapter_set_io: 16-bit adapters and files are widened once, exactly; a mixed file per tensor") {
  using molora::bf16;
  using molora::f16;
  using molora::io::Dtype;
  const Index in = 37, out = 29, E = 3, r = 5;
  molora::MoLoRAConfig c = test_util::config(in, out, E, 2, r);
  c.router_bias = true;
  molora::MoLoRAAdapter<float> a(c);
  a.router().set_weight(molora_test::uniform_matrix(E, in, 21));
  // The router bias stays float in a 16-bit adapter and a BF16 file rounds it: bf16-exact
  // values here, so that the file below holds the adapter exactly.
  RowMatrix<float> bias = molora_test::uniform_matrix(1, E, 22);
  for (Index e = 0; e < E; ++e) bias(0, e) = molora::to_float(molora::to_bf16(bias(0, e)));
  a.router().set_bias(bias);
  for (Index e = 0; e < E; ++e) {
    a.set_expert_A(e, molora_test::uniform_matrix(r, in, 23 + std::uint64_t(e)));
    a.set_expert_B(e, molora_test::uniform_matrix(out, r, 33 + std::uint64_t(e)));
  }
  molora::LoRA<float, bf16> lh(in, out, 3, 7.0);
  lh.set_A(molora_test::uniform_matrix(3, in, 41));
  lh.set_B(molora_test::uniform_matrix(out, 3, 42));
  auto lw = std::make_shared<molora::LoRA<float>>(in, out, 3, 7.0);
  lw->set_A(lh.widened_A());
  lw->set_B(lh.widened_B());
  const RowMatrix<float> x = uniform_matrix(43, in, 44);
  using SA = molora::SetAdapter<float>;

  // widen(): bitwise the set over the float adapters holding the widened weights.
  const auto h = molora::convert_adapter<bf16>(a);
  const auto hf = molora::convert_adapter<f16>(a);
  const auto wide = std::make_shared<const molora::MoLoRAAdapter<float>>(molora::convert_adapter<float>(h));
  const auto wide_f = std::make_shared<const molora::MoLoRAAdapter<float>>(molora::convert_adapter<float>(hf));
  const std::vector<SA::Ptr> kept = {SA::widen(h), SA::widen(lh, 0.5), SA::widen(hf)};
  const std::vector<SA::Ptr> shared = {SA::share(wide), SA::share(std::shared_ptr<const molora::LoRA<float>>(lw), 0.5),
                                       SA::share(wide_f)};
  CHECK(kept[0]->molora_adapter() == nullptr);
  CHECK(kept[1]->lora() == nullptr);
  CHECK(kept[1]->effective_scaling() == shared[1]->effective_scaling());
  const RowMatrix<float> y = forward(kept, x, out);
  CHECK(y == forward(shared, x, out));
  CHECK(y != forward({SA::share(std::make_shared<const molora::MoLoRAAdapter<float>>(a)), shared[1], shared[2]}, x, out));
  // The LoRA's tokens (ids % 4 == 2) against a loop-by-loop double reference.
  const RowMatrix<float> wa = lh.widened_A(), wb = lh.widened_B();
  double err = 0, big = 0;
  for (Index t = 2; t < x.rows(); t += 4)
    for (Index o = 0; o < out; ++o) {
      double want = 0;
      for (Index j = 0; j < 3; ++j) {
        double hj = 0;
        for (Index i = 0; i < in; ++i) hj += double(wa(j, i)) * double(x(t, i));
        want += 0.5 * (7.0 / 3.0) * double(wb(o, j)) * hj;
      }
      err = std::max(err, std::abs(double(y(t, o)) - want));
      big = std::max(big, std::abs(want));
    }
  CHECK(err <= 1e-5 * big);

  // A BF16 file of those weights holds their bits; loaded, it is converted once, exactly.
  test_util::TempDir dir;
  const std::string path = dir.file("bf16.safetensors");
  molora::save_set_adapters<float>(path, {{"m", kept[0].get()}, {"l", kept[1].get()}}, Dtype::BF16);
  const molora::io::SafetensorsReader file(path);
  CHECK(std::memcmp(file.bytes("m.experts.A"), h.stacked_A_data(), std::size_t(E * r * in) * 2) == 0);
  CHECK(std::memcmp(file.bytes("m.router.weight"), h.router().weight_data(), std::size_t(E * in) * 2) == 0);
  bool mapped = true;
  const auto loaded = molora::load_set_adapter<float>(file, "m", 1.0, true, &mapped);
  CHECK_FALSE(mapped);
  const auto loaded_l = molora::load_set_adapter<float>(file, "l", 0.5, true, &mapped);
  CHECK(forward({loaded, loaded_l, shared[2]}, x, out) == y);


  // A mixed file (router F32, A BF16, Bt F16, bias F64): each tensor as the file says.
  const std::string mixed = dir.file("mixed.safetensors");
  {
    std::vector<molora::io::TensorToWrite> t;
    const auto dtype = [](const std::string& n) {
      return n == "router.weight" ? Dtype::F32 : n == "experts.A" ? Dtype::BF16 : n == "experts.Bt" ? Dtype::F16 : Dtype::F64;
    };
    for (const char* n : {"router.weight", "router.bias", "experts.A", "experts.Bt"}) {
      const auto& info = file.info(std::string("m.") + n);
      const RowMatrix<float> m = file.matrix<float>(std::string("m.") + n);  // [rows, cols] (a 1-D tensor as a column)
      t.push_back(molora::io::make_tensor<float>(n, info.shape, m.data(), dtype(n)));
    }
    std::map<std::string, std::string> meta;
    for (const auto& [k, v] : file.metadata())
      if (k.rfind("m.", 0) == 0) meta[k.substr(2)] = v;
    meta["molora.format"] = "set_adapter";
    molora::io::save_safetensors(mixed, std::move(t), meta);
  }
  const molora::io::SafetensorsReader mf(mixed);
  CHECK(mf.info("experts.Bt").dtype == Dtype::F16);
  const auto lm = molora::load_set_adapter<float>(mf, "", 1.0, true, &mapped);
  CHECK_FALSE(mapped);
  const auto& v = lm->views();
  CHECK(Eigen::Map<const RowMatrix<float>>(v.router_weight, E, in) == mf.matrix<float>("router.weight"));
  CHECK(Eigen::Map<const RowMatrix<float>>(v.A[0], E * r, in) == mf.matrix<float>("experts.A"));
  CHECK(Eigen::Map<const RowMatrix<float>>(v.Bt[0], E * r, out) == mf.matrix<float>("experts.Bt"));
  CHECK(Eigen::Map<const RowMatrix<float>>(v.A[0], E * r, in) == Eigen::Map<const RowMatrix<float>>(loaded->views().A[0], E * r, in));
  // Bt went through f16: its values are the bf16-exact ones rounded to f16.
  const RowMatrix<float> bt = mf.matrix<float>("experts.Bt");
  const RowMatrix<float> bt16 = file.matrix<float>("m.experts.Bt");
  bool all_rounded = true;
  for (Index i = 0; i < bt.size(); ++i) all_rounded = all_rounded && bt.data()[i] == molora::to_float(molora::to_f16(bt16.data()[i]));
  CHECK(all_rounded);
}
