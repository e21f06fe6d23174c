"""Loads the compiled extension: the op schemas (+ CUDA kernels) and the CPU kernels built for
this CPU's capability."""

from __future__ import annotations

import importlib.util
import os

import torch

_CAPABILITY_LIBS = {"AVX512": "_cpu_avx512", "AVX2": "_cpu_avx2", "DEFAULT": "_cpu_default"}
_state: dict = {}


def _library_path(name: str) -> str:
    spec = importlib.util.find_spec(f"invkernels.{name}")
    if spec is None or spec.origin is None:
        raise ImportError(
            f"invkernels: the compiled library invkernels.{name} was not found; build the extension with "
            "`pip install -e . --no-build-isolation` (see README.md)")
    return spec.origin


def load() -> None:
    """Import invkernels._C (schemas, CUDA kernels) and load the CPU kernels for this CPU."""
    if _state:
        return
    from invkernels import _C  # noqa: PLC0415

    capability = torch.backends.cpu.get_cpu_capability()
    name = _CAPABILITY_LIBS.get(capability, "_cpu_default")
    path = _library_path(name)
    torch.ops.load_library(path)
    _state.update(c=_C, cpu_library=os.path.basename(path), cpu_capability=capability)


def build_info() -> dict:
    """How the extension was built and what runs here.

    Keys: ``cpu`` (always True), ``cuda`` (CUDA kernels compiled), ``cuda_archs``,
    ``cpu_capability`` and ``cpu_library`` (the CPU kernel build loaded for this CPU),
    ``cuda_available`` (a GPU is visible now), ``torch_version_built``, ``torch_version``,
    ``triton_version`` (None when triton is not installed).
    """
    load()
    info = dict(_state["c"].build_info())
    info["cpu"] = True
    info["cpu_capability"] = _state["cpu_capability"]
    info["cpu_library"] = _state["cpu_library"]
    info["cuda_available"] = torch.cuda.is_available()
    info["torch_version"] = torch.__version__
    try:
        from importlib.metadata import version  # noqa: PLC0415

        info["triton_version"] = version("triton")
    except Exception:  # noqa: BLE001 - any failure means triton is not usable here
        info["triton_version"] = None
    return info
