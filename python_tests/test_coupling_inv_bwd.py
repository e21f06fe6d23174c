"""Fused inverse + backward of the coupling ops (memory-free backprop) against the float64
reference: the rebuilt input and the gradients of the forward at it, in one pass."""

import pytest
import torch

from invkernels._validation import logdet_dtype
from invkernels.ops import coupling as F
from invkernels.reference import coupling as R
from tolerances import assert_close

BACKENDS = ["cpp", "triton", "reference"]
SHAPES = [(3, 5, 4, 3), (2, 6), (2, 7, 5), (1, 4, 2, 3, 2), (4, 64, 8, 8)]


def ops_of(backend):
    return F.cpp_ops() if backend == "cpp" else F.triton_ops()


def affine_case(shape, scale, dtype=torch.float64, device="cpu"):
    x = torch.randn(shape, dtype=torch.float64)
    c2 = shape[1] - shape[1] // 2
    h = torch.randn(shape[0], 2 * c2, *shape[2:], dtype=torch.float64)
    y, _ = R.affine_coupling_fwd(x, h, scale, 2.0)
    g = torch.randn(shape, dtype=torch.float64)
    gl = torch.randn(shape[0], dtype=torch.float64)
    return x, *(t.to(dtype=dtype, device=device) for t in (y, h, g)), gl.to(dtype=logdet_dtype(dtype), device=device)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scale", ["exp", "sigmoid"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES)
def test_affine_matches_inverse_then_vjp(backend, scale, dtype, shape):
    x, y, h, g, gl = affine_case(shape, scale, dtype)
    got = F.affine_coupling_inv_bwd(y, h, g, gl, scale, 2.0, backend=backend)
    want = R.affine_coupling_inv_bwd(*(t.double() for t in (y, h, g, gl)), scale, 2.0)
    n = shape[1] * y[0, 0].numel()
    for value, ref in zip(got, want):
        assert value.dtype == dtype and value.shape == ref.shape and value.is_contiguous()
        assert_close(value, ref, reduce_len=n)
    assert_close(got[0], x, reduce_len=n)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scale", ["exp", "sigmoid"])
def test_affine_gradients_equal_autograd_of_the_forward(backend, scale):
    x, y, h, g, gl = affine_case((2, 5, 3, 4), scale)
    xr, hr = x.clone().requires_grad_(), h.clone().requires_grad_()
    want = torch.autograd.grad(R.affine_coupling_fwd(xr, hr, scale, 2.0), (xr, hr), (g, gl))
    _, grad_x, grad_h = F.affine_coupling_inv_bwd(y, h, g, gl, scale, 2.0, backend=backend)
    assert_close(grad_x, want[0])
    assert_close(grad_h, want[1])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES)
def test_additive_matches_inverse_then_vjp(backend, dtype, shape):
    c2 = shape[1] - shape[1] // 2
    y = torch.randn(shape, dtype=dtype)
    h = torch.randn(shape[0], c2, *shape[2:], dtype=dtype)
    g = torch.randn(shape, dtype=dtype)
    x, grad_x, grad_h = F.additive_coupling_inv_bwd(y, h, g, backend=backend)
    assert_close(x, R.additive_coupling_inv(y.double(), h.double()))
    assert torch.equal(grad_x, g) and grad_x.data_ptr() != g.data_ptr()
    assert torch.equal(grad_h, g[:, shape[1] // 2:])


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_hostile_layouts_match_contiguous(backend):
    x, y, h, g, gl = affine_case((2, 6, 5, 4), "sigmoid", torch.float32)
    want = F.affine_coupling_inv_bwd(y, h, g, gl, "sigmoid", 2.0, backend=backend)
    cl = [t.contiguous(memory_format=torch.channels_last) for t in (y, h, g)]
    transposed = [t.transpose(2, 3).contiguous().transpose(2, 3) for t in (y, h, g)]
    for y2, h2, g2 in (cl, transposed):
        got = F.affine_coupling_inv_bwd(y2, h2, g2, gl, "sigmoid", 2.0, backend=backend)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
            assert a.is_contiguous()


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_nan_propagates(backend):
    _, y, h, g, gl = affine_case((2, 4, 3, 3), "sigmoid", torch.float32)
    h[0, 0, 1, 1] = float("nan")
    x, grad_x, grad_h = F.affine_coupling_inv_bwd(y, h, g, gl, "sigmoid", 2.0, backend=backend)
    assert torch.isnan(x[0, 2, 1, 1]) and torch.isnan(grad_x[0, 2, 1, 1]) and torch.isnan(grad_h[0, 0, 1, 1])
    assert torch.isfinite(x[1]).all() and torch.isfinite(grad_h[1]).all()


BAD = [
    ("grad_y should have the shape of y", lambda y, h, g, gl: (y, h, g[:, :4], gl)),
    ("grad_logdet should have shape", lambda y, h, g, gl: (y, h, g, gl[:1])),
    ("h should have 2 \\* \\(C - C // 2\\) = 6 channels for y with C=5, got 5", lambda y, h, g, gl: (y, h[:, :5], g, gl)),
    ("y and h should have the same dtype", lambda y, h, g, gl: (y, h.double(), g, gl)),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("message,mutate", BAD, ids=[m[:20] for m, _ in BAD])
def test_bad_arguments(backend, message, mutate):
    _, *case = affine_case((2, 5, 3, 4), "exp", torch.float32)
    with pytest.raises(ValueError, match=message):
        F.affine_coupling_inv_bwd(*mutate(*case), "exp", 2.0, backend=backend)


