// Set adapters in safetensors files, memory-mapped where the file allows (docs/design-notes.md,
// "Adapter sets"). molora's set-adapter layout stores each tensor exactly as the set's kernels
// read it, so an F32 file (F64 for double) is used in place: no copy, pages shared by every
// process that maps the file, and the mapping lives as long as any set holds the adapter.
// Any other float dtype (F16, BF16, or F32 into a double set) is converted once, at load.
// load_set_adapter<float, bf16 | f16> keeps the experts in 16 bits instead: experts.A /
// experts.Bt stored in that dtype are used in place (mapped), others rounded to nearest even
// into a 16-bit copy, tensor by tensor; the set's kernel widens them as it loads them. The
// router stays float (a 16-bit router.weight is widened once).
//
// Layout, under an optional name prefix ("<prefix>." before each name, e.g. one file per
// tenant with one prefix per projection):
//   router.weight  [E, in]     absent for a plain LoRA (E = 1)
//   router.bias    [E]         optional
//   experts.A      [E*r, in]   every expert's lora_A stacked (expert e = rows e*r ..)
//   experts.Bt     [E*r, out]  every expert's lora_B transposed and stacked (B_e^T [r, out])
// and metadata "<prefix>.num_experts", ".top_k", ".rank", ".scaling" (alpha / r as trained),
// ".normalize_top_k" ("true"/"false"), ".selection" ("top_k"/"sampling").
#pragma once

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "../adapter_set.hpp"
#include "../errors.hpp"
#include "../half.hpp"
#include "loader.hpp"
#include "safetensors.hpp"

namespace molora {

namespace detail {

inline std::string set_key(const std::string& prefix, const char* name) {
  return prefix.empty() ? std::string(name) : prefix + "." + name;
}

// The tensors and metadata of one adapter in the set-adapter layout.
template <class Scalar>
void append_set_adapter(std::vector<io::TensorToWrite>& tensors, std::map<std::string, std::string>& meta,
                        const SetAdapter<Scalar>& a, const std::string& prefix, io::Dtype dtype) {
  const auto& v = a.views();
  const Index E = v.num_experts, r = v.rank, in = v.in_features, out = v.out_features;
  auto u = [](Index n) { return static_cast<std::uint64_t>(n); };
  if (v.router_weight)
    tensors.push_back(io::make_tensor<Scalar>(set_key(prefix, "router.weight"), {u(E), u(in)}, v.router_weight, dtype));
  if (v.router_bias) tensors.push_back(io::make_tensor<Scalar>(set_key(prefix, "router.bias"), {u(E)}, v.router_bias, dtype));
  RowMatrix<Scalar> A(E * r, in), Bt(E * r, out);  // stacked, whatever the adapter's own storage (widened exactly)
  auto rows = [&](RowMatrix<Scalar>& dst, Index e, const auto& src, Index cols) {
    const auto* p = src[static_cast<std::size_t>(e)];
    for (Index i = 0; i < r * cols; ++i) dst.data()[e * r * cols + i] = Scalar(to_float(p[i]));
  };
  for (Index e = 0; e < E; ++e) {
    if (!v.A_bf16.empty()) {
      rows(A, e, v.A_bf16, in);
      rows(Bt, e, v.Bt_bf16, out);
    } else if (!v.A_f16.empty()) {
      rows(A, e, v.A_f16, in);
      rows(Bt, e, v.Bt_f16, out);
    } else {
      rows(A, e, v.A, in);
      rows(Bt, e, v.Bt, out);
    }
  }
  tensors.push_back(io::make_tensor(set_key(prefix, "experts.A"), A, dtype));
  tensors.push_back(io::make_tensor(set_key(prefix, "experts.Bt"), Bt, dtype));
  meta[set_key(prefix, "num_experts")] = cat(E);
  meta[set_key(prefix, "top_k")] = cat(v.top_k);
  meta[set_key(prefix, "rank")] = cat(r);
  char s[40];
  std::snprintf(s, sizeof s, "%.17g", v.scaling);
  meta[set_key(prefix, "scaling")] = s;
  meta[set_key(prefix, "normalize_top_k")] = v.normalize_top_k ? "true" : "false";
  meta[set_key(prefix, "selection")] = to_string(v.selection);
}

// Keeps a loaded adapter's weights alive: the file's mapping (only while some tensor is used
// in place from it) and any converted copies.
template <class Scalar, class Weight = Scalar>
struct LoadedSetAdapter {
  std::optional<io::SafetensorsReader> file;
  std::vector<RowMatrix<Scalar>> copies;
  std::vector<std::vector<Weight>> half_copies;  // 16-bit experts rounded from another dtype
};

}  // namespace detail

// Writes adapters (prefix -> adapter; "" = no prefix) to one file in the set-adapter layout.
// dtype F32 (F64 for double) can be mapped back without a copy. Throws format_error on I/O.
template <class Scalar>
void save_set_adapters(const std::string& path, const std::map<std::string, const SetAdapter<Scalar>*>& adapters,
                       io::Dtype dtype = io::internal::dtype_of<Scalar>()) {
  std::vector<io::TensorToWrite> tensors;
  std::map<std::string, std::string> meta;
  meta["molora.format"] = "set_adapter";
  for (const auto& [prefix, a] : adapters) {
    if (!a) throw config_error(detail::mismatch(detail::cat("adapter '", prefix, "'"), "an adapter", "null"));
    detail::append_set_adapter(tensors, meta, *a, prefix, dtype);
  }
  io::save_safetensors(path, std::move(tensors), meta);
}

// The adapter stored under `prefix` in file, as a SetAdapter with the given scale. Tensors
// whose dtype is Scalar's and whose data is aligned are used in place (the adapter keeps the
// mapping alive); others are converted once. *mapped (if given) tells whether every tensor
// was used in place. Throws format_error naming the file and the tensor or key on anything
// missing or malformed; numeric_error (with check_values) on a non-finite weight.
// Weight = bf16 / f16 (float sets): the experts are kept in 16 bits (see the top of this
// header); an experts value past f16's range is a numeric_error naming the file and tensor.
template <class Scalar, class Weight = Scalar>
typename SetAdapter<Scalar>::Ptr load_set_adapter(const io::SafetensorsReader& file, const std::string& prefix = "",
                                                  double scale = 1, bool check_values = true, bool* mapped = nullptr) {
  static_assert(std::is_same_v<Weight, Scalar> || (std::is_same_v<Scalar, float> && detail::is_half<Weight>),
                "load_set_adapter: Weight is Scalar, or bf16 / f16 for a float set");
  constexpr bool kHalf = !std::is_same_v<Weight, Scalar>;
  using Owner = detail::LoadedSetAdapter<Scalar, Weight>;
  auto owner = std::make_shared<Owner>(Owner{file, {}, {}});
  const auto& meta = file.metadata();
  auto fail = [&](const std::string& what) -> void {
    throw format_error(detail::cat(file.source(), ": set adapter '", prefix, "': ", what));
  };
  auto get = [&](const char* key) {
    const auto it = meta.find(detail::set_key(prefix, key));
    if (it == meta.end()) fail(detail::mismatch(detail::cat("metadata ", detail::set_key(prefix, key)), "a value", "none"));
    return it->second;
  };
  auto get_index = [&](const char* key) {
    const std::string s = get(key);
    char* end = nullptr;
    const long long v = std::strtoll(s.c_str(), &end, 10);
    if (s.empty() || *end != '\0' || v < 1 || v > (1LL << 31))
      fail(detail::mismatch(detail::cat("metadata ", detail::set_key(prefix, key)), "an integer in [1, 2^31]", s));
    return static_cast<Index>(v);
  };
  SetAdapterViews<Scalar> v;
  v.num_experts = get_index("num_experts");
  v.top_k = get_index("top_k");
  v.rank = get_index("rank");
  {
    const std::string s = get("scaling");
    char* end = nullptr;
    v.scaling = std::strtod(s.c_str(), &end);
    if (s.empty() || *end != '\0') fail(detail::mismatch("metadata scaling", "a number", s));
    const std::string n = get("normalize_top_k");
    if (n != "true" && n != "false") fail(detail::mismatch("metadata normalize_top_k", "true or false", n));
    v.normalize_top_k = n == "true";
    const std::string sel = get("selection");
    if (sel != "top_k" && sel != "sampling") fail(detail::mismatch("metadata selection", "top_k or sampling", sel));
    v.selection = sel == "top_k" ? Selection::top_k : Selection::sampling;
  }
  const Index E = v.num_experts, r = v.rank;
  bool all_mapped = true, any_mapped = false;
  // Tensor `name` [rows, cols] (cols = 0: a 1-D tensor [rows]), in place or converted.
  auto tensor = [&](const char* name, Index rows, Index cols) -> const Scalar* {
    const std::string key = detail::set_key(prefix, name);
    if (cols > 0)
      file.expect_shape(key, rows, cols);
    else
      file.expect_shape(key, rows);
    if (file.info(key).dtype == io::internal::dtype_of<Scalar>()) {
      try {
        const Scalar* p = file.template view<Scalar>(key).data();
        any_mapped = true;
        return p;
      } catch (const format_error&) {  // misaligned: convert below
      }
    }
    all_mapped = false;
    owner->copies.push_back(file.template matrix<Scalar>(key));
    return owner->copies.back().data();
  };
  if (!file.has(detail::set_key(prefix, "experts.A"))) fail("no tensor experts.A");
  const Index in = file.info(detail::set_key(prefix, "experts.A")).shape.size() == 2
                       ? static_cast<Index>(file.info(detail::set_key(prefix, "experts.A")).shape[1])
                       : 0;
  const Index out = file.has(detail::set_key(prefix, "experts.Bt")) &&
                            file.info(detail::set_key(prefix, "experts.Bt")).shape.size() == 2
                        ? static_cast<Index>(file.info(detail::set_key(prefix, "experts.Bt")).shape[1])
                        : 0;
  if (in < 1 || out < 1) fail("experts.A and experts.Bt: expected 2-D tensors [E*r, in] and [E*r, out]");
  v.in_features = in;
  v.out_features = out;
  owner->copies.reserve(4);  // pointers into copies stay valid
  if constexpr (kHalf) {
    owner->half_copies.reserve(2);
    // A 16-bit experts tensor in place when stored in Weight's dtype (and aligned), else
    // rounded into a copy.
    auto tensor16 = [&](const char* name, Index rows, Index cols) -> const Weight* {
      const std::string key = detail::set_key(prefix, name);
      file.expect_shape(key, rows, cols);
      if (file.info(key).dtype == io::internal::half_dtype<Weight>()) {
        const void* p = file.bytes(key);
        if (reinterpret_cast<std::uintptr_t>(p) % alignof(Weight) == 0) {
          any_mapped = true;
          return static_cast<const Weight*>(p);
        }
      }
      all_mapped = false;
      owner->half_copies.push_back(io::internal::stored_weights<Weight>(file, key, prefix));
      return owner->half_copies.back().data();
    };
    const Weight* A = tensor16("experts.A", E * r, in);
    const Weight* Bt = tensor16("experts.Bt", E * r, out);
    for (Index e = 0; e < E; ++e) {
      if constexpr (std::is_same_v<Weight, bf16>) {
        v.A_bf16.push_back(A + e * r * in);
        v.Bt_bf16.push_back(Bt + e * r * out);
      } else {
        v.A_f16.push_back(A + e * r * in);
        v.Bt_f16.push_back(Bt + e * r * out);
      }
    }
  } else {
    const Scalar* A = tensor("experts.A", E * r, in);
    const Scalar* Bt = tensor("experts.Bt", E * r, out);
    for (Index e = 0; e < E; ++e) {
      v.A.push_back(A + e * r * in);
      v.Bt.push_back(Bt + e * r * out);
    }
  }
  if (file.has(detail::set_key(prefix, "router.weight"))) v.router_weight = tensor("router.weight", E, in);
  if (file.has(detail::set_key(prefix, "router.bias"))) v.router_bias = tensor("router.bias", E, 0);
  if (mapped) *mapped = all_mapped;
  if (!any_mapped) owner->file.reset();  // every tensor converted: the mapping's pages are not needed
  return SetAdapter<Scalar>::wrap(std::move(v), std::shared_ptr<const void>(owner, owner.get()), scale, check_values);
}

// A loader for AdapterStore (adapter_store.hpp): each call opens `path` (mapped) and loads
// the adapter under `prefix`, as load_set_adapter<Scalar, Weight> does; what it throws passes through the
// store's get().
template <class Scalar, class Weight = Scalar>
std::function<typename SetAdapter<Scalar>::Ptr()> set_adapter_loader(std::string path, std::string prefix = "",
                                                                     double scale = 1, bool check_values = true) {
  // Checked now, where the caller registers the adapter, not at its first load.
  if (path.empty()) throw config_error(detail::mismatch("set adapter loader path", "a file path", "\"\""));
  if (!std::isfinite(scale)) throw config_error(detail::mismatch("set adapter loader scale", "a finite value", scale));
  return [path = std::move(path), prefix = std::move(prefix), scale, check_values] {
    return load_set_adapter<Scalar, Weight>(io::SafetensorsReader(path), prefix, scale, check_values);
  };
}

}  // namespace molora
