# The two set-up commands of the README: `make demo` and `make test`.
# Each creates .venv if needed, installs the pinned CPU torch first (override: TORCH_SPEC=...),
# then the package with the extras it needs, then runs.
# `make docs` builds the documentation (strict) into site/; `make wheel-smoke` builds the sdist
# and wheel into dist/ and tests the wheel in a fresh virtual environment.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BUILD_SPEC ?= build>=1.2
BIN := $(VENV)/bin

.PHONY: demo test lint typecheck unit bench docs wheel-smoke clean

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

$(VENV)/.docs-installed: pyproject.toml $(VENV)/.torch-installed
	$(BIN)/pip install -q -e ".[docs]"
	touch $@

$(VENV)/.build-installed: | $(BIN)/python
	$(BIN)/pip install -q "$(BUILD_SPEC)"
	touch $@

demo: $(VENV)/.demo-installed
	$(BIN)/python -m dropkit demo
	$(BIN)/python -m dropkit doctor dropkit.experiments.digits:build_mlp --factory-arg hidden=1024 \
		--factory-arg input_dropout=0.2 --factory-arg hidden_dropout=0.5 --input-shape 8,64 \
		--n-train 100 --fail-on never

lint: $(VENV)/.test-installed
	$(BIN)/ruff check src tests benchmarks docs examples
	$(BIN)/ruff format --check src tests benchmarks docs examples

typecheck: $(VENV)/.test-installed
	$(BIN)/mypy

unit: $(VENV)/.test-installed
	$(BIN)/python -m pytest -q

test: lint typecheck unit

bench: $(VENV)/.test-installed
	$(BIN)/python benchmarks/bench_dropout.py

# Strict: any warning (an unresolved cross-reference included) fails; a fresh build every time
# (-E) so that no warning hides in a cached page.  The pages' code runs in tests/test_docs.py.
docs: $(VENV)/.docs-installed
	rm -rf site
	$(BIN)/sphinx-build -b html -E -n -W --keep-going -q -d docs/_build/doctrees docs site

# The sdist and wheel (python -m build: the wheel is built from the sdist), then a fresh virtual
# environment outside the checkout with the pinned CPU torch first and the wheel, and
# tests/wheel_smoke.py in it.  pip's cache makes the reinstall quick.
wheel-smoke: $(VENV)/.build-installed
	rm -rf dist
	$(BIN)/python -m build --quiet --outdir dist
	@set -e; smoke=$$(mktemp -d); trap 'rm -rf "$$smoke"' EXIT; \
	echo "wheel-smoke: fresh virtual environment in $$smoke"; \
	$(PYTHON) -m venv "$$smoke/venv"; \
	"$$smoke/venv/bin/python" -m pip install -qq --upgrade pip; \
	"$$smoke/venv/bin/pip" install -qq "$(TORCH_SPEC)"; \
	"$$smoke/venv/bin/pip" install -qq dist/dropkit-*.whl; \
	cp tests/wheel_smoke.py "$$smoke/"; \
	cd "$$smoke" && "$$smoke/venv/bin/python" wheel_smoke.py --expect-installed

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache src/*.egg-info site dist docs/_build docs/_generated
