# Two commands: `make demo` (prepare, train the tiny recipe, losses and samples across the dial, the dial report)
# and `make test`. Both create .venv on first use. Corpora come from $ABCGPT_DATA_DIR when set,
# else they are downloaded (see README).

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch==2.13.0 is pinned: on these machines pip takes the CPU build from local disk; a looser
# spec can pull a multi-GB CUDA build. GPU users may install the torch build they want first.
TORCH ?= torch==2.13.0
DEMO_RUN ?= runs/demo

.PHONY: venv demo test test-fast lint bench clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

demo: venv
	$(BIN)/abcgpt prepare --config tiny
	rm -rf $(DEMO_RUN)
	$(BIN)/abcgpt train --config tiny --out $(DEMO_RUN)
	$(BIN)/abcgpt sample --ckpt $(DEMO_RUN) --sweep 0,0.25,0.5,0.75,1 --max-new-tokens 240 --seed 0
	$(BIN)/abcgpt sample --ckpt $(DEMO_RUN) --sweep 0.25,0.5,0.75 --mode mixture --max-new-tokens 240 --seed 0
	$(BIN)/abcgpt eval --ckpt $(DEMO_RUN)

test: venv
	$(BIN)/python -m pytest

# the tests not marked slow (no torchrun, no SIGKILL loop, no browser, no load test): under 2 minutes
test-fast: venv
	$(BIN)/python -m pytest -m "not slow"

bench: venv
	mkdir -p runs/bench
	$(BIN)/python benchmarks/train_step.py --json runs/bench/train_step.json
	$(BIN)/python benchmarks/generate.py --json runs/bench/generate.json

lint: venv
	$(BIN)/ruff check src tests benchmarks scripts examples

clean:
	rm -rf $(VENV) data runs
