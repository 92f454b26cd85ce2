// molora::Linear (linear.hpp) against a plain double loop over the weights it holds (rounded to
// its weight type): float, double, bf16 and f16 weights; random odd shapes; every T from 1 to
// 300 (across the skinny / Eigen crossover); with and without bias; owned, set from bits and
// wrapped; each strategy. 16-bit weights give bit for bit the outputs of a float layer
// holding the widened weights wherever the kernel is the same (skinny). Also the errors.
// ctest runs this once per ISA the CPU has (MOLORA_ISA, tests/cmake/isa.cmake).
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include <molora/molora.hpp>

#include "reference.hpp"
#include "test_util.hpp"

namespace test_linear {

using molora::Index;

namespace {

template <class Scalar>
molora::RowMatrix<Scalar> random_matrix(Index rows, Index cols, std::mt19937_64& gen, double scale = 1.0) {
  std::uniform_real_distribution<double> u(-scale, scale);
  molora::RowMatrix<Scalar> m(rows, cols);
  for (Index i = 0; i < rows; ++i)
    for (Index j = 0; j < cols; ++j) m(i, j) = static_cast<Scalar>(u(gen));
  return m;
}

// y = x W^T + b loop by loop in double, W the layer's weights widened; tol per entry
// 8 eps sqrt(in + 1) sum |terms| with eps the activations' epsilon.
template <class Scalar, class Weight>
void check_reference(const molora::Linear<Scalar, Weight>& layer, const molora::RowMatrix<Scalar>& x,
                     const molora::RowMatrix<Scalar>& y, const char* what) {
  const Index in = layer.in_features(), out = layer.out_features(), T = x.rows();
  const Weight* w = layer.weight_data();
  const double eps = std::numeric_limits<Scalar>::epsilon();
  Index bad = 0;
  double worst = 0;
  for (Index t = 0; t < T; ++t)
    for (Index o = 0; o < out; ++o) {
      double s = 0, mag = 0;
      for (Index i = 0; i < in; ++i) {
        const double p = double(molora::to_float(w[o * in + i])) * double(x(t, i));
        s += p;
        mag += std::abs(p);
      }
      if (layer.has_bias()) {
        s += double(layer.bias()(o));
        mag += std::abs(double(layer.bias()(o)));
      }
      const double err = std::abs(double(y(t, o)) - s), tol = 8 * eps * std::sqrt(double(in) + 1) * mag;
      if (!(err <= tol)) ++bad;
      worst = std::max(worst, err - tol);
    }
  INFO(what, " in=", in, " out=", out, " T=", T, " bias=", layer.has_bias(), " worst excess=", worst);
  CHECK(bad == 0);
}

template <class Scalar, class Weight>
void reference_suite() {
  std::mt19937_64 gen(std::is_same_v<Weight, molora::f16> ? 3 : std::is_same_v<Weight, molora::bf16> ? 2 : 1);
  const Index crossover = molora::kernels::skinny_crossover<Scalar, Weight>();
  Index skinny_runs = 0, eigen_runs = 0, one_token_skinny = 0;
  for (Index T = 1; T <= 300; ++T) {
    const Index in = 1 + 2 * Index(gen() % 40), out = 1 + 2 * Index(gen() % 30);  // odd sizes
    molora::Linear<Scalar, Weight> layer(in, out);
    layer.set_weight(random_matrix<double>(out, in, gen));
    if (T % 2 == 0) layer.set_bias(random_matrix<double>(1, out, gen));
    const auto x = random_matrix<Scalar>(T, in, gen);
    molora::RowMatrix<Scalar> y(T, out);
    layer.forward(x, y);
    check_reference(layer, x, y, "automatic");
    (layer.resolved_strategy(T) == molora::BaseStrategy::skinny ? skinny_runs : eigen_runs)++;
    // One token of weights of the layer's own type: Eigen's GEMV, or the skinny kernel for
    // float weights with AVX-512 (detail::one_token_skinny).
    if (T == 1 && std::is_same_v<Weight, Scalar> && molora::detail::one_token_skinny<Scalar>(in)) ++one_token_skinny;
    for (const auto s : {molora::BaseStrategy::skinny, molora::BaseStrategy::eigen, molora::BaseStrategy::gemm}) {
      layer.set_strategy(s);
      molora::RowMatrix<Scalar> ys(T, out);
      layer.forward(x, ys);
      check_reference(layer, x, ys, molora::to_string(s));
    }
  }
  CHECK(skinny_runs == crossover - (std::is_same_v<Weight, Scalar> ? 2 : 1) + one_token_skinny);
  CHECK(eigen_runs == 300 - skinny_runs);
  // Larger rows (several chunks of `in`, Eigen blocks of rows) at a few T.
  for (const Index T : {Index(1), Index(3), Index(5), Index(37), crossover - 1, crossover, Index(131)}) {
    const Index in = 1031, out = 77;
    molora::Linear<Scalar, Weight> layer(in, out);
    layer.set_weight(random_matrix<double>(out, in, gen));
    layer.set_bias(random_matrix<double>(out, 1, gen));
    const auto x = random_matrix<Scalar>(T, in, gen);
    check_reference(layer, x, layer.forward(x), "large");
  }
}

// A float layer holding the widened weights: the same bits for the skinny and gemm kernels, the same
// values up to rounding for Eigen's product (whose blocking differs with the row blocks).
template <class Weight>
void widened_equality_suite() {
  std::mt19937_64 gen(9);
  for (const Index T : {1, 2, 3, 4, 5, 8, 9, 17, 33, 64, 127, 128, 200}) {
    const Index in = 1 + 2 * Index(gen() % 300), out = 1 + 2 * Index(gen() % 40);
    molora::Linear<float, Weight> half(in, out);
    half.set_weight(random_matrix<double>(out, in, gen));
    half.set_bias(random_matrix<double>(out, 1, gen));
    molora::Linear<float> full(in, out);
    full.set_weight(half.widened_weight());
    full.set_bias(half.bias());
    const auto x = random_matrix<float>(T, in, gen);
    INFO("in=", in, " out=", out, " T=", T);
    half.set_strategy(molora::BaseStrategy::skinny);
    full.set_strategy(molora::BaseStrategy::skinny);
    CHECK(half.forward(x) == full.forward(x));
    half.set_strategy(molora::BaseStrategy::gemm);
    full.set_strategy(molora::BaseStrategy::gemm);
    CHECK(half.forward(x) == full.forward(x));
    half.set_strategy(molora::BaseStrategy::eigen);
    full.set_strategy(molora::BaseStrategy::eigen);
    const molora::RowMatrix<float> ye = half.forward(x), fe = full.forward(x);
    CHECK(double((ye - fe).cwiseAbs().maxCoeff()) <= 1e-5 * std::max(1.0, double(fe.cwiseAbs().maxCoeff())));
  }
}

template <class Weight>
std::vector<std::uint16_t> bits_of(const std::vector<Weight>& v) {
  std::vector<std::uint16_t> b(v.size());
  std::memcpy(b.data(), v.data(), v.size() * 2);
  return b;
}

}  // namespace

TEST_CASE_TEMPLATE("linear: float and double weights match the double reference", Scalar, float, double) {
  MESSAGE("kernel ISA: ", molora::kernels::active_isa());
  if (const char* isa = std::getenv("MOLORA_ISA"); isa && *isa) CHECK(molora::kernels::active_isa() == isa);
  reference_suite<Scalar, Scalar>();
}

TEST_CASE_TEMPLATE("linear: bf16 and f16 weights match the double reference", Weight, molora::bf16, molora::f16) {
  reference_suite<float, Weight>();
}

TEST_CASE_TEMPLATE("linear: 16-bit weights equal a float layer holding the widened weights", Weight, molora::bf16,
                   molora::f16) {
  widened_equality_suite<Weight>();
}

TEST_CASE("linear: weights are rounded to nearest even when set; bits and wrapped buffers are used as they are") {
  std::mt19937_64 gen(4);
  const Index in = 13, out = 7;
  const auto w = random_matrix<double>(out, in, gen, 100.0);
  molora::Linear<float, molora::bf16> b(in, out);
  molora::Linear<float, molora::f16> h(in, out);
  b.set_weight(w);
  h.set_weight(w);
  for (Index o = 0; o < out; ++o)
    for (Index i = 0; i < in; ++i) {
      const auto f = static_cast<float>(w(o, i));
      CHECK(b.weight_data()[o * in + i].bits == molora::to_bf16(f).bits);
      CHECK(h.weight_data()[o * in + i].bits == molora::to_f16(f).bits);
    }
  // The same bits set raw, or wrapped, give the same outputs; a wrap copies nothing.
  const std::vector<molora::f16> stored(h.weight_data(), h.weight_data() + in * out);
  molora::Linear<float, molora::f16> raw(in, out), wrapped(in, out);
  raw.set_weight_bits(bits_of(stored).data(), out, in);
  wrapped.wrap_weight(stored.data(), out, in);
  CHECK(wrapped.wraps_weight());
  CHECK(wrapped.weight_data() == stored.data());
  CHECK_FALSE(raw.wraps_weight());
  for (const Index T : {1, 4, 200}) {
    const auto x = random_matrix<float>(T, in, gen);
    CHECK(raw.forward(x) == h.forward(x));
    CHECK(wrapped.forward(x) == h.forward(x));
  }
  // x and y in one buffer.
  molora::Linear<float, molora::bf16> sq(in, in);
  sq.set_weight(random_matrix<double>(in, in, gen));
  for (const Index T : {1, 6, 150}) {
    const auto x = random_matrix<float>(T, in, gen);
    molora::RowMatrix<float> xy = x;
    sq.forward(xy, xy);
    CHECK(xy == sq.forward(x));
  }
}

TEST_CASE("linear: errors name the field, the expected and the actual value") {
  auto message = [](auto f) -> std::string {
    try {
      f();
    } catch (const molora::error& e) {
      return e.what();
    }
    return "no error";
  };
  CHECK(message([] { molora::Linear<float> l(0, 3); }).find("in_features: expected a value >= 1, got 0") !=
        std::string::npos);
  molora::Linear<float, molora::f16> l(3, 2);
  molora::RowMatrix<double> w(2, 3);
  w << 1, 2, 3, 4, 70000, 6;
  const std::string over = message([&] { l.set_weight(w); });
  CHECK(over.find("molora numeric error: Linear weight") != std::string::npos);
  CHECK(over.find("65504") != std::string::npos);
  CHECK(over.find("70000 at [1, 1]") != std::string::npos);
  CHECK(l.weight_data()[4].bits == 0);  // unchanged
  CHECK(message([&] { l.set_weight(molora::RowMatrix<double>(3, 2)); }).find("Linear weight: expected [2, 3], got [3, 2]") !=
        std::string::npos);
  const std::vector<std::uint16_t> inf_bits = {0, 0, 0, 0, 0x7c00, 0};
  CHECK(message([&] { l.set_weight_bits(inf_bits.data(), 2, 3); }).find("got inf at [1, 1]") != std::string::npos);
  std::vector<molora::f16> buf(6, molora::f16{0x3c00});
  buf[5] = molora::f16{0x7e00};
  CHECK(message([&] { l.wrap_weight(buf.data(), 2, 3); }).find("wrapped Linear weight: expected finite values, got nan at [1, 2]") !=
        std::string::npos);
  CHECK_FALSE(l.wraps_weight());
  CHECK(message([&] { l.wrap_weight(buf.data(), 3, 2); }).find("expected [2, 3], got [3, 2]") != std::string::npos);
  CHECK(message([&] { l.wrap_weight(nullptr, 2, 3); }).find("a null pointer") != std::string::npos);
  molora::RowMatrix<float> x(4, 3), y(4, 2);
  x.setOnes();
  x(2, 1) = std::numeric_limits<float>::infinity();
  y.setConstant(5);
  CHECK(message([&] { l.forward(x, y); }).find("x of token 2: expected finite values, got inf at column 1") !=
        std::string::npos);
  CHECK((y.array() == 5).all());  // unchanged
  CHECK(message([&] { l.forward(molora::RowMatrix<float>(4, 2), y); }).find("x columns (in_features): expected 3, got 2") !=
        std::string::npos);
  molora::RowMatrix<float> y_bad(4, 3);
  CHECK(message([&] { l.forward(molora::RowMatrix<float>::Ones(4, 3), y_bad); }).find("y shape: expected [4, 2], got [4, 3]") !=
        std::string::npos);
  CHECK(message([&] { l.set_bias(molora::RowMatrix<float>(1, 3)); }).find("Linear bias: expected [2], got [1, 3]") !=
        std::string::npos);
  molora::Linear<float, molora::f16> moved(std::move(l));
  CHECK(message([&] { l.forward(molora::RowMatrix<float>::Ones(4, 3), y); }).find("moved-from") != std::string::npos);
  molora::RowMatrix<float> empty_x(0, 3), empty_y(0, 2);
  moved.forward(empty_x, empty_y);  // T = 0 is an empty batch
}

namespace {

// A MoLoRALinear<float, Weight> against the float layer holding its rounded base weight and
// the same adapter: bit for bit with the skinny base (same kernel order), up to rounding with
// Eigen's (blocked differently); the routing is the same in both (same router, same x).
template <class Weight>
void molora_half_base_suite() {
  std::uint64_t seed = 70;
  for (const Index in : {1, 19, 64, 133})
    for (const Index out : {1, 9, 70}) {
      const molora::MoLoRAConfig cfg = test_util::config(in, out, 4, 2, 3);
      const auto f32 = ref::random_layer<float>(cfg, ++seed);
      molora::MoLoRALinear<float, Weight> half(cfg);
      half.adapter() = f32.adapter();
      half.set_base_weight(f32.base_weight());
      half.set_base_bias(f32.base_bias());
      auto rounded = f32;
      molora::RowMatrix<float> w(out, in);
      for (Index o = 0; o < out; ++o)
        for (Index i = 0; i < in; ++i) {
          w(o, i) = molora::to_float(half.base_weight_data()[o * in + i]);
          const auto want = std::is_same_v<Weight, molora::bf16> ? molora::to_bf16(f32.base_weight()(o, i)).bits
                                                                 : molora::to_f16(f32.base_weight()(o, i)).bits;
          REQUIRE(half.base_weight_data()[o * in + i].bits == want);
        }
      rounded.set_base_weight(w);
      // The same weights wrapped from a host's buffer.
      const std::vector<Weight> host(half.base_weight_data(), half.base_weight_data() + in * out);
      molora::MoLoRALinear<float, Weight> wrapped = half;
      wrapped.wrap_base_weight(host.data(), out, in);
      CHECK(wrapped.wraps_base());
      CHECK(wrapped.base_weight_data() == host.data());
      for (const Index T : {1, 2, 3, 5, 8, 31, 127, 128, 150}) {
        const auto x = ref::random_x<float>(T, in, std::uint64_t(T) + 1);
        INFO("in=", in, " out=", out, " T=", T);
        for (const auto s : {molora::BaseStrategy::skinny, molora::BaseStrategy::eigen, molora::BaseStrategy::gemm}) {
          half.set_base_strategy(s);
          wrapped.set_base_strategy(s);
          rounded.set_base_strategy(s);
          molora::RowMatrix<float> yh(T, out), yw(T, out), yr(T, out), bh(T, out), br(T, out);
          molora::MoLoRAWorkspace<float> ws;
          const molora::IdMatrix ids_h = half.forward(x, yh, ws).ids;
          const molora::IdMatrix ids_r = rounded.forward(x, yr, ws).ids;
          wrapped.forward(x, yw, ws);
          half.forward_base(x, bh);
          rounded.forward_base(x, br);
          CHECK(ids_h == ids_r);
          CHECK(yw == yh);
          if (s != molora::BaseStrategy::eigen) {  // skinny and gemm widen in registers / while packing
            CHECK(yh == yr);
            CHECK(bh == br);
          } else {
            const double scale = std::max(1.0, double(yr.cwiseAbs().maxCoeff()));
            CHECK(double((yh - yr).cwiseAbs().maxCoeff()) <= 1e-5 * scale);
            CHECK(double((bh - br).cwiseAbs().maxCoeff()) <= 1e-5 * scale);
          }
        }
        half.set_base_strategy(molora::BaseStrategy::automatic);
        CHECK(half.resolved_base_strategy(T) ==
              (T < molora::kernels::skinny_crossover<float, Weight>() ? molora::BaseStrategy::skinny
                                                               : molora::detail::many_tokens_strategy<float, Weight>()));
      }
    }
}

}  // namespace

TEST_CASE_TEMPLATE("linear: MoLoRALinear with a bf16 / f16 base equals the float layer holding the rounded base",
                   Weight, molora::bf16, molora::f16) {
  molora_half_base_suite<Weight>();
}

TEST_CASE("linear: MoLoRALinear's 16-bit base reports bad values and shapes") {
  molora::MoLoRAConfig cfg;
  cfg.in_features = 3;
  cfg.out_features = 2;
  cfg.num_experts = 2;
  cfg.top_k = 1;
  cfg.rank = 1;
  molora::MoLoRALinear<float, molora::f16> layer(cfg);
  molora::RowMatrix<double> w(2, 3);
  w << 1, 2, 3, 4, 5, -1e5;
  CHECK_THROWS_WITH_AS(layer.set_base_weight(w),
                       doctest::Contains("base weight: expected values of magnitude <= 65504 after rounding to f16, got -100000 at [1, 2]"),
                       molora::numeric_error);
  CHECK(layer.base_weight_data()[5].bits == 0);
  std::vector<molora::f16> buf(6, molora::f16{0x3c00});
  CHECK_THROWS_WITH_AS(layer.wrap_base_weight(buf.data(), 3, 2), doctest::Contains("expected [2, 3], got [3, 2]"),
                       molora::shape_error);
  buf[1] = molora::f16{0x7c00};
  CHECK_THROWS_WITH_AS(layer.wrap_base_weight(buf.data(), 2, 3), doctest::Contains("got inf at [0, 1]"),
                       molora::numeric_error);
  CHECK_FALSE(layer.wraps_base());
  molora::MoLoRALinear<float, molora::f16> moved(std::move(layer));
  CHECK_THROWS_AS(layer.check_live(), molora::state_error);
}

TEST_CASE("linear: the opt-in bf16-dot mode stays within its stated tolerance of the exact path") {
  // Bound per output: 2^-8 sum |w x| (each activation rounded to bf16 moves by at most 2^-9
  // of itself; twice that for margin) + 8 eps sqrt(in + 1) sum |w x| (float sums).
  MESSAGE("AVX512_BF16 dot products: ", std::string(molora::kernels::bf16_dot_available() ? "yes" : "no (rounded x, exact kernel)"));
  std::mt19937_64 gen(12);
  Index checked = 0;
  for (const Index in : {1, 2, 15, 16, 17, 31, 32, 33, 63, 100, 1025})
    for (const Index T : {1, 2, 5, 40, 130}) {
      const Index out = 1 + Index(gen() % 11);
      molora::Linear<float, molora::bf16> layer(in, out);
      layer.set_weight(random_matrix<double>(out, in, gen));
      if (in % 2) layer.set_bias(random_matrix<double>(1, out, gen));
      const auto x = random_matrix<float>(T, in, gen);
      const molora::RowMatrix<float> exact = layer.forward(x);
      layer.set_bf16_dot(true);
      CHECK(layer.bf16_dot());
      const molora::RowMatrix<float> dot = layer.forward(x);
      layer.set_bf16_dot(false);
      const double eps = std::numeric_limits<float>::epsilon();
      Index bad = 0;
      for (Index t = 0; t < T; ++t)
        for (Index o = 0; o < out; ++o) {
          double mag = 0, s = 0;
          for (Index i = 0; i < in; ++i) {
            const double p = double(molora::to_float(layer.weight_data()[o * in + i])) * double(x(t, i));
            mag += std::abs(p);
            // The mode's own value: x rounded to bf16, in double.
            s += double(molora::to_float(layer.weight_data()[o * in + i])) *
                 double(molora::to_float(molora::to_bf16(x(t, i))));
          }
          if (layer.has_bias()) s += double(layer.bias()(o));
          const double sum_tol = 8 * eps * std::sqrt(double(in) + 1) * (mag + 1);
          if (!(std::abs(double(dot(t, o)) - double(exact(t, o))) <= std::ldexp(mag, -8) + 2 * sum_tol)) ++bad;
          if (!(std::abs(double(dot(t, o)) - s) <= sum_tol)) ++bad;  // it is the rounded-x product
          ++checked;
        }
      INFO("in=", in, " T=", T, " out=", out);
      CHECK(bad == 0);
    }
  CHECK(checked > 0);
}

TEST_CASE("linear: MoLoRALinear's opt-in bf16-dot base is the Linear's, and the adapter sees exact x") {
  // With the mode on, the layer's output is Linear's bf16-dot product of the same weights plus
  // the adapter's delta on the exact x; the base alone stays within the stated tolerance of
  // the exact base (the tolerance itself is checked above on Linear).
  std::uint64_t seed = 500;
  for (const Index in : {1, 17, 64, 133})
    for (const Index out : {1, 9, 70}) {
      const molora::MoLoRAConfig cfg = test_util::config(in, out, 4, 2, 3);
      const auto f32 = ref::random_layer<float>(cfg, ++seed);
      molora::MoLoRALinear<float, molora::bf16> layer(cfg);
      layer.adapter() = f32.adapter();
      layer.set_base_weight(f32.base_weight());
      layer.set_base_bias(f32.base_bias());
      molora::Linear<float, molora::bf16> lin(in, out);
      lin.set_weight(f32.base_weight());
      lin.set_bias(f32.base_bias());
      lin.set_bf16_dot(true);
      CHECK_FALSE(layer.bf16_dot());
      layer.set_bf16_dot(true);
      CHECK(layer.bf16_dot());
      for (const Index T : {1, 3, 8, 130}) {
        INFO("in=", in, " out=", out, " T=", T);
        const auto x = ref::random_x<float>(T, in, seed * 7 + std::uint64_t(T));
        molora::RowMatrix<float> base(T, out), y(T, out), delta = molora::RowMatrix<float>::Zero(T, out);
        molora::MoLoRAWorkspace<float> ws;
        layer.forward_base(x, base);
        CHECK(base == lin.forward(x));  // the same product, bit for bit
        layer.forward(x, y, ws);
        layer.adapter().add_delta(x, delta, ws);
        const double scale = std::max(1.0, double(y.cwiseAbs().maxCoeff()));
        CHECK(double((y - (base + delta)).cwiseAbs().maxCoeff()) <= 1e-5 * scale);
        // Not the exact base: with x rounded, some output moves (x has 24-bit mantissas).
        layer.set_bf16_dot(false);
        molora::RowMatrix<float> exact(T, out);
        layer.forward_base(x, exact);
        layer.set_bf16_dot(true);
        if (in >= 17) CHECK(exact != base);
      }
    }
}

// The layers hand base_product_bf16dot their own, unresolved strategy, and it names the kernel
// (with AVX512_BF16): skinny -> skinny_product_bf16dot and gemm -> gemm_product_bf16dot at any
// T, automatic -> the exact skinny kernel on the bf16-rounded x below kBf16DotGemmFrom, the
// bf16-dot GEMM from it on; eigen (and, without AVX512_BF16, every strategy) -> the rounded x
// through base_product with the strategy resolved. Each checked bit for bit against the kernel
// called directly (a strategy `skinny` below skinny_crossover used to read as automatic).
TEST_CASE("linear: in bf16-dot mode the layer's strategy names the kernel that runs") {
  namespace k = molora::kernels;
  using molora::BaseStrategy;
  using molora::bf16;
  const bool dot = k::bf16_dot_available();
  MESSAGE("AVX512_BF16 dot products: ", std::string(dot ? "yes" : "no (rounded x, exact kernel)"));
  std::mt19937_64 gen(31);
  std::vector<float> scratch(static_cast<std::size_t>(k::gemm_scratch_size<float>()));
  const Index from = molora::detail::kBf16DotGemmFrom;
  Index checked = 0;
  for (const Index T : {Index(1), Index(2), Index(3), Index(4), Index(5), from - 1, from, from + 1, Index(12),
                        Index(13), Index(16), Index(20), Index(33), Index(127), Index(128), Index(150)})
    for (const BaseStrategy s : {BaseStrategy::automatic, BaseStrategy::skinny, BaseStrategy::gemm, BaseStrategy::eigen}) {
      const Index in = 1 + Index(gen() % 300), out = 1 + Index(gen() % 150);
      const bool bias = gen() % 2 == 0;
      molora::Linear<float, bf16> lin(in, out);
      lin.set_weight(random_matrix<double>(out, in, gen));
      if (bias) lin.set_bias(random_matrix<double>(1, out, gen));
      lin.set_strategy(s);
      lin.set_bf16_dot(true);
      const auto x = random_matrix<float>(T, in, gen);
      molora::RowMatrix<float> xb(T, in);  // x rounded to bf16, as the mode rounds it
      for (Index t = 0; t < T; ++t)
        for (Index i = 0; i < in; ++i) xb(t, i) = molora::to_float(molora::to_bf16(x(t, i)));
      const bf16* w = lin.weight_data();
      const float* b = bias ? lin.bias().data() : nullptr;
      molora::RowMatrix<float> want(T, out);
      const bool gemm = dot && (s == BaseStrategy::gemm || (s == BaseStrategy::automatic && T >= from));
      const char* kernel = "base_product on the rounded x";
      if (gemm) {
        kernel = "gemm_product_bf16dot";
        k::gemm_product_bf16dot(k::layer_arch{}, w, in, in, x.data(), in, T, b, want.data(), out, Index(0), out,
                                scratch.data());
      } else if (dot && s == BaseStrategy::skinny) {
        kernel = "skinny_product_bf16dot";
        k::skinny_product_bf16dot(k::layer_arch{}, w, in, in, x.data(), in, T, b, want.data(), out, Index(0), out);
      } else {
        const BaseStrategy how = molora::detail::resolve_base_strategy<float, bf16>(s, T, in);
        if (how == BaseStrategy::skinny) {
          kernel = "skinny_product on the rounded x";
          k::skinny_product(k::layer_arch{}, w, in, in, xb.data(), in, T, b, want.data(), out, Index(0), out);
        } else {
          // Eigen over widened rows, or (no AVX512_BF16, gemm) the exact packed GEMM: a Linear
          // holding the same weights, strategy set, on the rounded x.
          molora::Linear<float, bf16> exact(in, out);
          exact.set_weight(w, out, in);
          if (bias) exact.set_bias(lin.bias());
          exact.set_strategy(how);
          want = exact.forward(xb);
        }
      }
      const molora::RowMatrix<float> got = lin.forward(x);
      INFO("T=", T, " in=", in, " out=", out, " strategy=", molora::to_string(s), " expected kernel: ", kernel);
      CHECK(got == want);
      // MoLoRALinear's base in bf16-dot mode with the same base strategy: the same bits.
      molora::MoLoRALinear<float, bf16> m(test_util::config(in, out, 2, 1, 2));
      m.set_base_weight(lin.widened_weight());
      if (bias) m.set_base_bias(lin.bias());
      m.set_base_strategy(s);
      m.set_bf16_dot(true);
      molora::RowMatrix<float> base(T, out);
      m.forward_base(x, base);
      CHECK(base == want);
      ++checked;
    }
  CHECK(checked == 64);
}

// The layers' own copies of their weights start on a cache line (detail::aligned_vector), also
// when the allocation is large enough for malloc to serve it from mmap (16 bytes past a page).
TEST_CASE_TEMPLATE("linear: owned weights are 64-byte aligned", Weight, float, molora::bf16, molora::f16) {
  std::mt19937_64 gen(4242);
  for (const Index in : {Index(1), Index(17), Index(1024), Index(4099)}) {
    const Index out = 300;  // 300 x 4099: above glibc's mmap threshold
    molora::Linear<float, Weight> lin(in, out);
    const auto at = [](const void* p) { return reinterpret_cast<std::uintptr_t>(p) % 64; };
    INFO("in=", in);
    CHECK(at(lin.weight_data()) == 0);
    lin.set_weight(random_matrix<double>(out, in, gen));
    CHECK(at(lin.weight_data()) == 0);
    if constexpr (!std::is_same_v<Weight, float>) {
      std::vector<std::uint16_t> bits(static_cast<std::size_t>(in * out), 0x3f80);
      lin.set_weight_bits(bits.data(), out, in);
      CHECK(at(lin.weight_data()) == 0);
    }
    // MoLoRALinear's own base, 16-bit or float (an Eigen matrix would be 16-byte aligned in a
    // build without -march), and the values set are the values held.
    molora::MoLoRALinear<float, Weight> layer(test_util::config(in, out, 2, 1, 2));
    CHECK(at(layer.base_weight_data()) == 0);
    const molora::RowMatrix<double> w = random_matrix<double>(out, in, gen);
    layer.set_base_weight(w);
    CHECK(at(layer.base_weight_data()) == 0);
    Index wrong = 0;
    for (Index o = 0; o < out; ++o)
      for (Index i = 0; i < in; ++i)
        wrong += molora::to_float(layer.base_weight_data()[o * in + i]) !=
                 molora::to_float(molora::detail::weight_from_float<Weight>(w(o, i), "w", o, i));
    CHECK(wrong == 0);
  }
}

}  // namespace test_linear
