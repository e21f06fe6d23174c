"""The front of a Glow step as one op-level function: ActNorm folded into the 1x1 convolution's
GEMM, with ActNorm's log-det, and its VJP.

``y = W ((x + bias) ⊙ exp(log_scale))`` is the registered ``conv1x1`` op with the ActNorm's
parameters (one GEMM with the weight ``W · diag(exp(log_scale))`` and the bias
``W · (exp(log_scale) ⊙ bias)``, docs/ops/invconv.md); ActNorm's log-det ``S · Σ log_scale`` and
its gradient come from ActNorm's formulas (:mod:`invkernels.ops.actnorm`). The 1x1 convolution's
own log-det belongs to its parameterization (LU or dense) and stays with the module.
"""

from __future__ import annotations

import torch

from invkernels.ops import actnorm, invconv


def actnorm_conv1x1(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, log_scale: torch.Tensor, *,
                    backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y, logdet)``: ``y = weight ((x + bias) ⊙ exp(log_scale))`` at every position and ActNorm's
    log-det ``S · Σ log_scale`` per sample (``[B]``, ``logdet_dtype(x.dtype)``). Differentiable in
    every tensor; ``bias`` and ``log_scale`` are cast to ``x``'s dtype for the product.

    Args:
        x: ``[B, C, *spatial]`` or ``[B, C]``.
        weight: ``[C, C]``, ``x``'s dtype and device. bias, log_scale: ``[C]`` (ActNorm's parameters).
        backend: as for :func:`invkernels.ops.invconv.conv1x1`.
    """
    y = invconv.conv1x1(x, weight, bias.to(x.dtype), log_scale.to(x.dtype), backend=backend)
    return y, actnorm.actnorm_logdet(log_scale, x)


def actnorm_conv1x1_vjp(grad_y: torch.Tensor, grad_logdet: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                        bias: torch.Tensor, log_scale: torch.Tensor, *, backend: str | None = None):
    """``(grad_x, grad_weight, grad_bias, grad_log_scale)`` of :func:`actnorm_conv1x1` at ``x`` for the
    gradients ``(grad_y, grad_logdet)`` of its outputs: the fused ``conv1x1_bwd`` with the ActNorm
    folded in, plus the log-det's term of ``grad_log_scale``. ``grad_bias`` and ``grad_log_scale``
    have the parameters' dtypes. Not differentiable (it is a backward)."""
    grad_x, grad_w, grad_bias, grad_log_scale = invconv.conv1x1_vjp(
        grad_y, x, weight, bias.to(x.dtype), log_scale.to(x.dtype), backend=backend)
    grad_log_scale = grad_log_scale + actnorm.actnorm_logdet_grad(grad_logdet, x)
    return grad_x, grad_w, grad_bias.to(bias.dtype), grad_log_scale.to(log_scale.dtype)
