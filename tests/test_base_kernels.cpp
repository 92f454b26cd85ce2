// The base product for few tokens (kernels/base_kernels.hpp) against a plain double loop:
// in and out from 1 to 70 and a few large (4096 x 33), T from 1 to past the crossover and
// past one token group, with and without bias, strided x and y; row ranges and token
// batches that change no bit; the ISA this file is compiled for and the scalar kernel;
// and MoLoRALinear's forward with the skinny base against the Eigen base. Also compiled for
// each ISA by tests/cmake/isa.cmake.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>

#include <limits>
#include <random>
#include <string>
#include <vector>

#include <molora/kernels/base_kernels.hpp>

#include "reference.hpp"

namespace k = molora::kernels;
using k::Index;

namespace {

template <class Scalar>
std::vector<Scalar> random_vec(Index n, std::mt19937_64& gen) {
  std::uniform_real_distribution<double> u(-1, 1);
  std::vector<Scalar> v(static_cast<std::size_t>(n));
  for (auto& e : v) e = static_cast<Scalar>(u(gen));
  return v;
}

std::size_t at(Index i) { return static_cast<std::size_t>(i); }

// A product y [T, out] = x [T, in] W^T [in, out] + bias, every buffer strided and padded.
template <class Scalar>
struct Problem {
  Index in, out, T, ldw, ldx, ldy;
  bool with_bias;
  std::vector<Scalar> w, x, bias, y0;

  Problem(Index in_, Index out_, Index T_, bool bias_, std::uint64_t seed)
      : in(in_), out(out_), T(T_), ldw(in_ + 3), ldx(in_ + 5), ldy(out_ + 2), with_bias(bias_) {
    std::mt19937_64 gen(seed);
    w = random_vec<Scalar>(out * ldw, gen);
    x = random_vec<Scalar>(T * ldx, gen);
    bias = random_vec<Scalar>(out, gen);
    y0 = random_vec<Scalar>(T * ldy, gen);  // the padding must come back unchanged
  }
  const Scalar* bias_ptr() const { return with_bias ? bias.data() : nullptr; }

  // Runs the kernel over rows [o0, o1) of a copy of y0 (or of y when given).
  template <class Arch>
  void run(std::vector<Scalar>& y, Index o0, Index o1) const {
    k::skinny_product(Arch{}, w.data(), ldw, in, x.data(), ldx, T, bias_ptr(), y.data(), ldy, o0, o1);
  }
  template <class Arch>
  std::vector<Scalar> run() const {
    std::vector<Scalar> y = y0;
    run<Arch>(y, 0, out);
    return y;
  }

  // Loop by loop in double; also the error bound: eps * sqrt(in + 1) * sum |terms|, times 8.
  void reference(std::vector<double>& ref, std::vector<double>& tol) const {
    ref.assign(y0.begin(), y0.end());
    tol.assign(y0.size(), 0.0);
    ref::strided_base_product([this](Index o, Index i) { return double(w[at(o * ldw + i)]); }, x.data(), ldx, bias_ptr(), T, in, out, ldy,
                              std::numeric_limits<Scalar>::epsilon(), ref, tol);
  }
};

template <class Arch, class Scalar>
void check_against_reference(const Problem<Scalar>& p) {
  std::vector<double> ref, tol;
  p.reference(ref, tol);
  const std::vector<Scalar> y = p.template run<Arch>();
  std::size_t bad = 0;
  double worst = 0;
  for (std::size_t i = 0; i < y.size(); ++i) {
    const double err = std::abs(double(y[i]) - ref[i]);
    // Padding (tol 0) must be left exactly as it was.
    if (err > tol[i]) ++bad;
    worst = std::max(worst, err - tol[i]);
  }
  INFO(Arch::name(), " in=", p.in, " out=", p.out, " T=", p.T, " bias=", p.with_bias, " worst excess=", worst);
  CHECK(bad == 0);
}

template <class Arch, class Scalar>
void reference_suite() {
  // Past the largest crossover of any ISA for weights of the activations' type (48 for float,
  // with SSE4.2; 128 for double), so that every T a layer may hand the kernel is covered
  // whichever ISA runs.
  constexpr Index crossover = std::is_same_v<Scalar, float> ? 48 : 128;
  std::mt19937_64 gen(11);
  std::uint64_t seed = 100;
  // Every in and out from 1 to 70 (T and bias vary with them), then every T up to past the
  // crossover on odd sizes, then a few large ones and T past one token group.
  for (Index in = 1; in <= 70; ++in) {
    const Index out = 1 + Index(gen() % 70);
    check_against_reference<Arch>(Problem<Scalar>(in, out, 1 + Index(gen() % (crossover + 2)), in % 2 == 0, ++seed));
  }
  for (Index out = 1; out <= 70; ++out) {
    const Index in = 1 + Index(gen() % 70);
    check_against_reference<Arch>(Problem<Scalar>(in, out, 1 + Index(gen() % (crossover + 2)), out % 2 == 1, ++seed));
  }
  for (Index T = 1; T <= crossover + 2; ++T)
    for (const Index in : {1, 7, 16, 33, 67})
      for (const bool bias : {false, true}) {
        const Index out = 1 + Index(gen() % 13);
        check_against_reference<Arch>(Problem<Scalar>(in, out, T, bias, ++seed));
      }
  for (const Index T : {Index(1), Index(2), Index(3), Index(4), Index(5), Index(8), Index(9), crossover - 1, crossover})
    check_against_reference<Arch>(Problem<Scalar>(4096, 33, T, T % 2 == 1, ++seed));
  // Every T of the streamed path and the first of the blocked one, on sizes around the SIMD
  // widths (and 1).
  for (Index T = 1; T <= k::kSkinnyStreamTokens + 1; ++T)
    for (const Index in : {1, 3, 15, 16, 17, 33, 100, 257})
      for (const Index out : {1, 2, 3, 7}) check_against_reference<Arch>(Problem<Scalar>(in, out, T, (in + out) % 2 == 0, ++seed));
  check_against_reference<Arch>(Problem<Scalar>(1000, 7, 6, true, ++seed));  // several chunks of in
  for (const Index T : {k::kSkinnyGroup, k::kSkinnyGroup + 1, 2 * k::kSkinnyGroup + 3})
    check_against_reference<Arch>(Problem<Scalar>(45, 11, T, true, ++seed));
}

// Rows split into random ranges give the same bits as one call; so does each token alone.
template <class Arch, class Scalar>
void split_suite() {
  std::mt19937_64 gen(23);
  std::uint64_t seed = 500;
  for (const Index in : {1, 5, 16, 37, 300, 1030})
    for (const Index T : {1, 3, 4, 6, 9, 17})
      for (const Index out : {1, 6, 13, 29}) {
        const Problem<Scalar> p(in, out, T, (in + T) % 2 == 0, ++seed);
        const std::vector<Scalar> whole = p.template run<Arch>();
        std::vector<Scalar> parts = p.y0;
        for (Index o0 = 0; o0 < out;) {
          const Index o1 = std::min(out, o0 + 1 + Index(gen() % 7));
          p.template run<Arch>(parts, o0, o1);
          o0 = o1;
        }
        std::vector<Scalar> singles = p.y0;
        for (Index t = 0; t < T; ++t)
          k::skinny_product(Arch{}, p.w.data(), p.ldw, in, p.x.data() + t * p.ldx, p.ldx, 1, p.bias_ptr(),
                            singles.data() + t * p.ldy, p.ldy, 0, out);
        INFO(Arch::name(), " in=", in, " out=", out, " T=", T);
        CHECK(parts == whole);
        CHECK(singles == whole);
      }
  // An empty range writes nothing.
  const Problem<Scalar> p(8, 8, 2, true, ++seed);
  std::vector<Scalar> y = p.y0;
  p.template run<Arch>(y, 3, 3);
  CHECK(y == p.y0);
}

}  // namespace

TEST_CASE_TEMPLATE("base_kernels: skinny_product matches the double reference", Scalar, float, double) {
  // layer_arch: through the run-time table when the test links molora::kernels (ctest runs
  // it once per ISA, forced by MOLORA_ISA), else the ISA this file is compiled for.
  SUBCASE("the ISA running") {
    MESSAGE("kernel ISA: ", k::active_isa());
    if (const char* isa = std::getenv("MOLORA_ISA"); isa && *isa) CHECK(k::active_isa() == isa);
    reference_suite<k::layer_arch, Scalar>();
  }
  SUBCASE("scalar") { reference_suite<k::scalar_arch, Scalar>(); }
}

TEST_CASE_TEMPLATE("base_kernels: row ranges and token batches change no bit", Scalar, float, double) {
  SUBCASE("the ISA running") { split_suite<k::layer_arch, Scalar>(); }
  SUBCASE("scalar") { split_suite<k::scalar_arch, Scalar>(); }
}

TEST_CASE_TEMPLATE("base_kernels: MoLoRALinear with the skinny base equals the Eigen base", Scalar, float, double) {
  const Index crossover = k::skinny_crossover<Scalar>();
  const double tol = std::is_same_v<Scalar, float> ? 1e-4 : 1e-11;
  for (const Index in : {1, 19, 64, 133})
    for (const Index out : {1, 9, 70}) {
      molora::MoLoRAConfig cfg;
      cfg.in_features = in;
      cfg.out_features = out;
      cfg.num_experts = 4;
      cfg.top_k = 2;
      cfg.rank = 3;
      for (const bool bias : {false, true}) {
        auto layer = ref::random_layer<Scalar>(cfg, std::uint64_t(in * 100 + out), bias);
        for (Index T = 1; T <= crossover + 2; ++T) {
          const auto x = ref::random_x<Scalar>(T, in, std::uint64_t(T));
          molora::RowMatrix<Scalar> ye(T, out), ys(T, out), ya(T, out), yg(T, out), be(T, out), bs(T, out);
          molora::MoLoRAWorkspace<Scalar> ws;
          layer.set_base_strategy(molora::BaseStrategy::eigen);
          layer.forward(x, ye, ws);
          layer.forward_base(x, be);
          layer.set_base_strategy(molora::BaseStrategy::skinny);
          layer.forward(x, ys, ws);
          layer.forward_base(x, bs);
          layer.set_base_strategy(molora::BaseStrategy::gemm);
          layer.forward(x, yg, ws);
          layer.set_base_strategy(molora::BaseStrategy::automatic);
          layer.forward(x, ya, ws);
          const double scale = std::max<double>(1.0, double(ye.cwiseAbs().maxCoeff()));
          INFO("in=", in, " out=", out, " T=", T, " bias=", bias);
          CHECK(double((ys - ye).cwiseAbs().maxCoeff()) <= tol * scale);
          CHECK(double((bs - be).cwiseAbs().maxCoeff()) <= tol * scale);
          // automatic is one of them, bit for bit: skinny from 2 tokens to the crossover (and
          // for one token where detail::one_token_skinny says so), then many_tokens_strategy.
          const bool gemm =
              T >= crossover && molora::detail::many_tokens_strategy<Scalar, Scalar>() == molora::BaseStrategy::gemm;
          const bool skinny = T < crossover && (T >= 2 || molora::detail::one_token_skinny<Scalar>(in));
          CHECK(layer.resolved_base_strategy(T) ==
                (skinny ? molora::BaseStrategy::skinny : gemm ? molora::BaseStrategy::gemm : molora::BaseStrategy::eigen));
          CHECK(ya == (skinny ? ys : gemm ? yg : ye));
        }
      }
    }
}

TEST_CASE("base_kernels: automatic resolves to skinny for 2 tokens up to the crossover; a set strategy is kept") {
  molora::MoLoRAConfig cfg;
  cfg.in_features = 8;
  cfg.out_features = 8;
  cfg.num_experts = 2;
  cfg.top_k = 1;
  cfg.rank = 2;
  molora::MoLoRALinear<float> layer(cfg);
  CHECK(layer.base_strategy() == molora::BaseStrategy::automatic);
  const Index c = k::skinny_crossover<float>();
  // One token: Eigen's GEMV, or the skinny kernel for short float rows with AVX-512.
  CHECK(layer.resolved_base_strategy(1) ==
        (molora::detail::one_token_skinny<float>(8) ? molora::BaseStrategy::skinny : molora::BaseStrategy::eigen));
  CHECK(layer.resolved_base_strategy(2) == molora::BaseStrategy::skinny);
  CHECK(layer.resolved_base_strategy(c - 1) == molora::BaseStrategy::skinny);
  CHECK(layer.resolved_base_strategy(c) == molora::detail::many_tokens_strategy<float, float>());
  layer.set_base_strategy(molora::BaseStrategy::eigen);
  CHECK(layer.resolved_base_strategy(1) == molora::BaseStrategy::eigen);
  layer.set_base_strategy(molora::BaseStrategy::skinny);
  CHECK(layer.resolved_base_strategy(1) == molora::BaseStrategy::skinny);
  CHECK(layer.resolved_base_strategy(10 * c) == molora::BaseStrategy::skinny);
  CHECK(std::string(molora::to_string(molora::BaseStrategy::skinny)) == "skinny");
}

TEST_CASE("base_kernels: a wrapped base weight and x sharing y's memory") {
  molora::MoLoRAConfig cfg;
  cfg.in_features = 21;
  cfg.out_features = 21;
  cfg.num_experts = 3;
  cfg.top_k = 2;
  cfg.rank = 4;
  auto owned = ref::random_layer<double>(cfg, 7);
  const molora::RowMatrix<double> w = owned.base_weight();
  const molora::Vector<double> b = owned.base_bias().transpose();
  auto wrapped = owned;
  wrapped.wrap_base_weight(molora::MoLoRALinear<double>::BaseWeightMap(w.data(), 21, 21));
  wrapped.wrap_base_bias(Eigen::Map<const molora::Vector<double>>(b.data(), 21));
  for (const Index T : {1, 5}) {
    const auto x = ref::random_x<double>(T, 21, 3);
    molora::RowMatrix<double> ye(T, 21), ys = x;  // ys: x and y in one buffer
    owned.set_base_strategy(molora::BaseStrategy::eigen);
    owned.forward(x, ye);
    wrapped.set_base_strategy(molora::BaseStrategy::skinny);
    wrapped.forward(ys, ys);
    CHECK(double((ys - ye).cwiseAbs().maxCoeff()) <= 1e-12);
  }
}

namespace {

// Weights rounded to Weight, run with the 16-bit kernel and with the float kernel on the
// widened weights: the same bits (same order of accumulation, exact widening).
template <class Arch, class Weight>
void half_weight_suite() {
  std::mt19937_64 gen(31);
  std::uint64_t seed = 900;
  Index runs = 0;
  for (const Index in : {1, 3, 8, 15, 16, 17, 31, 33, 64, 100, 257, 1030})
    for (const Index T : {1, 2, 3, 4, 5, 6, 7, 8, 9, 33, 70})
      for (const Index out : {1, 2, 5, 13}) {
        Problem<float> p(in, out, T, (in + T + out) % 2 == 0, ++seed);
        std::vector<Weight> wh(p.w.size());
        for (std::size_t i = 0; i < wh.size(); ++i) {
          float v = p.w[i];
          if (i % 97 == 5) v *= 1e-6f;  // some f16 subnormals
          if (i % 89 == 7) v *= 3e4f;   // and large values
          wh[i] = std::is_same_v<Weight, molora::bf16> ? Weight{molora::to_bf16(v).bits} : Weight{molora::to_f16(v).bits};
          p.w[i] = molora::to_float(wh[i]);
        }
        const std::vector<float> want = p.template run<Arch>();
        std::vector<float> got = p.y0;
        k::skinny_product(Arch{}, wh.data(), p.ldw, in, p.x.data(), p.ldx, T, p.bias_ptr(), got.data(), p.ldy, 0, out);
        INFO(Arch::name(), " in=", in, " out=", out, " T=", T);
        CHECK(got == want);
        ++runs;
      }
  CHECK(runs == 12 * 11 * 4);
  // widen: every bit pattern that is finite, exactly.
  std::vector<Weight> all;
  for (std::uint32_t b = 0; b < 65536; ++b) {
    const Weight h{static_cast<std::uint16_t>(b)};
    if (std::isfinite(molora::to_float(h))) all.push_back(h);
  }
  for (const std::size_t n : {all.size(), std::size_t(1), std::size_t(15), std::size_t(37)}) {
    std::vector<float> w(n + 1, -7.0f);
    k::widen(Arch{}, all.data(), Index(n), w.data());
    bool exact = w[n] == -7.0f;  // nothing past n
    for (std::size_t i = 0; i < n; ++i) exact = exact && w[i] == molora::to_float(all[i]) &&
                                                std::signbit(w[i]) == std::signbit(molora::to_float(all[i]));
    INFO("n=", n);
    CHECK(exact);
  }
  // and the others: infinities keep their sign, NaNs stay NaN (F16C may quiet a signalling
  // NaN, so the payload is not compared)
  std::vector<Weight> rest;
  for (std::uint32_t b = 0; b < 65536; ++b) {
    const Weight h{static_cast<std::uint16_t>(b)};
    if (!std::isfinite(molora::to_float(h))) rest.push_back(h);
  }
  std::vector<float> wr(rest.size());
  k::widen(Arch{}, rest.data(), Index(rest.size()), wr.data());
  bool same_class = !rest.empty();
  for (std::size_t i = 0; i < rest.size(); ++i) {
    const float want = molora::to_float(rest[i]);
    same_class = same_class && (std::isnan(want) ? std::isnan(wr[i]) : wr[i] == want);
  }
  CHECK(same_class);
}

}  // namespace

namespace {

// The two paths of skinny_product called directly (the ISA this file is compiled for, and
// scalar): the streamed one (rows one after the other, T <= kSkinnyStreamTokens) and the
// blocked one give the same bits for every T, on every row range, with W0 in Scalar or (for
// float) bf16 / f16; and the streamed one matches the double reference.
template <class Arch, class Scalar, class Weight>
void paths_suite() {
  namespace kd = k::detail;
  std::uint64_t seed = 1300;
  Index runs = 0;
  for (const Index in : {1, 2, 7, 15, 16, 17, 31, 33, 64, 65, 257})
    for (Index T = 1; T <= k::kSkinnyStreamTokens + 2; ++T)
      for (const Index out : {1, 2, 3, 5, 9}) {
        Problem<Scalar> p(in, out, T, (in + T + out) % 2 == 1, ++seed);
        std::vector<Weight> wt(p.w.size());
        for (std::size_t i = 0; i < wt.size(); ++i) {
          if constexpr (std::is_same_v<Weight, Scalar>)
            wt[i] = p.w[i];
          else if constexpr (std::is_same_v<Weight, molora::bf16>)
            wt[i] = molora::to_bf16(float(p.w[i]));
          else
            wt[i] = molora::to_f16(float(p.w[i]));
          p.w[i] = Scalar(molora::to_float(wt[i]));  // the reference sees the rounded weights
        }
        std::vector<Scalar> streamed = p.y0, blocked = p.y0, ranges = p.y0;
        kd::skinny_product_streamed<Arch>(wt.data(), p.ldw, in, p.x.data(), p.ldx, T, p.bias_ptr(), streamed.data(),
                                          p.ldy, Index(0), out);
        kd::skinny_product_blocked<Arch>(wt.data(), p.ldw, in, p.x.data(), p.ldx, T, p.bias_ptr(), blocked.data(),
                                         p.ldy, Index(0), out);
        for (Index o0 = 0; o0 < out;) {  // ranges of 1, 2, 3, ... rows
          const Index o1 = std::min(out, o0 + 1 + o0 % 3);
          kd::skinny_product_streamed<Arch>(wt.data(), p.ldw, in, p.x.data(), p.ldx, T, p.bias_ptr(), ranges.data(),
                                            p.ldy, o0, o1);
          o0 = o1;
        }
        std::vector<double> ref, tol;
        p.reference(ref, tol);
        std::size_t bad = 0;
        for (std::size_t i = 0; i < streamed.size(); ++i) bad += std::abs(double(streamed[i]) - ref[i]) > tol[i];
        INFO(Arch::name(), " in=", in, " out=", out, " T=", T);
        CHECK(streamed == blocked);
        CHECK(ranges == streamed);
        CHECK(bad == 0);
        ++runs;
      }
  CHECK(runs == 11 * (k::kSkinnyStreamTokens + 2) * 5);
}

}  // namespace

#if !defined(MOLORA_NO_XSIMD)
TEST_CASE("base_kernels: the streamed and the blocked path give the same bits, and match the double reference") {
  SUBCASE("f32") { paths_suite<k::default_arch, float, float>(); }
  SUBCASE("f64") { paths_suite<k::default_arch, double, double>(); }
  SUBCASE("bf16") { paths_suite<k::default_arch, float, molora::bf16>(); }
  SUBCASE("f16") { paths_suite<k::default_arch, float, molora::f16>(); }
}
#endif

TEST_CASE_TEMPLATE("base_kernels: bf16 and f16 weights give the float kernel's bits on the widened weights", Weight,
                   molora::bf16, molora::f16) {
  SUBCASE("the ISA running") { half_weight_suite<k::layer_arch, Weight>(); }
  SUBCASE("scalar") { half_weight_suite<k::scalar_arch, Weight>(); }
}

#if !defined(MOLORA_NO_XSIMD)
namespace {

// Every register block shape the blocked kernel may take (rows side by side x tokens per
// block, with and without software prefetch along the rows, with and without the next
// blocks' rows prefetched in address order), over row ranges that start anywhere, gives
// the bits of skinny_product_blocked, and matches the double reference: the shape is a
// speed choice only.
template <class Arch, class Scalar, class Weight>
void shapes_suite() {
  namespace kd = k::detail;
  std::uint64_t seed = 2100;
  Index runs = 0;
  for (const Index in : {1, 15, 16, 17, 33, 300})
    for (Index T = 1; T <= 6; ++T)
      for (const Index out : {1, 7, 16, 17, 31, 45}) {
        Problem<Scalar> p(in, out, T, (in + T + out) % 2 == 0, ++seed);
        std::vector<Weight> wt(p.w.size());
        for (std::size_t i = 0; i < wt.size(); ++i) {
          if constexpr (std::is_same_v<Weight, Scalar>)
            wt[i] = p.w[i];
          else
            wt[i] = molora::to_bf16(float(p.w[i]));
          p.w[i] = Scalar(molora::to_float(wt[i]));
        }
        std::vector<Scalar> blocked = p.y0;
        kd::skinny_product_blocked<Arch>(wt.data(), p.ldw, in, p.x.data(), p.ldx, T, p.bias_ptr(), blocked.data(),
                                         p.ldy, Index(0), out);
        alignas(64) Scalar spill[2048];
        auto shape = [&](auto run) {
          std::vector<Scalar> y = p.y0;
          const Index mid = out / 3;  // two ranges: [0, mid), [mid, out)
          run(y, Index(0), mid);
          run(y, mid, out);
          return y;
        };
#define MOLORA_SHAPE(RO, TB, PF, AHEAD)                                                                             \
  shape([&](std::vector<Scalar>& y, Index o0, Index o1) {                                                          \
    kd::skinny_rows_range<RO, TB, PF, Arch, AHEAD>(wt.data(), p.ldw, in, p.x.data(), p.ldx, T, p.bias_ptr(),      \
                                                   y.data(), p.ldy, o0, o1, spill);                                \
  })
        // (with AHEAD the next blocks' rows are prefetched in address order; passes of more
        // than TB tokens run as without)
        const std::vector<std::vector<Scalar>> shapes = {MOLORA_SHAPE(16, 1, 0, false),   MOLORA_SHAPE(8, 4, 0, false),
                                                         MOLORA_SHAPE(8, 2, 4096, false), MOLORA_SHAPE(4, 4, 4096, false),
                                                         MOLORA_SHAPE(4, 3, 0, false),    MOLORA_SHAPE(2, 1, 0, false),
                                                         MOLORA_SHAPE(1, 4, 4096, false), MOLORA_SHAPE(12, 1, 0, true),
                                                         MOLORA_SHAPE(8, 3, 0, true),     MOLORA_SHAPE(6, 4, 0, true),
                                                         // one row after the other (short rows, T = 1), and
                                                         // whatever path skinny_product picks
                                                         shape([&](std::vector<Scalar>& y, Index o0, Index o1) {
                                                           kd::skinny_stream_rows<1, Arch, 0>(
                                                               wt.data(), p.ldw, in, p.x.data(), p.ldx, T,
                                                               p.bias_ptr(), y.data(), p.ldy, o0, o1);
                                                         }),
                                                         shape([&](std::vector<Scalar>& y, Index o0, Index o1) {
                                                           k::skinny_product(Arch{}, wt.data(), p.ldw, in,
                                                                             p.x.data(), p.ldx, T, p.bias_ptr(),
                                                                             y.data(), p.ldy, o0, o1);
                                                         })};
#undef MOLORA_SHAPE
        std::vector<double> ref, tol;
        p.reference(ref, tol);
        std::size_t bad = 0;
        for (std::size_t i = 0; i < blocked.size(); ++i) bad += std::abs(double(blocked[i]) - ref[i]) > tol[i];
        INFO(Arch::name(), " in=", in, " out=", out, " T=", T);
        CHECK(bad == 0);
        for (const auto& y : shapes) CHECK(y == blocked);
        ++runs;
      }
  CHECK(runs == 6 * 6 * 6);
}

}  // namespace

TEST_CASE("base_kernels: every register block shape and row range gives the blocked kernel's bits") {
  SUBCASE("f32") { shapes_suite<k::default_arch, float, float>(); }
  SUBCASE("f64") { shapes_suite<k::default_arch, double, double>(); }
  SUBCASE("bf16") { shapes_suite<k::default_arch, float, molora::bf16>(); }
}
#endif

namespace {

// Weights of p rounded to Weight (bf16 / f16) in wt, p.w set to their widened values (what
// the reference and the float kernel then see); for Weight = Scalar a plain copy.
template <class Scalar, class Weight>
std::vector<Weight> weights_in(Problem<Scalar>& p) {
  std::vector<Weight> wt(p.w.size());
  for (std::size_t i = 0; i < wt.size(); ++i) {
    if constexpr (std::is_same_v<Weight, Scalar>)
      wt[i] = p.w[i];
    else if constexpr (std::is_same_v<Weight, molora::bf16>)
      wt[i] = molora::to_bf16(float(p.w[i]));
    else
      wt[i] = molora::to_f16(float(p.w[i]));
    p.w[i] = Scalar(molora::to_float(wt[i]));
  }
  return wt;
}

// skinny_product (layer_arch: the wide path of 8 tokens in registers on 32-register ISAs for
// kSkinnyWideFrom..kSkinnyWideTo tokens) for every T from 1 to 20 across the wide path's
// boundaries, odd in and out, W0 in Scalar, bf16 or f16: within the double reference's bound;
// rows split into ranges of 1 to 5 give the bits of one call, and so does each token alone
// (the one-token kernels sum in the same order).
template <class Arch, class Weight>
void wide_suite() {
  std::uint64_t seed = 3100;
  Index runs = 0;
  for (Index T = 1; T <= 20; ++T)
    for (const Index in : {1, 3, 16, 17, 33, 65, 1000})
      for (const Index out : {1, 2, 3, 4, 5, 17, 33}) {
        Problem<float> p(in, out, T, (in + T + out) % 2 == 1, ++seed);
        const std::vector<Weight> wt = weights_in<float, Weight>(p);
        std::vector<float> whole = p.y0, parts = p.y0, singles = p.y0;
        k::skinny_product(Arch{}, wt.data(), p.ldw, in, p.x.data(), p.ldx, T, p.bias_ptr(), whole.data(), p.ldy, 0, out);
        for (Index o0 = 0; o0 < out;) {
          const Index o1 = std::min(out, o0 + 1 + (o0 + T) % 5);
          k::skinny_product(Arch{}, wt.data(), p.ldw, in, p.x.data(), p.ldx, T, p.bias_ptr(), parts.data(), p.ldy, o0,
                            o1);
          o0 = o1;
        }
        for (Index t = 0; t < T; ++t)
          k::skinny_product(Arch{}, wt.data(), p.ldw, in, p.x.data() + t * p.ldx, p.ldx, 1, p.bias_ptr(),
                            singles.data() + t * p.ldy, p.ldy, 0, out);
        std::vector<double> ref, tol;
        p.reference(ref, tol);
        std::size_t bad = 0;
        for (std::size_t i = 0; i < whole.size(); ++i) bad += std::abs(double(whole[i]) - ref[i]) > tol[i];
        INFO(Arch::name(), " in=", in, " out=", out, " T=", T);
        CHECK(bad == 0);
        CHECK(parts == whole);
        CHECK(singles == whole);
        ++runs;
      }
  CHECK(runs == 20 * 7 * 7);
}

}  // namespace

TEST_CASE_TEMPLATE("base_kernels: 1-20 tokens (the wide path) match the reference, bit for bit across ranges and tokens",
                   Weight, float, molora::bf16, molora::f16) {
  SUBCASE("the ISA running") { wide_suite<k::layer_arch, Weight>(); }
  SUBCASE("scalar") { wide_suite<k::scalar_arch, Weight>(); }
}

#if !defined(MOLORA_NO_XSIMD)
namespace {

// The wide path's kernels called directly for the ISA this file is compiled for (any
// register count: the shape is a speed choice), every block height and token block (8 tokens,
// and the 2, 4 and 6 of the 16-register shapes), with prefetch along the rows and with the
// next blocks' rows prefetched in address order, over two row ranges: the bits of
// skinny_product_blocked's other shapes (8 rows x 1 token per token) for every T from 1 to 20
// (one pass, chunks with spills, token tails).
template <class Arch, class Scalar, class Weight>
void wide_shapes_suite() {
  namespace kd = k::detail;
  std::uint64_t seed = 4100;
  Index runs = 0;
  for (Index T = 1; T <= 20; ++T)
    for (const Index in : {1, 17, 33, 1000})
      for (const Index out : {1, 4, 7, 17}) {
        Problem<Scalar> p(in, out, T, (in + T + out) % 2 == 0, ++seed);
        const std::vector<Weight> wt = weights_in<Scalar, Weight>(p);
        std::vector<Scalar> want = p.y0;
        for (Index t = 0; t < T; ++t)
          kd::skinny_rows_range<8, 1, 0, Arch>(wt.data(), p.ldw, in, p.x.data() + t * p.ldx, p.ldx, 1, p.bias_ptr(),
                                               want.data() + t * p.ldy, p.ldy, Index(0), out,
                                               static_cast<Scalar*>(nullptr));
        alignas(64) Scalar spill[k::kSkinnyGroup * 4 * 16];
        auto shape = [&](auto run) {
          std::vector<Scalar> y = p.y0;
          const Index mid = out / 2;
          run(y, Index(0), mid);
          run(y, mid, out);
          return y;
        };
#define MOLORA_WIDE(RO, PF, AHEAD, TB)                                                                                 \
  shape([&](std::vector<Scalar>& y, Index o0, Index o1) {                                                              \
    kd::skinny_wide_range<RO, PF, Arch, AHEAD, TB>(wt.data(), p.ldw, in, p.x.data(), p.ldx, T, p.bias_ptr(), y.data(), \
                                                   p.ldy, o0, o1, spill);                                              \
  })
        // the 32-register blocks (3 rows x 8 tokens and the ends of a range), then the
        // 16-register ones: 4 x 2, 3 x 4, 2 x 6
        const std::vector<std::vector<Scalar>> shapes = {
            MOLORA_WIDE(3, 0, false, 8),    MOLORA_WIDE(3, 4096, false, 8), MOLORA_WIDE(2, 0, false, 8),
            MOLORA_WIDE(1, 0, false, 8),    MOLORA_WIDE(3, 4096, true, 8),  MOLORA_WIDE(4, 0, true, 2),
            MOLORA_WIDE(3, 0, true, 4),     MOLORA_WIDE(3, 0, false, 4),    MOLORA_WIDE(2, 0, true, 6)};
#undef MOLORA_WIDE
        std::vector<double> ref, tol;
        p.reference(ref, tol);
        std::size_t bad = 0;
        for (std::size_t i = 0; i < want.size(); ++i) bad += std::abs(double(shapes[0][i]) - ref[i]) > tol[i];
        INFO(Arch::name(), " in=", in, " out=", out, " T=", T);
        CHECK(bad == 0);
        for (const auto& y : shapes) CHECK(y == want);
        ++runs;
      }
  CHECK(runs == 20 * 4 * 4);
}

}  // namespace

TEST_CASE("base_kernels: the wide path's block shapes give the one-token kernel's bits") {
  SUBCASE("f32") { wide_shapes_suite<k::default_arch, float, float>(); }
  SUBCASE("f64") { wide_shapes_suite<k::default_arch, double, double>(); }
  SUBCASE("bf16") { wide_shapes_suite<k::default_arch, float, molora::bf16>(); }
  SUBCASE("f16") { wide_shapes_suite<k::default_arch, float, molora::f16>(); }
}
#endif

// skinny_product_bf16dot (blocks of 3 rows x 8 tokens with AVX512_BF16, a plain loop
// elsewhere) for every T from 1 to 20, odd in and out: x and W0 bf16-exact, so every product
// is exact and the result is within float summation error of the double reference; row
// ranges and each token alone give the bits of one call.
TEST_CASE("base_kernels: the bf16-dot skinny product, 1-20 tokens, against the reference and bit for bit across blocks") {
  MESSAGE("AVX512_BF16 dot products: ", std::string(k::bf16_dot_available() ? "yes" : "no (plain loop)"));
  std::uint64_t seed = 5100;
  Index runs = 0;
  for (Index T = 1; T <= 20; ++T)
    for (const Index in : {1, 3, 17, 31, 32, 33, 65, 1000})
      for (const Index out : {1, 2, 3, 4, 5, 17, 33}) {
        Problem<float> p(in, out, T, (in + T + out) % 2 == 0, ++seed);
        const std::vector<molora::bf16> wt = weights_in<float, molora::bf16>(p);
        for (auto& v : p.x) v = molora::to_float(molora::to_bf16(v));
        std::vector<float> whole = p.y0, parts = p.y0, singles = p.y0;
        k::skinny_product_bf16dot(k::layer_arch{}, wt.data(), p.ldw, in, p.x.data(), p.ldx, T, p.bias_ptr(),
                                  whole.data(), p.ldy, 0, out);
        for (Index o0 = 0; o0 < out;) {
          const Index o1 = std::min(out, o0 + 1 + (o0 + T) % 4);
          k::skinny_product_bf16dot(k::layer_arch{}, wt.data(), p.ldw, in, p.x.data(), p.ldx, T, p.bias_ptr(),
                                    parts.data(), p.ldy, o0, o1);
          o0 = o1;
        }
        for (Index t = 0; t < T; ++t)
          k::skinny_product_bf16dot(k::layer_arch{}, wt.data(), p.ldw, in, p.x.data() + t * p.ldx, p.ldx, 1,
                                    p.bias_ptr(), singles.data() + t * p.ldy, p.ldy, 0, out);
        std::vector<double> ref, tol;
        p.reference(ref, tol);
        std::size_t bad = 0;
        for (std::size_t i = 0; i < whole.size(); ++i) bad += std::abs(double(whole[i]) - ref[i]) > tol[i];
        INFO("in=", in, " out=", out, " T=", T);
        CHECK(bad == 0);
        CHECK(parts == whole);
        CHECK(singles == whole);
        ++runs;
      }
  CHECK(runs == 20 * 8 * 7);
}

// The one-token f32 route: float rows of at most skinny_short_row_bytes<float>() (4 KiB,
// in <= 1024) are read one row after the other on 32-register ISAs (longer ones in blocks of
// rows side by side), and a Linear<float> takes the skinny kernel for one token with AVX-512
// (detail::one_token_skinny). Across the 4 KiB boundary, odd out, with and without bias: the
// kernel's one-token result matches the
// double reference and is bit for bit the blocked kernel's and the one-row path's at the ISA
// this file is compiled for, on any row range; the layer's one-token forward (automatic, and
// eigen: Eigen's GEMV) matches the reference; automatic resolves to skinny exactly where the
// route is taken, and is then the dispatched kernel's result bit for bit, else the GEMV's.
TEST_CASE("base_kernels: the f32 one-token route across the 4 KiB rows matches the reference and the blocked bits") {
  CHECK(k::skinny_short_row_bytes<float>() == 4096);
  CHECK(k::skinny_short_row_bytes<molora::bf16>() == 2048);
  std::uint64_t seed = 7700;
  Index runs = 0;
  for (const Index in : {1, 17, 1000, 1023, 1024, 1025, 1031})
    for (const Index out : {1, 3, 33, 70}) {
      Problem<float> p(in, out, 1, (in + out) % 2 == 1, ++seed);
      std::vector<double> ref, tol;
      p.reference(ref, tol);
      auto within = [&](const std::vector<float>& y) {
        std::size_t bad = 0;
        for (std::size_t i = 0; i < y.size(); ++i) bad += std::abs(double(y[i]) - ref[i]) > tol[i];
        return bad == 0;
      };
      const std::vector<float> route = p.template run<k::default_arch>();
#if !defined(MOLORA_NO_XSIMD)
      namespace kd = k::detail;
      std::vector<float> blocked = p.y0, rows1 = p.y0, ranges = p.y0;
      kd::skinny_product_blocked<k::default_arch>(p.w.data(), p.ldw, in, p.x.data(), p.ldx, 1, p.bias_ptr(),
                                                  blocked.data(), p.ldy, Index(0), out);
      kd::skinny_stream_rows<1, k::default_arch, 0>(p.w.data(), p.ldw, in, p.x.data(), p.ldx, 1, p.bias_ptr(),
                                                    rows1.data(), p.ldy, Index(0), out);
      for (Index o0 = 0; o0 < out;) {  // ranges of 1 to 5 rows
        const Index o1 = std::min(out, o0 + 1 + o0 % 5);
        p.template run<k::default_arch>(ranges, o0, o1);
        o0 = o1;
      }
      INFO(k::default_arch::name(), " in=", in, " out=", out);
      CHECK(route == blocked);
      CHECK(rows1 == blocked);
      CHECK(ranges == route);
#endif
      CHECK(within(route));

      // The layer at T = 1 over the same weight (contiguous) and bias.
      molora::RowMatrix<float> w(out, in), x(1, in);  // [out, in], [1, in]
      for (Index o = 0; o < out; ++o)
        for (Index i = 0; i < in; ++i) w(o, i) = p.w[at(o * p.ldw + i)];
      for (Index i = 0; i < in; ++i) x(0, i) = p.x[at(i)];
      molora::Linear<float> lin(in, out);
      lin.set_weight(w);
      if (p.with_bias) lin.set_bias(Eigen::Map<const molora::Vector<float>>(p.bias.data(), out));
      const molora::RowMatrix<float> ya = lin.forward(x);  // [1, out], automatic
      lin.set_strategy(molora::BaseStrategy::eigen);
      const molora::RowMatrix<float> ye = lin.forward(x);
      std::vector<float> ylin(p.y0), yeig(p.y0);
      for (Index o = 0; o < out; ++o) ylin[at(o)] = ya(0, o), yeig[at(o)] = ye(0, o);
      CHECK(within(ylin));
      CHECK(within(yeig));
      lin.set_strategy(molora::BaseStrategy::automatic);
      const bool routed = molora::detail::one_token_skinny<float>(in);
      CHECK(lin.resolved_strategy(1) == (routed ? molora::BaseStrategy::skinny : molora::BaseStrategy::eigen));
      if (!routed) CHECK(ya == ye);
      if (routed) {
        molora::RowMatrix<float> yk(1, out);  // [1, out]
        k::skinny_product(k::layer_arch{}, w.data(), in, in, x.data(), in, 1, p.bias_ptr(), yk.data(), out, 0, out);
        CHECK(ya == yk);
      }
      ++runs;
    }
  CHECK(runs == 7 * 4);
}

// From kStageXFrom tokens the layers' skinny product reads x from a staged copy (rows 64-byte
// aligned, never a multiple of 4 KiB apart): the same bits as the kernel on x in place,
// whatever x's alignment and stride, for float and 16-bit weights.
template <class Weight>
void staged_suite() {
  namespace d = molora::detail;
  std::mt19937_64 gen(91);
  for (const Index in : {1, 16, 17, 1000, 1024})
    for (const Index T : {1, 4, 5, 8, 9, 23, 31, 33}) {
      const Index out = 1 + Index(gen() % 40);
      std::vector<Weight> w(at(out * in));
      for (auto& e : w) e = d::weight_from_float<Weight>(std::uniform_real_distribution<double>(-1, 1)(gen), "w", 0, 0);
      const std::vector<float> bias = random_vec<float>(out, gen);
      // x at a float past a cache line, rows 1024 floats (4 KiB) or in + 3 apart.
      for (const Index ldx : {std::max<Index>(in, 1024), in + 3}) {
        std::vector<float> buf = random_vec<float>(T * ldx + 16, gen);
        const float* xp = buf.data() + 1;
        const Eigen::Map<const molora::RowMatrix<float>, 0, Eigen::OuterStride<>> xm(xp, T, in,
                                                                                     Eigen::OuterStride<>(ldx));
        const molora::ConstRowRef<float> x(xm);
        molora::RowMatrix<float> y(T, out), yk(T, out);
        molora::RowRef<float> yr(y);
        d::base_product(w.data(), in, out, bias.data(), x, yr, molora::BaseStrategy::skinny);
        k::skinny_product(k::layer_arch{}, w.data(), in, in, xp, ldx, T, bias.data(), yk.data(), out, 0, out);
        INFO("in=", in, " T=", T, " ldx=", ldx);
        CHECK(y == yk);
      }
    }
  for (const Index in : {1, 16, 17, 1000, 1024, 2048, 2816, 4096}) {
    const Index ld = d::staged_stride<float>(in);
    CHECK(ld >= in);
    CHECK(ld % 16 == 0);
    CHECK((ld * 4) % 4096 != 0);
    CHECK(ld - in < 32);
  }
}

TEST_CASE("base_kernels: the staged x gives the bits of x in place (float, bf16, f16 weights)") {
  staged_suite<float>();
  staged_suite<molora::bf16>();
  staged_suite<molora::f16>();
}
