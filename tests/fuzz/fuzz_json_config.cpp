// libFuzzer target: feed arbitrary text to the three config parsers (PEFT LoRA, MixLoRA,
// MING-MOE). molora::error is the only exception allowed out; anything else is a bug.
#include <cstddef>
#include <cstdint>
#include <string>

#include <molora/io/json_config.hpp>

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);
  try {
    auto c = molora::io::PeftLoraConfig::from_string(text, "<fuzz>");
    if (!(c.lora.scaling() > 0)) __builtin_trap();
  } catch (const molora::error&) {
  }
  try {
    auto c = molora::io::MixLoRAConfig::from_string(text, "<fuzz>");
    if (c.top_k < 1 || c.top_k > c.num_experts) __builtin_trap();
  } catch (const molora::error&) {
  }
  try {
    auto c = molora::io::MingMoeConfig::from_string(text, "<fuzz>");
    if (c.num_experts_per_token < 1 || c.num_experts_per_token > c.num_experts) __builtin_trap();
  } catch (const molora::error&) {
  }
  return 0;
}
