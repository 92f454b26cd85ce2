// safetensors reading and writing. SafetensorsReader memory-maps a checkpoint file (or takes a
// byte buffer) and validates the whole header before any tensor is touched, so the loaders
// in checkpoint code can trust every name, dtype, shape and byte range they get back.
// save_safetensors writes the same format (sorted names, contiguous data, header padded
// to 8 bytes) atomically through a temporary file. F16/BF16 <-> float conversions live in
// molora::io::detail and round to nearest even.
//
// Layout (huggingface/safetensors): u64 little-endian N, N bytes of UTF-8 JSON, data.
// Deliberate difference from the reference reader: tensors may sit anywhere in the data
// section, in any order and with gaps; only overlapping or out-of-range byte ranges are
// rejected. (The reference insists on an exact in-order tiling; nothing we do relies on it,
// and files written by other tools with alignment padding then still load.)
//
// The header is parsed event by event into the tensor table (linear in its size, no JSON
// tree) under the bounds of io::Limits. The host must be little-endian (checked at compile
// time where the compiler says). A mapped file truncated by another process while a reader
// maps it raises SIGBUS on access, which no exception can report: open files from places the
// host does not control with Load::read, which copies them (up to Limits::max_read_bytes).
#pragma once

#include <Eigen/Core>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <map>
#include <memory>
#include <set>
#include <unordered_set>
#include <string>
#include <system_error>
#include <utility>
#include <vector>

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "../errors.hpp"
#include "../types.hpp"
#include "input.hpp"

#if defined(__BYTE_ORDER__) && defined(__ORDER_LITTLE_ENDIAN__)
static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "molora::io::safetensors assumes a little-endian host");
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

// What the header says about one tensor. begin/end are relative to the data section.
struct TensorInfo {
  Dtype dtype = Dtype::F32;
  std::vector<std::uint64_t> shape;
  std::uint64_t begin = 0;
  std::uint64_t end = 0;
  std::uint64_t numel = 1;  // product of shape (1 for a scalar)

  std::uint64_t nbytes() const { return end - begin; }
};

inline std::string shape_to_string(const std::vector<std::uint64_t>& shape) {
  std::string s = "[";
  for (std::size_t i = 0; i < shape.size(); ++i) {
    if (i) s += ", ";
    s += std::to_string(shape[i]);
  }
  return s + "]";
}

namespace detail {

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

// a * b and a + b without wrap-around; false on overflow.
inline bool mul_overflows(std::uint64_t a, std::uint64_t b, std::uint64_t& out) {
  if (a != 0 && b > std::numeric_limits<std::uint64_t>::max() / a) return true;
  out = a * b;
  return false;
}

// The bytes a reader looks at: an mmap of a file or an owned copy of a buffer.
class ByteSource {
public:
  virtual ~ByteSource() = default;
  const std::uint8_t* data() const { return data_; }
  std::size_t size() const { return size_; }

protected:
  const std::uint8_t* data_ = nullptr;
  std::size_t size_ = 0;
};

// The file mapped read-only (Load::map). See Load for the SIGBUS caveat.
class MappedFile final : public ByteSource {
public:
  explicit MappedFile(const std::string& path) {
    const RegularFile file(path);
    size_ = static_cast<std::size_t>(file.size());
    if (size_ > 0) {
      void* p = ::mmap(nullptr, size_, PROT_READ, MAP_PRIVATE, file.fd(), 0);
      if (p == MAP_FAILED) throw format_error(molora::detail::cat(path, ": cannot mmap: ", std::strerror(errno)));
      data_ = static_cast<const std::uint8_t*>(p);
    }
  }  // the mapping outlives the descriptor
  ~MappedFile() override {
    if (data_) ::munmap(const_cast<std::uint8_t*>(data_), size_);
  }
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;
};

// The file copied into memory (Load::read), at most `max_bytes` long.
class ReadFile final : public ByteSource {
public:
  ReadFile(const std::string& path, std::uint64_t max_bytes) {
    RegularFile(path).read_all(bytes_, max_bytes, "Limits::max_read_bytes");
    data_ = bytes_.data();
    size_ = bytes_.size();
  }

private:
  std::vector<std::uint8_t> bytes_;
};

class OwnedBytes final : public ByteSource {
public:
  OwnedBytes(const void* p, std::size_t n) : bytes_(n) {
    if (n) std::memcpy(bytes_.data(), p, n);  // vector storage is aligned for any scalar
    data_ = bytes_.data();
    size_ = n;
  }

private:
  std::vector<std::uint8_t> bytes_;
};

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

template <class Scalar>
constexpr Dtype dtype_of() {
  static_assert(molora::detail::is_supported_scalar<Scalar>, "Scalar must be float or double");
  return std::is_same_v<Scalar, float> ? Dtype::F32 : Dtype::F64;
}

}  // namespace detail

// Read access to one safetensors file. Construction validates everything (see the file
// comment); afterwards every accessor only checks what the caller asks for. Copies share
// the mapping, which lives until the last copy is gone; views returned by view() are valid
// as long as some copy lives.
class SafetensorsReader {
public:
  static constexpr int max_header_depth = 32;  // a real header nests 3 deep

  // Opens `path` (mapped, or read into memory with Load::read; see Load). Throws
  // format_error naming the file on any I/O or format problem, or a limit exceeded.
  explicit SafetensorsReader(const std::string& path, Load load = Load::map, const Limits& limits = {})
      : source_(path), limits_(limits), bytes_(open(path, load, limits)) {
    parse();
  }

  // Copies `size` bytes at `data` (the fuzzer's entry). `source_name` appears in messages.
  SafetensorsReader(const void* data, std::size_t size, std::string source_name = "<memory>", const Limits& limits = {})
      : source_(std::move(source_name)), limits_(limits), bytes_(std::make_shared<detail::OwnedBytes>(data, size)) {
    parse();
  }

  const std::string& source() const { return source_; }

  // Tensor names in sorted order (without "__metadata__").
  std::vector<std::string> names() const {
    std::vector<std::string> out;
    out.reserve(tensors_.size());
    for (const auto& kv : tensors_) out.push_back(kv.first);
    return out;
  }

  std::size_t size() const { return tensors_.size(); }
  bool has(const std::string& name) const { return tensors_.count(name) != 0; }
  const std::map<std::string, std::string>& metadata() const { return metadata_; }

  // Throws format_error naming the tensor when it is absent.
  const TensorInfo& info(const std::string& name) const {
    auto it = tensors_.find(name);
    if (it == tensors_.end()) fail(name, "no such tensor in the file");
    return it->second;
  }

  // First byte of the tensor (not necessarily aligned).
  const std::uint8_t* bytes(const std::string& name) const { return data_section() + info(name).begin; }

  // Throws format_error unless the tensor's shape is exactly [rows, cols].
  void expect_shape(const std::string& name, Index rows, Index cols) const {
    const TensorInfo& t = info(name);
    if (t.shape.size() != 2 || t.shape[0] != static_cast<std::uint64_t>(rows) ||
        t.shape[1] != static_cast<std::uint64_t>(cols))
      fail(name, molora::detail::mismatch("shape", molora::detail::shape_str(rows, cols), shape_to_string(t.shape)));
  }

  // Throws format_error unless the tensor's shape is exactly [n].
  void expect_shape(const std::string& name, Index n) const {
    const TensorInfo& t = info(name);
    if (t.shape.size() != 1 || t.shape[0] != static_cast<std::uint64_t>(n))
      fail(name, molora::detail::mismatch("shape", molora::detail::cat("[", n, "]"), shape_to_string(t.shape)));
  }

  // The tensor as a [rows, cols] matrix converted to Scalar. A 2-D tensor keeps its shape, a
  // 1-D tensor [n] becomes [1, n], a scalar [1, 1]. Requires a float dtype and rank <= 2.
  template <class Scalar>
  RowMatrix<Scalar> matrix(const std::string& name) const {
    static_assert(molora::detail::is_supported_scalar<Scalar>, "Scalar must be float or double");
    const TensorInfo& t = info(name);
    const auto [rows, cols] = matrix_dims(name, t);
    RowMatrix<Scalar> m(rows, cols);  // [rows, cols]
    convert(t, m.data());
    return m;
  }

  // A 1-D tensor [n] (or a [1, n] / [n, 1] matrix) as a column vector of Scalar.
  template <class Scalar>
  Vector<Scalar> vector(const std::string& name) const {
    static_assert(molora::detail::is_supported_scalar<Scalar>, "Scalar must be float or double");
    const TensorInfo& t = info(name);
    const bool ok = t.shape.size() == 1 || (t.shape.size() == 2 && (t.shape[0] == 1 || t.shape[1] == 1));
    if (!ok) fail(name, molora::detail::mismatch("shape", "[n], [1, n] or [n, 1]", shape_to_string(t.shape)));
    check_float(name, t);
    Vector<Scalar> v(to_index(name, t.numel));  // [n]
    convert(t, v.data());
    return v;
  }

  // Zero-copy view of a rank <= 2 tensor (shaped as matrix() would). Requires the file dtype
  // to be exactly Scalar's (F32 for float, F64 for double) and the data to be aligned for
  // Scalar; otherwise throws format_error saying which, and the caller can use matrix().
  template <class Scalar>
  Eigen::Map<const RowMatrix<Scalar>> view(const std::string& name) const {
    constexpr Dtype want = detail::dtype_of<Scalar>();
    const TensorInfo& t = info(name);
    if (t.dtype != want) fail(name, molora::detail::mismatch("dtype for a zero-copy view", to_string(want), to_string(t.dtype)));
    const auto [rows, cols] = matrix_dims(name, t);
    const std::uint8_t* p = data_section() + t.begin;
    if (reinterpret_cast<std::uintptr_t>(p) % alignof(Scalar) != 0)
      fail(name, molora::detail::cat("data is not ", alignof(Scalar), "-byte aligned for a zero-copy view (use matrix())"));
    return Eigen::Map<const RowMatrix<Scalar>>(reinterpret_cast<const Scalar*>(p), rows, cols);
  }

private:
  std::string source_;
  Limits limits_;
  std::shared_ptr<const detail::ByteSource> bytes_;
  std::uint64_t header_len_ = 0;
  std::map<std::string, TensorInfo> tensors_;
  std::map<std::string, std::string> metadata_;

  const std::uint8_t* data_section() const { return bytes_->data() + 8 + header_len_; }

  static std::shared_ptr<const detail::ByteSource> open(const std::string& path, Load load, const Limits& limits) {
    if (load == Load::read) return std::make_shared<detail::ReadFile>(path, limits.max_read_bytes);
    return std::make_shared<detail::MappedFile>(path);
  }

  [[noreturn]] void fail(const std::string& tensor, const std::string& what) const {
    throw format_error(molora::detail::cat(source_, ": tensor '", tensor, "': ", what));
  }
  [[noreturn]] void fail_file(const std::string& what) const {
    throw format_error(molora::detail::cat(source_, ": ", what));
  }

  Index to_index(const std::string& name, std::uint64_t v) const {
    if (v > static_cast<std::uint64_t>(std::numeric_limits<Index>::max()))
      fail(name, molora::detail::cat("dimension ", v, " does not fit an Eigen index"));
    return static_cast<Index>(v);
  }

  void check_float(const std::string& name, const TensorInfo& t) const {
    if (!is_float_dtype(t.dtype)) fail(name, molora::detail::mismatch("dtype", "F32, F64, F16 or BF16", to_string(t.dtype)));
  }

  std::pair<Index, Index> matrix_dims(const std::string& name, const TensorInfo& t) const {
    check_float(name, t);
    switch (t.shape.size()) {
      case 0: return {1, 1};
      case 1: return {1, to_index(name, t.shape[0])};
      case 2: return {to_index(name, t.shape[0]), to_index(name, t.shape[1])};
      default: fail(name, molora::detail::mismatch("rank", "at most 2", t.shape.size()));
    }
  }

  template <class Scalar>
  void convert(const TensorInfo& t, Scalar* out) const {
    const std::uint8_t* p = data_section() + t.begin;
    const std::size_t step = dtype_size(t.dtype);
    if (t.dtype == detail::dtype_of<Scalar>()) {
      if (t.numel) std::memcpy(out, p, static_cast<std::size_t>(t.numel) * sizeof(Scalar));
      return;
    }
    for (std::uint64_t i = 0; i < t.numel; ++i, p += step) out[i] = detail::load_as<Scalar>(t.dtype, p);
  }

  class HeaderHandler;

  // Reads the header length, then builds the tensor table straight from the JSON parser's
  // events (HeaderHandler): no JSON tree, one hash or map lookup per key, so the work is
  // linear in the header size. Then checks that no two byte ranges overlap.
  void parse();
};

// SAX handler for the header: a stack of what each open container is, one state machine for
// the entries. Every problem throws format_error at once, naming the tensor where there is one.
class SafetensorsReader::HeaderHandler {
public:
  using json = nlohmann::json;

  HeaderHandler(SafetensorsReader& r, std::uint64_t data_size) : r_(r), data_size_(data_size) {}

  bool null() { return value("null"); }
  bool boolean(bool) { return value("boolean"); }
  bool number_integer(json::number_integer_t v) { return value("number", nullptr, std::to_string(v)); }
  bool number_unsigned(json::number_unsigned_t v) { return value("number", nullptr, std::to_string(v), true, v); }
  bool number_float(json::number_float_t, const std::string& s) { return value("number", nullptr, s); }
  bool string(std::string& s) { return value("string", &s, "\"" + s.substr(0, 40) + "\""); }
  bool binary(json::binary_t&) { return value("binary"); }

  bool start_object(std::size_t) {
    if (stack_.empty()) return push(Ctx::root);
    switch (stack_.back()) {
      case Ctx::root:
        if (name_ == "__metadata__") return push(Ctx::metadata);
        entry_ = Entry{};
        if (!entry_keys_.empty()) entry_keys_ = {};
        return push(Ctx::entry);
      case Ctx::entry:
        if (field_ == Field::other) {
          skip_keys_.emplace_back();
          return push(Ctx::skip_object);
        }
        return value("object");
      case Ctx::skip_object:
      case Ctx::skip_array: skip_keys_.emplace_back(); return push(Ctx::skip_object);
      default: return value("object");
    }
  }

  bool start_array(std::size_t) {
    if (stack_.empty()) r_.fail_file(molora::detail::mismatch("header", "a JSON object", "array"));
    switch (stack_.back()) {
      case Ctx::entry:
        if (field_ == Field::shape) return push(Ctx::shape);
        if (field_ == Field::offsets) return push(Ctx::offsets);
        if (field_ == Field::other) return push(Ctx::skip_array);
        return value("array");
      case Ctx::skip_object:
      case Ctx::skip_array: return push(Ctx::skip_array);
      default: return value("array");
    }
  }

  bool key(std::string& k) {
    switch (stack_.back()) {
      case Ctx::root: {
        if (k.size() > r_.limits_.max_name_bytes)
          r_.fail_file(molora::detail::cat("tensor name '", k.substr(0, 40), "...': length: expected at most ",
                                           r_.limits_.max_name_bytes, " bytes (Limits::max_name_bytes), got ", k.size()));
        const bool dup = k == "__metadata__" ? seen_metadata_
                                             : !r_.tensors_.empty() && !(r_.tensors_.rbegin()->first < k) &&
                                                   r_.tensors_.count(k) != 0;  // sorted input never looks up
        if (dup) r_.fail(k, "duplicate tensor name in the header");
        if (k == "__metadata__") {
          seen_metadata_ = true;
        } else if (r_.tensors_.size() >= r_.limits_.max_tensors) {
          r_.fail_file(molora::detail::cat("number of tensors: expected at most ", r_.limits_.max_tensors,
                                           " (Limits::max_tensors), got more"));
        }
        name_ = k;
        return true;
      }
      case Ctx::entry: {
        unsigned bit = 0;
        field_ = Field::other;
        if (k == "dtype") field_ = Field::dtype, bit = 1;
        if (k == "shape") field_ = Field::shape, bit = 2;
        if (k == "data_offsets") field_ = Field::offsets, bit = 4;
        const bool dup = bit ? (entry_.seen & bit) != 0 : !entry_keys_.insert(k).second;
        if (dup) r_.fail(name_, molora::detail::cat("duplicate key '", k, "' inside its header entry"));
        entry_.seen |= bit;
        return true;
      }
      case Ctx::metadata:
        if (k.size() > r_.limits_.max_name_bytes || r_.metadata_.size() >= r_.limits_.max_tensors)
          r_.fail_file(molora::detail::cat("__metadata__: expected at most ", r_.limits_.max_tensors,
                                           " entries (Limits::max_tensors) with keys of at most ", r_.limits_.max_name_bytes,
                                           " bytes (Limits::max_name_bytes), got ", r_.metadata_.size() + 1,
                                           " entries, this key ", k.size(), " bytes"));
        if (r_.metadata_.count(k)) r_.fail_file(molora::detail::cat("__metadata__: duplicate key '", k, "'"));
        meta_key_ = k;
        return true;
      default:  // skip_object
        if (!skip_keys_.back().insert(k).second)
          r_.fail(name_, molora::detail::cat("duplicate key '", k, "' inside its header entry"));
        return true;
    }
  }

  bool end_object() {
    const Ctx c = pop();
    if (c == Ctx::entry) finish_entry();
    if (c == Ctx::skip_object) skip_keys_.pop_back();
    return true;
  }

  bool end_array() {
    if (pop() == Ctx::offsets && entry_.n_offsets != 2) bad_offsets(molora::detail::cat(entry_.n_offsets, " entries"));
    return true;
  }

  bool parse_error(std::size_t, const std::string&, const nlohmann::detail::exception& e) {
    r_.fail_file(molora::detail::cat("header is not valid JSON: ", e.what()));
  }

private:
  enum class Ctx { root, entry, metadata, shape, offsets, skip_object, skip_array };
  enum class Field { dtype, shape, offsets, other };
  struct Entry {
    unsigned seen = 0;  // bits: dtype, shape, data_offsets
    TensorInfo info;
    bool numel_overflow = false;
    int n_offsets = 0;
  };

  SafetensorsReader& r_;
  std::uint64_t data_size_;
  std::vector<Ctx> stack_;
  std::string name_, meta_key_;
  bool seen_metadata_ = false;
  Field field_ = Field::other;
  Entry entry_;
  std::unordered_set<std::string> entry_keys_;                // keys other than the three
  std::vector<std::unordered_set<std::string>> skip_keys_;  // keys of each ignored object

  bool push(Ctx c) {
    if (stack_.size() >= static_cast<std::size_t>(max_header_depth))
      r_.fail_file(molora::detail::mismatch("header nesting depth", molora::detail::cat("at most ", max_header_depth), "more"));
    stack_.push_back(c);
    return true;
  }
  Ctx pop() {
    const Ctx c = stack_.back();
    stack_.pop_back();
    return c;
  }

  [[noreturn]] void bad_offsets(const std::string& got) const {
    r_.fail(name_, molora::detail::mismatch("data_offsets", "[begin, end] of two non-negative integers", got));
  }

  // A scalar (or, via start_*, a container where the format wants something else). `type` is
  // nlohmann's type name, `repr` the value for messages.
  bool value(const char* type, const std::string* str = nullptr, const std::string& repr = "", bool is_unsigned = false,
             std::uint64_t u = 0) {
    const std::string& shown = repr.empty() ? std::string(type) : repr;
    if (stack_.empty()) r_.fail_file(molora::detail::mismatch("header", "a JSON object", type));
    switch (stack_.back()) {
      case Ctx::root:
        if (name_ == "__metadata__") r_.fail_file(molora::detail::mismatch("__metadata__", "an object of string to string", type));
        r_.fail(name_, molora::detail::mismatch("entry", "an object with dtype, shape, data_offsets", type));
      case Ctx::entry:
        switch (field_) {
          case Field::dtype:
            if (!str) r_.fail(name_, molora::detail::mismatch("dtype", "a string", type));
            if (!parse_dtype(*str, entry_.info.dtype))
              r_.fail(name_, molora::detail::mismatch("dtype", "one of F64, F32, F16, BF16, I64, I32, I16, I8, U8, BOOL",
                                                      molora::detail::cat("'", str->substr(0, 40), "'")));
            return true;
          case Field::shape: r_.fail(name_, molora::detail::mismatch("shape", "an array of non-negative integers", type));
          case Field::offsets: bad_offsets(type);
          case Field::other: return true;  // unknown keys are ignored; the reference defines none
        }
        return true;
      case Ctx::metadata:
        if (!str) r_.fail_file(molora::detail::mismatch(molora::detail::cat("__metadata__ entry '", meta_key_, "'"), "a string", type));
        r_.metadata_.emplace(meta_key_, *str);
        return true;
      case Ctx::shape: {
        if (!is_unsigned) r_.fail(name_, molora::detail::mismatch("shape entry", "a non-negative integer", shown));
        TensorInfo& t = entry_.info;
        if (t.shape.size() >= r_.limits_.max_rank)
          r_.fail(name_, molora::detail::mismatch("rank", molora::detail::cat("at most ", r_.limits_.max_rank, " (Limits::max_rank)"), "more"));
        t.shape.push_back(u);
        if (!entry_.numel_overflow && detail::mul_overflows(t.numel, u, t.numel)) entry_.numel_overflow = true;
        return true;
      }
      case Ctx::offsets:
        if (!is_unsigned) bad_offsets(shown);
        if (entry_.n_offsets >= 2) bad_offsets("more than two entries");
        (entry_.n_offsets == 0 ? entry_.info.begin : entry_.info.end) = u;
        ++entry_.n_offsets;
        return true;
      default: return true;  // inside an ignored value
    }
  }

  void finish_entry() {
    TensorInfo& t = entry_.info;
    if (!(entry_.seen & 1)) r_.fail(name_, "missing field 'dtype'");
    if (!(entry_.seen & 2)) r_.fail(name_, "missing field 'shape'");
    if (!(entry_.seen & 4)) r_.fail(name_, "missing field 'data_offsets'");
    // A zero anywhere makes the product 0 even if a partial product overflowed.
    if (entry_.numel_overflow && std::find(t.shape.begin(), t.shape.end(), 0u) != t.shape.end()) {
      entry_.numel_overflow = false;
      t.numel = 0;
    }
    if (entry_.numel_overflow)
      r_.fail(name_, molora::detail::cat("shape ", shape_to_string(t.shape), ": element count overflows 64 bits"));
    if (t.begin > t.end)
      r_.fail(name_, molora::detail::cat("data_offsets: expected begin <= end, got [", t.begin, ", ", t.end, "]"));
    if (t.end > data_size_)
      r_.fail(name_, molora::detail::mismatch("data_offsets end", molora::detail::cat("at most the data size ", data_size_), t.end));
    std::uint64_t want = 0;
    if (detail::mul_overflows(t.numel, dtype_size(t.dtype), want))
      r_.fail(name_, molora::detail::cat("shape ", shape_to_string(t.shape), " x ", to_string(t.dtype),
                                         ": byte count overflows 64 bits"));
    if (want != t.nbytes())
      r_.fail(name_, molora::detail::mismatch(
                         molora::detail::cat("byte range for shape ", shape_to_string(t.shape), " x ", to_string(t.dtype)),
                         molora::detail::cat(want, " bytes"), molora::detail::cat(t.nbytes(), " bytes")));
    r_.tensors_.emplace_hint(r_.tensors_.end(), name_, std::move(t));
  }
};

inline void SafetensorsReader::parse() {
  const std::size_t size = bytes_->size();
  if (size < 8) fail_file(molora::detail::mismatch("file size", "at least 8 bytes", size));
  const std::uint8_t* p = bytes_->data();
  std::uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | p[i];
  if (n > limits_.max_header_bytes)
    fail_file(molora::detail::mismatch("header length", molora::detail::cat("at most ", limits_.max_header_bytes, " bytes (Limits::max_header_bytes)"), n));
  if (n > size - 8)
    fail_file(molora::detail::mismatch("header length", molora::detail::cat("at most ", size - 8, " (file size - 8)"), n));
  header_len_ = n;
  const char* h = reinterpret_cast<const char*>(p + 8);
  HeaderHandler handler(*this, size - 8 - n);
  try {
    nlohmann::json::sax_parse(h, h + n, &handler);
  } catch (const std::bad_alloc&) {
    fail_file("header: out of memory while parsing");
  }

  // Non-overlap: sort non-empty ranges by begin and compare neighbours.
  std::vector<std::pair<const std::string*, const TensorInfo*>> order;
  for (const auto& kv : tensors_)
    if (kv.second.nbytes() > 0) order.emplace_back(&kv.first, &kv.second);
  std::sort(order.begin(), order.end(), [](const auto& a, const auto& b) { return a.second->begin < b.second->begin; });
  for (std::size_t i = 1; i < order.size(); ++i) {
    const TensorInfo& prev = *order[i - 1].second;
    const TensorInfo& cur = *order[i].second;
    if (cur.begin < prev.end)
      fail(*order[i].first, molora::detail::cat("data_offsets [", cur.begin, ", ", cur.end, "] overlap tensor '",
                                                *order[i - 1].first, "' at [", prev.begin, ", ", prev.end, "]"));
  }
}

// ---- writing --------------------------------------------------------------------------------

// One tensor to write: its name, its dtype in the file, its shape and its bytes already
// encoded in that dtype (little-endian, row-major). Build one with make_tensor().
struct TensorToWrite {
  std::string name;
  Dtype dtype = Dtype::F32;
  std::vector<std::uint64_t> shape;
  std::vector<std::uint8_t> bytes;
};

namespace detail {

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

}  // namespace detail

// From `numel(shape)` row-major values at `data`, stored in the file as `dtype`
// (F32, F64, F16 or BF16; F16/BF16 round to nearest even).
template <class Src>
TensorToWrite make_tensor(std::string name, std::vector<std::uint64_t> shape, const Src* data, Dtype dtype) {
  const std::uint64_t n = detail::checked_numel(name, shape);
  TensorToWrite t{std::move(name), dtype, std::move(shape), {}};
  t.bytes = detail::encode(t.name, data, static_cast<std::size_t>(n), dtype);
  return t;
}

// From an Eigen matrix or expression of float or double: shape [rows, cols], row-major.
template <class Derived>
TensorToWrite make_tensor(std::string name, const Eigen::MatrixBase<Derived>& m,
                          Dtype dtype = detail::dtype_of<typename Derived::Scalar>()) {
  using Scalar = typename Derived::Scalar;
  const RowMatrix<Scalar> row = m;  // [rows, cols], contiguous row-major
  return make_tensor<Scalar>(std::move(name),
                             {static_cast<std::uint64_t>(row.rows()), static_cast<std::uint64_t>(row.cols())},
                             row.data(), dtype);
}

// From a column vector as a 1-D tensor [n].
template <class Scalar>
TensorToWrite make_tensor(std::string name, const Vector<Scalar>& v, Dtype dtype = detail::dtype_of<Scalar>()) {
  return make_tensor<Scalar>(std::move(name), {static_cast<std::uint64_t>(v.size())}, v.data(), dtype);
}

// From bytes already encoded in `dtype` (any dtype; e.g. BF16 bit patterns as uint16).
inline TensorToWrite make_tensor_raw(std::string name, Dtype dtype, std::vector<std::uint64_t> shape, const void* bytes) {
  const std::uint64_t n = detail::checked_numel(name, shape);
  std::uint64_t nbytes = 0;
  if (detail::mul_overflows(n, dtype_size(dtype), nbytes))
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
    if (detail::mul_overflows(detail::checked_numel(t.name, t.shape), dtype_size(t.dtype), want) || want != t.bytes.size())
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
