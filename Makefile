# asd3d — `make help` lists the targets.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.asd3d-installed
RUN_DIR := outputs/quickstart/$(shell date +%Y-%m-%d_%H-%M-%S)

.DEFAULT_GOAL := help
.PHONY: help venv quickstart test test-slow bench bench-gpu gpu-wheels lint format typecheck clean

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

GPU_WHEELS := diffusers==0.42.1 hydra-core==1.3.8 omegaconf==2.3.1 open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4 importlib_metadata==10.2.0

gpu-wheels: $(STAMP) ## download into .whl/ the wheels the lent GPU machine lacks (python 3.12, no network there)
	mkdir -p .whl
	$(PY) -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl $(GPU_WHEELS)
	$(PY) -m pip wheel --no-deps -w .whl antlr4-python3-runtime==4.9.3  # sdist only: built here (pure Python)

bench-gpu: ## the prepared GPU check (CUDA; docs/performance.md): JSON + Markdown under OUT or bench_results/
	PYTHONUNBUFFERED=1 python3 -m asd3d.bench_gpu

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
