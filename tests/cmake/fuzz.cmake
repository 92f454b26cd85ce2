# libFuzzer targets (tests/fuzz/fuzz_*.cpp). Off by default; needs Clang:
#   cmake -S . -B build-fuzz -DCMAKE_CXX_COMPILER=clang++-14 -DMOLORA_BUILD_FUZZERS=ON
# tools/run_fuzz.sh does that and runs each target on a copy of tests/fuzz/corpus/<target>.
option(MOLORA_BUILD_FUZZERS "Build libFuzzer targets (Clang only)" OFF)

if(MOLORA_BUILD_FUZZERS)
  if(NOT TARGET molora::io)
    message(WARNING "molora: MOLORA_BUILD_FUZZERS needs molora::io (nlohmann-json); fuzzers skipped")
  elseif(NOT CMAKE_CXX_COMPILER_ID MATCHES "Clang")
    message(WARNING "molora: MOLORA_BUILD_FUZZERS needs Clang (have ${CMAKE_CXX_COMPILER_ID}); fuzzers skipped")
  else()
    file(GLOB _molora_fuzzers CONFIGURE_DEPENDS ${CMAKE_CURRENT_LIST_DIR}/../fuzz/fuzz_*.cpp)
    foreach(src IN LISTS _molora_fuzzers)
      get_filename_component(name ${src} NAME_WE)
      add_executable(${name} ${src})
      # Not molora_dev_flags: its MOLORA_SANITIZE setting would clash with the fuzzer's own.
      target_link_libraries(${name} PRIVATE molora::io)
      target_compile_options(${name} PRIVATE ${MOLORA_SANITIZER_DEBUG} -O1 -fno-omit-frame-pointer
                             -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined)
      target_link_options(${name} PRIVATE -fsanitize=fuzzer,address,undefined)
    endforeach()
  endif()
endif()
