# Two commands on a fresh machine: `make run` and `make test`. Both create the virtualenv when missing.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PROFILE ?= tiny
ARGS ?=
# pytest-xdist workers for make test: the suite's processes mostly start up on one core (imports), so two
# workers on two cores take ~17 min where one took ~24. By file: a module-scoped fixture is built once.
TEST_WORKERS ?= 2

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export MLFLOW_ENABLE_ASYNC_LOGGING := false

.PHONY: venv system-deps run test image-test lint compile-kfp graph clean

venv: $(STAMP)

# torch first from the CPU wheel on disk; then the lock with no resolution surprises; the project last.
$(STAMP): requirements.lock pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -r requirements.lock
	$(BIN)/pip install -q --no-deps -e .
	$(BIN)/pip check
	touch $(STAMP)

# Optional Debian assets (a CJK font for Chinese text rows). Skipped quietly without apt or root.
system-deps:
	@bash scripts/system-deps.sh

run: venv system-deps
	$(BIN)/onereward run --profile $(PROFILE) $(ARGS)

test: venv system-deps
	$(BIN)/ruff check src tests dags components benchmarks
	$(BIN)/pytest -n $(TEST_WORKERS) --dist loadfile $(ARGS)

# The CPU image built with podman and run as KFP and Airflow run stages (root only; installs podman, runc and
# debootstrap when missing). Kept out of `make test`, which needs no container runtime.
image-test: venv system-deps
	bash scripts/image_test.sh

lint: venv
	$(BIN)/ruff check src tests dags components benchmarks

graph: venv
	$(BIN)/onereward graph

compile-kfp: venv
	$(BIN)/python -m components.pipeline --profile flux --output pipeline.yaml

clean:
	rm -rf .onereward
