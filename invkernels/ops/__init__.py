"""Functional API over the registered ops (``torch.ops.invkernels``), one module per op family."""

from invkernels.ops import actnorm, coupling, invconv
from invkernels.ops.actnorm import actnorm_fwd, actnorm_inv
from invkernels.ops.coupling import (
    additive_coupling_fwd,
    additive_coupling_inv,
    affine_coupling_fwd,
    affine_coupling_inv,
)
from invkernels.ops.invconv import invconv_inverse_weight, invconv_weight


def prepare(backend: str) -> None:
    """Register every op family of ``backend`` now (Triton is imported lazily otherwise)."""
    coupling.prepare(backend)
    actnorm.prepare(backend)
    invconv.prepare(backend)


__all__ = [
    "actnorm_fwd",
    "actnorm_inv",
    "additive_coupling_fwd",
    "additive_coupling_inv",
    "affine_coupling_fwd",
    "affine_coupling_inv",
    "invconv_inverse_weight",
    "invconv_weight",
    "prepare",
]
