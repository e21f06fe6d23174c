"""Pure-PyTorch coupling layers: the test oracle (run in float64) and the eager baseline.

Written as a user would write them with plain tensor ops (chunk, tanh, exp, cat, sum), so
autograd provides the backward pass. Formulas: docs/ops/coupling.md.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from invkernels._validation import (
    check_coupling,
    check_grad,
    check_grad_logdet,
    check_scale,
    logdet_dtype,
    split_channels,
)


SIGMOID_EPS = 1e-3  # nflows' floor of the sigmoid scale
ATAN_FACTOR = 0.636  # FrEIA's ATAN clamp: 0.636 atan(h)


def log_scale(hs: torch.Tensor, scale: str = "exp", clamp: float = 2.0) -> torch.Tensor:
    """Log of the coupling scale for the raw subnet output ``hs``."""
    if scale == "exp":
        return clamp * torch.tanh(hs / clamp)
    if scale == "sigmoid_eps":
        return torch.log(torch.sigmoid(hs + 2.0) + SIGMOID_EPS)
    if scale == "atan":
        return clamp * (ATAN_FACTOR * torch.atan(hs))
    if scale == "rational":
        return hs / (1.0 + hs.abs() / clamp)
    return F.logsigmoid(hs + 2.0)


def _sum_per_sample(v: torch.Tensor) -> torch.Tensor:
    """Per-sample sum, accumulated and returned in ``logdet_dtype`` (float32 for half inputs)."""
    return v.flatten(1).sum(dim=1, dtype=logdet_dtype(v.dtype))


def affine_half(a: torch.Tensor, h: torch.Tensor, scale: str = "exp", clamp: float = 2.0):
    """The transformed half alone: ``(a * s(hs) + t, logdet)`` with ``(hs, t) = h.chunk(2)``."""
    hs, t = h.chunk(2, dim=1)
    log_s = log_scale(hs, scale, clamp)
    return a * torch.exp(log_s) + t, _sum_per_sample(log_s)


def affine_half_inv(b: torch.Tensor, h: torch.Tensor, scale: str = "exp", clamp: float = 2.0):
    """Inverse of :func:`affine_half`: ``((b - t) * exp(-log s), -logdet)``."""
    hs, t = h.chunk(2, dim=1)
    log_s = log_scale(hs, scale, clamp)
    return (b - t) * torch.exp(-log_s), -_sum_per_sample(log_s)


def affine_coupling_fwd(x: torch.Tensor, h: torch.Tensor, scale: str = "exp", clamp: float = 2.0,
                        passthrough: int | None = None):
    """``(y, logdet)`` of the affine coupling forward (the first ``passthrough`` channels pass
    through, ``C // 2`` when None)."""
    check_scale("affine_coupling_fwd", scale, clamp)
    check_coupling("affine_coupling_fwd", x, h, affine=True, passthrough=passthrough)
    c1, _ = split_channels(x.shape[1], passthrough)
    y2, logdet = affine_half(x[:, c1:], h, scale, clamp)
    return torch.cat([x[:, :c1], y2], dim=1), logdet


def affine_coupling_inv(y: torch.Tensor, h: torch.Tensor, scale: str = "exp", clamp: float = 2.0,
                        passthrough: int | None = None):
    """``(x, logdet_inv)`` of the affine coupling inverse; ``logdet_inv = -logdet``."""
    check_scale("affine_coupling_inv", scale, clamp)
    check_coupling("affine_coupling_inv", y, h, affine=True, x_name="y", passthrough=passthrough)
    c1, _ = split_channels(y.shape[1], passthrough)
    x2, logdet_inv = affine_half_inv(y[:, c1:], h, scale, clamp)
    return torch.cat([y[:, :c1], x2], dim=1), logdet_inv


def additive_coupling_fwd(x: torch.Tensor, h: torch.Tensor, passthrough: int | None = None) -> torch.Tensor:
    """``y`` of the additive coupling forward (its log-det is 0)."""
    check_coupling("additive_coupling_fwd", x, h, affine=False, passthrough=passthrough)
    c1, _ = split_channels(x.shape[1], passthrough)
    return torch.cat([x[:, :c1], x[:, c1:] + h], dim=1)


def additive_coupling_inv(y: torch.Tensor, h: torch.Tensor, passthrough: int | None = None) -> torch.Tensor:
    """``x`` of the additive coupling inverse."""
    check_coupling("additive_coupling_inv", y, h, affine=False, x_name="y", passthrough=passthrough)
    c1, _ = split_channels(y.shape[1], passthrough)
    return torch.cat([y[:, :c1], y[:, c1:] - h], dim=1)


def log_scale_grad(hs: torch.Tensor, scale: str = "exp", clamp: float = 2.0) -> torch.Tensor:
    """``dL/dhs`` of :func:`log_scale`."""
    if scale == "exp":
        return 1.0 - torch.tanh(hs / clamp).square()
    if scale == "sigmoid_eps":
        sigma = torch.sigmoid(hs + 2.0)
        return sigma * torch.sigmoid(-(hs + 2.0)) / (sigma + SIGMOID_EPS)
    if scale == "atan":
        return clamp * ATAN_FACTOR / (1.0 + hs.square())
    if scale == "rational":
        return 1.0 / (1.0 + hs.abs() / clamp).square()
    return torch.sigmoid(-(hs + 2.0))


def affine_half_vjp(grad_b: torch.Tensor, grad_logdet: torch.Tensor, a: torch.Tensor, h: torch.Tensor,
                    scale: str = "exp", clamp: float = 2.0, reverse: bool = False):
    """``(grad_a, grad_h)``: the VJP of :func:`affine_half` (or of :func:`affine_half_inv` with
    ``reverse=True``) at ``(a, h)`` for the gradients ``(grad_b, grad_logdet)`` of its outputs, by
    the formulas of docs/ops/coupling.md in differentiable tensor ops. ``grad_logdet`` has the
    log-det dtype; the gradients have the dtype of ``a``."""
    hs, _ = h.chunk(2, dim=1)
    log_s = log_scale(hs, scale, clamp)
    dlog_s = log_scale_grad(hs, scale, clamp)
    gl = grad_logdet.reshape(-1, *([1] * (a.dim() - 1)))
    if reverse:
        grad_a = grad_b * torch.exp(-log_s)
        g_t = -grad_a
        g_hs = -(grad_b * a + gl) * dlog_s
    else:
        grad_a = grad_b * torch.exp(log_s)
        g_t = grad_b
        g_hs = (grad_a * a + gl) * dlog_s
    return grad_a, torch.cat([g_hs.to(a.dtype), g_t], dim=1)


def affine_coupling_vjp(grad_out: torch.Tensor, grad_logdet: torch.Tensor, x: torch.Tensor, h: torch.Tensor,
                        scale: str = "exp", clamp: float = 2.0, reverse: bool = False,
                        passthrough: int | None = None):
    """``(grad_in, grad_h)`` by the formulas of docs/ops/coupling.md, in differentiable tensor ops
    (what the fused ``affine_coupling_bwd`` computes; used for double backward). ``grad_logdet`` has
    the log-det dtype (float32 for half inputs); the gradients have the dtype of ``x``."""
    c1, _ = split_channels(x.shape[1], passthrough)
    g_in2, g_h = affine_half_vjp(grad_out[:, c1:], grad_logdet, x[:, c1:], h, scale, clamp, reverse)
    return torch.cat([grad_out[:, :c1], g_in2], dim=1), g_h


def additive_coupling_vjp(grad_out: torch.Tensor, reverse: bool = False, passthrough: int | None = None):
    """``(grad_in, grad_h)`` of the additive coupling forward or inverse (differentiable)."""
    c1, _ = split_channels(grad_out.shape[1], passthrough)
    g2 = grad_out[:, c1:]
    return grad_out, -g2 if reverse else g2


def affine_coupling_inv_bwd(y: torch.Tensor, h: torch.Tensor, grad_y: torch.Tensor, grad_logdet: torch.Tensor,
                            scale: str = "exp", clamp: float = 2.0, passthrough: int | None = None):
    """``(x, grad_x, grad_h)``: the forward's input rebuilt from its output ``y`` and the subnet
    output ``h``, and the VJP of :func:`affine_coupling_fwd` at ``(x, h)`` for the gradients
    ``(grad_y, grad_logdet)`` of its outputs (what the fused ``affine_coupling_inv_bwd`` computes
    in one pass, for memory-free backprop). ``grad_x``'s first half is ``grad_y``'s: the path
    through the subnet is the caller's."""
    x, _ = affine_coupling_inv(y, h, scale, clamp, passthrough)
    check_grad("affine_coupling_inv_bwd", grad_y, y, "grad_y", "y")
    check_grad_logdet("affine_coupling_inv_bwd", grad_logdet, y)
    grad_x, grad_h = affine_coupling_vjp(grad_y, grad_logdet, x, h, scale, clamp, passthrough=passthrough)
    return x, grad_x, grad_h


def additive_coupling_inv_bwd(y: torch.Tensor, h: torch.Tensor, grad_y: torch.Tensor,
                              passthrough: int | None = None):
    """``(x, grad_x, grad_h)`` of the additive coupling, as :func:`affine_coupling_inv_bwd`."""
    x = additive_coupling_inv(y, h, passthrough)
    check_grad("additive_coupling_inv_bwd", grad_y, y, "grad_y", "y")
    grad_x, grad_h = additive_coupling_vjp(grad_y, passthrough=passthrough)
    return x, grad_x.clone(), grad_h.clone()
