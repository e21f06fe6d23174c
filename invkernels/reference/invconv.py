"""Pure-PyTorch LU-decomposed invertible 1x1 convolution (Glow).

The test oracle (run in float64), the eager baseline of the benchmarks (dense weight, inverse by
``torch.inverse``) and the fallback of the weight assembly on devices other than CPU and CUDA.
Parameterization (docs/ops/invconv.md)::

    L  = tril(lower, -1) + I,   U' = triu(upper, 1) + diag(sign * exp(log_s)),   W = P L U'
    (P M)[i, :] = M[perm[i], :]
"""

from __future__ import annotations

import math

import torch

from invkernels._validation import logdet_dtype
from invkernels.reference import actnorm


def invconv_lower(lower: torch.Tensor) -> torch.Tensor:
    """``L = tril(lower, -1) + I`` (unit lower-triangular)."""
    return torch.tril(lower, -1) + torch.eye(lower.shape[0], dtype=lower.dtype, device=lower.device)


def invconv_upper(upper: torch.Tensor, sign: torch.Tensor, log_s: torch.Tensor) -> torch.Tensor:
    """``U' = triu(upper, 1) + diag(sign * exp(log_s))`` (upper-triangular, nonzero diagonal)."""
    return torch.triu(upper, 1) + torch.diag(sign * torch.exp(log_s))


def invconv_weight(perm: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor, sign: torch.Tensor,
                   log_s: torch.Tensor) -> torch.Tensor:
    """``W = P L U'``: the rows of ``L U'`` taken in the order ``perm``."""
    return torch.matmul(invconv_lower(lower), invconv_upper(upper, sign, log_s)).index_select(0, perm)


def invconv_weight_vjp(grad_w: torch.Tensor, perm: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor,
                       sign: torch.Tensor, log_s: torch.Tensor):
    """``(grad_lower, grad_upper, grad_log_s)`` by the formulas of docs/ops/invconv.md, in
    differentiable tensor ops (what the registered ``invconv_weight_bwd`` computes; used for
    double backward)::

        dM = P^T dW,  dlower = tril(dM U'^T, -1),  dU' = L^T dM,  dupper = triu(dU', 1),
        dlog_s = diag(dU') * sign * exp(log_s)
    """
    dm = torch.zeros_like(grad_w).index_copy(0, perm, grad_w)
    du = torch.matmul(invconv_lower(lower).t(), dm)
    grad_lower = torch.tril(torch.matmul(dm, invconv_upper(upper, sign, log_s).t()), -1)
    return grad_lower, torch.triu(du, 1), torch.diagonal(du) * sign * torch.exp(log_s)


def random_rotation(c: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """A random orthogonal ``c x c`` matrix in float64 (Haar-distributed: QR of a Gaussian matrix
    with the signs of ``diag(R)`` moved into ``Q``), Glow's initialization of the 1x1 convolution.
    Its determinant is +1 or -1."""
    q, r = torch.linalg.qr(torch.randn(c, c, dtype=torch.float64, generator=generator))
    return q * torch.sign(torch.diagonal(r))


def lu_factors(w: torch.Tensor):
    """``(perm, lower, upper, sign, log_s)`` with ``invconv_weight(...) == w`` (up to round-off), from
    the partially pivoted LU decomposition ``w = P L U`` of ``torch.linalg.lu``: ``perm[i]`` is the
    column of the 1 in row ``i`` of ``P``, ``lower = tril(L, -1)``, ``upper = triu(U, 1)``,
    ``sign * exp(log_s) = diag(U)``. ``w`` must be square and invertible."""
    p, lower, upper = torch.linalg.lu(w)
    s = torch.diagonal(upper)
    return p.argmax(dim=1), torch.tril(lower, -1), torch.triu(upper, 1), torch.sign(s), torch.log(torch.abs(s))


def eager_inverse_weight(w: torch.Tensor) -> torch.Tensor:
    """The eager route: ``torch.inverse`` of the dense weight, in the weight's dtype."""
    return torch.inverse(w)


def conv1x1(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None,
            log_scale: torch.Tensor | None = None) -> torch.Tensor:
    """``y[b, :, p] = w @ x[b, :, p]`` at every position ``p`` of ``x`` (``[B, C, *spatial]`` or ``[B, C]``);
    with ``bias`` and ``log_scale`` an ActNorm (:func:`invkernels.reference.actnorm.actnorm_fwd`)
    before it: ``y = w @ ((x + bias) * exp(log_scale))``."""
    if bias is not None:
        x, _ = actnorm.actnorm_fwd(x, bias, log_scale)
    return torch.einsum("oc,bc...->bo...", w, x)


def conv1x1_vjp(grad_y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None,
                log_scale: torch.Tensor | None, output_mask=(True, True, True)):
    """``(grad_x, grad_w, grad_bias, grad_log_scale)`` of :func:`conv1x1` in differentiable tensor ops
    (what the registered ``conv1x1_bwd`` computes; used for double backward). With ``x̂`` the
    ActNorm's output: ``grad_x̂ = w^T g``, ``grad_w = Σ g x̂^T``, and the ActNorm's VJP
    (:func:`invkernels.reference.actnorm.actnorm_vjp`, no log-det term) takes ``grad_x̂`` to
    ``(grad_x, grad_bias, grad_log_scale)``. Entries not asked for by ``output_mask`` (x, w, the
    ActNorm pair) and the ActNorm pair without ``bias`` are None."""
    x_hat = x if bias is None else actnorm.actnorm_fwd(x, bias, log_scale)[0]
    grad_w = torch.einsum("bo...,bc...->oc", grad_y, x_hat) if output_mask[1] else None
    grad_x_hat = torch.einsum("oc,bo...->bc...", w, grad_y) if (output_mask[0] or bias is not None) else None
    if bias is None:
        return grad_x_hat, grad_w, None, None
    no_logdet = torch.zeros(x.shape[0], dtype=logdet_dtype(x.dtype), device=x.device)
    grad_x, grad_bias, grad_log_scale = actnorm.actnorm_vjp(grad_x_hat, no_logdet, x, bias, log_scale)
    if not output_mask[2]:
        return (grad_x if output_mask[0] else None), grad_w, None, None
    return (grad_x if output_mask[0] else None), grad_w, grad_bias, grad_log_scale


def conv1x1_logdet(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``log|det dy/dx|`` of :func:`conv1x1` per sample: ``S * log|det w|`` (S = spatial size), by
    ``torch.linalg.slogdet`` in ``logdet_dtype(w.dtype)`` (``w``'s dtype, float32 for half weights)."""
    return (math.prod(x.shape[2:]) * torch.linalg.slogdet(w.to(logdet_dtype(w.dtype))).logabsdet).expand(x.shape[0])
