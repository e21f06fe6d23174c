"""Modules on float16 / bfloat16 inputs: every log-det is float32 (a half-precision log-det
overflows at 65504), through the chains and models that add them up."""

import pytest
import torch

from invkernels.nn import (
    ActNorm,
    AdditiveCoupling,
    AffineCoupling,
    GlowStep,
    InvConv1x1,
    InvertibleSequential,
    Permute,
    Split,
    Squeeze,
)

LOW = [torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", LOW)
def test_actnorm_logdet_past_the_half_range(dtype):
    layer = ActNorm(4, data_init=False)
    with torch.no_grad():
        layer.log_scale.fill_(2.0)
    chain = InvertibleSequential(layer, memory_free=True)
    x = torch.randn(1, 4, 128, 128).to(dtype)
    for model in (layer, chain):
        _, logdet = model(x)
        assert logdet.dtype == torch.float32
        assert logdet.item() == 131072.0


@pytest.mark.parametrize("dtype", LOW)
def test_coupling_logdet_past_the_half_range(dtype):
    layer = AffineCoupling(64, lambda c_in, c_out: torch.nn.Conv2d(c_in, c_out, 1), clamp=2.0)
    with torch.no_grad():
        layer.subnet.weight.zero_()
        layer.subnet.bias.zero_()
        layer.subnet.bias[:32].fill_(50.0)
    x = torch.randn(1, 64, 64, 64)
    _, logdet = layer.to(dtype)(x.to(dtype))
    assert logdet.dtype == torch.float32
    expected = 32 * 64 * 64 * 2.0 * torch.tanh(torch.tensor(25.0, dtype=torch.float64)).item()
    assert logdet.item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("dtype", LOW)
def test_every_block_and_the_chain_return_float32_logdets(dtype):
    torch.manual_seed(0)
    blocks = [ActNorm(4, data_init=False), InvConv1x1(4), AffineCoupling(4, "conv", hidden=8),
              AdditiveCoupling(4, "conv", hidden=8), Permute(4), GlowStep(4, hidden=8),
              GlowStep(4, hidden=8, coupling="spline"), Squeeze()]
    for block in blocks:
        if isinstance(block, GlowStep):
            block.actnorm.mark_initialized()
    x = torch.randn(2, 4, 4, 4).to(dtype)
    h = x
    for block in blocks:
        block.to(dtype)
        h, logdet = block(h)
        assert logdet.dtype == torch.float32, type(block).__name__
    split = Split(16, "learned").to(dtype)
    _, log_pz2 = split(h)
    assert log_pz2.dtype == torch.float32
    chain = InvertibleSequential(*blocks, split)
    y, logdet = chain(x.requires_grad_())
    assert logdet.dtype == torch.float32 and bool(torch.isfinite(logdet).all())
    (y.float().square().sum() - logdet.sum()).backward()
    assert x.grad.dtype == dtype and bool(torch.isfinite(x.grad).all())
