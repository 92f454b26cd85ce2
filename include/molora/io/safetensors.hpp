// safetensors reading and writing: the reader (safetensors_reader.hpp, over the byte sources
// of mapped_file.hpp) and the writer (safetensors_writer.hpp), both on the element types of
// dtype.hpp. Include this header for both, or the one you need.
#pragma once

#include "dtype.hpp"
#include "mapped_file.hpp"
#include "safetensors_reader.hpp"
#include "safetensors_writer.hpp"
