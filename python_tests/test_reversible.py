"""ReversibleBlock: the two-sided coupling of RevNet / MemCNN / FrEIA's GLOW and RNVP blocks."""

import pytest
import torch
from torch import nn

from invkernels.nn import InvertibleSequential, ReversibleBlock, mlp_subnet
from invkernels.reference.coupling import log_scale
from test_sequential import assert_grads_match

COUPLINGS = ["additive", "affine"]


def randomized(block, std=0.3):
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(std * torch.randn_like(p))
    return block


def grads_of(model, x, context, g, gl, memory_free):
    model.memory_free = memory_free
    y, logdet = model(x, context=context)
    loss = (y * g).sum() + (logdet * gl).sum()
    return (y, logdet), torch.autograd.grad(loss, [x, context, *model.parameters()])


def mlp_block(c, coupling, context_channels=0, **kwargs):
    block = ReversibleBlock(c, mlp_subnet(hidden=8, layers=1), coupling=coupling,
                            context_channels=context_channels, **kwargs)
    return randomized(block.double())


@pytest.mark.parametrize("channels", [4, 5])
@pytest.mark.parametrize("coupling", COUPLINGS)
def test_forward_is_the_two_half_steps_with_the_given_modules(coupling, channels):
    """y1 = x1 (*) f(x2), y2 = x2 (*) g(y1), with f: C - C//2 -> C//2 and g: C//2 -> C - C//2."""
    c1, c2 = channels // 2, channels - channels // 2
    per = 2 if coupling == "affine" else 1
    f, g = nn.Linear(c2, per * c1).double(), nn.Linear(c1, per * c2).double()
    block = ReversibleBlock(channels, coupling=coupling, f=f, g=g, scale="sigmoid" if coupling == "affine" else "exp")
    x = torch.randn(3, channels, dtype=torch.float64)
    x1, x2 = x[:, :c1], x[:, c1:]

    def step(a, h):
        if coupling == "additive":
            return a + h, torch.zeros(3, dtype=torch.float64)
        hs, t = h.chunk(2, dim=1)
        ls = log_scale(hs, "sigmoid")
        return a * ls.exp() + t, ls.sum(1)

    y1, l1 = step(x1, f(x2))
    y2, l2 = step(x2, g(y1))
    y, logdet = block(x)
    torch.testing.assert_close(y, torch.cat([y1, y2], 1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(logdet, l1 + l2, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("channels", [2, 5, 6])
@pytest.mark.parametrize("coupling", COUPLINGS)
def test_inverse_and_logdet_of_the_dense_jacobian(coupling, channels):
    torch.manual_seed(channels)
    block = mlp_block(channels, coupling, context_channels=2)
    x = torch.randn(2, channels, dtype=torch.float64)
    context = torch.randn(2, 2, dtype=torch.float64)
    y, logdet = block(x, context)
    back, logdet_inv = block.inverse(y, context, return_logdet=True)
    torch.testing.assert_close(back, x, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(logdet_inv, -logdet, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(block.inverse(y, context), back)
    for b in range(2):
        jac = torch.autograd.functional.jacobian(lambda v: block(v[None], context[b:b + 1])[0][0], x[b])
        sign, expected = torch.linalg.slogdet(jac)
        assert sign > 0
        torch.testing.assert_close(logdet[b], expected, rtol=1e-10, atol=1e-10)
    if coupling == "additive":
        assert torch.equal(logdet, torch.zeros_like(logdet))


def test_default_conv_subnets_start_as_the_identity():
    block = ReversibleBlock(6, hidden=8, coupling="affine")
    x = torch.randn(2, 6, 4, 4)
    y, logdet = block(x)
    assert torch.equal(y, x) and torch.equal(logdet, torch.zeros(2))
    assert [n for n, _ in block.named_children()] == ["f", "g"]


@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
@pytest.mark.parametrize("depth", [1, 8, 64])
@pytest.mark.parametrize("coupling", COUPLINGS)
def test_memory_free_gradients_equal_plain_autograd(coupling, depth, dtype, rtol):
    torch.manual_seed(depth)
    model = InvertibleSequential(*[randomized(ReversibleBlock(5, "conv", hidden=4, coupling=coupling,
                                                              context_channels=1), std=0.1)
                                   for _ in range(depth)]).to(dtype)
    x = torch.randn(2, 5, 4, 4, dtype=dtype, requires_grad=True)
    context = torch.randn(2, 1, 4, 4, dtype=dtype, requires_grad=True)
    with torch.no_grad():
        y, logdet = model(x, context=context)
    g, gl = torch.randn_like(y), torch.randn_like(logdet)
    out_free, free = grads_of(model, x, context, g, gl, True)
    out_plain, plain = grads_of(model, x, context, g, gl, False)
    assert torch.equal(out_free[0], out_plain[0]) and torch.equal(out_free[1], out_plain[1])
    assert len(free) == 2 + len(list(model.parameters()))
    assert_grads_match(free, plain, rtol)


@pytest.mark.parametrize("coupling", COUPLINGS)
def test_memory_free_backward_runs_each_subnet_once_with_grad(coupling):
    block = mlp_block(5, coupling)
    model = InvertibleSequential(block)
    calls = []
    for label in ("f", "g"):
        getattr(block, label).register_forward_hook(
            lambda m, i, o, label=label: calls.append((label, torch.is_grad_enabled())))
    x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    y, logdet = model(x)
    assert sorted(calls) == [("f", False), ("g", False)]
    calls.clear()
    (y.square().sum() + logdet.sum()).backward()
    assert sorted(calls) == [("f", True), ("g", True)]


def test_bad_arguments():
    with pytest.raises(ValueError, match="coupling should be 'additive' or 'affine', got 'nice'"):
        ReversibleBlock(4, coupling="nice")
    with pytest.raises(ValueError, match="channels should be"):
        ReversibleBlock(1)
    with pytest.raises(ValueError, match="f and g should be given together, got only f"):
        ReversibleBlock(4, f=nn.Identity())
    with pytest.raises(ValueError, match="g should be an nn.Module, got function"):
        ReversibleBlock(4, f=nn.Identity(), g=lambda v: v)
    with pytest.raises(ValueError, match="hidden applies to the subnets built from subnet="):
        ReversibleBlock(4, f=nn.Identity(), g=nn.Identity(), hidden=8)
    with pytest.raises(ValueError, match="scale and clamp apply to coupling='affine'"):
        ReversibleBlock(4, coupling="additive", scale="sigmoid")
    with pytest.raises(ValueError, match="clamp should be a positive finite number, got -1"):
        ReversibleBlock(4, coupling="affine", clamp=-1)
    block = ReversibleBlock(4, "mlp", hidden=4)
    with pytest.raises(ValueError, match=r"x should have shape \[B, 4, ...\], got \[2, 3\]"):
        block(torch.randn(2, 3))
    with pytest.raises(ValueError, match="subnet='mlp' expects 2-D inputs"):
        block(torch.randn(2, 4, 3, 3))
    bad = ReversibleBlock(4, f=nn.Linear(2, 3), g=nn.Linear(2, 2))
    with pytest.raises(ValueError, match=r"the subnet output should have shape \[2, 2\], got \[2, 3\]"):
        bad(torch.randn(2, 4))
