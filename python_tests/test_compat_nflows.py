"""invkernels.compat.nflows: nflows' coupling transforms under nflows' names.

The oracle is nflows itself: each compat object, after loading the state dict of the nflows object
of the same class, gives nflows' outputs, log-determinants and gradients (float64, 1e-10), forward
and inverse, with and without context. scripts/peer_suites.py runs nflows' own coupling and Real NVP
tests on a checkout of its main branch with these classes swapped in.
"""

from __future__ import annotations

import importlib
import inspect

import pytest
import torch
from torch import nn
from op_spy import spy

C = importlib.import_module("nflows.transforms.coupling")  # a test extra: make env installs it
nets = importlib.import_module("nflows.nn.nets")
realnvp = importlib.import_module("nflows.flows.realnvp")
import invkernels.compat as compat  # noqa: E402
import invkernels.compat.nflows as N  # noqa: E402

RTOL = 1e-10
COUPLINGS = ["AffineCouplingTransform", "AdditiveCouplingTransform", "PiecewiseRationalQuadraticCouplingTransform"]
SPLINE = {"num_bins": 4, "tails": "linear", "tail_bound": 2.0}
# Masks (> 0: transformed): identity features first (the op's layout), last, alternating, and
# splits that pass more or fewer than C // 2 features through.
MASKS = {
    "identity-first": [-1, -1, -1, 1, 1, 1, 1],
    "identity-last": [1, 1, 1, 1, -1, -1, -1],
    "alternating": [-1, 1, -1, 1, -1, 1],
    "uneven": [-1, -1, 1, 1, 1, 1],
    "scattered": [1, -1, -1, 1, 1, -1, 1],
}


def kwargs_of(name: str) -> dict:
    return dict(SPLINE) if name.startswith("Piecewise") else {}


def mlp_factory(context_features=None, hidden=12):
    def create(in_features, out_features):
        return nets.ResidualNet(in_features, out_features, hidden_features=hidden, num_blocks=1,
                                context_features=context_features)

    return create


def conv_factory(in_channels, out_channels):
    return nets.ConvResidualNet(in_channels, out_channels, hidden_channels=6, num_blocks=1)


def pair(name, mask, create, **kwargs):
    ref = getattr(C, name)(mask, create, **kwargs).double()
    new = getattr(N, name)(mask, create, **kwargs).double()
    with torch.no_grad():  # parameters far from their zero-ish init, so every path matters
        for p in ref.parameters():
            p.add_(0.3 * torch.randn_like(p))
    new.load_state_dict(ref.state_dict())
    assert new.state_dict().keys() == ref.state_dict().keys()
    assert isinstance(new, getattr(C, name))
    return ref, new


def assert_same(ref, new, x, context=None):
    for method in ("forward", "inverse"):
        za, la = getattr(ref, method)(x, context)
        zb, lb = getattr(new, method)(x, context)
        torch.testing.assert_close(zb, za, rtol=RTOL, atol=RTOL)
        torch.testing.assert_close(torch.as_tensor(lb) + torch.zeros(x.shape[0], dtype=x.dtype),
                                   torch.as_tensor(la) + torch.zeros(x.shape[0], dtype=x.dtype),
                                   rtol=RTOL, atol=RTOL * x[0].numel())


def inputs_for(features, batch=5):
    x = 1.5 * torch.randn(batch, features, dtype=torch.float64)
    x[0, :2] = x[0, -2:] = torch.tensor([2.0, -2.0])  # on the spline's tail bound
    x[1, :2] = x[1, -2:] = torch.tensor([2.5, -3.0])  # in its linear tails
    return x


@pytest.mark.parametrize("mask", sorted(MASKS))
@pytest.mark.parametrize("name", COUPLINGS)
@pytest.mark.parametrize("with_context", [False, True])
def test_couplings_equal_nflows_after_loading_its_state_dict(name, mask, with_context):
    torch.manual_seed(0)
    mask = torch.tensor(MASKS[mask])
    ref, new = pair(name, mask, mlp_factory(3 if with_context else None), **kwargs_of(name))
    x = inputs_for(len(mask))
    context = torch.randn(5, 3, dtype=torch.float64) if with_context else None
    assert_same(ref, new, x, context)


@pytest.mark.parametrize("name", COUPLINGS)
@pytest.mark.parametrize("mask", [[-1, 1, 1], [1, 1, -1, -1]])
def test_image_couplings_equal_nflows(name, mask):
    torch.manual_seed(1)
    ref, new = pair(name, torch.tensor(mask), conv_factory, **kwargs_of(name))
    x = 1.5 * torch.randn(2, len(mask), 3, 2, dtype=torch.float64)
    assert_same(ref, new, x)


class PlainNet(nn.Module):
    """A transform net without ``hidden_features`` (nflows warns and leaves the bin sizes as they are)."""

    def __init__(self, in_features, out_features):
        super().__init__()
        self.linear = nn.Linear(in_features, out_features)

    def forward(self, inputs, context=None):
        return self.linear(inputs)


@pytest.mark.parametrize("variant", ["no tails", "unconditional", "unconditional, identity first", "plain net",
                                     "many bins"])
def test_spline_variants_equal_nflows(variant):
    torch.manual_seed(2)
    mask, create, kwargs = torch.tensor(MASKS["identity-last"]), mlp_factory(), dict(SPLINE)
    x = inputs_for(7)
    if variant == "no tails":
        kwargs = {"num_bins": 3}
        x = torch.rand(5, 7, dtype=torch.float64)
    elif variant.startswith("unconditional"):
        kwargs["apply_unconditional_transform"] = True
        if variant.endswith("first"):
            mask = torch.tensor(MASKS["identity-first"])
    elif variant == "plain net":
        create = PlainNet
    else:
        kwargs["num_bins"] = 9
    ref, new = pair("PiecewiseRationalQuadraticCouplingTransform", mask, create, **kwargs)
    if variant == "plain net":
        with pytest.warns(UserWarning, match="not scaled down"):
            assert_same(ref, new, x)
    else:
        assert_same(ref, new, x)


OPS = ["additive_coupling_fwd", "additive_coupling_inv", "affine_coupling_fwd", "affine_coupling_inv",
       "rq_spline_fwd", "rq_spline_inv"]


@pytest.mark.parametrize("name,mask,kwargs,fused", [
    ("AdditiveCouplingTransform", "identity-first", {}, "additive_coupling"),
    ("AdditiveCouplingTransform", "identity-last", {}, "additive_coupling"),
    ("AdditiveCouplingTransform", "alternating", {}, "additive_coupling"),
    ("AdditiveCouplingTransform", "uneven", {}, "additive_coupling"),
    ("AdditiveCouplingTransform", "scattered", {}, "additive_coupling"),
    ("AffineCouplingTransform", "identity-first", {}, "affine_coupling"),
    ("AffineCouplingTransform", "alternating", {}, "affine_coupling"),
    ("PiecewiseRationalQuadraticCouplingTransform", "identity-first", SPLINE, "rq_spline"),
    ("PiecewiseRationalQuadraticCouplingTransform", "scattered", SPLINE, "rq_spline"),
    ("PiecewiseRationalQuadraticCouplingTransform", "uneven", {**SPLINE, "apply_unconditional_transform": True},
     "rq_spline"),
    ("PiecewiseRationalQuadraticCouplingTransform", "identity-first", {"num_bins": 4}, None),
    ("PiecewiseRationalQuadraticCouplingTransform", "identity-first", {**SPLINE, "min_bin_width": 0.25}, None),
])
def test_fused_ops_run_where_nflows_math_is_theirs(monkeypatch, name, mask, kwargs, fused):
    calls = spy(monkeypatch, OPS)
    mask = torch.tensor(MASKS[mask])
    layer = getattr(N, name)(mask, mlp_factory(), **kwargs)
    x = torch.rand(3, len(mask))
    layer(x)
    layer.inverse(x)
    expected = {op: 0 for op in OPS}
    if fused is not None:
        expected[f"{fused}_fwd"] = expected[f"{fused}_inv"] = 1
    assert calls == expected


@pytest.mark.parametrize("name", COUPLINGS)
@pytest.mark.parametrize("mask", ["identity-first", "identity-last"])
@pytest.mark.parametrize("method", ["forward", "inverse"])
def test_gradients_equal_nflows(name, mask, method):
    torch.manual_seed(3)
    mask = torch.tensor(MASKS[mask])
    ref, new = pair(name, mask, mlp_factory(3), **kwargs_of(name))
    x = inputs_for(len(mask))
    context = torch.randn(5, 3, dtype=torch.float64)
    grads = []
    for layer in (ref, new):
        leaf, cond = x.clone().requires_grad_(), context.clone().requires_grad_()
        z, logabsdet = getattr(layer, method)(leaf, cond)
        (z.pow(2).sum() / 2 + z[:, :1].sum() - logabsdet.sum()).backward()
        grads.append([leaf.grad, cond.grad, *(p.grad for p in layer.parameters())])
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, rtol=RTOL, atol=RTOL)


def flows(seed=4, **kwargs):
    kwargs = {"features": 8, "hidden_features": 32, "num_layers": 4, "num_blocks_per_layer": 1,
              "batch_norm_between_layers": False, **kwargs}
    torch.manual_seed(seed)
    ref = realnvp.SimpleRealNVP(**kwargs).double()
    torch.manual_seed(seed)
    new = N.SimpleRealNVP(**kwargs).double()
    return ref, new


@pytest.mark.parametrize("volume_preserving", [False, True])
def test_simple_real_nvp_equals_nflows(volume_preserving):
    ref, new = flows(use_volume_preserving=volume_preserving)
    # Same draws in the same order: the seed alone gives nflows' parameters.
    for (ka, a), (kb, b) in zip(ref.state_dict().items(), new.state_dict().items()):
        assert ka == kb and torch.equal(a, b)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.2 * torch.randn_like(p))
    new.load_state_dict(ref.state_dict())
    assert isinstance(new, realnvp.SimpleRealNVP)
    kind = N.AdditiveCouplingTransform if volume_preserving else N.AffineCouplingTransform
    assert all(type(layer) is kind for layer in new._transform._transforms)
    x = torch.randn(6, 8, dtype=torch.float64)
    torch.testing.assert_close(new.log_prob(x), ref.log_prob(x), rtol=RTOL, atol=RTOL)
    samples = []
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # nflows' StandardNormal draws its noise in the default dtype
    try:
        for flow in (ref, new):
            torch.manual_seed(7)
            samples.append(flow.sample(5))
    finally:
        torch.set_default_dtype(default)
    assert samples[0].dtype == torch.float64
    torch.testing.assert_close(samples[1], samples[0], rtol=RTOL, atol=RTOL)
    grads = []
    for flow in (ref, new):
        flow.zero_grad()
        leaf = x.clone().requires_grad_()
        (-flow.log_prob(leaf).mean()).backward()
        grads.append([leaf.grad, *(p.grad for p in flow.parameters())])
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, rtol=RTOL, atol=RTOL)


def test_simple_real_nvp_with_batch_norm_between_layers_equals_nflows():
    ref, new = flows(batch_norm_between_layers=True, use_volume_preserving=True)
    new.load_state_dict(ref.state_dict())
    x = torch.randn(6, 8, dtype=torch.float64)
    torch.testing.assert_close(new.log_prob(x), ref.log_prob(x), rtol=RTOL, atol=RTOL)  # training mode
    ref.eval(), new.eval()
    torch.testing.assert_close(new.log_prob(x), ref.log_prob(x), rtol=RTOL, atol=RTOL)


@pytest.mark.parametrize("name", COUPLINGS)
def test_constructor_signatures_are_nflows(name):
    assert inspect.signature(getattr(N, name)) == inspect.signature(getattr(C, name))
    assert inspect.signature(N.SimpleRealNVP) == inspect.signature(realnvp.SimpleRealNVP)


def test_module_resolves_classes_lazily_and_counts_constructions():
    assert set(N.__all__) <= set(dir(N))
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        N.Nope  # noqa: B018
    before = dict(compat.constructed)
    N.AdditiveCouplingTransform([-1, 1], mlp_factory())
    N.SimpleRealNVP(features=4, hidden_features=8, num_layers=2, num_blocks_per_layer=1)
    after = compat.constructed
    assert after["nflows.AdditiveCouplingTransform"] == before.get("nflows.AdditiveCouplingTransform", 0) + 1
    assert after["nflows.AffineCouplingTransform"] == before.get("nflows.AffineCouplingTransform", 0) + 2
    assert after["nflows.SimpleRealNVP"] == before.get("nflows.SimpleRealNVP", 0) + 1
    for name in COUPLINGS:
        assert issubclass(getattr(N, name), getattr(C, name))
    assert issubclass(N.SimpleRealNVP, realnvp.SimpleRealNVP)
