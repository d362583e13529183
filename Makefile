# The two commands: `make demo` (set up + run the main job) and `make test` (set up + run the tests).
# Set-up is a .venv made from pyproject.toml with the pinned constraints.txt; it is redone only when
# one of those files changes (the stamp file records the last install).
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export RAY_USAGE_STATS_ENABLED ?= 0
export AWS_EC2_METADATA_DISABLED ?= true
# Ray's session files go here, not /tmp/ray (short path: Ray's socket paths are length-limited).
export RAY_TMPDIR ?= /tmp/medbalance-ray-$(shell id -u)

.PHONY: install demo test test-fast bench clean

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "installing medbalance and its pinned dependencies into $(VENV) (first time: ~2 min, ~6 GB)"
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev]' 2>&1 | { grep -v 'is ignored: it is neither a file nor a directory' || true; }
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	@mkdir -p $(RAY_TMPDIR)
	$(PY) -m ray_jobs.demo $(DEMO_ARGS)

test: $(STAMP)
	@mkdir -p $(RAY_TMPDIR)
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) bench/models.py
	$(PY) bench/train_overhead.py
	$(PY) bench/data_path.py

clean:
	rm -rf runs .pytest_cache
