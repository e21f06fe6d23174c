"""Functional API over the registered ops (``torch.ops.invkernels``), one module per op family."""

from invkernels.ops import actnorm, coupling
from invkernels.ops.actnorm import actnorm_fwd, actnorm_inv
from invkernels.ops.coupling import (
    additive_coupling_fwd,
    additive_coupling_inv,
    affine_coupling_fwd,
    affine_coupling_inv,
)


def prepare(backend: str) -> None:
    """Register every op family of ``backend`` now (Triton is imported lazily otherwise)."""
    coupling.prepare(backend)
    actnorm.prepare(backend)


__all__ = [
    "actnorm_fwd",
    "actnorm_inv",
    "additive_coupling_fwd",
    "additive_coupling_inv",
    "affine_coupling_fwd",
    "affine_coupling_inv",
    "prepare",
]
