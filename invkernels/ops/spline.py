"""Functional rational-quadratic spline: backend choice, autograd and fake implementations.

The C++ ops (``torch.ops.invkernels.rq_spline_fwd`` ...) and their Triton twins (``..._triton``,
defined from the C++ schemas by invkernels.ops._registry) share one fake implementation per op and
one autograd formula: the forward saves its input ``x`` and the parameters ``h``; the inverse its
input ``y``, its output ``x`` and ``h``; backward is the registered ``rq_spline_bwd`` op at the
data-side ``x``. Under ``create_graph=True`` the backward differentiates the float64-capable
reference instead, so higher derivatives are exact. Math, layout and numerics: docs/ops/spline.md.
"""

from __future__ import annotations

from functools import partial
from typing import Callable, NamedTuple

import torch

from invkernels import _validation
from invkernels.ops._registry import Example, OpDef, OpFamily, contiguous_like, logdet_like, refused
from invkernels.reference import spline as reference

__all__ = ["cpp_ops", "prepare", "rq_spline_fwd", "rq_spline_inv", "rq_spline_inv_bwd", "rq_spline_vjp",
           "triton_ops"]


class SplineOps(NamedTuple):
    """One backend's four spline ops."""

    fwd: Callable
    inv: Callable
    bwd: Callable
    inv_bwd: Callable


def _check(op, x, h, bins, tail_bound=3.0, min_bin_width=1e-3, min_bin_height=1e-3, min_derivative=1e-3,
           passthrough=0, x_name="x"):
    _validation.check_spline(op, x, h, bins, tail_bound, min_bin_width, min_bin_height, min_derivative, passthrough,
                             x_name)


def _check_bwd(op, grad_out, grad_logdet, x, h, bins, tail_bound, min_bin_width, min_bin_height, min_derivative,
               reverse, passthrough=0):
    _check(op, x, h, bins, tail_bound, min_bin_width, min_bin_height, min_derivative, passthrough)
    _validation.check_grad(op, grad_out, x, "grad_out", "x")
    _validation.check_grad_logdet(op, grad_logdet, x)


def _check_inv_bwd(op, y, h, grad_y, grad_logdet, bins, tail_bound, min_bin_width, min_bin_height, min_derivative,
                   passthrough=0):
    _check(op, y, h, bins, tail_bound, min_bin_width, min_bin_height, min_derivative, passthrough, "y")
    _validation.check_grad(op, grad_y, y, "grad_y", "y")
    _validation.check_grad_logdet(op, grad_logdet, y)


# The examples: 3 bins, tail bound 2 (standard normal inputs reach both tails), the minimum sizes
# and derivative of the variant "settings" far from nflows' defaults.
_BINS = 3
_SETTINGS = (2.0, 1e-3, 1e-3, 1e-3)


class _Tensors:
    """A spline's example tensors: input ``x``, parameters ``h`` (``3 * bins - 1`` per element), a
    gradient ``grad`` like ``x`` and a log-det gradient ``gl``. The raw parameters have standard
    deviation 0.5, so the slopes stay within ~[0.2, 5]: a value's float32 error is the rounding of
    its knots (sums over the bins) times the slope, within the elementwise tolerance. The
    gradients' rounding grows with the slopes over the bin widths: they are ``"conditioned"``
    outputs (hostile parameters are python_tests/test_spline_ops.py's)."""

    def __init__(self, e: Example):
        self.x, self.grad, self.gl = e.batched(scale=1.5), e.batched(), e.grad_logdet()
        self.h = e.batched(e.channels * (3 * _BINS - 1), scale=0.5)


def _example(args: Callable[[_Tensors], tuple]) -> Callable[[Example], tuple]:
    return lambda e: args(_Tensors(e))


_T = torch.randn
_PARAMS = 3 * _BINS - 1


def _passthrough(h_position: int, position: int, channels: int = 2) -> dict:
    """The variant with the first ``channels`` channels passed through: the setting at
    ``position`` and the parameters at ``h_position`` without those channels'."""
    return {h_position: lambda args: args[h_position][:, channels * _PARAMS:].contiguous(), position: channels}


_VARIANTS = {"settings": {3: 1.0, 4: 1e-2, 5: 5e-2, 6: 0.2}, "passthrough": _passthrough(1, 7)}
_WITH_LOGDET = ("elementwise", "logdet")

# The four ops of docs/ops/spline.md (schemas in csrc/invkernels.cpp), in SplineOps' order: their
# checks and outputs, which the fake implementations and the Triton twins share, and the rest of
# their descriptors (examples of 5 channels, 2 samples, 3 positions).
_DEFS = {
    "rq_spline_fwd": OpDef(
        _check, lambda x, *_, **__: (contiguous_like(x), logdet_like(x)),
        reference=reference.rq_spline_fwd, example=_example(lambda t: (t.x, t.h, _BINS, *_SETTINGS)),
        output_kinds=_WITH_LOGDET, differentiable=(0, 1), variants=_VARIANTS,
        bad_arguments=refused((0, lambda: _T(5)), (0, lambda: torch.ones(2, 5, 3, dtype=torch.long)),
                           (2, lambda: 0), (3, lambda: 0.0), (3, lambda: 1e39), (4, lambda: 0.5),
                           (5, lambda: 1e-7), (6, lambda: 1.0), (7, lambda: 5), (7, lambda: -1),
                           (1, lambda: _T(2, 40, 3, dtype=torch.float64)),
                           (1, lambda: _T(2, 40, 4)), (1, lambda: _T(3, 40, 3)), (1, lambda: _T(2, 39, 3)))),
    "rq_spline_inv": OpDef(
        partial(_check, x_name="y"), lambda y, *_, **__: (contiguous_like(y), logdet_like(y)),
        reference=reference.rq_spline_inv, example=_example(lambda t: (t.x, t.h, _BINS, *_SETTINGS)),
        output_kinds=_WITH_LOGDET, differentiable=(0, 1), variants=_VARIANTS,
        bad_arguments=refused((0, lambda: _T(2)), (2, lambda: -1), (1, lambda: _T(2, 41, 3)))),
    "rq_spline_bwd": OpDef(
        _check_bwd, lambda grad_out, grad_logdet, x, h, *_: (contiguous_like(x), contiguous_like(h)),
        reference=reference.rq_spline_vjp,
        example=_example(lambda t: (t.grad, t.gl, t.x, t.h, _BINS, *_SETTINGS, False)),
        output_kinds=("conditioned", "conditioned"),
        variants={"reverse": {9: True}, "settings-reverse": {5: 1.0, 6: 1e-2, 7: 5e-2, 8: 0.2, 9: True},
                  "passthrough": _passthrough(3, 10), "passthrough-reverse": {9: True, **_passthrough(3, 10)}},
        bad_arguments=refused((0, lambda: _T(2, 5, 4)), (0, lambda: _T(2, 5, 3, dtype=torch.float64)),
                           (1, lambda: _T(3)), (1, lambda: _T(2, dtype=torch.float64)), (3, lambda: _T(2, 41, 3)),
                           (4, lambda: 0), (10, lambda: 5))),
    "rq_spline_inv_bwd": OpDef(
        _check_inv_bwd, lambda y, h, *_: (contiguous_like(y), contiguous_like(y), contiguous_like(h)),
        reference=reference.rq_spline_inv_bwd,
        example=_example(lambda t: (t.x, t.h, t.grad, t.gl, _BINS, *_SETTINGS)),
        output_kinds=("elementwise", "conditioned", "conditioned"),
        variants={"settings": {5: 1.0, 6: 1e-2, 7: 5e-2, 8: 0.2}, "passthrough": _passthrough(1, 9)},
        bad_arguments=refused((1, lambda: _T(2, 40, 3, dtype=torch.float64)), (2, lambda: _T(2, 5, 4)),
                           (3, lambda: _T(1)), (5, lambda: -3.0), (9, lambda: 7))),
}


def _graph_vjp(op: Callable, inputs: tuple[torch.Tensor, torch.Tensor], needs: tuple[bool, bool], grads, settings):
    """The VJP of the reference ``op`` at ``inputs`` with a graph (``create_graph=True``): the
    gradients of the inputs in ``needs`` (None for the others)."""
    wanted = [t for t, need in zip(inputs, needs) if need and t.requires_grad]
    with torch.enable_grad():
        outputs = op(*inputs, *settings)
        got = iter(torch.autograd.grad(outputs, wanted, grads, create_graph=True, allow_unused=True))
    return tuple(next(got) if need and t.requires_grad else None for t, need in zip(inputs, needs))


def _register_autograd(suffix: str, ops: SplineOps) -> None:
    """Autograd of the forward and inverse ops: the fused ``rq_spline_bwd`` op, or under
    ``create_graph=True`` (grad mode on inside backward) the reference differentiated with a graph."""

    def grads(ctx, grad_out, grad_logdet, reverse):
        needs = ctx.needs_input_grad[:2]
        none = (None,) * 6
        if not any(needs):
            return (None, None, *none)
        saved = ctx.saved_tensors
        if torch.is_grad_enabled():
            op = reference.rq_spline_inv if reverse else reference.rq_spline_fwd
            inputs = (saved[0], saved[-1])
            return (*_graph_vjp(op, inputs, needs, (grad_out, grad_logdet), ctx.settings), *none)
        x, h = saved[-2], saved[-1]
        *settings, passthrough = ctx.settings
        grad_in, grad_h = ops.bwd(grad_out, grad_logdet, x, h, *settings, reverse, passthrough)
        return (grad_in if needs[0] else None, grad_h if needs[1] else None, *none)

    def save(ctx, tensors, settings):
        ctx.save_for_backward(*tensors)
        ctx.settings = settings

    torch.library.register_autograd(
        f"invkernels::rq_spline_fwd{suffix}", lambda ctx, g, gl: grads(ctx, g, gl, False),
        setup_context=lambda ctx, inputs, output: save(ctx, inputs[:2], inputs[2:]))
    torch.library.register_autograd(
        f"invkernels::rq_spline_inv{suffix}", lambda ctx, g, gl: grads(ctx, g, gl, True),
        setup_context=lambda ctx, inputs, output: save(ctx, (inputs[0], output[0], inputs[1]), inputs[2:]))


_FAMILY = OpFamily("spline", _DEFS, SplineOps, "invkernels.triton.spline", _register_autograd)
cpp_ops = _FAMILY.cpp
triton_ops = _FAMILY.triton
prepare = _FAMILY.prepare
_ops_for = _FAMILY.for_tensor


def rq_spline_fwd(x: torch.Tensor, h: torch.Tensor, bins: int, tail_bound: float = 3.0, min_bin_width: float = 1e-3,
                  min_bin_height: float = 1e-3, min_derivative: float = 1e-3, passthrough: int = 0, *,
                  backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused rational-quadratic spline with linear tails, elementwise: ``(y, logdet)``, nflows'
    ``unconstrained_rational_quadratic_spline(..., tails="linear")`` in one pass.

    Args:
        x: ``[B, C, *spatial]``.
        h: ``[B, (C - passthrough) * (3 * bins - 1), *spatial]``;
            ``h.unflatten(1, (C - passthrough, 3 * bins - 1))`` holds per transformed element
            ``bins`` unnormalized widths, ``bins`` unnormalized heights and ``bins - 1``
            unnormalized interior derivatives. Same dtype and device as ``x``.
        bins: number of bins (``>= 1``).
        tail_bound: the spline covers ``[-tail_bound, tail_bound]``; identity outside.
        min_bin_width, min_bin_height: minimum bin sizes as fractions of the range, in
            ``[1e-6, 1 / bins)``; min_derivative: minimum knot derivative, in ``[1e-6, 1)``.
        passthrough: the first ``passthrough`` channels of ``x`` are copied to ``y`` untouched
            (a coupling's conditioning half, in ``[0, C)``); the spline transforms the others in
            place in the full tensor, without slicing them out.
        backend: ``"cpp"``, ``"triton"``, ``"reference"`` or None for ``invkernels.get_backend()``.

    Returns:
        ``y`` (``x``'s dtype; float16/bfloat16 computed in float32) and ``logdet`` ``[B]`` in
        ``logdet_dtype(x.dtype)``.
    """
    settings = (bins, tail_bound, min_bin_width, min_bin_height, min_derivative, passthrough)
    ops = _ops_for(backend, x)
    if ops is None:
        return reference.rq_spline_fwd(x, h, *settings)
    return ops.fwd(x, h, *settings)


def rq_spline_inv(y: torch.Tensor, h: torch.Tensor, bins: int, tail_bound: float = 3.0, min_bin_width: float = 1e-3,
                  min_bin_height: float = 1e-3, min_derivative: float = 1e-3, passthrough: int = 0, *,
                  backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`rq_spline_fwd` with the same ``h`` (and ``passthrough``): ``(x, logdet of
    the inverse)``, the log-det being minus the forward's at ``x``."""
    settings = (bins, tail_bound, min_bin_width, min_bin_height, min_derivative, passthrough)
    ops = _ops_for(backend, y)
    if ops is None:
        return reference.rq_spline_inv(y, h, *settings)
    return ops.inv(y, h, *settings)


def rq_spline_vjp(grad_out: torch.Tensor, grad_logdet: torch.Tensor, x: torch.Tensor, h: torch.Tensor, bins: int,
                  tail_bound: float = 3.0, min_bin_width: float = 1e-3, min_bin_height: float = 1e-3,
                  min_derivative: float = 1e-3, reverse: bool = False, passthrough: int = 0, *,
                  backend: str | None = None):
    """``(grad_in, grad_h)``: the VJP of :func:`rq_spline_fwd` at its input ``x``, or with ``reverse``
    of :func:`rq_spline_inv` at its output ``x``, for the gradients ``(grad_out, grad_logdet)`` of
    the op's outputs (``grad_logdet`` in the log-det dtype; ``grad_in``'s passed-through channels
    are ``grad_out``'s). Not differentiable (it is a backward)."""
    settings = (bins, tail_bound, min_bin_width, min_bin_height, min_derivative)
    ops = _ops_for(backend, x)
    if ops is None:
        _check_bwd("rq_spline_bwd", grad_out, grad_logdet, x, h, *settings, reverse, passthrough)
        return reference.rq_spline_vjp(grad_out, grad_logdet, x, h, *settings, reverse, passthrough)
    return ops.bwd(grad_out, grad_logdet, x, h, *settings, reverse, passthrough)


def rq_spline_inv_bwd(y: torch.Tensor, h: torch.Tensor, grad_y: torch.Tensor, grad_logdet: torch.Tensor, bins: int,
                      tail_bound: float = 3.0, min_bin_width: float = 1e-3, min_bin_height: float = 1e-3,
                      min_derivative: float = 1e-3, passthrough: int = 0, *, backend: str | None = None):
    """Inverse and backward in one pass (memory-free backprop): ``(x, grad_x, grad_h)`` with ``x``
    rebuilt from the forward's output ``y`` and the VJP of :func:`rq_spline_fwd` at ``(x, h)`` for
    ``(grad_y, grad_logdet)`` (the passed-through channels of ``x`` and ``grad_x`` are ``y``'s and
    ``grad_y``'s). Not differentiable (it is a backward)."""
    settings = (bins, tail_bound, min_bin_width, min_bin_height, min_derivative, passthrough)
    ops = _ops_for(backend, y)
    if ops is None:
        _check_inv_bwd("rq_spline_inv_bwd", y, h, grad_y, grad_logdet, *settings)
        return reference.rq_spline_inv_bwd(y, h, grad_y, grad_logdet, *settings)
    return ops.inv_bwd(y, h, grad_y, grad_logdet, *settings)
