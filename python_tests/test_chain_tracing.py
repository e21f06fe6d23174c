"""Chains with any Permute trace: ``torch.compile(fullgraph=True)`` and ``torch.export`` of a
RealNVP with reversing permutations and of a chain with a half swap (bookkeeping on halves) give
the eager results; eagerly, a permutation edited in place is still seen."""

import torch

from invkernels.models import RealNVP
from invkernels.nn import AffineCoupling, InvertibleSequential, Permute


def test_realnvp_with_permutations_compiles_fullgraph():
    torch.manual_seed(0)
    model = RealNVP(4, blocks=2, hidden=8, mixing="reverse")
    x = torch.randn(3, 4)
    with torch.no_grad():
        want = model.log_prob(x)
        torch._dynamo.reset()
        got = torch.compile(model.log_prob, fullgraph=True)(x)
    torch.testing.assert_close(got, want)


def test_a_chain_with_a_half_swap_and_a_reversal_exports():
    torch.manual_seed(0)
    chain = InvertibleSequential(AffineCoupling(4, "mlp", hidden=8), Permute(4, "swap"),
                                 AffineCoupling(4, "mlp", hidden=8), Permute(4), memory_free=False)
    x = torch.randn(3, 4)
    program = torch.export.export(chain, (x,))
    for got, want in zip(program.module()(x), chain(x)):
        torch.testing.assert_close(got, want)


def test_an_edited_permutation_is_seen_eagerly():
    layer = Permute(4, "swap")
    assert layer.split_channels == 2
    with torch.no_grad():
        layer.perm.copy_(torch.tensor([3, 2, 1, 0]))
        layer.inverse_perm.copy_(torch.tensor([3, 2, 1, 0]))
    assert layer.split_channels is None
