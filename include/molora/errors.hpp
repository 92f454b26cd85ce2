// Errors. Every failure a caller can cause (bad configuration, wrong shapes, non-finite
// numbers, malformed files, a moved-from layer, a workspace used by two calls at once) is
// reported as an exception derived from molora::error whose message names the field, the
// expected value and the actual one. Internal invariants use MOLORA_ASSERT, which a host may
// override before including molora. Also the workspace in-use guard (see WorkspaceGuard).
#pragma once

#include <atomic>
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

// An object in a state that does not allow the call: a moved-from layer, or a workspace
// (or tape) that another call is still using.
class state_error : public error {
public:
  explicit state_error(const std::string& what) : error("molora state error: " + what) {}
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

// The workspace in-use check. A workspace or tape written by two calls at once (two threads,
// or a call re-entered from inside another) corrupts memory; with the check on, every call
// that writes one holds its flag and a second call throws state_error instead. On by default
// when NDEBUG is not defined; MOLORA_CHECK_WORKSPACE turns it on in any build,
// MOLORA_NO_CHECK_WORKSPACE turns it off. The flag is in every build so that translation
// units compiled either way agree on the workspaces' layout.
#if !defined(MOLORA_NO_CHECK_WORKSPACE) && (defined(MOLORA_CHECK_WORKSPACE) || !defined(NDEBUG))
#define MOLORA_DETAIL_CHECK_WORKSPACE 1
#else
#define MOLORA_DETAIL_CHECK_WORKSPACE 0
#endif

namespace detail {

// One bool, copyable so that a workspace stays copyable and movable: a copy is not in use.
class InUseFlag {
public:
  InUseFlag() = default;
  InUseFlag(const InUseFlag&) noexcept {}
  InUseFlag& operator=(const InUseFlag&) noexcept { return *this; }

  bool try_acquire() noexcept { return !busy_.exchange(true, std::memory_order_acquire); }
  void release() noexcept { busy_.store(false, std::memory_order_release); }
  bool in_use() const noexcept { return busy_.load(std::memory_order_relaxed); }

private:
  std::atomic<bool> busy_{false};
};

// Holds a workspace's flag for its scope (released on return and on throw). Throws
// state_error naming the workspace if the flag is already held. A no-op with the check off.
class WorkspaceGuard {
public:
  WorkspaceGuard(InUseFlag& flag, const char* workspace) : flag_(flag) {
#if MOLORA_DETAIL_CHECK_WORKSPACE
    if (!flag_.try_acquire())
      throw state_error(cat(workspace, ": expected a workspace no other call is using, got one already in use "
                                       "(by another thread, or by a re-entrant call); use one per thread"));
#else
    (void)workspace;
    (void)flag_;  // clang: -Wunused-private-field with the check off
#endif
  }
  ~WorkspaceGuard() {
#if MOLORA_DETAIL_CHECK_WORKSPACE
    flag_.release();
#endif
  }
  WorkspaceGuard(const WorkspaceGuard&) = delete;
  WorkspaceGuard& operator=(const WorkspaceGuard&) = delete;

private:
  InUseFlag& flag_;
};

}  // namespace detail
}  // namespace molora
