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

#include "../half.hpp"
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

// f16 / bf16 <-> float / double for the file dtypes, on molora/half.hpp's conversions (the
// same ones the 16-bit weights use): round to nearest even, NaN kept as NaN, bit for bit.
using molora::detail::bits_float;
using molora::detail::float_bits;

inline float half_to_float(std::uint16_t h) { return molora::to_float(molora::f16_from_bits(h)); }
inline std::uint16_t float_to_half(float f) { return molora::to_f16(f).bits; }
inline float bf16_to_float(std::uint16_t b) { return molora::to_float(molora::bf16_from_bits(b)); }
inline std::uint16_t float_to_bf16(float f) { return molora::to_bf16(f).bits; }
// A double goes through float rounded to odd, so it is rounded once (half.hpp).
inline std::uint16_t double_to_half(double d) { return float_to_half(molora::detail::double_to_float_odd(d)); }
inline std::uint16_t double_to_bf16(double d) { return float_to_bf16(molora::detail::double_to_float_odd(d)); }

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
