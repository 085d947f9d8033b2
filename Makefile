# Two commands do everything from a fresh clone: `make train` and `make test`.
# Each sets up what it needs (a virtual environment in .venv, the dependencies, the extension build)
# and redoes nothing that is already done.

SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMPS := .make

# With no GPU visible, build the CUDA sources for one architecture (+PTX): the compile check stays
# short. On a GPU machine torch builds for the visible GPU. An explicit TORCH_CUDA_ARCH_LIST wins.
ifeq ($(shell nvidia-smi -L >/dev/null 2>&1 && echo gpu),)
export TORCH_CUDA_ARCH_LIST ?= 8.0+PTX
endif

EXTENSION_SOURCES := setup.py $(shell find csrc -type f -not -path 'csrc/emu/*')

PY_SOURCES := gam_ext python_tests benchmarks examples scripts csrc/emu setup.py
CXX_SOURCES = $(shell find csrc python_tests -type f \( -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh' \))

.PHONY: help setup build train test lint format clean

help:
	@echo "make train   train the example GAM language model on the offline default corpus"
	@echo "make test    run the whole test suite (lint, unit, kernel, emulated CUDA kernels)"
	@echo "make build   set up .venv and build the extension gam_ext._C in place"
	@echo "make lint    ruff (lint, format check) over the Python code, clang-format check over csrc and python_tests"
	@echo "make format  rewrite the Python and C++/CUDA sources in the project's format"
	@echo "make clean   remove build outputs (keeps .venv)"

$(STAMPS)/venv: requirements-dev.txt
	@mkdir -p $(STAMPS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements-dev.txt
	@# CUTLASS's CuTe headers, for the test that checks the emulator's tensor-core layouts against
	@# them (python_tests/test_emulator.py); the wheel's own Python dependencies are not needed.
	$(PY) -m pip install -q --no-deps nvidia-cutlass==4.2.0.0
	@# Make the source tree importable from anywhere in the venv (the extension is built in place).
	$(PY) -c 'import pathlib, sysconfig; pathlib.Path(sysconfig.get_paths()["purelib"], "gam_ext_dev.pth").write_text("$(CURDIR)\n")'
	touch $@

setup: $(STAMPS)/venv

$(STAMPS)/build: $(STAMPS)/venv $(EXTENSION_SOURCES)
	$(PY) setup.py -q build_ext --inplace
	touch $@

build: $(STAMPS)/build

train: build
	$(PY) examples/train.py

lint: $(STAMPS)/venv
	$(PY) -m ruff check $(PY_SOURCES)
	$(PY) -m ruff format --check $(PY_SOURCES)
	@echo "$(VENV)/bin/clang-format --dry-run --Werror <the C++/CUDA sources under csrc and python_tests>"
	@$(VENV)/bin/clang-format --dry-run --Werror $(CXX_SOURCES)

format: $(STAMPS)/venv
	$(PY) -m ruff check --fix-only -q $(PY_SOURCES)
	$(PY) -m ruff format $(PY_SOURCES)
	@echo "$(VENV)/bin/clang-format -i <the C++/CUDA sources under csrc and python_tests>"
	@$(VENV)/bin/clang-format -i $(CXX_SOURCES)

test: build lint
	$(PY) -m pytest python_tests -m "not emulated"
	bash python_tests/run_emulated.sh

clean:
	rm -rf build $(STAMPS) gam_ext/_C*.so
