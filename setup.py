"""Build of invkernels: the op schemas + CUDA kernels (invkernels._C) and the CPU kernels.

The CPU kernels are compiled once per CPU capability into invkernels._cpu_default,
_cpu_avx2 and _cpu_avx512, with the flags and defines of build_config.json (which CMakeLists.txt
reads too); at import, invkernels loads the one matching torch.backends.cpu.get_cpu_capability().
The CUDA kernels are compiled when torch was built with CUDA and nvcc is found (a visible GPU is
not needed).

Environment:
  INVKERNELS_WITH_CUDA   auto (default) | 0 | 1
  INVKERNELS_CUDA_ARCHS  e.g. "8.0;9.0" (default: TORCH_CUDA_ARCH_LIST, else the archs of the
                         visible GPUs, else build_config.json's cuda_archs, "8.0;9.0")
  INVKERNELS_CPU_CAPABILITIES
                         all (default) | native: the CPU kernels for every capability of
                         build_config.json, or only for the one this CPU runs (what the demo needs)
  MAX_JOBS               parallel compile jobs (ninja)
  DEBUG                  1 for -O0 -g
Build with `pip install -e . --no-build-isolation` so the extension compiles against the
installed torch; `make build` (scripts/build.py) does so once, then rebuilds with
`setup.py build_ext --inplace` when an input changed.

Builds are incremental: every extension's objects live in a fixed directory under build/ext/ (the
CUDA-or-not variant of invkernels._C in a directory of its own, so switching variants relinks
instead of recompiling), and every extension goes through ninja, whose depfiles rebuild exactly
the objects whose sources or included headers changed.
"""

from __future__ import annotations

import glob
import json
import os
import platform
import re
import shutil
import subprocess
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _build_config() -> dict:
    """The compile settings shared with CMakeLists.txt: CPU capabilities and default CUDA archs."""
    with open(os.path.join(ROOT, "build_config.json"), encoding="utf-8") as f:
        return json.load(f)


BUILD_CONFIG = _build_config()


def _log(msg: str) -> None:
    print(f"[invkernels] {msg}", file=sys.stderr, flush=True)


def _toolkit_root() -> str | None:
    """The CUDA toolkit directory behind the nvcc on PATH (it may be a wrapper script)."""
    nvcc = shutil.which("nvcc")
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    if nvcc is None:
        return None
    try:
        out = subprocess.run([nvcc, "--dryrun", "-x", "cu", "-E", os.devnull], capture_output=True, text=True,
                             timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = re.search(r"^#\$ TOP=(.+)$", out.stdout + out.stderr, re.MULTILINE)
    if match is None:
        return os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    return os.path.realpath(match.group(1).strip())


_cuda_root = _toolkit_root()
if _cuda_root is not None:
    # Must be set before torch.utils.cpp_extension computes CUDA_HOME at import.
    os.environ["CUDA_HOME"] = _cuda_root

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

DEBUG = os.environ.get("DEBUG", "0") == "1"
WITH_CUDA_ENV = os.environ.get("INVKERNELS_WITH_CUDA", "auto").lower()
if WITH_CUDA_ENV not in ("auto", "0", "1"):
    raise SystemExit(f"INVKERNELS_WITH_CUDA should be auto, 0 or 1, got {WITH_CUDA_ENV!r}")
cuda_possible = torch.version.cuda is not None and _cuda_root is not None
if WITH_CUDA_ENV == "1" and not cuda_possible:
    raise SystemExit(
        f"INVKERNELS_WITH_CUDA=1 but torch.version.cuda={torch.version.cuda} and nvcc toolkit={_cuda_root}")
WITH_CUDA = cuda_possible if WITH_CUDA_ENV == "auto" else WITH_CUDA_ENV == "1"

CUDA_ARCHS = ""
if WITH_CUDA:
    CUDA_ARCHS = os.environ.get("INVKERNELS_CUDA_ARCHS") or os.environ.get("TORCH_CUDA_ARCH_LIST") or ""
    if not CUDA_ARCHS and torch.cuda.is_available():
        caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
        CUDA_ARCHS = ";".join(f"{major}.{minor}" for major, minor in caps)
    if not CUDA_ARCHS:
        CUDA_ARCHS = ";".join(BUILD_CONFIG["cuda_archs"])
    os.environ["TORCH_CUDA_ARCH_LIST"] = CUDA_ARCHS

OPT = ["-O0", "-g"] if DEBUG else ["-O3", "-g0"]
CXX_FLAGS = OPT + ["-std=c++20", "-fopenmp", "-Wno-unknown-pragmas"]
CPU_CAPABILITIES = [cap for cap in BUILD_CONFIG["cpu_capabilities"]
                    if not cap["machines"] or platform.machine().lower() in cap["machines"]]
CAPABILITY_SET = os.environ.get("INVKERNELS_CPU_CAPABILITIES", "all").lower()
if CAPABILITY_SET not in ("all", "native"):
    raise SystemExit(f"INVKERNELS_CPU_CAPABILITIES should be all or native, got {CAPABILITY_SET!r}")
if CAPABILITY_SET == "native":
    CPU_CAPABILITIES = [cap for cap in CPU_CAPABILITIES if cap["name"] == torch.backends.cpu.get_cpu_capability()]
# What distinguishes builds of the same sources: invkernels._C with or without CUDA (and for which
# archs), release or debug. Each variant has its own objects and linked libraries under build/.
VARIANT = ("cuda-" + CUDA_ARCHS.replace(";", "-").replace(" ", "") if WITH_CUDA else "cpu") + ("-debug" if DEBUG else "")
BUILD_DIR = os.path.join(ROOT, "build")


def _sources(pattern: str) -> list[str]:
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def _cuda_extra_includes() -> list[str]:
    """Headers of CUDA libraries (cuBLAS, cuSPARSE, ...) that torch's CUDA wheels ship."""
    try:
        import nvidia  # noqa: PLC0415
    except ImportError:
        return []
    found = []
    for base in nvidia.__path__:
        found += sorted(glob.glob(os.path.join(base, "cu[0-9]*", "include")))
    return found


def extensions():
    exts = []
    main_sources = _sources("csrc/invkernels.cpp") + _sources("csrc/autograd.cpp")
    defines = [f'-DINVK_CUDA_ARCHS="{CUDA_ARCHS}"']
    if WITH_CUDA:
        nvcc = OPT[:1] + ["-std=c++20", "-Xptxas=-v", "-Xptxas=-warn-spills", "-DINVK_WITH_CUDA"]
        for inc in _cuda_extra_includes():
            nvcc += ["-isystem", inc]
        exts.append(CUDAExtension(
            "invkernels._C", main_sources + _sources("csrc/cuda/*.cu") + _sources("csrc/cuda/*.cpp"),
            extra_compile_args={"cxx": CXX_FLAGS + defines + ["-DINVK_WITH_CUDA"], "nvcc": nvcc}))
    else:
        exts.append(CppExtension("invkernels._C", main_sources, extra_compile_args={"cxx": CXX_FLAGS + defines}))
    for cap in CPU_CAPABILITIES:
        exts.append(CppExtension(
            f"invkernels._cpu_{cap['name'].lower()}", _sources("csrc/cpu/*.cpp"),
            extra_compile_args={"cxx": CXX_FLAGS + cap["flags"] + [f"-D{d}" for d in cap["defines"]]},
            extra_link_args=["-fopenmp"]))
    return exts


class Build(BuildExtension):
    """Gives each extension a fixed object directory under build/ext/ (the CPU sources are compiled
    once per capability with different flags; invkernels._C once per variant), whatever temporary
    directory the caller (pip's editable build) passes, so that ninja finds its previous objects.
    Every extension goes through ninja (``force``): distutils' own up-to-date check compares the
    library with the sources alone and would miss an edited header."""

    def finalize_options(self):
        super().finalize_options()
        self.force = True

    def build_extension(self, ext):
        name = ext.name.rsplit(".", 1)[-1]
        base = self.build_temp
        debug = "-debug" if DEBUG else ""
        self.build_temp = os.path.join(BUILD_DIR, "ext", f"{name}-{VARIANT}" if name == "_C" else name + debug)
        try:
            super().build_extension(ext)
        finally:
            self.build_temp = base


_log(f"torch {torch.__version__} (CUDA {torch.version.cuda}); CUDA toolkit: {_cuda_root}; "
     f"CUDA backend: {'yes' if WITH_CUDA else 'no'}"
     + (f" for archs {CUDA_ARCHS}" if WITH_CUDA else "")
     + f"; CPU capabilities: {', '.join(cap['name'] for cap in CPU_CAPABILITIES)}; {'debug' if DEBUG else 'release'} build"
     + f"; objects in {os.path.relpath(os.path.join(BUILD_DIR, 'ext'), ROOT)}/")

setup(
    packages=find_packages(include=["invkernels", "invkernels.*"]),
    ext_modules=extensions(),
    cmdclass={"build_ext": Build.with_options(use_ninja=True)},
)
