# Two commands for a newcomer: `make test` and `make demo`. Both create .venv on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
GPU_STAMP := $(VENV)/.gpu-compiler
PYTEST_ARGS ?=
LINT_PATHS := sparsifiner_jax configs benchmarks tests scripts train.py eval.py

.PHONY: lint test test-all gpu-compiler demo bench clean-venv

$(STAMP): requirements.txt requirements-test.txt pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --disable-pip-version-check -U pip
	$(VENV)/bin/pip install -q -r requirements-test.txt
	$(VENV)/bin/pip install -q --no-deps -e .
	touch $(STAMP)

$(GPU_STAMP): $(STAMP) requirements-gpu.txt
	$(VENV)/bin/pip install -q --disable-pip-version-check -r requirements-gpu.txt
	touch $(GPU_STAMP)

gpu-compiler: $(GPU_STAMP)  ## XLA's GPU compiler in .venv: the GPU compile tests and compile_for --topology h100:N

lint: $(STAMP)  ## pyflakes, and no line over 110 characters (scripts/check_lines.py); `make test` runs it first
	$(PY) -m pyflakes $(LINT_PATHS)
	$(PY) scripts/check_lines.py $(LINT_PATHS)

test: $(STAMP) lint  ## lint, then the fast suite (slow tests excluded)
	$(PY) -m pytest -q -n 2 $(PYTEST_ARGS)

test-all: $(STAMP) lint  ## lint, then everything, slow tests included
	$(PY) -m pytest -q -n 2 -m "" $(PYTEST_ARGS)

demo: $(STAMP)  ## train dense teacher + both Sparsifiner phases on digits, evaluate, print the table
	$(PY) -m sparsifiner_jax.demo --workdir $${WORKDIR:-workdirs/demo}

bench: $(STAMP)  ## benchmark tables, appended to the results history (BENCHMARKS.md is the summary)
	$(PY) benchmarks/run.py --append benchmarks/results/HISTORY.md

clean-venv:
	rm -rf $(VENV)
