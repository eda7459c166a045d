# asd3d — `make help` lists the targets.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.asd3d-installed
RUN_DIR := outputs/quickstart/$(shell date +%Y-%m-%d_%H-%M-%S)

.DEFAULT_GOAL := help
.PHONY: help venv quickstart test test-slow bench lint format typecheck clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  make %-11s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

venv: $(STAMP) ## create or refresh the virtualenv (.venv) with asd3d and its dev tools

quickstart: $(STAMP) ## train the quickstart (ASD, learned miniature prior, CPU, ~15 min), evaluate it, print where results are
	$(PY) train.py experiment=quickstart hydra.run.dir=$(RUN_DIR)
	$(PY) evaluate.py ckpt=$(RUN_DIR)/checkpoints/last.ckpt
	@echo "Results: $(RUN_DIR)/eval  (index.html gallery, contact_sheet.png, turntables/, metrics.json); training curves: $(RUN_DIR)/csv/metrics.csv"

test: $(STAMP) ## run the fast test suite (CPU, offline)
	HF_HUB_OFFLINE=1 WANDB_MODE=offline $(PY) -m pytest -q

test-slow: $(STAMP) ## run the long end-to-end tests too
	HF_HUB_OFFLINE=1 WANDB_MODE=offline $(PY) -m pytest -q -m "slow or not slow"

bench: $(STAMP) ## benchmarks: prior-call batch composition, system overhead vs a bare loop, DDP scaling (ratios)
	$(PY) -m asd3d.bench

lint: $(STAMP) ## ruff lint + format check
	$(VENV)/bin/ruff check asd3d tests *.py
	$(VENV)/bin/ruff format --check asd3d tests *.py

format: $(STAMP) ## apply ruff's fixes and formatting
	$(VENV)/bin/ruff check --fix asd3d tests *.py
	$(VENV)/bin/ruff format asd3d tests *.py

typecheck: $(STAMP) ## mypy over the package
	$(VENV)/bin/mypy asd3d

clean: ## remove run outputs (keeps the virtualenv)
	rm -rf outputs multirun bench_results .pytest_cache
