"""The peers' scale functions of the affine coupling ops: ``"sigmoid_eps"`` (nflows),
``"atan"`` (FrEIA's ATAN clamp) and ``"rational"`` (zuko's soft clamp).

The op matrix checks every op with these scales against the float64 reference on random inputs
(values, gradcheck, opcheck); here: ``L`` and ``L'`` over the whole real line (tails, zero, the
branch points of the Triton ``atan``) against the reference's formulas in float64, and the
peers' own formulas.
"""

from __future__ import annotations

import math

import pytest
import torch
from optest import KERNEL_BACKENDS, to_device

from invkernels._validation import logdet_dtype
from invkernels.ops import coupling as C
from invkernels.reference import coupling as R

F64 = torch.float64
SCALES = {"sigmoid_eps": 2.0, "atan": 1.7, "rational": -math.log(1e-3)}
# Around 0, the atan branch points tan(pi / 8), 0.66 and tan(3 pi / 8), and far out.
H = torch.tensor([-1e4, -60.0, -2.4142135, -2.0, -0.66, -0.4142135, -1e-3, -1e-9, 0.0, 1e-9, 1e-3, 0.41421357,
                  0.6600001, 1.0, 2.4142137, 3.0, 25.0, 1e4], dtype=F64)


def ops_of(backend: str):
    return C.cpp_ops() if backend == "cpp" else C.triton_ops()


def eps_of(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps


@pytest.mark.parametrize("backend_device", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("scale", sorted(SCALES))
def test_log_scale_and_its_derivative_over_the_real_line(backend_device, dtype, scale):
    """``logdet`` of one transformed element per sample is ``L(hs)``; ``affine_coupling_bwd`` with
    only a log-det gradient gives ``L'(hs)``: both to a few ulps of the float64 reference (relative,
    or of the function's scale where it crosses 0)."""
    backend, device = backend_device
    ops = ops_of(backend)
    clamp = SCALES[scale]
    hs = H.to(dtype)
    n = hs.numel()
    x = to_device(torch.zeros(n, 2, dtype=dtype), device)
    h = to_device(torch.stack([hs, torch.zeros_like(hs)], 1), device)
    _, logdet = ops.affine_fwd(x, h, scale, clamp)
    ones = to_device(torch.ones(n, dtype=logdet_dtype(dtype)), device)
    _, grad_h = ops.affine_bwd(torch.zeros_like(x), ones, x, h, scale, clamp, False)
    exact = hs.to(F64)
    want_l = R.log_scale(exact, scale, clamp)
    want_d = R.log_scale_grad(exact, scale, clamp)
    ulps = 8 * eps_of(dtype)
    torch.testing.assert_close(logdet.cpu().to(F64), want_l, rtol=ulps, atol=ulps * min(clamp, 1.0))
    torch.testing.assert_close(grad_h[:, 0].cpu().to(F64), want_d, rtol=ulps, atol=torch.finfo(dtype).tiny)


def test_scales_are_the_peers_formulas():
    """The reference scales are nflows', FrEIA's and zuko's expressions."""
    u = torch.linspace(-8, 8, 101, dtype=F64)
    torch.testing.assert_close(R.log_scale(u, "sigmoid_eps"), torch.log(torch.sigmoid(u + 2) + 1e-3), rtol=0, atol=0)
    torch.testing.assert_close(R.log_scale(u, "atan", 2.0), 2.0 * (0.636 * torch.atan(u)), rtol=0, atol=0)
    slope = 1e-3
    torch.testing.assert_close(R.log_scale(u, "rational", -math.log(slope)), u / (1 + abs(u / math.log(slope))),
                               rtol=1e-15, atol=1e-15)


@pytest.mark.parametrize("scale", ["atan", "rational"])
def test_clamp_is_checked_where_the_scale_uses_it(scale):
    x, h = torch.randn(2, 4), torch.randn(2, 4)
    for backend in ("reference", "cpp", "triton"):
        with pytest.raises(ValueError, match=f"clamp should be positive and finite .* for scale='{scale}', got -1"):
            C.affine_coupling_fwd(x, h, scale, -1.0, backend=backend)


def test_sigmoid_eps_ignores_the_clamp():
    x, h = torch.randn(2, 4), torch.randn(2, 4)
    for backend in ("reference", "cpp", "triton"):
        a = C.affine_coupling_fwd(x, h, "sigmoid_eps", -1.0, backend=backend)
        b = C.affine_coupling_fwd(x, h, "sigmoid_eps", 2.0, backend=backend)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
