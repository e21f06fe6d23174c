"""Mistakes users make get an error that names the layer, the argument and the value."""

import pytest
import torch
from torch import nn

from invkernels.diagnostics import reconstruction_error
from invkernels.nn import ActNorm, AffineCoupling, InvConv1x1, InvertibleSequential, Split


def test_input_dtype_other_than_the_subnets_names_both():
    layer = AffineCoupling(4, "conv", hidden=8)
    with pytest.raises(ValueError, match=r"AffineCoupling: the input has dtype torch.float64 but the layer's subnet "
                                         r"has parameters of dtype torch.float32"):
        layer(torch.randn(2, 4, 4, 4, dtype=torch.float64))


class ScaleNet(nn.Module):
    """A subnet without a layer that checks dtypes: a float32 input is promoted to its float64."""

    def __init__(self, c_in, c_out):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(1, c_out, 1, 1, dtype=torch.float64))
        self.c_out = c_out

    def forward(self, x):
        return x[:, :1] * self.weight


def test_input_dtype_other_than_the_subnets_names_both_when_the_subnet_promotes():
    layer = AffineCoupling(4, ScaleNet)
    with pytest.raises(ValueError, match=r"AffineCoupling: the input has dtype torch.float32 but the layer's subnet "
                                         r"has parameters of dtype torch.float64"):
        layer(torch.randn(2, 4, 4, 4))


def test_input_dtype_check_allows_autocast():
    layer = AffineCoupling(4, "conv", hidden=8)
    x = torch.randn(2, 4, 4, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, _ = layer(x)
    assert y.dtype == torch.float32


class TupleNet(nn.Module):
    def __init__(self, c_in, c_out):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 1)

    def forward(self, x):
        return self.conv(x), x


@pytest.mark.parametrize("make", [lambda: AffineCoupling(4, TupleNet), lambda: Split(4, "learned", subnet=TupleNet)])
def test_subnet_returning_a_tuple(make):
    layer = make()
    with pytest.raises(TypeError, match=r": the subnet should return a tensor of shape \[2, \d, 4, 4\], got a tuple "
                                        r"of 2 \(Tensor, Tensor\)"):
        layer(torch.randn(2, 4, 4, 4))


def test_subnet_output_of_the_wrong_shape():
    layer = AffineCoupling(4, lambda c_in, c_out: nn.Conv2d(c_in, c_out + 1, 1))
    with pytest.raises(ValueError, match=r"AffineCoupling: the subnet output should have shape \[2, 4, 3, 3\], "
                                         r"got \[2, 5, 3, 3\]"):
        layer(torch.randn(2, 4, 3, 3))


def test_invconv_built_and_used_under_inference_mode():
    with torch.inference_mode():
        layer = InvConv1x1(4)
        x = torch.randn(2, 4, 3, 3)
        y, _ = layer(x)
        x_back = layer.inverse(y)
    torch.testing.assert_close(x_back, x, rtol=0, atol=1e-5)
    y, logdet = layer(torch.randn(2, 4, 3, 3, requires_grad=True))
    (y.sum() + logdet.sum()).backward()
    assert layer.lower.grad is not None


def test_reconstruction_error_of_an_uninitialized_model():
    model = InvertibleSequential(ActNorm(4), AffineCoupling(4, "conv", hidden=8))
    with pytest.raises(ValueError, match=r"reconstruction_error: the model's ActNorm layers are not initialized "
                                         r"\(blocks.0\)"):
        reconstruction_error(model, torch.randn(2, 4, 4, 4))
    assert not model[0].is_initialized


def test_reconstruction_error_leaves_batchnorm_statistics():
    def subnet(c_in, c_out):
        return nn.Sequential(nn.Conv2d(c_in, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, c_out, 1))

    model = InvertibleSequential(AffineCoupling(4, subnet), AffineCoupling(4, subnet))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    report = reconstruction_error(model, torch.randn(4, 4, 4, 4))
    assert report.total < 1e-5
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_glow_inverse_of_latents_of_another_dtype_names_both():
    from invkernels.models import Glow  # noqa: PLC0415

    glow = Glow((1, 4, 4), levels=1, steps=1, hidden=8)
    with pytest.raises(ValueError, match=r"Glow: z has dtype torch.float64 but the model's parameters are "
                                         r"torch.float32"):
        glow.inverse(torch.randn(2, 16, dtype=torch.float64))
