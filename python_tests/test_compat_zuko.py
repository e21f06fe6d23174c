"""invkernels.compat.zuko: zuko's coupling flows under zuko's names.

The oracle is zuko itself: each compat object, after loading the state dict of the zuko object of
the same class, gives zuko's outputs, log-determinants, samples and gradients (float64, 1e-10),
forward and inverse, without context and with a batched or an unbatched context. A peer-suite
run (scripts/peer_suites.py with a "zuko" entry, docs/compat/zuko.md) runs zuko's own flow tests on
a checkout of its main branch with these classes swapped in.
"""

from __future__ import annotations

import importlib
import inspect

import pytest
import torch
from op_spy import spy

zuko = importlib.import_module("zuko")  # a test extra: make env installs it
zflows = importlib.import_module("zuko.flows")
ztransforms = importlib.import_module("zuko.transforms")
import invkernels.compat as compat  # noqa: E402
import invkernels.compat.zuko as Z  # noqa: E402

RTOL = 1e-10
CONTEXT = 3
# Masks (True: constant features, zuko's convention): constant features first (the op's layout),
# last, zuko's checkered default (None), one or most features constant, scattered, two features.
MASKS = {
    "constant-first": [1, 1, 0, 0, 0],
    "constant-last": [0, 0, 0, 1, 1],
    "default-5": None,
    "default-6": None,
    "one-constant": [1, 0, 0],
    "most-constant": [1, 1, 1, 1, 0, 0, 0],
    "scattered": [0, 1, 1, 0, 1, 0],
    "two": [0, 1],
}
FEATURES = {"default-5": 5, "default-6": 6}
UNIVARIATES = {
    "affine": {},  # zuko's default MonotonicAffineTransform
    "additive": {"univariate": ztransforms.AdditiveTransform, "shapes": [()]},
    "spline": {"univariate": ztransforms.MonotonicRQSTransform, "shapes": [(4,), (4,), (3,)]},
}


def features_of(mask: str) -> int:
    return FEATURES.get(mask) or len(MASKS[mask])


def mask_of(mask: str):
    return None if MASKS[mask] is None else torch.tensor(MASKS[mask], dtype=torch.bool)


def perturbed(module):
    with torch.no_grad():  # parameters away from their init, so every path matters
        for p in module.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return module


def coupling_pair(mask: str, univariate: str, context: int = CONTEXT, **kwargs):
    args = dict(features=features_of(mask), context=context, mask=mask_of(mask), hidden_features=(16,),
                **UNIVARIATES[univariate], **kwargs)
    ref = perturbed(zflows.GeneralCouplingTransform(**args).double())
    new = Z.GeneralCouplingTransform(**args).double()
    new.load_state_dict(ref.state_dict())
    assert new.state_dict().keys() == ref.state_dict().keys()
    assert isinstance(new, zflows.GeneralCouplingTransform)
    return ref, new


def context_of(kind: str, batch=(6,)):
    if kind == "none":
        return None
    if kind == "unbatched":
        return torch.randn(CONTEXT, dtype=torch.float64)
    return torch.randn(*batch, CONTEXT, dtype=torch.float64)


def close(actual, expected):
    assert actual.shape == expected.shape
    assert actual.dtype == expected.dtype
    torch.testing.assert_close(actual, expected, rtol=RTOL, atol=RTOL)


def assert_same_transforms(ref_t, new_t, x):
    assert isinstance(new_t, ztransforms.CouplingTransform)
    close(new_t(x), ref_t(x))
    close(new_t.inv(x), ref_t.inv(x))
    for a, b in zip(ref_t.call_and_ladj(x), new_t.call_and_ladj(x)):
        close(b, a)
    for a, b in zip(ref_t.inv.call_and_ladj(x), new_t.inv.call_and_ladj(x)):
        close(b, a)
    y = ref_t(x)
    close(new_t.log_abs_det_jacobian(x, y), ref_t.log_abs_det_jacobian(x, y))
    close(new_t.inv(new_t(x)), x)


@pytest.mark.parametrize("context", ["none", "batched", "unbatched"])
@pytest.mark.parametrize("univariate", sorted(UNIVARIATES))
@pytest.mark.parametrize("mask", sorted(MASKS))
def test_general_coupling_equals_zuko_after_loading_its_state_dict(mask, univariate, context):
    torch.manual_seed(0)
    ref, new = coupling_pair(mask, univariate, context=0 if context == "none" else CONTEXT)
    c = context_of(context)
    x = 1.5 * torch.randn(6, features_of(mask), dtype=torch.float64)
    assert_same_transforms(ref(c), new(c), x)


@pytest.mark.parametrize("univariate", sorted(UNIVARIATES))
@pytest.mark.parametrize("mask", ["constant-first", "scattered"])
@pytest.mark.parametrize("shapes", ["unbatched x and c", "unbatched x, no c", "batched x, unbatched c",
                                    "x [2, 3, D], c [3, C]", "x [2, 3, D], c [2, 1, C]"])
def test_general_coupling_batch_shapes_equal_zuko(mask, univariate, shapes):
    torch.manual_seed(1)
    features = features_of(mask)
    ref, new = coupling_pair(mask, univariate, context=0 if "no c" in shapes else CONTEXT)
    if shapes.startswith("unbatched x"):
        x = torch.randn(features, dtype=torch.float64)
        c = None if "no c" in shapes else context_of("unbatched")
    elif shapes.startswith("batched x"):
        x, c = torch.randn(4, features, dtype=torch.float64), context_of("unbatched")
    else:
        x = torch.randn(2, 3, features, dtype=torch.float64)
        c = context_of("batched", (3,) if "c [3" in shapes else (2, 1))
    assert_same_transforms(ref(c), new(c), x)


@pytest.mark.parametrize("univariate", sorted(UNIVARIATES))
def test_unbatched_input_with_batched_context_fails_as_zuko_does(univariate):
    torch.manual_seed(2)
    ref, new = coupling_pair("constant-first", univariate)
    x, c = torch.randn(5, dtype=torch.float64), context_of("batched")
    errors = []
    for layer in (ref, new):
        with pytest.raises(Exception) as info:  # noqa: PT011 (zuko's error, whatever it is)
            layer(c)(x)
        errors.append((type(info.value), str(info.value)))
    assert errors[1] == errors[0]


def test_single_feature_is_zukos_element_wise_transform():
    ref = zflows.GeneralCouplingTransform(1, 2)
    new = Z.GeneralCouplingTransform(1, 2)
    assert type(new) is type(ref) is zflows.ElementWiseTransform


@pytest.mark.parametrize("univariate", sorted(UNIVARIATES))
@pytest.mark.parametrize("mask", ["constant-first", "constant-last", "scattered"])
@pytest.mark.parametrize("direction", ["forward", "inverse"])
def test_general_coupling_gradients_equal_zuko(univariate, mask, direction):
    torch.manual_seed(3)
    ref, new = coupling_pair(mask, univariate)
    x = 1.5 * torch.randn(5, features_of(mask), dtype=torch.float64)
    context = context_of("batched", (5,))
    grads = []
    for layer in (ref, new):
        leaf, cond = x.clone().requires_grad_(), context.clone().requires_grad_()
        t = layer(cond)
        if direction == "inverse":
            t = t.inv
        y, ladj = t.call_and_ladj(leaf)
        (y.pow(2).sum() / 2 + y[..., :1].sum() - ladj.sum()).backward()
        grads.append([leaf.grad, cond.grad, *(p.grad for p in layer.parameters())])
    for a, b in zip(*grads):
        close(b, a)


def flow_pair(name="NICE", seed=4, **kwargs):
    torch.manual_seed(seed)
    ref = getattr(zflows, name)(**kwargs).double()
    torch.manual_seed(seed)
    new = getattr(Z, name)(**kwargs).double()
    # Same draws in the same order: the seed alone gives zuko's parameters and masks.
    assert ref.state_dict().keys() == new.state_dict().keys()
    for key, value in ref.state_dict().items():
        assert torch.equal(new.state_dict()[key], value), key
    perturbed(ref)
    new.load_state_dict(ref.state_dict())
    assert isinstance(new, getattr(zflows, name))
    couplings = list(new.transform.transforms)
    assert couplings and all(type(t) is Z.GeneralCouplingTransform for t in couplings)
    return ref, new


def assert_same_flows(ref, new, x, c):
    close(new(c).log_prob(x), ref(c).log_prob(x))
    samples = []
    for flow in (ref, new):
        torch.manual_seed(7)
        samples.append(flow(c).rsample((4,)))
    assert samples[0].dtype == torch.float64
    close(samples[1], samples[0])
    grads = []
    for flow in (ref, new):
        flow.zero_grad()
        leaf = x.clone().requires_grad_()
        cond = None if c is None else c.clone().requires_grad_()
        torch.manual_seed(8)
        loss = -flow(cond).log_prob(leaf).mean() + flow(cond).rsample((3,)).square().mean()
        loss.backward()
        grads.append([leaf.grad, None if cond is None else cond.grad, *(p.grad for p in flow.parameters())])
    for a, b in zip(*grads):
        if a is None:
            assert b is None
        else:
            close(b, a)


@pytest.mark.parametrize("context", ["unbatched", "batched"])
@pytest.mark.parametrize("univariate", ["affine", "additive"])
def test_nice_5_features_2_context_equals_zuko(context, univariate):
    ref, new = flow_pair(features=5, context=2, **UNIVARIATES[univariate])
    x = torch.randn(6, 5, dtype=torch.float64)
    c = torch.randn(2, dtype=torch.float64) if context == "unbatched" else torch.randn(6, 2, dtype=torch.float64)
    assert_same_flows(ref, new, x, c)


@pytest.mark.parametrize("name", ["NICE", "RealNVP"])
@pytest.mark.parametrize("kwargs", [
    {"features": 4, "transforms": 2},
    {"features": 7, "context": 3, "randmask": True, **UNIVARIATES["additive"]},
    {"features": 6, "context": 2, "transforms": 4, **UNIVARIATES["spline"]},
], ids=["affine-unconditional", "additive-randmask", "spline"])
def test_flows_equal_zuko(name, kwargs):
    ref, new = flow_pair(name, seed=5, **kwargs)
    features, context = kwargs["features"], kwargs.get("context", 0)
    x = 1.5 * torch.randn(5, features, dtype=torch.float64)
    c = torch.randn(context, dtype=torch.float64) if context else None
    assert_same_flows(ref, new, x, c)


OPS = ["additive_coupling_fwd", "additive_coupling_inv", "affine_coupling_fwd", "affine_coupling_inv",
       "rq_spline_fwd", "rq_spline_inv"]


@pytest.mark.parametrize("mask,univariate,context,fused", [
    ("constant-first", "additive", "none", "additive_coupling"),
    ("constant-first", "additive", "unbatched", "additive_coupling"),
    ("constant-last", "additive", "batched", "additive_coupling"),
    ("default-5", "additive", "none", "additive_coupling"),
    ("scattered", "additive", "unbatched", "additive_coupling"),
    ("two", "additive", "batched", "additive_coupling"),
    ("constant-first", "affine", "none", "affine_coupling"),
    ("scattered", "affine", "unbatched", "affine_coupling"),
    ("two", "affine", "batched", "affine_coupling"),
    ("constant-first", "spline", "batched", None),
])
def test_fused_ops_run_where_zuko_math_is_theirs(monkeypatch, mask, univariate, context, fused):
    calls = spy(monkeypatch, OPS)
    layer = Z.GeneralCouplingTransform(features_of(mask), 0 if context == "none" else CONTEXT, mask_of(mask),
                                       **UNIVARIATES[univariate])
    c = context_of(context)
    c = None if c is None else c.float()
    x = torch.randn(6, features_of(mask))
    t = layer(c)
    t(x)
    t.inv(x)
    t.call_and_ladj(x)
    expected = dict.fromkeys(OPS, 0)
    if fused:
        expected[f"{fused}_fwd"], expected[f"{fused}_inv"] = 2, 1
    assert calls == expected


@pytest.mark.parametrize("univariate,fused", [("affine", "affine_coupling"), ("additive", "additive_coupling"),
                                              ("spline", None)])
def test_fused_ops_in_flows(monkeypatch, univariate, fused):
    calls = spy(monkeypatch, OPS)
    flow = Z.NICE(features=5, context=2, transforms=3, **UNIVARIATES[univariate])
    c = torch.randn(2)
    flow(c).log_prob(torch.randn(4, 5))
    flow(c).rsample((4,))
    expected = dict.fromkeys(OPS, 0)
    if fused:
        expected[f"{fused}_fwd"], expected[f"{fused}_inv"] = 3, 3
    assert calls == expected


def test_fallback_for_shifts_not_shaped_like_the_features(monkeypatch):
    """An additive univariate with a shift that broadcasts (shape (1,) per feature) is zuko's code."""
    calls = spy(monkeypatch, OPS)
    torch.manual_seed(6)
    args = dict(features=4, mask=torch.tensor([1, 1, 0, 0], dtype=torch.bool),
                univariate=ztransforms.AdditiveTransform, shapes=[(2,)])
    ref = zflows.GeneralCouplingTransform(**args)
    new = Z.GeneralCouplingTransform(**args)
    new.load_state_dict(ref.state_dict())
    x = torch.randn(3, 4)
    errors = []
    for layer in (ref, new):
        with pytest.raises(Exception) as info:  # noqa: PT011 (zuko's error: [3, 2] + [3, 2, 2])
            layer()(x)
        errors.append((type(info.value), str(info.value)))
    assert errors[1] == errors[0]
    assert sum(calls.values()) == 0


@pytest.mark.parametrize("name", ["GeneralCouplingTransform", "NICE", "RealNVP"])
def test_constructor_signatures_are_zukos(name):
    assert inspect.signature(getattr(Z, name)) == inspect.signature(getattr(zflows, name))
    assert inspect.signature(Z.CouplingTransform) == inspect.signature(ztransforms.CouplingTransform)


def test_module_resolves_classes_lazily_and_counts_constructions():
    assert set(Z.__all__) <= set(dir(Z))
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        Z.Nope  # noqa: B018
    before = dict(compat.constructed)
    layer = Z.GeneralCouplingTransform(4)
    layer()
    Z.NICE(features=5, transforms=2)
    Z.RealNVP(features=3, transforms=1)
    Z.GeneralCouplingTransform(1)  # zuko's ElementWiseTransform: not a compat object
    after = compat.constructed

    def grew(key):
        return after[f"zuko.{key}"] - before.get(f"zuko.{key}", 0)

    assert (grew("GeneralCouplingTransform"), grew("CouplingTransform"), grew("NICE"), grew("RealNVP")) == (4, 1, 1, 1)
    for name in ("GeneralCouplingTransform", "NICE", "RealNVP"):
        assert issubclass(getattr(Z, name), getattr(zflows, name))
    assert issubclass(Z.RealNVP, Z.NICE)
    assert issubclass(Z.CouplingTransform, ztransforms.CouplingTransform)
