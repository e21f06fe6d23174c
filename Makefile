# Every target sets up what it needs from nothing: a virtual environment in .venv, the
# dependencies, and the extension built with the CPU backend and, when nvcc and a CUDA build of
# torch are present, the CUDA backend.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
BUILD_LOG := build/build.log
# glibc returns multi-MiB blocks to the OS after every free, which dominates CPU timings; keep
# them (the same setting for every provider in the benchmark).
BENCH_ENV := MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=4294967296

.PHONY: env build demo test test-python test-cpp test-gpu bench clean

env: $(VENV)/.deps-installed

$(VENV)/.deps-installed: requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $@

build: env
	@mkdir -p build
	@echo "building invkernels (log: $(BUILD_LOG))"
	@$(PY) -m pip install --no-build-isolation --no-deps -v -e . > $(BUILD_LOG) 2>&1 || \
		{ tail -n 60 $(BUILD_LOG); exit 1; }
	@$(PY) scripts/build_report.py $(BUILD_LOG)

test-cpp: env
	@mkdir -p build
	PATH=$(abspath $(VENV))/bin:$$PATH cmake -S . -B build/cmake-tests -G Ninja -DINVKERNELS_BUILD_LIBRARY=OFF > build/cmake-tests.log
	PATH=$(abspath $(VENV))/bin:$$PATH cmake --build build/cmake-tests >> build/cmake-tests.log
	ctest --test-dir build/cmake-tests --output-on-failure

# With nvcc on PATH the build must contain the CUDA backend; test_build.py checks it.
EXPECT_CUDA := $(shell command -v nvcc >/dev/null 2>&1 && echo 1 || echo 0)

test-python: build
	INVKERNELS_EXPECT_CUDA_BUILD=$(EXPECT_CUDA) $(PY) -m pytest python_tests -p no:cacheprovider -q -rs

# On a machine with a GPU: the cuda-marked tests, with Triton compiled for the GPU.
test-gpu: build
	INVKERNELS_TEST_CUDA=1 $(PY) -m pytest python_tests -p no:cacheprovider -q -rs -m cuda

test: build test-cpp test-python

bench: build
	$(BENCH_ENV) $(PY) benchmarks/run.py --write docs/performance.md --plots docs/plots

# The main job: a memory-free Glow trained on scikit-learn's digits (python -m invkernels demo).
demo: build
	$(PY) -m invkernels demo --threads 2 --out demo_output

clean:
	rm -rf build $(VENV) invkernels/*.so *.egg-info
