"""What the compat implementations share: counted constructors and nflows' spline parameters (which
normflows' spline coupling took from nflows)."""

from __future__ import annotations

import functools
import warnings

import numpy as np
import torch

from invkernels.compat._lazy import count


def counted(base: type, library: str):
    """An ``__init__`` with ``base``'s signature that builds ``base`` and counts the object."""

    @functools.wraps(base.__init__)
    def __init__(self, *args, **kwargs):
        base.__init__(self, *args, **kwargs)
        count(self, library)

    return __init__


def nflows_spline_h(params: torch.Tensor, x: torch.Tensor, transformed: int, bins: int,
                    net: torch.nn.Module) -> torch.Tensor | None:
    """The spline op's ``h`` from an nflows-style coupling's transform params for ``transformed``
    features of ``x``: widths and heights divided by ``sqrt`` of the net's hidden size, as nflows
    divides them (its warning when the net has none); None when ``params`` is not shaped as ``h``."""
    width = 3 * bins - 1
    if params.dtype != x.dtype or params.shape != (x.shape[0], transformed * width, *x.shape[2:]):
        return None
    if hasattr(net, "hidden_features"):
        divisor = np.sqrt(net.hidden_features)
    elif hasattr(net, "hidden_channels"):
        divisor = np.sqrt(net.hidden_channels)
    else:
        warnings.warn("Inputs to the softmax are not scaled down: initialization might be bad.")
        return params.contiguous()
    blocks = params.unflatten(1, (transformed, width))
    return torch.cat([blocks[:, :, : 2 * bins] / divisor, blocks[:, :, 2 * bins:]], 2).flatten(1, 2)
