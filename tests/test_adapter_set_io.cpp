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

#include <molora/adapter_set_backward.hpp>
#include <molora/io/adapter_set.hpp>
#include <molora/tenants.hpp>

#include "set_adapters.hpp"
#include "test_util.hpp"

namespace test_adapter_set_io {

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

TEST_CASE("adapter_set_io: 16-bit adapters and files keep their experts in 16 bits, bitwise as widened") {
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
  auto lh = std::make_shared<molora::LoRA<float, bf16>>(in, out, 3, 7.0);
  lh->set_A(molora_test::uniform_matrix(3, in, 41));
  lh->set_B(molora_test::uniform_matrix(out, 3, 42));
  auto lw = std::make_shared<molora::LoRA<float>>(in, out, 3, 7.0);
  lw->set_A(lh->widened_A());
  lw->set_B(lh->widened_B());
  const RowMatrix<float> x = uniform_matrix(43, in, 44);
  using SA = molora::SetAdapter<float>;

  // share() of 16-bit adapters: the experts used in place, bitwise the set over the float
  // adapters holding the widened weights.
  const auto h = std::make_shared<const molora::MoLoRAAdapter<float, bf16>>(molora::convert_adapter<bf16>(a));
  const auto hf = std::make_shared<const molora::MoLoRAAdapter<float, f16>>(molora::convert_adapter<f16>(a));
  const auto wide = std::make_shared<const molora::MoLoRAAdapter<float>>(molora::convert_adapter<float>(*h));
  const auto wide_f = std::make_shared<const molora::MoLoRAAdapter<float>>(molora::convert_adapter<float>(*hf));
  const std::vector<SA::Ptr> kept = {SA::share(h), SA::share(std::shared_ptr<const molora::LoRA<float, bf16>>(lh), 0.5),
                                     SA::share(hf)};
  const std::vector<SA::Ptr> shared = {SA::share(wide), SA::share(std::shared_ptr<const molora::LoRA<float>>(lw), 0.5),
                                       SA::share(wide_f)};
  CHECK(kept[0]->molora_adapter() == nullptr);
  CHECK(kept[1]->lora() == nullptr);
  CHECK(kept[0]->views().A.empty());
  CHECK(kept[0]->views().A_bf16[1] == h->stacked_A_data() + r * in);  // no copy
  CHECK(kept[1]->views().Bt_bf16[0] == lh->B_data());
  CHECK(kept[2]->views().A_f16[2] == hf->stacked_A_data() + 2 * r * in);
  CHECK(kept[0]->expert_bytes() == std::size_t(r * (in + out) * 2));
  CHECK(shared[0]->expert_bytes() == std::size_t(r * (in + out) * 4));
  CHECK(kept[1]->effective_scaling() == shared[1]->effective_scaling());
  const RowMatrix<float> y = forward(kept, x, out);
  CHECK(y == forward(shared, x, out));
  CHECK(y != forward({SA::share(std::make_shared<const molora::MoLoRAAdapter<float>>(a)), shared[1], shared[2]}, x, out));
  // The LoRA's tokens (ids % 4 == 2) against a loop-by-loop double reference.
  const RowMatrix<float> wa = lh->widened_A(), wb = lh->widened_B();
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
  // One token, odd sizes: the same bits.
  CHECK(forward(kept, x.topRows(1), out) == forward(shared, x.topRows(1), out));

  // A BF16 file of those adapters holds their bits; loaded widened (load_set_adapter<float>)
  // or kept (<float, bf16>: experts in place), the set's output is the same.
  test_util::TempDir dir;
  const std::string path = dir.file("bf16.safetensors");
  molora::save_set_adapters<float>(path, {{"m", kept[0].get()}, {"l", kept[1].get()}}, Dtype::BF16);
  const molora::io::SafetensorsReader file(path);
  CHECK(std::memcmp(file.bytes("m.experts.A"), h->stacked_A_data(), std::size_t(E * r * in) * 2) == 0);
  CHECK(std::memcmp(file.bytes("m.experts.Bt"), h->stacked_B_data(), std::size_t(E * r * out) * 2) == 0);
  CHECK(std::memcmp(file.bytes("m.router.weight"), h->router().weight_data(), std::size_t(E * in) * 2) == 0);
  for (const bool keep : {false, true}) {
    CAPTURE(keep);
    bool mapped = true;
    const auto m = keep ? molora::load_set_adapter<float, bf16>(file, "m", 1.0, true, &mapped)
                        : molora::load_set_adapter<float>(file, "m", 1.0, true, &mapped);
    CHECK_FALSE(mapped);  // the BF16 router is widened either way
    const auto l = keep ? molora::load_set_adapter<float, bf16>(file, "l", 0.5, true, &mapped)
                        : molora::load_set_adapter<float>(file, "l", 0.5, true, &mapped);
    CHECK(mapped == keep);  // a LoRA has no router: kept, its experts are used in place
    CHECK(m->views().A_bf16.size() == (keep ? std::size_t(E) : 0));
    if (keep) CHECK(static_cast<const void*>(l->views().A_bf16[0]) == static_cast<const void*>(file.bytes("l.experts.A")));
    CHECK(forward({m, l, shared[2]}, x, out) == y);
  }

  // A mixed file (router F32, A BF16, Bt F16, bias F64): each tensor as the file says.
  const std::string mixed = dir.file("mixed.safetensors");
  auto write_mixed = [&](const std::string& to, Dtype a_dtype, Dtype bt_dtype, Dtype bias_dtype, float poke) {
    std::vector<molora::io::TensorToWrite> t;
    const auto dtype = [&](const std::string& n) {
      return n == "router.weight" ? Dtype::F32 : n == "experts.A" ? a_dtype : n == "experts.Bt" ? bt_dtype : bias_dtype;
    };
    for (const char* n : {"router.weight", "router.bias", "experts.A", "experts.Bt"}) {
      RowMatrix<float> v = file.matrix<float>(std::string("m.") + n);  // a 1-D tensor as a column
      if (std::string(n) == "experts.A" && poke != 0) v(1, 2) = poke;
      t.push_back(molora::io::make_tensor<float>(n, file.info(std::string("m.") + n).shape, v.data(), dtype(n)));
    }
    std::map<std::string, std::string> meta;
    for (const auto& [k, val] : file.metadata())
      if (k.rfind("m.", 0) == 0) meta[k.substr(2)] = val;
    meta["molora.format"] = "set_adapter";
    molora::io::save_safetensors(to, std::move(t), meta);
  };
  write_mixed(mixed, Dtype::BF16, Dtype::F16, Dtype::F64, 0);
  const molora::io::SafetensorsReader mf(mixed);
  bool mapped = false;
  const auto kb = molora::load_set_adapter<float, bf16>(mf, "", 1.0, true, &mapped);
  CHECK_FALSE(mapped);  // Bt rounded into bf16
  const auto kf = molora::load_set_adapter<float, f16>(mf, "", 1.0, true, &mapped);
  CHECK_FALSE(mapped);  // A rounded into f16
  const auto wf = molora::load_set_adapter<float>(mf, "", 1.0, true, &mapped);
  CHECK_FALSE(mapped);
  const RowMatrix<float> fa = mf.matrix<float>("experts.A"), fbt = mf.matrix<float>("experts.Bt");
  bool a_kept = true, bt_rounded = true, a_rounded = true, bt_kept = true;
  for (Index i = 0; i < fa.size(); ++i) {
    a_kept = a_kept && kb->views().A_bf16[0][i].bits == molora::to_bf16(fa.data()[i]).bits;
    a_rounded = a_rounded && kf->views().A_f16[0][i].bits == molora::to_f16(fa.data()[i]).bits;
  }
  for (Index i = 0; i < fbt.size(); ++i) {
    bt_rounded = bt_rounded && kb->views().Bt_bf16[0][i].bits == molora::to_bf16(fbt.data()[i]).bits;
    bt_kept = bt_kept && kf->views().Bt_f16[0][i].bits == molora::to_f16(fbt.data()[i]).bits;
  }
  CHECK(a_kept);
  CHECK(bt_rounded);
  CHECK(a_rounded);
  CHECK(bt_kept);
  CHECK(static_cast<const void*>(kb->views().A_bf16[0]) == static_cast<const void*>(mf.bytes("experts.A")));
  CHECK(static_cast<const void*>(kf->views().Bt_f16[0]) == static_cast<const void*>(mf.bytes("experts.Bt")));
  CHECK(Eigen::Map<const RowMatrix<float>>(wf->views().A[0], E * r, in) == fa);
  CHECK(Eigen::Map<const RowMatrix<float>>(kb->views().router_weight, E, in) == mf.matrix<float>("router.weight"));
  // The f16 experts are exactly the widened float ones here (bf16 values fit f16 once Bt went
  // through f16): bitwise the widened set.
  CHECK(forward({kf}, x, out) == forward({wf}, x, out));

  // Router and experts in the kept dtype: every tensor used in place.
  const std::string all_mapped = dir.file("mapped.safetensors");
  write_mixed(all_mapped, Dtype::BF16, Dtype::BF16, Dtype::F32, 0);
  (void)molora::load_set_adapter<float, bf16>(molora::io::SafetensorsReader(all_mapped), "", 1.0, true, &mapped);
  CHECK(mapped);
  // An F32 experts value past f16's range: numeric_error naming the file and the tensor.
  const std::string over = dir.file("over.safetensors");
  write_mixed(over, Dtype::F32, Dtype::BF16, Dtype::F32, 1e5f);
  const std::string msg = test_util::message_of<molora::numeric_error>(
      [&] { (void)molora::load_set_adapter<float, f16>(molora::io::SafetensorsReader(over)); });
  test_util::check_contains(msg, {"over.safetensors", "experts.A", "[1, 2]", "100000"});
  CHECK_NOTHROW((void)molora::load_set_adapter<float, bf16>(molora::io::SafetensorsReader(over)));
  // Training a set needs float adapters: a 16-bit one is refused, naming it.
  {
    const molora::AdapterSet<float> set(in, out, {shared[0], kept[0]});
    std::vector<std::int32_t> ids(std::size_t(x.rows()), 1);
    RowMatrix<float> yt = RowMatrix<float>::Zero(x.rows(), out);
    molora::AdapterSetTape<float> tape;
    CHECK_THROWS_WITH_AS(molora::forward_train(set, x, ids, yt, tape), doctest::Contains("adapter 1 (training)"),
                         molora::config_error);
  }
  // The store's loader keeps 16 bits too.
  const auto loader = molora::set_adapter_loader<float, bf16>(path, "l", 0.5);
  CHECK(loader()->views().A_bf16.size() == 1);
}

}  // namespace test_adapter_set_io
