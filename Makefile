# Every target sets itself up: a fresh clone needs only python3 (3.11+) and make.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
TORCH  ?= torch==2.13.0

.PHONY: help venv test test-all soak lint bench bench-gpu eval demo clean

help:
	@echo "make demo | test | soak | lint | bench | bench-gpu | eval | clean"

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU build of torch first, so the project's torch range resolves to it
	# instead of pulling a multi-GB CUDA build.
	$(PY) -m pip install -q "$(TORCH)" || $(PY) -m pip install -q --index-url https://download.pytorch.org/whl/cpu "$(TORCH)"
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

eval: $(STAMP)
	$(PY) -m training.evaluate

demo: $(STAMP)
	$(PY) -m deploy.demo

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
