# PreMoe Service: set-up, checks, tests and the demo.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
TORCH   := torch==2.13.0

.PHONY: setup test check fmt demo bench clean

setup: $(STAMP)

# torch goes in first and alone: any other spec would pull the CUDA build.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check $(TORCH)
	$(BIN)/pip install -q --disable-pip-version-check -e ".[dev]" "$(TORCH)"
	touch $(STAMP)

test: setup
	$(BIN)/python -m pytest -q -ra tests

check: setup
	$(BIN)/ruff check premoe_service tests bench
	$(BIN)/ruff format --check premoe_service tests bench
	$(BIN)/mypy

fmt: setup
	$(BIN)/ruff format premoe_service tests bench
	$(BIN)/ruff check --fix premoe_service tests bench

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
