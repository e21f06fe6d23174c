"""Default subnet factories: ``factory(in_channels, out_channels) -> nn.Module``.

The last layer starts at zero, so a coupling layer starts as the identity (Glow's habit), which
keeps deep flows stable at the start of training.
"""

from __future__ import annotations

from typing import Callable

from torch import nn

SubnetFactory = Callable[[int, int], nn.Module]


def _positive(name: str, value: int) -> None:
    if not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} should be a positive integer, got {value!r}")


def mlp_subnet(hidden: int = 256, layers: int = 2) -> SubnetFactory:
    """MLP for ``[B, C]`` inputs: ``layers`` hidden Linear+ReLU layers of width ``hidden``."""
    _positive("hidden", hidden)
    _positive("layers", layers)

    def make(in_features: int, out_features: int) -> nn.Module:
        mods: list[nn.Module] = []
        width = in_features
        for _ in range(layers):
            mods += [nn.Linear(width, hidden), nn.ReLU()]
            width = hidden
        last = nn.Linear(width, out_features)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        return nn.Sequential(*mods, last)

    make.kind = "mlp"
    return make


def conv_subnet(hidden: int = 128, kernel_size: int = 3) -> SubnetFactory:
    """Glow's CNN for ``[B, C, H, W]`` inputs: conv k×k → ReLU → conv 1×1 → ReLU → conv k×k."""
    _positive("hidden", hidden)
    if kernel_size not in (1, 3, 5, 7):
        raise ValueError(f"kernel_size should be 1, 3, 5 or 7, got {kernel_size!r}")
    pad = kernel_size // 2

    def make(in_channels: int, out_channels: int) -> nn.Module:
        last = nn.Conv2d(hidden, out_channels, kernel_size, padding=pad)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        return nn.Sequential(
            nn.Conv2d(in_channels, hidden, kernel_size, padding=pad), nn.ReLU(),
            nn.Conv2d(hidden, hidden, 1), nn.ReLU(),
            last)

    make.kind = "conv"
    return make
