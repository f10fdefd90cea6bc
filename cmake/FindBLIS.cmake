# FindBLIS: Debian's libblis-dev ships no pkg-config file, and puts blis.h
# under a flavour directory (blis-openmp, blis-pthread, blis-serial).
# Defines BLIS_FOUND, BLIS_INCLUDE_DIR, BLIS_LIBRARY, BLIS_STATIC_LIBRARY and
# the imported targets BLIS::BLIS (shared) and BLIS::BLIS_static.
find_path(BLIS_INCLUDE_DIR blis.h
  PATH_SUFFIXES blis blis-openmp blis-pthread blis-serial
  x86_64-linux-gnu/blis-openmp x86_64-linux-gnu/blis-pthread x86_64-linux-gnu/blis-serial)
find_library(BLIS_LIBRARY NAMES blis)
find_library(BLIS_STATIC_LIBRARY NAMES libblis.a)
include(FindPackageHandleStandardArgs)
find_package_handle_standard_args(BLIS REQUIRED_VARS BLIS_INCLUDE_DIR BLIS_LIBRARY BLIS_STATIC_LIBRARY)
if(BLIS_FOUND)
  # Which threading flavour the archive was built with decides what it needs
  # at link time; the openmp one needs libgomp. OpenMP is looked up for a
  # language the including project has enabled: a C++-only project that
  # finds hypertape (this file is installed with its package config) has no
  # C component, and libblis.a's GOMP_parallel would stay undefined.
  get_property(_blis_langs GLOBAL PROPERTY ENABLED_LANGUAGES)
  set(_blis_omp_lang C)
  if(NOT "C" IN_LIST _blis_langs AND "CXX" IN_LIST _blis_langs)
    set(_blis_omp_lang CXX)
  endif()
  find_package(OpenMP COMPONENTS ${_blis_omp_lang})
  if(NOT TARGET BLIS::BLIS)
    add_library(BLIS::BLIS UNKNOWN IMPORTED)
    set_target_properties(BLIS::BLIS PROPERTIES
      IMPORTED_LOCATION "${BLIS_LIBRARY}"
      INTERFACE_INCLUDE_DIRECTORIES "${BLIS_INCLUDE_DIR}")
  endif()
  if(NOT TARGET BLIS::BLIS_static)
    add_library(BLIS::BLIS_static STATIC IMPORTED)
    set(_blis_deps Threads::Threads m)
    if(OpenMP_${_blis_omp_lang}_FOUND)
      list(APPEND _blis_deps OpenMP::OpenMP_${_blis_omp_lang})
    endif()
    set_target_properties(BLIS::BLIS_static PROPERTIES
      IMPORTED_LOCATION "${BLIS_STATIC_LIBRARY}"
      INTERFACE_INCLUDE_DIRECTORIES "${BLIS_INCLUDE_DIR}"
      INTERFACE_LINK_LIBRARIES "${_blis_deps}")
  endif()
endif()
mark_as_advanced(BLIS_INCLUDE_DIR BLIS_LIBRARY BLIS_STATIC_LIBRARY)
