# Every target sets itself up: a fresh clone needs only python3 (3.11+) and make.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
TORCH  ?= torch==2.13.0
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu

.PHONY: help venv test test-all soak lint bench bench-gpu gpu-wheels eval demo clean

help:
	@echo "make demo | test | soak | lint | bench | bench-gpu | gpu-wheels | eval | clean"

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, the CPU build from PyTorch's index, so the project's torch range resolves
	# to it instead of PyPI's multi-GB CUDA build. Where that index cannot be reached, the
	# attempt fails within seconds (short timeout, no retries) and torch comes from pip's
	# configured index instead.
	$(PY) -m pip install -q --index-url $(TORCH_INDEX) --timeout 5 --retries 0 "$(TORCH)" \
		|| { echo "torch from $(TORCH_INDEX) failed: trying the default index"; \
		     $(PY) -m pip install -q "$(TORCH)"; }
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -m "not soak" --durations=12 tests

soak: $(STAMP)
	$(PY) -m pytest -q -m soak tests

test-all: $(STAMP)
	$(PY) -m pytest -q tests

lint: $(STAMP)
	$(PY) -m ruff check worker training tests deploy
	$(PY) -m ruff format --check worker training tests deploy

bench: $(STAMP)
	$(PY) -m tests.bench.run

bench-gpu: $(STAMP)
	$(PY) -m tests.bench.gpu

# Wheels (CPython 3.12, manylinux x86_64) of what a lent GPU machine's Python lacks, into
# build/gpu-wheels, for tests/bench/gpu_device.sh run there (docs/benchmarks.md). It only
# reads the venv's versions: an existing venv is not reinstalled first.
gpu-wheels:
	test -x $(PY) || $(MAKE) venv
	PY=$(PY) bash tests/bench/gpu_device.sh wheels

eval: $(STAMP)
	$(PY) -m training.evaluate

demo: $(STAMP)
	$(PY) -m deploy.demo

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
