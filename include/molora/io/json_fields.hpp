// What the checkpoint formats' config parsers share (peft.hpp, mixlora.hpp, ming_moe.hpp):
// JsonFields reads typed fields of a JSON object read from a bounded regular file, and
// LoraParams holds one adapted Linear's LoRA hyper-parameters. Every problem (bad JSON,
// missing field, wrong type, value out of range, an option molora does not implement) is a
// molora::format_error naming the file and the field with the expected and the actual
// value; no nlohmann exception escapes.
//
// Fields not listed in a config struct are ignored, except for options that would change the
// math if ignored (DoRA, per-module rank/alpha patterns, other routing strategies): those
// are rejected as unsupported rather than silently dropped.
#pragma once

#include <nlohmann/json.hpp>

#include <cmath>
#include <cstdint>
#include <optional>
#include <string>
#include <utility>

#include "../errors.hpp"
#include "../numeric.hpp"
#include "../types.hpp"
#include "input.hpp"

namespace molora::io {

namespace internal {

// Reads typed fields of one JSON object, turning each problem into a format_error of the form
// "<source>: field 'name': expected ..., got ...".
class JsonFields {
public:
  JsonFields(const nlohmann::json& obj, std::string source, std::string prefix = "")
      : obj_(obj), source_(std::move(source)), prefix_(std::move(prefix)) {}

  // Parses `text`; the top level must be an object.
  static nlohmann::json parse_object(const std::string& text, const std::string& source) {
    nlohmann::json j;
    try {
      j = nlohmann::json::parse(text);
    } catch (const nlohmann::json::exception& e) {
      throw format_error(molora::detail::cat(source, ": not valid JSON: ", e.what()));
    }
    if (!j.is_object()) throw format_error(molora::detail::cat(source, ": top level: expected a JSON object, got ", j.type_name()));
    return j;
  }

  // The whole file, which must be a regular file of at most `max_bytes` (a FIFO, a device or
  // a directory is refused before anything is read).
  static std::string read_file(const std::string& path, std::uint64_t max_bytes) {
    std::string text;
    RegularFile(path).read_all(text, max_bytes, "Limits::max_config_bytes");
    return text;
  }

  bool has(const char* field) const {
    auto it = obj_.find(field);
    return it != obj_.end() && !it->is_null();
  }

  const nlohmann::json& at(const char* field) const {
    auto it = obj_.find(field);
    if (it == obj_.end() || it->is_null()) fail(field, "a value", "nothing (the field is missing or null)");
    return *it;
  }

  [[noreturn]] void fail(const std::string& field, const std::string& expected, const std::string& actual) const {
    throw format_error(molora::detail::cat(source_, ": field '", prefix_, field, "': expected ", expected, ", got ", actual));
  }

  // "16 (string)" style description of a value for messages; long values are cut.
  static std::string describe(const nlohmann::json& v) {
    std::string s = v.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
    if (s.size() > 60) s = s.substr(0, 57) + "...";
    return molora::detail::cat(s, " (", v.type_name(), ")");
  }

  std::string string(const char* field) const {
    const auto& v = at(field);
    if (!v.is_string()) fail(field, "a string", describe(v));
    return v.get<std::string>();
  }
  std::string string_or(const char* field, const std::string& fallback) const { return has(field) ? string(field) : fallback; }

  bool boolean_or(const char* field, bool fallback) const {
    if (!has(field)) return fallback;
    const auto& v = at(field);
    if (!v.is_boolean()) fail(field, "true or false", describe(v));
    return v.get<bool>();
  }

  // An integer >= min (JSON integers only: 16.0 or "16" are rejected).
  Index integer(const char* field, std::int64_t min) const {
    const auto& v = at(field);
    const std::string want = molora::detail::cat("an integer >= ", min);
    if (!v.is_number_integer()) fail(field, want, describe(v));
    if (v.is_number_unsigned()) {
      const auto u = v.get<std::uint64_t>();
      if (u > static_cast<std::uint64_t>(INT64_MAX)) fail(field, want + " that fits 64 bits", describe(v));
    }
    const auto i = v.get<std::int64_t>();
    if (i < min) fail(field, want, describe(v));
    return static_cast<Index>(i);
  }
  Index integer_or(const char* field, std::int64_t min, Index fallback) const { return has(field) ? integer(field, min) : fallback; }
  std::optional<Index> optional_integer(const char* field, std::int64_t min) const {
    if (!has(field)) return std::nullopt;
    return integer(field, min);
  }

  // A finite number (integer or float) in [lo, hi] or, with strict_lo, in (lo, hi].
  double number(const char* field, double lo, double hi, bool strict_lo) const {
    const auto& v = at(field);
    const std::string want = molora::detail::cat("a number in ", strict_lo ? "(" : "[", lo, ", ", hi, "]");
    if (!v.is_number()) fail(field, want, describe(v));
    const double d = v.get<double>();
    if (!std::isfinite(d) || d > hi || d < lo || (strict_lo && d == lo)) fail(field, want, describe(v));
    return d;
  }
  double number_or(const char* field, double lo, double hi, bool strict_lo, double fallback) const {
    return has(field) ? number(field, lo, hi, strict_lo) : fallback;
  }

  const std::string& source() const { return source_; }

private:
  const nlohmann::json& obj_;
  std::string source_;
  std::string prefix_;
};

inline constexpr double kHuge = 1e300;

// The LoRA hyper-parameters shared by the three formats' parsers.
inline void read_peft_type(const JsonFields& f, const char* want) {
  const std::string t = f.string("peft_type");
  if (t != want) f.fail("peft_type", molora::detail::cat("\"", want, "\""), molora::detail::cat("\"", t, "\""));
}

inline void reject_dora(const JsonFields& f) {
  if (f.boolean_or("use_dora", false)) f.fail("use_dora", "false (DoRA is unsupported)", "true");
}

}  // namespace internal

// LoRA hyper-parameters of one adapted Linear.
struct LoraParams {
  Index r = 0;               // rank
  double lora_alpha = 0;     // scaling = lora_alpha / r (or / sqrt(r) with use_rslora)
  double lora_dropout = 0;   // training only
  bool use_rslora = false;

  double scaling() const { return lora_scaling(lora_alpha, r, use_rslora); }
};

}  // namespace molora::io
