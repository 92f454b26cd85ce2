# test_tenants (from the glob in tests/CMakeLists.txt) forwards on several threads while
# another swaps tenant snapshots. With MOLORA_TSAN_TESTS=ON, test_tenants_tsan runs the same
# file under ThreadSanitizer (std::threads only; use a build directory without
# MOLORA_SANITIZE, as for test_threads_tsan).
if(MOLORA_TSAN_TESTS AND (NOT MOLORA_SANITIZE OR MOLORA_SANITIZE STREQUAL "thread"))
  molora_add_test(test_tenants_tsan ${CMAKE_CURRENT_SOURCE_DIR}/test_tenants.cpp)
  target_compile_options(test_tenants_tsan PRIVATE -fsanitize=thread -g -O1)
  target_link_options(test_tenants_tsan PRIVATE -fsanitize=thread)
  if(CMAKE_CXX_COMPILER_ID STREQUAL "GNU")
    target_compile_options(test_tenants_tsan PRIVATE -Wno-maybe-uninitialized)
  endif()
  set_tests_properties(test_tenants_tsan PROPERTIES ENVIRONMENT "TSAN_OPTIONS=halt_on_error=1")
endif()
