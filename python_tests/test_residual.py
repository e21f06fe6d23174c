"""InvertibleResidual: the map only changes in a training forward, so its inverse and the memory-free
rebuild invert the map of the last forward; the fixed-point inverse's defaults and edge cases."""

import pytest
import torch
from torch import nn

from invkernels.nn import InvertibleResidual, InvertibleSequential


def mlp(d=6):
    return nn.Sequential(nn.Linear(d, 16), nn.ELU(), nn.Linear(16, d))


def block(dtype=torch.float64, **kwargs):
    torch.manual_seed(0)
    return InvertibleResidual(mlp(), lipschitz=0.9, **kwargs).to(dtype)


def snapshot(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def test_train_mode_inverse_inverts_the_last_forward_and_changes_nothing():
    m = block()
    x = torch.randn(4, 6, dtype=torch.float64)
    with torch.no_grad():
        y, _ = m(x)
    state = snapshot(m)
    x_back = m.inverse(y)
    for key, value in m.state_dict().items():
        assert torch.equal(value, state[key]), key
    torch.testing.assert_close(x_back, x, rtol=0, atol=1e-12)


def test_memory_free_gradients_equal_plain_autograd_in_train_mode():
    chain = InvertibleSequential(block(), block(logdet="exact"))
    start = snapshot(chain)
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    grads = {}
    for memory_free in (True, False):
        chain.load_state_dict(start)
        chain.memory_free = memory_free
        torch.manual_seed(5)
        y, logdet = chain(x)
        grads[memory_free] = torch.autograd.grad(y.square().sum() + logdet.sum(), [x, *chain.parameters()])
    for a, b in zip(grads[True], grads[False]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)


def test_a_training_forward_runs_the_power_iteration_once():
    m = block()
    (u_name, u), = [(n, b) for n, b in m.named_buffers() if n.endswith("_u")][:1]
    before = u.clone()
    m(torch.randn(2, 6, dtype=torch.float64))
    assert not torch.equal(u, before)
    m.eval()
    after = u.clone()
    m(torch.randn(2, 6, dtype=torch.float64))
    assert torch.equal(u, after), u_name


@pytest.mark.parametrize("kind", ["mlp", "conv"])
def test_default_tolerance_is_reached_in_float32(kind):
    torch.manual_seed(1)
    net = mlp() if kind == "mlp" else nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ELU(),
                                                     nn.Conv2d(8, 3, 3, padding=1))
    m = InvertibleResidual(net, lipschitz=0.9).eval()
    x = torch.randn(4, 6) if kind == "mlp" else torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        y, _ = m(x)
    x_back = m.inverse(y)
    assert m.last_inverse["residual"] <= 16 * torch.finfo(torch.float32).eps
    assert ((x_back - x).norm() / x.norm()).item() < 1e-5


def test_float32_memory_free_chain_trains():
    torch.manual_seed(2)
    chain = InvertibleSequential(InvertibleResidual(mlp()), InvertibleResidual(mlp()))
    x = torch.randn(5, 6, requires_grad=True)
    y, logdet = chain(x)
    (y.square().sum() - logdet.sum()).backward()
    assert x.grad is not None and bool(torch.isfinite(x.grad).all())


def test_tol_and_max_iter_are_attributes_the_rebuild_uses():
    m = block(max_iter=1)
    chain = InvertibleSequential(m)
    y, logdet = chain(torch.randn(2, 6, dtype=torch.float64, requires_grad=True))
    with pytest.raises(RuntimeError, match="did not converge: .* after 1 iterations"):
        (y.sum() + logdet.sum()).backward()
    m.max_iter = None
    y, logdet = chain(torch.randn(2, 6, dtype=torch.float64, requires_grad=True))
    (y.sum() + logdet.sum()).backward()


def test_all_zero_sample():
    m = block().eval()
    x = torch.randn(3, 6, dtype=torch.float64)
    with torch.no_grad():
        y, _ = m(x)
    y[1] = 0
    x_back = m.inverse(y)
    with torch.no_grad():
        torch.testing.assert_close(x_back + m.g(x_back), y, rtol=0, atol=1e-13)


def test_empty_batch():
    m = block().eval()
    empty = m.inverse(torch.zeros(0, 6, dtype=torch.float64))
    assert empty.shape == (0, 6)
    assert m.last_inverse == {"iterations": 0, "residual": 0.0}


def test_bad_arguments():
    with pytest.raises(ValueError, match="tol should be a positive number or None, got 0"):
        InvertibleResidual(mlp(), tol=0)
    with pytest.raises(ValueError, match="max_iter should be a positive integer, got True"):
        InvertibleResidual(mlp(), max_iter=True)
    with pytest.raises(ValueError, match="lipschitz should be in"):
        InvertibleResidual(mlp(), lipschitz=1.0)
