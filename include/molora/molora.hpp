// molora: Mixture-of-LoRA-experts layers on Eigen. Include this one header.
#pragma once

#include "version.hpp"
#include "errors.hpp"
#include "types.hpp"
#include "random.hpp"
#include "config.hpp"
#include "lora.hpp"
#include "router.hpp"
#include "gating.hpp"
#include "dispatch.hpp"
#include "molora_linear.hpp"
#include "backward.hpp"
#include "losses.hpp"
#include "params.hpp"
#include "optim.hpp"
#include "mixlora_ffn.hpp"
