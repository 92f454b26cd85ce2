# Every public header included in two translation units of one program (ODR check). The io
# headers are among them, so the check needs molora::io.
if(NOT TARGET molora::io)
  message(STATUS "molora: test_odr skipped (needs molora::io)")
  return()
endif()
file(GLOB_RECURSE _molora_public_headers CONFIGURE_DEPENDS ${PROJECT_SOURCE_DIR}/include/molora/*.hpp)
set(_molora_odr_includes "")
foreach(h IN LISTS _molora_public_headers)
  file(RELATIVE_PATH rel ${PROJECT_SOURCE_DIR}/include ${h})
  string(APPEND _molora_odr_includes "#include <${rel}>\n")
endforeach()
foreach(tu a b)
  file(WRITE ${CMAKE_CURRENT_BINARY_DIR}/odr_all_${tu}.cpp.in "${_molora_odr_includes}")
  configure_file(${CMAKE_CURRENT_BINARY_DIR}/odr_all_${tu}.cpp.in ${CMAKE_CURRENT_BINARY_DIR}/odr_all_${tu}.cpp COPYONLY)
endforeach()
add_executable(test_odr ${CMAKE_CURRENT_SOURCE_DIR}/odr/odr_a.cpp ${CMAKE_CURRENT_SOURCE_DIR}/odr/odr_b.cpp
  ${CMAKE_CURRENT_BINARY_DIR}/odr_all_a.cpp ${CMAKE_CURRENT_BINARY_DIR}/odr_all_b.cpp)
target_link_libraries(test_odr PRIVATE molora::io molora_dev_flags)
# The tests' own optimisation (MOLORA_TESTS_OPT), as every other test: its two layer forwards
# instantiate every kernel inline (it does not link molora::kernels).
target_compile_options(test_odr PRIVATE ${MOLORA_TESTS_OPT})
add_test(NAME test_odr COMMAND test_odr)
