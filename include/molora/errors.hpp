// Errors. Every failure a caller can cause (bad configuration, wrong shapes, non-finite
// numbers, malformed files) is reported as an exception derived from molora::error whose
// message names the field, the expected value and the actual one. Internal invariants use
// MOLORA_ASSERT, which a host may override before including molora.
#pragma once

#include <cassert>
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>

#ifndef MOLORA_ASSERT
#define MOLORA_ASSERT(cond) assert(cond)
#endif

namespace molora {

// Base of every exception molora throws on purpose.
class error : public std::runtime_error {
public:
  explicit error(const std::string& what) : std::runtime_error(what) {}
};

// A configuration field out of its domain (rank 0, top_k > num_experts, alpha <= 0, ...).
class config_error : public error {
public:
  explicit config_error(const std::string& what) : error("molora config error: " + what) {}
};

// A tensor whose shape disagrees with the layer (x columns, y shape, weight shapes, ...).
class shape_error : public error {
public:
  explicit shape_error(const std::string& what) : error("molora shape error: " + what) {}
};

// A value that is not finite where a finite one is required, or an invalid routing entry.
class numeric_error : public error {
public:
  explicit numeric_error(const std::string& what) : error("molora numeric error: " + what) {}
};

// A file (safetensors, config JSON, checkpoint layout) that is malformed or disagrees with
// the layer it is loaded into.
class format_error : public error {
public:
  explicit format_error(const std::string& what) : error("molora format error: " + what) {}
};

namespace detail {

// Concatenates its arguments with operator<< into one string; used to build messages.
template <class... Parts>
std::string cat(const Parts&... parts) {
  std::ostringstream os;
  (os << ... << parts);
  return os.str();
}

// "field: expected E, got A"
template <class Expected, class Actual>
std::string mismatch(const std::string& field, const Expected& expected, const Actual& actual) {
  return cat(field, ": expected ", expected, ", got ", actual);
}

// "[rows, cols]"
template <class I>
std::string shape_str(I rows, I cols) {
  return cat("[", rows, ", ", cols, "]");
}

}  // namespace detail
}  // namespace molora
