// Reading safetensors files. SafetensorsReader maps a checkpoint file (or reads it, or
// copies a byte buffer; mapped_file.hpp) and validates the whole header before any tensor is
// touched, so the loaders of each checkpoint format can trust every name, dtype, shape and
// byte range they get back. Float tensors convert to float or double (dtype.hpp).
//
// Layout (huggingface/safetensors): u64 little-endian N, N bytes of UTF-8 JSON, data.
// Deliberate difference from the reference reader: tensors may sit anywhere in the data
// section, in any order and with gaps; only overlapping or out-of-range byte ranges are
// rejected. (The reference insists on an exact in-order tiling; nothing we do relies on it,
// and files written by other tools with alignment padding then still load.)
//
// The header is parsed event by event into the tensor table (linear in its size, no JSON
// tree) under the bounds of io::Limits. A mapped file truncated by another process while a
// reader maps it raises SIGBUS on access, which no exception can report: open files from
// places the host does not control with Load::read, which copies them (up to
// Limits::max_read_bytes).
#pragma once

#include <Eigen/Core>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <map>
#include <memory>
#include <new>
#include <string>
#include <unordered_set>
#include <utility>
#include <vector>

#include "../errors.hpp"
#include "../types.hpp"
#include "dtype.hpp"
#include "input.hpp"
#include "mapped_file.hpp"

namespace molora::io {

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
      : source_(std::move(source_name)), limits_(limits), bytes_(std::make_shared<internal::OwnedBytes>(data, size)) {
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
    constexpr Dtype want = internal::dtype_of<Scalar>();
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
  std::shared_ptr<const internal::ByteSource> bytes_;
  std::uint64_t header_len_ = 0;
  std::map<std::string, TensorInfo> tensors_;
  std::map<std::string, std::string> metadata_;

  const std::uint8_t* data_section() const { return bytes_->data() + 8 + header_len_; }

  static std::shared_ptr<const internal::ByteSource> open(const std::string& path, Load load, const Limits& limits) {
    if (load == Load::read) return std::make_shared<internal::ReadFile>(path, limits.max_read_bytes);
    return std::make_shared<internal::MappedFile>(path);
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
    if (t.dtype == internal::dtype_of<Scalar>()) {
      if (t.numel) std::memcpy(out, p, static_cast<std::size_t>(t.numel) * sizeof(Scalar));
      return;
    }
    for (std::uint64_t i = 0; i < t.numel; ++i, p += step) out[i] = internal::load_as<Scalar>(t.dtype, p);
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
        if (!entry_.numel_overflow && internal::mul_overflows(t.numel, u, t.numel)) entry_.numel_overflow = true;
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
    if (internal::mul_overflows(t.numel, dtype_size(t.dtype), want))
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

}  // namespace molora::io
