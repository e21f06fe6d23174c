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


def test_the_blocks_the_chain_trusts_return_what_it_would_check():
    """The classes that set ``results_tested`` are not checked by the chain (``checked_result``):
    their memory-free backward returns tensors in the output's dtype and shape, in float64 and
    float32, on whole tensors and on halves."""
    from invkernels.nn import GlowStep, RQSplineCoupling  # noqa: PLC0415
    from invkernels.nn.protocol import checked_result  # noqa: PLC0415

    torch.manual_seed(0)
    blocks = [ActNorm(4), AdditiveCoupling(4, "mlp"), AffineCoupling(4, "mlp"), InvConv1x1(4), Permute(4, "swap"),
              ReversibleBlock(4, "mlp"), RQSplineCoupling(4, "mlp"), GlowStep(4, hidden=8), Squeeze()]
    import invkernels.nn  # noqa: PLC0415

    declared = {cls for cls in vars(invkernels.nn).values() if isinstance(cls, type) and "results_tested" in vars(cls)}
    assert declared == {type(b) for b in blocks}
    untrusted = object()  # checked_result checks every result of a block of another class
    for dtype in (torch.float64, torch.float32):
        for block in blocks:
            block = block.to(dtype)
            shape = (3, 4, 4, 4) if isinstance(block, (GlowStep, Squeeze)) else (3, 4)
            x = torch.randn(shape, dtype=dtype)
            with torch.no_grad():
                y, logdet = block(x)
            grad_y, grad_logdet = torch.randn_like(y), torch.randn_like(logdet)
            checked_result(0, untrusted, "inverse_backward", block.inverse_backward(y, grad_y, grad_logdet), 3,
                           (y,), False)
            if isinstance(block, BlockOnHalves):
                halves, grads = y.split([2, 2], dim=1), grad_y.split([2, 2], dim=1)
                checked_result(0, untrusted, "inverse_backward_split",
                               block.inverse_backward_split(*halves, *grads, grad_logdet), 5, halves, True)
