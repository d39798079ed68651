# smartbin: `make demo` and `make test` are the two commands a fresh machine needs.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test lint proto

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# The edge extra alone: what runs on a bin (no torch).
$(VENV)/.edge-installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[edge]'
	touch $@

# Everything: trainer, converter, test and lint tools.
$(VENV)/.dev-installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[dev]'
	touch $@ $(VENV)/.edge-installed

demo: $(VENV)/.edge-installed
	$(BIN)/smartbin-demo

lint: $(VENV)/.dev-installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python proto/generate.py --check

test: lint
	$(BIN)/pytest

proto: $(VENV)/.dev-installed
	$(BIN)/python proto/generate.py
