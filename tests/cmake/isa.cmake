# The kernels' ISA chosen at run time (molora::kernels, MOLORA_DISPATCH):
#  - the kernel, strategy and backward-kernel tests, and the layer and loader tests whose
#    16-bit weights reach the kernels, run once per ISA this CPU has, in the same binaries,
#    forced by the environment variable MOLORA_ISA (their plain runs take the best ISA);
#  - test_dispatch, built without -march, checks that the best ISA the CPU reports is the
#    one chosen, forcing, and that its results equal bitwise those of test_dispatch_native,
#    the same source built with -march=native and the ISA pinned at compile time
#    (MOLORA_PIN_ISA), which runs first (ctest fixture) and writes them to the build tree
#    (not in a sanitizer build);
#  - test_isa_symbols checks that each ISA object of the library exports its table only, and
#    that test_dispatch and test_strategies hold no kernel compiled for their own ISA.
# Without the library (MOLORA_DISPATCH=OFF, not x86-64), the tests run the compile-time ISA.

function(molora_quiet_gcc_intrinsics target)
  # GCC 12 reports -Wmaybe-uninitialized inside Eigen's and xsimd's AVX-512 intrinsics.
  if(CMAKE_CXX_COMPILER_ID STREQUAL "GNU")
    target_compile_options(${target} PRIVATE -Wno-maybe-uninitialized)
  endif()
endfunction()

foreach(_t test_kernels test_strategies test_backward_kernels test_base_kernels test_gemm_kernels test_linear test_threads test_no_alloc test_half_adapter)
  molora_test_program(_program ${_t})
  if(_program)
    molora_quiet_gcc_intrinsics(${_program})
  endif()
endforeach()

if(NOT TARGET molora::kernels)
  return()
endif()

# The ISAs this CPU has, by /proc/cpuinfo's flags (the flags each ISA object is built with).
set(_molora_cpu_avx512 avx512f avx512bw avx512dq avx512vl avx2 fma f16c)
set(_molora_cpu_avx2 avx2 fma f16c)
set(_molora_cpu_sse4.2 sse4_2)
set(_molora_cpu_scalar "")
set(_molora_cpuinfo "")
if(EXISTS /proc/cpuinfo)
  file(READ /proc/cpuinfo _molora_cpuinfo)
endif()
set(MOLORA_CPU_ISAS "")
foreach(_isa avx512 avx2 sse4.2 scalar)
  set(_has ON)
  foreach(_flag IN LISTS _molora_cpu_${_isa})
    if(NOT _molora_cpuinfo MATCHES "[ \t]${_flag}[ \n]")
      set(_has OFF)
    endif()
  endforeach()
  if(_has AND NOT _isa IN_LIST MOLORA_BUILT_ISAS)
    message(STATUS "molora: ${_isa} is not in MOLORA_KERNEL_ISAS; not built, not tested")
  elseif(_has)
    list(APPEND MOLORA_CPU_ISAS ${_isa})
  else()
    message(STATUS "molora: this CPU lacks ${_isa}; its kernels are built but not tested")
  endif()
endforeach()

# The sanitizer build in CI turns these off (its plain runs take the best ISA).
option(MOLORA_ISA_TESTS "Run the kernel tests (and the layer/loader tests that reach them) once per ISA" ON)
foreach(_t test_kernels test_strategies test_backward_kernels test_base_kernels test_gemm_kernels test_linear test_half_adapter
           test_adapter_set test_adapter_set_io test_peft test_mixlora test_ming_moe)
  if(NOT MOLORA_ISA_TESTS)
    break()
  endif()
  if(NOT TEST ${_t})
    continue()
  endif()
  foreach(_isa IN LISTS MOLORA_CPU_ISAS)
    molora_test_command(_command ${_t})
    add_test(NAME ${_t}_${_isa} COMMAND ${_command})
    set_tests_properties(${_t}_${_isa} PROPERTIES ENVIRONMENT MOLORA_ISA=${_isa})
  endforeach()
endforeach()

# A sanitizer build skips the native twin: the bitwise comparison is the plain build's, at the
# same flags as the ISA objects, while compiling every kernel a second time with
# sanitizers took 1.5-2 minutes of CI's clang build.
molora_add_test(test_dispatch ${CMAKE_CURRENT_SOURCE_DIR}/test_dispatch.cpp)
string(REPLACE ";" "," _molora_built_isas "${MOLORA_BUILT_ISAS}")
target_compile_definitions(test_dispatch PRIVATE MOLORA_BUILT_ISAS="${_molora_built_isas}")
molora_quiet_gcc_intrinsics(test_dispatch)
if(NOT MOLORA_SANITIZE)
  set(_molora_dispatch_outputs ${CMAKE_CURRENT_BINARY_DIR}/dispatch_native_outputs.bin)
  target_compile_definitions(test_dispatch PRIVATE MOLORA_DISPATCH_OUTPUTS="${_molora_dispatch_outputs}")
  molora_add_test(test_dispatch_native ${CMAKE_CURRENT_SOURCE_DIR}/test_dispatch.cpp)
  target_compile_definitions(test_dispatch_native PRIVATE MOLORA_PIN_ISA MOLORA_DISPATCH_OUTPUTS="${_molora_dispatch_outputs}")
  # Built at the build type's optimisation, as the ISA objects are, without MOLORA_TESTS_OPT:
  # gcc's -O2 and -O3 contract and vectorise some kernel loops differently, so the bits match
  # only at the same level.
  set_property(TARGET test_dispatch_native PROPERTY COMPILE_OPTIONS "")
  target_compile_options(test_dispatch_native PRIVATE -march=native)
  molora_quiet_gcc_intrinsics(test_dispatch_native)
  set_tests_properties(test_dispatch_native PROPERTIES FIXTURES_SETUP molora_native_outputs)
  set_tests_properties(test_dispatch PROPERTIES FIXTURES_REQUIRED molora_native_outputs)
endif()
foreach(_isa IN LISTS MOLORA_CPU_ISAS)
  add_test(NAME test_dispatch_${_isa} COMMAND test_dispatch)
  set_tests_properties(test_dispatch_${_isa} PROPERTIES ENVIRONMENT MOLORA_ISA=${_isa})
  if(NOT MOLORA_SANITIZE)
    set_tests_properties(test_dispatch_${_isa} PROPERTIES FIXTURES_REQUIRED molora_native_outputs)
  endif()
endforeach()

string(REPLACE ";" "|" _molora_isa_objects "${MOLORA_ISA_OBJECTS}")
add_test(NAME test_isa_symbols
  COMMAND ${CMAKE_COMMAND} -DNM=${CMAKE_NM} -DOBJECTS=${_molora_isa_objects}
    -DPROGRAMS=$<TARGET_FILE:test_dispatch>|$<TARGET_FILE:test_strategies>
    -P ${CMAKE_CURRENT_SOURCE_DIR}/cmake/isa_symbols.script)
