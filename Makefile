# Two commands a user needs: `make run` (the sweep on the embedded demo) and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup run test test-fast bench clean

setup: $(STAMP)

# Recreate the environment only when it is missing or the pins changed. uv installs the pinned
# wheels in a fraction of pip's minute (the same packages: compared); --compile-bytecode writes
# the .pyc files pip writes, which every process importing TensorFlow would otherwise compile
# again where PYTHONDONTWRITEBYTECODE is set. pip, which reads pip.conf, is the fallback for a
# machine where uv cannot reach the index.
UV := uv==0.13.10

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	( $(PY) -m pip install --quiet $(UV) && $(PY) -m uv pip install --quiet --compile-bytecode --python $(PY) -e '.[test]' ) \
	  || $(PY) -m pip install --quiet -e '.[test]'
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
