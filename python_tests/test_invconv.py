"""LU-decomposed invertible 1x1 convolution: the weight ops against the float64 reference, the
float64-built inverse, and the InvConv1x1 module."""

import pytest
import torch

from invkernels._validation import logdet_dtype
from invkernels.nn.invconv import InvConv1x1
from invkernels.ops import invconv as F
from invkernels.reference import invconv as R
from tolerances import assert_close

BACKENDS = ["cpp", "triton", "reference"]


def factors(c, dtype=torch.float64, device="cpu"):
    """Random factors; lower and upper are full matrices, of which the op reads one triangle each."""
    perm = torch.randperm(c)
    lower = 0.5 * torch.randn(c, c, dtype=torch.float64)
    upper = 0.5 * torch.randn(c, c, dtype=torch.float64)
    sign = torch.where(torch.rand(c) < 0.5, -1.0, 1.0).double()
    log_s = 0.3 * torch.randn(c, dtype=torch.float64)
    return perm.to(device), *(t.to(dtype=dtype, device=device) for t in (lower, upper, sign, log_s))


def with_grad(fs):
    perm, lower, upper, sign, log_s = fs
    return perm, lower.clone().requires_grad_(), upper.clone().requires_grad_(), sign, log_s.clone().requires_grad_()


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def perturbed(c, lu=True):
    """A module whose scales are s₀·exp(U(−0.5, 0.5)) around the random rotation, as in the issue."""
    layer = InvConv1x1(c, lu=lu)
    if lu:
        with torch.no_grad():
            layer.log_s.add_(torch.rand(c) - 0.5)
    return layer


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("c", [1, 5, 16, 40])  # the C++ backend assembles C <= 32 by loops, larger by BLAS
def test_weight_matches_reference(backend, dtype, c):
    fs = factors(c, dtype)
    w = F.invconv_weight(*fs, backend=backend)
    assert w.dtype == dtype and w.shape == (c, c)
    assert_close(w, R.invconv_weight(*(t.double() if t.is_floating_point() else t for t in fs)), reduce_len=c)
    g = torch.randn(c, c, dtype=dtype)
    inputs = with_grad(fs)
    grads = torch.autograd.grad(F.invconv_weight(*inputs, backend=backend), [inputs[i] for i in (1, 2, 4)], g)
    inputs64 = with_grad([t.detach().double() if t.is_floating_point() else t for t in fs])
    expected = torch.autograd.grad(R.invconv_weight(*inputs64), [inputs64[i] for i in (1, 2, 4)], g.double())
    for got, want in zip(grads, expected):
        assert_close(got, want, reduce_len=c)


@pytest.mark.parametrize("c", [5, 40])
@pytest.mark.parametrize("bad", ["-1", "c", "twice"])
def test_cpp_weight_ops_refuse_a_perm_that_is_not_a_permutation(c, bad):
    """The C++ ops index by perm (by loops for small C): an entry outside [0, C) or an entry twice
    is a ValueError naming perm, for the weight and its VJP alike, whichever path assembles it."""
    perm, *rest = factors(c)
    perm[1] = {"-1": -1, "c": c, "twice": perm[0].item()}[bad]
    ops = F.cpp_ops()
    with pytest.raises(ValueError, match=r"invconv_weight: perm should be a permutation of \[0, "):
        ops.weight(perm, *rest)
    with pytest.raises(ValueError, match=r"invconv_weight_bwd: perm should be a permutation of \[0, "):
        ops.weight_bwd(torch.randn(c, c, dtype=torch.float64), perm, *rest)


def test_weight_bwd_op_matches_reference_vjp():
    fs = factors(6)
    g = torch.randn(6, 6, dtype=torch.float64)
    for got, want in zip(F.cpp_ops().weight_bwd(g, *fs), R.invconv_weight_vjp(g, *fs)):
        assert_close(got, want)


def test_inverse_weight_gradcheck_and_value():
    inputs = with_grad(factors(4))
    assert torch.autograd.gradcheck(F.invconv_inverse_weight, inputs)
    w = R.invconv_weight(*(t.detach() for t in inputs))
    assert_close(F.invconv_inverse_weight(*inputs), torch.linalg.inv(w))


def test_random_rotation_and_lu_factors():
    q = R.random_rotation(7, generator=torch.Generator().manual_seed(3))
    assert q.dtype == torch.float64
    assert_close(q.T @ q, torch.eye(7, dtype=torch.float64))
    assert torch.equal(q, R.random_rotation(7, generator=torch.Generator().manual_seed(3)))
    perm, lower, upper, sign, log_s = R.lu_factors(q)
    assert sorted(perm.tolist()) == list(range(7)) and set(sign.tolist()) <= {-1.0, 1.0}
    assert_close(R.invconv_weight(perm, lower, upper, sign, log_s), q)
    assert_close(log_s.sum(), torch.linalg.slogdet(q).logabsdet, atol=1e-12)


@pytest.mark.parametrize("lu", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(6, 5), (3, 5, 4, 3), (2, 5, 7), (1, 5, 2, 3, 2)])
def test_round_trip(lu, dtype, shape):
    layer = perturbed(shape[1], lu).to(dtype)
    x = torch.randn(shape, dtype=dtype)
    y, logdet = layer(x)
    assert y.shape == x.shape and y.dtype == dtype and logdet.shape == (shape[0],) and logdet.dtype == dtype
    assert_close(y, R.conv1x1(x.double(), layer.weight().detach().double()), reduce_len=shape[1])
    for grad_mode in (False, True):
        with torch.set_grad_enabled(grad_mode):
            x_back, logdet_inv = layer.inverse(y.detach(), return_logdet=True)
        assert_close(x_back, x, atol=20 * shape[1] * torch.finfo(dtype).eps)
        assert_close(logdet_inv, -logdet.detach())
        assert x_back.requires_grad == grad_mode


@pytest.mark.parametrize("lu", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_inputs_in_another_dtype_than_the_parameters(lu, dtype):
    layer = perturbed(5, lu)
    x = torch.randn(3, 5, 4, 4).to(dtype)
    y, logdet = layer(x)
    assert y.dtype == dtype and logdet.dtype == logdet_dtype(dtype)
    w64 = layer.weight(torch.float64).detach()
    assert_close(y, R.conv1x1(x.double(), w64), reduce_len=5)
    assert_close(logdet, R.conv1x1_logdet(w64, x), reduce_len=16)
    with torch.no_grad():
        x_back = layer.inverse(y)
    assert x_back.dtype == dtype
    assert_close(x_back, R.conv1x1(y.double(), torch.linalg.inv(w64)), reduce_len=5)


@pytest.mark.parametrize("lu", [True, False])
def test_logdet_is_slogdet_of_dense_jacobian(lu):
    layer = perturbed(3, lu).double()
    with torch.no_grad():
        if lu:
            layer.log_s.add_(torch.tensor([0.2, 0.3, -0.1], dtype=torch.float64))
        else:
            layer.w.mul_(torch.tensor([[2.0], [0.5], [1.5]], dtype=torch.float64))
    x = torch.randn(2, 3, 2, 2, dtype=torch.float64)
    _, logdet = layer(x)
    jac = torch.autograd.functional.jacobian(lambda v: layer(v.reshape(1, 3, 2, 2))[0].reshape(-1), x[0].reshape(-1))
    expected = torch.linalg.slogdet(jac).logabsdet
    assert_close(logdet, expected.expand(2))
    assert abs(expected.item()) > 0.1


def test_dense_logdet_is_spatial_times_slogdet():
    layer = InvConv1x1(4, lu=False)
    with torch.no_grad():
        layer.w.add_(0.3 * torch.randn(4, 4))
    x = torch.randn(3, 4, 5, 2)
    _, logdet = layer(x)
    assert_close(logdet, (10 * torch.linalg.slogdet(layer.w.detach().double()).logabsdet).expand(3), reduce_len=10)
    _, logdet_vec = layer(torch.randn(3, 4))
    assert_close(logdet_vec, torch.linalg.slogdet(layer.w.detach().double()).logabsdet.expand(3))


def test_lu_logdet_is_spatial_times_sum_log_s():
    layer = perturbed(4)
    _, logdet = layer(torch.randn(2, 4, 3, 3))
    assert_close(logdet, (9 * layer.log_s.detach().double().sum()).expand(2), reduce_len=9)
    (g,) = torch.autograd.grad(logdet.sum(), layer.log_s)
    assert_close(g, torch.full((4,), 18.0, dtype=torch.float64))


@pytest.mark.parametrize("lu", [True, False])
@pytest.mark.parametrize("requires_grad", [False, True])
def test_hostile_layouts_match_contiguous(lu, requires_grad):
    layer = perturbed(6, lu)
    base = torch.randn(4, 6, 6, 8)
    for x in (base[::2, :, ::2, 1::2], base.contiguous(memory_format=torch.channels_last), base.transpose(2, 3),
              base[:, :, :1, :1], base[:1]):
        xr = x.clone().requires_grad_(requires_grad) if requires_grad else x
        xc = x.contiguous().requires_grad_(requires_grad)
        y, logdet = layer(xr)
        y_c, logdet_c = layer(xc)
        assert_close(y, y_c.detach().double(), reduce_len=6)
        assert torch.equal(logdet, logdet_c)
        with torch.no_grad():
            assert_close(layer.inverse(y.detach()), layer.inverse(y_c.detach()).double(), reduce_len=6)
        if requires_grad:
            g = torch.randn(x.shape)
            (gx,) = torch.autograd.grad(y, xr, g)
            (gx_c,) = torch.autograd.grad(y_c, xc, g)
            assert_close(gx, gx_c.double(), reduce_len=6)


def test_empty_and_zero_size_inputs():
    layer = perturbed(3)
    for shape in ((0, 3, 4, 4), (2, 3, 0, 5), (0, 3)):
        x = torch.randn(shape)
        y, logdet = layer(x)
        assert y.shape == x.shape and logdet.shape == (shape[0],)
        with torch.no_grad():
            assert layer.inverse(y).shape == x.shape


@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("shape", [(5, 4), (2, 4, 3, 5), (2, 4, 7), (1, 4, 2, 2, 3)])
def test_conv1x1_routes_match_reference(shape, requires_grad):
    w = torch.randn(4, 4, requires_grad=requires_grad)
    x = torch.randn(shape)
    expected = R.conv1x1(x.double(), w.detach().double())
    assert_close(F.conv1x1(x, w), expected, reduce_len=4)
    if len(shape) == 4:
        assert_close(F.conv1x1(x.contiguous(memory_format=torch.channels_last), w), expected, reduce_len=4)


def _counting(monkeypatch, name):
    calls = []
    real = getattr(F, name)

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(F, name, counted)
    return calls


@pytest.mark.parametrize("lu", [True, False])
def test_inverse_is_cached_until_parameters_change(monkeypatch, lu):
    calls = _counting(monkeypatch, "invconv_inverse_weight" if lu else "dense_inverse_weight")
    layer = perturbed(4, lu)
    y = torch.randn(2, 4, 3, 3)
    with torch.no_grad():
        first = layer.inverse(y)
        second = layer.inverse(y)
        assert torch.equal(layer.inverse_weight(), layer.inverse_weight())
    assert len(calls) == 1 and torch.equal(first, second)

    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    z, logdet = layer(torch.randn(2, 4, 3, 3))
    (z.square().sum() - logdet.sum()).backward()
    optimizer.step()
    with torch.no_grad():
        after = layer.inverse(y)
    assert len(calls) == 2
    w = layer.weight().detach().double()
    assert_close(after, R.conv1x1(y.double(), torch.linalg.inv(w)), reduce_len=4)

    with torch.no_grad():
        layer.inverse(y.double())
        layer.inverse(y.double())
    assert len(calls) == 3

    layer.load_state_dict(perturbed(4, lu).state_dict())
    with torch.no_grad():
        reloaded = layer.inverse(y)
    assert len(calls) == 4
    assert_close(reloaded, R.conv1x1(y.double(), torch.linalg.inv(layer.weight().detach().double())), reduce_len=4)

    name = "log_s" if lu else "w"
    getattr(layer, name).data.mul_(1.1)
    layer.clear_inverse_cache()
    with torch.no_grad():
        layer.inverse(y)
    assert len(calls) == 5


def test_inverse_is_rebuilt_and_differentiable_when_parameters_require_grad(monkeypatch):
    calls = _counting(monkeypatch, "invconv_inverse_weight")
    layer = perturbed(4).double()
    y = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    params = [layer.lower, layer.upper, layer.log_s]
    g = torch.randn_like(y)
    grads = torch.autograd.grad(layer.inverse(y), params, g)
    layer.inverse(y)
    assert len(calls) == 2
    factors64 = [t.detach().clone().requires_grad_() for t in params]
    w = R.invconv_weight(layer.perm, factors64[0], factors64[1], layer.sign, factors64[2])
    expected = torch.autograd.grad(R.conv1x1(y, torch.linalg.inv(w)), factors64, g)
    for got, want in zip(grads, expected):
        assert_close(got, want, atol=1e-9)

    layer.requires_grad_(False)
    yr = y.clone().requires_grad_()
    layer.inverse(yr)
    with torch.inference_mode():
        layer.inverse(y)
    (gy,) = torch.autograd.grad(layer.inverse(yr), yr, g)
    assert len(calls) == 3
    assert_close(gy, R.conv1x1(g, torch.linalg.inv(layer.weight()).T))


@pytest.mark.parametrize("backend", BACKENDS)
def test_module_backends_agree(backend):
    torch.manual_seed(5)
    layer = perturbed(5)
    layer.backend = backend
    x = torch.randn(3, 5, 2, 2)
    y, logdet = layer(x)
    torch.manual_seed(5)
    expected = perturbed(5)
    assert_close(y, expected(x)[0].double(), reduce_len=5)
    assert_close(layer.weight(), expected.weight().double(), reduce_len=5)
    assert_close(layer.inverse(y.detach()), x, atol=1e-5)


def test_cond_diagnostic():
    layer = InvConv1x1(6)
    assert layer.cond().dtype == torch.float64
    assert_close(layer.cond(), torch.tensor(1.0, dtype=torch.float64), atol=1e-5)
    dense = InvConv1x1(2, lu=False)
    with torch.no_grad():
        dense.w.copy_(torch.tensor([[4.0, 0.0], [0.0, 0.5]]))
    assert_close(dense.cond(), torch.tensor(8.0, dtype=torch.float64))


BAD_FACTORS = [
    ("lower should be a square matrix, got shape \\[3, 4\\]",
     lambda fs: (fs[0], fs[1][:3, :4], fs[2], fs[3], fs[4])),
    ("perm should be an int64 vector of length 5, got",
     lambda fs: (fs[0].int(), *fs[1:])),
    ("log_s should have shape \\[5\\], got \\[4\\]", lambda fs: (*fs[:4], fs[4][:4])),
    ("upper should have the dtype of lower",
     lambda fs: (fs[0], fs[1], fs[2].float(), fs[3], fs[4])),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("message,mutate", BAD_FACTORS, ids=[m[:20] for m, _ in BAD_FACTORS])
def test_bad_factors(backend, message, mutate):
    fs = mutate(factors(5))
    with pytest.raises(ValueError, match=message):
        F.invconv_weight(*fs, backend=backend)
    with pytest.raises(ValueError, match=message):
        F.invconv_inverse_weight(*fs)


def test_bad_module_arguments_and_inputs():
    for channels in (0, -2, 2.0, True):
        with pytest.raises(ValueError, match=f"channels should be a positive integer, got {channels!r}"):
            InvConv1x1(channels)
    with pytest.raises(ValueError, match="backend should be one of"):
        InvConv1x1(3, backend="cuda")
    with pytest.raises(ValueError, match="lu should be True or False, got 1"):
        InvConv1x1(3, lu=1)
    layer = InvConv1x1(4)
    with pytest.raises(ValueError, match=r"x should have shape \[B, 4, ...\], got \[2, 3, 5, 5\]"):
        layer(torch.randn(2, 3, 5, 5))
    with pytest.raises(ValueError, match=r"y should have shape \[B, 4, ...\], got \[4\]"):
        layer.inverse(torch.randn(4))
    with pytest.raises(ValueError, match="x should be a floating-point tensor, got torch.int64"):
        layer(torch.ones(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="weight should have shape \\[C, C\\] = \\[4, 4\\] for x with C=4"):
        F.conv1x1(torch.randn(2, 4), torch.randn(3, 3))
    with pytest.raises(ValueError, match="x and weight should have the same dtype"):
        F.conv1x1(torch.randn(2, 4), torch.randn(4, 4, dtype=torch.float64))


def test_singular_dense_weight_raises_at_inverse():
    layer = InvConv1x1(2, lu=False)
    with torch.no_grad():
        layer.w.copy_(torch.tensor([[1.0, 2.0], [2.0, 4.0]]))
    y, logdet = layer(torch.randn(3, 2))
    assert torch.isinf(logdet).all()
    with pytest.raises(ValueError, match="weight is singular"):
        with torch.no_grad():
            layer.inverse(y)
    with pytest.raises(ValueError, match="weight is singular"):
        layer.inverse(y)


@pytest.mark.parametrize("lu", [True, False])
def test_forward_compiles_fullgraph(lu):
    torch._dynamo.reset()
    layer = perturbed(3, lu).double()
    compiled = torch.compile(layer, fullgraph=True)
    x = torch.randn(4, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    y, logdet = compiled(x)
    y_ref, logdet_ref = layer(x)
    assert_close(y, y_ref)
    assert_close(logdet, logdet_ref)
    params = list(layer.parameters())
    got = torch.autograd.grad(y.square().sum() + logdet.sum(), [x, *params])
    want = torch.autograd.grad(y_ref.square().sum() + logdet_ref.sum(), [x, *params])
    for a, b in zip(got, want):
        assert_close(a, b)


@pytest.mark.parametrize("c", [64, 512])
def test_float64_built_inverse_halves_float32_round_trip_error(c):
    torch.manual_seed(1234)
    layer = perturbed(c)
    x = torch.randn(16, c, 8, 8)
    with torch.no_grad():
        y, _ = layer(x)
        built = rel_err(layer.inverse(y), x)
        eager = rel_err(F.conv1x1(y, R.eager_inverse_weight(layer.weight())), x)
    cond = layer.cond().item()
    print(f"C={c}: cond(W)={cond:.3g}, float64-built {built:.3g}, torch.inverse {eager:.3g}, ratio {eager / built:.2f}")
    assert 1.0 < cond < 1e5
    assert built <= 0.5 * eager


@pytest.mark.cuda
def test_cuda_weight_op_and_module():
    fs = factors(7, torch.float32, "cuda")
    assert_close(F.invconv_weight(*fs), R.invconv_weight(*(t.double() if t.is_floating_point() else t for t in fs)),
                 reduce_len=7)
    g = torch.randn(7, 7, device="cuda")
    for got, want in zip(F.cpp_ops().weight_bwd(g, *fs),
                         R.invconv_weight_vjp(g.double(), *(t.double() if t.is_floating_point() else t for t in fs))):
        assert_close(got, want, reduce_len=7)
    layer = perturbed(8).cuda()
    x = torch.randn(4, 8, 5, 5, device="cuda")
    y, logdet = layer(x)
    with torch.no_grad():
        assert_close(layer.inverse(y), x, atol=1e-5)
    assert logdet.device == x.device
