"""Functional affine and additive coupling: backend choice, autograd and fake implementations.

The C++ ops (``torch.ops.invkernels.affine_coupling_fwd`` ...) and their Triton twins
(``..._triton``, defined from the C++ schemas by invkernels.ops._registry) share one fake
implementation per op and one autograd formula: the affine forward saves its input ``x`` and the
subnet output ``h``; the affine inverse saves its output ``x`` and ``h``; the additive ops save
nothing. The affine backward is the registered ``*_bwd`` op; the additive one returns views of the
output gradient (``additive_coupling_bwd`` computes the same as one op, for callers outside
autograd). The Triton twins' autograd is registered here; the C++ ops' is compiled
(csrc/autograd.cpp: a Python autograd kernel cost ~60 µs per forward+backward, more than the
whole op on a tabular flow). Math: docs/ops/coupling.md.
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
from invkernels.reference import coupling as reference


class CouplingOps(NamedTuple):
    """One backend's eight coupling ops."""

    affine_fwd: Callable
    affine_inv: Callable
    affine_bwd: Callable
    affine_inv_bwd: Callable
    additive_fwd: Callable
    additive_inv: Callable
    additive_bwd: Callable
    additive_inv_bwd: Callable


def _shift_like(x: torch.Tensor, passthrough: int | None = None) -> torch.Tensor:
    """The additive shift of a coupling input ``x``: ``[B, C - passthrough, *spatial]`` (``C - C // 2``
    when None), contiguous."""
    _, c2 = _validation.split_channels(x.shape[1], passthrough)
    return x.new_empty((x.shape[0], c2, *x.shape[2:]))


def _check_affine(op, x, h, scale, clamp, passthrough=None, x_name="x"):
    _validation.check_scale(op, scale, clamp)
    _validation.check_coupling(op, x, h, affine=True, x_name=x_name, passthrough=passthrough)


def _check_affine_bwd(op, grad_out, grad_logdet, x, h, scale, clamp, reverse, passthrough=None):
    _check_affine(op, x, h, scale, clamp, passthrough)
    _validation.check_grad(op, grad_out, x, "grad_out", "x")
    _validation.check_grad_logdet(op, grad_logdet, x)


def _check_affine_inv_bwd(op, y, h, grad_y, grad_logdet, scale, clamp, passthrough=None):
    _check_affine(op, y, h, scale, clamp, passthrough, "y")
    _validation.check_grad(op, grad_y, y, "grad_y", "y")
    _validation.check_grad_logdet(op, grad_logdet, y)


def _check_additive(op, x, h, passthrough=None, x_name="x"):
    _validation.check_coupling(op, x, h, affine=False, x_name=x_name, passthrough=passthrough)


def _check_additive_bwd(op, grad_out, reverse, passthrough=None):
    _validation.check_coupling_input(op, grad_out, "grad_out", passthrough)


def _check_additive_inv_bwd(op, y, h, grad_y, passthrough=None):
    _check_additive(op, y, h, passthrough, "y")
    _validation.check_grad(op, grad_y, y, "grad_y", "y")


class _Tensors:
    """A coupling's example tensors: input ``x``, affine subnet output ``h``, additive shift ``t``,
    a gradient ``grad`` like ``x`` and a log-det gradient ``gl``."""

    def __init__(self, e: Example):
        c2 = e.channels - e.channels // 2
        self.x, self.h, self.t, self.grad, self.gl = (e.batched(), e.batched(2 * c2), e.batched(c2), e.batched(),
                                                      e.grad_logdet())


def _example(args: Callable[[_Tensors], tuple]) -> Callable[[Example], tuple]:
    return lambda e: args(_Tensors(e))


def _passthrough(position: int, split: Callable[[int], int], h_position: int | None = None, parts: int = 2) -> dict:
    """The variant with ``p = split(C)`` of the example's ``C`` channels passed through: ``p`` at
    ``position`` and, at ``h_position``, a subnet output of ``parts * (C - p)`` channels (the input's
    values, repeated)."""
    def channels(args) -> int:
        return args[0].shape[1]

    variant = {position: lambda args: split(channels(args))}
    if h_position is not None:
        variant[h_position] = lambda args: torch.cat([args[0]] * parts, dim=1)[
            :, : parts * (channels(args) - split(channels(args)))].contiguous()
    return variant


def _peer_scales(position: int, extra: dict | None = None, suffix: str = "") -> dict:
    """Variants with the peers' scale functions at ``position`` (the clamp after it)."""
    scales = {"sigmoid_eps": 2.0, "atan": 1.5, "rational": 6.9}
    return {f"{scale}{suffix}": {position: scale, position + 1: clamp, **(extra or {})}
            for scale, clamp in scales.items()}


def _wide(channels: int) -> int:
    return channels - 1


def _none(channels: int) -> int:
    return 0


def _one(channels: int) -> int:
    return 1


_T = torch.randn
_VALUES = ("elementwise",)
_WITH_LOGDET = ("elementwise", "logdet")

# The eight ops of docs/ops/coupling.md (schemas in csrc/invkernels.cpp), in CouplingOps' order: their
# checks and outputs, which the fake implementations and the Triton twins share, and the rest of
# their descriptors (examples of 5 channels, 2 samples).
_DEFS = {
    "affine_coupling_fwd": OpDef(
        _check_affine, lambda x, *_: (contiguous_like(x), logdet_like(x)),
        reference=reference.affine_coupling_fwd,
        example=_example(lambda t: (t.x, t.h, "exp", 2.0)),
        output_kinds=_WITH_LOGDET, differentiable=(0, 1),
        variants={"sigmoid": {2: "sigmoid"}, **_peer_scales(2), "passthrough-wide": _passthrough(4, _wide, 1),
                  "passthrough-0": _passthrough(4, _none, 1),
                  "passthrough-1-sigmoid": {2: "sigmoid", **_passthrough(4, _one, 1)}},
        bad_arguments=refused((0, lambda: _T(5)), (0, lambda: _T(2, 1, 3)),
                           (0, lambda: torch.ones(2, 5, 3, dtype=torch.long)), (1, lambda: _T(2, 5, 3)),
                           (1, lambda: _T(3, 6, 3)), (1, lambda: _T(2, 6, 4)), (1, lambda: _T(2, 6)),
                           (1, lambda: _T(2, 6, 3, dtype=torch.float64)), (2, lambda: "softplus"),
                           (3, lambda: -1.0), (4, lambda: 5), (4, lambda: -1))),
    "affine_coupling_inv": OpDef(
        partial(_check_affine, x_name="y"), lambda y, *_: (contiguous_like(y), logdet_like(y)),
        reference=reference.affine_coupling_inv,
        example=_example(lambda t: (t.x, t.h, "exp", 2.0)),
        output_kinds=_WITH_LOGDET, differentiable=(0, 1),
        variants={"sigmoid": {2: "sigmoid", 3: 0.5}, **_peer_scales(2), "passthrough-wide": _passthrough(4, _wide, 1),
                  "passthrough-0": _passthrough(4, _none, 1)},
        bad_arguments=refused((1, lambda: _T(2, 4, 3)), (3, lambda: 1e39))),
    "affine_coupling_bwd": OpDef(
        _check_affine_bwd, lambda grad_out, grad_logdet, x, h, *_: (contiguous_like(x), contiguous_like(h)),
        reference=reference.affine_coupling_vjp,
        example=_example(lambda t: (t.grad, t.gl, t.x, t.h, "sigmoid", 2.0, True)),
        output_kinds=_VALUES * 2,
        variants={"exp-forward": {4: "exp", 6: False}, **_peer_scales(4), **_peer_scales(4, {6: False}, "-forward"),
                  "passthrough-wide": _passthrough(7, _wide, 3),
                  "passthrough-0-exp-forward": {4: "exp", 6: False, **_passthrough(7, _none, 3)}},
        bad_arguments=refused((0, lambda: _T(2, 4, 3)), (0, lambda: _T(2, 5, 3, dtype=torch.float64)),
                           (1, lambda: _T(3)), (1, lambda: _T(2, dtype=torch.float64)), (3, lambda: _T(2, 3, 3)),
                           (4, lambda: "softplus"))),
    "affine_coupling_inv_bwd": OpDef(
        _check_affine_inv_bwd, lambda y, h, *_: (contiguous_like(y), contiguous_like(y), contiguous_like(h)),
        reference=reference.affine_coupling_inv_bwd,
        example=_example(lambda t: (t.x, t.h, t.grad, t.gl, "exp", 2.0)),
        output_kinds=_VALUES * 3,
        variants={"sigmoid": {4: "sigmoid"}, **_peer_scales(4), "passthrough-wide": _passthrough(6, _wide, 1),
                  "passthrough-0": _passthrough(6, _none, 1)},
        bad_arguments=refused((1, lambda: _T(2, 5, 3)), (2, lambda: _T(2, 5, 4)), (3, lambda: _T(1)),
                           (5, lambda: 0.0))),
    "additive_coupling_fwd": OpDef(
        _check_additive, lambda x, h, passthrough=None: contiguous_like(x),
        reference=reference.additive_coupling_fwd,
        example=_example(lambda t: (t.x, t.t)),
        output_kinds=_VALUES, differentiable=(0, 1),
        variants={"passthrough-wide": _passthrough(2, _wide, 1, 1), "passthrough-0": _passthrough(2, _none, 1, 1)},
        bad_arguments=refused((1, lambda: _T(2, 6, 3)), (1, lambda: _T(3, 3, 3)), (2, lambda: 5), (2, lambda: 1))),
    "additive_coupling_inv": OpDef(
        partial(_check_additive, x_name="y"), lambda y, h, passthrough=None: contiguous_like(y),
        reference=reference.additive_coupling_inv,
        example=_example(lambda t: (t.x, t.t)),
        output_kinds=_VALUES, differentiable=(0, 1),
        variants={"passthrough-1": _passthrough(2, _one, 1, 1)},
        bad_arguments=refused((0, lambda: _T(2, 1, 3)), (1, lambda: _T(2, 3, 3, dtype=torch.float64)))),
    "additive_coupling_bwd": OpDef(
        _check_additive_bwd,
        lambda grad_out, reverse, passthrough=None: (contiguous_like(grad_out), _shift_like(grad_out, passthrough)),
        reference=reference.additive_coupling_vjp,
        example=_example(lambda t: (t.grad, True)),
        output_kinds=_VALUES * 2,
        variants={"forward": {1: False}, "passthrough-wide": _passthrough(2, _wide),
                  "passthrough-0": _passthrough(2, _none)},
        bad_arguments=refused((0, lambda: _T(2)), (0, lambda: _T(2, 1, 3)),
                           (0, lambda: torch.ones(2, 5, 3, dtype=torch.long)))),
    "additive_coupling_inv_bwd": OpDef(
        _check_additive_inv_bwd,
        lambda y, h, grad_y, passthrough=None: (contiguous_like(y), contiguous_like(y), contiguous_like(h)),
        reference=reference.additive_coupling_inv_bwd,
        example=_example(lambda t: (t.x, t.t, t.grad)),
        output_kinds=_VALUES * 3,
        variants={"passthrough-wide": _passthrough(3, _wide, 1, 1), "passthrough-0": _passthrough(3, _none, 1, 1)},
        bad_arguments=refused((1, lambda: _T(2, 2, 3)), (2, lambda: _T(2, 4, 3)),
                           (2, lambda: _T(2, 5, 3, dtype=torch.float64)))),
}


def _register_autograd(suffix: str, ops: CouplingOps) -> None:
    """Autograd of the forward and inverse ops. The backward runs the fused ``*_bwd`` op; under
    ``create_graph=True`` (grad mode on inside backward) it runs the same formulas in
    differentiable tensor ops instead, so higher derivatives are exact. The C++ ops have it
    compiled (csrc/autograd.cpp, the same formulas; :func:`compiled_autograd`)."""
    if not suffix:
        compiled_autograd(("affine_coupling_fwd", "affine_coupling_inv", "additive_coupling_fwd",
                           "additive_coupling_inv"), "affine_coupling_bwd", ops.affine_bwd,
                          reference.affine_coupling_vjp, 4)
        return

    def name(op: str) -> str:
        return f"invkernels::{op}{suffix}"

    def save_affine(ctx, x, h, scale, clamp, passthrough=None):
        ctx.save_for_backward(x, h)
        ctx.scale, ctx.clamp, ctx.passthrough = scale, clamp, passthrough

    def affine_grads(ctx, grad_out, grad_logdet, reverse):
        if not (ctx.needs_input_grad[0] or ctx.needs_input_grad[1]):
            return None, None, None, None, None
        x, h = ctx.saved_tensors
        bwd = reference.affine_coupling_vjp if torch.is_grad_enabled() else ops.affine_bwd
        grad_in, grad_h = bwd(grad_out, grad_logdet, x, h, ctx.scale, ctx.clamp, reverse, ctx.passthrough)
        return (grad_in if ctx.needs_input_grad[0] else None, grad_h if ctx.needs_input_grad[1] else None,
                None, None, None)

    torch.library.register_autograd(
        name("affine_coupling_fwd"),
        lambda ctx, grad_y, grad_logdet: affine_grads(ctx, grad_y, grad_logdet, False),
        setup_context=lambda ctx, inputs, output: save_affine(ctx, inputs[0], *inputs[1:]))
    torch.library.register_autograd(
        name("affine_coupling_inv"),
        lambda ctx, grad_x, grad_logdet: affine_grads(ctx, grad_x, grad_logdet, True),
        setup_context=lambda ctx, inputs, output: save_affine(ctx, output[0], *inputs[1:]))

    # The additive gradients follow from grad_out alone: no tensor is saved, so h can be freed after
    # the forward.
    def save_additive(ctx, inputs):
        ctx.passthrough = inputs[2] if len(inputs) > 2 else None

    # grad_x is grad_y and grad_h its transformed channels (negated for the inverse): views, not the
    # copies the fused additive_coupling_bwd writes, and no op call (measured on zuko's NICE with
    # additive couplings, [512, 5]: the op's backward node took 44 µs a call).
    def additive_grads(ctx, grad_out, reverse):
        grad_in, grad_h = reference.additive_coupling_vjp(grad_out, reverse, ctx.passthrough)
        return grad_in if ctx.needs_input_grad[0] else None, grad_h if ctx.needs_input_grad[1] else None, None

    for op, reverse in (("additive_coupling_fwd", False), ("additive_coupling_inv", True)):
        torch.library.register_autograd(
            name(op), lambda ctx, g, reverse=reverse: additive_grads(ctx, g, reverse),
            setup_context=lambda ctx, inputs, output: save_additive(ctx, inputs))


_FAMILY = OpFamily("coupling", _DEFS, CouplingOps, "invkernels.triton.coupling", _register_autograd)
cpp_ops = _FAMILY.cpp
triton_ops = _FAMILY.triton
prepare = _FAMILY.prepare
_ops_for = _FAMILY.for_tensor


def affine_coupling_fwd(x: torch.Tensor, h: torch.Tensor, scale: str = "exp", clamp: float = 2.0,
                        passthrough: int | None = None, *,
                        backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused affine coupling: ``y = [x1, x2 * exp(L(hs)) + t]`` and ``logdet = Σ L(hs)`` per sample.

    Args:
        x: ``[B, C, *spatial]`` input; ``x1 = x[:, :passthrough]`` passes through and
            ``x2 = x[:, passthrough:]`` is transformed.
        h: subnet output ``[B, 2 * (C - passthrough), *spatial]``: raw log-scale then shift.
        scale: ``"exp"`` (soft-clamped, ``L = clamp * tanh(hs / clamp)``) or ``"sigmoid"``
            (Glow, ``L = log sigmoid(hs + 2)``).
        clamp: soft-clamp bound of ``"exp"``.
        passthrough: channels passed through, an integer in ``[0, C)``; None (default): ``C // 2``.
        backend: ``"cpp"``, ``"triton"``, ``"reference"`` or None for ``invkernels.get_backend()``.

    Returns:
        ``(y, logdet)`` with ``y`` shaped like ``x`` (its dtype) and ``logdet`` of shape ``[B]`` in
        ``logdet_dtype(x.dtype)``: float32 for float16/bfloat16/float32 inputs (a half log-det
        overflows at 65504), float64 for float64.
    """
    ops = _ops_for(backend, x)
    if ops is None:
        return reference.affine_coupling_fwd(x, h, scale, clamp, passthrough)
    return ops.affine_fwd(x, h, scale, clamp, passthrough)


def affine_coupling_inv(y: torch.Tensor, h: torch.Tensor, scale: str = "exp", clamp: float = 2.0,
                        passthrough: int | None = None, *,
                        backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`affine_coupling_fwd`: ``(x, -logdet)`` from ``y`` and the same ``h``."""
    ops = _ops_for(backend, y)
    if ops is None:
        return reference.affine_coupling_inv(y, h, scale, clamp, passthrough)
    return ops.affine_inv(y, h, scale, clamp, passthrough)


def additive_coupling_fwd(x: torch.Tensor, h: torch.Tensor, passthrough: int | None = None, *,
                          backend: str | None = None) -> torch.Tensor:
    """Fused additive coupling ``y = [x1, x2 + h]`` (log-det 0): ``x1 = x[:, :passthrough]``
    (``C // 2`` channels when None) and ``h`` of the other channels' shape."""
    ops = _ops_for(backend, x)
    if ops is None:
        return reference.additive_coupling_fwd(x, h, passthrough)
    return ops.additive_fwd(x, h, passthrough)


def additive_coupling_inv(y: torch.Tensor, h: torch.Tensor, passthrough: int | None = None, *,
                          backend: str | None = None) -> torch.Tensor:
    """Inverse of :func:`additive_coupling_fwd`: ``x = [y1, y2 - h]``."""
    ops = _ops_for(backend, y)
    if ops is None:
        return reference.additive_coupling_inv(y, h, passthrough)
    return ops.additive_inv(y, h, passthrough)


def affine_coupling_inv_bwd(y: torch.Tensor, h: torch.Tensor, grad_y: torch.Tensor, grad_logdet: torch.Tensor,
                            scale: str = "exp", clamp: float = 2.0, passthrough: int | None = None, *,
                            backend: str | None = None):
    """Inverse and backward of the affine coupling in one pass (memory-free backprop).

    From the forward's output ``y`` and the subnet output ``h`` (computed from ``y``'s untouched
    first channels, which equal ``x1``): ``x`` rebuilt, and the gradients of
    :func:`affine_coupling_fwd` at ``(x, h)`` for ``(grad_y, grad_logdet)``. ``grad_x[:, :p]``
    (``p = passthrough``) is ``grad_y[:, :p]``: the caller adds the gradient that reaches ``x1``
    through the subnet. Not differentiable (it is a backward); ``grad_logdet``: ``[B]`` in the
    log-det dtype (float32 for half inputs, as :func:`affine_coupling_fwd` returns it).

    Returns:
        ``(x, grad_x, grad_h)``, contiguous.
    """
    ops = _ops_for(backend, y)
    if ops is None:
        return reference.affine_coupling_inv_bwd(y, h, grad_y, grad_logdet, scale, clamp, passthrough)
    return ops.affine_inv_bwd(y, h, grad_y, grad_logdet, scale, clamp, passthrough)


def additive_coupling_inv_bwd(y: torch.Tensor, h: torch.Tensor, grad_y: torch.Tensor,
                              passthrough: int | None = None, *, backend: str | None = None):
    """Inverse and backward of the additive coupling in one pass, as :func:`affine_coupling_inv_bwd`:
    ``(x, grad_x, grad_h)`` with ``x = [y1, y2 - h]``, ``grad_x = grad_y``, ``grad_h = grad_y2``."""
    ops = _ops_for(backend, y)
    if ops is None:
        return reference.additive_coupling_inv_bwd(y, h, grad_y, passthrough)
    return ops.additive_inv_bwd(y, h, grad_y, passthrough)
