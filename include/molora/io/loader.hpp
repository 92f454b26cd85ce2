// What the checkpoint formats' loaders share (peft.hpp, ming_moe.hpp, mixlora.hpp): the
// message of a failure (file, module, key), shape checks of a reader's tensors, reading a
// tensor that must be finite, the check that alpha gives a usable scaling, canonical index
// parsing, and turning a layer's refusal of a value from the file into a format_error; and
// reading a weight tensor into a 16-bit adapter's storage as the file says (stored_weights).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <limits>
#include <string>
#include <utility>
#include <vector>

#include "../detail/checks.hpp"
#include "../errors.hpp"
#include "../half.hpp"
#include "../numeric.hpp"
#include "../types.hpp"
#include "safetensors_reader.hpp"

namespace molora::io {

namespace internal {

// Keeps a parameter out of template deduction (std::type_identity before C++20).
template <class T>
struct identity {
  using type = T;
};

inline bool starts_with(const std::string& s, const std::string& p) { return s.compare(0, p.size(), p) == 0; }
inline bool ends_with(const std::string& s, const std::string& p) {
  return s.size() >= p.size() && s.compare(s.size() - p.size(), p.size(), p) == 0;
}

[[noreturn]] inline void fail(const std::string& file, const std::string& module, const std::string& what) {
  throw format_error(molora::detail::cat(file, ": module '", module, "': ", what));
}

// Shape of a tensor as [rows, cols]; format_error unless it is 2-D with both dimensions in
// [1, max Index] (every loaded weight has in, out, r, E >= 1). Dims print as in the file.
inline std::pair<Index, Index> dims2(const SafetensorsReader& r, const std::string& key, const std::string& module) {
  const auto& s = r.info(key).shape;
  if (s.size() != 2)
    fail(r.source(), module, molora::detail::mismatch("tensor '" + key + "' rank", 2, s.size()));
  for (const std::uint64_t d : s)
    if (d == 0 || d > static_cast<std::uint64_t>(std::numeric_limits<Index>::max()))
      fail(r.source(), module,
           molora::detail::mismatch("tensor '" + key + "' shape",
                                    molora::detail::cat("dimensions in [1, ", std::numeric_limits<Index>::max(), "]"),
                                    shape_to_string(s)));
  return {static_cast<Index>(s[0]), static_cast<Index>(s[1])};
}

inline void expect2(const SafetensorsReader& r, const std::string& key, const std::string& module, Index rows,
                    Index cols) {
  const auto d = dims2(r, key, module);
  if (d.first != rows || d.second != cols)
    fail(r.source(), module,
         molora::detail::mismatch("tensor '" + key + "' shape", molora::detail::shape_str(rows, cols),
                                  molora::detail::shape_str(d.first, d.second)));
}

// Reads a float tensor and rejects non-finite entries with the core's check (detail/checks.hpp),
// its message naming the file, the module and the key.
template <class Scalar>
RowMatrix<Scalar> finite_matrix(const SafetensorsReader& r, const std::string& key, const std::string& module) {
  RowMatrix<Scalar> m = r.matrix<Scalar>(key);
  const auto at = molora::detail::first_non_finite(m);
  if (at.first >= 0) fail(r.source(), module, molora::detail::non_finite_message(m, at, "tensor '" + key + "'"));
  return m;
}

// A value of the file that its tensor's storage type cannot hold (f16 overflow after
// rounding), already named by file, module and key: building() lets it through.
class stored_value_error : public numeric_error {
public:
  using numeric_error::numeric_error;
};

// Runs f(). A molora::error other than format_error or stored_value_error (a layer refusing
// a value that came from the file) leaves as a format_error naming the file and the module.
template <class F>
auto building(const std::string& file, const std::string& module, F&& f) -> decltype(f()) {
  try {
    return f();
  } catch (const format_error&) {
    throw;
  } catch (const stored_value_error&) {
    throw;
  } catch (const molora::error& e) {
    fail(file, module, e.what());
  }
}

// The dtype that stores Weight (bf16 / f16).
template <class Weight>
constexpr Dtype half_dtype() {
  static_assert(molora::detail::is_half<Weight>, "bf16 or f16");
  return std::is_same_v<Weight, bf16> ? Dtype::BF16 : Dtype::F16;
}

// A 2-D weight tensor as Weight (bf16 / f16) values, row-major, as the file says: stored in
// Weight's dtype, its values are copied as they are; stored in another float dtype, each is
// read and rounded to nearest even. A non-finite value is a format_error (as finite_matrix);
// one past f16's range after rounding a stored_value_error (a numeric_error) naming the file,
// the module, the key, the index and the value.
template <class Weight>
std::vector<Weight> stored_weights(const SafetensorsReader& r, const std::string& key, const std::string& module) {
  const TensorInfo& t = r.info(key);
  const auto [rows, cols] = dims2(r, key, module);
  std::vector<Weight> v(static_cast<std::size_t>(rows * cols));
  if (t.dtype == half_dtype<Weight>()) {
    std::memcpy(v.data(), r.bytes(key), v.size() * sizeof(Weight));  // little-endian, as x86-64 and ARM64
    for (Index i = 0; i < rows; ++i)
      for (Index j = 0; j < cols; ++j)
        if (!std::isfinite(to_float(v[static_cast<std::size_t>(i * cols + j)])))
          fail(r.source(), module,
               molora::detail::cat("tensor '", key, "': expected finite values, got ",
                                   to_float(v[static_cast<std::size_t>(i * cols + j)]), " at [", i, ", ", j, "]"));
    return v;
  }
  const RowMatrix<double> m = finite_matrix<double>(r, key, module);
  const std::string field = molora::detail::cat(r.source(), ": module '", module, "': tensor '", key, "' into ",
                                                molora::detail::weight_type_name<Weight>());
  for (Index i = 0; i < rows; ++i)
    for (Index j = 0; j < cols; ++j) {
      try {
        v[static_cast<std::size_t>(i * cols + j)] = molora::detail::weight_from_float<Weight>(m(i, j), field.c_str(), i, j);
      } catch (const numeric_error& e) {
        throw stored_value_error(e.what());
      }
    }
  return v;
}

// The LoRA scaling alpha / r (alpha / sqrt(r) with rsLoRA) must be a finite, normal value of
// Scalar: 1e300 would turn every output into inf or NaN. `file` is where alpha came from.
template <class Scalar>
void check_scaling(const std::string& file, const std::string& module, double alpha, Index rank, bool rslora) {
  const double s = lora_scaling(alpha, rank, rslora);
  const double hi = static_cast<double>(std::numeric_limits<Scalar>::max());
  const double lo = static_cast<double>(std::numeric_limits<Scalar>::min());
  if (!(std::isfinite(s) && s <= hi && s >= lo))
    fail(file, module,
         molora::detail::cat("lora_alpha = ", alpha, " with r = ", rank, rslora ? " (rsLoRA)" : "", ": scaling expected a finite ",
                             "normal ", sizeof(Scalar) == 4 ? "float" : "double", " in [", lo, ", ", hi, "], got ", s));
}

// Parses s[b, e) as a canonical decimal index (digits only, no leading zero, at most 18 digits).
inline bool parse_index(const std::string& s, std::size_t b, std::size_t e, Index& out) {
  if (b >= e || e - b > 18 || (s[b] == '0' && e - b > 1)) return false;
  Index v = 0;
  for (std::size_t i = b; i < e; ++i) {
    if (s[i] < '0' || s[i] > '9') return false;
    v = v * 10 + (s[i] - '0');
  }
  out = v;
  return true;
}

inline std::string path_join(const std::string& dir, const std::string& file) {
  return (std::filesystem::path(dir) / file).string();
}

}  // namespace internal

}  // namespace molora::io
