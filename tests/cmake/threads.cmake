# test_threads (from the glob in tests/CMakeLists.txt) checks concurrent const forwards.
# test_threads_omp builds the same file with OpenMP, whatever MOLORA_OPENMP says, and adds
# the 1-vs-2-threads bitwise check. With MOLORA_TSAN_TESTS=ON, test_threads_tsan runs both
# under ThreadSanitizer; use a build directory without MOLORA_SANITIZE. GCC's libgomp is not
# TSan-aware (its barriers look like races), so the TSan target uses OpenMP only with Clang
# (LLVM's libomp, plus the Archer tool when found) and otherwise runs with std::threads only
# (MOLORA_TSAN_GNU_OPENMP=ON forces OpenMP with GCC too).
option(MOLORA_TSAN_TESTS "Build test_threads_tsan (ThreadSanitizer)" OFF)
option(MOLORA_TSAN_GNU_OPENMP "test_threads_tsan: use OpenMP with GCC too (libgomp: false positives)" OFF)

find_package(OpenMP QUIET)

function(molora_threads_openmp target)
  target_link_libraries(${target} PRIVATE OpenMP::OpenMP_CXX)
  target_compile_definitions(${target} PRIVATE MOLORA_USE_OPENMP=1)
endfunction()

if(OpenMP_CXX_FOUND)
  molora_add_test(test_threads_omp ${CMAKE_CURRENT_SOURCE_DIR}/test_threads.cpp)
  target_link_libraries(test_threads_omp PRIVATE molora_native_flags)
  molora_threads_openmp(test_threads_omp)
  if(COMMAND molora_quiet_gcc_intrinsics)
    molora_quiet_gcc_intrinsics(test_threads_omp)
  elseif(CMAKE_CXX_COMPILER_ID STREQUAL "GNU")
    target_compile_options(test_threads_omp PRIVATE -Wno-maybe-uninitialized)
  endif()
endif()

if(MOLORA_TSAN_TESTS)
  if(MOLORA_SANITIZE AND NOT MOLORA_SANITIZE STREQUAL "thread")
    message(WARNING "molora: MOLORA_TSAN_TESTS needs a build without MOLORA_SANITIZE=${MOLORA_SANITIZE}; skipped")
  else()
    molora_add_test(test_threads_tsan ${CMAKE_CURRENT_SOURCE_DIR}/test_threads.cpp)
    target_compile_options(test_threads_tsan PRIVATE -fsanitize=thread ${MOLORA_SANITIZER_DEBUG} -O1)
    target_link_options(test_threads_tsan PRIVATE -fsanitize=thread)
    if(CMAKE_CXX_COMPILER_ID STREQUAL "GNU")
      target_compile_options(test_threads_tsan PRIVATE -Wno-maybe-uninitialized)
    endif()
    # ignore_noninstrumented_modules: the OpenMP runtime is not built with TSan; with
    # LLVM's libomp, the Archer tool (libarcher) tells TSan about its synchronisation.
    set(_molora_tsan_env "TSAN_OPTIONS=halt_on_error=1 ignore_noninstrumented_modules=1")
    if(OpenMP_CXX_FOUND AND (CMAKE_CXX_COMPILER_ID MATCHES "Clang" OR MOLORA_TSAN_GNU_OPENMP))
      molora_threads_openmp(test_threads_tsan)
      file(GLOB _molora_archer_hints /usr/lib/llvm-*/lib)
      find_library(MOLORA_ARCHER_LIBRARY archer HINTS ${_molora_archer_hints})
      if(MOLORA_ARCHER_LIBRARY AND CMAKE_CXX_COMPILER_ID MATCHES "Clang")
        list(APPEND _molora_tsan_env "OMP_TOOL_LIBRARIES=${MOLORA_ARCHER_LIBRARY}")
      endif()
    endif()
    set_tests_properties(test_threads_tsan PROPERTIES ENVIRONMENT "${_molora_tsan_env}")
  endif()
endif()
