# The two commands a newcomer needs: `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build on this disk; for CUDA, install torch from PyTorch's CUDA index first (see README).
TORCH ?= torch==2.13.0

.PHONY: setup run test fetch bench

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install $(TORCH)
	$(BIN)/python -m pip install -e '.[dev]'
	touch $@

fetch: setup
	$(BIN)/tracehead models fetch

run: fetch
	$(BIN)/tracehead serve

test: fetch
	$(BIN)/python -m pytest

# The serving benchmark (about 4 minutes on 2 cores): prints a table, writes docs/benchmarks.json and
# the results section of docs/benchmarks.md.
bench: fetch
	$(BIN)/python benchmarks/serving.py
