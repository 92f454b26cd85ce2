# The kernel and strategy tests once more for each instruction set the kernels are written
# for, without -march=native (molora_add_test adds no ISA flags): SSE4.2, AVX2+FMA, AVX-512,
# and the scalar fallback (MOLORA_NO_XSIMD). Two translation units per ISA keep the build
# short on a small machine. A build whose ISA the host CPU lacks (per /proc/cpuinfo) is
# compiled but disabled in ctest.
#
# GCC 12 reports -Wmaybe-uninitialized inside Eigen's and xsimd's AVX-512 intrinsics at -O2
# and above (false positives in _mm512_extract*'s _mm256_undefined_*); it is silenced for
# these targets only.

set(_molora_kernel_test_sources
  ${CMAKE_CURRENT_SOURCE_DIR}/test_kernels.cpp
  ${CMAKE_CURRENT_SOURCE_DIR}/test_strategies.cpp
  ${CMAKE_CURRENT_SOURCE_DIR}/test_backward_kernels.cpp
  ${CMAKE_CURRENT_SOURCE_DIR}/test_base_kernels.cpp)

function(molora_quiet_gcc_intrinsics target)
  if(CMAKE_CXX_COMPILER_ID STREQUAL "GNU")
    target_compile_options(${target} PRIVATE -Wno-maybe-uninitialized)
  endif()
endfunction()

foreach(_t test_kernels test_strategies test_threads test_no_alloc test_base_kernels)
  if(TARGET ${_t})
    molora_quiet_gcc_intrinsics(${_t})
  endif()
endforeach()

# The sanitizer build in CI turns these off: they are the same sources as test_kernels and
# test_strategies, which it runs at the native ISA.
option(MOLORA_ISA_TESTS "Build the kernel tests once per ISA (SSE4.2, AVX2, AVX-512, scalar)" ON)

if(MOLORA_ISA_TESTS AND CMAKE_CXX_COMPILER_ID MATCHES "GNU|Clang" AND CMAKE_SYSTEM_PROCESSOR MATCHES "x86_64|AMD64|amd64")
  set(_molora_isa_sse42 -msse4.2)
  set(_molora_isa_avx2 -mavx2 -mfma)
  set(_molora_isa_avx512 -mavx512f -mavx512bw -mavx512dq -mavx512vl -mavx2 -mfma)
  # CPU flags (/proc/cpuinfo names) each build needs to run; on a host without them the
  # target is still built but not registered with ctest (it would die of SIGILL).
  set(_molora_cpu_sse42 sse4_2)
  set(_molora_cpu_avx2 avx2 fma)
  set(_molora_cpu_avx512 avx512f avx512bw avx512dq avx512vl)
  set(_molora_cpuinfo "")
  if(EXISTS /proc/cpuinfo)
    file(READ /proc/cpuinfo _molora_cpuinfo)
  endif()
  foreach(_isa sse42 avx2 avx512)
    molora_add_test(test_kernels_${_isa} ${_molora_kernel_test_sources})
    target_compile_options(test_kernels_${_isa} PRIVATE ${_molora_isa_${_isa}})
    molora_quiet_gcc_intrinsics(test_kernels_${_isa})
    foreach(_flag IN LISTS _molora_cpu_${_isa})
      if(_molora_cpuinfo AND NOT _molora_cpuinfo MATCHES "[ \t]${_flag}[ \n]")
        message(STATUS "molora: this CPU lacks ${_flag}; test_kernels_${_isa} is built but not run")
        set_tests_properties(test_kernels_${_isa} PROPERTIES DISABLED TRUE)
        break()
      endif()
    endforeach()
  endforeach()
endif()

if(MOLORA_ISA_TESTS)
  molora_add_test(test_kernels_scalar ${_molora_kernel_test_sources})
  target_compile_definitions(test_kernels_scalar PRIVATE MOLORA_NO_XSIMD)
  molora_quiet_gcc_intrinsics(test_kernels_scalar)
endif()
