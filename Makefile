# sparsediff developer targets. `make test` sets everything up on a fresh clone.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# A CPU build of torch on machines without a GPU; override e.g. TORCH_SPEC="torch==2.14.1".
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)

.PHONY: setup test test-all demo bench bench-gpu clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
ifeq ($(HAS_GPU),1)
	$(PY) -m pip install -q torch
else
	$(PY) -m pip install -q "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX),)
endif
	$(PY) -m pip install -q -e ".[test]"
	touch $@

test: setup
	$(PY) -m pytest

test-all: setup
	$(PY) -m pytest -m "not gpu"

demo: setup
	$(VENV)/bin/sparsediff demo

bench: setup
	$(VENV)/bin/sparsediff bench attention --seq-len 8192 --heads 8 --head-dim 64 --dtype float32 --sweep

# One short run on a CUDA machine whose Python already has torch and triton (no setup, no install):
# the correctness check, the benchmark tables, then the Triton tests (JSON to $$OUT when set).
bench-gpu:
	$(PYTHON) samples/bench_gpu.py

clean:
	rm -rf $(VENV) build *.egg-info
