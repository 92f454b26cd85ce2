// Helpers shared by the checkpoint-format tests (test_peft, test_ming_moe, test_mixlora): they
// use molora::io and nlohmann-json, so they live apart from test_util.hpp, which the core
// tests include without linking molora::io.
#pragma once

#include <doctest/doctest.h>
#include <nlohmann/json.hpp>

#include <initializer_list>
#include <string>
#include <utility>
#include <vector>

#include <molora/io/safetensors.hpp>

#include "test_util.hpp"

namespace io_test_util {

// Rewrites a safetensors file keeping the tensors that `keep` accepts, renamed by `rename`.
template <class Keep, class Rename>
void rewrite(const std::string& from, const std::string& to, Keep keep, Rename rename) {
  const molora::io::SafetensorsReader r(from);
  std::vector<molora::io::TensorToWrite> out;
  for (const auto& n : r.names())
    if (keep(n)) {
      const auto& info = r.info(n);
      out.push_back(molora::io::make_tensor_raw(rename(n), info.dtype, info.shape, r.bytes(n)));
    }
  molora::io::save_safetensors(to, std::move(out));
}

// `base` (JSON text) with `patch` merged in (a null value in patch removes the key).
inline std::string edited(const char* base, const nlohmann::json& patch) {
  nlohmann::json j = nlohmann::json::parse(base);
  for (auto it = patch.begin(); it != patch.end(); ++it) {
    if (it.value().is_null())
      j.erase(it.key());
    else
      j[it.key()] = it.value();
  }
  return j.dump();
}

// Checks that Config::from_string(text) throws a format_error naming the file and each of parts.
template <class Config>
void check_error(const std::string& text, std::initializer_list<const char*> parts) {
  const std::string msg = test_util::error_of([&] { (void)Config::from_string(text, "cfg.json"); });
  test_util::check_contains(msg, {"cfg.json"});
  test_util::check_contains(msg, parts);
}

}  // namespace io_test_util
