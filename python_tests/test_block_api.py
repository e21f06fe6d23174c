"""One module API for every block, container and model: ``forward(x, context=None) -> (y, logdet)``
and ``inverse(y, context=None, return_logdet=False)``, the inverse's log-det minus the forward's;
the blocks that do not use a context accept and ignore it (a chain passes them none); the
couplings' positional order ``(channels, subnet, ...)`` with everything after keyword-only, so a
width given where the subnet goes is a TypeError naming ``hidden``."""

import pytest
import torch
from torch import nn

from invkernels.models import Glow, NeuralSplineFlow, RealNVP
from invkernels.nn import (
    ActNorm,
    AdditiveCoupling,
    AffineCoupling,
    GlowStep,
    InvConv1x1,
    InvertibleResidual,
    InvertibleSequential,
    Permute,
    ReversibleBlock,
    RQSplineCoupling,
    Squeeze,
)

F64 = torch.float64


def randomized(module):
    """Parameters moved off their identity initialization (an InvertibleResidual's left as built:
    its spectral norms hold for those), ActNorms marked initialized, float64, eval mode."""
    contractive = {id(p) for m in module.modules() if isinstance(m, InvertibleResidual) for p in m.parameters()}
    with torch.no_grad():
        for p in module.parameters():
            if id(p) not in contractive:
                p.add_(0.1 * torch.randn_like(p))
    for m in module.modules():
        if isinstance(m, ActNorm):
            m.mark_initialized()
    return module.double().eval()


def residual(c):
    return InvertibleResidual(nn.Sequential(nn.Conv2d(c, 8, 3, padding=1), nn.ELU(), nn.Conv2d(8, c, 3, padding=1)),
                              logdet="exact")


BLOCKS = {
    "ActNorm": lambda: ActNorm(4),
    "InvConv1x1": lambda: InvConv1x1(4),
    "Permute": lambda: Permute(4, "random"),
    "Squeeze": lambda: Squeeze(),
    "InvertibleResidual": lambda: residual(4),
    "AffineCoupling": lambda: AffineCoupling(4, "conv", hidden=8),
    "AdditiveCoupling": lambda: AdditiveCoupling(4, "conv", hidden=8),
    "RQSplineCoupling": lambda: RQSplineCoupling(4, "conv", hidden=8, bins=3),
    "GlowStep": lambda: GlowStep(4, hidden=8),
    "ReversibleBlock": lambda: ReversibleBlock(4, "conv", hidden=8, coupling="affine"),
    "InvertibleSequential": lambda: InvertibleSequential(ActNorm(4), AffineCoupling(4, "conv", hidden=8),
                                                         Permute(4, "reverse")),
}


@pytest.mark.parametrize("name", sorted(BLOCKS))
def test_every_block_takes_context_and_returns_the_inverse_logdet(name):
    torch.manual_seed(0)
    block = randomized(BLOCKS[name]())
    x = torch.randn(2, 4, 4, 4, dtype=F64)
    y, logdet = block(x, context=None)
    x_back, inverse_logdet = block.inverse(y, context=None, return_logdet=True)
    torch.testing.assert_close(x_back, x, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(inverse_logdet, -logdet, rtol=1e-9, atol=1e-9)
    assert inverse_logdet.shape == (2,) and inverse_logdet.dtype == F64
    torch.testing.assert_close(block.inverse(y), x_back, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["ActNorm", "InvConv1x1", "Permute", "Squeeze", "InvertibleResidual"])
def test_blocks_without_a_context_ignore_one_and_a_chain_passes_them_none(name):
    """A context handed to a block that has no use for it changes nothing; in a chain beside a
    conditional coupling, the chain gives it to the coupling only (memory-free gradients of the
    context equal stored ones)."""
    torch.manual_seed(1)
    block = randomized(BLOCKS[name]())
    x = torch.randn(2, 4, 4, 4, dtype=F64)
    context = torch.randn(2, 3, 4, 4, dtype=F64)
    for got, want in zip(block(x, context=context), block(x)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    if name == "Squeeze":
        return
    chain = randomized(InvertibleSequential(block, AffineCoupling(4, "conv", hidden=8, context_channels=3)))
    context.requires_grad_()
    grads = {}
    for memory_free in (True, False):
        chain.memory_free = memory_free
        y, logdet = chain(x.requires_grad_(), context)
        grads[memory_free] = torch.autograd.grad(y.square().sum() + logdet.sum(), [x, context])
    for got, want in zip(grads[True], grads[False]):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    x_back, inverse_logdet = chain.inverse(y.detach(), context.detach(), return_logdet=True)
    torch.testing.assert_close(x_back, x.detach(), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(inverse_logdet, -logdet.detach(), rtol=1e-9, atol=1e-9)


class UserScale(nn.Module):
    """A user block whose inverse has no return_logdet."""

    def __init__(self):
        super().__init__()
        self.log_s = nn.Parameter(torch.tensor([0.3, -0.2, 0.1, 0.5]))

    def forward(self, x):
        return x * self.log_s.exp().view(1, -1, 1, 1), (self.log_s.sum() * x[0, 0].numel()).expand(x.shape[0])

    def inverse(self, y):
        return y * (-self.log_s).exp().view(1, -1, 1, 1)


def test_a_chain_inverse_logdet_through_a_block_whose_inverse_has_none():
    torch.manual_seed(2)
    chain = randomized(InvertibleSequential(UserScale(), AffineCoupling(4, "conv", hidden=8)))
    x = torch.randn(3, 4, 2, 2, dtype=F64)
    y, logdet = chain(x)
    x_back, inverse_logdet = chain.inverse(y, return_logdet=True)
    torch.testing.assert_close(x_back, x, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(inverse_logdet, -logdet, rtol=1e-12, atol=1e-12)


def test_glow_inverse_logdet_is_that_of_the_dense_jacobian_of_the_inverse():
    """Glow's inverse log-det is ``log |det dx/dz|`` (the factored-out halves' priors are not part
    of the map), taken here densely by autograd."""
    torch.manual_seed(3)
    model = randomized(Glow((1, 4, 4), levels=2, steps=1, hidden=8, prior="learned"))
    z = torch.randn(2, 16, dtype=F64)
    x, logdet = model.inverse(z, return_logdet=True)
    torch.testing.assert_close(x, model.inverse(z), rtol=0, atol=0)
    for b in range(2):
        jac = torch.autograd.functional.jacobian(lambda v: model.inverse(v.view(1, 16)).flatten(), z[b])
        torch.testing.assert_close(logdet[b], torch.linalg.slogdet(jac).logabsdet, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("make", [lambda: RealNVP(4, blocks=2, hidden=8),
                                  lambda: NeuralSplineFlow(4, blocks=2, hidden=8),
                                  lambda: NeuralSplineFlow(4, blocks=2, hidden=8, context_features=2)])
def test_vector_models_inverse_logdet(make):
    torch.manual_seed(4)
    model = randomized(make())
    x = torch.randn(3, 4, dtype=F64)
    context = torch.randn(3, 2, dtype=F64) if getattr(model, "context_features", 0) else None
    z, logdet = model(x, context)
    x_back, inverse_logdet = model.inverse(z, context, return_logdet=True)
    torch.testing.assert_close(x_back, x, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(inverse_logdet, -logdet, rtol=1e-9, atol=1e-9)


def test_unconditional_models_refuse_a_context():
    c = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="RealNVP: the model is unconditional, so context should be None"):
        RealNVP(4, blocks=1, hidden=8)(torch.zeros(2, 4), c)
    with pytest.raises(ValueError, match="Glow: the model is unconditional, so context should be None"):
        Glow((1, 4, 4), levels=1, steps=1, hidden=8).inverse(torch.zeros(2, 16), c)


@pytest.mark.parametrize("cls", [GlowStep, AffineCoupling, AdditiveCoupling, RQSplineCoupling, ReversibleBlock])
def test_a_width_where_the_subnet_goes_is_a_type_error_naming_hidden(cls):
    with pytest.raises(TypeError, match=rf"{cls.__name__}: subnet should be .* got the number 512; the subnet's "
                                        rf"width is the keyword argument hidden=512"):
        cls(4, 512)
    with pytest.raises(TypeError, match="positional"):
        cls(4, "conv", 8)
    assert isinstance(GlowStep(4, "mlp", hidden=8).coupling.subnet, nn.Module)


CONDITIONAL = {
    "AffineCoupling": lambda: AffineCoupling(4, "conv", hidden=8, context_channels=3),
    "RQSplineCoupling": lambda: RQSplineCoupling(4, "conv", hidden=8, bins=3, context_channels=3),
    "ReversibleBlock": lambda: ReversibleBlock(4, "conv", hidden=8, coupling="affine", context_channels=3),
    "GlowStep": lambda: GlowStep(4, hidden=8, context_channels=3),
}


@pytest.mark.parametrize("name", sorted(CONDITIONAL))
def test_a_vector_or_unbatched_context_is_tiled_over_positions_and_batch(name):
    """A context of shape [B, Cc] (one vector per sample) is the same as that vector at every
    position, one of shape [Cc] or [1, Cc, H, W] the same for every sample; in a chain, memory-free
    gradients of the small context equal stored ones and the tiled context's summed."""
    torch.manual_seed(5)
    block = randomized(CONDITIONAL[name]())
    x = torch.randn(2, 4, 3, 3, dtype=F64)
    vector = torch.randn(2, 3, dtype=F64)
    tiled = vector[:, :, None, None].expand(2, 3, 3, 3).contiguous()
    one = tiled[:1].expand(2, -1, -1, -1)
    for small, full in ((vector, tiled), (vector[0], one), (tiled[:1], one)):
        for got, want in zip(block(x, context=small), block(x, context=full)):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
        y = block(x, context=small)[0]
        torch.testing.assert_close(block.inverse(y, context=small), block.inverse(y, context=full), rtol=0, atol=0)
    chain = InvertibleSequential(block, ActNorm(4, data_init=False).double())
    grads = {}
    for memory_free, context in ((True, vector), (False, vector), (False, tiled)):
        chain.memory_free = memory_free
        leaf = context.clone().requires_grad_()
        y, logdet = chain(x.clone().requires_grad_(), leaf)
        grads[memory_free, context.dim()] = torch.autograd.grad(y.sin().sum() + logdet.sum(), leaf)[0]
    torch.testing.assert_close(grads[True, 2], grads[False, 2], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grads[False, 2], grads[False, 4].sum((2, 3)), rtol=1e-10, atol=1e-12)


def test_a_context_of_another_shape_names_the_forms_it_takes():
    layer = AffineCoupling(4, "conv", hidden=8, context_channels=3)
    x = torch.randn(2, 4, 3, 3)
    forms = (r"context should have shape \[2, 3, 3, 3\], \[2, 3\] \(one vector per sample, tiled over the "
             r"positions\) or \[3\] \(one for all\); a batch of 1 broadcasts; got ")
    wrong = (torch.randn(2, 4), torch.randn(3, 3), torch.randn(4), torch.randn(2, 3, 3, 4), torch.randn(2, 3, 1))
    for context in wrong:
        with pytest.raises(ValueError, match=rf"AffineCoupling: {forms}\[{', '.join(map(str, context.shape))}\]"):
            layer(x, context=context)
    vector_layer = AffineCoupling(4, "mlp", hidden=8, context_channels=3)
    with pytest.raises(ValueError, match=r"shape \[2, 3\] or \[3\] \(one for all\); .* \[2, 3, 1\]"):
        vector_layer(torch.randn(2, 4), context=torch.randn(2, 3, 1))
    y, _ = vector_layer(torch.randn(2, 4), context=torch.ones(3))
    assert y.shape == (2, 4) and bool(torch.isfinite(y).all())
