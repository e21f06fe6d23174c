"""NeuralSplineFlow: change of variables, sampling, inverse, conditioning, training, memory-free
gradients and argument errors, on tiny models."""

import math

import pytest
import torch

from invkernels.models import NeuralSplineFlow
from invkernels.nn import ActNorm, InvConv1x1, Permute, RQSplineCoupling


def randomize(model, scale=0.2):
    """Random parameters (the couplings' zero last layers included), ActNorms marked initialized."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))
    for m in model.modules():
        if isinstance(m, ActNorm):
            m.mark_initialized()
    return model


def standard_normal(z):
    return -0.5 * z.square().sum(1) - z.shape[1] / 2 * math.log(2 * math.pi)


def test_layers_and_shapes():
    model = NeuralSplineFlow(3, blocks=2, hidden=8, bins=4, mixing="reverse", tail_bound=2.0)
    kinds = [type(b) for b in model.flow.blocks]
    assert kinds == [ActNorm, Permute, RQSplineCoupling] * 2
    assert model.flow.memory_free
    coupling = model.flow.blocks[2]
    assert (coupling.bins, coupling.tail_bound, coupling.context_channels) == (4, 2.0, 0)
    assert [type(b) for b in NeuralSplineFlow(3, blocks=1, actnorm=False).flow.blocks] == [InvConv1x1,
                                                                                            RQSplineCoupling]
    randomize(model)
    z, logdet = model(torch.randn(5, 3))
    assert z.shape == (5, 3) and logdet.shape == (5,)
    assert model.log_prob(torch.randn(5, 3)).shape == (5,)


def test_starts_as_a_standard_normal():
    """Identity couplings between permutations: the flow is a permutation, the density the base's."""
    model = NeuralSplineFlow(4, blocks=3, hidden=8, mixing="random", actnorm=False).double()
    x = 2 * torch.randn(7, 4, dtype=torch.float64)
    z, logdet = model(x)
    torch.testing.assert_close(z.sort(1).values, x.sort(1).values, rtol=0, atol=1e-12)
    assert logdet.abs().max() <= 1e-12
    torch.testing.assert_close(model.log_prob(x), standard_normal(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mixing", ["invconv", "random"])
def test_log_prob_is_the_change_of_variables(mixing):
    torch.manual_seed(1)
    model = randomize(NeuralSplineFlow(3, blocks=3, hidden=8, bins=4, mixing=mixing).double())
    model.eval()
    x = 1.5 * torch.randn(4, 3, dtype=torch.float64)
    z, logdet = model(x)
    log_p = model.log_prob(x)
    assert torch.isfinite(log_p).all()
    torch.testing.assert_close(log_p, standard_normal(z) + logdet, rtol=1e-12, atol=1e-12)
    assert (log_p - standard_normal(x)).abs().max() > 1e-2  # not the base it started as
    for b in range(x.shape[0]):
        jac = torch.autograd.functional.jacobian(lambda v: model(v.view(1, 3))[0].flatten(), x[b])
        torch.testing.assert_close(logdet[b], torch.linalg.slogdet(jac).logabsdet, rtol=1e-10, atol=1e-10)


def test_sample_and_inverse_are_consistent():
    torch.manual_seed(2)
    model = randomize(NeuralSplineFlow(3, blocks=3, hidden=8, bins=4).double())
    model.eval()
    x = 1.5 * torch.randn(6, 3, dtype=torch.float64)
    z, _ = model(x)
    torch.testing.assert_close(model.inverse(z), x, rtol=1e-10, atol=1e-10)
    torch.manual_seed(3)
    samples = model.sample(5)
    torch.manual_seed(3)
    drawn = torch.randn(5, 3, dtype=torch.float64)
    assert samples.shape == (5, 3) and samples.dtype == torch.float64 and not samples.requires_grad
    torch.testing.assert_close(model(samples)[0], drawn, rtol=1e-10, atol=1e-10)
    assert torch.isfinite(model.log_prob(samples)).all()
    assert model.sample(0).shape == (0, 3)
    torch.testing.assert_close(model.sample(2, temperature=0.0), model.inverse(torch.zeros(2, 3, dtype=torch.float64)))


def test_context_changes_the_density_and_broadcasts():
    torch.manual_seed(4)
    model = randomize(NeuralSplineFlow(2, blocks=2, hidden=8, bins=4, context_features=3).double())
    model.eval()
    x = torch.randn(5, 2, dtype=torch.float64)
    ctx = torch.randn(5, 3, dtype=torch.float64)
    log_p = model.log_prob(x, ctx)
    assert torch.isfinite(log_p).all()
    assert (model.log_prob(x, ctx + 1) - log_p).abs().max() > 1e-3
    row = ctx[:1]
    torch.testing.assert_close(model.log_prob(x, row), model.log_prob(x, row.expand(5, 3).clone()), rtol=0, atol=0)
    z, logdet = model(x, ctx)
    torch.testing.assert_close(log_p, standard_normal(z) + logdet, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(model.inverse(z, ctx), x, rtol=1e-10, atol=1e-10)
    torch.manual_seed(5)
    samples = model.sample(4, row)
    torch.manual_seed(5)
    drawn = torch.randn(4, 2, dtype=torch.float64)
    assert samples.shape == (4, 2)
    torch.testing.assert_close(model(samples, row)[0], drawn, rtol=1e-10, atol=1e-10)
    per_row = model.sample(5, ctx)
    assert per_row.shape == (5, 2) and torch.isfinite(model.log_prob(per_row, ctx)).all()
    bits = model.bits_per_dim(torch.rand(5, 2, dtype=torch.float64).mul(15).round() / 15, 16, context=ctx)
    assert bits.shape == (5,) and torch.isfinite(bits).all()


def test_context_errors_name_the_model_and_the_shape():
    conditional = NeuralSplineFlow(2, blocks=1, hidden=8, context_features=3)
    plain = NeuralSplineFlow(2, blocks=1, hidden=8)
    x = torch.randn(4, 2)
    with pytest.raises(ValueError, match=r"NeuralSplineFlow: context is required \(context_features=3\)"):
        conditional.log_prob(x)
    with pytest.raises(ValueError, match=r"context should have shape \[4, 3\] \(one row per sample\) or \[1, 3\] "
                                         r"\(one row for all\), got \[2, 3\]"):
        conditional.log_prob(x, torch.randn(2, 3))
    with pytest.raises(ValueError, match=r"context should have shape \[6, 3\].*got \[3\]"):
        conditional.sample(6, torch.randn(3))
    with pytest.raises(ValueError, match=r"context should have the input's dtype and device \(torch.float32"):
        conditional.log_prob(x, torch.randn(4, 3, dtype=torch.float64))
    with pytest.raises(TypeError, match=r"NeuralSplineFlow: context should be a tensor, got float"):
        conditional.sample(2, 0.5)
    with pytest.raises(ValueError, match="NeuralSplineFlow: context was given but the model was built with "
                                         "context_features=0"):
        plain.log_prob(x, torch.randn(4, 3))
    with pytest.raises(ValueError, match=r"NeuralSplineFlow: x should have shape \[B, 2\], got \[4, 3\]"):
        plain.log_prob(torch.randn(4, 3))
    with pytest.raises(ValueError, match="NeuralSplineFlow: temperature should be a finite number >= 0"):
        plain.sample(2, temperature=-1.0)


def two_moons(n, generator):
    """A tiny 2-D data set: two interleaved half circles with noise."""
    t = torch.rand(n, generator=generator) * math.pi
    upper = torch.rand(n, generator=generator) < 0.5
    x = torch.where(upper, torch.cos(t), 1 - torch.cos(t))
    y = torch.where(upper, torch.sin(t), 0.5 - torch.sin(t))
    return torch.stack([x, y], 1) + 0.05 * torch.randn(n, 2, generator=generator)


def test_training_lowers_the_nll():
    torch.manual_seed(6)
    data = two_moons(256, torch.Generator().manual_seed(0))
    model = NeuralSplineFlow(2, blocks=2, hidden=16, bins=6)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(40):
        loss = -model.log_prob(data).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    with torch.no_grad():
        final = -model.log_prob(data).mean().item()
    assert all(math.isfinite(v) for v in losses)
    assert final < losses[0] - 0.5, (losses[0], final)


@pytest.mark.parametrize("context_features", [0, 2])
def test_memory_free_gradients_equal_stored_ones(context_features):
    torch.manual_seed(7)
    model = randomize(NeuralSplineFlow(3, blocks=3, hidden=8, bins=4, context_features=context_features).double())
    x = 1.5 * torch.randn(6, 3, dtype=torch.float64)
    ctx = torch.randn(1, context_features, dtype=torch.float64) if context_features else None
    params = list(model.parameters())
    grads = {}
    for memory_free in (True, False):
        model.flow.memory_free = memory_free
        xr = x.clone().requires_grad_()
        inputs = [xr, *params]
        if ctx is not None:
            inputs.append(ctx.clone().requires_grad_())
        loss = -model.log_prob(xr, inputs[-1] if ctx is not None else None).mean()
        grads[memory_free] = torch.autograd.grad(loss, inputs)
    for got, want in zip(grads[True], grads[False]):
        assert want.norm() > 0
        assert ((got - want).norm() / want.norm()).item() <= 1e-10


def test_low_precision_model_gives_float32_log_prob():
    model = randomize(NeuralSplineFlow(2, blocks=2, hidden=8, bins=3, actnorm=False)).to(torch.bfloat16)
    x = torch.randn(4, 2).to(torch.bfloat16)
    log_p = model.log_prob(x)
    assert log_p.dtype == torch.float32 and torch.isfinite(log_p).all()
    assert model.sample(3).dtype == torch.bfloat16


def test_state_dict_round_trip():
    torch.manual_seed(8)
    model = randomize(NeuralSplineFlow(3, blocks=2, hidden=8, bins=4, mixing="random", context_features=1))
    copy = NeuralSplineFlow(3, blocks=2, hidden=8, bins=4, mixing="random", context_features=1)
    copy.load_state_dict(model.state_dict())
    copy.eval()
    model.eval()
    x, ctx = torch.randn(5, 3), torch.randn(5, 1)
    assert torch.equal(model.log_prob(x, ctx), copy.log_prob(x, ctx))


@pytest.mark.parametrize("kwargs,message", [
    ({"features": 1}, "features should be >= 2"),
    ({"features": 2.0}, "features should be a positive integer, got 2.0"),
    ({"blocks": 0}, "blocks should be a positive integer, got 0"),
    ({"hidden": -4}, "hidden should be a positive integer, got -4"),
    ({"bins": 0}, "bins should be a positive integer, got 0"),
    ({"tail_bound": -1.0}, "tail_bound should be positive and finite"),
    ({"mixing": "shuffle"}, "mixing should be 'invconv', 'reverse' or 'random', got 'shuffle'"),
    ({"context_features": -1}, "context_features should be an integer >= 0, got -1"),
    ({"actnorm": 1}, "actnorm should be True or False, got 1"),
    ({"memory_free": "yes"}, "memory_free should be True, False or 'auto', got 'yes'"),
    ({"backend": "cuda"}, "backend should be one of"),
])
def test_bad_constructor_arguments(kwargs, message):
    args = {"features": 3}
    args.update(kwargs)
    with pytest.raises(ValueError, match="NeuralSplineFlow: " + message.replace("(", r"\(").replace(")", r"\)")):
        NeuralSplineFlow(**args)
