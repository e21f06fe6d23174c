"""A throwaway op family made from its descriptor alone, to show that nothing else names an op:
``toy_scale_fwd(x, alpha) = alpha * x`` and its backward, with a CPU kernel in Python standing in
for a C++ one, a Triton module (toy_family_triton.py), a float64 reference.

Loaded as a pytest plugin (``-p toy_family``, with python_tests on PYTHONPATH) the op matrix and the
twins' tests collect the family's ops with the package's; imported, it makes the family for the
ahead-of-time list (test_op_descriptor.py runs both in subprocesses).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch

import invkernels  # noqa: F401  (the package's families first)
from invkernels.ops._registry import OpDef, OpFamily, contiguous_like, refused

_LIBRARY = torch.library.Library("invkernels", "FRAGMENT")
_LIBRARY.define("toy_scale_fwd(Tensor x, float alpha) -> Tensor")
_LIBRARY.define("toy_scale_bwd(Tensor grad_y, float alpha) -> Tensor")


def _check(op, x, alpha, x_name="x"):
    if x.dim() < 2:
        raise ValueError(f"{op}: {x_name} should have a batch and channels, got {x.dim()}-D")
    if not x.is_floating_point():
        raise ValueError(f"{op}: {x_name} should be floating point, got {x.dtype}")


def _cpu_kernel(name: str, x_name: str) -> Callable:
    def kernel(x, alpha):
        _check(name, x, alpha, x_name)
        return (x.float() * alpha).to(x.dtype).contiguous() if x.dtype != torch.float64 else (x * alpha).contiguous()

    return kernel


_LIBRARY.impl("toy_scale_fwd", _cpu_kernel("toy_scale_fwd", "x"), "CPU")
_LIBRARY.impl("toy_scale_bwd", _cpu_kernel("toy_scale_bwd", "grad_y"), "CPU")


class ToyOps(NamedTuple):
    fwd: Callable
    bwd: Callable


def _reference(x, alpha):
    return x * alpha


def _register_autograd(suffix: str, ops: ToyOps) -> None:
    def backward(ctx, grad_y):
        if torch.is_grad_enabled():
            return _reference(grad_y, ctx.alpha), None
        return ops.bwd(grad_y, ctx.alpha), None

    def setup_context(ctx, inputs, output):
        ctx.alpha = inputs[1]

    torch.library.register_autograd(f"invkernels::toy_scale_fwd{suffix}", backward, setup_context=setup_context)


_BAD = refused((0, lambda: torch.randn(5)), (0, lambda: torch.ones(2, 5, 3, dtype=torch.long)))

FAMILY = OpFamily("toy", {
    "toy_scale_fwd": OpDef(_check, lambda x, alpha: contiguous_like(x), reference=_reference,
                           example=lambda e: (e.batched(), 1.5), output_kinds=("elementwise",), differentiable=(0,),
                           variants={"negative": {1: -0.25}}, bad_arguments=_BAD),
    "toy_scale_bwd": OpDef(lambda op, g, alpha: _check(op, g, alpha, "grad_y"), lambda g, alpha: contiguous_like(g),
                           reference=_reference, example=lambda e: (e.batched(), 1.5), output_kinds=("elementwise",),
                           bad_arguments=_BAD),
}, ToyOps, "toy_family_triton", _register_autograd)
