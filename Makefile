# Two commands on a fresh machine:  make demo   |   make test
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
OUT ?= artifacts/demo
PYTEST_ARGS ?=

.PHONY: venv demo lint test test-fast clean

venv: $(STAMP)

# --no-compile: byte-compiling the ~10k installed .py files costs ~40 s of CPU; imports compile what they use.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q --no-compile -c constraints.txt -e '.[test]'
	touch $(STAMP)

demo: venv
	$(BIN)/python tools/demo.py --out $(OUT)

lint: venv
	$(BIN)/ruff check .

# Two workers, one thread each (tests/conftest.py); loadgroup + the collection order there: costliest first.
test: venv
	$(BIN)/python -m pytest -q -n 2 --dist loadgroup --no-loadscope-reorder $(PYTEST_ARGS)

test-fast: venv
	$(BIN)/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .cache artifacts
