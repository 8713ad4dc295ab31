# Quickstart: `make train` (set up, then the main job on the built-in world) and `make test`.
# Every install goes through constraints.txt, which pins torch==2.13.0 (the CPU wheel here).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
ARGS   ?=
PYTEST_ARGS ?=

.PHONY: setup train test cuda-check gpu-wheels clean-cache

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

# hydra-core and omegaconf (with antlr4's source archive, which has no wheel) at constraints.txt's pins, for
# `scripts/gpu_session.sh e2e` on a GPU machine without them: carry .gpu-wheels/ to it (under 1 MB).
GPU_WHEELS := hydra-core omegaconf antlr4-python3-runtime
gpu-wheels: setup
	rm -rf .gpu-wheels
	$(BIN)/pip download --quiet --no-deps -d .gpu-wheels $(foreach d,$(GPU_WHEELS),$(d)==$(shell $(BIN)/python -c "import importlib.metadata as m; print(m.version('$(d)'))"))
	ls -l .gpu-wheels

clean-cache:
	rm -rf ~/.cache/vlm-data-metabolism
