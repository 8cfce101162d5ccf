# bitflow: `make help` lists the targets.
PYTHON ?= python
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
DIR ?= multirun

.PHONY: help install install-bench install-export test test-unit test-full lint format train tb bench bench-gpu report clean

help:  ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-14s %s\n", $$1, $$2}'

install:  ## install torch==2.13.0 (CPU wheel), then bitflow with its dev and graph extras (editable)
	$(PYTHON) -m pip install torch==2.13.0
	$(PYTHON) -m pip install -e ".[dev,graph]"

install-bench:  ## install the bench-only extras (HF transformers, the seed authors' bitlinear)
	$(PYTHON) -m pip install -e ".[dev,bench]"

install-export:  ## build llama-cpp-python from source (CPU, portable; ~8 min on 2 cores) for the llama.cpp tests
	CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF" $(PYTHON) -m pip install --no-binary llama-cpp-python -e ".[dev,export]"

test:  ## run the test suite (without tests marked slow), ~10 min on 2 CPU cores
	$(PYTHON) -m pytest -q

test-unit:  ## the unit tier only (no Trainer fits, no subprocesses), under a minute
	$(PYTHON) -m pytest -q -m "not slow and not integration"

test-full:  ## run every test, slow ones included
	$(PYTHON) -m pytest -q -m ""

lint:  ## ruff check
	ruff check .

format:  ## ruff format and fix imports
	ruff check --fix --select I .
	ruff format .

train:  ## train the default tiny model on the stdlib corpus (ARGS="..." for overrides)
	bitflow $(ARGS)

tb:  ## TensorBoard on outputs/ and multirun/
	tensorboard --logdir_spec outputs:outputs,multirun:multirun --bind_all

bench:  ## run the benchmarks and print their tables (QUICK=1 for a short run)
	$(PYTHON) -m bitflow.bench $(if $(QUICK),--quick,)

bench-gpu:  ## the same ratios on a CUDA GPU, one summary table (exits with a message without CUDA)
	$(PYTHON) -m bitflow.bench.gpu $(if $(QUICK),--quick,)

report:  ## tables and plots for a multirun or run directories: make report DIR=multirun/...
	bitflow-report $(DIR)

clean:  ## remove outputs, multiruns and caches of the working tree (not ~/.cache/bitflow)
	rm -rf outputs multirun .pytest_cache .ruff_cache build *.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
