# astrai — common tasks. `make demo` and `make test` are the two commands the README starts with.
PYTHON ?= python3
VENV   ?= .venv
# The torch requirement is a variable: on the CPU machines this project is developed on,
# torch==2.13.0 resolves to the CPU wheel already on disk; a GPU user overrides it, e.g.
#   make setup TORCH_SPEC='torch>=2.4'
TORCH_SPEC ?= torch==2.13.0
PY  := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.astrai-installed

.PHONY: help setup test test-gpu demo demo-gpu proto bench bench-serve bench-train clean

help:  ## list targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | sed 's/:.*##/\t/'

setup: $(STAMP)  ## create .venv with torch first, then astrai[dev] (editable)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -c constraints.txt -e ".[dev]"
	$(PY) -m astrai_train.launcher_shim install
	touch $(STAMP)

test: $(STAMP)  ## run the CPU test suite
	$(PY) -m pytest -q

test-gpu: $(STAMP)  ## run only the GPU tests (on a CUDA machine)
	$(PY) -m pytest -q -m gpu

demo: $(STAMP)  ## train, align, evaluate and serve a tiny model end to end on the CPU
	$(PY) -m astrai_train.demo

demo-gpu: $(STAMP)  ## longer GPU recipe: the 125m preset on the Shakespeare corpus
	$(PY) -m astrai_train.demo --gpu

proto: $(STAMP)  ## regenerate gRPC stubs from protos/
	$(PY) -m astrai_serve.proto.regenerate

bench: bench-serve bench-train  ## all benchmarks (GPU)

bench-serve: $(STAMP)  ## serving benchmark (GPU): prints one table, writes JSON
	$(PY) bench/serve.py

bench-train: $(STAMP)  ## training benchmark (GPU): prints one table, writes JSON
	$(PY) bench/train.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
