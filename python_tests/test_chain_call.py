"""Blocks on halves (ReversibleBlock, the half-swap Permute) are entered through
``nn.Module.__call__`` whenever something waits there, in every mode of the chain: forward hooks
fire with the block's usual arguments and outputs, ``inversion.invert`` finds the layer, and
``block.compile()`` takes effect; gradients stay those of plain autograd."""

import pytest
import torch

from invkernels import inversion
from invkernels.nn import InvertibleSequential, Permute, ReversibleBlock


def chain(memory_free):
    torch.manual_seed(0)
    model = InvertibleSequential(ReversibleBlock(4, "mlp", hidden=8), Permute(4, "swap"),
                                 ReversibleBlock(4, "mlp", hidden=8, coupling="affine"), memory_free=memory_free)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return model.double()


@pytest.mark.parametrize("memory_free", [True, False], ids=["memory-free", "stored"])
@pytest.mark.parametrize("grad", [True, False], ids=["training", "no-grad"])
def test_hooks_of_blocks_on_halves_fire_with_their_usual_arguments(memory_free, grad):
    model = chain(memory_free)
    seen = []
    for i in (0, 1, 2):
        model[i].register_forward_hook(lambda m, args, out, i=i: seen.append((i, args[0].shape, out[0].shape,
                                                                               out[1].shape)))
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=grad)
    with torch.set_grad_enabled(grad):
        y, logdet = model(x)
    assert seen == [(i, (3, 4), (3, 4), (3,)) for i in (0, 1, 2)]
    if grad:
        (y.square().sum() + logdet.sum()).backward()
        want = torch.autograd.grad(sum(t.sum() for t in (chain(False)(x)[0].square(), chain(False)(x)[1])), x)[0]
        torch.testing.assert_close(x.grad, want, rtol=1e-10, atol=1e-12)


def test_invert_finds_a_reversible_block_inside_a_chain():
    model = chain(True)
    x0 = torch.randn(2, 4, dtype=torch.float64)
    result = inversion.invert(model, "blocks.0", x0=x0, steps=200, optimizer="lbfgs", lr=1.0, seed=0)
    assert result.feature_error.max() < 1e-6


def test_a_compiled_block_on_halves_is_run_compiled():
    from torch._dynamo.utils import counters  # noqa: PLC0415

    model = chain(True)
    torch._dynamo.reset()
    counters.clear()
    model[2].compile(backend="eager")
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    with torch.no_grad():
        want = chain(True)(x)
    y, logdet = model(x)
    assert counters["stats"]["calls_captured"] > 0
    torch.testing.assert_close(y, want[0])
    torch.testing.assert_close(logdet, want[1])
