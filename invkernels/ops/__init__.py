"""Functional API over the registered ops (``torch.ops.invkernels``), one module per op family."""

from invkernels.ops.coupling import (
    additive_coupling_fwd,
    additive_coupling_inv,
    affine_coupling_fwd,
    affine_coupling_inv,
)

__all__ = ["additive_coupling_fwd", "additive_coupling_inv", "affine_coupling_fwd", "affine_coupling_inv"]
