"""The per-position product of the 1x1 convolution (``torch.ops.invkernels.conv1x1``), plain and
with an ActNorm folded in, against the float64 reference."""

import itertools

import pytest
import torch

from invkernels.ops import invconv as F
from invkernels.reference import actnorm as RA
from invkernels.reference import invconv as R
from optest import as_double, layouts, op, operands
from tolerances import assert_close

SHAPES = [(6, 5), (3, 5, 4, 3), (2, 5, 7), (1, 5, 2, 3, 2), (3, 8, 1, 2)]


@pytest.mark.parametrize("folded", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_reference_in_every_layout(shape, dtype, folded):
    x, w, b, ls = operands(shape, dtype, folded)
    expected = R.conv1x1(*as_double(x, w, b, ls))
    for name, xl in layouts(x).items():
        y = F.conv1x1(xl, w, b, ls)
        assert_close(y, expected, reduce_len=shape[1])
        assert y.is_contiguous() != F.channels_last_like(xl), name


def test_folded_is_actnorm_then_product():
    x, w, b, ls = operands((2, 6, 3, 4))
    an, _ = RA.actnorm_fwd(x, b, ls)
    assert_close(F.conv1x1(x, w, b, ls), R.conv1x1(an, w))
    assert_close(F.conv1x1(x, w, b, ls, backend="reference"), R.conv1x1(an, w))


def test_channels_last_in_gives_channels_last_out():
    x, w, b, ls = operands((2, 4, 3, 5))
    y = F.conv1x1(x.contiguous(memory_format=torch.channels_last), w, b, ls)
    assert y.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous()


@pytest.mark.parametrize("folded", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("backend", ["cpp", pytest.param("triton", marks=pytest.mark.triton)])
def test_bwd_op_matches_reference_vjp_for_every_mask(backend, shape, folded):
    x, w, b, ls = operands(shape, folded=folded)
    g = torch.randn(shape, dtype=torch.float64)
    full = R.conv1x1_vjp(g, x, w, b, ls)
    for mask in itertools.product([False, True], repeat=3):
        got = op("conv1x1_bwd", backend)(g, x, w, b, ls, list(mask))
        wanted = (mask[0], mask[1], folded and mask[2], folded and mask[2])
        for value, want, ref in zip(got, wanted, full):
            if want:
                assert_close(value, ref, reduce_len=x.numel())
            else:
                assert value is None


@pytest.mark.parametrize("folded", [False, True])
@pytest.mark.parametrize("shape", [(4, 3), (2, 3, 2, 3), (2, 4, 1, 1), (2, 3, 5)])
def test_gradcheck_and_gradgradcheck(shape, folded):
    args = [None if t is None else t.requires_grad_() for t in operands(shape, folded=folded)]
    inputs = [t for t in args if t is not None]

    def fn(*ts):
        return F.conv1x1(*ts)

    assert torch.autograd.gradcheck(fn, inputs)
    assert torch.autograd.gradgradcheck(fn, inputs)
    if len(shape) == 4:
        xl = args[0].detach().contiguous(memory_format=torch.channels_last).requires_grad_()
        assert torch.autograd.gradcheck(fn, [xl, *inputs[1:]])


@pytest.mark.parametrize("folded", [False, True])
@pytest.mark.parametrize("shape", [(4, 3), (2, 3, 2, 3), (2, 3, 5)])
def test_opcheck(shape, folded):
    x, w, b, ls = operands(shape, torch.float32, folded)
    cases = [(x, w, b, ls)]
    if len(shape) == 4:
        cases.append((x.contiguous(memory_format=torch.channels_last), w, b, ls))
    for xc, wc, bc, lc in cases:
        args = (xc.requires_grad_(), wc.requires_grad_(), bc, lc) if bc is None else \
            tuple(t.requires_grad_() for t in (xc, wc, bc, lc))
        torch.library.opcheck(torch.ops.invkernels.conv1x1.default, args)
        g = torch.randn(shape)
        torch.library.opcheck(torch.ops.invkernels.conv1x1_bwd.default,
                              (g, *(None if t is None else t.detach() for t in args), [True, True, True]))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reduced_precision_error_is_at_most_twice_the_reference_in_that_dtype(dtype):
    x, w, b, ls = operands((2, 16, 6, 6), torch.float64)
    g = torch.randn(x.shape, dtype=torch.float64)
    exact = R.conv1x1(x, w, b, ls)
    exact_grads = R.conv1x1_vjp(g, x, w, b, ls)
    low = [t.to(dtype) for t in (x, w, b, ls)]
    ours = F.conv1x1(*low)
    ref = R.conv1x1(*low)
    assert ours.dtype == dtype

    def err(a, e):
        return ((a.double() - e).norm() / e.norm()).item()

    assert err(ours, exact) <= 2 * err(ref, exact) + 1e-3
    ours_grads = torch.ops.invkernels.conv1x1_bwd(g.to(dtype), *low, [True, True, True])
    ref_grads = R.conv1x1_vjp(g.to(dtype), *low)
    for a, r, e in zip(ours_grads, ref_grads, exact_grads):
        assert a.dtype == dtype
        assert err(a, e) <= 2 * err(r, e) + 1e-3


@pytest.mark.parametrize("folded", [False, True])
def test_empty_batch_and_zero_spatial_size(folded):
    for shape in [(0, 4, 3, 3), (2, 4, 0, 3), (0, 4)]:
        x, w, b, ls = operands(shape, folded=folded)
        y = F.conv1x1(x, w, b, ls)
        assert y.shape == x.shape
        gx, gw, gb, gls = torch.ops.invkernels.conv1x1_bwd(torch.ones(shape, dtype=x.dtype), x, w, b, ls,
                                                           [True, True, True])
        assert gx.shape == x.shape
        assert torch.equal(gw, torch.zeros_like(w))
        if folded:
            assert torch.equal(gb, torch.zeros_like(b)) and torch.equal(gls, torch.zeros_like(ls))


def test_runs_in_the_input_dtype_under_autocast():
    x, w, b, ls = operands((2, 4, 3, 3), torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = F.conv1x1(x, w, b, ls)
        grads = torch.ops.invkernels.conv1x1_bwd(torch.ones_like(x), x, w, b, ls, [True, True, True])
        weight = F.invconv_weight(torch.arange(4), w, w, torch.ones(4), ls)
    assert y.dtype == torch.float32 and weight.dtype == torch.float32
    assert all(g.dtype == torch.float32 for g in grads)
    assert_close(y, R.conv1x1(*as_double(x, w, b, ls)), reduce_len=4)


def test_nan_and_inf_propagate():
    x, w, b, ls = operands((2, 3, 2, 2), torch.float32)
    x[0, 1, 0, 0] = float("nan")
    x[1, 0, 1, 1] = float("inf")
    y = F.conv1x1(x, w, b, ls)
    assert torch.isnan(y[0, :, 0, 0]).all()
    assert not torch.isfinite(y[1, :, 1, 1]).any()
    assert torch.isfinite(y[0, :, 1, 1]).all()


def test_compiles_fullgraph_with_gradients():
    x, w, b, ls = (t.float().requires_grad_() for t in operands((2, 4, 3, 3)))

    def fn(x, w, b, ls):
        return F.conv1x1(x, w, b, ls).square().sum()

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    got = torch.autograd.grad(compiled(x, w, b, ls), (x, w, b, ls))
    want = torch.autograd.grad(fn(x, w, b, ls), (x, w, b, ls))
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e)


BAD = [
    ("x should be at least 2-D", lambda x, w, b, ls: (x[0, 0, 0], w, b, ls)),
    ("x should be a floating-point tensor", lambda x, w, b, ls: (x.long(), w, b, ls)),
    (r"weight should have shape \[C, C\] = \[4, 4\] for x with C=4, got \[4, 3\]",
     lambda x, w, b, ls: (x, w[:, :3], b, ls)),
    (r"weight should have shape \[C, C\] = \[4, 4\] for x with C=4, got \[3, 3\]",
     lambda x, w, b, ls: (x, w[:3, :3], b, ls)),
    ("x and weight should have the same dtype", lambda x, w, b, ls: (x, w.double(), b, ls)),
    ("bias and log_scale .* should be given together or both be None, got bias alone",
     lambda x, w, b, ls: (x, w, b, None)),
    ("got log_scale alone", lambda x, w, b, ls: (x, w, None, ls)),
    (r"bias should have shape \[C\] = \[4\] for x with C=4, got \[3\]", lambda x, w, b, ls: (x, w, b[:3], ls)),
    ("x and log_scale should have the same dtype", lambda x, w, b, ls: (x, w, b, ls.double())),
]


@pytest.mark.parametrize("backend", ["cpp", "reference"])
@pytest.mark.parametrize("message,mutate", BAD, ids=[m[:24] for m, _ in BAD])
def test_bad_arguments_name_the_argument_and_value(backend, message, mutate):
    args = mutate(*operands((2, 4, 3, 3), torch.float32))
    with pytest.raises(ValueError, match=message):
        F.conv1x1(*args, backend=backend)
    with pytest.raises(ValueError, match=message):
        with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
            fake = [None if t is None else mode.from_tensor(t) for t in args]
            torch.ops.invkernels.conv1x1(*fake)


def test_bwd_rejects_a_grad_of_another_shape():
    x, w, b, ls = operands((2, 4, 3, 3))
    with pytest.raises(ValueError, match=r"grad_y should have the shape of x \[2, 4, 3, 3\], got \[2, 4, 3\]"):
        torch.ops.invkernels.conv1x1_bwd(torch.zeros(2, 4, 3, dtype=x.dtype), x, w, b, ls, [True, True, True])


@pytest.mark.cuda
@pytest.mark.parametrize("folded", [False, True])
@pytest.mark.parametrize("shape", [(6, 5), (3, 5, 4, 3), (16, 64, 32, 32)])
def test_cuda_matches_reference(shape, folded):
    x, w, b, ls = operands(shape, torch.float32, folded)
    g = torch.randn(shape)
    exact = R.conv1x1(*as_double(x, w, b, ls))
    exact_grads = R.conv1x1_vjp(*as_double(g, x, w, b, ls))
    cuda = [None if t is None else t.cuda() for t in (x, w, b, ls)]
    for xl in layouts(cuda[0]).values():
        assert_close(F.conv1x1(xl, *cuda[1:]), exact, reduce_len=shape[1])
        grads = torch.ops.invkernels.conv1x1_bwd(g.cuda(), xl, *cuda[1:], [True, True, True])
        for got, want in zip(grads, exact_grads):
            if want is not None:
                assert_close(got, want, reduce_len=x.numel())
    torch.library.opcheck(torch.ops.invkernels.conv1x1.default, tuple(cuda))
