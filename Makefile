# Two commands on a fresh machine:
#   make run    set up .venv and run the main job
#   make test   set up .venv and run the whole test suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup run test bench clean

setup: $(VENV)/.installed $(VENV)/.native

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	$(BIN)/python -m pip install -q -c constraints.txt --no-deps tinker-cookbook
	touch $@

# build the native CPU sweeps of impl="chunked" once (about a minute; without a compiler it warns and the pure-torch
# code serves), so that no run or test pays for it
$(VENV)/.native: $(VENV)/.installed src/losskit/kernels/chunked/native.cpp
	$(BIN)/python -c "from losskit.kernels.chunked import native; print('native CPU kernels:', 'built' if native.module() else 'unavailable')"
	touch $@

run: setup
	$(BIN)/losskit train

test: setup
	$(BIN)/ruff check src tests benchmarks train.py config
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python benchmarks/bench_cross_entropy.py --cpu

# what the targets above create: the venv and its egg-info (setup), runs (run), CSVs (bench), test caches (test)
clean:
	rm -rf $(VENV) out bench_results .pytest_cache .ruff_cache .hypothesis src/*.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
