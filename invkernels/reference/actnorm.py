"""Pure-PyTorch ActNorm (Glow): per-channel ``y = (x + bias) * exp(log_scale)``.

The test oracle (run in float64) and the eager baseline of the benchmarks.
"""

from __future__ import annotations

import math

import torch

from invkernels._validation import logdet_dtype


def _per_channel(p: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return p.reshape(1, -1, *([1] * (x.dim() - 2)))


def actnorm_logdet(log_scale: torch.Tensor, x: torch.Tensor, sign: int = 1) -> torch.Tensor:
    """``sign * S * Σ_c log_scale[c]`` for every sample of ``x``, in ``logdet_dtype(x.dtype)``
    (float32 for half inputs, whose log-det overflows at 65504); differentiable in ``log_scale``."""
    return (sign * math.prod(x.shape[2:]) * log_scale.sum(dtype=logdet_dtype(x.dtype))).expand(x.shape[0])


def actnorm_logdet_grad(grad_logdet: torch.Tensor, x: torch.Tensor, sign: int = 1) -> torch.Tensor:
    """The gradient of :func:`actnorm_logdet` w.r.t. every entry of ``log_scale`` for the gradient
    ``grad_logdet`` of the log-det: ``sign * S * Σ_b grad_logdet[b]`` (a scalar in the log-det dtype)."""
    return sign * math.prod(x.shape[2:]) * grad_logdet.sum(dtype=logdet_dtype(x.dtype))


def actnorm_fwd(x: torch.Tensor, bias: torch.Tensor, log_scale: torch.Tensor):
    """``(y, logdet)``; ``logdet = S * Σ_c log_scale[c]`` for every sample (S = spatial size)."""
    y = (x + _per_channel(bias, x)) * torch.exp(_per_channel(log_scale, x))
    return y, actnorm_logdet(log_scale, x)


def actnorm_inv(y: torch.Tensor, bias: torch.Tensor, log_scale: torch.Tensor):
    """``(x, -logdet)`` of :func:`actnorm_fwd`."""
    x = y * torch.exp(-_per_channel(log_scale, y)) - _per_channel(bias, y)
    return x, actnorm_logdet(log_scale, y, -1)


def actnorm_vjp(grad_out: torch.Tensor, grad_logdet: torch.Tensor, x: torch.Tensor, bias: torch.Tensor,
                log_scale: torch.Tensor, reverse: bool = False):
    """``(grad_in, grad_bias, grad_log_scale)`` by the formulas of docs/ops/actnorm.md, in
    differentiable tensor ops (what the fused ``actnorm_bwd`` computes; used for double backward).
    ``x`` is the data-side tensor: the forward's input or the inverse's output. ``grad_logdet`` has
    the log-det dtype (float32 for half inputs); the parameter gradients are summed in it and
    returned in the parameters' dtype."""
    dims = [0, *range(2, x.dim())]
    b, ls = _per_channel(bias, x), _per_channel(log_scale, x)
    acc = logdet_dtype(x.dtype)
    logdet_term = actnorm_logdet_grad(grad_logdet, x)
    if reverse:
        grad_in = grad_out * torch.exp(-ls)
        grad_ls = -(grad_out * (x + b)).sum(dims, dtype=acc) - logdet_term
        return grad_in, -grad_out.sum(dims), grad_ls.to(log_scale.dtype)
    grad_in = grad_out * torch.exp(ls)
    grad_ls = (grad_in * (x + b)).sum(dims, dtype=acc) + logdet_term
    return grad_in, grad_in.sum(dims), grad_ls.to(log_scale.dtype)
