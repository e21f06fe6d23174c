"""Functional API over the registered ops (``torch.ops.invkernels``), one module per op family."""

from invkernels.ops import _registry, actnorm, coupling, glow, invconv, spline
from invkernels.ops.actnorm import actnorm_fwd, actnorm_inv
from invkernels.ops.coupling import (
    additive_coupling_fwd,
    additive_coupling_inv,
    affine_coupling_fwd,
    affine_coupling_inv,
)
from invkernels.ops.glow import actnorm_conv1x1, actnorm_conv1x1_vjp
from invkernels.ops.invconv import conv1x1, invconv_inverse_weight, invconv_weight
from invkernels.ops.spline import rq_spline_fwd, rq_spline_inv, rq_spline_inv_bwd, rq_spline_vjp


def prepare(backend: str) -> None:
    """Register every op family of ``backend`` now (Triton is imported lazily otherwise)."""
    for family in _registry.FAMILIES.values():
        family.prepare(backend)


__all__ = [
    "actnorm_conv1x1",
    "actnorm_conv1x1_vjp",
    "actnorm_fwd",
    "actnorm_inv",
    "additive_coupling_fwd",
    "additive_coupling_inv",
    "affine_coupling_fwd",
    "affine_coupling_inv",
    "conv1x1",
    "invconv_inverse_weight",
    "invconv_weight",
    "prepare",
    "rq_spline_fwd",
    "rq_spline_inv",
    "rq_spline_inv_bwd",
    "rq_spline_vjp",
]
