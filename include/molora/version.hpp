// molora version. CMake reads the three numbers below; keep them on their own lines.
#pragma once

#define MOLORA_VERSION_MAJOR 0
#define MOLORA_VERSION_MINOR 1
#define MOLORA_VERSION_PATCH 0

#define MOLORA_VERSION_STRING "0.1.0"
