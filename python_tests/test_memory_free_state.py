"""Memory-free backward and the state of the model: every tensor the rebuild reads is checked for
changes between forward and backward, and the rebuild itself changes nothing (buffers written by
train-mode subnets, version counters)."""

import pytest
import torch
from torch import nn

from invkernels import _state
from invkernels.nn import _memory_free
from invkernels.nn import AffineCoupling, InvConv1x1, InvertibleSequential, Split
from invkernels.nn.subnets import vjp


def bn_subnet(c_in, c_out):
    return nn.Sequential(nn.Conv2d(c_in, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, c_out, 3, padding=1))


def coupling_chain(subnet=bn_subnet):
    torch.manual_seed(0)
    model = InvertibleSequential(AffineCoupling(4, subnet), InvConv1x1(4), AffineCoupling(4, subnet)).double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def run(model, x):
    y, logdet = model(x)
    return (y.square().sum() + logdet.sum())


def test_frozen_parameter_changed_before_backward_is_an_error():
    model = coupling_chain()
    model[0].subnet[0].weight.requires_grad_(False)
    loss = run(model, torch.randn(2, 4, 5, 5, dtype=torch.float64))
    with torch.no_grad():
        model[0].subnet[0].weight.mul_(2)
    with pytest.raises(RuntimeError, match=r"parameter blocks\.0\.subnet\.0\.weight, needed to rebuild the "
                                           r"activations .* modified by an inplace operation"):
        loss.backward()


def test_buffer_changed_before_backward_is_an_error():
    model = coupling_chain()
    loss = run(model, torch.randn(2, 4, 5, 5, dtype=torch.float64))
    with torch.no_grad():
        model[1].sign.neg_()
    with pytest.raises(RuntimeError, match=r"buffer blocks\.1\.sign, needed to rebuild the activations"):
        loss.backward()


def test_parameter_replaced_before_backward_is_an_error():
    model = coupling_chain()
    loss = run(model, torch.randn(2, 4, 5, 5, dtype=torch.float64))
    model[1].log_s = nn.Parameter(model[1].log_s.detach() + 0.5)
    with pytest.raises(RuntimeError, match=r"parameter blocks\.1\.log_s, .* was replaced by another tensor"):
        loss.backward()


def test_submodule_replaced_before_backward_is_an_error():
    model = coupling_chain()
    loss = run(model, torch.randn(2, 4, 5, 5, dtype=torch.float64))
    model[2].subnet = bn_subnet(2, 4).double()
    with pytest.raises(RuntimeError, match=r"a submodule of block 2 \(AffineCoupling\) was replaced"):
        loss.backward()


def test_submodules_and_trainable_match_modules_and_parameters():
    shared = nn.Linear(3, 3)
    tree = nn.Sequential(shared, nn.Sequential(nn.ReLU(), shared, nn.Linear(3, 2)), nn.Identity())
    tree[1][2].bias.requires_grad_(False)
    tree.add_module("empty", None)
    assert _state.submodules(tree) == list(tree.modules())
    assert _state.submodules(shared) == [shared]
    got = _state.trainable(_state.submodules(tree))
    assert got == [p for p in tree.parameters() if p.requires_grad]


def test_vjp_equals_autograd_grad_and_reports_its_errors():
    torch.manual_seed(0)
    w = torch.randn(3, dtype=torch.float64, requires_grad=True)
    unused = torch.randn(3, dtype=torch.float64, requires_grad=True)
    x = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    h, k = torch.tanh(x * w), (x * w).sum(1)
    grads = [torch.randn_like(h), torch.randn_like(k)]
    want = torch.autograd.grad([h, k], [x, w, unused], grads, allow_unused=True, retain_graph=True)
    got = vjp([h, k], [x, w, unused], grads)
    assert got[2] is None
    assert all(torch.equal(a, b) for a, b in zip(got[:2], want[:2]))
    h = torch.tanh(x * w)
    with pytest.raises(RuntimeError, match="Mismatch in shape"):
        vjp([h], [x], [torch.ones(3, dtype=torch.float64)])


def test_batchnorm_statistics_are_updated_once_per_step_as_in_plain_autograd():
    x = torch.randn(4, 4, 5, 5, dtype=torch.float64)
    results = {}
    for memory_free in (True, False):
        model = coupling_chain()
        model.memory_free = memory_free
        loss = run(model, x)
        grads = torch.autograd.grad(loss, list(model.parameters()))
        results[memory_free] = (grads, {k: v.clone() for k, v in model.state_dict().items()})
    (free_grads, free_state), (plain_grads, plain_state) = results[True], results[False]
    assert free_state["blocks.0.subnet.1.num_batches_tracked"].item() == 1
    for key, value in plain_state.items():
        torch.testing.assert_close(free_state[key], value, rtol=1e-12, atol=1e-14, msg=key)
    for a, b in zip(free_grads, plain_grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_rebuild_leaves_the_version_counters_of_buffers():
    model = coupling_chain()
    loss = run(model, torch.randn(2, 4, 5, 5, dtype=torch.float64))
    versions = {name: buf._version for name, buf in model.named_buffers()}
    loss.backward()
    assert {name: buf._version for name, buf in model.named_buffers()} == versions


def test_inverse_through_split_is_an_error_naming_it():
    torch.manual_seed(1)
    model = InvertibleSequential(AffineCoupling(4, "conv", hidden=8), Split(4)).double()
    x = torch.randn(2, 4, 4, 4, dtype=torch.float64)
    with torch.no_grad():
        y, _ = model(x)
    with pytest.raises(ValueError, match=r"block 1 \(Split\) cannot be inverted from the chain's output"):
        model.inverse(y)


def test_scratch_buffers_copies_written_buffers_and_keeps_fixed_ones():
    from invkernels import _state  # noqa: PLC0415
    from invkernels.nn import ActNorm, Permute  # noqa: PLC0415

    block = nn.Sequential(nn.BatchNorm2d(4), Permute(4, "random"), InvConv1x1(4), ActNorm(4))
    before = {name: b for name, b in block.named_buffers()}
    with _state.scratch_buffers(block):
        inside = dict(block.named_buffers())
        block[0].running_mean.add_(1.0)
    for name, buf in before.items():
        fixed = name.startswith(("1.", "2.", "3."))
        assert (inside[name] is buf) == fixed, name
        assert dict(block.named_buffers())[name] is buf
    assert torch.equal(block[0].running_mean, torch.zeros(4))


def test_blocks_built_under_inference_mode_in_a_memory_free_chain():
    """Buffers made under torch.inference_mode have no version counter: the memory-free chain
    watches them without one, and the gradients are those of the same blocks built normally."""
    from invkernels.nn import Permute  # noqa: PLC0415

    torch.manual_seed(0)
    perm = torch.randperm(4)
    with torch.inference_mode():
        frozen = Permute(4, perm=perm)
    coupling = AffineCoupling(4, "conv", hidden=4).double()
    with torch.no_grad():
        for p in coupling.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    got = torch.autograd.grad(run(InvertibleSequential(coupling, frozen), x), [x, *coupling.parameters()])
    want = torch.autograd.grad(run(InvertibleSequential(coupling, Permute(4, perm=perm), memory_free=False), x),
                               [x, *coupling.parameters()])
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10)


def test_a_second_forward_before_backward_with_train_mode_batchnorm():
    """The second forward updates the running statistics, which a train-mode rebuild does not
    read (it normalizes with the batch's own): the first backward is exact, as in plain autograd.
    In eval mode the rebuild reads them, and an update in between is still an error."""
    x1, x2 = torch.randn(4, 4, 5, 5, dtype=torch.float64), torch.randn(4, 4, 5, 5, dtype=torch.float64)
    grads = {}
    for memory_free in (True, False):
        model = coupling_chain()
        model.memory_free = memory_free
        first = run(model, x1)
        run(model, x2)
        grads[memory_free] = torch.autograd.grad(first, list(model.parameters()))
    for a, b in zip(grads[True], grads[False]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)

    model = coupling_chain().eval()
    loss = run(model, x1)
    with torch.no_grad():
        model[0].subnet[1].running_var.mul_(2)
    with pytest.raises(RuntimeError, match=r"buffer blocks\.0\.subnet\.1\.running_var, needed to rebuild"):
        loss.backward()


def grads_of(model, x, memory_free: bool):
    """The gradients of ``run(model, x)`` (input first), the chain's blocks run memory-free or
    stored (plain autograd)."""
    chain = model if memory_free else InvertibleSequential(*model.blocks, memory_free=False)
    chain.zero_grad(set_to_none=True)
    leaf = x.clone().requires_grad_()
    run(chain, leaf).backward()
    grads = [leaf.grad] + [p.grad for p in chain.parameters()]
    chain.zero_grad(set_to_none=True)
    return grads


def assert_same_grads(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert (g is None) == (w is None)
        if g is not None:
            torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


def test_the_run_plan_is_reused_while_the_structure_holds_and_rebuilt_when_it_changes():
    """The walk over a memory-free run's modules is reused at the next step; replacing a subnet,
    freezing a parameter or switching a subnet to eval between steps builds it again, and the
    gradients stay those of plain autograd after each change."""
    model = coupling_chain(subnet=lambda c_in, c_out: nn.Sequential(nn.Conv2d(c_in, 8, 3, padding=1), nn.Tanh(),
                                                                    nn.Dropout(0.3), nn.Conv2d(8, c_out, 1)))
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    indices = (0, 1, 2)

    def plan():
        return _memory_free._PLANS[model][indices]

    def check_step():
        torch.manual_seed(1)
        got = grads_of(model, x, memory_free=True)
        torch.manual_seed(1)
        assert_same_grads(got, grads_of(model, x, memory_free=False))

    check_step()
    first = plan()
    check_step()
    assert plan() is first
    model[2].subnet[3] = nn.Conv2d(8, 4, 1).double()
    check_step()
    assert plan() is not first and any(m is model[2].subnet[3] for m in plan().flat)
    second = plan()
    model[0].subnet[0].weight.requires_grad_(False)
    check_step()
    assert plan() is not second and all(p is not model[0].subnet[0].weight for p in plan().params)
    third = plan()
    model[0].subnet.eval()
    check_step()
    assert plan() is not third


class LazyScale(nn.Module):
    """A subnet that registers a buffer in its first forward (a cache some user code keeps)."""

    def __init__(self, c_in, c_out):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 3, padding=1)

    def forward(self, a):
        if not hasattr(self, "scale"):
            self.register_buffer("scale", torch.full((1, a.shape[1], 1, 1), 0.5, dtype=a.dtype))
        return self.conv(a * self.scale)


def test_a_block_that_registers_a_buffer_in_its_forward_trains_with_exact_gradients():
    model = coupling_chain(subnet=LazyScale)
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    assert_same_grads(grads_of(model, x, memory_free=True), grads_of(model, x, memory_free=False))


def test_a_parameter_registered_before_backward_is_an_error():
    model = coupling_chain()
    loss = run(model, torch.randn(2, 4, 5, 5, dtype=torch.float64))
    model[0].subnet[0].register_parameter("extra", nn.Parameter(torch.zeros(1, dtype=torch.float64)))
    with pytest.raises(RuntimeError, match=r"the parameter blocks\.0\.subnet\.0\.extra was added to the modules of "
                                           r"the memory-free run between the forward and the backward"):
        loss.backward()


class RunningScale(nn.Module):
    """A subnet that keeps a running statistic in a buffer and updates it by assignment (a new
    tensor at every forward), as exponential moving averages are often written."""

    def __init__(self, c_in, c_out):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.register_buffer("running", torch.zeros(1))

    def forward(self, a):
        if self.training:
            self.running = 0.9 * self.running + 0.1 * a.detach().mean()
        return self.conv(a)


def test_a_subnet_that_reassigns_a_buffer_in_its_forward_trains_with_exact_gradients():
    model = coupling_chain(subnet=RunningScale)
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    for _ in range(2):
        assert_same_grads(grads_of(model, x, memory_free=True), grads_of(model, x, memory_free=False))


def test_a_subnet_shared_by_two_blocks_is_rebuilt_in_its_forward_mode_after_eval():
    torch.manual_seed(0)
    shared = nn.Sequential(nn.Linear(2, 8), nn.Dropout(0.5), nn.Tanh(), nn.Linear(8, 4))
    model = InvertibleSequential(AffineCoupling(4, lambda c_in, c_out: shared), InvConv1x1(4),
                                 AffineCoupling(4, lambda c_in, c_out: shared)).double()
    x = torch.randn(6, 4, dtype=torch.float64)
    grads = []
    for memory_free in (True, False):
        chain = model if memory_free else InvertibleSequential(*model.blocks, memory_free=False)
        chain.train()
        chain.zero_grad(set_to_none=True)
        torch.manual_seed(3)
        loss = run(chain, x)
        chain.eval()
        loss.backward()
        grads.append([p.grad.clone() for p in chain.parameters()])
    assert_same_grads(*grads)
    assert not shared.training


def test_a_parameter_frozen_in_the_forward_gets_no_gradient_when_unfrozen_before_backward():
    model = coupling_chain()
    frozen = model[0].subnet[0].weight
    frozen.requires_grad_(False)
    loss = run(model, torch.randn(2, 4, 5, 5, dtype=torch.float64))
    frozen.requires_grad_(True)
    loss.backward()
    assert frozen.grad is None and model[0].subnet[0].bias.grad is not None


def test_the_plans_of_runs_that_no_longer_exist_are_dropped():
    model = coupling_chain()
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    run(model, x).backward()
    assert list(_memory_free._PLANS[model]) == [(0, 1, 2)]
    model[1].memory_free_invertible = False  # block 1 now stores its activations: two memory-free runs
    run(model, x).backward()
    assert sorted(_memory_free._PLANS[model]) == [(0,), (2,)]
