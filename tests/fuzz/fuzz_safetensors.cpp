// libFuzzer target: parse arbitrary bytes as a safetensors file, then read every tensor as a
// float matrix (and, where the dtype allows, a zero-copy view). molora::error is the only
// exception allowed out of the reader; anything else reaching libFuzzer is a bug.
#include <cstddef>
#include <cstdint>

#include <molora/io/safetensors.hpp>

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  try {
    molora::io::SafetensorsReader reader(data, size);
    for (const auto& name : reader.names()) {
      const auto& info = reader.info(name);
      try {
        auto m = reader.matrix<float>(name);
        if (m.size() != static_cast<molora::Index>(info.numel)) __builtin_trap();
      } catch (const molora::error&) {
      }
      try {
        auto v = reader.view<float>(name);
        volatile float sink = v.size() ? v(0, 0) : 0.0f;
        (void)sink;
      } catch (const molora::error&) {
      }
      try {
        (void)reader.vector<double>(name);
      } catch (const molora::error&) {
      }
    }
    (void)reader.metadata();
  } catch (const molora::error&) {
  }
  return 0;
}
