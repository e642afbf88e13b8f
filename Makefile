# Two commands on a fresh machine:  make demo   |   make test
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
OUT ?= artifacts/demo
PYTEST_ARGS ?=

.PHONY: venv demo lint test test-fast clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[test]'
	touch $(STAMP)

demo: venv
	$(BIN)/python tools/demo.py --out $(OUT)

lint: venv
	$(BIN)/ruff check .

test: venv
	$(BIN)/python -m pytest -q -n 2 $(PYTEST_ARGS)

test-fast: venv
	$(BIN)/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .cache artifacts
