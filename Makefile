# The two set-up commands of the README: `make demo` and `make test`.
# Each creates .venv if needed, installs the pinned CPU torch first (override: TORCH_SPEC=...),
# then the package with the extras it needs, then runs.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: demo test lint typecheck unit bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.torch-installed: | $(BIN)/python
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	touch $@

$(VENV)/.demo-installed: pyproject.toml $(VENV)/.torch-installed
	$(BIN)/pip install -q -e ".[demo,fast]"
	touch $@

$(VENV)/.test-installed: pyproject.toml $(VENV)/.torch-installed
	$(BIN)/pip install -q -e ".[test]"
	touch $@

demo: $(VENV)/.demo-installed
	$(BIN)/python -m dropkit demo
	$(BIN)/python -m dropkit doctor dropkit.experiments.digits:build_mlp --factory-arg hidden=1024 \
		--factory-arg input_dropout=0.2 --factory-arg hidden_dropout=0.5 --input-shape 8,64 \
		--n-train 100 --fail-on never

lint: $(VENV)/.test-installed
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

typecheck: $(VENV)/.test-installed
	$(BIN)/mypy

unit: $(VENV)/.test-installed
	$(BIN)/python -m pytest -q

test: lint typecheck unit

bench: $(VENV)/.test-installed
	$(BIN)/python benchmarks/bench_dropout.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache src/*.egg-info
