# smartbin: `make demo` and `make test` are the two commands a fresh machine needs.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test lint docs proto release compare bench

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
	touch $@ $(VENV)/.edge-installed $(VENV)/.bench-installed

demo: $(VENV)/.edge-installed
	$(BIN)/smartbin-demo

# What the service costs beyond the bare interpreter, measured in one run (docs/benchmarks.md):
# the edge extra plus psutil, no torch. Figures land in runs/benchmark.json.
$(VENV)/.bench-installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[edge,bench]'
	touch $@

bench: $(VENV)/.bench-installed
	$(BIN)/smartbin-bench --json runs/benchmark.json

# The checks listed in .pre-commit-config.yaml (ruff, mypy, fresh stubs, file checks), with the
# venv's tools first on the PATH; the same list runs on each commit after `pre-commit install`.
lint: $(VENV)/.dev-installed
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/pre-commit run --all-files --show-diff-on-failure

# The docs site, strictly: a broken link or anchor fails the build. Pages land in site/.
docs: $(VENV)/.dev-installed
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

test: lint docs
	$(BIN)/pytest

proto: $(VENV)/.dev-installed
	$(BIN)/python proto/generate.py

# The shipped default model from the images: train with the release recipe, convert, measure.
# About 3 hours on 2 CPU cores; minutes on a GPU (the trainer uses CUDA when present).
TRASHNET ?= ../shared/data/trashnet
release: $(VENV)/.dev-installed
	$(BIN)/smartbin-train --config trainer/recipes/release.yaml --data $(TRASHNET) --out runs --name release
	$(BIN)/smartbin-convert runs/release/checkpoint.pt --out runs/release/bundle --calibration-images 1000
	$(BIN)/smartbin-compare runs/release/bundle

# The backbone comparison of docs/models.md: each recipe trained, converted and timed here.
COMPARE_RECIPES ?= mobilenetv2_100 tf_efficientnet_lite0
compare: $(VENV)/.dev-installed
	for recipe in $(COMPARE_RECIPES); do \
	  $(BIN)/smartbin-train --config trainer/recipes/$$recipe.yaml --data $(TRASHNET) --out runs --name $$recipe && \
	  $(BIN)/smartbin-convert runs/$$recipe/checkpoint.pt --out runs/$$recipe/bundle || exit 1; \
	done
	$(BIN)/smartbin-compare $(foreach r,$(COMPARE_RECIPES),runs/$(r)/bundle) --json runs/compare.json
