// The 16-bit weight types (half.hpp) against references written from the formats' definitions:
// every one of the 65536 bf16 and f16 bit patterns widens to the value its sign, exponent and
// mantissa fields give (computed with ldexp in double); narrowing from float picks the nearest
// representable value with ties to the even pattern (found by a search over the sorted list of
// all values), checked at every midpoint, one float step either side of it, every value
// itself and a million random floats; NaN stays NaN; f16's overflow and subnormals; the
// checked conversion's errors.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include <molora/half.hpp>

namespace test_half {

namespace {

std::uint32_t bits_of(float f) {
  std::uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
float float_of(std::uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// The format's value of a bit pattern: exponent bits E, mantissa bits M, bias 2^(E-1) - 1.
// Infinity for the all-ones exponent with a zero mantissa, NaN with a nonzero one.
double decode(std::uint16_t h, int exp_bits, int mant_bits) {
  const int bias = (1 << (exp_bits - 1)) - 1;
  const bool neg = (h >> 15) & 1;
  const int e = (h >> mant_bits) & ((1 << exp_bits) - 1);
  const int m = h & ((1 << mant_bits) - 1);
  double v;
  if (e == (1 << exp_bits) - 1)
    v = m == 0 ? std::numeric_limits<double>::infinity() : std::numeric_limits<double>::quiet_NaN();
  else if (e == 0)
    v = std::ldexp(double(m), 1 - bias - mant_bits);
  else
    v = std::ldexp(double((1 << mant_bits) + m), e - bias - mant_bits);
  return neg ? -v : v;
}
double decode_bf16(std::uint16_t h) { return decode(h, 8, 7); }
double decode_f16(std::uint16_t h) { return decode(h, 5, 10); }

// The non-negative patterns of a format in increasing order of value, ending with infinity
// (which rounding reaches from the midpoint between the largest finite value and the next
// power of two the format would have, stood in for by that power).
struct Ladder {
  std::vector<double> values;
  std::vector<std::uint16_t> patterns;
  Ladder(double (*dec)(std::uint16_t), std::uint16_t inf_bits, double next_power) {
    for (std::uint32_t b = 0; b < inf_bits; ++b) {
      values.push_back(dec(static_cast<std::uint16_t>(b)));
      patterns.push_back(static_cast<std::uint16_t>(b));
    }
    values.push_back(next_power);
    patterns.push_back(inf_bits);
  }
  // The pattern nearest to x (finite, >= 0), ties to the even pattern.
  std::uint16_t nearest(double x) const {
    if (x >= values.back()) return patterns.back();
    const auto it = std::lower_bound(values.begin(), values.end(), x);
    const std::size_t hi = static_cast<std::size_t>(it - values.begin());
    if (values[hi] == x || hi == 0) return patterns[hi];
    const std::size_t lo = hi - 1;
    const double dlo = x - values[lo], dhi = values[hi] - x;
    if (dlo < dhi) return patterns[lo];
    if (dhi < dlo) return patterns[hi];
    return (patterns[lo] & 1) == 0 ? patterns[lo] : patterns[hi];
  }
};

const Ladder& bf16_ladder() {
  static const Ladder l(decode_bf16, 0x7f80, std::ldexp(1.0, 128));
  return l;
}
const Ladder& f16_ladder() {
  static const Ladder l(decode_f16, 0x7c00, 65536.0);
  return l;
}

// Narrowing of x (finite or not) as the reference says, for one format.
template <class Half>
std::uint16_t reference_narrow(float x) {
  const Ladder& l = std::is_same_v<Half, molora::bf16> ? bf16_ladder() : f16_ladder();
  const std::uint16_t sign = std::signbit(x) ? 0x8000 : 0;
  if (std::isinf(x)) return static_cast<std::uint16_t>(sign | l.patterns.back());
  return static_cast<std::uint16_t>(sign | l.nearest(std::abs(double(x))));
}

template <class Half>
std::uint16_t narrow(float x) {
  if constexpr (std::is_same_v<Half, molora::bf16>)
    return molora::to_bf16(x).bits;
  else
    return molora::to_f16(x).bits;
}

// Checks narrowing of x and -x; returns the number of mismatches.
template <class Half>
int check_narrow(float x) {
  int bad = 0;
  for (const float v : {x, -x}) {
    const std::uint16_t got = narrow<Half>(v), want = reference_narrow<Half>(v);
    if (got != want) {
      if (bad == 0) {
        INFO("x=", v, " bits=", bits_of(v), " got=", got, " want=", want);
        CHECK(got == want);
      }
      ++bad;
    }
  }
  return bad;
}

template <class Half>
void narrowing_suite() {
  const Ladder& l = std::is_same_v<Half, molora::bf16> ? bf16_ladder() : f16_ladder();
  int bad = 0;
  std::size_t ties = 0;
  for (std::size_t i = 0; i + 1 < l.values.size(); ++i) {
    bad += check_narrow<Half>(static_cast<float>(l.values[i]));
    const double mid = (l.values[i] + l.values[i + 1]) / 2;
    const float m = static_cast<float>(mid);
    REQUIRE(double(m) == mid);  // every midpoint is a float: the tie itself is tested
    ++ties;
    bad += check_narrow<Half>(m);
    bad += check_narrow<Half>(std::nextafter(m, 0.0f));
    bad += check_narrow<Half>(std::nextafter(m, std::numeric_limits<float>::infinity()));
  }
  std::mt19937 gen(5);
  for (int i = 0; i < 1000000; ++i) {
    const float x = float_of(static_cast<std::uint32_t>(gen()));
    if (std::isnan(x)) continue;
    bad += check_narrow<Half>(x);
  }
  for (const float x : {0.0f, std::numeric_limits<float>::denorm_min(), std::numeric_limits<float>::min(),
                        std::numeric_limits<float>::max(), std::numeric_limits<float>::infinity()})
    bad += check_narrow<Half>(x);
  MESSAGE(ties, " midpoints tested");
  CHECK(bad == 0);
}

}  // namespace

TEST_CASE("half: every bf16 pattern widens exactly") {
  int bad = 0;
  for (std::uint32_t b = 0; b < 65536; ++b) {
    const auto h = static_cast<std::uint16_t>(b);
    const float got = molora::to_float(molora::bf16{h});
    const double want = decode_bf16(h);
    const bool ok = std::isnan(want) ? std::isnan(got) && (bits_of(got) >> 16) == h  // payload and sign kept
                                     : double(got) == want && std::signbit(got) == std::signbit(want);
    if (!ok && bad++ == 0) {
      INFO("pattern ", b, " got ", got, " want ", want);
      CHECK(ok);
    }
  }
  CHECK(bad == 0);
}

TEST_CASE("half: every f16 pattern widens exactly") {
  int bad = 0, subnormals = 0;
  for (std::uint32_t b = 0; b < 65536; ++b) {
    const auto h = static_cast<std::uint16_t>(b);
    const float got = molora::to_float(molora::f16{h});
    const double want = decode_f16(h);
    if ((h & 0x7c00) == 0 && (h & 0x3ff) != 0) ++subnormals;
    bool ok = std::isnan(want) ? std::isnan(got) && std::signbit(got) == bool(h & 0x8000) &&
                                     ((bits_of(got) >> 13) & 0x3ff) == (h & 0x3ffu)
                               : double(got) == want && std::signbit(got) == std::signbit(want);
    // Every f16 value is a float, and converting it back gives the pattern again.
    if (!std::isnan(want)) ok = ok && molora::to_f16(got).bits == h;
    if (!ok && bad++ == 0) {
      INFO("pattern ", b, " got ", got, " want ", want);
      CHECK(ok);
    }
  }
  CHECK(subnormals == 2 * 1023);
  CHECK(bad == 0);
  CHECK(molora::to_float(molora::f16{0x7bff}) == 65504.0f);
  CHECK(molora::to_float(molora::f16{0x0001}) == std::ldexp(1.0f, -24));
  CHECK(molora::to_float(molora::f16{0x0400}) == std::ldexp(1.0f, -14));
}

TEST_CASE("half: bf16 from float rounds to nearest, ties to even") {
  narrowing_suite<molora::bf16>();
  // Spot checks: 1 + 2^-8 is the midpoint of 1 and 1 + 2^-7; even is 1. 1 + 3 * 2^-8 goes up.
  CHECK(molora::to_bf16(1.0f + std::ldexp(1.0f, -8)).bits == 0x3f80);
  CHECK(molora::to_bf16(1.0f + 3 * std::ldexp(1.0f, -8)).bits == 0x3f82);
  CHECK(molora::to_bf16(std::numeric_limits<float>::max()).bits == 0x7f80);  // rounds to inf
}

TEST_CASE("half: f16 from float rounds to nearest, ties to even; overflow and subnormals") {
  narrowing_suite<molora::f16>();
  CHECK(molora::to_f16(65504.0f).bits == 0x7bff);
  CHECK(molora::to_f16(65519.996f).bits == 0x7bff);
  CHECK(molora::to_f16(65520.0f).bits == 0x7c00);  // the tie goes to the even pattern, inf
  CHECK(molora::to_f16(1e9f).bits == 0x7c00);
  CHECK(molora::to_f16(-1e9f).bits == 0xfc00);
  CHECK(molora::to_f16(std::ldexp(1.0f, -25)).bits == 0x0000);  // tie between 0 and 2^-24
  CHECK(molora::to_f16(std::nextafter(std::ldexp(1.0f, -25), 1.0f)).bits == 0x0001);
  CHECK(molora::to_f16(3 * std::ldexp(1.0f, -25)).bits == 0x0002);  // tie between 1 and 2: even
  CHECK(molora::to_f16(std::ldexp(1023.5f, -24)).bits == 0x0400);  // rounds up to the smallest normal
  CHECK(molora::to_f16(-0.0f).bits == 0x8000);
}

TEST_CASE("half: NaN stays NaN") {
  for (const std::uint32_t nan : {0x7fc00000u, 0x7f800001u, 0xff800001u, 0x7fffffffu, 0x7f802000u}) {
    const float x = float_of(nan);
    INFO("bits ", nan);
    CHECK(std::isnan(molora::to_float(molora::to_bf16(x))));
    CHECK(std::isnan(molora::to_float(molora::to_f16(x))));
    CHECK(std::signbit(molora::to_float(molora::to_bf16(x))) == std::signbit(x));
    CHECK(std::signbit(molora::to_float(molora::to_f16(x))) == std::signbit(x));
  }
}

TEST_CASE("half: the checked conversion of a weight names the field, the index and the value") {
  using molora::detail::weight_from_float;
  CHECK(weight_from_float<molora::f16>(65504.0, "w", 0, 0).bits == 0x7bff);
  CHECK(weight_from_float<molora::f16>(-65519.0, "w", 0, 0).bits == 0xfbff);
  CHECK(weight_from_float<molora::bf16>(1.0, "w", 0, 0).bits == 0x3f80);
  CHECK(weight_from_float<float>(0.5, "w", 0, 0) == 0.5f);
  auto message = [](auto f) -> std::string {
    try {
      f();
    } catch (const molora::numeric_error& e) {
      return e.what();
    }
    return "no numeric_error";
  };
  const std::string over = message([] { weight_from_float<molora::f16>(65520.0, "linear weight", 3, 7); });
  CHECK(over.find("linear weight") != std::string::npos);
  CHECK(over.find("65504") != std::string::npos);
  CHECK(over.find("65520") != std::string::npos);
  CHECK(over.find("[3, 7]") != std::string::npos);
  const std::string inf = message([] {
    weight_from_float<molora::bf16>(std::numeric_limits<double>::infinity(), "linear weight", 1, 2);
  });
  CHECK(inf.find("expected finite values, got inf at [1, 2]") != std::string::npos);
  CHECK(message([] { weight_from_float<molora::bf16>(3.4e38, "w", 0, 0); }).find("bf16's range") != std::string::npos);
  CHECK(message([] { weight_from_float<float>(1e39, "w", 0, 0); }).find("float's range") != std::string::npos);
  CHECK(message([] { weight_from_float<molora::f16>(std::nan(""), "w", 0, 0); }).find("nan") != std::string::npos);
  CHECK(message([] { molora::detail::require_finite_weight(molora::f16{0x7c00}, "wrapped", 4, 5); })
            .find("got inf at [4, 5]") != std::string::npos);
}

}  // namespace test_half
