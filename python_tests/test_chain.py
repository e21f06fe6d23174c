"""A chain without glue: blocks that split the channels the same way hand each other their halves,
Permute's half swap is bookkeeping, every built-in block has its own memory-free backward, and
the gradients equal plain autograd's (a loop over the blocks' own forwards)."""

import pytest
import torch
from torch import nn
from torch.profiler import profile, record_function

from invkernels.nn import (
    ActNorm,
    AdditiveCoupling,
    AffineCoupling,
    GlowStep,
    InvConv1x1,
    InvertibleSequential,
    Permute,
    ReversibleBlock,
    Squeeze,
)
from invkernels.nn import _memory_free
from test_sequential import ChannelAffine, assert_grads_match, randomize


def mixed_blocks(depth, c=6):
    """``depth`` blocks cycling through the half-passing blocks (ReversibleBlock, the half swap)
    and the others between them (couplings, Permute by index, ActNorm, a user block)."""
    kinds = [
        lambda: ReversibleBlock(c, "conv", hidden=4),
        lambda: Permute(c, "swap"),
        lambda: ReversibleBlock(c, "conv", hidden=4, coupling="affine"),
        lambda: ReversibleBlock(c, "conv", hidden=4, coupling="affine", scale="sigmoid"),
        lambda: AdditiveCoupling(c, "conv", hidden=4),
        lambda: Permute(c),
        lambda: ReversibleBlock(c, "conv", hidden=4),
        lambda: Permute(c, perm=torch.randperm(c)),
        lambda: AffineCoupling(c, "conv", hidden=4),
        lambda: ActNorm(c),
        lambda: ChannelAffine(c),
    ]
    return [kinds[k % len(kinds)]() for k in range(depth)]


def randomized_chain(blocks, dtype, memory_free=True):
    model = InvertibleSequential(*blocks, memory_free=memory_free).to(dtype)
    randomize(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def plain_forward(model, x):
    """The blocks' own forwards in turn, under autograd: the plain-autograd oracle."""
    logdet = torch.zeros(x.shape[0], dtype=x.dtype)
    for block in model.blocks:
        x, block_logdet = block(x)
        logdet = logdet + block_logdet
    return x, logdet


def grads(run, model, x, g, gl):
    y, logdet = run(x)
    outputs, seeds = [y], [g]
    if logdet.requires_grad:
        outputs.append(logdet)
        seeds.append(gl)
    return (y, logdet), torch.autograd.grad(outputs, [x, *model.parameters()], seeds, allow_unused=True)


@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
@pytest.mark.parametrize("depth", [1, 8, 64])
@pytest.mark.parametrize("channels", [6, 5])
def test_mixed_chain_gradients_equal_plain_autograd(channels, depth, dtype, rtol):
    """Memory-free and stored chains, halves passed between blocks, against the blocks' forwards
    run one by one (odd C: the half swap is not a split of equal halves and takes the index path)."""
    torch.manual_seed(depth + channels)
    model = randomized_chain(mixed_blocks(depth, channels), dtype)
    x = torch.randn(2, channels, 4, 4, dtype=dtype, requires_grad=True)
    with torch.no_grad():
        y, logdet = plain_forward(model, x)
    g, gl = torch.randn_like(y), torch.randn_like(logdet)
    out_plain, plain = grads(lambda v: plain_forward(model, v), model, x, g, gl)
    for memory_free in (True, False):
        model.memory_free = memory_free
        out, got = grads(model, model, x, g, gl)
        torch.testing.assert_close(out[0], out_plain[0], rtol=rtol, atol=rtol)
        torch.testing.assert_close(out[1], out_plain[1], rtol=rtol, atol=rtol)
        assert all(t is not None for t in got)
        assert_grads_match(got, plain, rtol)
    with torch.no_grad():
        torch.testing.assert_close(model.inverse(out_plain[0]), x, rtol=rtol, atol=rtol)


def test_built_in_blocks_never_take_the_generic_rebuild(monkeypatch):
    """Couplings, ReversibleBlock, ActNorm, InvConv1x1, GlowStep, Permute (every kind) and Squeeze
    have their own memory-free backward."""
    c = 4
    blocks = [ReversibleBlock(c, "conv", hidden=4), Permute(c, "swap"), AffineCoupling(c, "conv", hidden=4),
              Permute(c), AdditiveCoupling(c, "conv", hidden=4), Permute(c, "random"), ActNorm(c),
              InvConv1x1(c), InvConv1x1(c, lu=False), GlowStep(c, hidden=4), Permute(c, perm=[2, 0, 3, 1]),
              Squeeze(), ReversibleBlock(4 * c, "conv", hidden=4, coupling="affine")]
    model = randomized_chain(blocks, torch.float64)

    def refuse(block, *args):
        raise AssertionError(f"{type(block).__name__} took the generic inverse-then-forward path")

    monkeypatch.setattr(_memory_free, "generic_inverse_backward", refuse)
    x = torch.randn(2, c, 4, 4, dtype=torch.float64, requires_grad=True)
    y, logdet = model(x)
    (y.square().sum() + logdet.sum()).backward()
    assert x.grad is not None and all(p.grad is not None for p in model.parameters())


class HalfSwap(nn.Module):
    """A user's half swap between single-sided couplings (the generic path)."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x):
        self.calls.append(("forward", torch.is_grad_enabled()))
        c = x.shape[1] // 2
        return torch.cat([x[:, c:], x[:, :c]], 1), x.new_zeros(x.shape[0])

    def inverse(self, y):
        self.calls.append(("inverse", torch.is_grad_enabled()))
        c = y.shape[1] - y.shape[1] // 2
        return torch.cat([y[:, c:], y[:, :c]], 1)


def test_a_user_block_costs_one_extra_forward():
    """The generic path of a user block: its forward once without grad, then in backward its
    inverse once and its forward once with grad (the forward of stored training plus the rebuild)."""
    swap = HalfSwap()
    model = InvertibleSequential(AdditiveCoupling(4, "conv", hidden=4), swap, AdditiveCoupling(4, "conv", hidden=4))
    x = torch.randn(2, 4, 4, 4, requires_grad=True)
    y, _ = model(x)
    assert swap.calls == [("forward", False)]
    y.square().sum().backward()
    assert swap.calls == [("forward", False), ("inverse", False), ("forward", True)]


SUBNET_BACKWARD_NODES = ("ConvolutionBackward0", "ReluBackward0", "ThresholdBackward0")


class ProfiledSubnet(nn.Module):
    """conv3x3-ReLU-conv3x3 whose forward is marked in the profile."""

    def __init__(self, c, hidden=4):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(c, hidden, 3, padding=1), nn.ReLU(), nn.Conv2d(hidden, c, 3, padding=1))

    def forward(self, x):
        with record_function("subnet"):
            return self.net(x)


def _inside_subnet(event) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if parent.name == "subnet" or parent.name.endswith(SUBNET_BACKWARD_NODES):
            return True
        parent = parent.cpu_parent
    return False


def glue_ops(memory_free, blocks=4, shape=(2, 8, 8, 8)):
    """The ops of one forward+backward of a ReversibleBlock stack outside its subnets (forwards and
    backward nodes), as ``(name, shape of the first input)``."""
    torch.manual_seed(0)
    c = shape[1]
    model = InvertibleSequential(*[ReversibleBlock(c, f=ProfiledSubnet(c // 2), g=ProfiledSubnet(c // 2))
                                   for _ in range(blocks)], memory_free=memory_free)
    randomize(model)
    x = torch.randn(shape, requires_grad=True)
    g = torch.randn(shape)
    params = [x, *model.parameters()]
    with profile(record_shapes=True) as prof:
        y, _ = model(x)
        torch.autograd.grad(y, params, g)
    return [(e.name, list(e.input_shapes[0]) if e.input_shapes else []) for e in prof.events()
            if e.name.startswith("aten::") and not _inside_subnet(e)]


@pytest.mark.parametrize("memory_free", [True, False])
def test_reversible_stack_has_no_glue_outside_its_subnets(memory_free):
    """Outside the subnets a forward+backward has no zero fill and no in-place accumulation of an
    activation, and concatenates once per direction: the output (and, stored, the input's
    gradient; memory-free writes it into its buffer)."""
    shape = (2, 8, 8, 8)
    half = shape[0] * shape[1] // 2 * shape[2] * shape[3]
    ops = glue_ops(memory_free, shape=shape)
    activation_sized = [(n, s) for n, s in ops if s and isinstance(s[0], int) and torch.Size(s).numel() >= half]
    names = [n for n, _ in ops]
    assert not [op for op in activation_sized if op[0] in ("aten::zero_", "aten::fill_", "aten::add_")], ops
    assert [n for n, _ in activation_sized if n == "aten::copy_"] == [], activation_sized
    assert names.count("aten::cat") == (1 if memory_free else 2), names
    assert "aten::index_select" not in names and "aten::zeros_like" not in names


def test_permute_kinds_and_the_half_swap_as_bookkeeping():
    x = torch.arange(2 * 6, dtype=torch.float64).view(2, 6)
    assert Permute(6, "swap")(x)[0].tolist() == x[:, [3, 4, 5, 0, 1, 2]].tolist()
    assert Permute(5, "swap")(x[:, :5])[0].tolist() == x[:, [2, 3, 4, 0, 1]].tolist()
    assert Permute(6, perm=[1, 0, 2, 5, 4, 3])(x)[0].tolist() == x[:, [1, 0, 2, 5, 4, 3]].tolist()
    assert Permute(6, "swap").split_channels == 3
    assert Permute(5, "swap").split_channels is None and Permute(6).split_channels is None
    assert Permute(6, perm=[3, 4, 5, 0, 1, 2]).split_channels == 3
    swap = Permute(6, "swap")
    swap.load_state_dict(Permute(6).state_dict())
    assert swap.split_channels is None
    model = InvertibleSequential(swap, ReversibleBlock(6, "mlp", hidden=4)).double()
    y, _ = model(x)
    torch.testing.assert_close(y, plain_forward(model, x)[0], rtol=0, atol=0)
    y1, y2, logdet = Permute(6, "swap").forward_split(x[:, :3], x[:, 3:])
    assert y1 is not None and y1.data_ptr() == x[:, 3:].data_ptr() and logdet is None


def test_permute_bad_arguments():
    with pytest.raises(ValueError, match="kind should be 'reverse', 'swap' or 'random', got 'shuffle'"):
        Permute(4, "shuffle")
    with pytest.raises(ValueError, match="give kind or perm, not both"):
        Permute(4, "reverse", perm=[0, 1, 2, 3])
    with pytest.raises(ValueError, match=r"should be a permutation of 0..3 \(each index once\), got \[0, 0, 1, 2\]"):
        Permute(4, perm=[0, 0, 1, 2])
    with pytest.raises(ValueError, match=r"perm' \(state dict key 'perm'\) should be an int64 tensor of shape \[4\]"):
        Permute(4, perm=[0, 1, 2])
    with pytest.raises(ValueError, match="forward_split needs the half swap of an even channel count"):
        Permute(4).forward_split(torch.zeros(1, 2), torch.zeros(1, 2))
