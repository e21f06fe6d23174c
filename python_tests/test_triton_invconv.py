"""The Triton kernels of the LU 1x1 convolution family (``invkernels.triton.invconv``) under the
interpreter, against the float64 reference: weight assembly and its backward, the per-position
product (plain and with an ActNorm folded in) and its backward, in every layout, mask and dtype."""

import itertools

import pytest
import torch

from invkernels.ops import invconv as F
from invkernels.reference import invconv as R
from invkernels.triton import invconv as T
from optest import as_double, layouts, operands
from tolerances import assert_close

pytestmark = pytest.mark.triton

FLOATS = [torch.float32, torch.float64]
SHAPES = [(6, 5), (3, 5, 4, 3), (2, 5, 7), (1, 5, 2, 3, 2), (3, 8, 1, 2), (2, 17, 3)]


def factors(c, dtype=torch.float64):
    """Random LU factors; lower and upper are full matrices, of which the op reads one triangle each."""
    perm = torch.randperm(c)
    lower = 0.5 * torch.randn(c, c, dtype=torch.float64)
    upper = 0.5 * torch.randn(c, c, dtype=torch.float64)
    sign = torch.where(torch.rand(c) < 0.5, -1.0, 1.0).double()
    log_s = 0.3 * torch.randn(c, dtype=torch.float64)
    return perm, *(t.to(dtype) for t in (lower, upper, sign, log_s))


def strided_factors(fs):
    """The same values with other strides: transposed matrices, vectors with stride 2."""
    perm, lower, upper, sign, log_s = fs

    def spread(v):
        return torch.stack([v, torch.zeros_like(v)], dim=1)[:, 0]

    return spread(perm), lower.t().contiguous().t(), upper.t().contiguous().t(), spread(sign), spread(log_s)


def rel_err(a, exact):
    return ((a.double() - exact).norm() / exact.norm()).item()


@pytest.fixture
def gpu_tiles(monkeypatch):
    """The launchers' GPU configurations (small tiles, several chunks), run by the interpreter."""
    monkeypatch.setattr(T, "interpreting", lambda: False)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("c", [1, 5, 16, 33])
def test_weight_and_its_backward_match_the_reference(c, dtype):
    fs = factors(c, dtype)
    g = torch.randn(c, c, dtype=dtype)
    fs64 = (fs[0], *as_double(*fs[1:]))
    exact = R.invconv_weight(*fs64)
    exact_grads = R.invconv_weight_vjp(g.double(), *fs64)
    for args in (fs, strided_factors(fs)):
        w = T.invconv_weight(*args)
        assert w.dtype == dtype and w.is_contiguous()
        assert_close(w, exact, reduce_len=c)
        for grad_w in (g, g.t().contiguous().t()):
            grads = T.invconv_weight_bwd(grad_w, *args)
            for got, want in zip(grads, exact_grads):
                assert got.dtype == dtype and got.is_contiguous()
                assert_close(got, want, reduce_len=c)


def test_weight_in_the_gpu_configuration(gpu_tiles):
    fs = factors(40)
    g = torch.randn(40, 40, dtype=torch.float64)
    assert T.invconv_weight_config(40).block_m < 40
    assert_close(T.invconv_weight(*fs), R.invconv_weight(*fs), reduce_len=40)
    for got, want in zip(T.invconv_weight_bwd(g, *fs), R.invconv_weight_vjp(g, *fs)):
        assert_close(got, want, reduce_len=40)


def test_weight_with_an_out_of_range_perm_gives_nan_rows_not_a_bad_read():
    perm, lower, upper, sign, log_s = factors(5)
    perm[2] = 9
    w = T.invconv_weight(perm, lower, upper, sign, log_s)
    assert torch.isnan(w[2]).all()
    rows = [0, 1, 3, 4]
    assert_close(w[rows], R.invconv_weight(perm.clamp(max=4), lower, upper, sign, log_s)[rows], reduce_len=5)
    _, grad_upper, grad_log_s = T.invconv_weight_bwd(torch.ones(5, 5, dtype=lower.dtype), perm, lower, upper,
                                                     sign, log_s)
    assert torch.isnan(grad_log_s).all()
    assert torch.isnan(grad_upper[tuple(torch.triu_indices(5, 5, 1))]).all()


@pytest.mark.parametrize("folded", [False, True])
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("shape", SHAPES)
def test_product_and_its_backward_match_the_reference_in_every_layout(shape, dtype, folded):
    x, w, b, ls = operands(shape, dtype, folded)
    g = torch.randn(shape, dtype=dtype)
    exact = R.conv1x1(*as_double(x, w, b, ls))
    exact_grads = R.conv1x1_vjp(*as_double(g, x, w, b, ls))
    positions = x.numel() // shape[1]
    cpp = F.cpp_ops()
    for name, xl in layouts(x).items():
        y = T.conv1x1(xl, w, b, ls)
        assert y.dtype == dtype
        assert y.stride() == F.product_like(xl).stride() == cpp.conv1x1(xl, w, b, ls).stride(), name
        assert_close(y, exact, reduce_len=shape[1])
        for gl in (g, layouts(g)["sliced"]):
            grads = T.conv1x1_bwd(gl, xl, w, b, ls, [True, True, True])
            assert grads[0].stride() == y.stride(), name
            assert_close(grads[0], exact_grads[0], reduce_len=shape[1])
            for got, want in zip(grads[1:], exact_grads[1:]):
                if want is None:
                    assert got is None
                else:
                    assert got.dtype == dtype and got.is_contiguous()
                    assert_close(got, want, reduce_len=positions * shape[1])


@pytest.mark.parametrize("folded", [False, True])
@pytest.mark.parametrize("shape", [(2, 70, 20), (40, 12), (5, 12, 3), (2, 20, 9, 9)])
def test_product_in_the_gpu_configurations(gpu_tiles, shape, folded):
    """Several channel tiles, position tiles that hold several samples or part of one, several
    chunks of the partial sums, and masked lanes everywhere."""
    x, w, b, ls = operands(shape, folded=folded)
    g = torch.randn(shape, dtype=x.dtype)
    positions = x.numel() // shape[1]
    assert_close(T.conv1x1(x, w, b, ls), R.conv1x1(x, w, b, ls), reduce_len=shape[1])
    for got, want in zip(T.conv1x1_bwd(g, x, w, b, ls, [True, True, True]), R.conv1x1_vjp(g, x, w, b, ls)):
        if want is not None:
            assert_close(got, want, reduce_len=positions * shape[1])


def hostile(case):
    """Operands with one non-finite entry, C = 5 (so every tile has masked lanes)."""
    x, w, b, ls = operands((3, 5, 2, 3))
    g = torch.randn(x.shape, dtype=x.dtype)
    if case == "nan x":
        x[1, 2, 0, 1] = float("nan")
    elif case == "inf x":
        x[0, 4, 1, 2] = float("inf")
    elif case == "nan grad":
        g[2, 3, 1, 0] = float("nan")
    elif case == "inf bias":
        b[1] = float("inf")
    return g, x, w, b, ls


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("case", ["nan x", "inf x", "nan grad", "inf bias"])
def test_non_finite_entries_reach_exactly_the_entries_they_reach_in_the_cpp_op(case):
    """The pattern of NaN and Inf is the C++ op's (the same formulas: an infinite ``x`` gives NaN in
    ``dlog_scale = colsum(W' * dW')`` where the reference's order of sums gives Inf); the finite
    entries match the reference."""
    g, x, w, b, ls = hostile(case)
    cpp = F.cpp_ops()
    non_finite = 0
    for folded in (False, True):
        args = (x, w, b, ls) if folded else (x, w, None, None)
        triples = [(T.conv1x1(*args), cpp.conv1x1(*args), R.conv1x1(*args))]
        triples += zip(T.conv1x1_bwd(g, *args, [True, True, True]), cpp.conv1x1_bwd(g, *args, [True, True, True]),
                       R.conv1x1_vjp(g, *args))
        for got, cpp_result, want in triples:
            if want is None:
                continue
            assert torch.equal(torch.isnan(got), torch.isnan(cpp_result)), (case, folded)
            assert torch.equal(torch.isinf(got), torch.isinf(cpp_result)), (case, folded)
            finite = torch.isfinite(want)
            assert_close(got[finite], want[finite], reduce_len=x.numel())
            non_finite += int((~torch.isfinite(got)).sum())
    assert non_finite > 0


def test_nan_in_a_factor_reaches_the_weight_as_in_the_reference():
    perm, lower, upper, sign, log_s = factors(6)
    lower[3, 1] = float("nan")
    w = T.invconv_weight(perm, lower, upper, sign, log_s)
    assert torch.equal(torch.isnan(w), torch.isnan(R.invconv_weight(perm, lower, upper, sign, log_s)))
    assert torch.isnan(w).any() and not torch.isnan(w).all()


def test_two_runs_are_bit_identical(gpu_tiles):
    x, w, b, ls = operands((2, 20, 40), torch.float32)
    g = torch.randn(x.shape)
    fs = factors(40, torch.float32)
    grad_w = torch.randn(40, 40)
    # Several chunks of position tiles, several weight tiles.
    assert T.conv1x1_bwd_configs(20, 2, 40).outer.block_k < 40 and T.invconv_weight_config(40).block_m < 40
    runs = [(T.conv1x1(x, w, b, ls), *T.conv1x1_bwd(g, x, w, b, ls, [True, True, True]),
             T.invconv_weight(*fs), *T.invconv_weight_bwd(grad_w, *fs)) for _ in range(2)]
    for first, second in zip(*runs):
        assert torch.equal(first, second)


def test_every_configuration_comes_from_the_explicit_gpu_set(gpu_tiles):
    sets = T.gpu_configs()
    for c, batch, spatial in itertools.product([1, 5, 16, 17, 64, 300], [1, 7], [1, 3, 4096]):
        assert T.invconv_weight_config(c) in sets["_invconv_weight_kernel"]
        assert T.invconv_weight_bwd_config(c) in sets["_invconv_weight_bwd_kernel"]
        assert T.conv1x1_config(c, batch, spatial) in sets["_conv1x1_kernel"]
        grad_x, outer, finish = T.conv1x1_bwd_configs(c, batch, spatial)
        assert grad_x in sets["_conv1x1_kernel"]
        assert outer in sets["_conv1x1_outer_kernel"] and finish in sets["_conv1x1_finish_kernel"]
    square = [cfg for name in ("_invconv_weight_kernel", "_invconv_weight_bwd_kernel") for cfg in sets[name]]
    assert all(cfg.block_m == cfg.block_n for cfg in square)
