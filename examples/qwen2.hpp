// A Qwen2 decoder (the architecture transformers runs for Qwen1.5, MING-MOE's base) in plain
// Eigen on molora's layers: molora::Linear for the attention projections and the LM head,
// MoLoRALinear on every MLP gate/up/down projection once an adapter is attached. It reads a
// Hugging Face folder (config.json + model.safetensors, or a sharded
// model.safetensors.index.json) and optionally a MING-MOE adapter folder (config.json +
// non_lora_trainables.safetensors). Projection weights are kept as stored, tensor by tensor:
// F32 as float and BF16 as bf16, wrapped in the memory-mapped file without a copy (the model
// keeps the file mapped); LoadOptions::widen widens everything to float instead. Norm
// weights, biases and the embedding table are widened to float once. Prefill and decode go
// through one routine that takes a ragged batch: each sequence has its own KV cache, and the
// projections run over the batch's current tokens at once. The numbers follow transformers'
// Qwen2ForCausalLM in float32 (RMSNorm, rotate-half rotary embedding, grouped-query causal
// attention, SwiGLU MLP); examples/qwen2_molora.cpp is the command line around it.
#pragma once

#include <algorithm>
#include <array>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iomanip>
#include <iostream>
#include <limits>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <sstream>
#include <stdexcept>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#ifdef MOLORA_USE_OPENMP
#include <omp.h>
#endif

#include <molora/io/checkpoint.hpp>
#include <molora/io/safetensors.hpp>
#include <molora/molora.hpp>

namespace qwen2 {

using molora::Index;
using Matrix = molora::RowMatrix<float>;
using Vec = molora::Vector<float>;

// ---- config -------------------------------------------------------------------------------

// The fields of a Qwen2 config.json the decoder uses. from_file rejects what it cannot honour
// (rope scaling, sliding-window attention, an activation other than SiLU, an inconsistent
// head_dim) with a format_error naming the file and the field.
struct Config {
  Index vocab_size = 0;
  Index hidden_size = 0;
  Index intermediate_size = 0;
  Index num_hidden_layers = 0;
  Index num_attention_heads = 0;
  Index num_key_value_heads = 0;
  Index head_dim = 0;
  double rms_norm_eps = 1e-6;
  double rope_theta = 10000.0;
  bool tie_word_embeddings = false;

  static Config from_file(const std::string& path) {
    const nlohmann::json j = read_json(path);
    auto fail = [&](const std::string& field, const std::string& expected, const nlohmann::json& got) -> void {
      throw molora::format_error(
          molora::detail::cat(path, ": field '", field, "': expected ", expected, ", got ", got.dump()));
    };
    auto present = [&](const char* field) { return j.contains(field) && !j.at(field).is_null(); };
    auto integer = [&](const char* field, std::int64_t min) -> Index {
      if (!present(field)) fail(field, "an integer", nlohmann::json("missing"));
      const auto& v = j.at(field);
      if (!v.is_number_integer() || v.get<std::int64_t>() < min)
        fail(field, molora::detail::cat("an integer >= ", min), v);
      return static_cast<Index>(v.get<std::int64_t>());
    };
    auto number = [&](const char* field, const nlohmann::json& obj, const std::string& name, double fallback) {
      if (!obj.contains(field) || obj.at(field).is_null()) return fallback;
      const auto& v = obj.at(field);
      if (!v.is_number() || !(v.get<double>() > 0) || !std::isfinite(v.get<double>()))
        fail(name, "a finite number > 0", v);
      return v.get<double>();
    };

    Config c;
    c.vocab_size = integer("vocab_size", 1);
    c.hidden_size = integer("hidden_size", 1);
    c.intermediate_size = integer("intermediate_size", 1);
    c.num_hidden_layers = integer("num_hidden_layers", 1);
    c.num_attention_heads = integer("num_attention_heads", 1);
    c.num_key_value_heads = present("num_key_value_heads") ? integer("num_key_value_heads", 1) : c.num_attention_heads;
    c.rms_norm_eps = number("rms_norm_eps", j, "rms_norm_eps", 1e-6);
    c.rope_theta = number("rope_theta", j, "rope_theta", 10000.0);
    if (present("tie_word_embeddings")) {
      if (!j.at("tie_word_embeddings").is_boolean())
        fail("tie_word_embeddings", "true or false", j.at("tie_word_embeddings"));
      c.tie_word_embeddings = j.at("tie_word_embeddings").get<bool>();
    }
    if (present("model_type") && j.at("model_type") != "qwen2") fail("model_type", "\"qwen2\"", j.at("model_type"));
    if (present("hidden_act") && j.at("hidden_act") != "silu") fail("hidden_act", "\"silu\"", j.at("hidden_act"));
    if (present("use_sliding_window") && j.at("use_sliding_window") != false)
      fail("use_sliding_window", "false (sliding-window attention is not implemented)", j.at("use_sliding_window"));
    if (present("layer_types"))
      for (const auto& t : j.at("layer_types"))
        if (t != "full_attention") fail("layer_types", "\"full_attention\" for every layer", t);
    if (present("rope_scaling")) {
      // transformers may spell plain RoPE as a rope_scaling object of type "default".
      const auto& rs = j.at("rope_scaling");
      if (!rs.is_object() || rope_type(rs) != "default")
        fail("rope_scaling", "null (rope scaling is not implemented)", rs);
      c.rope_theta = number("rope_theta", rs, "rope_scaling.rope_theta", c.rope_theta);
    }
    if (present("rope_parameters")) {  // transformers >= 5 keeps rope_theta here
      const auto& rp = j.at("rope_parameters");
      if (!rp.is_object() || rope_type(rp) != "default")
        fail("rope_parameters", "rope_type \"default\" (rope scaling is not implemented)", rp);
      c.rope_theta = number("rope_theta", rp, "rope_parameters.rope_theta", c.rope_theta);
    }
    if (c.hidden_size % c.num_attention_heads != 0)
      fail("num_attention_heads", molora::detail::cat("a divisor of hidden_size (", c.hidden_size, ")"),
           j.at("num_attention_heads"));
    if (c.num_attention_heads % c.num_key_value_heads != 0)
      fail("num_key_value_heads", molora::detail::cat("a divisor of num_attention_heads (", c.num_attention_heads, ")"),
           j.at("num_key_value_heads"));
    c.head_dim = c.hidden_size / c.num_attention_heads;
    if (present("head_dim") && j.at("head_dim") != c.head_dim)
      fail("head_dim", molora::detail::cat("hidden_size / num_attention_heads = ", c.head_dim), j.at("head_dim"));
    if (c.head_dim % 2 != 0) fail("head_dim", "an even number (rotary embedding)", nlohmann::json(c.head_dim));
    return c;
  }

  static nlohmann::json read_json(const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    if (!in) throw molora::format_error(path + ": cannot open for reading");
    nlohmann::json j;
    try {
      in >> j;
    } catch (const nlohmann::json::exception& e) {
      throw molora::format_error(molora::detail::cat(path, ": not valid JSON: ", e.what()));
    }
    if (!j.is_object()) throw molora::format_error(path + ": top level: expected a JSON object");
    return j;
  }

 private:
  static std::string rope_type(const nlohmann::json& obj) {
    for (const char* key : {"rope_type", "type"})
      if (obj.contains(key) && obj.at(key).is_string()) return obj.at(key).get<std::string>();
    return "";
  }
};

// ---- weights ------------------------------------------------------------------------------

// One projection weight [rows, cols] as the model keeps it: float or bf16. It either points
// into the memory-mapped safetensors file (no copy; the file stays mapped as long as the
// model) or into a buffer of its own (widened, rounded, or copied because the file's bytes
// are not aligned for the type).
struct WeightData {
  Index rows = 0, cols = 0;
  const float* f32 = nullptr;          // exactly one of f32 / b16 is set
  const molora::bf16* b16 = nullptr;
  Matrix own_f32;                      // [rows, cols] when the float weight is a copy
  std::vector<molora::bf16> own_b16;   // [rows * cols] when the bf16 weight is a copy
  bool in_file = false;                // f32 / b16 point into the mapped file

  bool is_bf16() const { return b16 != nullptr; }
  std::size_t bytes() const { return static_cast<std::size_t>(rows * cols) * (is_bf16() ? 2 : 4); }

  static WeightData owned(Matrix m) {
    WeightData w;
    w.rows = m.rows();
    w.cols = m.cols();
    w.own_f32 = std::move(m);
    w.f32 = w.own_f32.data();
    return w;
  }
  static WeightData owned_bf16(std::vector<molora::bf16> v, Index rows, Index cols) {
    WeightData w;
    w.rows = rows;
    w.cols = cols;
    w.own_b16 = std::move(v);
    w.b16 = w.own_b16.data();
    return w;
  }
  // Moving keeps the pointers right: Eigen and std::vector moves keep their buffers.
};

// How a folder's tensors are kept: as stored (F32 as float, BF16 as bf16, each wrapped in
// the mapped file where aligned), or all widened to float once (the older behaviour, for
// comparison). F16 and F64 tensors are always widened to float.
struct LoadOptions {
  bool widen = false;
};

// The tensors of a Hugging Face folder: one safetensors file, or the shards named by
// model.safetensors.index.json. Names resolve to (reader, file); a missing tensor or a shape
// that disagrees with the config is a format_error naming the file and the tensor.
class WeightFiles {
 public:
  explicit WeightFiles(const std::string& dir, LoadOptions options = {}) : options_(options) {
    namespace fs = std::filesystem;
    const std::string single = (fs::path(dir) / "model.safetensors").string();
    const std::string index = (fs::path(dir) / "model.safetensors.index.json").string();
    if (fs::exists(single)) {
      readers_.emplace_back(single);
      return;
    }
    if (!fs::exists(index))
      throw molora::format_error(
          molora::detail::cat(dir, ": expected model.safetensors or model.safetensors.index.json, got neither"));
    const nlohmann::json j = Config::read_json(index);
    if (!j.contains("weight_map") || !j.at("weight_map").is_object())
      throw molora::format_error(index + ": field 'weight_map': expected an object of tensor name -> file");
    std::map<std::string, std::size_t> file_index;
    for (const auto& [name, file] : j.at("weight_map").items()) {
      if (!file.is_string() || file.get<std::string>().find('/') != std::string::npos)
        throw molora::format_error(molora::detail::cat(index, ": weight_map['", name,
                                                       "']: expected a file name in the folder, got ", file.dump()));
      const std::string f = file.get<std::string>();
      auto it = file_index.find(f);
      if (it == file_index.end()) {
        it = file_index.emplace(f, readers_.size()).first;
        readers_.emplace_back((fs::path(dir) / f).string());
      }
      shard_of_[name] = it->second;
    }
    index_path_ = index;
  }

  bool has(const std::string& name) const { return find(name) != nullptr; }
  // The readers; a copy keeps the files mapped (the model keeps one while it wraps them).
  const std::vector<molora::io::SafetensorsReader>& readers() const { return readers_; }

  // The tensor as float [rows, cols] (a 1-D tensor when cols == 0), checked against the shape.
  Matrix matrix(const std::string& name, Index rows, Index cols) const {
    const molora::io::SafetensorsReader& r = reader(name);
    r.expect_shape(name, rows, cols);
    return r.matrix<float>(name);  // [rows, cols], F32/BF16/F16 widened
  }
  Vec vector(const std::string& name, Index n) const {
    const molora::io::SafetensorsReader& r = reader(name);
    r.expect_shape(name, n);
    return r.vector<float>(name);  // [n]
  }

  // A projection weight [rows, cols] as stored (see LoadOptions): F32 and BF16 wrapped in the
  // mapped file when their data is aligned for the type (4 and 2 bytes), copied once
  // otherwise; everything else, or everything with options.widen, widened to float.
  WeightData weight(const std::string& name, Index rows, Index cols) const {
    const molora::io::SafetensorsReader& r = reader(name);
    r.expect_shape(name, rows, cols);
    const molora::io::Dtype dtype = r.info(name).dtype;
    const std::uint8_t* p = r.bytes(name);
    const auto address = reinterpret_cast<std::uintptr_t>(p);
    if (!options_.widen && dtype == molora::io::Dtype::BF16) {
      WeightData w;
      w.rows = rows;
      w.cols = cols;
      if (address % alignof(molora::bf16) == 0) {
        w.b16 = reinterpret_cast<const molora::bf16*>(p);  // [rows, cols] in the file
        w.in_file = true;
      } else {
        w.own_b16.resize(static_cast<std::size_t>(rows * cols));  // [rows * cols], one copy
        std::memcpy(w.own_b16.data(), p, w.own_b16.size() * sizeof(molora::bf16));
        w.b16 = w.own_b16.data();
      }
      return w;
    }
    if (dtype == molora::io::Dtype::F32 && address % alignof(float) == 0) {
      WeightData w;
      w.rows = rows;
      w.cols = cols;
      w.f32 = r.view<float>(name).data();  // [rows, cols] in the file
      w.in_file = true;
      return w;
    }
    return WeightData::owned(r.matrix<float>(name));  // [rows, cols] widened (or unaligned F32)
  }

 private:
  LoadOptions options_;
  std::vector<molora::io::SafetensorsReader> readers_;
  std::map<std::string, std::size_t> shard_of_;
  std::string index_path_;

  const molora::io::SafetensorsReader* find(const std::string& name) const {
    if (index_path_.empty()) return readers_.front().has(name) ? &readers_.front() : nullptr;
    auto it = shard_of_.find(name);
    return it == shard_of_.end() ? nullptr : &readers_[it->second];
  }
  const molora::io::SafetensorsReader& reader(const std::string& name) const {
    if (const auto* r = find(name)) return *r;
    const std::string where = index_path_.empty() ? readers_.front().source() : index_path_;
    throw molora::format_error(molora::detail::cat(where, ": tensor '", name, "': missing (the model needs it)"));
  }
};

// ---- building blocks -------------------------------------------------------------------------

// A projection y = x W^T (+ b) over a WeightData: a molora::Linear (float or bf16 weight)
// wrapping it, or, once an adapter is attached, a MoLoRALinear of the same weight type whose
// forward adds the routed experts' delta. The bias stays float.
class Projection {
 public:
  void init(WeightData w, Vec b) {
    weight_ = std::move(w);
    bias_ = std::move(b);
    detach();
    if (weight_.is_bf16()) {
      plain_b16_ = std::make_unique<molora::Linear<float, molora::bf16>>(weight_.cols, weight_.rows);
      plain_b16_->wrap_weight(weight_.b16, weight_.rows, weight_.cols);
      if (bias_.size() > 0) plain_b16_->set_bias(bias_);
    } else {
      plain_f32_ = std::make_unique<molora::Linear<float>>(weight_.cols, weight_.rows);
      plain_f32_->wrap_weight(weight_.f32, weight_.rows, weight_.cols);
      if (bias_.size() > 0) plain_f32_->set_bias(bias_);
    }
  }

  // Replaces the plain layer by a MoLoRALinear with `adapter` over the same weight and bias.
  // The adapter's router and experts stay in their own type: float, or bf16 as a BF16 adapter
  // file keeps them (Model::attach_adapter).
  template <class AW>
  void attach(const molora::MoLoRAAdapter<float, AW>& adapter) {
    detach();
    if (weight_.is_bf16())
      make_moe(std::get<Moe<molora::bf16, AW>>(moe_), adapter, weight_.b16);
    else
      make_moe(std::get<Moe<float, AW>>(moe_), adapter, weight_.f32);
    plain_f32_.reset();
    plain_b16_.reset();
  }

  bool adapted() const { return with_moe([](const auto&) { return true; }, false); }
  // Whether forward adds the attached adapter's delta (true by default). Off, the adapted
  // layer runs its base product alone (MoLoRALinear::forward_base) over the same weight, as
  // PEFT's disable_adapter does: the plain model without a second copy of its weights.
  void enable_adapter(bool on) { adapter_on_ = on; }
  bool adapter_enabled() const { return adapter_on_; }
  // The attached adapter when its router and experts are float, or nullptr.
  const molora::MoLoRAAdapter<float>* adapter() const {
    if (const auto& m = std::get<Moe<float, float>>(moe_)) return &m->adapter();
    if (const auto& m = std::get<Moe<molora::bf16, float>>(moe_)) return &m->adapter();
    return nullptr;
  }
  // "bf16" or "f32": the type the attached adapter's router and experts are kept in ("" if none).
  const char* adapter_dtype() const {
    return with_moe([](const auto& m) { return adapter_dtype_of(*m); }, "");
  }
  Index rows() const { return weight_.rows; }
  Index cols() const { return weight_.cols; }
  // "bf16" or "f32": the type the weight is kept in (and the product reads).
  const char* weight_dtype() const { return weight_.is_bf16() ? "bf16" : "f32"; }
  const WeightData& weight() const { return weight_; }
  const Vec& bias() const { return bias_; }  // [out] or empty
  // The layer itself wraps the weight (no copy inside molora).
  bool layer_wraps_weight() const {
    if (plain_f32_) return plain_f32_->wraps_weight();
    if (plain_b16_) return plain_b16_->wraps_weight();
    return with_moe([](const auto& m) { return m->wraps_base(); }, false);
  }

  // How the base product x W^T runs (molora::BaseStrategy; automatic by default), for
  // measurement: the plain layer's strategy or the adapted layer's base strategy.
  void set_base_strategy(molora::BaseStrategy s) {
    if (plain_f32_) plain_f32_->set_strategy(s);
    if (plain_b16_) plain_b16_->set_strategy(s);
    std::apply([&](auto&... m) { ((m ? m->set_base_strategy(s) : void()), ...); }, moe_);
  }

  // y = x W^T + b (+ delta); returns the routing when adapted, nullptr otherwise.
  const molora::Routing<float>* forward(const Matrix& x, Matrix& y, molora::MoLoRAWorkspace<float>& ws) const {
    y.resize(x.rows(), weight_.rows);  // [T, out]
    if (!adapter_on_ && with_moe([&](const auto& m) { return m->forward_base(x, y), true; }, false)) return nullptr;
    const molora::Routing<float>* routing =
        with_moe([&](const auto& m) -> const molora::Routing<float>* { return &m->forward(x, y, ws); },
                 static_cast<const molora::Routing<float>*>(nullptr));
    if (routing) return routing;
    if (plain_b16_)
      plain_b16_->forward(x, y);
    else
      plain_f32_->forward(x, y);
    return nullptr;
  }

 private:
  WeightData weight_;
  Vec bias_;  // [out] or empty
  bool adapter_on_ = true;
  std::unique_ptr<molora::Linear<float>> plain_f32_;
  std::unique_ptr<molora::Linear<float, molora::bf16>> plain_b16_;
  // The adapted layer, at most one of the four: base weight float or bf16, router and
  // experts float or bf16.
  template <class BW, class AW>
  using Moe = std::unique_ptr<molora::MoLoRALinear<float, BW, AW>>;
  std::tuple<Moe<float, float>, Moe<molora::bf16, float>, Moe<float, molora::bf16>, Moe<molora::bf16, molora::bf16>>
      moe_;

  void detach() {
    std::apply([](auto&... m) { (m.reset(), ...); }, moe_);
  }
  // f(layer) on the adapted layer, or `none` when there is none.
  template <class F, class R>
  R with_moe(F&& f, R none) const {
    R out = none;
    bool found = false;
    std::apply(
        [&](const auto&... m) {
          ((!found && m ? (out = f(m), found = true) : false), ...);
        },
        moe_);
    return out;
  }
  template <class BW, class AW>
  static const char* adapter_dtype_of(const molora::MoLoRALinear<float, BW, AW>&) {
    return std::is_same_v<AW, molora::bf16> ? "bf16" : "f32";
  }

  template <class W, class AW>
  void make_moe(Moe<W, AW>& layer, const molora::MoLoRAAdapter<float, AW>& adapter, const W* w) {
    layer = std::make_unique<molora::MoLoRALinear<float, W, AW>>(adapter.config());
    if constexpr (std::is_same_v<W, float>)
      layer->wrap_base_weight(typename molora::MoLoRALinear<float>::BaseWeightMap(w, weight_.rows, weight_.cols));
    else
      layer->wrap_base_weight(w, weight_.rows, weight_.cols);
    if (bias_.size() > 0) layer->wrap_base_bias(Eigen::Map<const Vec>(bias_.data(), bias_.size()));
    layer->adapter() = adapter;
  }
};

// x / sqrt(mean(x^2) + eps) * w, row by row (transformers' Qwen2RMSNorm in float32).
inline void rms_norm(const Matrix& x, const Vec& w, double eps, Matrix& out) {
  out.resize(x.rows(), x.cols());  // [T, H]
  for (Index t = 0; t < x.rows(); ++t) {
    const float ms = x.row(t).squaredNorm() / static_cast<float>(x.cols());
    const float inv = 1.0f / std::sqrt(ms + static_cast<float>(eps));
    out.row(t) = (x.row(t) * inv).cwiseProduct(w.transpose());
  }
}

// One sequence's keys and values for every layer: rows = positions, columns = kv heads x dim.
struct KVCache {
  std::vector<Matrix> k, v;  // per layer [capacity, kv_heads * head_dim]
  Index length = 0;          // positions filled

  void reserve(Index layers, Index width, Index capacity) {
    k.resize(static_cast<std::size_t>(layers));
    v.resize(static_cast<std::size_t>(layers));
    for (std::size_t l = 0; l < k.size(); ++l) {
      if (k[l].rows() >= capacity && k[l].cols() == width) continue;
      const Index cap = std::max(capacity, 2 * k[l].rows());
      k[l].conservativeResize(cap, width);  // [cap, kv_dim]
      v[l].conservativeResize(cap, width);  // [cap, kv_dim]
    }
  }
  void clear() { length = 0; }
};

// Tokens each expert took, per layer and projection (gate, up, down).
struct ExpertLoad {
  std::vector<std::array<std::vector<long>, 3>> counts;  // [layer][projection][expert]
  void reset(Index layers, Index experts) {
    counts.assign(static_cast<std::size_t>(layers), {});
    for (auto& per_layer : counts)
      for (auto& c : per_layer) c.assign(static_cast<std::size_t>(experts), 0);
  }
  void add(std::size_t layer, std::size_t proj, const molora::Routing<float>& r) {
    for (Index t = 0; t < r.ids.rows(); ++t)
      for (Index s = 0; s < r.ids.cols(); ++s) ++counts[layer][proj][static_cast<std::size_t>(r.ids(t, s))];
  }
};

// ---- the model ------------------------------------------------------------------------------

inline const char* const kMlpNames[3] = {"gate_proj", "up_proj", "down_proj"};

struct AdapterOptions {
  std::string dir;                   // MING-MOE folder; empty: the plain model
  std::optional<double> lora_alpha;  // overrides the adapter config's lora_alpha
};

class Model {
 public:
  struct Layer {
    Vec input_norm, post_norm;  // [H]
    Projection q, k, v, o;
    std::array<Projection, 3> mlp;  // gate, up, down
  };

  // Loads the folder (and the adapter when options.dir is set). Throws format_error on a
  // config it cannot honour or tensors that are missing or disagree with the config.
  // Projection weights are kept as stored (see LoadOptions): the model then wraps the mapped
  // file's bytes and keeps the file mapped for its own lifetime.
  explicit Model(const std::string& dir, const AdapterOptions& adapter = {}, const LoadOptions& load = {})
      : config_(Config::from_file((std::filesystem::path(dir) / "config.json").string())) {
    const WeightFiles files(dir, load);  // after the config, whose errors come first
    load_weights(files);
    mapped_ = files.readers();  // shares the mappings the projections point into
    widen_ = load.widen;
    if (!adapter.dir.empty()) attach_adapter(adapter);
  }

  // From any source of tensors with WeightFiles' matrix(name, rows, cols), vector(name, n)
  // and weight(name, rows, cols) (a benchmark's random weights, for one). The model owns
  // what they return; a WeightData that points elsewhere must outlive the model.
  template <class Source>
  Model(const Config& config, const Source& w) : config_(config) {
    load_weights(w);
  }
  Model(const Model&) = delete;  // the molora layers point into this object's buffers
  Model& operator=(const Model&) = delete;

 private:
  template <class Source>
  void load_weights(const Source& w) {
    const Config& c = config_;
    const Index H = c.hidden_size, I = c.intermediate_size, hd = c.head_dim;
    const Index q_dim = c.num_attention_heads * hd, kv_dim = c.num_key_value_heads * hd;
    embed_ = w.matrix("model.embed_tokens.weight", c.vocab_size, H);  // [V, H] widened once, for the lookup
    norm_ = w.vector("model.norm.weight", H);
    // The LM head as stored: embed_tokens' tensor when tied (wrapped again, as bf16 if stored so).
    lm_head_.init(w.weight(c.tie_word_embeddings ? "model.embed_tokens.weight" : "lm_head.weight", c.vocab_size, H),
                  Vec());
    layers_.resize(static_cast<std::size_t>(c.num_hidden_layers));
    for (std::size_t l = 0; l < layers_.size(); ++l) {
      Layer& L = layers_[l];
      const std::string p = molora::detail::cat("model.layers.", l, ".");
      L.input_norm = w.vector(p + "input_layernorm.weight", H);
      L.post_norm = w.vector(p + "post_attention_layernorm.weight", H);
      L.q.init(w.weight(p + "self_attn.q_proj.weight", q_dim, H), w.vector(p + "self_attn.q_proj.bias", q_dim));
      L.k.init(w.weight(p + "self_attn.k_proj.weight", kv_dim, H), w.vector(p + "self_attn.k_proj.bias", kv_dim));
      L.v.init(w.weight(p + "self_attn.v_proj.weight", kv_dim, H), w.vector(p + "self_attn.v_proj.bias", kv_dim));
      L.o.init(w.weight(p + "self_attn.o_proj.weight", H, q_dim), Vec());
      L.mlp[0].init(w.weight(p + "mlp.gate_proj.weight", I, H), Vec());
      L.mlp[1].init(w.weight(p + "mlp.up_proj.weight", I, H), Vec());
      L.mlp[2].init(w.weight(p + "mlp.down_proj.weight", H, I), Vec());
    }
    init_rope();
    load_.reset(c.num_hidden_layers, num_experts_);
  }

 public:
  const Config& config() const { return config_; }
  bool adapted() const { return num_experts_ > 0; }
  // Whether the attached adapters take part in forward (Projection::enable_adapter): off, the
  // adapted model computes the plain model's logits on the same weights, and no expert load.
  void enable_adapters(bool on) {
    for (Layer& L : layers_)
      for (Projection& p : L.mlp) p.enable_adapter(on);
  }
  Index num_experts() const { return num_experts_; }
  const ExpertLoad& expert_load() const { return load_; }
  void reset_expert_load() { load_.reset(config_.num_hidden_layers, num_experts_); }
  const std::vector<Layer>& layers() const { return layers_; }
  const Projection& lm_head() const { return lm_head_; }
  // Every projection's base strategy (Projection::set_base_strategy), for measurement.
  void set_base_strategy(molora::BaseStrategy s) {
    for (Layer& L : layers_) {
      for (Projection* p : {&L.q, &L.k, &L.v, &L.o}) p->set_base_strategy(s);
      for (Projection& p : L.mlp) p.set_base_strategy(s);
    }
    lm_head_.set_base_strategy(s);
  }

  // Bytes of the weights one decode token reads from memory at least once: every projection's
  // base weight and the LM head (not the adapters' routers and experts).
  std::size_t projection_bytes() const {
    std::size_t n = lm_head_.weight().bytes();
    for (const Layer& L : layers_) {
      for (const Projection* p : {&L.q, &L.k, &L.v, &L.o}) n += p->weight().bytes();
      for (const Projection& p : L.mlp) n += p.weight().bytes();
    }
    return n;
  }
  // Calls f(pointer, bytes) for each buffer projection_bytes() counts.
  template <class F>
  void for_each_projection_weight(F&& f) const {
    auto one = [&](const Projection& p) {
      const WeightData& w = p.weight();
      f(w.is_bf16() ? static_cast<const void*>(w.b16) : static_cast<const void*>(w.f32), w.bytes());
    };
    for (const Layer& L : layers_) {
      for (const Projection* p : {&L.q, &L.k, &L.v, &L.o}) one(*p);
      for (const Projection& p : L.mlp) one(p);
    }
    one(lm_head_);
  }

  // Puts `adapter` on projection p (0 gate, 1 up, 2 down) of layer l; its router and experts
  // float or bf16 (AW). Every adapter must have the same number of experts. `source` names the
  // file in the format_error of a mismatch.
  template <class AW>
  void attach(std::size_t l, std::size_t p, const molora::MoLoRAAdapter<float, AW>& a,
              const std::string& source = "adapter") {
    if (l >= layers_.size() || p >= 3)
      throw molora::config_error(molora::detail::mismatch(
          "qwen2 attach (layer, projection)", molora::detail::cat("layer < ", layers_.size(), ", projection < 3"),
          molora::detail::cat("(", l, ", ", p, ")")));
    const std::string module = molora::detail::cat("model.layers.", l, ".mlp.", kMlpNames[p]);
    Projection& proj = layers_[l].mlp[p];
    const std::string base =
        molora::detail::cat("the model's '", module, ".weight' ", molora::detail::shape_str(proj.rows(), proj.cols()));
    if (a.in_features() != proj.cols())
      throw molora::format_error(
          molora::detail::cat(source, ": module '", module, "': tensor 'experts.0.lora_A_0.weight' columns: ",
                              molora::detail::mismatch("in_features of " + base, proj.cols(), a.in_features())));
    if (a.out_features() != proj.rows())
      throw molora::format_error(molora::detail::cat(
          source, ": module '", module, "': tensor 'experts.0.lora_B_0.weight' rows: ",
          molora::detail::mismatch("out_features of " + base, proj.rows(), a.out_features())));
    if (num_experts_ != 0 && a.num_experts() != num_experts_)
      throw molora::format_error(molora::detail::cat(
          source, ": module '", module, "': ", molora::detail::mismatch("num_experts", num_experts_, a.num_experts())));
    proj.attach(a);
    num_experts_ = a.num_experts();
    load_.reset(config_.num_hidden_layers, num_experts_);
  }

  // Runs tokens[s] (one or more new tokens) of every sequence s on top of caches[s], appends
  // their keys and values, and returns the logits of every new token, the sequences' rows one
  // after the other: [sum of tokens[s].size(), vocab]. The projections run over all rows at
  // once; attention runs per sequence over its own cache (causal). Throws shape_error when
  // the counts of sequences and caches differ or a sequence has no new token, config_error on
  // a token id outside [0, vocab_size); nothing changes then.
  Matrix forward(const std::vector<std::vector<int>>& tokens, const std::vector<KVCache*>& caches) {
    if (tokens.size() != caches.size())
      throw molora::shape_error(
          molora::detail::mismatch("qwen2 forward caches (one per sequence)", tokens.size(), caches.size()));
    const Config& c = config_;
    Index rows = 0;
    for (std::size_t s = 0; s < tokens.size(); ++s) {
      if (tokens[s].empty())
        throw molora::shape_error(
            molora::detail::mismatch(molora::detail::cat("qwen2 forward new tokens of sequence ", s), "at least 1", 0));
      for (int id : tokens[s])
        if (id < 0 || id >= c.vocab_size)
          throw molora::config_error(
              molora::detail::mismatch(molora::detail::cat("qwen2 forward token id of sequence ", s),
                                       molora::detail::cat("a value in [0, vocab_size = ", c.vocab_size, ")"), id));
      rows += static_cast<Index>(tokens[s].size());
    }
    const Index kv_dim = c.num_key_value_heads * c.head_dim;
    std::vector<Index> first(tokens.size());  // first row of each sequence in the batch
    Index r = 0;
    for (std::size_t s = 0; s < tokens.size(); ++s) {
      first[s] = r;
      r += static_cast<Index>(tokens[s].size());
      caches[s]->reserve(c.num_hidden_layers, kv_dim, caches[s]->length + static_cast<Index>(tokens[s].size()));
    }

    Matrix& h = scratch_.h;
    h.resize(rows, c.hidden_size);  // [T, H]
    for (std::size_t s = 0; s < tokens.size(); ++s)
      for (std::size_t i = 0; i < tokens[s].size(); ++i)
        h.row(first[s] + static_cast<Index>(i)) = embed_.row(tokens[s][i]);

    for (std::size_t l = 0; l < layers_.size(); ++l) {
      const Layer& L = layers_[l];
      rms_norm(h, L.input_norm, c.rms_norm_eps, scratch_.x);
      attention(l, tokens, caches, first);  // scratch_.x -> scratch_.attn [T, H]
      h += scratch_.attn;
      rms_norm(h, L.post_norm, c.rms_norm_eps, scratch_.x);
      mlp(l);  // scratch_.x -> scratch_.mlp_out [T, H]
      h += scratch_.mlp_out;
    }
    for (std::size_t s = 0; s < tokens.size(); ++s) caches[s]->length += static_cast<Index>(tokens[s].size());

    rms_norm(h, norm_, c.rms_norm_eps, scratch_.x);
    Matrix logits;
    lm_head_.forward(scratch_.x, logits, scratch_.ws);  // [T, V]
    return logits;
  }

  // One sequence: logits [tokens.size(), vocab].
  Matrix forward(const std::vector<int>& tokens, KVCache& cache) { return forward({tokens}, {&cache}); }

 private:
  struct Scratch {
    Matrix h, x, q, k, v, ctx, attn, gate, up, mlp_out;
    Eigen::MatrixXf scores;
    molora::MoLoRAWorkspace<float> ws;
  };

  Config config_;
  std::vector<molora::io::SafetensorsReader> mapped_;  // the files the projections may point into
  Matrix embed_;                                       // [V, H] float, for the token lookup
  Projection lm_head_;                                 // [V, H]
  Vec norm_;                // [H]
  std::vector<Layer> layers_;
  Index num_experts_ = 0;
  Vec inv_freq_;  // [head_dim / 2]
  ExpertLoad load_;
  Scratch scratch_;
  bool widen_ = false;  // LoadOptions::widen: the adapter float too

  void attach_adapter(const AdapterOptions& opt) {
    namespace fs = std::filesystem;
    const std::string cfg_path = (fs::path(opt.dir) / "config.json").string();
    const std::string weights_path = (fs::path(opt.dir) / "non_lora_trainables.safetensors").string();
    molora::io::MingMoeLoadOptions lo;
    lo.lora_alpha = opt.lora_alpha;
    // Kept as stored, as the model's weights are: a file whose tensors are all BF16 gives bf16
    // routers and experts (half the bytes a decode step reads of them), any other file float
    // (a BF16 tensor of a mixed file widened exactly). LoadOptions::widen makes it float.
    bool all_bf16 = !widen_;
    try {
      const molora::io::SafetensorsReader r(weights_path);
      for (const std::string& name : r.names()) all_bf16 = all_bf16 && r.info(name).dtype == molora::io::Dtype::BF16;
    } catch (const molora::error&) {
      all_bf16 = false;  // the float load below reports it, after the config's errors
    }
    if (all_bf16)
      attach_modules(molora::io::load_ming_moe<float, molora::bf16>(cfg_path, weights_path, lo), cfg_path, weights_path);
    else
      attach_modules(molora::io::load_ming_moe<float>(cfg_path, weights_path, lo), cfg_path, weights_path);
  }

  template <class Adapters>
  void attach_modules(const Adapters& ming, const std::string& cfg_path, const std::string& weights_path) {
    const Config& c = config_;
    std::set<std::string> used;
    for (std::size_t l = 0; l < layers_.size(); ++l)
      for (std::size_t p = 0; p < 3; ++p) {
        const std::string module = molora::detail::cat("model.layers.", l, ".mlp.", kMlpNames[p]);
        attach(l, p, ming.at(module), weights_path);
        used.insert(module);
      }
    for (const auto& [module, a] : ming.modules)
      if (!used.count(module))
        throw molora::format_error(molora::detail::cat(weights_path, ": module '", module,
                                                       "': expected one of the model's MLP projections (layers 0..",
                                                       c.num_hidden_layers - 1, "), got an adapter for it"));
    // after the tensors, whose messages name the tensor
    if (ming.config.hidden_size && *ming.config.hidden_size != c.hidden_size)
      throw molora::format_error(molora::detail::cat(
          cfg_path,
          ": field 'hidden_size': ", molora::detail::mismatch("the model's", c.hidden_size, *ming.config.hidden_size)));
  }

  void init_rope() {
    const Index half = config_.head_dim / 2;
    inv_freq_.resize(half);           // [hd / 2]
    for (Index i = 0; i < half; ++i)  // theta^(-2i / hd), rounded to float as transformers keeps it
      inv_freq_(i) = static_cast<float>(
          1.0 / std::pow(config_.rope_theta, static_cast<double>(2 * i) / static_cast<double>(config_.head_dim)));
  }

  // Rotates each head of row `row` of m by position pos (rotate-half form).
  void rope(Matrix& m, Index row, Index heads, Index pos) const {
    const Index hd = config_.head_dim, half = hd / 2;
    for (Index i = 0; i < half; ++i) {
      const float angle = static_cast<float>(pos) * inv_freq_(i);
      const float cs = std::cos(angle), sn = std::sin(angle);
      for (Index hh = 0; hh < heads; ++hh) {
        float* x = m.row(row).data() + hh * hd;
        const float a = x[i], b = x[i + half];
        x[i] = a * cs - b * sn;
        x[i + half] = b * cs + a * sn;
      }
    }
  }

  void attention(std::size_t l, const std::vector<std::vector<int>>& tokens, const std::vector<KVCache*>& caches,
                 const std::vector<Index>& first) {
    const Config& c = config_;
    const Layer& L = layers_[l];
    Scratch& s = scratch_;
    const Index hd = c.head_dim, nh = c.num_attention_heads, nkv = c.num_key_value_heads, group = nh / nkv;
    L.q.forward(s.x, s.q, s.ws);        // [T, nh * hd]
    L.k.forward(s.x, s.k, s.ws);        // [T, nkv * hd]
    L.v.forward(s.x, s.v, s.ws);        // [T, nkv * hd]
    s.ctx.resize(s.x.rows(), nh * hd);  // [T, nh * hd]
    const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
    for (std::size_t q = 0; q < tokens.size(); ++q) {
      KVCache& cache = *caches[q];
      const Index n = static_cast<Index>(tokens[q].size()), p0 = cache.length, len = p0 + n;
      for (Index i = 0; i < n; ++i) {
        const Index row = first[q] + i;
        rope(s.q, row, nh, p0 + i);
        rope(s.k, row, nkv, p0 + i);
        cache.k[l].row(p0 + i) = s.k.row(row);
        cache.v[l].row(p0 + i) = s.v.row(row);
      }
      for (Index head = 0; head < nh; ++head) {
        const Index g = head / group;
        const auto qh = s.q.block(first[q], head * hd, n, hd);  // [n, hd]
        const auto kh = cache.k[l].block(0, g * hd, len, hd);   // [len, hd]
        const auto vh = cache.v[l].block(0, g * hd, len, hd);   // [len, hd]
        s.scores.noalias() = (qh * kh.transpose()) * scale;     // [n, len]
        for (Index i = 0; i < n; ++i) {                         // causal softmax: token i sees positions <= p0 + i
          const Index seen = p0 + i + 1;
          auto row = s.scores.row(i);
          const float m = row.head(seen).maxCoeff();
          row.head(seen) = (row.head(seen).array() - m).exp().matrix();
          row.head(seen) /= row.head(seen).sum();
          row.tail(len - seen).setZero();
        }
        s.ctx.block(first[q], head * hd, n, hd).noalias() = s.scores * vh;  // [n, hd]
      }
    }
    L.o.forward(s.ctx, s.attn, s.ws);  // [T, H]
  }

  void mlp(std::size_t l) {
    const Layer& L = layers_[l];
    Scratch& s = scratch_;
    if (const auto* r = L.mlp[0].forward(s.x, s.gate, s.ws)) load_.add(l, 0, *r);        // [T, I]
    if (const auto* r = L.mlp[1].forward(s.x, s.up, s.ws)) load_.add(l, 1, *r);          // [T, I]
    s.gate.array() = s.gate.array() / (1.0f + (-s.gate.array()).exp()) * s.up.array();   // silu(gate) * up
    if (const auto* r = L.mlp[2].forward(s.gate, s.mlp_out, s.ws)) load_.add(l, 2, *r);  // [T, H]
  }
};

// Index of the largest logit of a row (the first on ties, as torch.argmax).
inline int argmax(const Eigen::Ref<const Eigen::RowVectorXf>& row) {
  Index best = 0;
  for (Index i = 1; i < row.size(); ++i)
    if (row(i) > row(best)) best = i;
  return static_cast<int>(best);
}

// Greedy generation of one sequence: the prompt's logits, then max_new_tokens tokens and the
// logits each was chosen from.
struct Generation {
  Matrix prompt_logits;  // [prompt, V]
  std::vector<int> tokens;
  Matrix step_logits;  // [max_new_tokens, V]
  double prefill_seconds = 0, decode_seconds = 0;
};

template <class Clock = std::chrono::steady_clock>
Generation generate(Model& model, const std::vector<int>& prompt, Index max_new_tokens) {
  Generation g;
  KVCache cache;
  const auto t0 = Clock::now();
  g.prompt_logits = model.forward(prompt, cache);  // [P, V]
  const auto t1 = Clock::now();
  g.step_logits.resize(max_new_tokens, model.config().vocab_size);  // [N, V]
  if (max_new_tokens > 0) g.step_logits.row(0) = g.prompt_logits.bottomRows(1);
  for (Index i = 0; i < max_new_tokens; ++i) {
    g.tokens.push_back(argmax(g.step_logits.row(i)));
    if (i + 1 < max_new_tokens) g.step_logits.row(i + 1) = model.forward({g.tokens.back()}, cache);
  }
  const auto t2 = Clock::now();
  g.prefill_seconds = std::chrono::duration<double>(t1 - t0).count();
  g.decode_seconds = std::chrono::duration<double>(t2 - t1).count();
  return g;
}

// Greedy generation of a ragged batch: all prompts prefilled in one forward, then one
// forward per step over every sequence's last token. Each sequence keeps its own cache, so
// the result equals generating each alone (up to rounding: the products see other rows).
inline std::vector<Generation> generate_batch(Model& model, const std::vector<std::vector<int>>& prompts,
                                              Index max_new_tokens) {
  const std::size_t B = prompts.size();
  std::vector<Generation> out(B);
  std::vector<KVCache> caches(B);
  std::vector<KVCache*> ptrs;
  for (auto& c : caches) ptrs.push_back(&c);
  const Matrix logits = model.forward(prompts, ptrs);  // [sum P, V]
  Index row = 0;
  for (std::size_t s = 0; s < B; ++s) {
    const Index P = static_cast<Index>(prompts[s].size());
    out[s].prompt_logits = logits.middleRows(row, P);                      // [P, V]
    out[s].step_logits.resize(max_new_tokens, model.config().vocab_size);  // [N, V]
    if (max_new_tokens > 0) out[s].step_logits.row(0) = logits.row(row + P - 1);
    row += P;
  }
  for (Index i = 0; i < max_new_tokens; ++i) {
    std::vector<std::vector<int>> next(B);
    for (std::size_t s = 0; s < B; ++s) {
      out[s].tokens.push_back(argmax(out[s].step_logits.row(i)));
      next[s] = {out[s].tokens.back()};
    }
    if (i + 1 == max_new_tokens) break;
    const Matrix step = model.forward(next, ptrs);  // [B, V]
    for (std::size_t s = 0; s < B; ++s) out[s].step_logits.row(i + 1) = step.row(static_cast<Index>(s));
  }
  return out;
}

// ---- the command line (examples/qwen2_molora.cpp; here so the tests can run it) ------------

namespace cli {

inline const char* const kUsage =
    "usage: qwen2_molora MODEL_DIR [--adapter DIR] [--lora-alpha A] --prompt ID,ID,... "
    "--max-new-tokens N [--threads N] [--widen]";

struct BadFlag : std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct Args {
  std::string model_dir;
  AdapterOptions adapter;
  LoadOptions load;
  std::vector<int> prompt;
  long max_new_tokens = -1;
  long threads = 0;
};

inline long parse_long(const std::string& flag, const std::string& text, long min) {
  std::size_t used = 0;
  long v = 0;
  try {
    v = std::stol(text, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  if (used == 0 || used != text.size() || v < min)
    throw BadFlag(flag + ": expected an integer >= " + std::to_string(min) + ", got '" + text + "'");
  return v;
}

// Throws BadFlag with a one-line message.
inline Args parse(const std::vector<std::string>& argv) {
  Args a;
  for (std::size_t i = 0; i < argv.size(); ++i) {
    const std::string& arg = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argv.size()) throw BadFlag(arg + ": expected a value");
      return argv[++i];
    };
    if (arg == "--adapter") {
      a.adapter.dir = value();
    } else if (arg == "--lora-alpha") {
      const std::string v = value();
      char* end = nullptr;
      const double alpha = std::strtod(v.c_str(), &end);
      if (v.empty() || *end != '\0' || !(alpha > 0) || !std::isfinite(alpha))
        throw BadFlag("--lora-alpha: expected a number > 0, got '" + v + "'");
      a.adapter.lora_alpha = alpha;
    } else if (arg == "--widen") {
      a.load.widen = true;
    } else if (arg == "--prompt") {
      std::stringstream ss(value());
      std::string id;
      while (std::getline(ss, id, ',')) a.prompt.push_back(static_cast<int>(parse_long("--prompt", id, 0)));
      if (a.prompt.empty()) throw BadFlag("--prompt: expected comma-separated token ids, got none");
    } else if (arg == "--max-new-tokens") {
      a.max_new_tokens = parse_long(arg, value(), 0);
    } else if (arg == "--threads") {
      a.threads = parse_long(arg, value(), 1);
#ifndef MOLORA_USE_OPENMP
      throw BadFlag("--threads: needs the OpenMP build (configure with -DMOLORA_OPENMP=ON)");
#endif
    } else if (!arg.empty() && arg[0] == '-') {
      throw BadFlag("unknown flag '" + arg + "'");
    } else if (a.model_dir.empty()) {
      a.model_dir = arg;
    } else {
      throw BadFlag("unexpected argument '" + arg + "'");
    }
  }
  if (a.model_dir.empty()) throw BadFlag("missing MODEL_DIR");
  if (a.prompt.empty()) throw BadFlag("missing --prompt");
  if (a.max_new_tokens < 0) throw BadFlag("missing --max-new-tokens");
  return a;
}

// The whole program: 0 on success, 2 on bad flags (message and usage on err), 1 on a
// molora::error (a bad folder). The last line on out is the generated ids.
inline int run(const std::vector<std::string>& argv, std::ostream& out, std::ostream& err) {
  Args args;
  try {
    args = parse(argv);
  } catch (const BadFlag& e) {
    err << "qwen2_molora: " << e.what() << "\n" << kUsage << "\n";
    return 2;
  }
#ifdef MOLORA_USE_OPENMP
  if (args.threads > 0) omp_set_num_threads(static_cast<int>(args.threads));
#endif
  try {
    Model model(args.model_dir, args.adapter, args.load);
    const Config& c = model.config();
    out << "model: " << c.num_hidden_layers << " layers, hidden " << c.hidden_size << ", " << c.num_attention_heads
        << " heads (" << c.num_key_value_heads << " kv), vocab " << c.vocab_size << ", "
        << (c.tie_word_embeddings ? "tied" : "untied") << " head; "
        << (model.adapted() ? std::string("MING-MOE adapter on gate/up/down (router and experts ") +
                                  model.layers().front().mlp[0].adapter_dtype() + ")"
                            : std::string("no adapter"))
        << "\n";
    out << "weights: projections " << model.layers().front().q.weight_dtype() << ", LM head "
        << model.lm_head().weight_dtype() << (args.load.widen ? " (widened)" : " (as stored)") << ", "
        << model.projection_bytes() / (1 << 20) << " MiB read per decode step\n";
    for (int id : args.prompt)
      if (id >= c.vocab_size) {
        err << "qwen2_molora: --prompt: expected token ids < vocab_size (" << c.vocab_size << "), got " << id << "\n"
            << kUsage << "\n";
        return 2;
      }
    const Generation g = generate(model, args.prompt, args.max_new_tokens);
    if (model.adapted()) {
      out << "expert load (tokens per expert over prompt and decode), gate | up | down:\n";
      const auto& counts = model.expert_load().counts;
      for (std::size_t l = 0; l < counts.size(); ++l) {
        out << "  layer " << l << ":";
        for (std::size_t p = 0; p < 3; ++p) {
          if (p) out << " |";
          for (long n : counts[l][p]) out << " " << n;
        }
        out << "\n";
      }
    }
    const auto rate = [](double n, double s) {
      return molora::detail::cat(std::fixed, std::setprecision(1), n / std::max(s, 1e-12));
    };
    out << "prefill: " << args.prompt.size() << " tokens, "
        << rate(static_cast<double>(args.prompt.size()), g.prefill_seconds) << " tokens/s\n";
    if (args.max_new_tokens > 1)  // the first new token comes from the prefill's logits
      out << "decode: " << args.max_new_tokens - 1 << " steps, "
          << rate(static_cast<double>(args.max_new_tokens - 1), g.decode_seconds) << " tokens/s\n";
    for (std::size_t i = 0; i < g.tokens.size(); ++i) out << (i ? " " : "") << g.tokens[i];
    out << "\n";
  } catch (const molora::error& e) {
    err << "qwen2_molora: " << e.what() << "\n";
    return 1;
  }
  return 0;
}

}  // namespace cli

}  // namespace qwen2
