"""Functional ActNorm: backend choice, autograd and fake implementations.

The C++ ops (``torch.ops.invkernels.actnorm_fwd`` ...) and their Triton twins (``..._triton``,
defined from the C++ schemas by invkernels.ops._registry) share one fake implementation per op and
one autograd formula: the forward saves its input, the inverse its output (the data-side
tensor ``x`` in both cases) with the parameters, and backward is the registered ``actnorm_bwd``
op (the same formulas in tensor ops under ``create_graph=True``). Math: docs/ops/actnorm.md.
"""

from __future__ import annotations

from functools import partial
from typing import Callable, NamedTuple

import torch

from invkernels import _validation
from invkernels.ops._registry import (
    Example,
    OpDef,
    OpFamily,
    compiled_autograd,
    contiguous_like,
    logdet_like,
    refused,
)
from invkernels.reference import actnorm as reference
from invkernels.reference.actnorm import actnorm_logdet, actnorm_logdet_grad

__all__ = ["actnorm_fwd", "actnorm_inv", "actnorm_logdet", "actnorm_logdet_grad", "actnorm_vjp", "cpp_ops",
           "prepare", "triton_ops"]


class ActNormOps(NamedTuple):
    """One backend's three ActNorm ops."""

    fwd: object
    inv: object
    bwd: object


def _check_bwd(op, grad_out, grad_logdet, x, bias, log_scale, reverse):
    _validation.check_actnorm(op, x, bias, log_scale)
    _validation.check_grad(op, grad_out, x, "grad_out", "x")
    _validation.check_grad_logdet(op, grad_logdet, x)


def _example(args: Callable[..., tuple]) -> Callable[[Example], tuple]:
    """``args(x, bias, log_scale, grad, grad_logdet)`` of an example's tensors."""
    return lambda e: args(e.batched(), e.per_channel(), e.per_channel(0.3), e.batched(), e.grad_logdet())


_T = torch.randn

# The three ops of docs/ops/actnorm.md (schemas in csrc/invkernels.cpp), in ActNormOps' order: their
# checks and outputs, which the fake implementations and the Triton twins share, and the rest of
# their descriptors.
_DEFS = {
    "actnorm_fwd": OpDef(
        _validation.check_actnorm, lambda x, *_: (contiguous_like(x), logdet_like(x)),
        reference=reference.actnorm_fwd, example=_example(lambda x, b, ls, g, gl: (x, b, ls)),
        output_kinds=("elementwise", "logdet"), differentiable=(0, 1, 2),
        bad_arguments=refused((0, lambda: _T(5)), (1, lambda: _T(4)), (2, lambda: _T(5, dtype=torch.float64)))),
    "actnorm_inv": OpDef(
        partial(_validation.check_actnorm, x_name="y"), lambda y, *_: (contiguous_like(y), logdet_like(y)),
        reference=reference.actnorm_inv, example=_example(lambda x, b, ls, g, gl: (x, b, ls)),
        output_kinds=("elementwise", "logdet"), differentiable=(0, 1, 2),
        bad_arguments=refused((1, lambda: _T(5, 1)))),
    "actnorm_bwd": OpDef(
        _check_bwd, lambda grad_out, grad_logdet, x, bias, log_scale, reverse: (
            contiguous_like(x), contiguous_like(bias), contiguous_like(log_scale)),
        reference=reference.actnorm_vjp, example=_example(lambda x, b, ls, g, gl: (g, gl, x, b, ls, False)),
        output_kinds=("elementwise", "param_grad", "param_grad"), variants={"reverse": {5: True}},
        bad_arguments=refused((0, lambda: _T(2, 5, 4)), (0, lambda: _T(2, 5, 3, dtype=torch.float64)),
                           (1, lambda: _T(3)), (1, lambda: _T(2, dtype=torch.float64)), (3, lambda: _T(4)),
                           (4, lambda: _T(5, dtype=torch.float64)))),
}


def _register_autograd(suffix: str, ops: ActNormOps) -> None:
    """Autograd of the forward and inverse ops: the fused ``actnorm_bwd``, or under
    ``create_graph=True`` the reference formula. The C++ ops have it compiled (csrc/autograd.cpp;
    :func:`compiled_autograd`)."""
    if not suffix:
        compiled_autograd(("actnorm_fwd", "actnorm_inv"), "actnorm_bwd", ops.bwd, reference.actnorm_vjp, 5)
        return

    def setup(ctx, x, bias, log_scale):
        ctx.save_for_backward(x, bias, log_scale)

    def grads(ctx, grad_out, grad_logdet, reverse):
        if not any(ctx.needs_input_grad):
            return None, None, None
        x, bias, log_scale = ctx.saved_tensors
        bwd = reference.actnorm_vjp if torch.is_grad_enabled() else ops.bwd
        out = bwd(grad_out, grad_logdet, x, bias, log_scale, reverse)
        return tuple(g if need else None for g, need in zip(out, ctx.needs_input_grad))

    torch.library.register_autograd(
        f"invkernels::actnorm_fwd{suffix}", lambda ctx, g, gl: grads(ctx, g, gl, False),
        setup_context=lambda ctx, inputs, output: setup(ctx, *inputs))
    torch.library.register_autograd(
        f"invkernels::actnorm_inv{suffix}", lambda ctx, g, gl: grads(ctx, g, gl, True),
        setup_context=lambda ctx, inputs, output: setup(ctx, output[0], *inputs[1:]))


_FAMILY = OpFamily("actnorm", _DEFS, ActNormOps, "invkernels.triton.actnorm", _register_autograd)
cpp_ops = _FAMILY.cpp
triton_ops = _FAMILY.triton
prepare = _FAMILY.prepare
_ops_for = _FAMILY.for_tensor


def actnorm_fwd(x: torch.Tensor, bias: torch.Tensor, log_scale: torch.Tensor, *,
                backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused ActNorm ``y = (x + bias) * exp(log_scale)`` per channel and ``logdet = S * Σ log_scale``.

    ``y`` has the dtype of ``x``; ``logdet`` (``[B]``) has ``logdet_dtype(x.dtype)``: float32 for
    float16/bfloat16/float32 inputs (a half log-det overflows at 65504), float64 for float64.

    Args:
        x: ``[B, C, *spatial]``.
        bias, log_scale: ``[C]``, same dtype and device as ``x``.
        backend: ``"cpp"``, ``"triton"``, ``"reference"`` or None for ``invkernels.get_backend()``.
    """
    ops = _ops_for(backend, x)
    if ops is None:
        _validation.check_actnorm("actnorm_fwd", x, bias, log_scale)
        return reference.actnorm_fwd(x, bias, log_scale)
    return ops.fwd(x, bias, log_scale)


def actnorm_inv(y: torch.Tensor, bias: torch.Tensor, log_scale: torch.Tensor, *,
                backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`actnorm_fwd`: ``(x, -logdet)``."""
    ops = _ops_for(backend, y)
    if ops is None:
        _validation.check_actnorm("actnorm_inv", y, bias, log_scale, "y")
        return reference.actnorm_inv(y, bias, log_scale)
    return ops.inv(y, bias, log_scale)


def actnorm_vjp(grad_out: torch.Tensor, grad_logdet: torch.Tensor, x: torch.Tensor, bias: torch.Tensor,
                log_scale: torch.Tensor, *, backend: str | None = None):
    """``(grad_x, grad_bias, grad_log_scale)`` of :func:`actnorm_fwd` at ``x`` for the gradients
    ``(grad_out, grad_logdet)`` of its outputs (``grad_logdet`` in the log-det dtype, float32 for
    half inputs): the registered ``actnorm_bwd`` op (the reference formulas for
    ``backend="reference"``). Not differentiable (it is a backward)."""
    ops = _ops_for(backend, x)
    if ops is None:
        _check_bwd("actnorm_bwd", grad_out, grad_logdet, x, bias, log_scale, False)
        return reference.actnorm_vjp(grad_out, grad_logdet, x, bias, log_scale, False)
    return ops.bwd(grad_out, grad_logdet, x, bias, log_scale, False)
