# Tessera: `make demo` sets up and runs the demo; `make test` sets up and runs the tests.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: setup demo test peers js lint clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The CPU build; any other torch version pulls gigabytes of CUDA packages.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test,bench]'
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(BIN)/tessera demo

peers:
	bash tests/install-peers.sh

js:
	@if [ -f tests/js/package.json ]; then npm ci --prefix tests/js --no-audit --no-fund --loglevel=error; fi

# Test files are shared among TEST_WORKERS processes (pytest-xdist; a file's tests stay
# together, so its module fixtures are made once): 2 halves the suite on 2 cores.
TEST_WORKERS ?= 2

test: setup peers js
	$(BIN)/python -m pytest -q --durations=25 -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check dicom_node federation_grpc viewer_bridge tests benchmarks
	$(BIN)/mypy

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
