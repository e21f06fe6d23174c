"""CUDA kernels (C++ and Triton) against the float64 reference; skipped without a GPU."""

import pytest
import torch

from invkernels.ops import coupling as C
from invkernels.reference import coupling as R
from tolerances import assert_close

pytestmark = pytest.mark.cuda

BACKENDS = ["cpp", "triton"]


def ops_of(backend):
    return C.cpp_ops() if backend == "cpp" else C.triton_ops()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scale", ["exp", "sigmoid"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 5, 17, 9), (2, 6), (5, 64, 32, 32)])
def test_cuda_forward_inverse_backward(backend, scale, dtype, shape):
    x = torch.randn(shape, device="cuda", dtype=torch.float64)
    c2 = shape[1] - shape[1] // 2
    h = torch.randn((shape[0], 2 * c2, *shape[2:]), device="cuda", dtype=torch.float64)
    ops = ops_of(backend)
    n = c2 * (x[0, 0].numel())
    xd, hd = x.to(dtype).requires_grad_(), h.to(dtype).requires_grad_()
    y, logdet = ops.affine_fwd(xd, hd, scale, 2.0)
    y_ref, logdet_ref = R.affine_coupling_fwd(xd.detach().double(), hd.detach().double(), scale, 2.0)
    assert_close(y, y_ref)
    assert_close(logdet, logdet_ref, reduce_len=n)
    x_back, _ = ops.affine_inv(y.detach(), hd.detach(), scale, 2.0)
    assert_close(x_back, xd.detach().double(), **({} if dtype != torch.bfloat16 else {"atol": 0.1, "rtol": 0.05}))
    g, gl = torch.randn_like(y), torch.randn_like(logdet)
    gx, gh = torch.autograd.grad((y, logdet), (xd, hd), (g, gl))
    xr, hr = xd.detach().double().requires_grad_(), hd.detach().double().requires_grad_()
    ex, eh = torch.autograd.grad(R.affine_coupling_fwd(xr, hr, scale, 2.0), (xr, hr), (g.double(), gl.double()))
    assert_close(gx, ex)
    assert_close(gh, eh, reduce_len=1 if dtype != torch.bfloat16 else 4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_cuda_opcheck_and_additive(backend):
    suffix = "" if backend == "cpp" else "_triton"
    ops_of(backend)
    x = torch.randn(2, 5, 3, 4, device="cuda")
    h = torch.randn(2, 6, 3, 4, device="cuda")
    ha = torch.randn(2, 3, 3, 4, device="cuda")
    ns = torch.ops.invkernels
    torch.library.opcheck(getattr(ns, "affine_coupling_fwd" + suffix), (x.requires_grad_(), h, "exp", 2.0))
    torch.library.opcheck(getattr(ns, "additive_coupling_fwd" + suffix), (x, ha))
    y = getattr(ns, "additive_coupling_fwd" + suffix)(x, ha)
    assert_close(y, R.additive_coupling_fwd(x.double(), ha.double()))
    for reverse in (False, True):
        g = torch.randn(2, 5, 3, 4, device="cuda")
        torch.library.opcheck(getattr(ns, "additive_coupling_bwd" + suffix), (g, reverse))
        grad_in, grad_h = getattr(ns, "additive_coupling_bwd" + suffix)(g, reverse)
        want_in, want_h = R.additive_coupling_vjp(g.double(), reverse)
        assert grad_h.shape == ha.shape and grad_h.device == g.device
        assert_close(grad_in, want_in)
        assert_close(grad_h, want_h)


def test_cuda_cpu_mix_is_rejected():
    with pytest.raises((ValueError, RuntimeError), match="same device"):
        C.cpp_ops().affine_fwd(torch.randn(2, 4, device="cuda"), torch.randn(2, 4), "exp", 2.0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 5, 17, 9), (64, 6), (5, 64, 32, 32)])
def test_cuda_actnorm(backend, dtype, shape):
    from invkernels.ops import actnorm as A
    from invkernels.reference import actnorm as RA

    ops = A.cpp_ops() if backend == "cpp" else A.triton_ops()
    x = torch.randn(shape, device="cuda", dtype=torch.float64).to(dtype)
    b = torch.randn(shape[1], device="cuda", dtype=torch.float64).to(dtype)
    ls = (0.5 * torch.randn(shape[1], device="cuda", dtype=torch.float64)).to(dtype)
    inputs = [t.clone().requires_grad_() for t in (x, b, ls)]
    y, logdet = ops.fwd(*inputs)
    inputs64 = [t.detach().double().requires_grad_() for t in (x, b, ls)]
    y_ref, logdet_ref = RA.actnorm_fwd(*inputs64)
    n = shape[0] * x[0, 0].numel()
    assert_close(y, y_ref)
    assert_close(logdet, logdet_ref, reduce_len=n)
    g, gl = torch.randn_like(y), torch.randn_like(logdet)
    grads = torch.autograd.grad((y, logdet), inputs, (g, gl))
    expected = torch.autograd.grad((y_ref, logdet_ref), inputs64, (g.double(), gl.double()))
    assert_close(grads[0], expected[0])
    for got, want in zip(grads[1:], expected[1:]):
        assert_close(got, want, reduce_len=n)
