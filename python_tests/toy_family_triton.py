"""The Triton module of the throwaway op family of toy_family.py: one kernel ``y = alpha * x``,
its launchers, the tiles it launches with on a GPU and the launches that reach them."""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from invkernels.triton._common import MAX_TILE_INTERPRETER, check_device, compute_dtype, interpreting, meta


@triton.jit
def _toy_scale_kernel(x_ptr, y_ptr, alpha, n, COMPUTE: tl.constexpr, BLOCK: tl.constexpr):
    # x_ptr, y_ptr: [n] contiguous.
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    x = tl.load(x_ptr + offsets, mask=mask).to(COMPUTE)
    tl.store(y_ptr + offsets, (x * alpha).to(y_ptr.dtype.element_ty), mask=mask)


class ToyConfig(NamedTuple):
    block: int
    num_warps: int


GPU_CONFIG = ToyConfig(256, 4)


def gpu_configs() -> dict[str, tuple[ToyConfig, ...]]:
    return {"_toy_scale_kernel": (GPU_CONFIG,)}


def toy_scale(x: torch.Tensor, alpha: float, name: str = "x") -> torch.Tensor:
    check_device("toy_scale", x, name)
    x = x.contiguous()
    y = torch.empty_like(x, memory_format=torch.contiguous_format)
    n = x.numel()
    if n == 0:
        return y
    block = min(triton.next_power_of_2(n), MAX_TILE_INTERPRETER) if interpreting() else GPU_CONFIG.block
    _, compute = compute_dtype(x.dtype)
    _toy_scale_kernel[(triton.cdiv(n, block),)](x_ptr=x, y_ptr=y, alpha=alpha, n=n, COMPUTE=compute, BLOCK=block,
                                                num_warps=GPU_CONFIG.num_warps)
    return y


def aot_cases(dtype: torch.dtype):
    x = meta(2, 4, 64, dtype=dtype)
    yield "toy_scale_fwd", (x, 2.0)
    yield "toy_scale_bwd", (x, 2.0)


LAUNCHERS = {
    "toy_scale_fwd": toy_scale,
    "toy_scale_bwd": lambda grad_y, alpha: toy_scale(grad_y, alpha, "grad_y"),
}
