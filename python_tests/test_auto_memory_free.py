"""``memory_free="auto"``: the rule that picks memory-free or stored per forward, and
``invkernels.diagnostics.saved_bytes``, which shows what a step keeps either way."""

import pytest
import torch

from invkernels import diagnostics
from invkernels.models import Glow, NeuralSplineFlow, RealNVP
from invkernels.nn import AffineCoupling, InvertibleSequential, Permute, Split
from invkernels.nn.sequential import AUTO_MEMORY_FREE_BYTES


def chain(memory_free="auto", features=8, blocks=3, dtype=torch.float64):
    torch.manual_seed(3)
    layers = []
    for _ in range(blocks):
        coupling = AffineCoupling(features, hidden=16)
        torch.nn.init.normal_(coupling.subnet[-1].weight, std=0.1)
        layers += [Permute(features, "random"), coupling]
    return InvertibleSequential(*layers, memory_free=memory_free).to(dtype)


def grads(model, x):
    leaf = x.detach().requires_grad_()
    y, logdet = model(leaf)
    return torch.autograd.grad(y.square().sum() - logdet.sum(), [leaf, *model.parameters()])


def test_auto_is_the_default_of_chains_and_models():
    assert InvertibleSequential(Permute(4)).memory_free == "auto"
    assert RealNVP(4, blocks=1, hidden=8).flow.memory_free == "auto"
    assert NeuralSplineFlow(4, blocks=1, hidden=8).flow.memory_free == "auto"
    assert all(f.memory_free == "auto" for f in Glow((1, 4, 4), levels=2, steps=1, hidden=4).flows)
    assert "memory_free='auto'" in repr(InvertibleSequential(Permute(4)))


@pytest.mark.parametrize("bad", [None, "yes", 1, "Auto"])
def test_memory_free_accepts_true_false_or_auto(bad):
    with pytest.raises(ValueError, match=f"InvertibleSequential: memory_free should be True, False or 'auto', "
                                         f"got {bad!r}"):
        InvertibleSequential(Permute(4), memory_free=bad)
    with pytest.raises(ValueError, match="RealNVP: memory_free should be"):
        RealNVP(4, blocks=1, hidden=8, memory_free=bad)


def test_the_rule_is_input_bytes_times_blocks_that_can_be_rebuilt():
    model = chain()
    x = torch.randn(4, 8, dtype=torch.float64)
    per_step = x.numel() * x.element_size() * len(model)
    model.auto_memory_free_bytes = per_step
    assert model.runs_memory_free(x)
    model.auto_memory_free_bytes = per_step + 1
    assert not model.runs_memory_free(x)
    assert model.runs_memory_free(torch.randn(5, 8, dtype=torch.float64))
    # Blocks that cannot be rebuilt from the chain's output do not count.
    with_split = InvertibleSequential(*chain().blocks, Split(8), memory_free="auto")
    with_split.auto_memory_free_bytes = per_step
    assert with_split.runs_memory_free(x)
    with_split.auto_memory_free_bytes = per_step + 1
    assert not with_split.runs_memory_free(x)
    # The package's threshold: a tabular batch is stored, a Glow-sized activation is not.
    model.auto_memory_free_bytes = AUTO_MEMORY_FREE_BYTES
    assert not model.runs_memory_free(torch.empty(512, 8, device="meta"))
    assert model.runs_memory_free(torch.empty(64, 8, 32 * 32, 32, device="meta"))
    for fixed in (True, False):
        model.memory_free = fixed
        assert model.runs_memory_free(x) is fixed


def test_auto_stores_below_the_threshold_and_rebuilds_above_with_the_same_gradients():
    x = torch.randn(4, 8, dtype=torch.float64)
    model = chain()
    per_step = x.numel() * x.element_size() * len(model)
    reference = grads(chain(False), x)
    seen = {}
    for threshold in (per_step + 1, per_step):
        model.auto_memory_free_bytes = threshold
        seen[threshold] = diagnostics.saved_bytes(model, x).current
        for got, want in zip(grads(model, x), reference):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    measured = diagnostics.saved_bytes(model, x)
    assert seen[per_step + 1] == measured.stored
    assert seen[per_step] == measured.memory_free


def test_saved_bytes_measures_both_modes_and_leaves_the_model_as_it_was():
    model = chain(blocks=6, dtype=torch.float32)
    x = torch.randn(32, 8)
    state = torch.get_rng_state()
    report = diagnostics.saved_bytes(model, x)
    assert torch.equal(torch.get_rng_state(), state)
    assert model.memory_free == "auto"
    # Memory-free keeps the chain's output; stored keeps every block's activations.
    y, _ = model(x)
    assert report.memory_free == y.numel() * y.element_size()
    assert report.stored > 6 * report.memory_free
    assert report.current == report.memory_free  # the tests run "auto" memory-free (conftest.py)
    assert "memory-free 0.001 MiB" in str(report)


def test_saved_bytes_does_not_initialize_actnorm():
    model = RealNVP(4, blocks=1, hidden=8)
    with pytest.raises(ValueError, match="saved_bytes: the model's ActNorm layers are not initialized"):
        diagnostics.saved_bytes(model.flow, torch.randn(3, 4))
    with pytest.raises(TypeError, match="saved_bytes: x should be a tensor"):
        diagnostics.saved_bytes(model.flow, [1.0])
