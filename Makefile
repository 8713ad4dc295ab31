# Quickstart: `make train` (set up, then the main job on the built-in world) and `make test`.
# Every install goes through constraints.txt, which pins torch==2.13.0 (the CPU wheel here).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
ARGS   ?=
PYTEST_ARGS ?=

.PHONY: setup train test cuda-check clean-cache

$(STAMP): pyproject.toml constraints.txt setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt torch==2.13.0
	$(BIN)/pip install --quiet -c constraints.txt -e ".[test]"
	touch $(STAMP)

# The optional compiled extension (csrc/ -> vlm_core/_ext.so): built in place with the venv's torch,
# rebuilt when a source changes. setup.py marks it optional, so a missing compiler only warns and the
# Python references run instead (vlm_core/kernels/ext.py logs the fallback).
EXT_STAMP := $(VENV)/.ext-built
CSRC := $(wildcard csrc/*.cpp csrc/*.cu csrc/*.h)

$(EXT_STAMP): $(STAMP) $(CSRC)
	$(BIN)/python setup.py --quiet build_ext --inplace
	touch $(EXT_STAMP)

setup: $(STAMP) $(EXT_STAMP)

train: setup
	$(BIN)/python train.py $(ARGS)

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Compile and link csrc/'s CUDA part without a GPU: nvcc and the CUDA torch headers come from PyPI into
# ~/.cache/vlm-data-metabolism/cuda-build-check (about 330 MB); tests/scripts runs the same check.
cuda-check: setup
	$(BIN)/python scripts/cuda_build_check.py $(ARGS)

clean-cache:
	rm -rf ~/.cache/vlm-data-metabolism
