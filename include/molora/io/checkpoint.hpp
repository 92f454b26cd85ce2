// Every checkpoint format molora loads, one header each: PEFT LoRA (peft.hpp), MING-MOE
// (ming_moe.hpp) and MixLoRA (mixlora.hpp), each holding its config parser and its loader,
// plus the safetensors reader and writer they use (safetensors.hpp). Include this header
// for all of them, or the format you need.
#pragma once

#include "ming_moe.hpp"
#include "mixlora.hpp"
#include "peft.hpp"
#include "safetensors.hpp"
