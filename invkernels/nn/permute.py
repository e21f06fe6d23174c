"""A fixed permutation of the channels (log-det 0), the cheap mixing layer between couplings."""

from __future__ import annotations

import torch
from torch import nn


class Permute(nn.Module):
    """``y = x[:, perm]`` with a fixed permutation of the ``C`` channels; log-det 0.

    Args:
        channels: number of channels ``C``.
        kind: ``"reverse"`` (RealNVP's alternation, default) or ``"random"`` (drawn once from
            torch's global generator and kept in the state dict).

    ``forward(x) -> (y, zeros[B])``; ``inverse(y) -> x``. Inputs ``[B, C, *spatial]`` or ``[B, C]``.
    """

    def __init__(self, channels: int, kind: str = "reverse"):
        super().__init__()
        if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
            raise ValueError(f"Permute: channels should be a positive integer, got {channels!r}")
        if kind not in ("reverse", "random"):
            raise ValueError(f"Permute: kind should be 'reverse' or 'random', got {kind!r}")
        perm = torch.arange(channels - 1, -1, -1) if kind == "reverse" else torch.randperm(channels)
        self.channels = channels
        self.kind = kind
        self.register_buffer("perm", perm)
        self.register_buffer("inverse_perm", torch.argsort(perm))

    def _check(self, x: torch.Tensor, name: str) -> None:
        if x.dim() < 2 or x.shape[1] != self.channels:
            raise ValueError(f"Permute: {name} should have shape [B, {self.channels}, ...], got {list(x.shape)}")

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self._check(x, "x")
        return x.index_select(1, self.perm), x.new_zeros(x.shape[0])

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        self._check(y, "y")
        return y.index_select(1, self.inverse_perm)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, kind={self.kind!r}"
