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


