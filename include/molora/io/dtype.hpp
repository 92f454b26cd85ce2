// Element types of the tensors in checkpoint files: the safetensors dtypes molora knows
// (Dtype, its size and spelling), reading one stored element as float or double (load_as),
// and the exact conversions between float/double and IEEE binary16 / bfloat16 that the
// reader and the writer share. Everything here is a pure function of its arguments; the
// files' bytes are little-endian, and so must the host be (checked at compile time where the
// compiler says). The reader (safetensors_reader.hpp) and the writer (safetensors_writer.hpp)
// sit on top of it; docs/design-notes.md has the map of io/.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>
#include <utility>

#include "../types.hpp"

#if defined(__BYTE_ORDER__) && defined(__ORDER_LITTLE_ENDIAN__)
static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "molora::io assumes a little-endian host");
#endif

namespace molora::io {

// Element types of the safetensors format that molora knows. Only the four float types can
// be read into Eigen matrices; the others are validated and exposed as raw bytes.
enum class Dtype { F64, F32, F16, BF16, I64, I32, I16, I8, U8, BOOL };

inline const char* to_string(Dtype d) {
  switch (d) {
    case Dtype::F64: return "F64";
    case Dtype::F32: return "F32";
    case Dtype::F16: return "F16";
    case Dtype::BF16: return "BF16";
    case Dtype::I64: return "I64";
    case Dtype::I32: return "I32";
    case Dtype::I16: return "I16";
    case Dtype::I8: return "I8";
    case Dtype::U8: return "U8";
    case Dtype::BOOL: return "BOOL";
  }
  return "?";
}

// Bytes per element.
inline std::size_t dtype_size(Dtype d) {
  switch (d) {
    case Dtype::F64: case Dtype::I64: return 8;
    case Dtype::F32: case Dtype::I32: return 4;
    case Dtype::F16: case Dtype::BF16: case Dtype::I16: return 2;
    case Dtype::I8: case Dtype::U8: case Dtype::BOOL: return 1;
  }
  return 0;
}

inline bool is_float_dtype(Dtype d) {
  return d == Dtype::F64 || d == Dtype::F32 || d == Dtype::F16 || d == Dtype::BF16;
}

// Parses the header spelling ("F32", ...); false when unknown.
inline bool parse_dtype(const std::string& s, Dtype& out) {
  static const std::pair<const char*, Dtype> table[] = {
      {"F64", Dtype::F64}, {"F32", Dtype::F32}, {"F16", Dtype::F16}, {"BF16", Dtype::BF16},
      {"I64", Dtype::I64}, {"I32", Dtype::I32}, {"I16", Dtype::I16}, {"I8", Dtype::I8},
      {"U8", Dtype::U8},   {"BOOL", Dtype::BOOL}};
  for (const auto& [name, d] : table) {
    if (s == name) {
      out = d;
      return true;
    }
  }
  return false;
}

namespace internal {

// ==== f16 / bf16 <-> float / double: the io's only half-precision conversions ==============
// Bit-exact, round to nearest even, NaN kept as NaN. Kept together as one block so that a
// shared numeric header can take them over as a whole.

inline std::uint32_t float_bits(float f) {
  std::uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float bits_float(std::uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// IEEE binary16 -> float, exact (every half is a float). NaN payloads are kept.
inline float half_to_float(std::uint16_t h) {
  const std::uint32_t sign = static_cast<std::uint32_t>(h & 0x8000u) << 16;
  const std::uint32_t exp = (h >> 10) & 0x1fu;
  const std::uint32_t mant = h & 0x3ffu;
  if (exp == 0) {
    // zero or subnormal: mant * 2^-24, exact in float
    const float mag = std::ldexp(static_cast<float>(mant), -24);
    return sign ? -mag : mag;
  }
  if (exp == 31) return bits_float(sign | 0x7f800000u | (mant << 13));
  return bits_float(sign | ((exp + 112u) << 23) | (mant << 13));
}

// float -> IEEE binary16, round to nearest even; overflow gives inf, NaN stays (quiet) NaN.
inline std::uint16_t float_to_half(float f) {
  const std::uint32_t x = float_bits(f);
  const std::uint32_t sign = (x >> 16) & 0x8000u;
  const std::uint32_t ax = x & 0x7fffffffu;
  if (ax >= 0x7f800000u) {  // inf or NaN
    if (ax == 0x7f800000u) return static_cast<std::uint16_t>(sign | 0x7c00u);
    return static_cast<std::uint16_t>(sign | 0x7e00u | ((ax >> 13) & 0x3ffu));
  }
  if (ax >= 0x477ff000u) return static_cast<std::uint16_t>(sign | 0x7c00u);  // >= 65520 rounds to inf
  const std::uint32_t e = ax >> 23;
  if (e < 113) {
    // result is a half subnormal (or rounds up to the smallest normal): units of 2^-24
    if (e == 0) return static_cast<std::uint16_t>(sign);  // float subnormal << 2^-25
    const std::uint32_t m = (ax & 0x7fffffu) | 0x800000u;
    const std::uint32_t shift = 126u - e;  // >= 14
    if (shift > 24) return static_cast<std::uint16_t>(sign);
    std::uint32_t q = m >> shift;
    const std::uint32_t rem = m & ((1u << shift) - 1u);
    const std::uint32_t halfway = 1u << (shift - 1);
    if (rem > halfway || (rem == halfway && (q & 1u))) ++q;
    return static_cast<std::uint16_t>(sign | q);
  }
  std::uint32_t q = ((e - 112u) << 10) | ((ax >> 13) & 0x3ffu);
  const std::uint32_t rem = ax & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (q & 1u))) ++q;  // a carry moves into the exponent
  return static_cast<std::uint16_t>(sign | q);
}

inline float bf16_to_float(std::uint16_t b) { return bits_float(static_cast<std::uint32_t>(b) << 16); }

// float -> bfloat16, round to nearest even; NaN stays (quiet) NaN.
inline std::uint16_t float_to_bf16(float f) {
  const std::uint32_t x = float_bits(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return static_cast<std::uint16_t>((x >> 16) | 0x40u);
  const std::uint32_t rounded = x + 0x7fffu + ((x >> 16) & 1u);
  return static_cast<std::uint16_t>(rounded >> 16);
}

// double -> float rounding to odd (truncate, then set the last bit if inexact). Rounding that
// result to half or bfloat16 then equals rounding the double directly (no double rounding).
inline float double_to_float_odd(double d) {
  if (std::isnan(d)) return static_cast<float>(d);
  float f = static_cast<float>(d);
  if (static_cast<double>(f) == d) return f;
  if (std::fabs(static_cast<double>(f)) > std::fabs(d)) f = std::nextafter(f, 0.0f);
  return bits_float(float_bits(f) | 1u);
}

inline std::uint16_t double_to_half(double d) { return float_to_half(double_to_float_odd(d)); }
inline std::uint16_t double_to_bf16(double d) { return float_to_bf16(double_to_float_odd(d)); }

// ==== end of the f16 / bf16 conversions ====================================================

// out = a * b, unless the product wraps around 64 bits: then true, and out is left as it was.
inline bool mul_overflows(std::uint64_t a, std::uint64_t b, std::uint64_t& out) {
  if (a != 0 && b > std::numeric_limits<std::uint64_t>::max() / a) return true;
  out = a * b;
  return false;
}

// One stored element of a float dtype at `p` (any alignment) as Scalar.
template <class Scalar>
Scalar load_as(Dtype dtype, const std::uint8_t* p) {
  switch (dtype) {
    case Dtype::F32: {
      float v;
      std::memcpy(&v, p, 4);
      return static_cast<Scalar>(v);
    }
    case Dtype::F64: {
      double v;
      std::memcpy(&v, p, 8);
      return static_cast<Scalar>(v);
    }
    case Dtype::F16: {
      std::uint16_t v;
      std::memcpy(&v, p, 2);
      return static_cast<Scalar>(half_to_float(v));
    }
    case Dtype::BF16: {
      std::uint16_t v;
      std::memcpy(&v, p, 2);
      return static_cast<Scalar>(bf16_to_float(v));
    }
    default: return Scalar(0);  // callers check is_float_dtype first
  }
}

// The file dtype that holds Scalar exactly: F32 for float, F64 for double.
template <class Scalar>
constexpr Dtype dtype_of() {
  static_assert(molora::detail::is_supported_scalar<Scalar>, "Scalar must be float or double");
  return std::is_same_v<Scalar, float> ? Dtype::F32 : Dtype::F64;
}

}  // namespace internal
}  // namespace molora::io
