"""RQSplineCoupling: identity start, round trip, log-det against the dense Jacobian, context,
memory-free gradients in a mixed chain, low precision, compile, state dict, errors."""

import pytest
import torch

import invkernels
from invkernels.nn import (
    ActNorm,
    AffineCoupling,
    InvConv1x1,
    InvertibleSequential,
    Permute,
    RQSplineCoupling,
    conv_subnet,
    mlp_subnet,
)
from invkernels.reference.spline import identity_derivative_offset
from tolerances import TOL, assert_close

BACKENDS = ["cpp", pytest.param("triton", marks=pytest.mark.triton), "reference"]


def randomize(module, scale=0.2):
    """Random parameters (the zero-initialized last subnet layers included), ActNorms marked
    initialized, so that no layer is the identity."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(scale * torch.randn_like(p))
    for m in module.modules():
        if isinstance(m, ActNorm):
            m.mark_initialized()
    return module


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.float64, 1e-12)])
@pytest.mark.parametrize("kind,shape,bins", [("mlp", (6, 5), 5), ("conv", (2, 4, 3, 3), 8), ("mlp", (3, 2), 1)])
def test_starts_as_the_identity(dtype, tol, kind, shape, bins):
    layer = RQSplineCoupling(shape[1], kind, hidden=8, bins=bins).to(dtype)
    x = 2.5 * torch.randn(shape, dtype=dtype)  # inside and beyond the tail bound 3
    y, logdet = layer(x)
    assert (y - x).abs().max().item() <= tol
    assert logdet.abs().max().item() <= tol
    assert (layer.inverse(x) - x).abs().max().item() <= tol
    assert logdet.dtype == dtype and logdet.shape == (shape[0],)


def test_the_identity_offset_is_added_to_the_derivative_channels_only():
    bins, c2 = 3, 2
    layer = RQSplineCoupling(4, lambda cin, cout: torch.nn.Linear(cin, cout), bins=bins).double()
    torch.nn.init.zeros_(layer.subnet.weight)
    torch.nn.init.zeros_(layer.subnet.bias)
    h = layer._h(torch.randn(2, 4, dtype=torch.float64), None).unflatten(1, (c2, 3 * bins - 1))
    assert torch.equal(h[:, :, : 2 * bins], torch.zeros(2, c2, 2 * bins, dtype=torch.float64))
    offset = identity_derivative_offset(1e-3)
    assert torch.equal(h[:, :, 2 * bins:], torch.full((2, c2, bins - 1), offset, dtype=torch.float64))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind,shape", [("mlp", (5, 7)), ("conv", (3, 5, 4, 4)), ("conv", (1, 2, 3, 3))])
def test_round_trip_and_backends_agree(backend, kind, shape):
    layer = randomize(RQSplineCoupling(shape[1], kind, hidden=16, bins=4, tail_bound=2.0)).double()
    x = 1.5 * torch.randn(shape, dtype=torch.float64)
    with invkernels.use_backend(backend):
        y, logdet = layer(x)
        x_back, logdet_inv = layer.inverse(y, return_logdet=True)
    with invkernels.use_backend("reference"):
        y_ref, logdet_ref = layer(x)
    assert_close(y, y_ref)
    assert_close(logdet, logdet_ref, reduce_len=x[0].numel())
    assert_close(x_back, x)
    assert_close(logdet_inv, -logdet_ref, reduce_len=x[0].numel())
    c1 = shape[1] // 2
    assert torch.equal(y[:, :c1], x[:, :c1])
    assert (y - x).abs().max() > 1e-3
    assert logdet.shape == (shape[0],)


@pytest.mark.parametrize("kind,shape", [("mlp", (2, 5)), ("conv", (2, 3, 2, 2))])
def test_logdet_is_slogdet_of_the_dense_jacobian(kind, shape):
    layer = randomize(RQSplineCoupling(shape[1], kind, hidden=8, bins=4, tail_bound=2.0), 0.4).double()
    x = 1.5 * torch.randn(shape, dtype=torch.float64)
    _, logdet = layer(x)
    assert logdet.abs().min() > 1e-2
    for b in range(shape[0]):
        jac = torch.autograd.functional.jacobian(lambda v: layer(v.reshape(1, *shape[1:]))[0].reshape(-1),
                                                 x[b].reshape(-1))
        sign, expected = torch.linalg.slogdet(jac)
        assert sign.item() == 1.0
        assert_close(logdet[b], expected)


@pytest.mark.parametrize("backend", ["cpp", "reference"])
def test_context_conditions_the_subnet(backend):
    seen = {}

    def factory(cin, cout):
        net = torch.nn.Conv2d(cin, cout, 1)
        net.register_forward_hook(lambda m, inp, out: seen.update(cin=inp[0].shape[1]))
        return net

    layer = RQSplineCoupling(4, factory, bins=3, context_channels=3, backend=backend).double()
    x, ctx = torch.randn(2, 4, 3, 3, dtype=torch.float64), torch.randn(2, 3, 3, 3, dtype=torch.float64)
    y, logdet = layer(x, context=ctx)
    assert seen["cin"] == 2 + 3
    x_back, logdet_inv = layer.inverse(y, context=ctx, return_logdet=True)
    assert_close(x_back, x)
    assert_close(logdet_inv, -logdet, reduce_len=x[0].numel())
    y_other, _ = layer(x, context=ctx + 1)
    assert (y_other - y).abs().max() > 1e-3


def test_gradients_reach_subnet_input_and_context():
    layer = randomize(RQSplineCoupling(6, "mlp", hidden=8, context_channels=2))
    x = torch.randn(4, 6, requires_grad=True)
    ctx = torch.randn(4, 2, requires_grad=True)
    y, logdet = layer(x, context=ctx)
    (y.square().sum() + logdet.sum()).backward()
    assert x.grad.abs().sum() > 0 and ctx.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in layer.subnet.parameters())


def mixed_chain(dtype, context_channels=0):
    """ActNorm, LU 1x1, spline couplings (tabular, 5 features), a permutation and an affine coupling."""
    blocks = [ActNorm(5), InvConv1x1(5), RQSplineCoupling(5, hidden=8, bins=4, context_channels=context_channels),
              Permute(5, "random"), AffineCoupling(5, hidden=8, context_channels=context_channels),
              RQSplineCoupling(5, hidden=8, bins=3, tail_bound=2.0, context_channels=context_channels),
              Permute(5, "reverse"), RQSplineCoupling(5, hidden=8, bins=2, context_channels=context_channels)]
    return randomize(InvertibleSequential(*blocks).to(dtype))


def chain_gradients(model, x, ctx, g, gl, memory_free):
    model.memory_free = memory_free
    inputs = [x.clone().requires_grad_()] + ([ctx.clone().requires_grad_()] if ctx is not None else [])
    y, logdet = model(inputs[0], context=inputs[1] if ctx is not None else None)
    grads = torch.autograd.grad((y * g).sum() + (logdet * gl).sum(), [*inputs, *model.parameters()])
    return (y.detach(), logdet.detach()), grads


@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
@pytest.mark.parametrize("context_channels", [0, 2])
def test_memory_free_gradients_equal_plain_autograd(dtype, rtol, context_channels, monkeypatch):
    torch.manual_seed(5)
    model = mixed_chain(dtype, context_channels)
    x = 1.5 * torch.randn(6, 5, dtype=dtype)
    ctx = torch.randn(6, context_channels, dtype=dtype) if context_channels else None
    g, gl = torch.randn_like(x), torch.randn(6, dtype=dtype)
    fused_calls = []
    fused = RQSplineCoupling.inverse_backward
    monkeypatch.setattr(RQSplineCoupling, "inverse_backward",
                        lambda self, *args, **kwargs: fused_calls.append(self) or fused(self, *args, **kwargs))
    out_free, free = chain_gradients(model, x, ctx, g, gl, True)
    assert len(fused_calls) == 3  # every spline coupling ran its fused memory-free backward
    out_plain, plain = chain_gradients(model, x, ctx, g, gl, False)
    torch.testing.assert_close(out_free, out_plain, rtol=rtol, atol=0)
    assert len(free) == len(plain) == 1 + (context_channels > 0) + len(list(model.parameters()))
    for got, want in zip(free, plain):
        assert want.norm() > 0
        err = ((got - want).norm() / want.norm()).item()
        assert err <= rtol, err


def test_inverse_backward_rebuilds_the_input_and_matches_autograd():
    layer = randomize(RQSplineCoupling(5, "conv", hidden=8, bins=4, tail_bound=2.0)).double()
    x = torch.randn(2, 5, 3, 3, dtype=torch.float64, requires_grad=True)
    y, logdet = layer(x)
    g, gl = torch.randn_like(y), torch.randn_like(logdet)
    want = torch.autograd.grad((y * g).sum() + (logdet * gl).sum(), [x, *layer.parameters()])
    x_back, grad_x, pairs = layer.inverse_backward(y.detach(), g, gl)
    assert_close(x_back, x.detach())
    assert_close(grad_x, want[0])
    assert [t for t, _ in pairs] == list(layer.parameters())
    for (_, got), expected in zip(pairs, want[1:]):
        assert_close(got, expected)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_give_float32_logdets(dtype):
    layer = randomize(RQSplineCoupling(4, "mlp", hidden=8, bins=3))
    reference = RQSplineCoupling(4, "mlp", hidden=8, bins=3).double()
    reference.load_state_dict(layer.state_dict())
    layer = layer.to(dtype)
    x = torch.randn(3, 4).to(dtype)
    y, logdet = layer(x)
    assert y.dtype == dtype and logdet.dtype == torch.float32
    x_back, logdet_inv = layer.inverse(y, return_logdet=True)
    assert x_back.dtype == dtype and logdet_inv.dtype == torch.float32
    y_ref, logdet_ref = reference(x.double())
    assert logdet_ref.abs().max() > 0.1
    assert_close(y, y_ref)
    # The log-det sums the 2 transformed features, each at the input dtype's tolerance.
    torch.testing.assert_close(logdet.double(), logdet_ref, atol=2 * TOL[dtype]["atol"], rtol=TOL[dtype]["rtol"])


def test_torch_compile_fullgraph_of_a_chain_is_one_graph():
    from torch._dynamo.utils import counters  # noqa: PLC0415

    torch.manual_seed(7)
    model = randomize(InvertibleSequential(
        RQSplineCoupling(4, hidden=8, bins=3, backend="cpp"), Permute(4),
        RQSplineCoupling(4, hidden=8, bins=5, tail_bound=2.0, backend="cpp"), memory_free=False)).double()
    x = torch.randn(5, 4, dtype=torch.float64)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x_eager, x_comp = x.clone().requires_grad_(), x.clone().requires_grad_()
    yc, logdetc = compiled(x_comp)
    assert sum(counters["graph_break"].values()) == 0
    assert counters["stats"]["unique_graphs"] == 1
    y, logdet = model(x_eager)
    assert_close(yc, y)
    assert_close(logdetc, logdet, reduce_len=4)
    params = list(model.parameters())
    got = torch.autograd.grad(yc.square().sum() + logdetc.sum(), [x_comp, *params])
    want = torch.autograd.grad(y.square().sum() + logdet.sum(), [x_eager, *params])
    for a, b in zip(got, want):
        assert_close(a, b)


def test_state_dict_round_trip():
    layer = randomize(RQSplineCoupling(5, "mlp", hidden=8, bins=4, context_channels=1))
    copy = RQSplineCoupling(5, "mlp", hidden=8, bins=4, context_channels=1)
    state = layer.state_dict()
    assert all(k.startswith("subnet.") for k in state)
    copy.load_state_dict(state)
    x, ctx = torch.randn(3, 5), torch.randn(3, 1)
    y, logdet = layer(x, context=ctx)
    y_copy, logdet_copy = copy(x, context=ctx)
    assert torch.equal(y, y_copy) and torch.equal(logdet, logdet_copy)


def test_extra_repr():
    text = repr(RQSplineCoupling(5, hidden=8, bins=4, tail_bound=2.5, min_derivative=1e-2, context_channels=2))
    assert "channels=5, split=(2, 3), context_channels=2, bins=4, tail_bound=2.5, min_derivative=0.01" in text
    assert "min_bin_width" not in text


def _escaped(message):
    return message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[").replace("]", r"\]")


@pytest.mark.parametrize("args,kwargs,message", [
    ((1,), {}, "channels should be an integer >= 2, got 1"),
    ((4, "resnet"), {}, "subnet should be 'mlp', 'conv' or a factory"),
    ((4,), {"bins": 0}, "bins should be a positive integer, got 0"),
    ((4,), {"bins": 2.0}, "bins should be a positive integer, got 2.0"),
    ((4,), {"tail_bound": 0.0}, "tail_bound should be positive and finite"),
    ((4,), {"tail_bound": float("inf")}, "tail_bound should be positive and finite"),
    ((4,), {"min_bin_width": 0.2, "bins": 8}, "min_bin_width should be a number in [1e-06, 1 / bins = 0.125), got 0.2"),
    ((4,), {"min_bin_height": 0.0}, "min_bin_height should be a number in [1e-06"),
    ((4,), {"min_derivative": 1.0}, "min_derivative should be a number in [1e-06, 1), got 1"),
    ((4,), {"min_derivative": True}, "min_derivative should be a number in [1e-06, 1), got True"),
    ((4,), {"context_channels": -1}, "context_channels should be an integer >= 0, got -1"),
    ((4,), {"backend": "cuda"}, "backend should be one of"),
    ((4, mlp_subnet(8)), {"hidden": 8}, "hidden applies to subnet='mlp' or 'conv' only"),
])
def test_bad_constructor_arguments(args, kwargs, message):
    with pytest.raises(ValueError, match=_escaped(message)):
        RQSplineCoupling(*args, **kwargs)


def test_bad_call_arguments():
    layer = RQSplineCoupling(4, hidden=8)
    with pytest.raises(ValueError, match=_escaped("RQSplineCoupling: x should have shape [B, 4, ...], got [2, 5]")):
        layer(torch.randn(2, 5))
    with pytest.raises(ValueError, match=_escaped("RQSplineCoupling: y should have shape [B, 4, ...], got [2, 3]")):
        layer.inverse(torch.randn(2, 3))
    with pytest.raises(ValueError, match="RQSplineCoupling: x should be a floating-point tensor"):
        layer(torch.ones(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="subnet='mlp' expects 2-D inputs"):
        layer(torch.randn(2, 4, 3, 3))
    with pytest.raises(ValueError, match="RQSplineCoupling: context was given"):
        layer(torch.randn(2, 4), context=torch.randn(2, 1))
    ctx_layer = RQSplineCoupling(4, conv_subnet(8), context_channels=2)
    with pytest.raises(ValueError, match="RQSplineCoupling: context is required"):
        ctx_layer(torch.randn(2, 4, 3, 3))
    with pytest.raises(ValueError, match=_escaped("context should have shape [2, 2, 3, 3]")):
        ctx_layer(torch.randn(2, 4, 3, 3), context=torch.randn(2, 2, 3, 4))
    with pytest.raises(ValueError, match="RQSplineCoupling: the input has dtype torch.float64"):
        layer(torch.randn(2, 4, dtype=torch.float64))


def test_a_subnet_of_the_wrong_width_is_named():
    layer = RQSplineCoupling(4, lambda cin, cout: torch.nn.Linear(cin, cout + 1), bins=3)
    with pytest.raises(ValueError, match=_escaped("RQSplineCoupling: the subnet output should have shape [2, 16], "
                                                  "got [2, 17]")):
        layer(torch.randn(2, 4))
