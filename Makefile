# Two commands a user needs: `make run` (the sweep on the embedded demo) and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup run test test-fast bench clean

setup: $(STAMP)

# Recreate the environment only when it is missing or the pins changed.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

run: setup
	$(VENV)/bin/fine-pruning sweep --single-node --out results/

# Two pytest-xdist workers, one per core: the suite is CPU work (mostly processes importing
# TensorFlow). tests/conftest.py keeps each module's tests, and all SLURM tests, on one worker.
XDIST  := -n 2 --dist loadscope --no-loadscope-reorder

test: setup
	$(PY) -m pytest -q -ra $(XDIST) --durations=20

test-fast: setup
	$(PY) -m pytest -q -ra $(XDIST) -m "not slow"

bench: setup
	$(PY) scripts/bench.py --doc docs/benchmark.md

clean:
	rm -rf results/*.csv results/*.h5 results/*.keras results/*.png results/*.json results/checkpoints results/.sweep.lock results/.dask
