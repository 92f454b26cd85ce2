// The packed GEMM of the base product for many tokens (kernels/gemm_kernels.hpp) against a
// plain double loop: in, out and T from 1 up, odd, across the register block (MR x NR) and
// the packed blocks (kGemmKC, kGemmNC, kGemmMC), float / bf16 / f16 weights, with and without
// bias, strided x and y whose padding must come back untouched; output ranges and token
// subsets that change no bit; 16-bit weights bit for bit their widened float copy; the ISA
// running and the scalar kernel; and Linear / MoLoRALinear with the gemm base against the
// Eigen base. The bf16-dot GEMM (gemm_product_bf16dot) against the double product of the
// rounded activations, its splits bitwise, and the layers in bf16-dot mode. Also run once per
// ISA by tests/cmake/isa.cmake.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include <molora/kernels/gemm_kernels.hpp>

#include "reference.hpp"

namespace test_gemm_kernels {

namespace k = molora::kernels;
using k::Index;
using molora::bf16;
using molora::f16;

namespace {

std::size_t at(Index i) { return static_cast<std::size_t>(i); }

// y [T, out] = x [T, in] W^T + bias with W of type Weight, every buffer strided and padded.
template <class Scalar, class Weight>
struct Problem {
  Index in, out, T, ldw, ldx, ldy;
  bool with_bias;
  std::vector<Weight> w;
  std::vector<Scalar> x, bias, y0;

  Problem(Index in_, Index out_, Index T_, bool bias_, std::uint64_t seed)
      : in(in_), out(out_), T(T_), ldw(in_ + 3), ldx(in_ + 5), ldy(out_ + 2), with_bias(bias_) {
    std::mt19937_64 gen(seed);
    std::uniform_real_distribution<double> u(-1, 1);
    w.resize(at(out * ldw));
    for (auto& e : w) {
      if constexpr (std::is_same_v<Weight, bf16>)
        e = molora::to_bf16(float(u(gen)));
      else if constexpr (std::is_same_v<Weight, f16>)
        e = molora::to_f16(float(u(gen)));
      else
        e = Weight(u(gen));
    }
    auto fill = [&](std::vector<Scalar>& v, Index n) {
      v.resize(at(n));
      for (auto& e : v) e = Scalar(u(gen));
    };
    fill(x, T * ldx);
    fill(bias, out);
    fill(y0, T * ldy);  // the padding must come back unchanged
  }
  const Scalar* bias_ptr() const { return with_bias ? bias.data() : nullptr; }
  double weight(Index o, Index i) const { return double(molora::to_float(w[at(o * ldw + i)])); }

  // Outputs [o0, o1) of tokens [t0, t1) into y.
  template <class Arch>
  void run(std::vector<Scalar>& y, Index o0, Index o1, Index t0, Index t1) const {
    std::vector<Scalar> scratch(at(k::gemm_scratch_size<Scalar>()) + 1);
    // An odd start: the kernel aligns its packed blocks itself.
    k::gemm_product(Arch{}, w.data(), ldw, in, x.data() + t0 * ldx, ldx, t1 - t0, bias_ptr(), y.data() + t0 * ldy,
                    ldy, o0, o1, scratch.data() + 1);
  }
  template <class Arch>
  std::vector<Scalar> run() const {
    std::vector<Scalar> y = y0;
    run<Arch>(y, 0, out, 0, T);
    return y;
  }

  // Loop by loop in double; also the error bound: eps * sqrt(in + 1) * sum |terms|, times 8.
  void reference(std::vector<double>& ref, std::vector<double>& tol) const {
    ref.assign(y0.begin(), y0.end());
    tol.assign(y0.size(), 0.0);
    ref::strided_base_product([this](Index o, Index i) { return weight(o, i); }, x.data(), ldx, bias_ptr(), T, in, out, ldy,
                              std::numeric_limits<Scalar>::epsilon(), ref, tol);
  }
};

template <class Arch, class Scalar, class Weight>
void check_against_reference(const Problem<Scalar, Weight>& p) {
  std::vector<double> ref, tol;
  p.reference(ref, tol);
  const std::vector<Scalar> y = p.template run<Arch>();
  std::size_t bad = 0;
  double worst = -std::numeric_limits<double>::infinity();
  for (std::size_t i = 0; i < y.size(); ++i) {
    const double err = std::abs(double(y[i]) - ref[i]);
    if (err > tol[i]) ++bad;  // padding (tol 0) must be left exactly as it was
    worst = std::max(worst, err - tol[i]);
  }
  INFO(Arch::name(), " weights=", molora::detail::weight_type_name<Weight>(), " in=", p.in, " out=", p.out,
       " T=", p.T, " bias=", p.with_bias, " worst excess=", worst);
  CHECK(bad == 0);
}

template <class Arch, class Scalar, class Weight>
void reference_suite() {
  std::mt19937_64 gen(31);
  std::uint64_t seed = 1000;
  auto check = [&](Index in, Index out, Index T, bool bias) {
    check_against_reference<Arch>(Problem<Scalar, Weight>(in, out, T, bias, ++seed));
  };
  // Small random shapes from 1 (every edge of the register block), then each size across the
  // register block and the packed blocks, the others small.
  for (int n = 0; n < 120; ++n)
    check(1 + Index(gen() % 70), 1 + Index(gen() % 80), 1 + Index(gen() % 40), n % 2 == 0);
  for (const Index in : {Index(1), Index(2), k::kGemmKC - 1, k::kGemmKC, k::kGemmKC + 1, 2 * k::kGemmKC + 37})
    check(in, 1 + Index(gen() % 70), 1 + Index(gen() % 30), in % 2 == 1);
  for (const Index out : {Index(31), Index(32), Index(33), Index(63), Index(65), k::kGemmNC - 1, k::kGemmNC,
                          k::kGemmNC + 1, 2 * k::kGemmNC + 29})
    check(1 + Index(gen() % 40), out, 1 + Index(gen() % 20), out % 2 == 0);
  for (const Index T : {Index(5), Index(6), Index(7), Index(11), Index(12), Index(13), Index(14), Index(15),
                        Index(24), Index(25), k::kGemmMC - 1, k::kGemmMC, k::kGemmMC + 1, 2 * k::kGemmMC + 17})
    check(1 + Index(gen() % 40), 1 + Index(gen() % 50), T, T % 2 == 1);
  // Every block size crossed at once, at the layers' sizes.
  check(k::kGemmKC + 45, k::kGemmNC + 77, 131, true);
  check(1024, 96, 128, false);
}

// Random output ranges and token ranges give the same bits as one call; so does each token
// alone; the empty range writes nothing.
template <class Arch, class Scalar, class Weight>
void split_suite() {
  std::mt19937_64 gen(47);
  std::uint64_t seed = 5000;
  for (const Index in : {1, 5, 16, 37, 300, 530})
    for (const Index T : {1, 3, 13, 30})
      for (const Index out : {1, 6, 45, 97}) {
        const Problem<Scalar, Weight> p(in, out, T, (in + T) % 2 == 0, ++seed);
        const std::vector<Scalar> whole = p.template run<Arch>();
        std::vector<Scalar> parts = p.y0, singles = p.y0, ranges = p.y0;
        for (Index o0 = 0; o0 < out;) {
          const Index o1 = std::min(out, o0 + 1 + Index(gen() % 40));
          p.template run<Arch>(parts, o0, o1, 0, T);
          o0 = o1;
        }
        for (Index t = 0; t < T; ++t) p.template run<Arch>(singles, 0, out, t, t + 1);
        for (Index t0 = 0; t0 < T;) {
          const Index t1 = std::min(T, t0 + 1 + Index(gen() % 9));
          const Index o0 = Index(gen() % std::uint64_t(out));
          p.template run<Arch>(ranges, 0, o0, t0, t1);
          p.template run<Arch>(ranges, o0, out, t0, t1);
          t0 = t1;
        }
        INFO(Arch::name(), " in=", in, " out=", out, " T=", T);
        CHECK(parts == whole);
        CHECK(singles == whole);
        CHECK(ranges == whole);
      }
  const Problem<Scalar, Weight> p(8, 8, 2, true, ++seed);
  std::vector<Scalar> y = p.y0;
  p.template run<Arch>(y, 3, 3, 0, 2);
  CHECK(y == p.y0);
}

// 16-bit weights give the bits of a float problem holding their widened values.
template <class Arch, class Weight>
void widened_suite() {
  std::uint64_t seed = 9000;
  for (const Index in : {1, 17, 255, 300})
    for (const Index out : {3, 33, 70})
      for (const Index T : {1, 12, 29}) {
        const Problem<float, Weight> half(in, out, T, out % 2 == 1, ++seed);
        Problem<float, float> full(in, out, T, out % 2 == 1, seed);
        for (std::size_t i = 0; i < half.w.size(); ++i) full.w[i] = molora::to_float(half.w[i]);
        INFO(Arch::name(), " in=", in, " out=", out, " T=", T);
        CHECK(half.template run<Arch>() == full.template run<Arch>());
      }
}

}  // namespace

TEST_CASE_TEMPLATE("gemm_kernels: gemm_product matches the double reference", Weight, float, bf16, f16) {
  // layer_arch: through the run-time table when the test links molora::kernels (ctest runs
  // it once per ISA, forced by MOLORA_ISA), else the ISA this file is compiled for.
  SUBCASE("the ISA running") {
    MESSAGE("kernel ISA: ", k::active_isa());
    if (const char* isa = std::getenv("MOLORA_ISA"); isa && *isa) CHECK(k::active_isa() == isa);
    reference_suite<k::layer_arch, float, Weight>();
  }
  SUBCASE("scalar") { reference_suite<k::scalar_arch, float, Weight>(); }
}

TEST_CASE("gemm_kernels: gemm_product for double matches the double reference") {
  SUBCASE("the ISA running") { reference_suite<k::layer_arch, double, double>(); }
  SUBCASE("scalar") { reference_suite<k::scalar_arch, double, double>(); }
}

TEST_CASE_TEMPLATE("gemm_kernels: output ranges and token ranges change no bit", Weight, float, bf16, f16) {
  SUBCASE("the ISA running") { split_suite<k::layer_arch, float, Weight>(); }
  SUBCASE("scalar") { split_suite<k::scalar_arch, float, Weight>(); }
}

TEST_CASE_TEMPLATE("gemm_kernels: 16-bit weights give their widened float copy's bits", Weight, bf16, f16) {
  SUBCASE("the ISA running") { widened_suite<k::layer_arch, Weight>(); }
  SUBCASE("scalar") { widened_suite<k::scalar_arch, Weight>(); }
}

TEST_CASE_TEMPLATE("gemm_kernels: Linear with the gemm base equals the Eigen base above the crossover", Weight, float,
                   bf16, f16) {
  std::mt19937_64 gen(5);
  const Index c = k::skinny_crossover<float, Weight>();
  for (const Index T : {c, c + 1, c + 37, 2 * c + 3})
    for (const bool bias : {false, true}) {
      const Index in = 1 + Index(gen() % 400), out = 1 + Index(gen() % 200);
      molora::Linear<float, Weight> layer(in, out);
      layer.set_weight(ref::random_x<double>(out, in, gen()));
      if (bias) layer.set_bias(ref::random_x<double>(out, 1, gen()));
      const auto x = ref::random_x<float>(T, in, gen());
      layer.set_strategy(molora::BaseStrategy::eigen);
      const molora::RowMatrix<float> ye = layer.forward(x);
      layer.set_strategy(molora::BaseStrategy::gemm);
      const molora::RowMatrix<float> yg = layer.forward(x);
      layer.set_strategy(molora::BaseStrategy::automatic);
      const molora::RowMatrix<float> ya = layer.forward(x);
      INFO("in=", in, " out=", out, " T=", T, " bias=", bias);
      const bool gemm = molora::detail::many_tokens_strategy<float, Weight>() == molora::BaseStrategy::gemm;
      CHECK(layer.resolved_strategy(T) == molora::detail::many_tokens_strategy<float, Weight>());
      CHECK(ya == (gemm ? yg : ye));
      const double scale = std::max(1.0, double(ye.cwiseAbs().maxCoeff()));
      CHECK(double((yg - ye).cwiseAbs().maxCoeff()) <= 1e-6 * std::sqrt(double(in)) * scale);
    }
}

TEST_CASE("gemm_kernels: MoLoRALinear with the gemm base equals the Eigen base above the crossover") {
  const Index c = k::skinny_crossover<float>();
  for (const Index in : {1, 19, 133, 300})
    for (const Index out : {1, 9, 70, 161}) {
      molora::MoLoRAConfig cfg;
      cfg.in_features = in;
      cfg.out_features = out;
      cfg.num_experts = 4;
      cfg.top_k = 2;
      cfg.rank = 3;
      for (const bool bias : {false, true}) {
        auto layer = ref::random_layer<float>(cfg, std::uint64_t(in * 100 + out), bias);
        for (const Index T : {c, c + 5, 2 * c + 1}) {
          const auto x = ref::random_x<float>(T, in, std::uint64_t(T));
          molora::RowMatrix<float> ye(T, out), yg(T, out), ya(T, out), be(T, out), bg(T, out);
          molora::MoLoRAWorkspace<float> ws;
          layer.set_base_strategy(molora::BaseStrategy::eigen);
          layer.forward(x, ye, ws);
          layer.forward_base(x, be);
          layer.set_base_strategy(molora::BaseStrategy::gemm);
          layer.forward(x, yg, ws);
          layer.forward_base(x, bg);
          layer.set_base_strategy(molora::BaseStrategy::automatic);
          layer.forward(x, ya, ws);
          const double scale = std::max(1.0, double(ye.cwiseAbs().maxCoeff()));
          const double tol = 1e-6 * std::sqrt(double(in)) * scale;
          INFO("in=", in, " out=", out, " T=", T, " bias=", bias);
          CHECK(double((yg - ye).cwiseAbs().maxCoeff()) <= tol);
          CHECK(double((bg - be).cwiseAbs().maxCoeff()) <= tol);
          CHECK(ya == (molora::detail::many_tokens_strategy<float, float>() == molora::BaseStrategy::gemm ? yg : ye));
        }
      }
    }
}

TEST_CASE("gemm_kernels: automatic resolves to many_tokens_strategy from the crossover on; a set strategy is kept") {
  const Index c = k::skinny_crossover<float>(), ch = k::skinny_crossover<float, bf16>();
  const Index cd = k::skinny_crossover<double>();
  molora::Linear<float> f(4, 4);
  molora::Linear<float, bf16> h(4, 4);
  molora::Linear<double> d(4, 4);
  // Constants per ISA, activation and weight type (docs/benchmarks.md, "The crossover to the
  // packed GEMM", "The crossover on 16-register ISAs"); the active ISA's, as MOLORA_ISA forces it
  // in this test's runs per ISA.
  const std::string isa = k::active_isa();
  INFO("isa=", isa);
  struct Want {
    Index float_weights, bf16_weights, f16_weights;
  };
  const Want want = isa == "avx512" ? Want{32, 48, 48}
                    : isa == "avx2" ? Want{20, 16, 16}
                    : isa == "sse4.2" ? Want{48, 48, 9}
                                      : Want{32, 48, 128};  // scalar, and any other compile-time ISA
  CHECK(c == want.float_weights);
  CHECK(ch == want.bf16_weights);
  CHECK(k::skinny_crossover<float, f16>() == want.f16_weights);
  CHECK(cd == 128);
  CHECK(f.resolved_strategy(c - 1) == molora::BaseStrategy::skinny);
  CHECK(f.resolved_strategy(c) == molora::detail::many_tokens_strategy<float, float>());
  CHECK(h.resolved_strategy(ch - 1) == molora::BaseStrategy::skinny);
  CHECK(h.resolved_strategy(ch) == molora::detail::many_tokens_strategy<float, bf16>());
  CHECK(d.resolved_strategy(cd - 1) == molora::BaseStrategy::skinny);
  CHECK(d.resolved_strategy(cd) == molora::BaseStrategy::eigen);
  CHECK(molora::detail::many_tokens_strategy<double, double>() == molora::BaseStrategy::eigen);
  f.set_strategy(molora::BaseStrategy::gemm);
  CHECK(f.resolved_strategy(1) == molora::BaseStrategy::gemm);
  CHECK(std::string(molora::to_string(molora::BaseStrategy::gemm)) == "gemm");
}

// ---- the bf16-dot GEMM (gemm_product_bf16dot) ------------------------------------------------
//
// Its reference is the double product of the bf16-rounded activations and the bf16 weights:
// every product of two bf16 values is exact in float (8 + 8 significant bits), so the kernel
// differs from it only by float summation. Along one output a term passes through at most
// n = in + 2 ceil(in / kGemmBf16KC) + 1 roundings (VDPBF16PS rounds at most twice per pair, a
// zero-padded pair adds an exact zero; then y + acc per block and the bias), each to nearest
// with relative error at most u = 2^-24, so |y - ref| <= gamma_n sum |terms|, gamma_n =
// n u / (1 - n u). VDPBF16PS also treats subnormal inputs as zero and flushes subnormal
// results: at most 2^-126 (|w| + 1) per input and 2^-126 per operation more, which the bound
// adds as (2 in + n) 2^-126 (1 + max |w|). (The stated bound of the mode against the EXACT
// path, 2^-8 sum |w x|, is the activations' rounding; this one is about 2^-24 in.)
namespace {

// x rounded as the kernel rounds it (to nearest even).
double rounded(float v) { return double(molora::to_float(molora::to_bf16(v))); }

struct DotBound {
  double gamma, flush;
  DotBound(Index in, double max_w, Index extra_roundings = 0) {
    const double n = double(in + 2 * ((in + k::kGemmBf16KC - 1) / k::kGemmBf16KC) + 1 + extra_roundings);
    const double u = std::ldexp(1.0, -24);
    gamma = n * u / (1 - n * u);
    flush = (2 * double(in) + n) * std::ldexp(1.0, -126) * (1 + max_w);
  }
  double operator()(double mag) const { return gamma * mag + flush; }
};

template <class Arch>
std::vector<float> run_dot(const Problem<float, bf16>& p, Index o0, Index o1, Index t0, Index t1,
                           std::vector<float> y) {
  std::vector<float> scratch(at(k::gemm_scratch_size<float>()) + 1);
  k::gemm_product_bf16dot(Arch{}, p.w.data(), p.ldw, p.in, p.x.data() + t0 * p.ldx, p.ldx, t1 - t0, p.bias_ptr(),
                          y.data() + t0 * p.ldy, p.ldy, o0, o1, scratch.data() + 1);
  return y;
}

// Returns the worst error over its bound (<= 1 passes).
template <class Arch>
double check_dot_against_reference(const Problem<float, bf16>& p) {
  double max_w = 0;
  for (Index o = 0; o < p.out; ++o)
    for (Index i = 0; i < p.in; ++i) max_w = std::max(max_w, std::abs(p.weight(o, i)));
  const DotBound bound(p.in, max_w);
  const std::vector<float> y = run_dot<Arch>(p, 0, p.out, 0, p.T, p.y0);
  std::size_t bad = 0;
  double worst = 0;
  for (Index t = 0; t < p.T; ++t)
    for (Index o = 0; o < p.ldy; ++o) {
      const std::size_t e = at(t * p.ldy + o);
      if (o >= p.out) {  // padding: untouched
        if (y[e] != p.y0[e]) ++bad;
        continue;
      }
      double s = 0, mag = 0;
      for (Index i = 0; i < p.in; ++i) {
        const double prod = p.weight(o, i) * rounded(p.x[at(t * p.ldx + i)]);
        s += prod;
        mag += std::abs(prod);
      }
      if (p.with_bias) {
        s += double(p.bias[at(o)]);
        mag += std::abs(double(p.bias[at(o)]));
      }
      const double err = std::abs(double(y[e]) - s), tol = bound(mag);
      if (!(err <= tol)) ++bad;
      worst = std::max(worst, err / tol);
    }
  INFO(std::string(Arch::name()), " in=", p.in, " out=", p.out, " T=", p.T, " bias=", p.with_bias, " worst error / bound=", worst);
  CHECK(bad == 0);
  return worst;
}

template <class Arch>
void dot_reference_suite() {
  std::mt19937_64 gen(77);
  std::uint64_t seed = 20000;
  double worst = 0;
  auto check = [&](Index in, Index out, Index T, bool bias) {
    worst = std::max(worst, check_dot_against_reference<Arch>(Problem<float, bf16>(in, out, T, bias, ++seed)));
  };
  for (int n = 0; n < 100; ++n)
    check(1 + Index(gen() % 70), 1 + Index(gen() % 80), 1 + Index(gen() % 40), n % 2 == 0);
  // in across one pair, a vector of pairs (32 inputs), the block of kGemmBf16KC inputs and the
  // in-place driver's chunk of 4 kGemmBf16KC (x packed per chunk, the sum carried in y).
  for (const Index in : {Index(1), Index(2), Index(3), Index(17), Index(31), Index(32), Index(33), Index(257),
                         k::kGemmBf16KC - 1, k::kGemmBf16KC, k::kGemmBf16KC + 1, 2 * k::kGemmBf16KC + 37,
                         4 * k::kGemmBf16KC - 1, 4 * k::kGemmBf16KC, 4 * k::kGemmBf16KC + 1,
                         8 * k::kGemmBf16KC + 37})
    check(in, 1 + Index(gen() % 70), 1 + Index(gen() % 30), in % 2 == 1);
  // out across the in-place block (6 outputs) and the packed one (32).
  for (const Index out : {Index(1), Index(3), Index(5), Index(6), Index(7), Index(13), Index(17), Index(31), Index(32),
                          Index(33), Index(63), Index(65), k::kGemmNC - 1, k::kGemmNC, k::kGemmNC + 1,
                          2 * k::kGemmNC + 29})
    check(1 + Index(gen() % 40), out, 1 + Index(gen() % 20), out % 2 == 0);
  // T across the register blocks: the in-place driver's 1 to 4 vectors of 16 tokens, its
  // panel of 64 and block of two panels; the packed driver's 4-, 8- and 12-token blocks and
  // its packed block of tokens.
  for (const Index T : {Index(1), Index(3), Index(4), Index(5), Index(7), Index(8), Index(9), Index(11), Index(12),
                        Index(13), Index(15), Index(16), Index(17), Index(20), Index(21), Index(24), Index(25),
                        Index(31), Index(32), Index(33), Index(47), Index(48), Index(49), Index(63), Index(64),
                        Index(65), Index(127), Index(128), Index(129), Index(145), k::kGemmMC - 1, k::kGemmMC,
                        k::kGemmMC + 1, k::kGemmMC + 4, k::kGemmMC + 8, 2 * k::kGemmMC + 17})
    check(1 + Index(gen() % 40), 1 + Index(gen() % 50), T, T % 2 == 1);
  check(k::kGemmBf16KC + 45, k::kGemmNC + 77, 131, true);
  check(1024, 96, 128, false);
  check(4 * k::kGemmBf16KC + 3, 19, 70, true);  // two chunks, two token panels, odd everything
  MESSAGE(std::string(Arch::name()), ": worst error / stated bound ", worst);
}

// Output ranges, token ranges and single tokens give the bits of one call (a single token
// runs the 4-token block, a token range any of the three blocks).
template <class Arch>
void dot_split_suite() {
  std::mt19937_64 gen(48);
  std::uint64_t seed = 30000;
  for (const Index in : {1, 5, 33, 300, 530, 1100})
    for (const Index T : {1, 3, 4, 5, 8, 13, 16, 20, 30, 65, 129})
      for (const Index out : {1, 6, 45, 97}) {
        const Problem<float, bf16> p(in, out, T, (in + T) % 2 == 0, ++seed);
        const std::vector<float> whole = run_dot<Arch>(p, 0, out, 0, T, p.y0);
        std::vector<float> parts = p.y0, singles = p.y0, ranges = p.y0;
        for (Index o0 = 0; o0 < out;) {
          const Index o1 = std::min(out, o0 + 1 + Index(gen() % 40));
          parts = run_dot<Arch>(p, o0, o1, 0, T, parts);
          o0 = o1;
        }
        for (Index t = 0; t < T; ++t) singles = run_dot<Arch>(p, 0, out, t, t + 1, singles);
        for (Index t0 = 0; t0 < T;) {
          const Index t1 = std::min(T, t0 + 1 + Index(gen() % 9));
          const Index o0 = Index(gen() % std::uint64_t(out));
          ranges = run_dot<Arch>(p, 0, o0, t0, t1, ranges);
          ranges = run_dot<Arch>(p, o0, out, t0, t1, ranges);
          t0 = t1;
        }
        INFO(std::string(Arch::name()), " in=", in, " out=", out, " T=", T);
        CHECK(parts == whole);
        CHECK(singles == whole);
        CHECK(ranges == whole);
      }
}

#if defined(__AVX512BF16__) && defined(__AVX512BW__) && !defined(MOLORA_NO_XSIMD)
// Native builds with AVX512_BF16: the in-place driver (what gemm_product_bf16dot runs) gives
// the bits of the packed one it replaced, whatever in, out, T and the output range.
void dot_drivers_suite() {
  namespace kd = k::detail;
  std::mt19937_64 gen(91);
  std::uint64_t seed = 40000;
  std::vector<float> scratch(at(k::gemm_scratch_size<float>()) + 3);
  auto one = [&](Index in, Index out, Index T) {
    const Problem<float, bf16> p(in, out, T, (in + out + T) % 2 == 0, ++seed);
    const Index o0 = Index(gen() % std::uint64_t(out)), o1 = o0 + 1 + Index(gen() % std::uint64_t(out - o0));
    std::vector<float> a = p.y0, b = p.y0;
    kd::gemm_product_bf16dot_wt(p.w.data(), p.ldw, in, p.x.data(), p.ldx, T, p.bias_ptr(), a.data(), p.ldy, o0, o1,
                                scratch.data() + 3);
    kd::gemm_product_bf16dot_packed(p.w.data(), p.ldw, in, p.x.data(), p.ldx, T, p.bias_ptr(), b.data(), p.ldy, o0,
                                    o1, scratch.data() + 3);
    INFO("in=", in, " out=", out, " T=", T, " outputs [", o0, ", ", o1, ")");
    CHECK(a == b);
  };
  for (int n = 0; n < 60; ++n) one(1 + Index(gen() % 300), 1 + Index(gen() % 80), 1 + Index(gen() % 150));
  for (const Index in : {Index(1), Index(3), Index(511), Index(512), Index(513), Index(2047), Index(2048), Index(2049),
                         Index(4133)})
    for (const Index T : {Index(1), Index(17), Index(64), Index(65), Index(129)}) one(in, 1 + Index(gen() % 40), T);
}
#endif

bool skip_without_bf16_dot() {
  if (k::bf16_dot_available()) return false;
  MESSAGE("this CPU (or the ISA running) lacks AVX512_BF16: the bf16-dot kernel's vector path is not tested");
  return true;
}

}  // namespace

TEST_CASE("gemm_kernels: gemm_product_bf16dot matches the double reference on bf16-rounded x") {
  SUBCASE("AVX512_BF16") {
    if (!skip_without_bf16_dot()) dot_reference_suite<k::layer_arch>();
  }
  SUBCASE("scalar") { dot_reference_suite<k::scalar_arch>(); }
}

TEST_CASE("gemm_kernels: gemm_product_bf16dot's output ranges and token ranges change no bit") {
  SUBCASE("AVX512_BF16") {
    if (!skip_without_bf16_dot()) dot_split_suite<k::layer_arch>();
  }
  SUBCASE("scalar") { dot_split_suite<k::scalar_arch>(); }
}

TEST_CASE("gemm_kernels: the bf16-dot GEMM's in-place driver gives the packed driver's bits") {
#if defined(__AVX512BF16__) && defined(__AVX512BW__) && !defined(MOLORA_NO_XSIMD)
  if (k::bf16_dot_available())
    dot_drivers_suite();
  else
    MESSAGE("this CPU lacks AVX512_BF16: the two drivers are not compared");
#else
  MESSAGE("built without AVX512_BF16 (a native build on such a CPU compares the two drivers)");
#endif
}

// The layers in bf16-dot mode, T = 1..300 (both sides of kBf16DotGemmFrom and of
// skinny_crossover), against the double product of the rounded x. Below kBf16DotGemmFrom
// (and without AVX512_BF16) the exact skinny kernel runs on the rounded x: each term is exact
// in float and passes through at most in / 16 FMAs, 4 lane reductions and the bias, fewer
// roundings than the GEMM's bound counts; the bound above with a few extra roundings holds for
// every path.
TEST_CASE("gemm_kernels: Linear and MoLoRALinear in bf16-dot mode match the double reference, T = 1..300") {
  MESSAGE("AVX512_BF16 dot products: ", std::string(k::bf16_dot_available() ? "yes" : "no (rounded x, exact kernel)"));
  std::mt19937_64 gen(91);
  std::vector<Index> tokens;
  for (Index T = 1; T <= 40; ++T) tokens.push_back(T);
  for (Index T = 41; T <= 300; T += 1 + Index(gen() % 23)) tokens.push_back(T);
  tokens.push_back(300);
  for (const Index T : tokens) {
    const Index in = 1 + Index(gen() % 600), out = 1 + Index(gen() % 150);
    const bool bias = T % 3 != 0;
    molora::Linear<float, bf16> layer(in, out);
    layer.set_weight(ref::random_x<double>(out, in, gen()));
    if (bias) layer.set_bias(ref::random_x<double>(out, 1, gen()));
    layer.set_bf16_dot(true);
    const auto x = ref::random_x<float>(T, in, gen());
    const molora::RowMatrix<float> y = layer.forward(x);
    const bf16* w = layer.weight_data();
    double max_w = 0;
    for (Index e = 0; e < out * in; ++e) max_w = std::max(max_w, std::abs(double(molora::to_float(w[e]))));
    const DotBound bound(in, max_w, 20);
    std::size_t bad = 0;
    double worst = 0;
    for (Index t = 0; t < T; ++t)
      for (Index o = 0; o < out; ++o) {
        double s = 0, mag = 0;
        for (Index i = 0; i < in; ++i) {
          const double p = double(molora::to_float(w[o * in + i])) * rounded(x(t, i));
          s += p;
          mag += std::abs(p);
        }
        if (bias) {
          s += double(layer.bias()(o));
          mag += std::abs(double(layer.bias()(o)));
        }
        const double err = std::abs(double(y(t, o)) - s);
        if (!(err <= bound(mag))) ++bad;
        worst = std::max(worst, err / bound(mag));
      }
    INFO("in=", in, " out=", out, " T=", T, " bias=", bias, " worst error / bound=", worst);
    CHECK(bad == 0);
    // MoLoRALinear's base product in bf16-dot mode: the same function, the same bits.
    if (T % 7 == 1) {
      molora::MoLoRAConfig cfg;
      cfg.in_features = in;
      cfg.out_features = out;
      cfg.num_experts = 2;
      cfg.top_k = 1;
      cfg.rank = 2;
      molora::MoLoRALinear<float, bf16> m(cfg);
      molora::RowMatrix<float> wf(out, in);
      for (Index o = 0; o < out; ++o)
        for (Index i = 0; i < in; ++i) wf(o, i) = molora::to_float(w[o * in + i]);
      m.set_base_weight(wf);
      if (bias) m.set_base_bias(layer.bias());
      m.set_bf16_dot(true);
      molora::RowMatrix<float> yb(T, out);
      m.forward_base(x, yb);
      CHECK(yb == y);
    }
  }
}

}  // namespace test_gemm_kernels
