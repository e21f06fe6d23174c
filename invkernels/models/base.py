"""What every flow model shares: the standard normal base, log_prob, sample, bits per dimension
with uniform dequantization of discrete data."""

from __future__ import annotations

import math

import torch
from torch import nn

_LOG_2PI = math.log(2 * math.pi)


def standard_normal_log_prob(z: torch.Tensor) -> torch.Tensor:
    """``log N(z; 0, I)`` per sample, summed over every non-batch dim, in float32 or wider."""
    zf = z.to(torch.promote_types(z.dtype, torch.float32))
    return (-0.5 * (zf.square() + _LOG_2PI)).flatten(1).sum(1)


def uniform_dequantize(x: torch.Tensor, levels: int) -> torch.Tensor:
    """``(k + u) / levels`` with ``k = round(x * (levels - 1))`` and ``u ~ U[0, 1)`` (torch's global
    generator): data on the grid ``k / (levels - 1)`` spread uniformly over ``[0, 1)``."""
    return (torch.round(x * (levels - 1)) + torch.rand_like(x)) / levels


def check_levels(name: str, levels) -> int:
    if isinstance(levels, bool) or not isinstance(levels, int) or levels < 2:
        raise ValueError(f"{name}: levels should be an integer >= 2, got {levels!r}")
    return levels


def check_temperature(name: str, temperature) -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or \
            not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"{name}: temperature should be a finite number >= 0, got {temperature!r}")
    return float(temperature)


class FlowModel(nn.Module):
    """Base of the flow models: ``forward(x) -> (z, logdet)``, ``inverse(z) -> x``,
    ``log_prob(x)``, ``sample(n, temperature)`` and ``bits_per_dim(x, levels)``.

    Subclasses define ``event_shape`` (the shape of one sample), ``forward``, ``inverse`` and
    ``_sample_latent(n, temperature)``; ``forward``'s ``logdet`` already includes the log-density
    of everything factored out along the way, so ``log p(x) = log N(z_final; 0, I) + logdet`` with
    ``z_final`` what :meth:`_final_latent` picks out of ``z``.
    """

    event_shape: tuple[int, ...]

    def _check_input(self, x: torch.Tensor, name: str = "x") -> None:
        cls = type(self).__name__
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{cls}: {name} should be a tensor, got {type(x).__name__}")
        if x.dim() != len(self.event_shape) + 1 or tuple(x.shape[1:]) != tuple(self.event_shape):
            raise ValueError(f"{cls}: {name} should have shape [B, {', '.join(map(str, self.event_shape))}], "
                             f"got {list(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"{cls}: {name} should be a floating-point tensor, got {x.dtype}")

    def _final_latent(self, z: torch.Tensor) -> torch.Tensor:
        return z

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """``log p(x)`` per sample (nats), shape ``[B]``, for continuous ``x``."""
        z, logdet = self(x)
        return standard_normal_log_prob(self._final_latent(z)) + logdet.to(torch.promote_types(logdet.dtype,
                                                                                                torch.float32))

    def sample(self, n: int, temperature: float = 1.0) -> torch.Tensor:
        """``n`` samples, drawn with the latents scaled by ``temperature`` (0 gives the mode path);
        uses torch's global generator. Runs without grad."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"{type(self).__name__}: n should be an integer >= 0, got {n!r}")
        temperature = check_temperature(type(self).__name__, temperature)
        with torch.no_grad():
            return self._sample(n, temperature)

    def _sample(self, n: int, temperature: float) -> torch.Tensor:
        raise NotImplementedError

    def dequantize(self, x: torch.Tensor, levels: int) -> torch.Tensor:
        """Uniform dequantization of data in ``{0, 1/(levels-1), ..., 1}``: ``(k + u) / levels`` with
        ``k = round(x * (levels - 1))`` and ``u ~ U[0, 1)`` (torch's global generator).

        Raises ValueError for values outside ``[0, 1]`` or off the ``levels``-level grid."""
        cls = type(self).__name__
        levels = check_levels(cls, levels)
        self._check_input(x)
        if x.numel() and (bool((x < 0).any()) or bool((x > 1).any()) or not bool(torch.isfinite(x).all())):
            raise ValueError(f"{cls}: x should hold values in [0, 1] (data with {levels} levels scaled to "
                             f"[0, 1]), got values in [{x.min().item():.4g}, {x.max().item():.4g}]")
        k = x * (levels - 1)
        if x.numel() and (k - k.round()).abs().max().item() > 1e-3:
            raise ValueError(f"{cls}: x should lie on the grid of {levels} levels k / {levels - 1}; the largest "
                             f"distance is {(k - k.round()).abs().max().item() / (levels - 1):.3g}")
        return uniform_dequantize(x, levels)

    def bits_per_dim(self, x: torch.Tensor, levels: int = 256) -> torch.Tensor:
        """Negative log-likelihood in bits per dimension of discrete data ``x`` (values
        ``k / (levels - 1)``), per sample: ``-(log p(x̃) - D log(levels)) / (D log 2)`` with ``x̃`` the
        uniformly dequantized data in ``[0, 1)`` (an upper bound of the discrete model's NLL)."""
        dims = math.prod(self.event_shape)
        y = self.dequantize(x, levels)
        return -(self.log_prob(y) - dims * math.log(levels)) / (dims * math.log(2))
