"""ActNorm (Glow): a per-channel affine layer initialized from the data, on the fused ActNorm ops."""

from __future__ import annotations

import torch
from torch import nn

from invkernels import _backend
from invkernels.ops import actnorm as F
from invkernels.reference.actnorm import actnorm_init


class ActNorm(nn.Module):
    """Per-channel ``y = (x + bias) * exp(log_scale)`` with ``logdet = S * Σ log_scale``.

    The first forward call in training mode sets ``bias = -mean`` and
    ``log_scale = -log(std + eps)`` per channel from that batch (so it comes out with zero mean
    and unit variance per channel); after that both are ordinary parameters. Whether this has
    happened is the buffer ``initialized``, saved in the state dict: a reloaded model is not
    re-initialized. A module used in eval mode (or for ``inverse``) before any training batch
    keeps the identity initialization.

    Args:
        channels: number of channels ``C``.
        eps: added to the standard deviation at initialization.
        backend: ``"cpp"``, ``"triton"``, ``"reference"`` or None for ``invkernels.get_backend()``.

    ``forward(x) -> (y, logdet)`` for ``x`` of shape ``[B, C, *spatial]``; ``inverse(y) -> x``.
    """

    def __init__(self, channels: int, eps: float = 1e-6, backend: str | None = None):
        super().__init__()
        if not isinstance(channels, int) or channels < 1:
            raise ValueError(f"ActNorm: channels should be a positive integer, got {channels!r}")
        if not (isinstance(eps, (int, float)) and eps > 0):
            raise ValueError(f"ActNorm: eps should be positive, got {eps!r}")
        if backend is not None:
            F.prepare(_backend.check_backend(backend))
        self.channels = channels
        self.eps = float(eps)
        self.backend = backend
        self.bias = nn.Parameter(torch.zeros(channels))
        self.log_scale = nn.Parameter(torch.zeros(channels))
        self.register_buffer("initialized", torch.tensor(False))
        self._initialized = False

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._initialized = bool(self.initialized)

    def _check(self, x: torch.Tensor, name: str) -> None:
        if x.dim() < 2 or x.shape[1] != self.channels:
            raise ValueError(f"ActNorm: {name} should have shape [B, {self.channels}, ...], got {list(x.shape)}")

    @torch.no_grad()
    def initialize(self, x: torch.Tensor) -> None:
        """Set the parameters from the batch ``x`` (what the first training forward does)."""
        self._check(x, "x")
        per_channel = x.numel() // max(1, self.channels)
        if per_channel < 2:
            raise ValueError(f"ActNorm: data-dependent initialization needs at least 2 values per channel, "
                             f"got x of shape {list(x.shape)}")
        bias, log_scale = actnorm_init(x.detach().float(), self.eps)
        self.bias.copy_(bias)
        self.log_scale.copy_(log_scale)
        self.initialized.fill_(True)
        self._initialized = True

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self._check(x, "x")
        if self.training and not self._initialized:
            self.initialize(x)
        return F.actnorm_fwd(x, self.bias.to(x.dtype), self.log_scale.to(x.dtype), backend=self.backend)

    def inverse(self, y: torch.Tensor, return_logdet: bool = False):
        self._check(y, "y")
        x, logdet = F.actnorm_inv(y, self.bias.to(y.dtype), self.log_scale.to(y.dtype), backend=self.backend)
        return (x, logdet) if return_logdet else x

    def inverse_backward(self, y: torch.Tensor, grad_y: torch.Tensor, grad_logdet: torch.Tensor):
        """Memory-free backward (used by :class:`InvertibleSequential`): ``(x, grad_x, grads)`` with
        ``x`` rebuilt from ``y`` by the fused inverse and the gradients from the fused ``actnorm_bwd``
        op; ``grads`` pairs each parameter that requires grad with its gradient."""
        self._check(y, "y")
        bias, log_scale = self.bias.to(y.dtype), self.log_scale.to(y.dtype)
        x, _ = F.actnorm_inv(y, bias, log_scale, backend=self.backend)
        grad_x, grad_bias, grad_log_scale = F.actnorm_vjp(grad_y, grad_logdet, x, bias, log_scale,
                                                          backend=self.backend)
        grads = [(p, g.to(p.dtype)) for p, g in ((self.bias, grad_bias), (self.log_scale, grad_log_scale))
                 if p.requires_grad]
        return x, grad_x, grads

    def extra_repr(self) -> str:
        return f"channels={self.channels}, initialized={self._initialized}"
