"""Helpers shared by the Triton launchers: where kernels may run, tile limits, compute dtype."""

from __future__ import annotations

import contextlib
import os

import torch
import triton.language as tl

# Largest tile of one program. On a GPU 2048 elements keep up to 8 values per thread and array at
# 8 warps; the interpreter runs each program as numpy array operations at about 0.8 ms per
# program, so it gets few, large programs.
MAX_TILE_GPU = 2048
MAX_TILE_INTERPRETER = 1 << 15


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def max_tile_elements() -> int:
    return MAX_TILE_INTERPRETER if interpreting() else MAX_TILE_GPU


def check_device(op: str, x: torch.Tensor, x_name: str) -> None:
    """Triton kernels run on CUDA tensors, and on CPU tensors only under the interpreter."""
    if x.device.type == "cuda" or (x.device.type == "cpu" and interpreting()):
        return
    raise RuntimeError(
        f"{op}: the Triton backend needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), "
        f"got {x_name} on {x.device}"
    )


def compute_dtype(dtype: torch.dtype) -> tuple[torch.dtype, tl.dtype]:
    """float64 math for float64 inputs, float32 for every other floating dtype."""
    if dtype == torch.float64:
        return torch.float64, tl.float64
    return torch.float32, tl.float32


def device_guard(x: torch.Tensor):
    """Triton launches on the current CUDA device: make it the device of the inputs."""
    if x.device.type == "cuda":
        return torch.cuda.device(x.device)
    return contextlib.nullcontext()


def meta(*shape: int, dtype: torch.dtype) -> torch.Tensor:
    """An empty tensor on the meta device: the arguments of the launches compiled ahead of time."""
    return torch.empty(shape, dtype=dtype, device="meta")
