# ctest: install molora into a temporary prefix, then configure, build and run a small
# consumer project against it with find_package(molora CONFIG COMPONENTS io), linking
# molora::io (it saves and reloads a checkpoint) and molora::kernels when this build has it
# (MOLORA_DISPATCH). Needs molora::io.
if(NOT TARGET molora::io)
  message(STATUS "molora: test_install_consumer skipped (needs molora::io)")
  return()
endif()
add_test(NAME test_install_consumer
  COMMAND ${CMAKE_COMMAND}
    -DSOURCE_DIR=${PROJECT_SOURCE_DIR}
    -DWORK_DIR=${CMAKE_CURRENT_BINARY_DIR}/install_check
    -DGENERATOR=${CMAKE_GENERATOR}
    -DCXX=${CMAKE_CXX_COMPILER}
    -DDISPATCH=${MOLORA_DISPATCH}
    -P ${CMAKE_CURRENT_SOURCE_DIR}/cmake/install_check.script)
