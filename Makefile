# needle_steering: the two commands are `make demo` and `make test`; both set up .venv themselves.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
REQS := requirements/base.txt requirements/ros.txt requirements/dev.txt
STAMP := $(VENV)/.installed-$(shell cat $(REQS) setup.py | sha256sum | cut -c1-16)
DEMO_OUT ?= demo_out
PYTEST_ARGS ?=

.PHONY: all setup test lint typecheck pytest demo bench clean
all: test

$(STAMP): $(REQS) setup.py scripts/bootstrap.sh
	@bash scripts/bootstrap.sh "$(PYTHON)" "$(VENV)"
	@rm -f $(VENV)/.installed-*
	@touch $@

setup: $(STAMP)
	@$(BIN)/pip install --quiet --no-deps --no-build-isolation -e . >/dev/null 2>&1 || $(BIN)/pip install --no-deps --no-build-isolation -e .

lint: setup
	@echo "== ruff"
	@$(BIN)/ruff check .

typecheck: setup
	@echo "== mypy"
	@bash scripts/typecheck.sh $(BIN)/mypy

pytest: setup
	@echo "== pytest"
	@$(BIN)/python -m pytest $(PYTEST_ARGS)

test: lint typecheck pytest

demo: setup
	@$(BIN)/needle-steering demo --out $(DEMO_OUT)

bench: setup
	@$(BIN)/needle-steering bench

clean:
	rm -rf $(VENV) .typecheck build *.egg-info .pytest_cache .mypy_cache .ruff_cache $(DEMO_OUT)
