"""Subnets a memory-free chain must survive: one whose first layer works in place on the half it
reads (the caller's input is not silently overwritten: the chain refuses, as plain autograd does),
and one whose output does not depend on its input (gradients equal plain autograd's)."""

import pytest
import torch
from torch import nn

from invkernels.nn import AffineCoupling, InvertibleSequential, ReversibleBlock


def inplace_first(c_in, c_out):
    return nn.Sequential(nn.ReLU(inplace=True), nn.Linear(c_in, c_out))


class Constant(nn.Module):
    """A subnet whose output ignores its input: a fixed value, or a trained one."""

    def __init__(self, c_out, trained):
        super().__init__()
        self.c_out = c_out
        self.value = nn.Parameter(0.1 * torch.randn(c_out), requires_grad=trained)

    def forward(self, x):
        return self.value.to(x.dtype).expand(x.shape[0], self.c_out)


@pytest.mark.parametrize("block", ["coupling", "reversible"])
def test_an_inplace_subnet_is_refused_as_plain_autograd_refuses_it(block):
    torch.manual_seed(0)
    make = (lambda: AffineCoupling(6, inplace_first)) if block == "coupling" else \
        (lambda: ReversibleBlock(6, inplace_first))
    x = torch.randn(4, 6, dtype=torch.float64) - 0.5
    with pytest.raises(RuntimeError):
        InvertibleSequential(make(), memory_free=False).double()(x.clone().requires_grad_())
    model = InvertibleSequential(make(), memory_free=True).double()
    with pytest.raises(RuntimeError, match=r"block 0 \(\w+\) modified its input in place during the memory-free "
                                           r"forward .* nn\.ReLU\(inplace=True\)"):
        model(x.clone().requires_grad_())


@pytest.mark.parametrize("trained", [True, False], ids=["trained", "fixed"])
@pytest.mark.parametrize("block", ["coupling", "reversible"])
def test_a_subnet_that_ignores_its_input(block, trained):
    def chain(memory_free):
        torch.manual_seed(0)
        if block == "coupling":
            first = AffineCoupling(6, lambda c_in, c_out: Constant(c_out, trained))
        else:
            first = ReversibleBlock(6, f=Constant(3, trained), g=Constant(3, trained))
        return InvertibleSequential(first, AffineCoupling(6, "mlp", hidden=8), memory_free=memory_free).double()

    x = torch.randn(4, 6, dtype=torch.float64)
    grads = []
    for memory_free in (False, True):
        model = chain(memory_free)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.2 * torch.randn_like(p))
        leaf = x.clone().requires_grad_()
        y, logdet = model(leaf)
        (y.square().sum() + logdet.sum()).backward()
        grads.append([leaf.grad] + [p.grad for p in model.parameters() if p.requires_grad])
    for got, want in zip(grads[1], grads[0]):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_compiled_subnets_in_a_memory_free_chain():
    """Subnets compiled with AOT autograd run their compiled backward inside the chain's backward,
    where the autograd engine is entered directly (nn/subnets.py, vjp): gradients stay plain
    autograd's, and the chain's backward leaves the outer backward's state as it found it, for
    the compiled block whose backward runs after it."""
    def mlp(c_in, c_out):
        return torch.compile(nn.Sequential(nn.Linear(c_in, 8), nn.Tanh(), nn.Linear(8, c_out)), backend="aot_eager")

    def chain(memory_free):
        torch.manual_seed(0)
        first = InvertibleSequential(AffineCoupling(6, mlp), memory_free=False)
        blocks = [ReversibleBlock(6, mlp), AffineCoupling(6, mlp), ReversibleBlock(6, mlp)]
        return nn.ModuleList([first, InvertibleSequential(*blocks, memory_free=memory_free)]).double()

    torch._dynamo.reset()
    x = torch.randn(4, 6, dtype=torch.float64)
    grads = []
    for memory_free in (False, True):
        model = chain(memory_free)
        leaf = x.clone().requires_grad_()
        y, logdet_first = model[0](leaf)
        z, logdet = model[1](y)
        (z.square().sum() + (logdet + logdet_first).sum()).backward()
        in_tls = getattr(torch._C, "_is_key_in_tls", None)
        assert in_tls is None or not in_tls("context")
        grads.append([leaf.grad] + [p.grad for p in model.parameters()])
    assert all(g is not None for g in grads[1])
    for got, want in zip(grads[1], grads[0]):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
