"""Functional LU-decomposed invertible 1x1 convolution (Glow): weight assembly, inverse weight,
per-pixel product and log-determinant.

``W = P L U'`` is assembled from its factors by the registered op
``torch.ops.invkernels.invconv_weight`` (backward: ``invconv_weight_bwd``), and the per-pixel
product ``y = W x`` (with an ActNorm optionally folded in) by ``conv1x1`` (backward:
``conv1x1_bwd``). The C++ ops run their products through torch's BLAS / cuBLAS; their Triton twins
(``..._triton``, defined from the C++ schemas by invkernels.ops._registry) launch the Triton GEMMs
of invkernels/triton/invconv.py. Both backends share one fake implementation per op and one
autograd formula (under ``create_graph=True`` the same formulas in differentiable tensor ops from
the reference). ``W⁻¹ = U'⁻¹ L⁻¹ Pᵀ`` is built from the factors by two triangular solves in float64
(plain torch ops, differentiable), never by inverting the dense ``W``. Math: docs/ops/invconv.md.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch

from invkernels import _validation
from invkernels.ops._registry import Example, OpDef, OpFamily, compiled_autograd, contiguous_like, refused
from invkernels.reference import invconv as reference


class InvConvOps(NamedTuple):
    """One backend's four ops: weight assembly and the per-position product, with their backwards."""

    weight: Callable
    weight_bwd: Callable
    conv1x1: Callable
    conv1x1_bwd: Callable


def _check_weight_bwd(op, grad_w, perm, lower, upper, sign, log_s):
    _validation.check_factors(op, perm, lower, upper, sign, log_s)
    _validation.check_grad(op, grad_w, lower, "grad_w", "lower")


def _check_conv1x1(op, x, weight, bias=None, log_scale=None):
    _validation.check_product(op, x, weight, bias, log_scale)


def _check_conv1x1_bwd(op, grad_y, x, weight, bias, log_scale, output_mask):
    _validation.check_product(op, x, weight, bias, log_scale)
    _validation.check_grad(op, grad_y, x, "grad_y", "x")


def _conv1x1_bwd_outputs(grad_y, x, weight, bias, log_scale, output_mask):
    folded = bias is not None and output_mask[2]
    return (product_like(x) if output_mask[0] else None,
            contiguous_like(weight) if output_mask[1] else None,
            contiguous_like(bias) if folded else None,
            contiguous_like(log_scale) if folded else None)


def _factors(e: Example) -> tuple[torch.Tensor, ...]:
    """Example LU factors ``(perm, lower, upper, sign, log_s)`` (full matrices: the ops read one
    triangle each)."""
    c = e.channels
    sign = torch.where(torch.rand(c) < 0.5, -1.0, 1.0).to(dtype=e.dtype, device=e.device)
    return (torch.randperm(c).to(e.device), e.randn(c, c, scale=0.5), e.randn(c, c, scale=0.5), sign,
            e.per_channel(0.3))


def _product(args: Callable[..., tuple]) -> Callable[[Example], tuple]:
    """``args(x, weight, bias, log_scale, grad_y)`` of an example's tensors."""
    return lambda e: args(e.batched(), e.randn(e.channels, e.channels, scale=e.channels**-0.5), e.per_channel(),
                          e.per_channel(0.3), e.batched())


_T = torch.randn

# The four ops of docs/ops/invconv.md (schemas in csrc/invkernels.cpp), in InvConvOps' order: their
# checks and outputs, which the fake implementations and the Triton twins share, and the rest of
# their descriptors.
_DEFS = {
    "invconv_weight": OpDef(
        _validation.check_factors, lambda perm, lower, *_: contiguous_like(lower),
        reference=reference.invconv_weight, example=_factors, output_kinds=("channel_mix",), differentiable=(1, 2, 4),
        bad_arguments=refused((0, lambda: torch.randperm(4)), (0, lambda: torch.arange(5, dtype=torch.int32)),
                              (1, lambda: _T(5, 4)), (1, lambda: torch.ones(5, 5, dtype=torch.long)),
                              (2, lambda: _T(4, 4)), (2, lambda: _T(5, 5, dtype=torch.float64)),
                              (3, lambda: torch.ones(4)), (4, lambda: _T(5, dtype=torch.float64)))),
    "invconv_weight_bwd": OpDef(
        _check_weight_bwd, lambda grad_w, perm, lower, upper, sign, log_s: (
            contiguous_like(lower), contiguous_like(upper), contiguous_like(log_s)),
        reference=reference.invconv_weight_vjp,
        example=lambda e: (e.randn(e.channels, e.channels, scale=e.channels**-0.5), *_factors(e)),
        output_kinds=("channel_mix",) * 3,
        bad_arguments=refused((0, lambda: _T(4, 4)), (0, lambda: _T(5, 5, dtype=torch.float64)),
                              (5, lambda: _T(3)))),
    "conv1x1": OpDef(
        _check_conv1x1, lambda x, *_, **__: product_like(x),
        reference=reference.conv1x1, example=_product(lambda x, w, b, ls, g: (x, w, b, ls)),
        output_kinds=("channel_mix",), differentiable=(0, 1, 2, 3), variants={"unfolded": {2: None, 3: None}},
        bad_arguments=refused((0, lambda: _T(5)), (0, lambda: torch.ones(2, 5, 3, dtype=torch.long)),
                              (1, lambda: _T(4, 4)), (1, lambda: _T(5, 5, dtype=torch.float64)), (2, lambda: None),
                              (2, lambda: _T(4)), (3, lambda: _T(5, dtype=torch.float64)))),
    "conv1x1_bwd": OpDef(
        _check_conv1x1_bwd, _conv1x1_bwd_outputs,
        reference=reference.conv1x1_vjp, example=_product(lambda x, w, b, ls, g: (g, x, w, b, ls, [True, True, True])),
        output_kinds=("channel_mix", "param_grad", "param_grad_channel_mix", "param_grad_channel_mix"),
        variants={"unfolded": {3: None, 4: None, 5: [True, True, False]}, "grad-x-only": {5: [True, False, False]}},
        bad_arguments=refused((0, lambda: _T(2, 5, 4)), (0, lambda: _T(2, 5, 3, dtype=torch.float64)),
                              (2, lambda: _T(5, 4)), (4, lambda: None))),
}


def _register_autograd(suffix: str, ops: InvConvOps) -> None:
    """``perm`` and ``sign`` are constants of the parameterization: they get no gradient. The backward
    runs the fused ``*_bwd`` op; under ``create_graph=True`` the reference formula in differentiable
    tensor ops. The C++ ops have it compiled (csrc/autograd.cpp; :func:`compiled_autograd`)."""
    if not suffix:
        compiled_autograd(("invconv_weight",), "invconv_weight_bwd", ops.weight_bwd, reference.invconv_weight_vjp, 6)
        compiled_autograd(("conv1x1",), "conv1x1_bwd", ops.conv1x1_bwd, reference.conv1x1_vjp, 5)
        return

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    def backward(ctx, grad_w):
        needs = ctx.needs_input_grad
        if not (needs[1] or needs[2] or needs[4]):
            return None, None, None, None, None
        perm, lower, upper, sign, log_s = ctx.saved_tensors
        vjp = reference.invconv_weight_vjp if torch.is_grad_enabled() else ops.weight_bwd
        grad_lower, grad_upper, grad_log_s = vjp(grad_w, perm, lower, upper, sign, log_s)
        return (None, grad_lower if needs[1] else None, grad_upper if needs[2] else None, None,
                grad_log_s if needs[4] else None)

    torch.library.register_autograd(f"invkernels::invconv_weight{suffix}", backward, setup_context=setup_context)

    def conv1x1_backward(ctx, grad_y):
        # bias and log_scale may have been left to their defaults: then neither is an input.
        given = len(ctx.needs_input_grad)
        needs = (*ctx.needs_input_grad, False, False)[:4]
        mask = [needs[0], needs[1], needs[2] or needs[3]]
        if not any(mask):
            return (None,) * given
        saved = (*ctx.saved_tensors, None, None)[:4]
        vjp = reference.conv1x1_vjp if torch.is_grad_enabled() else ops.conv1x1_bwd
        grads = vjp(grad_y, *saved, mask)
        return tuple(g if need else None for g, need in zip(grads, needs))[:given]

    torch.library.register_autograd(f"invkernels::conv1x1{suffix}", conv1x1_backward, setup_context=setup_context)


_FAMILY = OpFamily("invconv", _DEFS, InvConvOps, "invkernels.triton.invconv", _register_autograd)
cpp_ops = _FAMILY.cpp
triton_ops = _FAMILY.triton
prepare = _FAMILY.prepare
_ops_for = _FAMILY.for_tensor


def invconv_weight(perm: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor, sign: torch.Tensor,
                   log_s: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """``W = P L U'`` with ``L = tril(lower, -1) + I``, ``U' = triu(upper, 1) + diag(sign * exp(log_s))``
    and ``(P M)[i, :] = M[perm[i], :]``; differentiable in ``lower``, ``upper`` and ``log_s``.

    Args:
        perm: ``[C]`` int64 permutation.
        lower, upper: ``[C, C]`` (only the strict lower / strict upper triangle is read).
        sign: ``[C]``, entries +1 or -1. log_s: ``[C]``. Same dtype and device as ``lower``.
        backend: ``"cpp"`` (the C++ op on CPU and CUDA tensors, the reference on other devices),
            ``"triton"`` (the Triton kernel), ``"reference"`` (pure torch), or None for
            ``invkernels.get_backend()``.
    """
    ops = _ops_for(backend, lower)
    if ops is None:
        _validation.check_factors("invconv_weight", perm, lower, upper, sign, log_s)
        return reference.invconv_weight(perm, lower, upper, sign, log_s)
    return ops.weight(perm, lower, upper, sign, log_s)


def invconv_inverse_weight(perm: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor, sign: torch.Tensor,
                           log_s: torch.Tensor, *, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``W⁻¹ = U'⁻¹ L⁻¹ Pᵀ`` from the factors of :func:`invconv_weight`, by two triangular solves
    (``torch.linalg.solve_triangular``) in float64, cast once to ``dtype`` (default: ``lower``'s).

    The dense ``W`` is never formed or inverted. Plain torch ops: differentiable in ``lower``,
    ``upper`` and ``log_s``. Cost ``O(C³)``; the modules cache the result.
    """
    _validation.check_factors("invconv_inverse_weight", perm, lower, upper, sign, log_s)
    f64 = torch.float64
    lower64 = reference.invconv_lower(lower.to(f64))
    upper64 = reference.invconv_upper(upper.to(f64), sign.to(f64), log_s.to(f64))
    eye = torch.eye(lower.shape[0], dtype=f64, device=lower.device)
    lower_inv = torch.linalg.solve_triangular(lower64, eye, upper=False, unitriangular=True)
    m_inv = torch.linalg.solve_triangular(upper64, lower_inv, upper=True)
    # (M⁻¹ Pᵀ)[:, i] = M⁻¹[:, perm[i]] since Pᵀ[perm[i], i] = 1.
    return m_inv.index_select(1, perm).to(lower.dtype if dtype is None else dtype)


def dense_inverse_weight(w: torch.Tensor, *, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``w⁻¹`` of a dense ``[C, C]`` weight by ``torch.linalg.inv`` in float64, cast once to
    ``dtype`` (default: ``w``'s); differentiable. Raises ValueError when ``w`` is singular."""
    inv, info = torch.linalg.inv_ex(w.to(torch.float64))
    if info.item() != 0:
        raise ValueError("invconv: weight is singular: its LU decomposition has a zero pivot at position "
                         f"{info.item()}, so it has no inverse")
    if not bool(torch.isfinite(inv).all()):
        raise ValueError("invconv: weight is singular to float64 precision (its inverse is not finite)")
    return inv.to(w.dtype if dtype is None else dtype)


def channels_last_like(x: torch.Tensor) -> bool:
    """Channel stride 1 with the other dimensions in order (the layout rule of ``conv1x1``)."""
    return x.dim() >= 3 and not x.is_contiguous() and x.movedim(1, -1).is_contiguous()


def product_like(x: torch.Tensor) -> torch.Tensor:
    """An empty tensor in the layout ``conv1x1`` gives for ``x``: channels-last for channels-last-like
    inputs, contiguous otherwise."""
    if channels_last_like(x):
        return x.new_empty(x.movedim(1, -1).shape).movedim(-1, 1)
    return x.new_empty(x.shape)


def conv1x1(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None,
            log_scale: torch.Tensor | None = None, *, backend: str | None = None) -> torch.Tensor:
    """``y[b, :, p] = w @ x[b, :, p]`` at every position ``p``; with ``bias`` and ``log_scale`` (an
    ActNorm folded in) ``y = w @ ((x + bias) * exp(log_scale))``, computed as one GEMM with the
    weight ``w · diag(exp(log_scale))`` and the bias ``w · (exp(log_scale) ⊙ bias)``.

    The registered op ``torch.ops.invkernels.conv1x1`` (backward ``conv1x1_bwd``). The C++ op runs
    its products through torch's BLAS / cuBLAS: ``[B, C]`` inputs and channels-last inputs are one
    GEMM over all positions, any other input one batched GEMM with the weight broadcast. The
    Triton twin is one Triton GEMM with the folded ActNorm in its epilogue. Either gives a
    channels-last result for a channels-last-like ``x``, a contiguous one otherwise.
    Differentiable in every tensor.

    Args:
        x: ``[B, C, *spatial]`` or ``[B, C]``, any strides.
        w: ``[C, C]``. bias, log_scale: ``[C]`` or both None. Same dtype and device as ``x``.
        backend: ``"cpp"`` (the C++ op on CPU and CUDA tensors, the reference on other devices),
            ``"triton"`` (the Triton kernels), ``"reference"`` (einsum), or None for
            ``invkernels.get_backend()``.
    """
    ops = _ops_for(backend, x)
    if ops is None:
        _validation.check_product("conv1x1", x, w, bias, log_scale)
        return reference.conv1x1(x, w, bias, log_scale)
    return ops.conv1x1(x, w, bias, log_scale)


def conv1x1_vjp(grad_y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None,
                log_scale: torch.Tensor | None = None, output_mask=(True, True, True), *,
                backend: str | None = None):
    """``(grad_x, grad_w, grad_bias, grad_log_scale)`` of :func:`conv1x1` at ``x`` for the gradient
    ``grad_y`` of its output: the registered ``conv1x1_bwd`` op (the reference formulas for
    ``backend="reference"``). ``output_mask`` picks ``(grad_x, grad_w, the ActNorm pair)``; the
    others are None. Not differentiable (it is a backward)."""
    ops = _ops_for(backend, x)
    if ops is None:
        _check_conv1x1_bwd("conv1x1_bwd", grad_y, x, w, bias, log_scale, output_mask)
        return reference.conv1x1_vjp(grad_y, x, w, bias, log_scale, output_mask)
    return ops.conv1x1_bwd(grad_y, x, w, bias, log_scale, list(output_mask))


def lu_logdet(log_s: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``log|det dy/dx|`` per sample of ``y = W x`` at every position of ``x``: ``S * Σ log_s``
    (``log|det W| = Σ log_s`` as ``|det P| = det L = 1``), accumulated in the widest of float32,
    ``log_s``'s and ``x``'s dtypes; shape ``[B]``, dtype ``logdet_dtype(x.dtype)`` (float32 for half
    inputs, whose log-det overflows at 65504)."""
    acc = torch.promote_types(torch.promote_types(log_s.dtype, x.dtype), torch.float32)
    total = math.prod(x.shape[2:]) * log_s.to(acc).sum()
    return total.expand(x.shape[0]).to(_validation.logdet_dtype(x.dtype)).clone()


def dense_logdet(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``S * log|det w|`` per sample (``torch.linalg.slogdet`` in float64), shape ``[B]``, dtype
    ``logdet_dtype(x.dtype)`` (float32 for half inputs)."""
    total = math.prod(x.shape[2:]) * torch.linalg.slogdet(w.to(torch.float64)).logabsdet
    return total.expand(x.shape[0]).to(_validation.logdet_dtype(x.dtype)).clone()
