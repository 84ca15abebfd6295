# CUDA build settings of aigc_ext: the shared nvcc flags, the gencode list, CUTLASS.
#
# Kept apart from CMakeLists.txt so that tests can run these functions with `cmake -P` and
# compare them with what `python -m aigc_ext.backends.cuda.compile_check` compiles with.

# The flags of csrc/cuda/nvcc_flags.txt, as a list (comments and blank lines dropped).
function(aigc_cuda_common_flags flags_file out_var)
  file(STRINGS "${flags_file}" lines)
  set(flags)
  foreach(line IN LISTS lines)
    string(REGEX REPLACE "#.*$" "" line "${line}")
    string(STRIP "${line}" line)
    if(NOT line STREQUAL "")
      list(APPEND flags "${line}")
    endif()
  endforeach()
  set(${out_var} ${flags} PARENT_SCOPE)
endfunction()

# -gencode flags for an AIGC_EXT_CUDA_ARCHS list such as "80+PTX;90a": each entry NN or NNa
# gives real code (-gencode=arch=compute_NN,code=sm_NN); a "+PTX" suffix adds that
# architecture's PTX (code=compute_NN), which the driver compiles for newer GPUs. Entries may be
# separated by ';', ',' or spaces.
#
# HOPPER_ONLY: the flags for csrc/cuda/sm90, whose kernels hold code only on sm_90a (their
# bodies are guarded by __CUDA_ARCH_FEAT_SM90_ALL): the 90a entries alone when the list has
# any; otherwise the list's real-code entries without PTX, so that no GPU ever JIT-compiles the
# kernels' empty fallback bodies (sm90_fwd_compiled() then reports false and the sm80 kernels
# serve).
function(aigc_cuda_gencode_flags archs hopper_only out_var)
  string(REGEX REPLACE "[ ,]+" ";" archs "${archs}")
  set(all)
  set(real)
  set(hopper)
  foreach(entry IN LISTS archs)
    if(entry STREQUAL "")
      continue()
    endif()
    if(NOT entry MATCHES "^([0-9]+a?)(\\+PTX)?$")
      message(FATAL_ERROR "AIGC_EXT_CUDA_ARCHS: '${entry}' is not an architecture such as 80, "
                          "90a or 80+PTX (the whole list: '${archs}')")
    endif()
    set(sm "${CMAKE_MATCH_1}")
    set(flag "-gencode=arch=compute_${sm},code=sm_${sm}")
    list(APPEND all "${flag}")
    list(APPEND real "${flag}")
    if(sm STREQUAL "90a")
      list(APPEND hopper "${flag}")
    endif()
    if(CMAKE_MATCH_2)
      list(APPEND all "-gencode=arch=compute_${sm},code=compute_${sm}")
    endif()
  endforeach()
  if(NOT all)
    message(FATAL_ERROR "AIGC_EXT_CUDA_ARCHS is empty: name at least one architecture, e.g. 80+PTX;90a")
  endif()
  if(hopper_only)
    if(hopper)
      set(all ${hopper})
    else()
      set(all ${real})
    endif()
  endif()
  set(${out_var} ${all} PARENT_SCOPE)
endfunction()

# The CUTLASS/CuTe include directory: AIGC_EXT_CUTLASS_INCLUDE (CMake variable or environment
# variable), else cutlass_library/source/include of the nvidia-cutlass wheel installed for
# `python` (found without importing it), else a fatal error naming both.
function(aigc_cuda_find_cutlass python out_var)
  set(dir "${AIGC_EXT_CUTLASS_INCLUDE}")
  if(dir STREQUAL "" AND DEFINED ENV{AIGC_EXT_CUTLASS_INCLUDE})
    set(dir "$ENV{AIGC_EXT_CUTLASS_INCLUDE}")
  endif()
  if(NOT dir STREQUAL "")
    if(NOT EXISTS "${dir}/cute/tensor.hpp")
      message(FATAL_ERROR "AIGC_EXT_CUTLASS_INCLUDE=${dir} holds no cute/tensor.hpp: point it at "
                          "CUTLASS's include directory")
    endif()
    set(${out_var} "${dir}" PARENT_SCOPE)
    return()
  endif()
  if(python)
    execute_process(
      COMMAND "${python}" -c "import importlib.util as u, os; s = u.find_spec('cutlass_library'); print(os.path.join(s.submodule_search_locations[0], 'source', 'include') if s else '')"
      OUTPUT_VARIABLE dir OUTPUT_STRIP_TRAILING_WHITESPACE ERROR_QUIET)
  endif()
  if(dir STREQUAL "" OR NOT EXISTS "${dir}/cute/tensor.hpp")
    message(FATAL_ERROR "CUTLASS headers not found: set AIGC_EXT_CUTLASS_INCLUDE to CUTLASS's "
                        "include directory, or install the nvidia-cutlass wheel "
                        "(pip install nvidia-cutlass==4.2.0.0; its headers are in "
                        "cutlass_library/source/include) for ${python}")
  endif()
  set(${out_var} "${dir}" PARENT_SCOPE)
endfunction()
