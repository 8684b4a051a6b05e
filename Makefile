# Entry points for a fresh machine: `make run` (main job), `make test` (test suite), `make bench` (benchmarks).
# All create .venv, install torch first (TORCH, default the CPU-friendly 2.13.0; on a CUDA machine set
# e.g. TORCH=torch==2.13.0 from the matching index), then this project with its extras.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
CONFIG ?= configs/default.yaml
PY := $(VENV)/bin/python

.PHONY: install run test bench clean browser
install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[dev,embedded]"
	touch $@

run: install
	$(PY) -m refusal_sae fit --config $(CONFIG)

# The report's browser test needs Debian's Chromium and ChromeDriver (installed as root when missing; without
# them that test is skipped with the reason).
browser:
	@if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; \
		else echo "no /usr/bin/chromium: the report's browser test will be skipped (apt-get install chromium chromium-driver)"; fi; \
	fi

test: install browser
	$(PY) -m pytest

bench: install
	$(PY) -m benchmarks

clean:
	rm -rf $(VENV) runs
