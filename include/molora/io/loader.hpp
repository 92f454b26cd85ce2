// What the checkpoint formats' loaders share (peft.hpp, ming_moe.hpp, mixlora.hpp): the
// message of a failure (file, module, key), shape checks of a reader's tensors, reading a
// tensor that must be finite, the check that alpha gives a usable scaling, canonical index
// parsing, and turning a layer's refusal of a value from the file into a format_error.
#pragma once

#include <cmath>
#include <cstdint>
#include <filesystem>
#include <limits>
#include <string>
#include <utility>

#include "../detail/checks.hpp"
#include "../errors.hpp"
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

// Runs f(). A molora::error other than format_error (a layer refusing a value that came from
// the file) leaves as a format_error naming the file and the module.
template <class F>
auto building(const std::string& file, const std::string& module, F&& f) -> decltype(f()) {
  try {
    return f();
  } catch (const format_error&) {
    throw;
  } catch (const molora::error& e) {
    fail(file, module, e.what());
  }
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
