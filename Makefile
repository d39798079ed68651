# smartbin: `make demo` and `make test` are the two commands a fresh machine needs.
PYTHON ?= python3
# Two environments: the edge alone (what a bin installs: no torch) and everything.
EDGE_VENV ?= .venv-edge
VENV ?= .venv
# Outside clients (tritonclient), whose protobuf the contract's cannot share an environment with.
CLIENTS_VENV ?= .venv-clients
EDGE_BIN := $(EDGE_VENV)/bin
BIN := $(VENV)/bin
# Each part is a distribution of its own (docs/architecture.md); pip installs them in one call
# because they require each other by name and none is on PyPI.
EDGE_PARTS := -e ./proto -e ./edge_service -e ./tools
ALL_PARTS := -e ./proto -e './edge_service[camera-opencv,gpio]' -e ./trainer -e ./converter -e './tools[peers]'
PART_FILES := pyproject.toml proto/pyproject.toml edge_service/pyproject.toml

.PHONY: demo test test-edge lint docs proto release calibrate-default compare bench

%/bin/python:
	$(PYTHON) -m venv $*
	$*/bin/python -m pip install -q --upgrade pip

# The contract and the edge service, and what their tests need: no trainer, converter or torch.
$(EDGE_VENV)/.installed: $(PART_FILES) | $(EDGE_BIN)/python
	$(EDGE_BIN)/pip install -q $(EDGE_PARTS) --group test-edge
	touch $@

# Every part, and the test, lint, docs and deploy tools.
$(VENV)/.installed: $(PART_FILES) trainer/pyproject.toml converter/pyproject.toml tools/pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q $(ALL_PARTS) --group dev
	touch $@

# tests/clients run these clients as child processes against a real service.
$(CLIENTS_VENV)/.installed: pyproject.toml | $(CLIENTS_VENV)/bin/python
	$(CLIENTS_VENV)/bin/pip install -q --group clients
	touch $@

demo: $(EDGE_VENV)/.installed
	$(EDGE_BIN)/smartbin-demo

# The edge tests, in the edge-only environment: the shipped default bundle and bundles made from
# it, the real server. The environment is checked first: no torch, trainer or converter in it.
test-edge: $(EDGE_VENV)/.installed
	$(EDGE_BIN)/python -c "from importlib.metadata import distributions as d; \
		extra = {x.name for x in d()} & {'torch', 'timm', 'smartbin-trainer', 'smartbin-converter'}; \
		assert not extra, f'the edge environment has {extra}'"
	$(EDGE_BIN)/pytest tests/edge

# What the service costs beyond the bare interpreter, measured in one run (docs/benchmarks.md).
# Figures land in runs/benchmark.json.
bench: $(VENV)/.installed
	$(BIN)/smartbin-bench --json runs/benchmark.json

# The checks listed in .pre-commit-config.yaml (ruff, mypy, fresh stubs, file checks), with the
# venv's tools first on the PATH; the same list runs on each commit after `pre-commit install`.
lint: $(VENV)/.installed
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/pre-commit run --all-files --show-diff-on-failure

# The docs site, strictly: a broken link or anchor fails the build. Pages land in site/.
docs: $(VENV)/.installed
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

test: lint docs $(CLIENTS_VENV)/.installed
	$(BIN)/pytest

proto: $(VENV)/.installed
	$(BIN)/python proto/generate.py

# The shipped default model from the images: train with the release recipe, retrain its last
# blocks off the white board five times (trainer.harden, half the items on pieces of other
# items), average the five and move them 55 % back (trainer.soup), convert, measure. About 6
# hours on 2 CPU cores (the five retrainings about 2 hours); minutes on a GPU (CUDA when present).
TRASHNET ?= ../shared/data/trashnet
HARDEN = $(BIN)/python -m trainer.harden runs/release/checkpoint.pt --data $(TRASHNET) \
	--keep-base 0 --other-items 0.5
release: $(VENV)/.installed
	$(BIN)/smartbin-train --config trainer/recipes/release.yaml --data $(TRASHNET) --out runs --name release
	$(HARDEN) --out runs/release/others-1.pt
	$(HARDEN) --seed 1 --out runs/release/others-2.pt
	$(HARDEN) --views 8 --out runs/release/others-3.pt
	$(HARDEN) --train-from-block 4 --out runs/release/others-4.pt
	$(HARDEN) --train-from-block 4 --seed 1 --out runs/release/others-5.pt
	$(BIN)/python -m trainer.soup $(foreach i,1 2 3 4 5,runs/release/others-$(i).pt) \
	  --start runs/release/checkpoint.pt --keep-base 0.55 --out runs/release/hardened.pt
	$(BIN)/smartbin-convert runs/release/hardened.pt --out runs/release/bundle --calibration-images 1000
	$(BIN)/smartbin-compare runs/release/bundle

# The shipped default on the harder shift suite, calibrated (docs/models.md: about 20 minutes
# on 2 CPU cores; texture_floor too where Debian's ufoai-textures is installed). Prints the
# figures; add ARGS=--write to write them into the bundle.
calibrate-default: $(VENV)/.installed
	$(BIN)/smartbin-calibrate edge_service/default_bundle --data $(TRASHNET) --textures auto \
	  --cache runs/default-calibration.npz $(ARGS)

# The backbone comparison of docs/models.md: each recipe trained, converted and timed here.
COMPARE_RECIPES ?= mobilenetv2_100 tf_efficientnet_lite0
compare: $(VENV)/.installed
	for recipe in $(COMPARE_RECIPES); do \
	  $(BIN)/smartbin-train --config trainer/recipes/$$recipe.yaml --data $(TRASHNET) --out runs --name $$recipe && \
	  $(BIN)/smartbin-convert runs/$$recipe/checkpoint.pt --out runs/$$recipe/bundle || exit 1; \
	done
	$(BIN)/smartbin-compare $(foreach r,$(COMPARE_RECIPES),runs/$(r)/bundle) --json runs/compare.json
