# Two commands a fresh machine needs: `make demo` (set up + run the pipeline on the bundled
# sample photos) and `make test` (set up + run the test suite). Both create .venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PREFECT_LOGGING_LEVEL ?= WARNING

.PHONY: setup test test-fast demo lint typecheck bench bench-gpu clean

setup: $(VENV)/.installed

# Then the sam2 extra (SAM 2.1): a source distribution built against the torch just installed.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -e '.[dev]'
	$(PY) -m pip install -q 'setuptools>=68' wheel
	SAM2_BUILD_CUDA=0 $(PY) -m pip install --no-build-isolation -e '.[dev,sam2]'
	touch $@

test: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

demo: setup
	$(VENV)/bin/fmbseg run --config tiny

lint: setup
	$(VENV)/bin/ruff check fmbseg tests bench
	$(VENV)/bin/ruff format --check fmbseg tests bench

typecheck: setup
	$(VENV)/bin/mypy

bench: setup
	$(PY) bench/annotate.py --config tiny

bench-gpu: setup
	PY=$(PY) bash bench/gpu.sh

# Removes what `make` made; the artifact store (./fmbseg-store: your labels and models) stays.
clean:
	rm -rf $(VENV) .pytest_cache
