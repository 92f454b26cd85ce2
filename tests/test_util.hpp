// Helpers shared by the tests (next to reference.hpp, which holds the loop-by-loop
// references): a layer configuration in one call, random fills, central finite differences
// for the gradient checks, bitwise comparison, scratch directories and files that clean up
// after themselves, and the message of an expected exception.
#pragma once

#include <doctest/doctest.h>

#include <algorithm>
#include <cstring>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <exception>
#include <filesystem>
#include <fstream>
#include <initializer_list>
#include <iterator>
#include <random>
#include <string>
#include <system_error>
#include <vector>

#include <unistd.h>

#include <molora/config.hpp>
#include <molora/errors.hpp>
#include <molora/random.hpp>
#include <molora/types.hpp>

namespace test_util {

// A MoLoRAConfig with the given sizes and the other fields at their defaults.
inline molora::MoLoRAConfig config(molora::Index in, molora::Index out, molora::Index E, molora::Index k,
                                   molora::Index r) {
  molora::MoLoRAConfig c;
  c.in_features = in;
  c.out_features = out;
  c.num_experts = E;
  c.top_k = k;
  c.rank = r;
  return c;
}

// True if a and b have the same shape and the same bytes (NaNs and signed zeros included).
template <class A, class B>
bool same_bits(const A& a, const B& b) {
  static_assert(sizeof(*a.data()) == sizeof(*b.data()), "same_bits compares matrices of one scalar type");
  return a.rows() == b.rows() && a.cols() == b.cols() &&
         std::memcmp(a.data(), b.data(), sizeof(*a.data()) * static_cast<std::size_t>(a.size())) == 0;
}

// m = scale * N(0, 1), entry by entry in row order (any Eigen matrix, Map or block).
template <class M>
void fill(M& m, molora::Generator& gen, double scale) {
  for (molora::Index i = 0; i < m.rows(); ++i)
    for (molora::Index j = 0; j < m.cols(); ++j)
      m(i, j) = static_cast<typename M::Scalar>(scale * molora::detail::normal01(gen));
}

// Max |fd - analytic| / max(1, max |analytic|) over the entries of one tensor, by central
// differences of f() (h = 1e-6, double). value is perturbed in place and restored.
template <class F>
double fd_error(Eigen::Map<molora::Vector<double>> value, const Eigen::Ref<const molora::Vector<double>>& analytic,
                F&& f) {
  const double h = 1e-6;
  double err = 0;
  const double scale = std::max(1.0, analytic.cwiseAbs().maxCoeff());
  for (molora::Index i = 0; i < value.size(); ++i) {
    const double keep = value(i);
    value(i) = keep + h;
    const double lp = f();
    value(i) = keep - h;
    const double lm = f();
    value(i) = keep;
    err = std::max(err, std::abs((lp - lm) / (2 * h) - analytic(i)) / scale);
  }
  return err;
}

// A fresh directory under the system temp dir, unique per process and instance, removed
// with everything in it at scope exit.
struct TempDir {
  std::filesystem::path path;
  TempDir() {
    static std::atomic<int> counter{0};
    std::random_device rd;
    path = std::filesystem::temp_directory_path() / ("molora_test_" + std::to_string(::getpid()) + "_" +
                                                     std::to_string(rd()) + "_" + std::to_string(counter++));
    std::filesystem::create_directories(path);
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path, ec);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;

  // The path of `name` inside the directory (not created).
  std::string file(const std::string& name) const { return (path / name).string(); }
  // Writes text to `name` inside the directory and returns its path.
  std::string write(const std::string& name, const std::string& text) const {
    const std::string p = file(name);
    std::ofstream(p, std::ios::trunc) << text;
    return p;
  }
};

inline std::string read_text(const std::string& p) {
  std::ifstream in(p);
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

inline void write_text(const std::string& p, const std::string& s) { std::ofstream(p, std::ios::trunc) << s; }

inline std::vector<std::uint8_t> read_bytes(const std::string& p) {
  std::ifstream in(p, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

inline void write_bytes(const std::string& p, const std::vector<std::uint8_t>& bytes) {
  std::ofstream out(p, std::ios::binary | std::ios::trunc);
  out.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
}

// The message of the E that f() throws; fails the test (and returns "") if f throws nothing.
template <class E, class F>
std::string message_of(F&& f) {
  try {
    f();
  } catch (const E& e) {
    return e.what();
  }
  FAIL("expected an exception");
  return {};
}

// The message of the molora::format_error that f() throws; fails the test (and returns "")
// if f throws something else or nothing.
template <class F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const molora::format_error& e) {
    return e.what();
  } catch (const std::exception& e) {
    FAIL("expected molora::format_error, got another exception: " << e.what());
  }
  FAIL("expected molora::format_error, nothing was thrown");
  return {};
}

// CHECKs that msg contains each of parts (the message is shown on failure).
inline void check_contains(const std::string& msg, std::initializer_list<const char*> parts) {
  for (const char* p : parts) {
    INFO("message: " << msg);
    CHECK(msg.find(p) != std::string::npos);
  }
}

// max |got - want| / max(1e-30, max |want|), in double.
template <class A, class B>
double rel(const A& got, const B& want) {
  return double((got.template cast<double>() - want.template cast<double>()).cwiseAbs().maxCoeff()) /
         std::max(1e-30, double(want.template cast<double>().cwiseAbs().maxCoeff()));
}

// Copies the files of directory from into to (created if missing).
inline void copy_dir(const std::string& from, const std::string& to) {
  std::filesystem::create_directories(to);
  for (const auto& e : std::filesystem::directory_iterator(from))
    std::filesystem::copy_file(e.path(), std::filesystem::path(to) / e.path().filename());
}

}  // namespace test_util
