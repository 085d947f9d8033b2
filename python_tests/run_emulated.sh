#!/usr/bin/env bash
# Runs the emulated CUDA kernel tests (pytest -m emulated): the CUDA kernel sources compiled by
# the host compiler against the SIMT emulation layer (csrc/emu), under AddressSanitizer.
# The ASan runtime must be the first library in the process, so this is a separate pytest run
# with LD_PRELOAD set (libstdc++ too, so ASan can intercept C++ exceptions); csrc/emu/emulation.py
# says what to set. Extra arguments go to pytest, e.g. `bash python_tests/run_emulated.sh -k mma -x`
# or `bash python_tests/run_emulated.sh python_tests/test_emulator.py`.
# GAM_EMU_ASAN=0 runs the same tests without ASan (no bounds checking).
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-.venv/bin/python}
[[ -x "$PY" ]] || PY=python3

# ASAN_OPTIONS and LD_PRELOAD (nothing with GAM_EMU_ASAN=0); fails when there is no libasan.
ENV_EXPORTS=$("$PY" csrc/emu/emulation.py shell-env)
eval "$ENV_EXPORTS"

# Test paths among the arguments replace the default python_tests folder.
paths=(python_tests)
for arg in "$@"; do
  if [[ "$arg" != -* && -e "${arg%%::*}" ]]; then
    paths=()
    break
  fi
done
exec "$PY" -m pytest "${paths[@]}" -m emulated "$@"
