"""The block protocol written once (invkernels.nn.protocol): every block of the package satisfies
it, and the third-party example of docs/memory.md ("Writing a block") runs and trains with the
gradients of plain autograd."""

import os
import re

import torch

from invkernels.nn import (ActNorm, AdditiveCoupling, AffineCoupling, BlockOnHalves, FusedInverseBackward, InvConv1x1,
                           InvertibleBlock, InvertibleSequential, Permute, ReversibleBlock, Squeeze)

DOCS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "memory.md")


def writing_a_block_example() -> str:
    text = open(DOCS, encoding="utf-8").read()
    section = text[text.index("## Writing a block"):]
    return re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)


def test_the_package_blocks_satisfy_the_protocol():
    blocks = [ActNorm(4), AdditiveCoupling(4, "mlp"), AffineCoupling(4, "mlp"), InvConv1x1(4), Permute(4, "swap"),
              ReversibleBlock(4, "mlp"), Squeeze()]
    for block in blocks:
        assert isinstance(block, InvertibleBlock) and isinstance(block, FusedInverseBackward), type(block).__name__
    assert isinstance(ReversibleBlock(4, "mlp"), BlockOnHalves) and isinstance(Permute(4, "swap"), BlockOnHalves)
    assert not isinstance(AffineCoupling(4, "mlp"), BlockOnHalves)


def test_the_documented_block_runs_and_gives_plain_autograd_gradients():
    namespace = {}
    torch.manual_seed(0)
    exec(compile(writing_a_block_example(), DOCS, "exec"), namespace)
    model, x = namespace["model"], namespace["x"]
    assert x.grad is not None and all(p.grad is not None for p in model.parameters())
    stored = InvertibleSequential(*model.blocks, memory_free=False)
    got = [x.grad.clone()] + [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    leaf = x.detach().clone().requires_grad_()
    y, logdet = stored(leaf)
    (y.square().sum() - logdet.sum()).backward()
    want = [leaf.grad] + [p.grad for p in stored.parameters()]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def test_optional_attributes_are_read_from_the_instance_and_its_class():
    """``memory_free_invertible`` and ``split_channels`` count wherever a block defines them: on its
    class, on the instance (set in ``__init__``), on the module a wrapper forwards to, or not at all
    (the defaults)."""
    from invkernels.nn.protocol import memory_free_capable, split_of  # noqa: PLC0415

    coupling = AffineCoupling(4, "mlp")
    assert memory_free_capable(coupling) and split_of(coupling) is None
    coupling.memory_free_invertible = False
    assert not memory_free_capable(coupling)

    class OnHalves(ReversibleBlock):
        memory_free_invertible = False

    assert not memory_free_capable(OnHalves(4, "mlp")) and split_of(OnHalves(4, "mlp")) == 2
    # torch.compile's wrapper forwards attribute reads to the module it compiles.
    compiled = torch.compile(OnHalves(4, "mlp"), backend="eager")
    assert not memory_free_capable(compiled) and split_of(compiled) == 2
    class Halves(torch.nn.Module):
        def __init__(self, c1):
            super().__init__()
            self.split_channels = c1

        def forward_split(self, x1, x2):
            return x1, x2, None

    assert split_of(ReversibleBlock(6, "mlp")) == 3 and split_of(Halves(2)) == 2
    assert split_of(Halves(True)) is None and split_of(Halves(None)) is None
