"""The memory-free rebuild replays what the forward did, per subnet call: the RNG state before each
call (dropout in both subnets of a two-sided block), the train/eval flags of every submodule (a
validation pass between forward and backward), the autocast state including "off" (a backward run
inside autocast). Gradients equal plain autograd's."""

import pytest
import torch
from torch import nn

from invkernels.nn import AffineCoupling, InvertibleSequential, ReversibleBlock


def dropout_mlp(c_in, c_out):
    return nn.Sequential(nn.Linear(c_in, 16), nn.Tanh(), nn.Dropout(0.3), nn.Linear(16, c_out), nn.Dropout(0.2))


def batchnorm_mlp(c_in, c_out):
    return nn.Sequential(nn.Linear(c_in, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Linear(16, c_out))


def randomized(model, std=0.3):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(std * torch.randn_like(p))
    return model


def reversible_chain(coupling, memory_free, subnet=dropout_mlp, depth=3):
    torch.manual_seed(1)
    blocks = [ReversibleBlock(6, subnet, coupling=coupling) for _ in range(depth)]
    return randomized(InvertibleSequential(*blocks, memory_free=memory_free).double())


def coupling_chain(memory_free, subnet=dropout_mlp):
    torch.manual_seed(1)
    return randomized(InvertibleSequential(AffineCoupling(6, subnet), ReversibleBlock(6, subnet),
                                           AffineCoupling(6, subnet), memory_free=memory_free).double())


def gradients(model, x, between=None, backward_context=None):
    """Input and parameter gradients of a loss of ``model(x)``, with ``between(model)`` run after the
    forward and the backward run inside ``backward_context``."""
    x = x.clone().requires_grad_()
    torch.manual_seed(7)
    y, logdet = model(x)
    weight = torch.linspace(0.5, 1.5, y.shape[1], dtype=y.dtype).view(1, -1, *([1] * (y.dim() - 2)))
    loss = (y.sin() * weight).sum() + logdet.sum()
    if between is not None:
        between(model)
    with backward_context or torch.autocast("cpu", enabled=False):
        loss.backward()
    return [x.grad] + [p.grad for p in model.parameters()]


def assert_same(got, want, rtol=1e-10):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=rtol, atol=rtol)


@pytest.mark.parametrize("coupling", ["additive", "affine"])
def test_dropout_in_both_subnets_of_reversible_blocks(coupling):
    x = torch.randn(5, 6, dtype=torch.float64)
    want = gradients(reversible_chain(coupling, False), x)
    assert_same(gradients(reversible_chain(coupling, True), x), want)


@pytest.mark.parametrize("subnet", [dropout_mlp, batchnorm_mlp], ids=["dropout", "batchnorm"])
def test_eval_between_forward_and_backward(subnet):
    """A validation pass (``model.eval()``) between the training forward and its backward: the
    rebuild runs the subnets as the forward did, in train mode; the model's flags stay eval."""
    x = torch.randn(5, 6, dtype=torch.float64)
    want = gradients(coupling_chain(False, subnet), x, between=lambda m: m.eval())
    model = coupling_chain(True, subnet)
    got = gradients(model, x, between=lambda m: m.eval())
    assert_same(got, want)
    assert not any(m.training for m in model.modules())


def test_a_submodule_switched_alone_is_replayed_too():
    x = torch.randn(5, 6, dtype=torch.float64)

    def switch(model):
        model[1].g[2].eval()

    want = gradients(coupling_chain(False), x, between=switch)
    model = coupling_chain(True)
    assert_same(gradients(model, x, between=switch), want)
    assert not model[1].g[2].training and model[1].f[2].training


def test_backward_inside_autocast_rebuilds_in_the_forwards_precision():
    """The forward ran without autocast: the memory-free backward (rebuild and VJPs) runs as the
    forward did, not in bfloat16 because ``backward()`` is called inside ``torch.autocast``. (Plain
    autograd's backward ops follow the autocast around ``backward()``; here the gradients are those
    of the forward as it was computed.)"""
    x = torch.randn(5, 6)
    want = gradients(coupling_chain(False).float(), x)
    got = gradients(coupling_chain(True).float(), x, backward_context=torch.autocast("cpu", dtype=torch.bfloat16))
    assert_same(got, want, rtol=1e-5)


def test_reconstruction_diagnostics_replay_dropout_per_subnet_call():
    from invkernels.diagnostics import reconstruction_error  # noqa: PLC0415

    model = reversible_chain("affine", True)
    report = reconstruction_error(model, torch.randn(5, 6, dtype=torch.float64))
    assert report.total < 1e-12 and max(report.per_block) < 1e-12 and max(report.local) < 1e-12, report
    single = reconstruction_error(model[0], torch.randn(5, 6, dtype=torch.float64))
    assert single.total < 1e-12, single


def conv_with(layer):
    def factory(c_in, c_out):
        return nn.Sequential(nn.Conv2d(c_in, 8, 3, padding=1), layer(), nn.ReLU(), nn.Conv2d(8, c_out, 3, padding=1))

    return factory


def test_a_chain_of_every_kind_with_dropout_and_batchnorm_subnets_gives_plain_autograd_gradients():
    """ReversibleBlocks, couplings, Permute, Squeeze, ActNorm, InvConv1x1, a user block, with
    dropout in both subnets of two-sided blocks and BatchNorm in coupling subnets, in train mode."""
    from invkernels.nn import ActNorm, InvConv1x1, Permute, Squeeze  # noqa: PLC0415
    from test_sequential import ChannelAffine  # noqa: PLC0415

    def model(memory_free):
        torch.manual_seed(3)
        blocks = [ActNorm(4), ReversibleBlock(4, conv_with(lambda: nn.Dropout(0.3))), Permute(4, "swap"),
                  AffineCoupling(4, conv_with(lambda: nn.BatchNorm2d(8))), InvConv1x1(4), Squeeze(),
                  ReversibleBlock(16, conv_with(lambda: nn.Dropout2d(0.2)), coupling="affine"), Permute(16),
                  ChannelAffine(16), AffineCoupling(16, conv_with(lambda: nn.Dropout(0.1)), scale="sigmoid")]
        chain = randomized(InvertibleSequential(*blocks, memory_free=memory_free).double(), std=0.1)
        chain[0].mark_initialized()
        return chain

    x = torch.randn(3, 4, 4, 4, dtype=torch.float64)
    want = gradients(model(False), x)
    assert_same(gradients(model(True), x), want)


def nested_chain(memory_free, inner_memory_free):
    """A memory-free (or stored) chain whose second block is a chain of two-sided blocks."""
    torch.manual_seed(1)
    inner = InvertibleSequential(ReversibleBlock(6, dropout_mlp), ReversibleBlock(6, dropout_mlp),
                                 memory_free=inner_memory_free)
    return randomized(InvertibleSequential(ReversibleBlock(6, dropout_mlp), inner, memory_free=memory_free).double())


@pytest.mark.parametrize("inner_memory_free", [False, True])
def test_a_nested_chain_that_draws_random_numbers_is_refused_by_name(inner_memory_free):
    """A chain inside a memory-free chain cannot replay its blocks' dropout in its inverse (it would
    rebuild a wrong input, silently): the outer chain refuses it, naming the block, once it drew."""
    x = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    with pytest.raises(NotImplementedError, match=r"block 1 \(InvertibleSequential\) drew random numbers"):
        nested_chain(True, inner_memory_free)(x)


@pytest.mark.parametrize("inner_memory_free", [False, True])
def test_a_nested_chain_without_random_numbers_gives_plain_autograd_gradients(inner_memory_free):
    """In eval mode (no dropout drawn) the nested chain is rebuilt by its inverse: gradients equal
    plain autograd's."""
    x = torch.randn(5, 6, dtype=torch.float64)
    want = gradients(nested_chain(False, False).eval(), x)
    assert_same(gradients(nested_chain(True, inner_memory_free).eval(), x), want)


def permuted_chain(memory_free, first=None):
    """Permutations by index (the run applies them itself) first, between and last, around blocks
    that draw random numbers."""
    from invkernels.nn import Permute  # noqa: PLC0415

    torch.manual_seed(1)
    blocks = [first or Permute(6, perm=[4, 0, 5, 2, 1, 3]), AffineCoupling(6, dropout_mlp), Permute(6),
              ReversibleBlock(6, dropout_mlp), Permute(6, perm=[1, 2, 0, 5, 3, 4])]
    return randomized(InvertibleSequential(*blocks, memory_free=memory_free).double())


def test_permutations_applied_by_index_keep_the_replay_of_the_blocks_around_them():
    x = torch.randn(5, 6, dtype=torch.float64)
    assert_same(gradients(permuted_chain(True), x), gradients(permuted_chain(False), x))


def test_permutations_applied_by_index_under_create_graph():
    """Double backward reruns the forward from the state before the run, which starts with a
    permutation that keeps no RNG state of its own."""
    def grad_norm_grads(model):
        x = torch.randn(5, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(2)).requires_grad_()
        torch.manual_seed(7)
        y, logdet = model(x)
        (gx,) = torch.autograd.grad(y.sin().sum() + logdet.sum(), x, create_graph=True)
        return torch.autograd.grad(gx.square().sum(), [x, *model.parameters()], allow_unused=True)

    assert_same(grad_norm_grads(permuted_chain(True)), grad_norm_grads(permuted_chain(False)))


def test_permutations_applied_by_index_are_in_the_reconstruction_check():
    model = permuted_chain(True)
    model.check_reconstruction = True
    gradients(model, torch.randn(5, 6, dtype=torch.float64))
    assert [i for i, _ in model.reconstruction_errors] == list(range(5))
    assert max(error for _, error in model.reconstruction_errors) < 1e-12, model.reconstruction_errors


class HalfScale(nn.Module):
    """A user block whose log-det comes in its parameter's dtype (the chain checks only its shape)."""

    def __init__(self, channels):
        super().__init__()
        self.s = nn.Parameter(torch.full((channels,), 1.0))

    def forward(self, x, context=None):
        return x * self.s.exp(), (self.s.sum() * 10000).expand(x.shape[0])

    def inverse(self, y, context=None):
        return y * (-self.s).exp()


@pytest.mark.parametrize("order", ["between", "first"])
def test_permutations_applied_by_index_keep_summing_half_log_dets_in_float32(order):
    """Around a permutation the log-dets are summed as the chain that calls it sums them: its zeros
    are float32 for a float16 input, so two float16 log-dets of 40000 make 80000, not inf."""
    from invkernels.nn import Permute  # noqa: PLC0415

    def run(memory_free):
        torch.manual_seed(0)
        blocks = [HalfScale(4), Permute(4, perm=[2, 0, 3, 1]), HalfScale(4)]
        if order == "first":
            blocks = [blocks[1], blocks[0], blocks[2]]
        model = InvertibleSequential(*blocks, memory_free=memory_free).half()
        x = torch.randn(3, 4).half().requires_grad_()
        y, logdet = model(x)
        (y.float().sum() + logdet.sum()).backward()
        return logdet, x.grad, [p.grad for p in model.parameters()]

    want, got = run(False), run(True)
    assert got[0].dtype == want[0].dtype == torch.float32
    assert torch.equal(got[0], want[0]) and want[0].isfinite().all()
    assert_same([got[1], *got[2]], [want[1], *want[2]], rtol=0)


@pytest.mark.parametrize("blocks", ["permutation", "additive"])
def test_create_graph_through_a_run_whose_log_det_is_constant(blocks):
    from invkernels.nn import AdditiveCoupling, Permute  # noqa: PLC0415

    def second_order(memory_free):
        torch.manual_seed(1)
        made = [Permute(6)] if blocks == "permutation" else [AdditiveCoupling(6, dropout_mlp) for _ in range(2)]
        model = randomized(InvertibleSequential(*made, memory_free=memory_free).double())
        x = torch.randn(5, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(2)).requires_grad_()
        torch.manual_seed(7)
        y, logdet = model(x)
        (gx,) = torch.autograd.grad(y.sin().sum() + logdet.sum(), x, create_graph=True)
        return torch.autograd.grad(gx.square().sum(), [x, *model.parameters()], allow_unused=True)

    assert_same(second_order(True), second_order(False))


def test_a_permutation_with_a_hook_or_of_a_subclass_is_called_as_a_module():
    """What waits in ``nn.Module.__call__`` runs, and a subclass's or an instance's own forward is
    called: only the class itself, without hooks, is applied by index."""
    from invkernels.nn import Permute  # noqa: PLC0415

    calls = []

    class CountingPermute(Permute):
        def forward(self, x, context=None):
            calls.append("subclass")
            return super().forward(x, context)

    hooked = Permute(6, perm=[4, 0, 5, 2, 1, 3])
    hooked.register_forward_hook(lambda module, args, out: calls.append("hook"))
    patched = Permute(6, perm=[4, 0, 5, 2, 1, 3])
    patched_forward = patched.forward
    patched.forward = lambda x, context=None: (calls.append("instance"), patched_forward(x, context))[1]
    x = torch.randn(5, 6, dtype=torch.float64)
    for first in (hooked, CountingPermute(6, perm=[4, 0, 5, 2, 1, 3]), patched):
        calls.clear()
        got = gradients(permuted_chain(True, first), x)
        assert calls == [calls[0]], calls
        calls.clear()
        assert_same(got, gradients(permuted_chain(False, first), x))
