# Every target sets up what it needs from nothing: a virtual environment in .venv, the
# dependencies, and the extension built with the CPU backend and, when nvcc and a CUDA build of
# torch are present, the CUDA backend. Builds are incremental (scripts/build.py): nothing runs when
# no input changed, and ninja recompiles only the objects whose sources or headers changed.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# glibc returns multi-MiB blocks to the OS after every free, which dominates CPU timings; keep
# them (the same setting for every provider in the benchmark).
BENCH_ENV := MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=4294967296

.PHONY: env build build-demo demo test test-python test-quick test-cpp gpu-check bench bench-peers bench-network clean

# With nvcc on PATH the build must contain the CUDA backend; test_build.py checks it.
EXPECT_CUDA := $(shell command -v nvcc >/dev/null 2>&1 && echo 1 || echo 0)

ifeq ($(origin PY),command line)
# A ready environment (`make gpu-check PY=python3` where no package registry can be reached):
# nothing is installed into it.
env:
	@$(PY) -c "import torch" || { echo "PY=$(PY) cannot import torch"; exit 1; }
else
env: $(VENV)/.deps-installed
endif

# Peer libraries the tests compare against (nflows: the spline reference's oracle; all: the oracles of
# invkernels.compat), installed without their dependencies so that they never pull another
# torch.
TEST_PEERS := nflows==0.14 FrEIA==0.2 zuko==1.6.0 normflows==1.7.3

$(VENV)/.deps-installed: requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	$(PY) -m pip install --quiet --no-deps $(TEST_PEERS)
	touch $@

# Everything `make test` checks: the CPU kernels for every CPU capability, the CUDA backend where
# nvcc is present, the Triton kernels compiled ahead of time (cached by source hash); then the
# build report (scripts/build_report.py).
build: env
	@$(PY) scripts/build.py --target full

# What the demo runs here: the CPU kernels for this CPU, the CUDA backend only with a visible GPU
# (a full build serves too; switching between the two relinks invkernels._C, recompiling nothing
# that was built before).
build-demo: env
	@$(PY) scripts/build.py --target demo --no-report

# The CMake build (CMakeLists.txt): the math unit tests and the operator libraries against the
# installed torch, and its ctest. With nvcc it compiles the CUDA kernels too, for one arch: what is
# checked here is the CMake configuration, while setup.py's build compiles every arch. A CUDA
# build of torch without nvcc cannot be configured (torch's CMake package needs the toolkit):
# then the unit tests alone are built.
CMAKE_DIR := build/cmake
CMAKE_LOG := build/cmake.log
CMAKE_WITHOUT_NVCC = $(if $(shell $(PY) -c "import torch; print(torch.version.cuda or '')"),-DINVKERNELS_BUILD_LIBRARY=OFF)
CMAKE_FLAGS = -DPython3_EXECUTABLE=$(abspath $(shell command -v $(PY))) $\
	$(if $(filter 1,$(EXPECT_CUDA)),-DINVKERNELS_WITH_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=80,$(CMAKE_WITHOUT_NVCC))
CMAKE_ENV := PATH=$(abspath $(VENV))/bin:$$PATH

test-cpp: env
	@mkdir -p build
	@echo "CMake build: cmake $(CMAKE_FLAGS) (log: $(CMAKE_LOG))"
	@{ $(CMAKE_ENV) cmake -S . -B $(CMAKE_DIR) -G Ninja $(CMAKE_FLAGS) && $(CMAKE_ENV) cmake --build $(CMAKE_DIR); } \
		> $(CMAKE_LOG) 2>&1 || { tail -n 60 $(CMAKE_LOG); exit 1; }
	ctest --test-dir $(CMAKE_DIR) --output-on-failure

test-python: build
	INVKERNELS_EXPECT_CUDA_BUILD=$(EXPECT_CUDA) $(PY) -m pytest python_tests -p no:cacheprovider -q -rs

# Quick iteration on a built tree (docs/development.md): the op matrix of the ops whose names
# contain OP, and the test files FILES.
OP ?=
FILES ?=
test-quick: build
	INVKERNELS_EXPECT_CUDA_BUILD=$(EXPECT_CUDA) $(PY) -m pytest python_tests/test_op_matrix.py $(FILES) \
		-p no:cacheprovider -q $(if $(OP),-k "$(OP)")

# On a machine with an NVIDIA GPU (scripts/gpu_check.py; exits at once without one): the build for
# the visible GPU's arch on every core, the cuda-marked tests (CUDA C++ and compiled Triton
# backends), the GPU benchmarks into docs/performance-gpu.md; each stage timed. (The sub-make is
# named through a variable so that `make -n gpu-check` does not run it.)
GPU_CHECK_BUILD = $(MAKE) --no-print-directory build

gpu-check:
	@$(PYTHON) scripts/gpu_check.py \
		--setup build "$(GPU_CHECK_BUILD)" \
		--setup device "$(PY) scripts/gpu_check.py --report-device" \
		--stage tests "INVKERNELS_TEST_CUDA=1 $(PY) -m pytest python_tests -p no:cacheprovider -q -rs -m cuda" \
		--stage bench "$(PY) benchmarks/run.py --device cuda --write docs/performance-gpu.md"

test: build test-cpp test-python

# The peer libraries of the network benchmark, without their dependencies (they must not pull
# another torch).
BENCH_PEERS := revlib memcnn FrEIA

bench-peers: env
	$(PY) -m pip install --quiet --no-deps $(BENCH_PEERS)

bench: build bench-peers
	$(BENCH_ENV) $(PY) benchmarks/run.py --write docs/performance.md --plots docs/plots --readme README.md

# The whole-network benchmarks alone (benchmarks/bench_network.py), for a quick look: their report
# goes to benchmarks/results/ (make bench puts them in docs/performance.md with the rest).
bench-network: build bench-peers
	$(BENCH_ENV) $(PY) benchmarks/run.py --only network --write benchmarks/results/performance-network.md

# The main job: a memory-free Glow trained on scikit-learn's digits (python -m invkernels demo).
demo: build-demo
	$(PY) -m invkernels demo --threads 2 --out demo_output

clean:
	rm -rf build $(VENV) invkernels/*.so *.egg-info
