// The checkpoint formats' JSON config parsers: PeftLoraConfig (peft.hpp), MixLoRAConfig
// (mixlora.hpp) and MingMoeConfig (ming_moe.hpp), each in its format's header beside its
// loader, on the shared field reader of json_fields.hpp. Kept so that code including this
// path compiles unchanged; new code includes the format it needs.
#pragma once

#include "json_fields.hpp"
#include "ming_moe.hpp"
#include "mixlora.hpp"
#include "peft.hpp"
