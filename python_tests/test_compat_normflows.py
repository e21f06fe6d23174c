"""invkernels.compat.normflows: normflows' coupling, Glow and spline flows under normflows' names.

The oracle is normflows itself: each compat object, after loading the state dict of the normflows
object of the same class, gives normflows' outputs and log-determinants (float64, 1e-10) in both
directions (``forward``: z -> x, ``inverse``: x -> z), and a stack of Glow blocks normflows'
gradients too. scripts/peer_suites.py runs normflows' own coupling, Glow, mixing, spline-wrapper and
core tests with these classes swapped in (docs/compat/normflows.md).
"""

from __future__ import annotations

import importlib
import inspect

import pytest
import torch
from torch import nn
from op_spy import spy

nf = importlib.import_module("normflows")  # a test extra: make env installs it
flows = importlib.import_module("normflows.flows")
nets = importlib.import_module("normflows.nets")
import invkernels.compat as compat  # noqa: E402
import invkernels.compat.normflows as N  # noqa: E402

RTOL = 1e-10
CLASSES = ["ActNorm", "AffineConstFlow", "AffineCouplingBlock", "CoupledRationalQuadraticSpline", "GlowBlock",
           "Invertible1x1Conv", "MaskedAffineFlow"]


def perturb(module: nn.Module, amount: float = 0.3) -> None:
    with torch.no_grad():  # parameters far from their zero-ish init, so every path matters
        for p in module.parameters():
            p.add_(amount * torch.randn_like(p))


def pair(name: str, *args, seed: int = 0, amount: float = 0.3, **kwargs):
    """normflows' ``name`` and the compat one (same seed), the compat one loaded from normflows'
    perturbed state dict."""
    torch.manual_seed(seed)
    ref = getattr(flows, name)(*args, **kwargs).double()
    torch.manual_seed(seed)
    new = getattr(N, name)(*args, **kwargs).double()
    assert isinstance(new, getattr(flows, name))
    perturb(ref, amount)
    new.load_state_dict(ref.state_dict())
    assert new.state_dict().keys() == ref.state_dict().keys()
    return ref, new


def close(actual, expected, scale: float = 1.0) -> None:
    torch.testing.assert_close(actual, expected, rtol=RTOL, atol=RTOL * scale)


def assert_same(ref, new, x, *context):
    for method in ("forward", "inverse"):
        xa, la = getattr(ref, method)(x, *context)
        xb, lb = getattr(new, method)(x, *context)
        close(xb, xa)
        la, lb = torch.as_tensor(la, dtype=x.dtype), torch.as_tensor(lb, dtype=x.dtype)
        assert lb.shape == la.shape
        close(lb, la, x[0].numel())


def conv_net(c_in: int, c_out: int) -> nn.Module:
    return nets.ConvNet2d([c_in, 6, c_out], [3, 3], leaky=0.1, init_zeros=False)


def coupling_net(channels: int, scale: bool, split_mode: str) -> nn.Module:
    parts = 2 if scale else 1
    if split_mode == "channel":
        return conv_net((channels + 1) // 2, parts * (channels // 2))
    if split_mode == "channel_inv":
        return conv_net(channels // 2, parts * ((channels + 1) // 2))
    return conv_net(channels, parts * channels)


SCALES = [(True, "exp"), (True, "sigmoid"), (True, "sigmoid_inv"), (False, "exp")]


@pytest.mark.parametrize("scale,scale_map", SCALES)
@pytest.mark.parametrize("split_mode", ["channel", "channel_inv", "checkerboard"])
@pytest.mark.parametrize("channels", [4, 5])
def test_affine_coupling_block_equals_normflows(scale, scale_map, split_mode, channels):
    torch.manual_seed(1)
    net = coupling_net(channels, scale, split_mode)
    ref, new = pair("AffineCouplingBlock", net, scale, scale_map, split_mode)
    assert_same(ref, new, torch.randn(3, channels, 4, 4, dtype=torch.float64))


@pytest.mark.parametrize("scale_map", ["sigmoid_inv", "sigmoid"])
def test_affine_coupling_block_on_vectors_equals_normflows(scale_map):
    torch.manual_seed(2)
    net = nets.MLP([3, 10, 4], init_zeros=False)
    ref, new = pair("AffineCouplingBlock", net, True, scale_map, "channel")
    assert_same(ref, new, torch.randn(5, 5, dtype=torch.float64))


def masks():
    return {
        "alternating": torch.tensor([1.0, 0, 1, 0, 1, 0, 1]),
        "first": torch.tensor([1.0, 1, 1, 0, 0, 0, 0]),
        "channels": torch.tensor([0.0, 1, 1])[:, None, None].expand(3, 2, 2).clone(),
        "checkerboard": (torch.arange(4)[:, None] + torch.arange(4)) % 2 * torch.ones(2, 1, 1),
    }


class Net(nn.Module):
    def __init__(self, shape):
        super().__init__()
        self.shape = shape
        numel = int(torch.tensor(shape).prod())
        self.linear = nn.Linear(numel, numel)

    def forward(self, z):
        return torch.tanh(self.linear(z.flatten(1))).view(-1, *self.shape)


@pytest.mark.parametrize("mask", ["alternating", "first", "channels", "checkerboard"])
@pytest.mark.parametrize("with_scale", [False, True])
def test_masked_affine_flow_equals_normflows(mask, with_scale):
    torch.manual_seed(3)
    b = masks()[mask]
    s = Net(tuple(b.shape)) if with_scale else None
    ref, new = pair("MaskedAffineFlow", b, Net(tuple(b.shape)), s)
    assert_same(ref, new, torch.randn(4, *b.shape, dtype=torch.float64))


@pytest.mark.parametrize("name", ["ActNorm", "AffineConstFlow"])
@pytest.mark.parametrize("shape", [(3, 1, 1), (5,), (3, 2, 2), (1, 1, 1)])
def test_actnorm_and_affine_const_flow_equal_normflows(name, shape):
    torch.manual_seed(4)
    x = 2 * torch.randn(6, *shape[:1], *((3, 2) if len(shape) == 3 else ()), dtype=torch.float64) + 0.5
    if shape == (3, 2, 2):
        x = x[..., :2, :2].contiguous()
    ref, new = pair(name, shape)
    if name == "ActNorm":  # initialize normflows' from data, then perturb and load
        ref(x)
        perturb(ref)
        new.load_state_dict(ref.state_dict())
    assert_same(ref, new, x)


@pytest.mark.parametrize("first", ["forward", "inverse"])
@pytest.mark.parametrize("shape", [(3, 1, 1), (4,)])
def test_actnorm_data_init_is_normflows(first, shape):
    torch.manual_seed(5)
    x = 3 * torch.randn(7, shape[0], *((4, 5) if len(shape) == 3 else ()), dtype=torch.float64) - 1
    ref, new = flows.ActNorm(shape).double(), N.ActNorm(shape).double()
    assert not new.data_dep_init_done
    xa, la = getattr(ref, first)(x)
    xb, lb = getattr(new, first)(x)
    assert bool(new.data_dep_init_done)
    close(new.s, ref.s)
    close(new.t, ref.t)
    close(xb, xa)
    close(torch.as_tensor(lb), torch.as_tensor(la), x[0].numel())
    # Initialized once: the next calls, in either direction, keep the parameters.
    y = torch.randn_like(x)
    for method in ("forward", "inverse"):
        close(getattr(new, method)(y)[0], getattr(ref, method)(y)[0])
    close(new.s, ref.s)


@pytest.mark.parametrize("use_lu", [True, False])
def test_invertible_1x1_conv_equals_normflows(use_lu):
    ref, new = pair("Invertible1x1Conv", 5, use_lu, seed=6, amount=0.1)
    assert_same(ref, new, torch.randn(3, 5, 4, 3, dtype=torch.float64))


GLOWS = [  # (channels, scale, scale_map, split_mode, use_lu, net_actnorm)
    (4, True, "sigmoid", "channel", True, False),
    (4, True, "sigmoid_inv", "channel", True, False),
    (3, True, "sigmoid_inv", "channel_inv", False, False),
    (5, False, "sigmoid", "channel", True, True),
    (4, True, "exp", "checkerboard", True, False),
]


@pytest.mark.parametrize("channels,scale,scale_map,split_mode,use_lu,net_actnorm", GLOWS)
def test_glow_block_equals_normflows(channels, scale, scale_map, split_mode, use_lu, net_actnorm):
    torch.manual_seed(7)
    kwargs = dict(scale=scale, scale_map=scale_map, split_mode=split_mode, use_lu=use_lu, net_actnorm=net_actnorm,
                  init_zeros=False)
    torch.manual_seed(7)
    ref = flows.GlowBlock(channels, 6, **kwargs).double()
    torch.manual_seed(7)
    new = N.GlowBlock(channels, 6, **kwargs).double()
    for (ka, a), (kb, b) in zip(ref.state_dict().items(), new.state_dict().items()):
        assert ka == kb and torch.equal(a, b)  # normflows' draws in normflows' order
    x = torch.randn(3, channels, 4, 4, dtype=torch.float64)
    ref(x), new(x)  # data init
    perturb(ref, 0.05)
    new.load_state_dict(ref.state_dict())
    assert_same(ref, new, x)


def glow_stack(module, seed: int = 8):
    torch.manual_seed(seed)
    return nn.ModuleList([module.GlowBlock(4, 16, use_lu=True, init_zeros=False) for _ in range(4)]).double()


def run_stack(stack, x, method):
    blocks = stack if method == "forward" else list(stack)[::-1]
    total = torch.zeros(x.shape[0], dtype=x.dtype)
    for block in blocks:
        x, log_det = getattr(block, method)(x)
        total = total + log_det
    return x, total


@pytest.mark.parametrize("method", ["forward", "inverse"])
def test_glow_stack_checkpoint_loads_across_with_normflows_outputs_and_gradients(method):
    ref, new = glow_stack(flows), glow_stack(N)
    x = torch.randn(3, 4, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        run_stack(ref, x, method)  # data init of the ActNorms, in this direction
    perturb(ref, 0.05)
    new.load_state_dict(ref.state_dict())
    results = []
    for stack in (ref, new):
        leaf = x.clone().requires_grad_()
        y, log_det = run_stack(stack, leaf, method)
        (y.pow(2).sum() / 2 + y[:, :1].sum() - log_det.sum()).backward()
        results.append([y, log_det, leaf.grad, *(p.grad for p in stack.parameters())])
    for a, b in zip(*results):
        close(b, a)


@pytest.mark.parametrize("latent_size", [2, 5])
@pytest.mark.parametrize("context", [None, 3])
@pytest.mark.parametrize("reverse_mask", [False, True])
def test_coupled_rational_quadratic_spline_equals_normflows(latent_size, context, reverse_mask):
    ref, new = pair("CoupledRationalQuadraticSpline", latent_size, 1, 12, num_context_channels=context, num_bins=4,
                    tail_bound=2.0, reverse_mask=reverse_mask, seed=9)
    x = 1.5 * torch.randn(5, latent_size, dtype=torch.float64)
    x[0, 0], x[1, -1] = 2.0, -3.0  # on the tail bound, in the tails
    extra = (torch.randn(5, context, dtype=torch.float64),) if context else ()
    assert_same(ref, new, x, *extra)


def test_spline_without_tails_equals_normflows():
    ref, new = pair("CoupledRationalQuadraticSpline", 4, 1, 12, num_bins=3, tails=None, seed=10, amount=0.1)
    assert_same(ref, new, torch.rand(5, 4, dtype=torch.float64))


OPS = ["additive_coupling_fwd", "additive_coupling_inv", "affine_coupling_fwd", "affine_coupling_inv",
       "actnorm_fwd", "actnorm_inv", "conv1x1", "invconv_weight", "actnorm_conv1x1", "rq_spline_fwd",
       "rq_spline_inv"]


def acb(scale, scale_map, split_mode="channel"):
    return N.AffineCouplingBlock(coupling_net(4, scale, split_mode), scale, scale_map, split_mode), (2, 4, 4, 4)


def glow(scale_map="sigmoid", use_lu=True):
    block = N.GlowBlock(4, 6, scale_map=scale_map, use_lu=use_lu)
    block(torch.randn(2, 4, 3, 3))  # data init
    return block, (2, 4, 3, 3)


CASES = {  # name: (build, {op: calls for one forward and one inverse})
    "coupling sigmoid_inv": (lambda: acb(True, "sigmoid_inv"), {"affine_coupling_fwd": 1, "affine_coupling_inv": 1}),
    "coupling sigmoid_inv channel_inv": (lambda: acb(True, "sigmoid_inv", "channel_inv"),
                                         {"affine_coupling_fwd": 1, "affine_coupling_inv": 1}),
    "coupling additive": (lambda: acb(False, "exp"), {"additive_coupling_fwd": 1, "additive_coupling_inv": 1}),
    "coupling exp": (lambda: acb(True, "exp"), {}),
    "coupling sigmoid": (lambda: acb(True, "sigmoid"), {}),
    "coupling checkerboard": (lambda: acb(True, "sigmoid_inv", "checkerboard"), {}),
    "masked NICE": (lambda: (N.MaskedAffineFlow(masks()["alternating"], Net((7,))), (3, 7)),
                    {"additive_coupling_fwd": 1, "additive_coupling_inv": 1}),
    "masked affine": (lambda: (N.MaskedAffineFlow(masks()["alternating"], Net((7,)), Net((7,))), (3, 7)), {}),
    "masked checkerboard": (lambda: (N.MaskedAffineFlow(masks()["checkerboard"], Net((2, 4, 4))), (3, 2, 4, 4)), {}),
    "actnorm": (lambda: (N.ActNorm((3, 1, 1)), (2, 3, 4, 4)), {"actnorm_fwd": 1, "actnorm_inv": 1}),
    "actnorm per element": (lambda: (N.ActNorm((3, 4, 4)), (2, 3, 4, 4)), {}),
    "affine const": (lambda: (N.AffineConstFlow((5,)), (2, 5)), {"actnorm_fwd": 1, "actnorm_inv": 1}),
    "1x1 conv lu": (lambda: (N.Invertible1x1Conv(3, True), (2, 3, 2, 2)), {"conv1x1": 2, "invconv_weight": 1}),
    "1x1 conv dense": (lambda: (N.Invertible1x1Conv(3), (2, 3, 2, 2)), {"conv1x1": 2}),
    # forward: coupling, 1x1 conv (W⁻¹), ActNorm; inverse: ActNorm folded into the 1x1 conv, coupling
    "glow": (glow, {"conv1x1": 1, "actnorm_inv": 1, "actnorm_conv1x1": 1, "invconv_weight": 1}),
    "glow sigmoid_inv": (lambda: glow("sigmoid_inv"), {"conv1x1": 1, "actnorm_inv": 1, "actnorm_conv1x1": 1,
                                                        "invconv_weight": 1, "affine_coupling_fwd": 1,
                                                        "affine_coupling_inv": 1}),
    "glow dense": (lambda: glow(use_lu=False), {"conv1x1": 1, "actnorm_inv": 1, "actnorm_conv1x1": 1}),
    # two splines (conditional and unconditional) per direction
    "spline": (lambda: (N.CoupledRationalQuadraticSpline(4, 1, 8, num_bins=4), (3, 4)),
               {"rq_spline_fwd": 2, "rq_spline_inv": 2}),
    "spline without tails": (lambda: (N.CoupledRationalQuadraticSpline(4, 1, 8, num_bins=4, tails=None), (3, 4)), {}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_fused_ops_run_where_normflows_math_is_theirs(monkeypatch, case):
    build, expected = CASES[case]
    torch.manual_seed(11)
    flow, shape = build()
    calls = spy(monkeypatch, OPS)
    z = torch.rand(*shape)
    flow(z)
    flow.inverse(z)
    assert calls == {op: expected.get(op, 0) for op in OPS}


@pytest.mark.parametrize("name", CLASSES)
def test_constructor_signatures_are_normflows(name):
    assert inspect.signature(getattr(N, name)) == inspect.signature(getattr(flows, name))
    assert issubclass(getattr(N, name), getattr(flows, name))


def test_module_resolves_classes_lazily_and_counts_constructions():
    assert set(N.__all__) <= set(dir(N))
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        N.Nope  # noqa: B018
    before = dict(compat.constructed)
    N.GlowBlock(4, 8)
    N.ActNorm((3, 1, 1))
    N.CoupledRationalQuadraticSpline(4, 1, 8)
    after = compat.constructed
    for name, added in [("GlowBlock", 1), ("AffineCouplingBlock", 1), ("Invertible1x1Conv", 1), ("ActNorm", 2),
                        ("CoupledRationalQuadraticSpline", 1)]:
        key = f"normflows.{name}"
        assert after[key] == before.get(key, 0) + added
    assert not any(key.startswith("normflows._") for key in after)
