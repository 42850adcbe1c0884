# Installs hatch into a fresh prefix, then configures, builds and runs the consumer against it.
#   cmake -DBUILD=<hatch build> -DSOURCE=<this dir> -DWORK=<scratch> [-DARGS=<configure args>]
#         [-DCONFIGURE_ONLY=ON] -P run.cmake
file(REMOVE_RECURSE ${WORK})
execute_process(COMMAND ${CMAKE_COMMAND} --install ${BUILD} --prefix ${WORK}/prefix RESULT_VARIABLE rc)
if(rc)
  message(FATAL_ERROR "install failed")
endif()
separate_arguments(extra UNIX_COMMAND "${ARGS}")
execute_process(COMMAND ${CMAKE_COMMAND} -S ${SOURCE} -B ${WORK}/build -DCMAKE_PREFIX_PATH=${WORK}/prefix
                        -DCMAKE_BUILD_TYPE=Release ${extra} RESULT_VARIABLE rc)
if(rc)
  message(FATAL_ERROR "configure against the installed hatch failed")
endif()
if(CONFIGURE_ONLY)
  return()
endif()
execute_process(COMMAND ${CMAKE_COMMAND} --build ${WORK}/build RESULT_VARIABLE rc)
if(rc)
  message(FATAL_ERROR "build against the installed hatch failed")
endif()
file(GLOB programs ${WORK}/build/consumer ${WORK}/build/consumer_cuda ${WORK}/build/consumer_mpi
                   ${WORK}/build/consumer_nccl)
foreach(program ${programs})
  execute_process(COMMAND ${program} RESULT_VARIABLE rc)
  if(rc)
    message(FATAL_ERROR "the consumer program ${program} failed")
  endif()
endforeach()
