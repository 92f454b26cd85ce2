// Writing safetensors files. make_tensor encodes float or double data (a pointer and a
// shape, an Eigen matrix, a vector) into a file dtype (F32, F64, F16 or BF16, the half
// types rounded to nearest even by dtype.hpp's conversions), make_tensor_raw takes bytes
// already encoded; save_safetensors writes them (sorted names, contiguous data, header padded
// to 8 bytes) atomically through a temporary file. The reader is safetensors_reader.hpp.
#pragma once

#include <Eigen/Core>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <map>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include <unistd.h>

#include "../errors.hpp"
#include "../types.hpp"
#include "dtype.hpp"

namespace molora::io {

// One tensor to write: its name, its dtype in the file, its shape and its bytes already
// encoded in that dtype (little-endian, row-major). Build one with make_tensor().
struct TensorToWrite {
  std::string name;
  Dtype dtype = Dtype::F32;
  std::vector<std::uint64_t> shape;
  std::vector<std::uint8_t> bytes;
};

namespace internal {

inline std::uint64_t checked_numel(const std::string& name, const std::vector<std::uint64_t>& shape) {
  std::uint64_t n = 1;
  for (auto d : shape)
    if (mul_overflows(n, d, n)) throw format_error(molora::detail::cat("tensor '", name, "': element count overflows"));
  return n;
}

// Encodes n values of float or double into `dtype` (F32, F64, F16 or BF16).
template <class Src>
std::vector<std::uint8_t> encode(const std::string& name, const Src* src, std::size_t n, Dtype dtype) {
  static_assert(molora::detail::is_supported_scalar<Src>, "source must be float or double");
  if (!is_float_dtype(dtype))
    throw format_error(molora::detail::mismatch(molora::detail::cat("tensor '", name, "': dtype"),
                                                "F32, F64, F16 or BF16 for float data", to_string(dtype)));
  std::vector<std::uint8_t> out(n * dtype_size(dtype));
  std::uint8_t* o = out.data();
  for (std::size_t i = 0; i < n; ++i) {
    switch (dtype) {
      case Dtype::F32: {
        const float v = static_cast<float>(src[i]);
        std::memcpy(o + 4 * i, &v, 4);
        break;
      }
      case Dtype::F64: {
        const double v = static_cast<double>(src[i]);
        std::memcpy(o + 8 * i, &v, 8);
        break;
      }
      case Dtype::F16: {
        const std::uint16_t v = std::is_same_v<Src, double> ? double_to_half(static_cast<double>(src[i]))
                                                            : float_to_half(static_cast<float>(src[i]));
        std::memcpy(o + 2 * i, &v, 2);
        break;
      }
      case Dtype::BF16: {
        const std::uint16_t v = std::is_same_v<Src, double> ? double_to_bf16(static_cast<double>(src[i]))
                                                            : float_to_bf16(static_cast<float>(src[i]));
        std::memcpy(o + 2 * i, &v, 2);
        break;
      }
      default: break;  // excluded above
    }
  }
  return out;
}

}  // namespace internal

// From `numel(shape)` row-major values at `data`, stored in the file as `dtype`
// (F32, F64, F16 or BF16; F16/BF16 round to nearest even).
template <class Src>
TensorToWrite make_tensor(std::string name, std::vector<std::uint64_t> shape, const Src* data, Dtype dtype) {
  const std::uint64_t n = internal::checked_numel(name, shape);
  TensorToWrite t{std::move(name), dtype, std::move(shape), {}};
  t.bytes = internal::encode(t.name, data, static_cast<std::size_t>(n), dtype);
  return t;
}

// From an Eigen matrix or expression of float or double: shape [rows, cols], row-major.
template <class Derived>
TensorToWrite make_tensor(std::string name, const Eigen::MatrixBase<Derived>& m,
                          Dtype dtype = internal::dtype_of<typename Derived::Scalar>()) {
  using Scalar = typename Derived::Scalar;
  const RowMatrix<Scalar> row = m;  // [rows, cols], contiguous row-major
  return make_tensor<Scalar>(std::move(name),
                             {static_cast<std::uint64_t>(row.rows()), static_cast<std::uint64_t>(row.cols())},
                             row.data(), dtype);
}

// From a column vector as a 1-D tensor [n].
template <class Scalar>
TensorToWrite make_tensor(std::string name, const Vector<Scalar>& v, Dtype dtype = internal::dtype_of<Scalar>()) {
  return make_tensor<Scalar>(std::move(name), {static_cast<std::uint64_t>(v.size())}, v.data(), dtype);
}

// From bytes already encoded in `dtype` (any dtype; e.g. BF16 bit patterns as uint16).
inline TensorToWrite make_tensor_raw(std::string name, Dtype dtype, std::vector<std::uint64_t> shape, const void* bytes) {
  const std::uint64_t n = internal::checked_numel(name, shape);
  std::uint64_t nbytes = 0;
  if (internal::mul_overflows(n, dtype_size(dtype), nbytes))
    throw format_error(molora::detail::cat("tensor '", name, "': byte count overflows"));
  TensorToWrite t{std::move(name), dtype, std::move(shape), {}};
  t.bytes.resize(static_cast<std::size_t>(nbytes));
  if (nbytes) std::memcpy(t.bytes.data(), bytes, static_cast<std::size_t>(nbytes));
  return t;
}

// Writes `tensors` (data in sorted name order, contiguous offsets) and `metadata` to `path`.
// The header is padded with spaces so the data starts at a multiple of 8 bytes. The file is
// written to a temporary file next to `path` and renamed over it, so a failure never leaves
// a partial file. Throws format_error (naming the path or tensor) on duplicate or reserved
// names, bytes that disagree with shape x dtype, invalid UTF-8 in names, or I/O failure.
inline void save_safetensors(const std::string& path, std::vector<TensorToWrite> tensors,
                             const std::map<std::string, std::string>& metadata = {}) {
  std::sort(tensors.begin(), tensors.end(), [](const TensorToWrite& a, const TensorToWrite& b) { return a.name < b.name; });
  nlohmann::json header = nlohmann::json::object();
  if (!metadata.empty()) {
    nlohmann::json md = nlohmann::json::object();
    for (const auto& [k, v] : metadata) md[k] = v;
    header["__metadata__"] = std::move(md);
  }
  std::uint64_t offset = 0;
  for (std::size_t i = 0; i < tensors.size(); ++i) {
    const TensorToWrite& t = tensors[i];
    if (t.name == "__metadata__") throw format_error(molora::detail::cat(path, ": tensor name '__metadata__' is reserved"));
    if (i > 0 && tensors[i - 1].name == t.name) throw format_error(molora::detail::cat(path, ": tensor '", t.name, "': duplicate name"));
    std::uint64_t want = 0;
    if (internal::mul_overflows(internal::checked_numel(t.name, t.shape), dtype_size(t.dtype), want) || want != t.bytes.size())
      throw format_error(molora::detail::cat(path, ": tensor '", t.name, "': ",
                             molora::detail::mismatch("byte count", want, t.bytes.size())));
    nlohmann::json e = nlohmann::json::object();
    e["dtype"] = to_string(t.dtype);
    e["shape"] = t.shape;
    e["data_offsets"] = {offset, offset + want};
    header[t.name] = std::move(e);
    offset += want;
  }
  std::string text;
  try {
    text = header.dump();
  } catch (const nlohmann::json::exception& e) {
    throw format_error(molora::detail::cat(path, ": cannot encode the header (names and metadata must be valid UTF-8): ", e.what()));
  }
  text.append((8 - text.size() % 8) % 8, ' ');
  std::uint8_t len[8];
  std::uint64_t n = text.size();
  for (int i = 0; i < 8; ++i) len[i] = static_cast<std::uint8_t>(n >> (8 * i));

  static std::atomic<std::uint64_t> counter{0};  // distinguishes temp files of one process
  const std::string tmp = molora::detail::cat(path, ".tmp.", ::getpid(), ".", ++counter);
  std::FILE* f = std::fopen(tmp.c_str(), "wb");
  if (!f) throw format_error(molora::detail::cat(path, ": cannot create ", tmp, ": ", std::strerror(errno)));
  bool ok = std::fwrite(len, 1, 8, f) == 8 && std::fwrite(text.data(), 1, text.size(), f) == text.size();
  for (const auto& t : tensors)
    if (ok && !t.bytes.empty()) ok = std::fwrite(t.bytes.data(), 1, t.bytes.size(), f) == t.bytes.size();
  ok = std::fflush(f) == 0 && ok;
  ok = ::fsync(::fileno(f)) == 0 && ok;
  const int err = errno;
  ok = std::fclose(f) == 0 && ok;
  if (!ok) {
    std::remove(tmp.c_str());
    throw format_error(molora::detail::cat(path, ": write failed: ", std::strerror(err)));
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    const int rerr = errno;
    std::remove(tmp.c_str());
    throw format_error(molora::detail::cat(path, ": cannot rename ", tmp, " into place: ", std::strerror(rerr)));
  }
}

}  // namespace molora::io
