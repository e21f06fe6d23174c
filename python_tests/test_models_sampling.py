"""Sampling with gradients: ``rsample`` and ``sample_and_log_prob`` on every model, checked by
gradcheck, against ``log_prob`` at the samples, and by a reverse-KL fit of a known 2-D target."""

import math

import pytest
import torch
from torch.func import functional_call

from invkernels.models import Glow, NeuralSplineFlow, RealNVP
from invkernels.nn import ActNorm


def randomized(model, scale=0.3):
    torch.manual_seed(5)
    with torch.no_grad():
        for p in model.parameters():
            if p.is_floating_point():
                p.add_(scale * torch.randn_like(p))
    for m in model.modules():
        if isinstance(m, ActNorm):
            m.mark_initialized()
    return model


MODELS = {
    "realnvp": lambda: randomized(RealNVP(3, blocks=2, hidden=6).double()),
    "spline": lambda: randomized(NeuralSplineFlow(3, blocks=2, hidden=6, bins=3).double(), 0.1),
    "glow": lambda: randomized(Glow((1, 4, 4), levels=2, steps=1, hidden=4, scale="exp").double(), 0.1),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_sample_and_log_prob_is_log_prob_at_the_samples_with_its_gradients(name):
    model = MODELS[name]()
    params = [p for p in model.parameters() if p.requires_grad]
    torch.manual_seed(1)
    x, log_q = model.sample_and_log_prob(5)
    assert x.requires_grad and log_q.requires_grad and log_q.shape == (5,)
    grads = torch.autograd.grad(log_q.sum(), params, allow_unused=True)
    torch.manual_seed(1)
    x_again = model.rsample(5)
    torch.testing.assert_close(x_again, x, rtol=0, atol=0)
    log_p = model.log_prob(x_again)
    torch.testing.assert_close(log_q, log_p, rtol=1e-10, atol=1e-10)
    want = torch.autograd.grad(log_p.sum(), params, allow_unused=True)
    for g, w in zip(grads, want):
        if w is None:
            assert g is None or not g.any()
        else:
            torch.testing.assert_close(g, w, rtol=1e-8, atol=1e-10)


class _Draw(torch.nn.Module):
    """``model.rsample(n, temperature=0.8)`` as a forward, for ``functional_call``."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, n):
        torch.manual_seed(2)
        return self.model.rsample(n, temperature=0.8)


@pytest.mark.parametrize("name", list(MODELS))
def test_rsample_passes_gradcheck_in_the_parameters(name):
    draw = _Draw(MODELS[name]())
    names = [k for k, p in draw.named_parameters() if p.requires_grad]
    values = tuple(p.detach().clone().requires_grad_() for k, p in draw.named_parameters() if p.requires_grad)
    assert torch.autograd.gradcheck(lambda *ps: functional_call(draw, dict(zip(names, ps)), (2,)), values,
                                    fast_mode=True)


def test_conditional_spline_samples_with_their_context():
    model = randomized(NeuralSplineFlow(2, blocks=2, hidden=6, bins=3, context_features=2).double(), 0.1)
    context = torch.randn(1, 2, dtype=torch.float64, requires_grad=True)
    x, log_q = model.sample_and_log_prob(4, context)
    torch.testing.assert_close(log_q, model.log_prob(x, context.expand(4, -1)), rtol=1e-10, atol=1e-10)
    assert torch.autograd.grad(log_q.sum(), context)[0].abs().sum() > 0
    assert model.rsample(3, context, temperature=0.5).shape == (3, 2)
    with pytest.raises(TypeError, match="temperature is the third argument: rsample"):
        model.rsample(3, 0.5)


def test_sampling_an_untrained_model_initializes_actnorm_from_the_latents():
    model = RealNVP(2, blocks=1, hidden=4)
    actnorm = next(m for m in model.modules() if isinstance(m, ActNorm))
    x, log_q = model.sample_and_log_prob(64)
    assert actnorm.is_initialized
    torch.testing.assert_close(log_q, model.log_prob(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bad", [-1, 1.5, True])
def test_bad_sample_counts(bad):
    model = RealNVP(2, blocks=1, hidden=4)
    with pytest.raises(ValueError, match="RealNVP: n should be"):
        model.rsample(bad)
    with pytest.raises(ValueError, match="RealNVP: n should be"):
        model.sample_and_log_prob(bad)
    with pytest.raises(ValueError, match="RealNVP: temperature should be"):
        model.rsample(2, temperature=-1.0)


def gaussian_mixture_log_prob(x, means, std):
    d = x[:, None, :] - means[None]
    log_components = -0.5 * (d / std).pow(2).sum(-1) - 2 * math.log(std) - math.log(2 * math.pi)
    return torch.logsumexp(log_components, dim=1) - math.log(len(means))


def test_reverse_kl_fit_of_a_two_component_mixture():
    """KL(q || p) = E_q[log q - log p] from the model's own samples and log-densities reaches
    below 0.05 nats on a mixture of two Gaussians (means (+-1, 0), std 0.5), both modes covered."""
    torch.manual_seed(0)
    means, std = torch.tensor([[-1.0, 0.0], [1.0, 0.0]]), 0.5
    model = RealNVP(2, blocks=6, hidden=32, mixing="reverse", actnorm=False)
    steps = 300
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(steps):
        x, log_q = model.sample_and_log_prob(256)
        loss = (log_q - gaussian_mixture_log_prob(x, means, std)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        schedule.step()
    with torch.no_grad():
        x, log_q = model.sample_and_log_prob(20000)
        kl = (log_q - gaussian_mixture_log_prob(x, means, std)).mean().item()
    assert kl < 0.05
    assert 0.4 < (x[:, 0] > 0).float().mean().item() < 0.6
