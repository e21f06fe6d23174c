"""Pure-PyTorch reference implementations (float64-capable test oracle and eager baseline)."""

from invkernels.reference.actnorm import actnorm_fwd, actnorm_inv, actnorm_vjp
from invkernels.reference.coupling import (
    additive_coupling_fwd,
    additive_coupling_inv,
    additive_coupling_vjp,
    affine_coupling_fwd,
    affine_coupling_inv,
    affine_coupling_vjp,
    log_scale,
)
from invkernels.reference.invconv import (
    conv1x1,
    eager_inverse_weight,
    invconv_weight,
    invconv_weight_vjp,
    lu_factors,
    random_rotation,
)
from invkernels.reference.spline import rq_spline_fwd, rq_spline_inv

__all__ = [
    "actnorm_fwd",
    "actnorm_inv",
    "actnorm_vjp",
    "additive_coupling_fwd",
    "additive_coupling_inv",
    "additive_coupling_vjp",
    "affine_coupling_fwd",
    "affine_coupling_inv",
    "affine_coupling_vjp",
    "conv1x1",
    "eager_inverse_weight",
    "invconv_weight",
    "invconv_weight_vjp",
    "log_scale",
    "lu_factors",
    "random_rotation",
    "rq_spline_fwd",
    "rq_spline_inv",
]
