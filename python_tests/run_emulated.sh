#!/usr/bin/env bash
# Runs the emulated CUDA kernel tests (pytest -m emulated): the CUDA kernel sources compiled by
# the host compiler against the SIMT emulation layer (csrc/emu), under AddressSanitizer.
# The ASan runtime must be the first library in the process, so this is a separate pytest run
# with LD_PRELOAD set (libstdc++ too, so ASan can intercept C++ exceptions). Extra arguments go
# to pytest, e.g. `bash python_tests/run_emulated.sh -k wmma -x` or
# `bash python_tests/run_emulated.sh python_tests/test_emulator.py`.
# GAM_EMU_ASAN=0 runs the same tests without ASan (no bounds checking).
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-.venv/bin/python}
[[ -x "$PY" ]] || PY=python3
CXX=${CXX:-g++}

if [[ "${GAM_EMU_ASAN:-1}" != "0" ]]; then
  asan=$("$CXX" -print-file-name=libasan.so)
  stdcxx=$("$CXX" -print-file-name=libstdc++.so)
  if [[ "$asan" != /* || ! -e "$asan" ]]; then
    echo "run_emulated.sh: $CXX has no libasan.so; install it or set GAM_EMU_ASAN=0" >&2
    exit 1
  fi
  # Keep in sync with ASAN_OPTIONS in gam_ext/_emulation.py.
  export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=0:detect_odr_violation=0:alloc_dealloc_mismatch=0:new_delete_type_mismatch=0:protect_shadow_gap=0:halt_on_error=1:abort_on_error=0}
  export LD_PRELOAD="$asan $stdcxx${LD_PRELOAD:+ $LD_PRELOAD}"
fi

# Test paths among the arguments replace the default python_tests folder.
paths=(python_tests)
for arg in "$@"; do
  if [[ "$arg" != -* && -e "${arg%%::*}" ]]; then
    paths=()
    break
  fi
done
exec "$PY" -m pytest "${paths[@]}" -m emulated "$@"
