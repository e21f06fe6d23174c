"""Squeeze / Split modules: layout, round trip, prior densities, sampling, gradients, errors, compile."""

import math

import pytest
import torch
import torch.nn.functional as F

from invkernels.nn.multiscale import Split, Squeeze
from invkernels.nn.subnets import conv_subnet, mlp_subnet
from tolerances import TOL, assert_close


def randomize(module):
    """Give the zero-initialized prior subnet random weights so the learned prior is not N(0, I)."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(0.3 * torch.randn_like(p))
    return module


def manual_squeeze(x, f):
    b, c, h, w = x.shape
    return x.reshape(b, c, h // f, f, w // f, f).permute(0, 1, 3, 5, 2, 4).reshape(b, c * f * f, h // f, w // f)


def normal_log_prob(z2, mean, std):
    return torch.distributions.Normal(mean, std).log_prob(z2).flatten(1).sum(dim=1)


@pytest.mark.parametrize("factor,shape", [(2, (2, 3, 4, 6)), (3, (1, 2, 6, 3)), (1, (2, 3, 2, 2)), (2, (0, 3, 4, 4)),
                                          (2, (2, 3, 0, 4)), (2, (2, 0, 4, 4))])
def test_squeeze_layout_and_round_trip(factor, shape):
    x = torch.randn(shape, dtype=torch.float64)
    layer = Squeeze(factor)
    y, logdet = layer(x)
    assert torch.equal(y, manual_squeeze(x, factor))
    assert y.shape == (shape[0], shape[1] * factor ** 2, shape[2] // factor, shape[3] // factor)
    assert torch.equal(logdet, torch.zeros(shape[0], dtype=torch.float64))
    x_back, logdet_inv = layer.inverse(y, return_logdet=True)
    assert torch.equal(x_back, x)
    assert torch.equal(logdet_inv, torch.zeros(shape[0], dtype=torch.float64))


def test_squeeze_channel_order_is_glows():
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    y, _ = Squeeze()(x)
    assert y[0, :, 0, 0].tolist() == [0.0, 1.0, 4.0, 5.0]
    assert y[0, :, 1, 1].tolist() == [10.0, 11.0, 14.0, 15.0]


def test_squeeze_hostile_layouts():
    base = torch.randn(3, 4, 8, 12)
    for x in (base.to(memory_format=torch.channels_last), base[:, :, ::2, ::3], base[::2, 1:]):
        y, _ = Squeeze()(x)
        assert torch.equal(y, manual_squeeze(x.contiguous(), 2))
        assert torch.equal(Squeeze().inverse(y), x)


@pytest.mark.parametrize("factor", [0, -2, 2.0, True, "2"])
def test_squeeze_bad_factor(factor):
    with pytest.raises(ValueError, match=f"Squeeze: factor should be a positive integer, got {factor!r}"):
        Squeeze(factor)


def test_squeeze_bad_shapes():
    layer = Squeeze()
    with pytest.raises(ValueError, match=r"x should be 4-D \[B, C, H, W\], got shape \[2, 3, 4\]"):
        layer(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match=r"H and W divisible by factor=2, got shape \[1, 3, 5, 4\]"):
        layer(torch.randn(1, 3, 5, 4))
    with pytest.raises(ValueError, match=r"H and W divisible by factor=2, got shape \[1, 3, 4, 3\]"):
        layer(torch.randn(1, 3, 4, 3))
    with pytest.raises(ValueError, match=r"y should be 4-D \[B, C, H, W\], got shape \[2, 8\]"):
        layer.inverse(torch.randn(2, 8))
    with pytest.raises(ValueError, match=r"y should have C divisible by factor\*\*2=4, got shape \[2, 6, 2, 2\]"):
        layer.inverse(torch.randn(2, 6, 2, 2))


SPLITS = [
    ("gaussian", {}, (3, 6, 4, 4)),
    ("gaussian", {}, (4, 5)),
    ("learned", {}, (3, 5, 4, 4)),
    ("learned", {"subnet": "mlp"}, (4, 7)),
    ("learned", {"hidden": 8}, (2, 6, 3, 5)),
    ("learned", {"subnet": "mlp", "hidden": 8}, (3, 4)),
    ("learned", {"subnet": conv_subnet(8, kernel_size=1)}, (2, 5, 3, 3)),
]


@pytest.mark.parametrize("prior,kwargs,shape", SPLITS)
def test_split_round_trip_with_given_z2(prior, kwargs, shape):
    layer = randomize(Split(shape[1], prior, **kwargs)).double()
    x = torch.randn(shape, dtype=torch.float64)
    x1, log_pz2 = layer(x)
    c1 = shape[1] // 2
    assert torch.equal(x1, x[:, :c1])
    assert log_pz2.shape == (shape[0],) and log_pz2.dtype == torch.float64
    x_back, logdet_inv = layer.inverse(x1, x[:, c1:], return_logdet=True)
    assert torch.equal(x_back, x)
    assert_close(logdet_inv, -log_pz2)
    assert_close(layer.log_prob(x[:, c1:], x1), log_pz2)


@pytest.mark.parametrize("shape", [(3, 6, 4, 4), (4, 5), (2, 7, 3)])
def test_gaussian_log_prob_is_the_standard_normal(shape):
    layer = Split(shape[1])
    x = torch.randn(shape, dtype=torch.float64)
    z2 = x[:, shape[1] // 2:]
    expected = normal_log_prob(z2, torch.zeros(()).double(), torch.ones(()).double())
    _, log_pz2 = layer(x)
    assert_close(log_pz2, expected, reduce_len=z2[0].numel())
    assert_close(layer.log_prob(z2), expected, reduce_len=z2[0].numel())
    assert list(layer.parameters()) == []


@pytest.mark.parametrize("kwargs,shape", [({}, (3, 5, 4, 4)), ({"subnet": "mlp"}, (4, 7)),
                                          ({"hidden": 8}, (2, 6, 3, 3)), ({"subnet": "mlp", "hidden": 8}, (3, 4))])
def test_learned_prior_starts_as_the_standard_normal(kwargs, shape):
    x = torch.randn(shape)
    _, learned = Split(shape[1], "learned", **kwargs)(x)
    _, gaussian = Split(shape[1])(x)
    assert_close(learned, gaussian.double(), reduce_len=x[0].numel())


@pytest.mark.parametrize("clamp", [5.0, 0.5])
def test_learned_conv_prior_is_the_predicted_normal(clamp):
    layer = randomize(Split(5, "learned", clamp=clamp)).double()
    x = torch.randn(3, 5, 4, 4, dtype=torch.float64)
    x1, z2 = x[:, :2], x[:, 2:]
    mean, hs = F.conv2d(x1, layer.subnet.weight, layer.subnet.bias, padding=1).chunk(2, dim=1)
    std = torch.exp(clamp * torch.tanh(hs / clamp))
    assert (std - 1).abs().max() > 1e-3
    expected = normal_log_prob(z2, mean, std)
    _, log_pz2 = layer(x)
    assert_close(log_pz2, expected, reduce_len=z2[0].numel())
    assert_close(layer.log_prob(z2, x1), expected, reduce_len=z2[0].numel())


def test_learned_mlp_prior_is_the_predicted_normal():
    layer = randomize(Split(7, "learned", subnet="mlp")).double()
    x = torch.randn(4, 7, dtype=torch.float64)
    x1, z2 = x[:, :3], x[:, 3:]
    mean, hs = F.linear(x1, layer.subnet.weight, layer.subnet.bias).chunk(2, dim=1)
    expected = normal_log_prob(z2, mean, torch.exp(5.0 * torch.tanh(hs / 5.0)))
    assert_close(layer(x)[1], expected, reduce_len=4)


def test_learned_log_std_is_soft_clamped():
    layer = Split(4, "learned", subnet="mlp", clamp=1.0).double()
    with torch.no_grad():
        layer.subnet.bias.copy_(torch.tensor([0.0, 0.0, -1e6, 1e6]))
    z2 = torch.tensor([[2.0, 3.0]], dtype=torch.float64)
    std = torch.tensor([math.exp(-1.0), math.exp(1.0)], dtype=torch.float64)
    expected = normal_log_prob(z2, torch.zeros(2).double(), std)
    assert_close(layer.log_prob(z2, torch.zeros(1, 2, dtype=torch.float64)), expected)


@pytest.mark.parametrize("prior,kwargs,shape", SPLITS)
def test_sampling_temperature(prior, kwargs, shape):
    layer = randomize(Split(shape[1], prior, **kwargs)).double()
    c1 = shape[1] // 2
    x1 = torch.randn(shape, dtype=torch.float64)[:, :c1]
    mean = layer.inverse(x1, temperature=0.0)[:, c1:]
    if prior == "gaussian":
        assert torch.equal(mean, torch.zeros_like(mean))
    else:
        expected_mean = layer.subnet(x1).chunk(2, dim=1)[0]
        assert torch.equal(mean, expected_mean)
    torch.manual_seed(7)
    x_one, logdet_one = layer.inverse(x1, return_logdet=True)
    torch.manual_seed(7)
    x_half = layer.inverse(x1, temperature=0.5)
    assert torch.equal(x_one[:, :c1], x1) and torch.equal(x_half[:, :c1], x1)
    assert_close(x_half[:, c1:] - mean, 0.5 * (x_one[:, c1:] - mean))
    assert_close(logdet_one, -layer(x_one)[1])


def test_samples_have_the_prior_statistics():
    layer = randomize(Split(4, "learned", subnet="mlp")).double()
    x1 = torch.randn(1, 2, dtype=torch.float64).expand(20000, 2)
    mean, hs = layer.subnet(x1[:1]).chunk(2, dim=1)
    z2 = layer.inverse(x1, temperature=0.7)[:, 2:]
    assert_close(z2.mean(0), mean[0], atol=0.05, rtol=0)
    assert_close(z2.std(0), 0.7 * torch.exp(5.0 * torch.tanh(hs[0] / 5.0)), atol=0.05, rtol=0.03)


def test_gradients_reach_the_learned_prior_and_the_input():
    for layer in (Split(6, "learned"), randomize(Split(6, "learned", hidden=8))):
        x = torch.randn(2, 6, 3, 3, requires_grad=True)
        x1, log_pz2 = layer(x)
        (x1.square().sum() + log_pz2.sum()).backward()
        assert x.grad[:, :3].abs().sum() > 0 and x.grad[:, 3:].abs().sum() > 0
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in layer.parameters())
    layer = randomize(Split(6, "learned"))
    x1 = torch.randn(2, 3, 3, 3)
    layer.inverse(x1, temperature=0.8).square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in layer.parameters())


def test_gradcheck_learned_forward():
    layer = randomize(Split(5, "learned", clamp=1.5)).double()
    x = torch.randn(2, 5, 3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v: layer(v)[1], (x,))


@pytest.mark.parametrize("prior", ["gaussian", "learned"])
@pytest.mark.parametrize("shape", [(1, 5, 2, 2), (0, 5, 2, 2), (1, 3, 1, 1)])
def test_odd_channels_batch_one_and_empty_batch(prior, shape):
    layer = randomize(Split(shape[1], prior))
    x = torch.randn(shape)
    x1, log_pz2 = layer(x)
    assert x1.shape == (shape[0], shape[1] // 2, *shape[2:])
    assert log_pz2.shape == (shape[0],)
    assert torch.equal(layer.inverse(x1, x[:, shape[1] // 2:]), x)
    sample, logdet = layer.inverse(x1, return_logdet=True)
    assert sample.shape == x.shape and logdet.shape == (shape[0],)
    assert_close(logdet, -layer(sample)[1].double())


def test_low_precision_log_prob_is_accumulated_wide():
    layer = randomize(Split(6, "learned"))
    x = torch.randn(2, 6, 8, 8).bfloat16()
    _, log_pz2 = layer.bfloat16()(x)
    _, expected = layer.double()(x.double())
    assert log_pz2.dtype == torch.float32
    # The subnet ran in bfloat16: the bfloat16 row of the table bounds its error.
    assert_close(log_pz2, expected, **TOL[torch.bfloat16])


def test_autocast_subnet_output_is_used_in_float32():
    layer = randomize(Split(6, "learned"))
    x = torch.randn(2, 6, 5, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x1, log_pz2 = layer(x)
        x_back = layer.inverse(x1, x[:, 3:])
    assert x1.dtype == torch.float32 and log_pz2.dtype == torch.float32
    assert torch.equal(x_back, x)


def test_squeeze_then_split_shapes():
    x = torch.randn(2, 3, 8, 8)
    y, _ = Squeeze()(x)
    layer = Split(12, "learned")
    x1, _ = layer(y)
    assert x1.shape == (2, 6, 4, 4)
    assert Squeeze().inverse(layer.inverse(x1, y[:, 6:])).equal(x)


@pytest.mark.parametrize("args,kwargs,message", [
    ((1,), {}, "channels should be an integer >= 2, got 1"),
    ((True,), {}, "channels should be an integer >= 2, got True"),
    ((4, "laplace"), {}, "prior should be 'gaussian' or 'learned', got 'laplace'"),
    ((4,), {"hidden": 8}, "hidden and subnet apply to prior='learned' only"),
    ((4,), {"subnet": "mlp"}, "hidden and subnet apply to prior='learned' only"),
    ((4, "learned"), {"hidden": 0}, "hidden should be a positive integer, got 0"),
    ((4, "learned"), {"subnet": "resnet"}, "subnet should be 'conv', 'mlp' or a factory"),
    ((4, "learned"), {"subnet": mlp_subnet(8), "hidden": 8}, "hidden applies to subnet='conv' or 'mlp' only"),
    ((4, "learned"), {"clamp": 0.0}, "clamp should be a positive finite number, got 0.0"),
    ((4, "learned"), {"clamp": math.inf}, "clamp should be a positive finite number, got inf"),
])
def test_split_bad_constructor_arguments(args, kwargs, message):
    with pytest.raises(ValueError, match="Split: " + message.replace("(", r"\(").replace(")", r"\)")):
        Split(*args, **kwargs)


def test_split_bad_call_arguments():
    layer = Split(4, "learned")
    with pytest.raises(ValueError, match=r"x should have shape \[B, 4, ...\], got \[2, 5, 3, 3\]"):
        layer(torch.randn(2, 5, 3, 3))
    with pytest.raises(ValueError, match="subnet='conv' expects 4-D inputs, got x with 2 dims; use subnet='mlp'"):
        layer(torch.randn(2, 4))
    with pytest.raises(ValueError, match="x should be a floating-point tensor, got torch.int64"):
        Split(4)(torch.ones(2, 4, dtype=torch.int64))
    x1 = torch.randn(2, 2, 3, 3)
    with pytest.raises(ValueError, match=r"x1 should have shape \[B, 2, ...\], got \[2, 3, 3, 3\]"):
        layer.inverse(torch.randn(2, 3, 3, 3))
    with pytest.raises(ValueError, match=r"z2 should have shape \[2, 2, 3, 3\], got \[2, 2, 3, 4\]"):
        layer.inverse(x1, torch.randn(2, 2, 3, 4))
    with pytest.raises(ValueError, match=r"z2 should have the dtype of x1 \(torch.float32\), got torch.float64"):
        layer.inverse(x1, torch.randn(2, 2, 3, 3, dtype=torch.float64))
    for temperature in (-1.0, math.nan, "hot"):
        with pytest.raises(ValueError, match=f"temperature should be a finite number >= 0, got {temperature!r}"):
            layer.inverse(x1, temperature=temperature)
    with pytest.raises(ValueError, match="x1 is required by prior='learned'"):
        layer.log_prob(torch.randn(2, 2, 3, 3))
    with pytest.raises(ValueError, match=r"z2 should have shape \[B, 2, ...\], got \[2, 3\]"):
        Split(4).log_prob(torch.randn(2, 3))
    bad = Split(4, "learned", subnet=lambda cin, cout: torch.nn.Conv2d(cin, cout - 1, 1))
    with pytest.raises(ValueError, match=r"subnet output should have shape \[2, 4, 3, 3\]"):
        bad(torch.randn(2, 4, 3, 3))


def test_repr():
    assert "factor=2" in repr(Squeeze())
    assert "channels=5, split=(2, 3), prior='learned', clamp=5.0" in repr(Split(5, "learned"))
    assert "prior='gaussian')" in repr(Split(4))


def test_torch_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    model = torch.nn.ModuleList([Squeeze(), randomize(Split(12, "learned")), Split(6)]).double()

    def run(x):
        y, logdet = model[0](x)
        x1, log_p = model[1](y)
        x2, log_p2 = model[2](x1)
        return x2, logdet + log_p + log_p2

    compiled = torch.compile(run, fullgraph=True)
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    x_eager, x_comp = x.clone().requires_grad_(), x.clone().requires_grad_()
    y, logdet = run(x_eager)
    yc, logdetc = compiled(x_comp)
    assert_close(yc, y)
    assert_close(logdetc, logdet, reduce_len=48)
    params = list(model.parameters())
    eager_grads = torch.autograd.grad(y.square().sum() + logdet.sum(), [x_eager, *params])
    comp_grads = torch.autograd.grad(yc.square().sum() + logdetc.sum(), [x_comp, *params])
    for got, want in zip(comp_grads, eager_grads):
        assert_close(got, want, reduce_len=48)
