"""Pure-PyTorch reference implementations (float64-capable test oracle and eager baseline)."""

from invkernels.reference.coupling import (
    additive_coupling_fwd,
    additive_coupling_inv,
    affine_coupling_fwd,
    affine_coupling_inv,
    log_scale,
)

__all__ = [
    "additive_coupling_fwd",
    "additive_coupling_inv",
    "affine_coupling_fwd",
    "affine_coupling_inv",
    "log_scale",
]
