"""AffineCoupling / AdditiveCoupling modules: round trip, log-det, context, errors, compile."""

import pytest
import torch

import invkernels
from invkernels.nn import AdditiveCoupling, AffineCoupling, conv_subnet, mlp_subnet
from tolerances import assert_close

BACKENDS = ["cpp", pytest.param("triton", marks=pytest.mark.triton), "reference"]


def randomize(module):
    """Give the zero-initialized last subnet layer random weights so the layer is not the identity."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(0.3 * torch.randn_like(p))
    return module


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls", [AffineCoupling, AdditiveCoupling])
@pytest.mark.parametrize("kind,shape", [("mlp", (5, 7)), ("conv", (3, 5, 4, 4)), ("conv", (1, 2, 3, 3))])
def test_round_trip_and_backends_agree(backend, cls, kind, shape):
    layer = randomize(cls(shape[1], kind, hidden=16)).double()
    x = torch.randn(shape, dtype=torch.float64)
    with invkernels.use_backend(backend):
        y, logdet = layer(x)
        x_back, logdet_inv = layer.inverse(y, return_logdet=True)
    with invkernels.use_backend("reference"):
        y_ref, logdet_ref = layer(x)
    assert_close(y, y_ref)
    assert_close(logdet, logdet_ref, reduce_len=x[0].numel())
    assert_close(x_back, x)
    assert_close(logdet_inv, -logdet_ref, reduce_len=x[0].numel())
    assert (y - x).abs().max() > 1e-3
    assert logdet.shape == (shape[0],)


@pytest.mark.parametrize("scale", ["exp", "sigmoid"])
def test_module_logdet_is_slogdet_of_dense_jacobian(scale):
    layer = randomize(AffineCoupling(5, "conv", hidden=8, scale=scale, clamp=1.5)).double()
    x = torch.randn(2, 5, 2, 2, dtype=torch.float64)
    _, logdet = layer(x)
    for b in range(2):
        jac = torch.autograd.functional.jacobian(lambda v: layer(v.reshape(1, 5, 2, 2))[0].reshape(-1),
                                                 x[b].reshape(-1))
        sign, expected = torch.linalg.slogdet(jac)
        assert sign.item() == 1.0
        assert_close(logdet[b], expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_context_is_concatenated_to_the_subnet_input(backend):
    seen = {}

    def factory(cin, cout):
        net = torch.nn.Conv2d(cin, cout, 1)
        net.register_forward_hook(lambda m, inp, out: seen.update(cin=inp[0].shape[1]))
        return net

    layer = AffineCoupling(4, factory, context_channels=3, backend=backend)
    x, ctx = torch.randn(2, 4, 3, 3), torch.randn(2, 3, 3, 3)
    y, _ = layer(x, context=ctx)
    assert seen["cin"] == 2 + 3
    assert_close(layer.inverse(y, context=ctx), x.double())
    y_other, _ = layer(x, context=ctx + 1)
    assert not torch.equal(y, y_other)


def test_gradients_reach_subnet_and_input():
    layer = randomize(AffineCoupling(6, "mlp", hidden=8))
    x = torch.randn(4, 6, requires_grad=True)
    y, logdet = layer(x)
    (y.square().sum() + logdet.sum()).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in layer.subnet.parameters())


def test_fused_gradients_equal_reference_gradients():
    torch.manual_seed(3)
    layer = randomize(AffineCoupling(5, "conv", hidden=8)).double()
    x = torch.randn(3, 5, 4, 4, dtype=torch.float64)
    grads = {}
    for backend in ("cpp", "reference"):
        layer.zero_grad()
        xr = x.clone().requires_grad_()
        with invkernels.use_backend(backend):
            y, logdet = layer(xr)
        (y.sin().sum() + logdet.square().sum()).backward()
        grads[backend] = [xr.grad] + [p.grad.clone() for p in layer.parameters()]
    for a, b in zip(grads["cpp"], grads["reference"]):
        assert_close(a, b)


def test_default_subnets_start_as_identity():
    x = torch.randn(3, 6)
    y, logdet = AffineCoupling(6)(x)
    assert_close(y, x.double())
    assert_close(logdet, torch.zeros(3, dtype=torch.float64))
    xi = torch.randn(2, 4, 5, 5)
    y, _ = AdditiveCoupling(4, "conv")(xi)
    assert_close(y, xi.double())


@pytest.mark.parametrize("args,kwargs,message", [
    ((1,), {}, "channels should be an integer >= 2, got 1"),
    ((4, "resnet"), {}, "subnet should be 'mlp', 'conv' or a factory"),
    ((4,), {"scale": "tanh"}, "scale should be one of 'exp', 'sigmoid', 'sigmoid_eps', 'atan', 'rational', got 'tanh'"),
    ((4,), {"clamp": 0.0}, "clamp should be a positive finite number, got 0.0"),
    ((4,), {"context_channels": -1}, "context_channels should be an integer >= 0, got -1"),
    ((4,), {"backend": "cuda"}, "backend should be one of"),
    ((4, mlp_subnet(8)), {"hidden": 8}, "hidden applies to subnet='mlp' or 'conv' only"),
])
def test_bad_constructor_arguments(args, kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        AffineCoupling(*args, **kwargs)


def test_bad_forward_arguments():
    layer = AffineCoupling(4)
    with pytest.raises(ValueError, match=r"x should have shape \[B, 4, ...\], got \[2, 5\]"):
        layer(torch.randn(2, 5))
    with pytest.raises(ValueError, match="subnet='mlp' expects 2-D inputs"):
        layer(torch.randn(2, 4, 3, 3))
    with pytest.raises(ValueError, match="context was given"):
        layer(torch.randn(2, 4), context=torch.randn(2, 1))
    ctx_layer = AffineCoupling(4, conv_subnet(8), context_channels=2)
    with pytest.raises(ValueError, match="context is required"):
        ctx_layer(torch.randn(2, 4, 3, 3))
    with pytest.raises(ValueError, match=r"context should have shape \[2, 2, 3, 3\]"):
        ctx_layer(torch.randn(2, 4, 3, 3), context=torch.randn(2, 2, 3, 4))
    with pytest.raises(ValueError, match="backend should be one of"):
        invkernels.set_backend("fast")


@pytest.mark.parametrize("backend", ["cpp", pytest.param("triton", marks=pytest.mark.triton)])
def test_torch_compile_fullgraph_matches_eager(backend):
    torch._dynamo.reset()
    model = torch.nn.ModuleList([randomize(AffineCoupling(5, "conv", hidden=8, backend=backend)),
                                 randomize(AdditiveCoupling(5, "conv", hidden=8, backend=backend))]).double()

    def run(x):
        y, logdet = model[0](x)
        y, logdet2 = model[1](y)
        return y, logdet + logdet2

    compiled = torch.compile(run, fullgraph=True)
    x = torch.randn(2, 5, 4, 4, dtype=torch.float64)
    x_eager, x_comp = x.clone().requires_grad_(), x.clone().requires_grad_()
    y, logdet = run(x_eager)
    yc, logdetc = compiled(x_comp)
    assert_close(yc, y.double())
    assert_close(logdetc, logdet.double(), reduce_len=48)
    params = list(model.parameters())
    eager_grads = torch.autograd.grad(y.square().sum() + logdet.sum(), [x_eager, *params])
    comp_grads = torch.autograd.grad(yc.square().sum() + logdetc.sum(), [x_comp, *params])
    for got, want in zip(comp_grads, eager_grads):
        assert_close(got, want.double())


def test_autocast_subnet_output_is_cast_to_the_input_dtype():
    layer = randomize(AffineCoupling(4, "conv", hidden=8))
    x = torch.randn(2, 4, 5, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, logdet = layer(x)
        x_back = layer.inverse(y)
    assert y.dtype == torch.float32 and logdet.dtype == torch.float32
    assert_close(x_back, x.double())
