"""ActNorm ops of every backend against the float64 reference."""

import pytest
import torch

from invkernels.ops import actnorm as A
from invkernels.reference import actnorm as R
from tolerances import assert_close

BACKENDS = ["cpp", pytest.param("triton", marks=pytest.mark.triton)]
SHAPES = [(3, 5, 4, 3), (6, 4), (1, 4, 2, 2), (5, 3, 7)]


def ops_of(backend):
    return A.cpp_ops() if backend == "cpp" else A.triton_ops()


def make(shape, dtype=torch.float64):
    x = torch.randn(shape, dtype=torch.float64)
    bias = torch.randn(shape[1], dtype=torch.float64)
    log_scale = 0.5 * torch.randn(shape[1], dtype=torch.float64)
    return x.to(dtype), bias.to(dtype), log_scale.to(dtype)


def per_channel_len(shape):
    return shape[0] * (torch.Size(shape[2:]).numel())


@pytest.mark.parametrize("backend", BACKENDS)
def test_logdet_is_slogdet_of_dense_jacobian(backend):
    x, b, ls = make((2, 3, 2, 2))
    ops = ops_of(backend)
    _, logdet = ops.fwd(x, b, ls)
    jac = torch.autograd.functional.jacobian(lambda v: ops.fwd(v.reshape(1, 3, 2, 2), b, ls)[0].reshape(-1),
                                             x[0].reshape(-1))
    sign, expected = torch.linalg.slogdet(jac)
    assert sign.item() == 1.0
    assert_close(logdet[0], expected)
    assert_close(logdet[1], expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_hostile_layouts_and_sizes(backend):
    ops = ops_of(backend)
    base, b, ls = make((4, 6, 6, 8), torch.float32)
    for x in (base[::2, :, ::2, 1::2], base.contiguous(memory_format=torch.channels_last), base.transpose(2, 3)):
        y, _ = ops.fwd(x, b, ls)
        assert_close(y, R.actnorm_fwd(x.double(), b.double(), ls.double())[0])
        g = torch.randn(x.shape)
        xr = x.clone().requires_grad_()
        (gx,) = torch.autograd.grad(ops.fwd(xr, b, ls)[0], xr, g)
        assert_close(gx, (g.double() * ls.double().exp().reshape(1, -1, 1, 1)))
    for shape in ((0, 6, 3, 3), (3, 6, 0, 2)):
        x, b, ls = make(shape, torch.float32)
        xr, br, lsr = (t.clone().requires_grad_() for t in (x, b, ls))
        y, logdet = ops.fwd(xr, br, lsr)
        assert y.shape == x.shape and logdet.shape == (shape[0],)
        gx, gb, gls = torch.autograd.grad(y.sum() + logdet.sum(), (xr, br, lsr))
        assert gx.shape == x.shape
        assert torch.equal(gb, torch.zeros(6))
        assert_close(gls, torch.zeros(6, dtype=torch.float64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_outputs_larger_than_the_streaming_threshold(dtype):
    # 64 MiB and more are written with streaming stores (csrc/cpu/actnorm_kernel.cpp); odd plane
    # sizes put the planes at unaligned addresses, so the scalar head and tail run too.
    spatial = 2_796_203
    x = torch.randn(3 if dtype == torch.float32 else 2, 2, spatial, dtype=dtype)
    bias, log_scale = torch.randn(2, dtype=dtype), 0.3 * torch.randn(2, dtype=dtype)
    assert x.numel() * x.element_size() >= 64 * 2**20
    for op, ref in ((A.actnorm_fwd, R.actnorm_fwd), (A.actnorm_inv, R.actnorm_inv)):
        y, _ = op(x, bias, log_scale, backend="cpp")
        assert_close(y, ref(x, bias, log_scale)[0])


def test_parameter_gradients_do_not_depend_on_thread_count():
    x, b, ls = make((8, 4, 32, 32), torch.float32)
    g, gl = torch.randn(x.shape), torch.randn(8)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = A.cpp_ops().bwd(g, gl, x, b, ls, False)
        torch.set_num_threads(max(2, threads))
        many = A.cpp_ops().bwd(g, gl, x, b, ls, False)
    finally:
        torch.set_num_threads(threads)
    for a, c in zip(one, many):
        assert torch.equal(a, c)


BAD = [
    ("bias should have shape \\[C\\] = \\[4\\] for x with C=4, got \\[3\\]",
     lambda ops: ops.fwd(torch.randn(2, 4), torch.randn(3), torch.randn(4))),
    ("x and log_scale should have the same dtype",
     lambda ops: ops.fwd(torch.randn(2, 4), torch.randn(4), torch.randn(4, dtype=torch.float64))),
    ("y should be at least 2-D", lambda ops: ops.inv(torch.randn(4), torch.randn(4), torch.randn(4))),
    ("grad_logdet should have shape \\[2\\]",
     lambda ops: ops.bwd(torch.randn(2, 4), torch.randn(3), torch.randn(2, 4), torch.randn(4), torch.randn(4), False)),
    ("same device", lambda ops: ops.fwd(torch.randn(2, 4), torch.randn(4, device="meta"), torch.randn(4))),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("message,call", BAD, ids=[m[:30] for m, _ in BAD])
def test_bad_inputs(backend, message, call):
    with pytest.raises((ValueError, RuntimeError), match=message):
        call(ops_of(backend))
