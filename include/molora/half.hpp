// 16-bit weight storage: bf16 (bfloat16, the top half of an IEEE float) and f16 (IEEE
// binary16). Weights may be kept in these types while activations and accumulation stay
// float ("low-precision storage, full-precision arithmetic"): conversion from float rounds
// to nearest, ties to even; widening back to float is exact, so a layer holding bf16/f16
// weights computes what a float layer holding the rounded weights computes
// (docs/design-notes.md, "Weights in their own type").
//
// The scalar conversions here are plain bit manipulation and depend on no -march flag; the
// kernels widen whole vectors themselves (kernels/base_kernels.hpp).
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "errors.hpp"

namespace molora {

// bfloat16: sign, 8 exponent bits, 7 mantissa bits (the upper 16 bits of a float).
struct bf16 {
  std::uint16_t bits;
};

// IEEE binary16: sign, 5 exponent bits, 10 mantissa bits; largest finite value 65504.
struct f16 {
  std::uint16_t bits;
};

static_assert(sizeof(bf16) == 2 && std::is_trivially_copyable_v<bf16> && std::is_standard_layout_v<bf16>);
static_assert(sizeof(f16) == 2 && std::is_trivially_copyable_v<f16> && std::is_standard_layout_v<f16>);

namespace detail {

inline std::uint32_t float_bits(float f) noexcept {
  std::uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

inline float bits_float(std::uint32_t u) noexcept {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// x >> shift rounded to nearest, ties to even (1 <= shift <= 31).
inline std::uint32_t shift_right_rne(std::uint32_t x, unsigned shift) noexcept {
  const std::uint32_t half = std::uint32_t(1) << (shift - 1);
  const std::uint32_t rest = x & ((half << 1) - 1);
  std::uint32_t q = x >> shift;
  if (rest > half || (rest == half && (q & 1u))) ++q;
  return q;
}

// double -> float rounding to odd (truncate, then set the last bit if inexact). Rounding that
// result to bf16 or f16 then equals rounding the double directly (no double rounding).
inline float double_to_float_odd(double d) noexcept {
  if (std::isnan(d)) return static_cast<float>(d);
  float f = static_cast<float>(d);
  if (static_cast<double>(f) == d) return f;
  if (std::fabs(static_cast<double>(f)) > std::fabs(d)) f = std::nextafter(f, 0.0f);
  return bits_float(float_bits(f) | 1u);
}

}  // namespace detail

// Exact widening.
inline float to_float(bf16 h) noexcept { return detail::bits_float(std::uint32_t(h.bits) << 16); }

inline float to_float(f16 h) noexcept {
  const std::uint32_t sign = std::uint32_t(h.bits & 0x8000u) << 16;
  const std::uint32_t exp = (h.bits >> 10) & 0x1fu;
  std::uint32_t mant = h.bits & 0x3ffu;
  if (exp == 0x1f) return detail::bits_float(sign | 0x7f800000u | (mant << 13));  // inf, NaN (payload kept)
  if (exp != 0) return detail::bits_float(sign | ((exp + 112u) << 23) | (mant << 13));
  if (mant == 0) return detail::bits_float(sign);  // signed zero
  // Subnormal m * 2^-24: normalise so the leading 1 becomes the implicit bit.
  std::uint32_t e = 113;  // exponent of 2^-14 (the subnormals' scale) in float's bias
  while ((mant & 0x400u) == 0) {
    mant <<= 1;
    --e;
  }
  return detail::bits_float(sign | (e << 23) | ((mant & 0x3ffu) << 13));
}

inline float to_float(float f) noexcept { return f; }
inline double to_float(double f) noexcept { return f; }

// Round to nearest even. A NaN stays a NaN (quiet, sign kept), infinities stay infinite.
inline bf16 to_bf16(float f) noexcept {
  const std::uint32_t u = detail::float_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return bf16{static_cast<std::uint16_t>((u >> 16) | 0x0040u)};
  // Rounding may carry into the exponent; the largest floats round to infinity, as they should.
  return bf16{static_cast<std::uint16_t>(detail::shift_right_rne(u, 16))};
}

// Round to nearest even. Values whose rounding exceeds 65504 become infinity (see
// weight_from_float for the checked conversion); a NaN stays a quiet NaN.
inline f16 to_f16(float f) noexcept {
  const std::uint32_t u = detail::float_bits(f);
  const auto sign = static_cast<std::uint16_t>((u >> 16) & 0x8000u);
  const std::uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return f16{static_cast<std::uint16_t>(sign | 0x7e00u | ((a >> 13) & 0x3ffu))};
  if (a >= 0x47800000u) return f16{static_cast<std::uint16_t>(sign | 0x7c00u)};  // >= 65536: inf
  const std::uint32_t exp = a >> 23;
  const std::uint32_t mant = (a & 0x7fffffu) | 0x800000u;  // with the implicit bit
  if (exp >= 113) {
    // Normal in f16: rebias the exponent, round the mantissa; a carry moves into the exponent
    // (up to 0x7c00, infinity, for values from 65520 on).
    const std::uint32_t h = ((exp - 112u) << 10) + detail::shift_right_rne(a & 0x7fffffu, 13);
    return f16{static_cast<std::uint16_t>(sign | h)};
  }
  if (exp < 102) return f16{sign};  // below 2^-25: rounds to zero (2^-25 itself ties to 0)
  // Subnormal in f16 (value m * 2^-24): m = mant * 2^(exp - 126) rounded; may round up to
  // 0x400, the smallest normal, which is the right bit pattern.
  return f16{static_cast<std::uint16_t>(sign | detail::shift_right_rne(mant, 126u - exp))};
}

inline bf16 bf16_from_bits(std::uint16_t b) noexcept { return bf16{b}; }
inline f16 f16_from_bits(std::uint16_t b) noexcept { return f16{b}; }

namespace detail {

template <class T>
constexpr bool is_half = std::is_same_v<T, bf16> || std::is_same_v<T, f16>;

template <class T>
constexpr const char* weight_type_name() noexcept {
  if constexpr (std::is_same_v<T, bf16>)
    return "bf16";
  else if constexpr (std::is_same_v<T, f16>)
    return "f16";
  else if constexpr (std::is_same_v<T, float>)
    return "f32";
  else
    return "f64";
}

// One weight value of a tensor in Weight's type, rounded to nearest even. Throws
// numeric_error naming the field, the index and the value when the value is not finite, or
// (f16) when it rounds past 65504.
template <class Weight>
Weight weight_from_float(double v, const char* field, std::ptrdiff_t row, std::ptrdiff_t col) {
  if (!std::isfinite(v))
    throw numeric_error(cat(field, ": expected finite values, got ", v, " at [", row, ", ", col, "]"));
  if constexpr (std::is_same_v<Weight, double>) {
    return v;
  } else {
    const auto f = static_cast<float>(v);
    if constexpr (std::is_same_v<Weight, float>) {
      if (!std::isfinite(f))
        throw numeric_error(cat(field, ": expected values within float's range, got ", v, " at [", row, ", ", col, "]"));
      return f;
    } else if constexpr (std::is_same_v<Weight, bf16>) {
      const bf16 h = to_bf16(f);
      if (!std::isfinite(f) || !std::isfinite(to_float(h)))
        throw numeric_error(cat(field, ": expected values within bf16's range, got ", v, " at [", row, ", ", col, "]"));
      return h;
    } else {
      static_assert(std::is_same_v<Weight, f16>, "weight types: float, double, bf16, f16");
      const f16 h = to_f16(f);
      if (!std::isfinite(to_float(h)))
        throw numeric_error(cat(field, ": expected values of magnitude <= 65504 after rounding to f16, got ", v,
                                " at [", row, ", ", col, "]"));
      return h;
    }
  }
}

// Throws numeric_error naming the field and index when a stored weight is not finite.
template <class Weight>
void require_finite_weight(Weight w, const char* field, std::ptrdiff_t row, std::ptrdiff_t col) {
  const double v = static_cast<double>(to_float(w));
  if (!std::isfinite(v))
    throw numeric_error(cat(field, ": expected finite values, got ", v, " at [", row, ", ", col, "]"));
}

}  // namespace detail
}  // namespace molora
