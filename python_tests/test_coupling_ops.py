"""The coupling ops of every backend against the float64 reference (docs/ops/coupling.md)."""

import math
import os

import pytest
import torch

import invkernels
from invkernels.ops import coupling as C
from invkernels.reference import coupling as R
from tolerances import assert_close

BACKENDS = ["cpp", pytest.param("triton", marks=pytest.mark.triton)]
SCALES = ["exp", "sigmoid"]
SHAPES = [(3, 5, 4, 3), (2, 6), (1, 4, 2, 2), (2, 3, 5)]


def ops_of(backend):
    return C.cpp_ops() if backend == "cpp" else C.triton_ops()


def make(shape, dtype=torch.float64, affine=True, h_scale=1.5):
    x = torch.randn(shape, dtype=torch.float64)
    c2 = shape[1] - shape[1] // 2
    h = h_scale * torch.randn((shape[0], (2 if affine else 1) * c2, *shape[2:]), dtype=torch.float64)
    return x.to(dtype), h.to(dtype)


def n2(shape):
    return (shape[1] - shape[1] // 2) * math.prod(shape[2:])


def reference_grads(fn, inputs, grads):
    inputs = [t.detach().double().requires_grad_() for t in inputs]
    outs = fn(*inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    return torch.autograd.grad(outs, inputs, [g.double() for g in grads])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES[:3])
@pytest.mark.parametrize("direction", ["fwd", "inv"])
def test_affine_backward_matches_reference(backend, scale, dtype, shape, direction):
    x, h = make(shape, dtype)
    g = torch.randn(shape, dtype=dtype)
    gl = torch.randn(shape[0], dtype=dtype)
    op = getattr(ops_of(backend), f"affine_{direction}")
    ref = getattr(R, f"affine_coupling_{direction}")
    xr, hr = x.clone().requires_grad_(), h.clone().requires_grad_()
    grads = torch.autograd.grad(op(xr, hr, scale, 1.7), (xr, hr), (g, gl))
    expected = reference_grads(lambda a, b: ref(a, b, scale, 1.7), (x, h), (g, gl))
    assert_close(grads[0], expected[0])
    assert_close(grads[1], expected[1])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("direction", ["fwd", "inv"])
def test_additive_backward_matches_reference(backend, direction):
    shape = (3, 5, 2, 3)
    x, h = make(shape, torch.float32, affine=False)
    g = torch.randn(shape)
    op = getattr(ops_of(backend), f"additive_{direction}")
    xr, hr = x.clone().requires_grad_(), h.clone().requires_grad_()
    grads = torch.autograd.grad(op(xr, hr), (xr, hr), g)
    expected = reference_grads(getattr(R, f"additive_coupling_{direction}"), (x, h), (g,))
    assert_close(grads[0], expected[0])
    assert_close(grads[1], expected[1])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES + [(0, 5, 3, 3), (3, 5, 0, 4)])
def test_additive_bwd_op_takes_only_grad_out_and_matches_reference(backend, reverse, dtype, shape):
    """``additive_coupling_bwd(grad_out, reverse)``: grad_h's shape [B, C - C // 2, *spatial]
    follows from grad_out's; strided gradients give the same result."""
    g = torch.randn(2 * shape[0], *shape[1:], dtype=dtype)[::2]
    want_in, want_h = R.additive_coupling_vjp(g.double(), reverse)
    for grad_out in (g, g.contiguous()):
        grad_in, grad_h = ops_of(backend).additive_bwd(grad_out, reverse)
        assert grad_h.shape == (shape[0], shape[1] - shape[1] // 2, *shape[2:])
        for got in (grad_in, grad_h):
            assert got.dtype == dtype and got.is_contiguous()
        assert_close(grad_in, want_in)
        assert_close(grad_h, want_h)


@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
@pytest.mark.parametrize("scale", SCALES)
def test_round_trip(backend, scale):
    x, h = make((4, 7, 3, 5), torch.float32)
    y, logdet = C.affine_coupling_fwd(x, h, scale, backend=backend)
    x_back, logdet_inv = C.affine_coupling_inv(y, h, scale, backend=backend)
    assert_close(x_back, x.double())
    assert_close(logdet_inv, -logdet.double(), reduce_len=n2(x.shape))
    xa, ha = make((4, 7, 3, 5), torch.float32, affine=False)
    assert_close(C.additive_coupling_inv(C.additive_coupling_fwd(xa, ha, backend=backend), ha, backend=backend),
                 xa.double())


@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
@pytest.mark.parametrize("scale", SCALES)
def test_logdet_is_slogdet_of_dense_jacobian(backend, scale):
    """h depends on x1 through a nonlinear map, so the Jacobian is block-triangular, not diagonal."""
    shape = (3, 5, 2, 2)
    torch.manual_seed(1)
    x = torch.randn(shape, dtype=torch.float64)
    w = torch.randn(2 * 3 * 4, 2 * 4, dtype=torch.float64) / 3

    def h_of(xs):
        return torch.tanh(xs[:, :2].reshape(xs.shape[0], -1) @ w.T).reshape(xs.shape[0], 6, 2, 2)

    _, logdet = C.affine_coupling_fwd(x, h_of(x), scale, 1.5, backend=backend)
    for b in range(shape[0]):
        def f(flat, b=b):
            xb = flat.reshape(1, *shape[1:])
            return C.affine_coupling_fwd(xb, h_of(xb), scale, 1.5, backend=backend)[0].reshape(-1)

        jac = torch.autograd.functional.jacobian(f, x[b].reshape(-1))
        sign, expected = torch.linalg.slogdet(jac)
        assert sign.item() == 1.0
        assert_close(logdet[b], expected)


def layouts(affine):
    base, hbase = make((4, 6, 6, 8), torch.float32, affine=affine)
    return {
        "strided": (base[::2, :, ::2, 1::2], hbase[::2, :, ::2, 1::2]),
        "channels_last": (base.contiguous(memory_format=torch.channels_last),
                          hbase.contiguous(memory_format=torch.channels_last)),
        "transposed": (base.transpose(2, 3), hbase.transpose(2, 3)),
    }


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["affine_fwd:exp", "affine_fwd:sigmoid", "affine_inv:exp", "affine_inv:sigmoid",
                                  "additive_fwd", "additive_inv"])
def test_hostile_layouts(backend, kind):
    name, _, scale = kind.partition(":")
    op = getattr(ops_of(backend), name)
    ref = getattr(R, name.replace("_", "_coupling_"))
    args = (scale, 2.0) if scale else ()
    for layout, (x, h) in layouts(affine=bool(scale)).items():
        assert not x.is_contiguous(), layout
        out = op(x, h, *args)
        expected = ref(x.double(), h.double(), *args)
        outs, expected = (out, expected) if isinstance(out, tuple) else ((out,), (expected,))
        for got, want in zip(outs, expected):
            assert_close(got, want, reduce_len=n2(x.shape))
        g = torch.randn(x.shape).transpose(2, 3).contiguous().transpose(2, 3)
        xr, hr = x.clone().requires_grad_(), h.clone().requires_grad_()
        first = op(xr, hr, *args)
        grads = torch.autograd.grad(first[0] if scale else first, (xr, hr), g)
        expected = reference_grads(lambda a, b: (ref(a, b, *args)[0] if scale else ref(a, b)), (x, h), (g,))
        assert_close(grads[0], expected[0])
        assert_close(grads[1], expected[1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_and_inf_propagate(backend):
    x, h = make((2, 4, 3), torch.float32)
    x[0, 3, 1] = float("nan")
    h[1, 0, 2] = float("nan")
    h[1, 1, 0] = float("inf")
    for scale in SCALES:
        y, logdet = ops_of(backend).affine_fwd(x, h, scale, 2.0)
        assert torch.isnan(y[0, 3, 1])
        assert torch.isnan(y[1, 2, 2]) and torch.isnan(logdet[1])
        assert torch.isfinite(logdet[0])
        assert torch.isfinite(y[0, :3]).all() and torch.isfinite(y[0, 3, [0, 2]]).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_extreme_raw_scales_stay_bounded(backend):
    """The soft clamp keeps exp scales in [exp(-c), exp(c)] for any raw value; the sigmoid inverse
    multiplies by 1 + exp(-(hs + 2)) and stays finite in float32 down to hs = -86."""
    x = torch.ones(1, 2, 4)
    h = torch.tensor([[[-1e4, -60.0, 60.0, 1e4], [0.0, 0.0, 0.0, 0.0]]])
    ops = ops_of(backend)
    y, _ = ops.affine_fwd(x, h, "exp", 2.0)
    assert_close(y[0, 1], torch.tensor([math.exp(-2), math.exp(-2), math.exp(2), math.exp(2)]))
    x_back, logdet_inv = ops.affine_inv(y, h, "exp", 2.0)
    assert_close(x_back, x.double())
    hs = torch.tensor([[[-85.0, -60.0, 60.0, 85.0], [0.0, 0.0, 0.0, 0.0]]])
    y, logdet = ops.affine_fwd(x, hs, "sigmoid", 2.0)
    assert torch.isfinite(logdet).all()
    x_back, _ = ops.affine_inv(torch.ones(1, 2, 4), hs, "sigmoid", 2.0)
    assert torch.isfinite(x_back).all()
    assert_close(x_back[0, 1], (1 + torch.exp(-(hs[0, 0].double() + 2))), rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bfloat16_error_is_at_most_twice_the_reference_error(backend):
    x, h = make((3, 6, 8, 8), torch.float64)
    y64, l64 = R.affine_coupling_fwd(x, h)
    xb, hb = x.bfloat16(), h.bfloat16()
    y, logdet = ops_of(backend).affine_fwd(xb, hb, "exp", 2.0)
    assert y.dtype == torch.bfloat16 and logdet.dtype == torch.float32
    if backend == "triton" and os.environ.get("TRITON_INTERPRET") == "1":
        # The interpreter truncates float32 -> bfloat16 stores (measured: 1 + 2^-7 - 2^-12 is stored
        # as 1.0, with or without fp_downcast_rounding="rtne"), so its results lie within one
        # bfloat16 ulp of the exact value instead of half of one; a GPU rounds to nearest.
        y_exact, l_exact = R.affine_coupling_fwd(xb.double(), hb.double())
        for got, exact in ((y, y_exact), (logdet, l_exact)):
            bound = torch.finfo(torch.bfloat16).eps * exact.abs() * (1 + 1e-5) + 1e-6
            assert ((got.double() - exact).abs() <= bound).all()
        return
    y_bf_ref, l_bf_ref = R.affine_coupling_fwd(xb, hb)
    for got, ref_low, exact in ((y, y_bf_ref, y64), (logdet, l_bf_ref, l64)):
        err = (got.double() - exact).abs().max().item()
        ref_err = (ref_low.double() - exact).abs().max().item()
        assert err <= 2 * ref_err + 1e-3, (err, ref_err)


def test_logdet_does_not_depend_on_thread_count():
    x, h = make((3, 6, 64, 64), torch.float32)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        _, one = C.cpp_ops().affine_fwd(x, h, "exp", 2.0)
        torch.set_num_threads(max(2, threads))
        y, many = C.cpp_ops().affine_fwd(x, h, "exp", 2.0)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, many)
    # 3 * 64 * 64 = 12288 transformed elements per sample: several chunks and passthrough pieces.
    y_ref, logdet_ref = R.affine_coupling_fwd(x.double(), h.double())
    assert_close(y, y_ref)
    assert_close(many, logdet_ref, reduce_len=12288)


BAD_INPUTS = [
    ("x should be at least 2-D", lambda ops: ops.affine_fwd(torch.randn(4), torch.randn(4), "exp", 2.0)),
    ("x should have at least 2 channels", lambda ops: ops.affine_fwd(torch.randn(2, 1), torch.randn(2, 2), "exp", 2.0)),
    ("same dtype", lambda ops: ops.affine_fwd(torch.randn(2, 4), torch.randn(2, 4, dtype=torch.float64), "exp", 2.0)),
    ("= 6 channels for x with C=5, got 4",
     lambda ops: ops.affine_fwd(torch.randn(2, 5, 3), torch.randn(2, 4, 3), "exp", 2.0)),
    ("= 3 channels for y with C=5, got 6",
     lambda ops: ops.additive_inv(torch.randn(2, 5, 3), torch.randn(2, 6, 3))),
    ("batch size of x (2), got 3", lambda ops: ops.affine_fwd(torch.randn(2, 4, 3), torch.randn(3, 4, 3), "exp", 2.0)),
    ("spatial shape of x [3], got [4]",
     lambda ops: ops.affine_fwd(torch.randn(2, 4, 3), torch.randn(2, 4, 4), "exp", 2.0)),
    ("same number of dimensions as x (3), got 2",
     lambda ops: ops.affine_fwd(torch.randn(2, 4, 3), torch.randn(2, 4), "exp", 2.0)),
    ("floating-point", lambda ops: ops.affine_fwd(torch.ones(2, 4, dtype=torch.long), torch.ones(2, 4, dtype=torch.long),
                                                  "exp", 2.0)),
    ("scale should be one of 'exp', 'sigmoid', 'sigmoid_eps', 'atan', 'rational', got 'softplus'",
     lambda ops: ops.affine_fwd(torch.randn(2, 4), torch.randn(2, 4), "softplus", 2.0)),
    ("clamp should be positive", lambda ops: ops.affine_fwd(torch.randn(2, 4), torch.randn(2, 4), "exp", -1.0)),
    ("within the float32 range", lambda ops: ops.affine_fwd(torch.randn(2, 4), torch.randn(2, 4), "exp", 1e39)),
    ("grad_out should have the shape of x",
     lambda ops: ops.affine_bwd(torch.randn(2, 5), torch.randn(2), torch.randn(2, 4), torch.randn(2, 4), "exp", 2.0,
                                False)),
    ("grad_out should have at least 2 channels to split, got C=1",
     lambda ops: ops.additive_bwd(torch.randn(2, 1, 3), False)),
    ("grad_out should be at least 2-D", lambda ops: ops.additive_bwd(torch.randn(4), True)),
    ("grad_logdet should have shape [2]",
     lambda ops: ops.affine_bwd(torch.randn(2, 4), torch.randn(3), torch.randn(2, 4), torch.randn(2, 4), "exp", 2.0,
                                False)),
]


BAD_INPUT_CASES = [pytest.param(backend, message, call, id=f"{backend}-{message}")
                   for backend in ("cpp", "triton", "reference") for message, call in BAD_INPUTS
                   if not (backend == "reference" and message.startswith("grad_"))]


@pytest.mark.parametrize("backend,message,call", BAD_INPUT_CASES)
def test_bad_inputs_raise_errors_naming_the_argument(backend, message, call):
    if backend == "reference":
        ops = C.CouplingOps(lambda x, h, s, c: R.affine_coupling_fwd(x, h, s, c), None, None, None, None,
                            R.additive_coupling_inv, None, None)
    else:
        ops = ops_of(backend)
    with pytest.raises((ValueError, RuntimeError), match=message.replace("[", r"\[").replace("]", r"\]")
                       .replace("(", r"\(").replace(")", r"\)").replace("*", r"\*")):
        call(ops)


@pytest.mark.parametrize("backend", BACKENDS)
def test_device_mix_is_rejected(backend):
    x = torch.randn(2, 4, 3)
    h = torch.randn(2, 4, 3, device="meta")
    with pytest.raises((ValueError, RuntimeError), match="same device"):
        invkernels.ops.affine_coupling_fwd(x, h, backend=backend)


