"""Glow's flow step: ActNorm → InvConv1x1 → coupling (affine or rational-quadratic spline), with the
first two in one GEMM."""

from __future__ import annotations

import torch
from torch import nn

from invkernels.nn.actnorm import ActNorm
from invkernels.nn.coupling import AdditiveCoupling, AffineCoupling, resolve_subnet
from invkernels.nn.invconv import InvConv1x1
from invkernels.nn.spline import RQSplineCoupling
from invkernels.nn.subnets import SubnetFactory, conv_subnet
from invkernels.ops import glow as glow_ops
from invkernels.ops import invconv as invconv_ops


COUPLINGS = ("affine", "additive", "spline")


def check_coupling(owner: str, coupling: str) -> None:
    """ValueError naming ``owner`` unless ``coupling`` is one of :data:`COUPLINGS`."""
    if coupling not in COUPLINGS:
        raise ValueError(f"{owner}: coupling should be 'affine', 'additive' or 'spline', got {coupling!r}")


class GlowStep(nn.Module):
    """One step of Glow's flow: ``ActNorm → InvConv1x1 → coupling``, the coupling an
    :class:`AffineCoupling` (Glow), an :class:`AdditiveCoupling` (``coupling="additive"``: Glow's
    volume-preserving variant) or an :class:`RQSplineCoupling` (``coupling="spline"``: neural
    spline flows' image steps).

    ActNorm followed by the 1x1 convolution is computed as one GEMM with a bias,
    ``W · diag(exp(log_scale))`` and ``W · (exp(log_scale) ⊙ bias)``, with the two log-dets added;
    the coupling is the fused coupling or spline op. ActNorm is initialized from the first training
    batch, as :class:`ActNorm` is.

    Args:
        channels: number of channels ``C``.
        subnet: a factory ``(in_channels, out_channels) -> nn.Module``, ``"mlp"`` or ``"conv"``;
            None for Glow's conv subnet of width ``hidden`` (512 by default). The arguments after it
            are keyword-only, as the couplings' are.
        hidden: width of the ``"mlp"`` / ``"conv"`` subnet (or of Glow's).
        coupling: ``"affine"`` (Glow), ``"additive"`` or ``"spline"``.
        scale: affine coupling scale, ``"sigmoid"`` (Glow) or ``"exp"`` (soft-clamped).
        clamp: soft clamp of ``"exp"``.
        bins, tail_bound: the spline coupling's bins and range ``[-tail_bound, tail_bound]``.
        lu: LU-parameterized 1x1 convolution (True) or a dense weight (False).
        context_channels: channels of the optional ``context=`` of the coupling subnet.
        backend: ``"cpp"``, ``"triton"``, ``"reference"`` or None for ``invkernels.get_backend()``.

    ``forward(x, context=None) -> (y, logdet)``; ``inverse(y, context=None) -> x``.
    """

    results_tested = True  # the chain trusts its memory-free results (protocol.checked_result)

    def __init__(self, channels: int, subnet: str | SubnetFactory | None = None, *, hidden: int | None = None,
                 scale: str = "sigmoid", clamp: float = 2.0, lu: bool = True, context_channels: int = 0,
                 backend: str | None = None, coupling: str = "affine", bins: int = 8, tail_bound: float = 3.0):
        super().__init__()
        check_coupling("GlowStep", coupling)
        subnet = conv_subnet(512 if hidden is None else hidden) if subnet is None else \
            resolve_subnet("GlowStep", subnet, hidden)
        self.actnorm = ActNorm(channels, backend=backend)
        self.invconv = InvConv1x1(channels, lu=lu, backend=backend)
        if coupling == "affine":
            self.coupling = AffineCoupling(channels, subnet, scale=scale, clamp=clamp,
                                           context_channels=context_channels, backend=backend)
        elif coupling == "additive":
            self.coupling = AdditiveCoupling(channels, subnet, context_channels=context_channels, backend=backend)
        else:
            self.coupling = RQSplineCoupling(channels, subnet, bins=bins, tail_bound=tail_bound,
                                             context_channels=context_channels, backend=backend)
        self.channels = channels

    def _front(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """ActNorm and the 1x1 convolution as one GEMM with a bias, and their summed log-det."""
        if not isinstance(x, torch.Tensor) or x.dim() < 2 or x.shape[1] != self.channels:
            got = list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"GlowStep: x should have shape [B, {self.channels}, ...], got {got}")
        an = self.actnorm
        an.initialize_if_needed(x)
        y, logdet_actnorm = glow_ops.actnorm_conv1x1(x, self.invconv.weight(x.dtype), an.bias, an.log_scale,
                                                     backend=self.invconv.backend)
        logdet_conv = (invconv_ops.lu_logdet(self.invconv.log_s, x) if self.invconv.lu
                       else invconv_ops.dense_logdet(self.invconv.w, x))
        return y, logdet_actnorm + logdet_conv

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        y, logdet = self._front(x)
        y, logdet_coupling = self.coupling(y, context=context)
        return y, logdet + logdet_coupling

    def inverse(self, y: torch.Tensor, context: torch.Tensor | None = None, return_logdet: bool = False):
        x, logdet = self.coupling.inverse(y, context=context, return_logdet=True)
        x, logdet_conv = self.invconv.inverse(x, return_logdet=True)
        x, logdet_actnorm = self.actnorm.inverse(x, return_logdet=True)
        return (x, logdet + logdet_conv + logdet_actnorm) if return_logdet else x

    def inverse_backward(self, y: torch.Tensor, grad_y: torch.Tensor, grad_logdet: torch.Tensor,
                         context: torch.Tensor | None = None):
        """Memory-free backward (used by :class:`InvertibleSequential`): ``(x, grad_x, grads)``.

        The coupling rebuilds its input with its fused inverse-backward op (its subnet runs once,
        with grad); the front is inverted with the cached ``W⁻¹`` and the ActNorm inverse, and
        back-propagated by the fused ``conv1x1_bwd`` with the ActNorm folded in. ``grads`` pairs each
        parameter (and ``context``) that requires grad with its gradient.
        """
        x_mid, grad_mid, grads = self.coupling.inverse_backward(y, grad_y, grad_logdet, context)
        an, conv = self.actnorm, self.invconv
        with torch.no_grad():
            x = an.inverse(conv.inverse(x_mid))
        with torch.enable_grad():
            w = conv.weight(x.dtype)
        grad_x, grad_w, grad_bias, grad_log_scale = glow_ops.actnorm_conv1x1_vjp(
            grad_mid, grad_logdet, x, w.detach(), an.bias, an.log_scale, backend=conv.backend)
        grads += [(p, g) for p, g in ((an.bias, grad_bias), (an.log_scale, grad_log_scale)) if p.requires_grad]
        grads += conv.weight_backward(w, grad_w, x, grad_logdet)
        return x, grad_x, grads
