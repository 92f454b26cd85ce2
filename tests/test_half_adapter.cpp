// An adapter whose router and experts are stored in bf16 / f16 (MoLoRAAdapter<float, W>):
// its output equals bit for bit the float adapter's holding the widened weights (both
// through strategy fused), for every ISA (ctest runs this binary once per ISA, forced by
// MOLORA_ISA), T = 1..20 and above 128, odd shapes; the tile kernels with 16-bit weights
// equal the float kernels on the widened values; setting rounds to nearest even and rejects
// f16 overflow and non-finite stored values, naming the tensor and index; the conversions
// round and widen exactly. The outputs are also checked against the plain double reference.
#include <doctest/doctest.h>

#include <cmath>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

#include <molora/kernels/dispatched.hpp>
#include <molora/molora.hpp>

#include "reference.hpp"
#include "test_util.hpp"

namespace test_half_adapter {

using molora::bf16;
using molora::f16;
using molora::Index;

namespace {

struct Shape {
  Index in, out, E, k, r;
  bool router_bias;
};

// Odd sizes (tails of every SIMD width), 1s, ranks below and above a register block,
// out >= 256 (the experts' column split at decode), dense routing (k == E).
const Shape kShapes[] = {{1, 1, 1, 1, 1, false},      {37, 29, 4, 2, 3, true},   {130, 67, 8, 2, 17, true},
                         {261, 256, 4, 4, 16, false}, {17, 1031, 5, 2, 7, true}, {300, 200, 3, 3, 2, false},
                         {64, 48, 6, 1, 9, true}};

template <class W>
const char* type_name() {
  return molora::detail::weight_type_name<W>();
}

// A float layer with random weights whose adapter has gone through W and back: it holds
// exactly the values a W adapter stores.
molora::MoLoRALinear<float> rounded_layer(const Shape& sh, std::uint64_t seed, bool to_f16) {
  auto cfg = test_util::config(sh.in, sh.out, sh.E, sh.k, sh.r);
  cfg.router_bias = sh.router_bias;
  auto l = ref::random_layer<float>(cfg, seed);
  if (to_f16)
    l.adapter() = molora::convert_adapter<float>(molora::convert_adapter<f16>(l.adapter()));
  else
    l.adapter() = molora::convert_adapter<float>(molora::convert_adapter<bf16>(l.adapter()));
  l.set_strategy(molora::Strategy::fused);
  return l;
}

template <class W>
void check_forward_bitwise() {
  for (const Shape& sh : kShapes) {
    const auto f32 = rounded_layer(sh, 7 + std::uint64_t(sh.in * 31 + sh.out), std::is_same_v<W, f16>);
    molora::MoLoRALinear<float, float, W> h(f32.config());
    h.set_base_weight(f32.base_weight());
    h.set_base_bias(f32.base_bias());
    h.adapter() = molora::convert_adapter<W>(f32.adapter());
    const ref::Layer want = ref::from_layer(f32);
    molora::MoLoRAWorkspace<float> ws_f, ws_h;
    std::vector<Index> Ts;
    for (Index T = 1; T <= 20; ++T) Ts.push_back(T);
    for (Index T : {64, 129, 300}) Ts.push_back(T);
    for (Index T : Ts) {
      INFO(type_name<W>(), " in=", sh.in, " out=", sh.out, " E=", sh.E, " k=", sh.k, " r=", sh.r, " T=", T,
           " isa=", molora::kernels::active_isa());
      const auto x = ref::random_x<float>(T, sh.in, 100 + std::uint64_t(T));
      // The adapter alone, added into a non-zero y.
      molora::RowMatrix<float> yf = ref::random_x<float>(T, sh.out, 5), yh = yf;
      const auto& rf = f32.adapter().add_delta(x, yf, ws_f);
      const auto& rh = h.adapter().add_delta(x, yh, ws_h);
      bool same_routing = true;
      for (Index t = 0; t < T; ++t)
        for (Index j = 0; j < rf.top_k(); ++j)
          same_routing = same_routing && rf.ids(t, j) == rh.ids(t, j) &&
                         std::memcmp(&rf.weights(t, j), &rh.weights(t, j), sizeof(float)) == 0;
      CHECK(same_routing);
      CHECK(test_util::same_bits(yf, yh));
      // The whole layer, and against the double reference.
      molora::RowMatrix<float> lf(T, sh.out), lh(T, sh.out);
      f32.forward(x, lf, ws_f);
      h.forward(x, lh, ws_h);
      CHECK(test_util::same_bits(lf, lh));
      CHECK(ref::rel_err(lh, ref::forward(want, ref::from_eigen(x))) < 1e-4);
      // Caller routing and one expert on chosen rows.
      molora::RowMatrix<float> zf = molora::RowMatrix<float>::Zero(T, sh.out), zh = zf;
      f32.adapter().add_delta_routed(x, ws_f.routing, zf, ws_f);
      h.adapter().add_delta_routed(x, ws_f.routing, zh, ws_h);
      CHECK(test_util::same_bits(zf, zh));
      const molora::RowMatrix<float> scales = ref::random_x<float>(T, 1, 9);
      molora::RowMatrix<float> ef = molora::RowMatrix<float>::Zero(T, sh.out), eh = ef;
      f32.adapter().apply_expert(sh.E - 1, x, ef, scales, ws_f);
      h.adapter().apply_expert(sh.E - 1, x, eh, scales, ws_h);
      CHECK(test_util::same_bits(ef, eh));
    }
  }
}

// The tile kernels directly: W weights against float weights holding the widened values.
template <class W>
void check_kernels_bitwise() {
  namespace k = molora::kernels;
  molora::Generator gen(3);
  // out = in + 5, and two widths where one token's expand takes other blocks for 16-bit
  // weights than for float (rank rows 2 KiB apart against 4 KiB: one vector against 8 per
  // block; 4 KiB against 8 KiB: 8 vectors both).
  const std::pair<Index, Index> shapes[] = {{1, 6},     {3, 8},     {16, 21},   {17, 22},  {63, 68},
                                            {130, 135}, {700, 705}, {33, 1024}, {33, 2048}};
  for (const auto& shape : shapes)
    for (Index r : {1, 2, 5, 8, 13})
      for (Index n : {1, 2, 3, 4, 5, 8, 9}) {
        const Index in = shape.first, out = shape.second;  // not a structured binding: INFO captures it
        std::vector<W> a(std::size_t(r * in)), bt(std::size_t(r * out));
        std::vector<float> af(a.size()), btf(bt.size());
        for (std::size_t i = 0; i < a.size(); ++i) {
          a[i] = molora::detail::weight_from_float<W>(molora::detail::normal01(gen), "a", 0, Index(i));
          af[i] = molora::to_float(a[i]);
        }
        for (std::size_t i = 0; i < bt.size(); ++i) {
          bt[i] = molora::detail::weight_from_float<W>(molora::detail::normal01(gen), "bt", 0, Index(i));
          btf[i] = molora::to_float(bt[i]);
        }
        molora::RowMatrix<float> x = ref::random_x<float>(n, in, std::uint64_t(in * r + n));
        std::vector<const float*> xr;
        for (Index t = 0; t < n; ++t) xr.push_back(x.data() + t * in);
        std::vector<float> scratch(std::size_t(k::fused_scratch_size<k::layer_arch, float>(r)));
        molora::RowMatrix<float> hh(n, r), hf(n, r);
        k::shrink(k::layer_arch{}, a.data(), in, r, in, xr.data(), n, hh.data(), r, scratch.data());
        k::shrink(k::layer_arch{}, af.data(), in, r, in, xr.data(), n, hf.data(), r, scratch.data());
        INFO(type_name<W>(), " in=", in, " r=", r, " n=", n);
        CHECK(test_util::same_bits(hh, hf));
        // The shrink against the double reference.
        double err = 0;
        for (Index t = 0; t < n; ++t)
          for (Index j = 0; j < r; ++j) {
            double s = 0, m = 0;
            for (Index c = 0; c < in; ++c) {
              s += double(af[std::size_t(j * in + c)]) * double(x(t, c));
              m += std::abs(double(af[std::size_t(j * in + c)]) * double(x(t, c)));
            }
            err = std::max(err, std::abs(double(hf(t, j)) - s) / (m + 1e-30));
          }
        CHECK(err < 1e-5);
        std::vector<const float*> hr;
        for (Index t = 0; t < n; ++t) hr.push_back(hf.data() + t * r);
        const molora::RowMatrix<float> sc = ref::random_x<float>(n, 1, 4);
        molora::RowMatrix<float> yh = ref::random_x<float>(n, out, 6), yf = yh;
        std::vector<float*> yhr, yfr;
        for (Index t = 0; t < n; ++t) {
          yhr.push_back(yh.data() + t * out);
          yfr.push_back(yf.data() + t * out);
        }
        k::expand(k::layer_arch{}, bt.data(), out, r, out, hr.data(), sc.data(), n, yhr.data());
        k::expand(k::layer_arch{}, btf.data(), out, r, out, hr.data(), sc.data(), n, yfr.data());
        CHECK(test_util::same_bits(yh, yf));
      }
}

}  // namespace

TEST_CASE("half adapter: bf16 router and experts give the float adapter's bits on the widened weights") {
  check_forward_bitwise<bf16>();
}

TEST_CASE("half adapter: f16 router and experts give the float adapter's bits on the widened weights") {
  check_forward_bitwise<f16>();
}

TEST_CASE("half adapter: shrink and expand with bf16 / f16 weights equal the float kernels on widened values") {
  check_kernels_bitwise<bf16>();
  check_kernels_bitwise<f16>();
}

TEST_CASE("half adapter: setting rounds to nearest even; f16 overflow and non-finite values name tensor and index") {
  const auto cfg = test_util::config(5, 4, 3, 2, 2);
  molora::MoLoRAAdapter<float, f16> h(cfg);
  molora::MoLoRAAdapter<float, bf16> b(cfg);
  molora::RowMatrix<double> a = molora::RowMatrix<double>::Constant(2, 5, 0.1);
  a(1, 3) = 1.0 + 1.0 / 256 + 1.0 / 4096;  // between two bf16 values, nearer the upper
  b.set_expert_A(1, a);
  h.set_expert_A(1, a);
  const auto wa = b.widened_stacked_A();
  CHECK(wa(2 + 1, 3) == molora::to_float(molora::to_bf16(float(a(1, 3)))));
  CHECK(wa(2 + 1, 3) == 1.0f + 1.0f / 128);
  CHECK(wa(2, 0) == molora::to_float(molora::to_bf16(0.1f)));
  CHECK(h.widened_stacked_A()(3, 3) == molora::to_float(molora::to_f16(float(a(1, 3)))));
  CHECK(wa(0, 0) == 0.0f);  // expert 0 untouched

  // f16 overflow: the message names the tensor, the index and the value; nothing changes.
  const auto before = h.widened_stacked_A();
  molora::RowMatrix<double> big = a;
  big(1, 4) = 70000.0;
  const std::string msg = test_util::message_of<molora::numeric_error>([&] { h.set_expert_A(2, big); });
  CHECK(msg.find("experts.2.lora_A.weight") != std::string::npos);
  CHECK(msg.find("[1, 4]") != std::string::npos);
  CHECK(msg.find("70000") != std::string::npos);
  CHECK_THROWS_AS(h.set_expert_A(2, big), molora::numeric_error);
  CHECK(test_util::same_bits(before, h.widened_stacked_A()));
  molora::RowMatrix<double> bbig = molora::RowMatrix<double>::Zero(4, 2);
  bbig(3, 1) = -1e5;
  const std::string msg_b = test_util::message_of<molora::numeric_error>([&] { h.set_expert_B(0, bbig); });
  CHECK(msg_b.find("experts.0.lora_B.weight") != std::string::npos);
  CHECK(msg_b.find("[3, 1]") != std::string::npos);
  CHECK_NOTHROW(b.set_expert_B(0, bbig));  // in bf16's range
  CHECK(b.widened_stacked_B()(3, 1) == molora::to_float(molora::to_bf16(-1e5f)));
  molora::RowMatrix<double> rw = molora::RowMatrix<double>::Zero(3, 5);
  rw(2, 0) = 65520.0;  // rounds up past 65504
  const std::string msg_r = test_util::message_of<molora::numeric_error>([&] { h.router().set_weight(rw); });
  CHECK(msg_r.find("router.weight") != std::string::npos);
  CHECK(msg_r.find("[2, 0]") != std::string::npos);
  rw(2, 0) = 65504.0;
  CHECK_NOTHROW(h.router().set_weight(rw));
  CHECK(molora::to_float(h.router().weight_data()[10]) == 65504.0f);
  rw(0, 1) = std::nan("");
  CHECK_THROWS_AS(b.router().set_weight(rw), molora::numeric_error);

  // Values as stored: copied as they are, a non-finite one rejected with its index.
  std::vector<bf16> sa(10);
  for (std::size_t i = 0; i < sa.size(); ++i) sa[i] = molora::to_bf16(float(i) - 4.5f);
  b.set_expert_A_stored(2, sa.data());
  for (Index i = 0; i < 10; ++i) CHECK(b.stacked_A_data()[2 * 10 + i].bits == sa[std::size_t(i)].bits);
  std::vector<bf16> sb(8);
  for (std::size_t i = 0; i < sb.size(); ++i) sb[i] = molora::to_bf16(float(i) * 0.25f);
  b.set_expert_B_stored(1, sb.data());  // lora_B.weight [out = 4, r = 2] row-major
  const auto wb = b.widened_stacked_B();
  for (Index o = 0; o < 4; ++o)
    for (Index j = 0; j < 2; ++j) CHECK(wb(o, 2 + j) == molora::to_float(sb[std::size_t(o * 2 + j)]));
  sa[7] = molora::bf16_from_bits(0x7fc0);  // NaN
  const std::string msg_s = test_util::message_of<molora::numeric_error>([&] { b.set_expert_A_stored(0, sa.data()); });
  CHECK(msg_s.find("experts.0.lora_A.weight") != std::string::npos);
  CHECK(msg_s.find("[1, 2]") != std::string::npos);
  std::vector<f16> rs(15, molora::to_f16(0.5f));
  rs[6] = molora::f16_from_bits(0x7c00);  // +inf
  CHECK_THROWS_AS(h.router().set_weight_stored(rs.data(), 3, 5), molora::numeric_error);
  CHECK_THROWS_AS(h.router().set_weight_stored(rs.data(), 5, 3), molora::shape_error);
}

TEST_CASE("half adapter: convert_adapter rounds to 16 bits and widens back exactly") {
  auto cfg = test_util::config(23, 19, 4, 2, 3);
  cfg.router_bias = true;
  const auto l = ref::random_layer<float>(cfg, 77);
  const auto& a = l.adapter();
  const auto b = molora::convert_adapter<bf16>(a);
  const auto back = molora::convert_adapter<float>(b);
  const auto wa = a.stacked_A(), wb = back.stacked_A();
  for (Index i = 0; i < wa.size(); ++i) CHECK(wb.data()[i] == molora::to_float(molora::to_bf16(wa.data()[i])));
  const auto ba = a.stacked_B(), bb = back.stacked_B();
  for (Index i = 0; i < ba.size(); ++i) CHECK(bb.data()[i] == molora::to_float(molora::to_bf16(ba.data()[i])));
  for (Index i = 0; i < a.router().weight().size(); ++i)
    CHECK(back.router().weight().data()[i] == molora::to_float(molora::to_bf16(a.router().weight().data()[i])));
  CHECK(test_util::same_bits(back.router().bias(), a.router().bias()));  // the bias stays float
  CHECK(back.scaling() == a.scaling());
  // Rounding the widened adapter again changes no bit.
  const auto again = molora::convert_adapter<bf16>(back);
  for (Index i = 0; i < wa.size(); ++i) CHECK(again.stacked_A_data()[i].bits == b.stacked_A_data()[i].bits);
  // f16: a value past its range is a numeric_error naming the tensor.
  auto big = a;
  molora::RowMatrix<float> ab = a.expert_A(1);
  ab(0, 0) = 1e6f;
  big.set_expert_A(1, ab);
  const std::string msg = test_util::message_of<molora::numeric_error>([&] { (void)molora::convert_adapter<f16>(big); });
  CHECK(msg.find("experts.1.lora_A.weight") != std::string::npos);
  // A moved-from adapter is a state_error.
  auto moved = molora::convert_adapter<bf16>(a);
  auto sink = std::move(moved);
  CHECK_THROWS_AS(moved.check_live(), molora::state_error);  // NOLINT(bugprone-use-after-move)
  CHECK_NOTHROW(sink.check_live());
}

TEST_CASE("half adapter: every strategy runs fused; a fresh adapter adds nothing") {
  auto cfg = test_util::config(40, 33, 4, 4, 5);  // dense routing: automatic would pick dense_shrink at T >= 64
  molora::MoLoRAAdapter<float, bf16> h(cfg);
  for (const auto s : {molora::Strategy::automatic, molora::Strategy::eigen, molora::Strategy::dense_shrink}) {
    h.set_strategy(s);
    CHECK(h.resolved_strategy(100, 4) == molora::Strategy::fused);
  }
  molora::Generator gen(5);
  h.init_default(gen);
  const auto x = ref::random_x<float>(70, 40, 2);
  molora::RowMatrix<float> y = ref::random_x<float>(70, 33, 3);
  const molora::RowMatrix<float> y0 = y;
  h.add_delta(x, y);
  CHECK(test_util::same_bits(y, y0));  // B = 0
}

TEST_CASE("half adapter: a bf16 base with bf16 router and experts equals the bf16 base with the widened float adapter") {
  for (const Shape& sh : {kShapes[1], kShapes[4]}) {
    auto f32 = rounded_layer(sh, 123, false);
    molora::MoLoRALinear<float, bf16> base16(f32.config());
    molora::MoLoRALinear<float, bf16, bf16> all16(f32.config());
    base16.set_base_weight(f32.base_weight());
    all16.set_base_weight(f32.base_weight());
    base16.set_base_bias(f32.base_bias());
    all16.set_base_bias(f32.base_bias());
    base16.adapter() = f32.adapter();
    base16.set_strategy(molora::Strategy::fused);
    all16.adapter() = molora::convert_adapter<bf16>(f32.adapter());
    for (Index T : {1, 3, 8, 17, 130}) {
      INFO("in=", sh.in, " out=", sh.out, " T=", T);
      const auto x = ref::random_x<float>(T, sh.in, 200 + std::uint64_t(T));
      CHECK(test_util::same_bits(base16.forward(x), all16.forward(x)));
    }
  }
}

}  // namespace test_half_adapter
