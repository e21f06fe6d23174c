"""A fixed permutation of the channels (log-det 0), the cheap mixing layer between couplings."""

from __future__ import annotations

import torch
from torch import nn

from invkernels import _validation


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
        _validation.check_int("Permute", "channels", channels)
        if kind not in ("reverse", "random"):
            raise ValueError(f"Permute: kind should be 'reverse' or 'random', got {kind!r}")
        perm = torch.arange(channels - 1, -1, -1) if kind == "reverse" else torch.randperm(channels)
        self.channels = channels
        self.kind = kind
        self.register_buffer("perm", perm)
        self.register_buffer("inverse_perm", torch.argsort(perm))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A permutation that is not one (or an inverse that does not match it) would silently
        # drop and duplicate channels while the log-det still says 0.
        perm = state_dict.get(prefix + "perm")
        if perm is not None:
            _validation.check_permutation("Permute", "perm", perm, self.channels, prefix + "perm")
        inverse = state_dict.get(prefix + "inverse_perm")
        if inverse is not None:
            _validation.check_permutation("Permute", "inverse_perm", inverse, self.channels, prefix + "inverse_perm")
            reference = perm if perm is not None else self.perm
            if not torch.equal(inverse.to(reference.device)[reference], torch.arange(self.channels,
                                                                                       device=reference.device)):
                raise ValueError(f"Permute: buffer 'inverse_perm' (state dict key '{prefix}inverse_perm') should be "
                                 f"the inverse of perm (argsort(perm)), got {inverse.tolist()} for perm "
                                 f"{reference.tolist()}")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if perm is not None and inverse is None:
            self.inverse_perm.copy_(torch.argsort(self.perm))

    def _check(self, x: torch.Tensor, name: str) -> None:
        if x.dim() < 2 or x.shape[1] != self.channels:
            raise ValueError(f"Permute: {name} should have shape [B, {self.channels}, ...], got {list(x.shape)}")

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self._check(x, "x")
        return x.index_select(1, self.perm), x.new_zeros(x.shape[0], dtype=_validation.logdet_dtype(x.dtype))

    def inverse(self, y: torch.Tensor, return_logdet: bool = False):
        self._check(y, "y")
        x = y.index_select(1, self.inverse_perm)
        return (x, y.new_zeros(y.shape[0], dtype=_validation.logdet_dtype(y.dtype))) if return_logdet else x

    def extra_repr(self) -> str:
        return f"channels={self.channels}, kind={self.kind!r}"
