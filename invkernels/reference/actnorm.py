"""Pure-PyTorch ActNorm (Glow): per-channel ``y = (x + bias) * exp(log_scale)``.

The test oracle (run in float64) and the eager baseline of the benchmarks.
"""

from __future__ import annotations

import torch


def _per_channel(p: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return p.reshape(1, -1, *([1] * (x.dim() - 2)))


def _spatial(x: torch.Tensor) -> int:
    n = 1
    for d in x.shape[2:]:
        n *= d
    return n


def actnorm_fwd(x: torch.Tensor, bias: torch.Tensor, log_scale: torch.Tensor):
    """``(y, logdet)``; ``logdet = S * Σ_c log_scale[c]`` for every sample (S = spatial size)."""
    y = (x + _per_channel(bias, x)) * torch.exp(_per_channel(log_scale, x))
    logdet = (_spatial(x) * log_scale.sum()).expand(x.shape[0]).to(x.dtype)
    return y, logdet


def actnorm_inv(y: torch.Tensor, bias: torch.Tensor, log_scale: torch.Tensor):
    """``(x, -logdet)`` of :func:`actnorm_fwd`."""
    x = y * torch.exp(-_per_channel(log_scale, y)) - _per_channel(bias, y)
    logdet = (-_spatial(y) * log_scale.sum()).expand(y.shape[0]).to(y.dtype)
    return x, logdet


def actnorm_init(x: torch.Tensor, eps: float = 1e-6):
    """Data-dependent initialization: ``bias = -mean``, ``log_scale = -log(std + eps)`` per channel,
    so the first batch comes out with zero mean and unit variance per channel."""
    dims = [0, *range(2, x.dim())]
    mean = x.mean(dim=dims)
    std = x.std(dim=dims, unbiased=False)
    return -mean, -torch.log(std + eps)


def actnorm_vjp(grad_out: torch.Tensor, grad_logdet: torch.Tensor, x: torch.Tensor, bias: torch.Tensor,
                log_scale: torch.Tensor, reverse: bool = False):
    """``(grad_in, grad_bias, grad_log_scale)`` by the formulas of docs/ops/actnorm.md, in
    differentiable tensor ops (what the fused ``actnorm_bwd`` computes; used for double backward).
    ``x`` is the data-side tensor: the forward's input or the inverse's output."""
    dims = [0, *range(2, x.dim())]
    b, ls = _per_channel(bias, x), _per_channel(log_scale, x)
    logdet_term = _spatial(x) * grad_logdet.sum()
    if reverse:
        grad_in = grad_out * torch.exp(-ls)
        return grad_in, -grad_out.sum(dims), -(grad_out * (x + b)).sum(dims) - logdet_term
    grad_in = grad_out * torch.exp(ls)
    return grad_in, grad_in.sum(dims), (grad_in * (x + b)).sum(dims) + logdet_term
