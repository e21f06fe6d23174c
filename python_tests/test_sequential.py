"""InvertibleSequential: memory-free backprop gives the gradients of plain autograd for every block
type, and handles the cases users hit with reversible libraries."""

import pytest
import torch
from torch import nn

from invkernels.diagnostics import reconstruction_error

from invkernels.nn import (
    ActNorm,
    AdditiveCoupling,
    AffineCoupling,
    GlowStep,
    InvConv1x1,
    InvertibleSequential,
    Split,
    Squeeze,
)


class ChannelAffine(nn.Module):
    """A user block with ``forward -> (y, logdet)`` and ``inverse`` only (the generic path)."""

    def __init__(self, c):
        super().__init__()
        self.a = nn.Parameter(0.1 * torch.randn(c))
        self.b = nn.Parameter(0.1 * torch.randn(c))

    def _view(self, v, x):
        return v.view(-1, *([1] * (x.dim() - 2)))

    def forward(self, x):
        y = x * torch.exp(self._view(self.a, x)) + self._view(self.b, x)
        return y, (x[0, 0].numel() * self.a.sum()).expand(x.shape[0])

    def inverse(self, y):
        return (y - self._view(self.b, y)) * torch.exp(-self._view(self.a, y))


class NoInverse(nn.Module):
    """A block without an inverse: stored activations."""

    def __init__(self, c):
        super().__init__()
        self.w = nn.Parameter(torch.ones(c))

    def forward(self, x):
        return torch.tanh(x) * self.w.view(-1, 1, 1), x.new_zeros(x.shape[0])


def dropout_subnet(c_in, c_out):
    return nn.Sequential(nn.Conv2d(c_in, 8, 3, padding=1), nn.Dropout(0.3), nn.ReLU(), nn.Conv2d(8, c_out, 3, padding=1))


def block_of(kind, c, backend=None):
    return {
        "actnorm": lambda: ActNorm(c, backend=backend),
        "invconv": lambda: InvConv1x1(c, backend=backend),
        "invconv_dense": lambda: InvConv1x1(c, lu=False, backend=backend),
        "affine_exp": lambda: AffineCoupling(c, "conv", hidden=8, backend=backend),
        "affine_sigmoid": lambda: AffineCoupling(c, "conv", hidden=8, scale="sigmoid", backend=backend),
        "additive": lambda: AdditiveCoupling(c, "conv", hidden=8, backend=backend),
        "glow": lambda: GlowStep(c, hidden=8, backend=backend),
        "glow_spline": lambda: GlowStep(c, hidden=8, backend=backend, coupling="spline", bins=3),
        "user": lambda: ChannelAffine(c),
    }[kind]()


KINDS = ["actnorm", "invconv", "affine_exp", "glow", "additive", "invconv_dense", "affine_sigmoid", "user"]


def chain(depth, dtype=torch.float64, backend=None, squeeze=True):
    """``depth`` blocks cycling through every kind; with ``squeeze`` a Squeeze in the middle."""
    blocks, c = [], 4
    for k in range(depth):
        if squeeze and depth >= 8 and k == depth // 2:
            blocks.append(Squeeze())
            c *= 4
        blocks.append(block_of(KINDS[k % len(KINDS)], c, backend))
    model = InvertibleSequential(*blocks).to(dtype)
    randomize(model)
    return model


def randomize(model):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    for m in model.modules():
        if isinstance(m, ActNorm):
            m.mark_initialized()


def grads_of(model, x, g, gl, memory_free, context=None, seed=None):
    model.memory_free = memory_free
    if seed is not None:
        torch.manual_seed(seed)
    kwargs = {} if context is None else {"context": context}
    y, logdet = model(x, **kwargs)
    inputs = [t for t in (x, context, *model.parameters()) if t is not None and t.requires_grad]
    return (y, logdet), torch.autograd.grad((y, logdet), inputs, (g, gl))


def assert_grads_match(a, b, rtol):
    for u, v in zip(a, b):
        err = ((u - v).norm() / v.norm().clamp_min(1e-30)).item()
        assert err <= rtol, err


def data(shape=(2, 4, 8, 8), dtype=torch.float64):
    x = torch.randn(shape, dtype=dtype, requires_grad=True)
    return x


@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
@pytest.mark.parametrize("depth", [1, 8, 64])
def test_gradients_equal_plain_autograd(depth, dtype, rtol):
    torch.manual_seed(depth)
    model = chain(depth, dtype)
    x = data(dtype=dtype)
    with torch.no_grad():
        y, logdet = model(x)
    g, gl = torch.randn_like(y), torch.randn_like(logdet)
    out_free, free = grads_of(model, x, g, gl, True)
    out_plain, plain = grads_of(model, x, g, gl, False)
    assert torch.equal(out_free[0], out_plain[0]) and torch.equal(out_free[1], out_plain[1])
    assert len(free) == len(plain) == 1 + len([p for p in model.parameters()])
    assert_grads_match(free, plain, rtol)


@pytest.mark.parametrize("backend", ["cpp", "triton", "reference"])
def test_every_backend(backend):
    torch.manual_seed(1)
    model = chain(8, backend=backend, squeeze=False)
    x = data()
    g, gl = torch.randn_like(x), torch.randn(2, dtype=torch.float64)
    _, free = grads_of(model, x, g, gl, True)
    _, plain = grads_of(model, x, g, gl, False)
    assert_grads_match(free, plain, 1e-10)


@pytest.mark.parametrize("backend", ["cpp", "triton", "reference"])
@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
def test_spline_glow_steps_in_a_chain(backend, dtype, rtol):
    """Spline Glow steps between the other kinds: memory-free gradients equal plain autograd's.
    (Deeper float32 chains of ReLU subnets are not compared: the inputs rebuilt in float32 move by
    ~1e-5 after 50 blocks, and a ReLU input within that of 0 flips, changing a subnet's gradient by
    percents in either mode; measured on a 64-block chain.)"""
    torch.manual_seed(3)
    kinds = ["glow_spline", "actnorm", "affine_exp", "glow_spline", "invconv", "glow", "glow_spline", "additive"]
    model = InvertibleSequential(*(block_of(kind, 4, backend) for kind in kinds)).to(dtype)
    randomize(model)
    x = data(dtype=dtype)
    g, gl = torch.randn_like(x), torch.randn(2, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    out_free, free = grads_of(model, x, g, gl, True)
    out_plain, plain = grads_of(model, x, g, gl, False)
    assert torch.equal(out_free[0], out_plain[0]) and torch.equal(out_free[1], out_plain[1])
    assert_grads_match(free, plain, rtol)


def test_dropout_subnets_replay_the_rng():
    torch.manual_seed(2)
    model = InvertibleSequential(AffineCoupling(4, dropout_subnet), ActNorm(4), AdditiveCoupling(4, dropout_subnet),
                                 AffineCoupling(4, dropout_subnet, scale="sigmoid")).double()
    randomize(model)
    x = data()
    g, gl = torch.randn_like(x), torch.randn(2, dtype=torch.float64)
    out_free, free = grads_of(model, x, g, gl, True, seed=7)
    out_plain, plain = grads_of(model, x, g, gl, False, seed=7)
    assert torch.equal(out_free[0], out_plain[0])
    assert_grads_match(free, plain, 1e-10)
    _, other = grads_of(model, x, g, gl, False, seed=8)
    assert max(((a - b).norm() / b.norm()).item() for a, b in zip(other, plain)) > 1e-3


def test_rng_is_left_as_after_the_forward():
    model = InvertibleSequential(AffineCoupling(4, dropout_subnet)).double()
    x = data()
    torch.manual_seed(3)
    y, logdet = model(x)
    after_forward = torch.get_rng_state()
    (y.sum() + logdet.sum()).backward()
    assert torch.equal(torch.get_rng_state(), after_forward)


def test_parameters_shared_between_blocks():
    torch.manual_seed(4)
    shared = AffineCoupling(4, "conv", hidden=8)
    model = InvertibleSequential(shared, InvConv1x1(4), shared, ActNorm(4), shared).double()
    randomize(model)
    x = data()
    g, gl = torch.randn_like(x), torch.randn(2, dtype=torch.float64)
    _, free = grads_of(model, x, g, gl, True)
    _, plain = grads_of(model, x, g, gl, False)
    assert_grads_match(free, plain, 1e-10)


def test_second_forward_before_backward():
    torch.manual_seed(5)
    model = chain(8, squeeze=False)
    x1, x2 = data(), data()
    g = torch.randn_like(x1)
    params = list(model.parameters())
    grads = {}
    for memory_free in (True, False):
        model.memory_free = memory_free
        y1, l1 = model(x1)
        y2, l2 = model(x2)
        loss = (y1 * g).sum() + (y2 * g).sum() + l1.sum() - 2 * l2.sum()
        grads[memory_free] = torch.autograd.grad(loss, [x1, x2, *params])
    assert_grads_match(grads[True], grads[False], 1e-10)


def test_no_grad_inference_is_identical_to_the_stored_path():
    torch.manual_seed(6)
    model = chain(8)
    x = data()
    with torch.no_grad():
        y, logdet = model(x)
    model.memory_free = False
    with torch.no_grad():
        y_plain, logdet_plain = model(x)
    y_grad, logdet_grad = InvertibleSequential(*model.blocks)(x)
    assert torch.equal(y, y_plain) and torch.equal(logdet, logdet_plain)
    assert torch.equal(y, y_grad.detach()) and torch.equal(logdet, logdet_grad.detach())


def test_input_that_does_not_require_grad():
    torch.manual_seed(7)
    model = chain(8, squeeze=False)
    x = data().detach()
    g, gl = torch.randn_like(x), torch.randn(2, dtype=torch.float64)
    _, free = grads_of(model, x, g, gl, True)
    _, plain = grads_of(model, x, g, gl, False)
    assert len(free) == len(list(model.parameters()))
    assert_grads_match(free, plain, 1e-10)


def test_blocks_without_inverse_store_their_activations():
    torch.manual_seed(8)
    model = InvertibleSequential(ActNorm(4), AffineCoupling(4, "conv", hidden=8), NoInverse(4), InvConv1x1(4),
                                 Split(4), AffineCoupling(2, "conv", hidden=8)).double()
    randomize(model)
    assert [capable for capable, _ in model._runs()] == [True, False, True, False, True]
    x = data()
    with torch.no_grad():
        y, logdet = model(x)
    g, gl = torch.randn_like(y), torch.randn_like(logdet)
    _, free = grads_of(model, x, g, gl, True)
    _, plain = grads_of(model, x, g, gl, False)
    assert_grads_match(free, plain, 1e-10)
    with pytest.raises(ValueError, match=r"block 4 \(Split\) cannot be inverted from the chain's output"):
        model.inverse(y)
    with pytest.raises(TypeError, match=r"block 2 \(NoInverse\) has no inverse"):
        InvertibleSequential(*model.blocks[:4]).inverse(torch.randn_like(x))


def test_backward_twice_is_an_error():
    model = chain(4, squeeze=False)
    y, logdet = model(data())
    loss = y.sum() + logdet.sum()
    loss.backward()
    with pytest.raises(RuntimeError, match="second time"):
        loss.backward()


def test_parameter_changed_between_forward_and_backward_is_an_error():
    model = chain(4, squeeze=False)
    y, logdet = model(data())
    with torch.no_grad():
        model.blocks[1].lower.add_(0.1)
    with pytest.raises(RuntimeError, match=r"parameter blocks.1.lower, needed to rebuild the activations .* "
                                           r"modified by an inplace operation"):
        (y.sum() + logdet.sum()).backward()


def test_double_backward_matches_plain_autograd():
    torch.manual_seed(9)
    model = chain(4, squeeze=False)
    x = data((2, 4, 3, 3))
    grads = {}
    for memory_free in (True, False):
        model.memory_free = memory_free
        y, logdet = model(x)
        (gx,) = torch.autograd.grad(y.square().sum() + logdet.sum(), x, create_graph=True)
        grads[memory_free] = torch.autograd.grad(gx.square().sum(), [x, *model.parameters()], allow_unused=True)
    for a, b in zip(grads[True], grads[False]):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_context_gradients():
    torch.manual_seed(10)
    model = InvertibleSequential(AffineCoupling(4, "conv", hidden=8, context_channels=3), InvConv1x1(4),
                                 GlowStep(4, hidden=8, context_channels=3), ActNorm(4)).double()
    randomize(model)
    x = data()
    context = torch.randn(2, 3, 8, 8, dtype=torch.float64, requires_grad=True)
    g, gl = torch.randn_like(x), torch.randn(2, dtype=torch.float64)
    _, free = grads_of(model, x, g, gl, True, context=context)
    _, plain = grads_of(model, x, g, gl, False, context=context)
    assert_grads_match(free, plain, 1e-10)
    with torch.no_grad():
        y, _ = model(x, context=context)
        torch.testing.assert_close(model.inverse(y, context=context), x)


def test_bf16_autocast_subnets_match_plain_autograd_under_autocast():
    torch.manual_seed(11)
    model = chain(8, torch.float32, squeeze=False)
    x = data(dtype=torch.float32)
    g, gl = torch.randn_like(x), torch.randn(2)
    results = {}
    for memory_free in (True, False):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            results[memory_free] = grads_of(model, x, g, gl, memory_free)[1]
    assert_grads_match(results[True], results[False], 2e-2)


def test_saved_activations_do_not_grow_with_depth():
    def saved_bytes(model, x):
        total = [0]

        def pack(t):
            total[0] += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y, logdet = model(x)
        return total[0]

    x = data((2, 4, 8, 8), torch.float32)
    sizes = {}
    for depth in (1, 16):
        model = InvertibleSequential(*(GlowStep(4, hidden=8) for _ in range(depth)))
        sizes[depth] = saved_bytes(model, x)
        model.memory_free = False
        sizes[(depth, "plain")] = saved_bytes(model, x)
    # The chain's input and output (the input is the caller's tensor: no memory of its own).
    assert sizes[16] == sizes[1] == 2 * x.numel() * x.element_size()
    assert sizes[(16, "plain")] > 10 * sizes[(1, "plain")] / 2


def test_check_reconstruction_records_small_errors():
    torch.manual_seed(12)
    model = chain(8, torch.float32, squeeze=False)
    model.check_reconstruction = True
    y, logdet = model(data(dtype=torch.float32))
    (y.sum() + logdet.sum()).backward()
    assert [i for i, _ in model.reconstruction_errors] == list(range(8))
    assert all(0 <= err < 1e-4 for _, err in model.reconstruction_errors)


def test_bad_arguments():
    with pytest.raises(TypeError, match="block 1 should be an nn.Module, got int"):
        InvertibleSequential(ActNorm(2), 3)
    with pytest.raises(ValueError, match="memory_free should be True, False or 'auto', got 'yes'"):
        InvertibleSequential(ActNorm(2), memory_free="yes")
    model = InvertibleSequential(nn.Conv2d(2, 2, 1))
    with pytest.raises(TypeError, match=r"block 0 \(Conv2d\) should return a tuple \(y, logdet\) of tensors, got Tensor"):
        model(torch.randn(1, 2, 3, 3))


def test_inverse_round_trip():
    torch.manual_seed(13)
    model = chain(16)
    x = data().detach()
    with torch.no_grad():
        y, _ = model(x)
        torch.testing.assert_close(model.inverse(y), x)


def test_compiles_and_matches_eager():
    from torch._dynamo.utils import counters  # noqa: PLC0415

    torch.manual_seed(14)
    model = chain(4, torch.float32, squeeze=False)
    x = data(dtype=torch.float32)
    g, gl = torch.randn_like(x), torch.randn(2)

    def step(inp):
        y, logdet = model(inp)
        return (y * g).sum() + (logdet * gl).sum()

    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(step, backend="aot_eager")
    got = torch.autograd.grad(compiled(x), [x, *model.parameters()])
    want = torch.autograd.grad(step(x), [x, *model.parameters()])
    assert_grads_match(got, want, 1e-5)
    # One graph break: the memory-free run, left to eager autograd.
    assert sum(counters["graph_break"].values()) == 1
    assert counters["stats"]["unique_graphs"] >= 1


class LossyInverse(ChannelAffine):
    """A block whose inverse is off by 1e-3 (relative)."""

    def inverse(self, y):
        return super().inverse(y) * 1.001


def test_reconstruction_error_diagnostic():
    torch.manual_seed(15)
    model = chain(8, torch.float32, squeeze=False)
    x = torch.randn(2, 4, 8, 8)
    report = reconstruction_error(model, x)
    assert len(report.per_block) == len(report.local) == 8
    assert 0 < report.total < 1e-5 and all(0 <= e < 1e-5 for e in report.per_block + report.local)
    bad = InvertibleSequential(*model.blocks[:4], LossyInverse(4), *model.blocks[4:])
    report = reconstruction_error(bad, x)
    assert abs(report.local[4] - 1e-3) < 1e-4
    assert all(e > 5e-4 for e in report.per_block[:5]) and all(e < 1e-5 for e in report.per_block[5:])
    assert abs(reconstruction_error(model.blocks[2], x).total) < 1e-5
    bf16 = reconstruction_error(model, x, autocast_dtype=torch.bfloat16)
    assert bf16.total < 1e-2
    with pytest.raises(TypeError, match=r"model \(NoInverse\) has no inverse"):
        reconstruction_error(NoInverse(4), x)


def test_every_block_of_the_package_has_a_fused_memory_free_backward():
    from invkernels.nn import InvertibleResidual  # noqa: PLC0415
    from invkernels.nn import FusedInverseBackward  # noqa: PLC0415

    blocks = [block_of(kind, 4) for kind in KINDS if kind != "user"]
    blocks.append(InvertibleResidual(nn.Linear(4, 4)))
    for block in blocks:
        assert isinstance(block, FusedInverseBackward), type(block).__name__
    assert not isinstance(ChannelAffine(4), FusedInverseBackward)


def test_glow_step_names_itself_for_a_wrong_input():
    with pytest.raises(ValueError, match=r"GlowStep: x should have shape \[B, 4, ...\], got \[2, 3, 4, 4\]"):
        GlowStep(4, hidden=8)(torch.randn(2, 3, 4, 4))
