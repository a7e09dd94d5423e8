# byoc — make targets work on a fresh machine with only Python 3.11+ and make.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test check lint demo bench clean package-check

# Livepeer's own SDK (livepeer-gateway) judges the live-runner side in the tests. It declares Python >= 3.12
# but runs on 3.11; binary wheels only, so it never builds PyAV (its av>=11 accepts the version byoc pins).
$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	$(BIN)/python -m pip install --quiet --ignore-requires-python --only-binary av,grpcio livepeer-gateway==1.0.0
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check src tests examples
	$(BIN)/ruff format --check src tests examples
	$(BIN)/mypy

check: lint test

demo: $(STAMP)
	$(BIN)/byoc demo

# The package as a user installs it (needs PyPI): build, twine check, a fresh venv, `byoc init` + its test.
package-check:
	PYTHON=$(PYTHON) scripts/package-check

clean:
	rm -rf $(VENV) build dist .mypy_cache .pytest_cache .ruff_cache
