# test_tenants (from the glob in tests/CMakeLists.txt) forwards on several threads while
# another swaps tenant snapshots. With MOLORA_TSAN_TESTS=ON, test_tenants_tsan runs the same
# file under ThreadSanitizer (std::threads only; use a build directory without
# MOLORA_SANITIZE, as for test_threads_tsan).
if(MOLORA_TSAN_TESTS AND (NOT MOLORA_SANITIZE OR MOLORA_SANITIZE STREQUAL "thread"))
  molora_add_test(test_tenants_tsan ${CMAKE_CURRENT_SOURCE_DIR}/test_tenants.cpp)
  target_compile_options(test_tenants_tsan PRIVATE -fsanitize=thread ${MOLORA_SANITIZER_DEBUG} -O1)
  target_link_options(test_tenants_tsan PRIVATE -fsanitize=thread)
  if(CMAKE_CXX_COMPILER_ID STREQUAL "GNU")
    target_compile_options(test_tenants_tsan PRIVATE -Wno-maybe-uninitialized)
  endif()
  set_tests_properties(test_tenants_tsan PROPERTIES ENVIRONMENT "TSAN_OPTIONS=halt_on_error=1")
  # test_adapter_store_tsan: the store's gets from several threads (adapter_store.hpp).
  if(TARGET molora::io)
    molora_add_test(test_adapter_store_tsan ${CMAKE_CURRENT_SOURCE_DIR}/test_adapter_store.cpp)
    target_compile_options(test_adapter_store_tsan PRIVATE -fsanitize=thread ${MOLORA_SANITIZER_DEBUG} -O1)
    target_link_options(test_adapter_store_tsan PRIVATE -fsanitize=thread)
    if(CMAKE_CXX_COMPILER_ID STREQUAL "GNU")
      target_compile_options(test_adapter_store_tsan PRIVATE -Wno-maybe-uninitialized)
    endif()
    set_tests_properties(test_adapter_store_tsan PROPERTIES ENVIRONMENT "TSAN_OPTIONS=halt_on_error=1")
  endif()
endif()

# test_adapter_set_omp: the set's tests with OpenMP, whose token ranges per thread must give
# the same bits as each adapter alone (the bitwise checks of test_adapter_set).
find_package(OpenMP QUIET)
if(OpenMP_CXX_FOUND)
  molora_add_test(test_adapter_set_omp ${CMAKE_CURRENT_SOURCE_DIR}/test_adapter_set.cpp)
  target_link_libraries(test_adapter_set_omp PRIVATE molora_native_flags OpenMP::OpenMP_CXX)
  target_compile_definitions(test_adapter_set_omp PRIVATE MOLORA_USE_OPENMP=1)
  set_tests_properties(test_adapter_set_omp PROPERTIES ENVIRONMENT "OMP_NUM_THREADS=3")
endif()
