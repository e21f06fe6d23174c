"""The rational-quadratic spline ops (invkernels.ops.spline) on every kernel backend, beyond the op
matrix (python_tests/test_op_matrix.py, which runs every op against the float64 reference at
tame parameters): agreement with nflows in float64 whatever the size of the raw parameters, bin
counts other than the matrix's 3, hostile values, the Jacobian's log-determinant, the fused
inverse-backward against the separate ops, and the conditioned comparison refusing a wrong
gradient."""

import pytest
import torch
from optest import KERNEL_BACKENDS, to_device
from test_spline_reference import assert_relative, hostile_inputs, inputs, nflows_reference
from tolerances import conditioned_atol

from invkernels._validation import logdet_dtype
from invkernels.ops import spline as S
from invkernels.reference import spline as R

F64 = torch.float64
SETTINGS = (3.0, 1e-3, 1e-3, 1e-3)


def ops_of(backend: str):
    return S.cpp_ops() if backend == "cpp" else S.triton_ops()


def grads(fn, x, h, gy, gl):
    x, h = x.detach().requires_grad_(), h.detach().requires_grad_()
    y, logdet = fn(x, h)
    return torch.autograd.grad((y * gy).sum() + (logdet * gl).sum(), (x, h))


@pytest.mark.parametrize("backend_device", KERNEL_BACKENDS)
@pytest.mark.parametrize("bins", [1, 2, 8, 16])
@pytest.mark.parametrize("inverse", [False, True])
@pytest.mark.parametrize("h_scale", [1.0, 1e3])
def test_matches_nflows_in_float64(backend_device, bins, inverse, h_scale):
    """Values, log-dets and gradients against nflows (raw widths and heights far beyond ±50 at
    scale 1e3; the inverse's gradients at the conditioning that makes, see docs/ops/spline.md)."""
    backend, device = backend_device
    ops = ops_of(backend)
    x, h = inputs((4, 3, 5), bins, 2.5, 1.0)
    h = h.unflatten(1, (3, 3 * bins - 1))
    h[:, :, :2 * bins] *= h_scale
    h = h.flatten(1, 2)
    if inverse:
        x = nflows_reference(x, h, bins, tail_bound=SETTINGS[0])[0]
    x, h = to_device(x, device), to_device(h, device)
    op = ops.inv if inverse else ops.fwd

    def mine(a, b):
        return op(a, b, bins, *SETTINGS)

    def theirs(a, b):
        return nflows_reference(a.cpu(), b.cpu(), bins, inverse=inverse, tail_bound=SETTINGS[0])

    for got, want in zip(mine(x, h), theirs(x, h)):
        assert_relative(got.cpu(), want)
    gy, gl = torch.randn_like(x), torch.randn(x.shape[0], dtype=F64, device=device)
    rtol = 1e-7 if inverse and h_scale > 1 else 1e-9
    for got, want in zip(grads(mine, x, h, gy, gl), grads(theirs, x, h, gy.cpu(), gl.cpu())):
        assert_relative(got.cpu(), want, rtol)


@pytest.mark.parametrize("backend_device", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", [F64, torch.float32])
@pytest.mark.parametrize("bins", [1, 8])
@pytest.mark.parametrize("minimum", [1e-3, 1e-6])
def test_hostile_values_stay_finite(backend_device, dtype, bins, minimum):
    """Inputs on every knot, on and beyond the bounds, ±1e30 and ±1e300, raw parameters up to
    ±1e30, bins at their minimum size: every value, log-det and gradient of all four ops is
    finite, the tails are the identity, and outputs inside the bounds stay inside."""
    backend, device = backend_device
    ops = ops_of(backend)
    tail_bound = 3.0
    x, h = hostile_inputs(bins, tail_bound, dtype)
    if dtype == torch.float32:
        x = x.clamp(-1e30, 1e30)
    x, h = to_device(x, device), to_device(h, device)
    settings = (bins, tail_bound, minimum, minimum, minimum)
    g, gl = torch.ones_like(x), torch.ones(x.shape[0], dtype=logdet_dtype(dtype), device=device)
    outside = x.abs() > tail_bound
    for inverse, op in ((False, ops.fwd), (True, ops.inv)):
        out, logdet = op(x, h, *settings)
        assert torch.isfinite(out).all() and torch.isfinite(logdet).all()
        assert torch.equal(out[outside], x[outside])
        assert (out[~outside].abs() <= tail_bound * (1 + torch.finfo(dtype).eps)).all()
        for result in (ops.bwd(g, gl, x, h, *settings, inverse), ops.inv_bwd(x, h, g, gl, *settings)):
            assert all(torch.isfinite(t).all() for t in result)


@pytest.mark.parametrize("backend_device", KERNEL_BACKENDS)
@pytest.mark.parametrize("inverse", [False, True])
def test_logdet_is_slogdet_of_the_jacobian(backend_device, inverse):
    backend, device = backend_device
    ops = ops_of(backend)
    bins = 4
    x, h = (to_device(t, device) for t in inputs((2, 3, 2), bins, 2.0, 2.0))
    op = ops.inv if inverse else ops.fwd
    _, logdet = op(x, h, bins, *SETTINGS)
    for b in range(x.shape[0]):
        jac = torch.autograd.functional.jacobian(lambda v, b=b: op(v.unsqueeze(0), h[b:b + 1], bins, *SETTINGS)[0][0],
                                                 x[b])
        sign, logabsdet = torch.linalg.slogdet(jac.reshape(x[b].numel(), x[b].numel()))
        assert sign.item() == 1.0
        torch.testing.assert_close(logdet[b], logabsdet, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("backend_device", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_fused_inverse_backward_equals_the_inverse_then_the_backward(backend_device, dtype):
    backend, device = backend_device
    ops = ops_of(backend)
    bins = 5
    x, h = (to_device(t.to(dtype), device) for t in inputs((3, 4, 6), bins, 2.0, 1.0))
    y, _ = ops.fwd(x, h, bins, *SETTINGS)
    g, gl = torch.randn_like(y), torch.randn(3, dtype=logdet_dtype(dtype), device=device)
    fused = ops.inv_bwd(y, h, g, gl, bins, *SETTINGS)
    rebuilt, _ = ops.inv(y, h, bins, *SETTINGS)
    separate = (rebuilt, *ops.bwd(g, gl, rebuilt, h, bins, *SETTINGS, False))
    for got, want in zip(fused, separate):
        assert torch.equal(got, want)


@pytest.mark.parametrize("backend_device", KERNEL_BACKENDS)
def test_adding_a_constant_to_raw_widths_changes_nothing(backend_device):
    backend, device = backend_device
    ops = ops_of(backend)
    bins = 6
    x, h = (to_device(t, device) for t in inputs((5, 3), bins, 2.5, 30.0))
    shifted = h.unflatten(1, (3, 3 * bins - 1)).clone()
    shifted[:, :, :bins] += 1e6
    for op in (ops.fwd, ops.inv):
        for got, want in zip(op(x, shifted.flatten(1, 2), bins, *SETTINGS), op(x, h, bins, *SETTINGS)):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-12 * (1 + 1e6))


@pytest.mark.parametrize("perturbation", ["one-element-off-by-1e-2", "computed-in-bfloat16"])
def test_a_wrong_gradient_fails_the_conditioned_comparison(perturbation):
    """The float32 C++ gradients of many elements pass the conditioned comparison of the op matrix
    (twice the float32 reference's error), and fail it moved by 1e-2 at one element or rounded to
    bfloat16."""
    bins = 3
    x, h = inputs((3, 64, 17, 9), bins, 1.5, 0.5, torch.float32)
    g, gl = torch.randn_like(x), torch.randn(3)
    args = (g, gl, x, h, bins, *SETTINGS, False)
    exact = R.rq_spline_vjp(*(t.double() if isinstance(t, torch.Tensor) else t for t in args))
    low = R.rq_spline_vjp(*args)
    ours = S.cpp_ops().bwd(*args)
    for got, in_dtype, want in zip(ours, low, exact):
        atol = conditioned_atol(got, in_dtype, want)
        torch.testing.assert_close(got.double(), want, atol=atol, rtol=2e-5)
        if perturbation == "computed-in-bfloat16":
            wrong = got.to(torch.bfloat16).float()
        else:
            wrong = got.flatten().index_add(0, torch.tensor([0]), torch.full((1,), 1e-2)).view_as(got)
        with pytest.raises(AssertionError):
            torch.testing.assert_close(wrong.double(), want, atol=atol, rtol=2e-5)


@pytest.mark.parametrize("backend_device", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, F64, torch.bfloat16])
@pytest.mark.parametrize("shape,passthrough", [((5, 7), 3), ((3, 2), 1), ((4, 5, 3, 2), 2), ((2, 3, 1), 0)])
def test_passthrough_is_the_elementwise_op_on_the_transformed_channels(backend_device, dtype, shape, passthrough):
    """With ``passthrough=p`` every op equals the elementwise op on ``x[:, p:]`` with the first
    ``p`` channels copied (values, log-dets, gradients: bit for bit, the lanes' math is the same),
    for vectors whose samples split the CPU's vectors (gathered lanes) and for images."""
    backend, device = backend_device
    ops = ops_of(backend)
    bins = 4
    settings = (bins, *SETTINGS)
    c2 = shape[1] - passthrough
    x = to_device(torch.randn(shape, dtype=F64) * 2, device).to(dtype)
    h = to_device(torch.randn(shape[0], c2 * (3 * bins - 1), *shape[2:], dtype=F64), device).to(dtype)
    g = to_device(torch.randn(shape, dtype=F64), device).to(dtype)
    gl = to_device(torch.randn(shape[0], dtype=F64), device).to(logdet_dtype(dtype))

    def whole(t, part):
        return torch.cat([t[:, :passthrough], part], 1)

    for op in (ops.fwd, ops.inv):
        y, logdet = op(x, h, *settings, passthrough)
        y2, logdet2 = op(x[:, passthrough:], h, *settings)
        assert torch.equal(y, whole(x, y2)) and torch.equal(logdet, logdet2)
    for reverse in (False, True):
        g_in, g_h = ops.bwd(g, gl, x, h, *settings, reverse, passthrough)
        g_in2, g_h2 = ops.bwd(g[:, passthrough:], gl, x[:, passthrough:], h, *settings, reverse)
        assert torch.equal(g_in, whole(g, g_in2)) and torch.equal(g_h, g_h2)
    got = ops.inv_bwd(x, h, g, gl, *settings, passthrough)
    want = ops.inv_bwd(x[:, passthrough:], h, g[:, passthrough:], gl, *settings)
    assert torch.equal(got[0], whole(x, want[0])) and torch.equal(got[1], whole(g, want[1]))
    assert torch.equal(got[2], want[2])


def test_passthrough_through_autograd_and_the_functional_api():
    """``invkernels.ops.rq_spline_fwd(..., passthrough=p)`` on every backend: the passed-through
    channels' gradient is the output's, and the others' and ``h``'s equal the reference's."""
    bins = 3
    x = torch.randn(4, 5, 2, dtype=F64)
    h = torch.randn(4, 3 * (3 * bins - 1), 2, dtype=F64)
    gy, gl = torch.randn_like(x), torch.randn(4, dtype=F64)
    want = None
    for backend in ("reference", "cpp", "triton"):
        def fn(a, b):
            return S.rq_spline_fwd(a, b, bins, *SETTINGS, passthrough=2, backend=backend)

        got = grads(fn, x, h, gy, gl)
        assert torch.equal(got[0][:, :2], gy[:, :2])
        if want is None:
            want = got
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)
