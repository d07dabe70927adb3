# Which ExecuTorch libraries ane_runner links, and how.
#
# Kernels and backends register themselves from static initializers: nothing
# in ane_runner calls into them, so a default link would drop them and loading
# a program would fail with "kernel not found" / "backend not registered".
# The wheel ships them as shared libraries, kept with --no-as-needed (its
# package config does that); a static archive (Core ML's coremldelegate from a
# source build) needs a whole-archive link.

# Components of the wheel's package: the runtime (with extension/module and
# extension/tensor in it), the CPU kernels, the XNNPACK backend, its threads.
set(_ane_components kernels_optimized backend_xnnpack threadpool)
if(ANE_RUNNER_COREML)
  list(APPEND _ane_components backend_coreml)
endif()

function(ane_runner_link_executorch target)
  # The package config applies these through its imported targets, but on
  # CMake < 3.28 it has none and only offers variables.
  # SYSTEM: their deprecation warnings are upstream's, not ours.
  target_include_directories(${target} SYSTEM PRIVATE ${EXECUTORCH_INCLUDE_DIRS})
  target_compile_definitions(${target} PRIVATE ${EXECUTORCH_COMPILE_DEFINITIONS})
  if(TARGET executorch::runtime)
    _ane_link_targets(${target})
  else()
    _ane_link_paths(${target})
  endif()
  _ane_link_coreml(${target})
  # The wheel's lib/, found from the build tree and from an install.
  get_filename_component(lib_dir "${EXECUTORCH_RUNTIME_LIBRARY_DIR}" REALPATH)
  set_target_properties(${target} PROPERTIES BUILD_RPATH "${lib_dir}" INSTALL_RPATH "${lib_dir}")
endfunction()

# CMake >= 3.28: executorch::<component> targets, each carrying its rpath and
# its --no-as-needed.
function(_ane_link_targets target)
  target_link_libraries(${target} PRIVATE executorch::runtime)
  foreach(component IN LISTS _ane_components)
    if(TARGET executorch::${component})
      target_link_libraries(${target} PRIVATE executorch::${component})
    elseif(NOT component STREQUAL "backend_coreml")
      message(WARNING "this ExecuTorch package has no ${component}; programs needing it will not load")
    endif()
  endforeach()
endfunction()

# CMake < 3.28: EXECUTORCH_LIBRARIES lists every shipped library by path
# (components already wrapped in --no-as-needed on Linux); keep ours.
function(_ane_link_paths target)
  string(REPLACE ";" "|" names "${_ane_components}")
  set(libs ${EXECUTORCH_LIBRARIES})
  list(FILTER libs INCLUDE REGEX "libexecutorch(_(${names}))?\\.(so|dylib)")
  if(NOT libs)
    message(FATAL_ERROR "no ExecuTorch runtime library in EXECUTORCH_LIBRARIES: ${EXECUTORCH_LIBRARIES}")
  endif()
  target_link_libraries(${target} PRIVATE ${libs})
endfunction()

# The wheel for macOS ships backend_coreml (linked above). A source build of
# ExecuTorch installs coremldelegate, a static archive instead. Not buildable
# on Linux, so this branch is untested there.
function(_ane_link_coreml target)
  if(NOT ANE_RUNNER_COREML)
    return()
  endif()
  if(TARGET executorch::backend_coreml OR EXECUTORCH_LIBRARIES MATCHES "libexecutorch_backend_coreml")
    return()
  endif()
  if(NOT TARGET coremldelegate)
    find_package(coremldelegate CONFIG QUIET)
  endif()
  if(NOT TARGET coremldelegate)
    message(FATAL_ERROR "ANE_RUNNER_COREML is ON but this ExecuTorch has no Core ML backend "
                        "(backend_coreml or coremldelegate); configure with -DANE_RUNNER_COREML=OFF")
  endif()
  target_link_libraries(${target} PRIVATE "$<LINK_LIBRARY:WHOLE_ARCHIVE,coremldelegate>"
                        "-framework CoreML" "-framework Foundation" "-framework Accelerate")
endfunction()
