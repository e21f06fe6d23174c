"""Loading state dicts: the fixed (not learned) buffers of InvConv1x1 and Permute are validated, so a
tampered checkpoint cannot make the reported log-det wrong."""

import pytest
import torch

from invkernels.nn import InvConv1x1, Permute


def test_invconv_rejects_a_perm_that_is_not_a_permutation():
    layer = InvConv1x1(4)
    state = layer.state_dict()
    state["perm"] = torch.zeros(4, dtype=torch.int64)
    with pytest.raises(ValueError, match=r"InvConv1x1: buffer 'perm' \(state dict key 'perm'\) should be a "
                                         r"permutation of 0..3 \(each index once\), got \[0, 0, 0, 0\]"):
        layer.load_state_dict(state)


@pytest.mark.parametrize("value", [2.0, 0.0, 0.5])
def test_invconv_rejects_a_sign_other_than_plus_or_minus_one(value):
    layer = InvConv1x1(3)
    before = layer.sign.clone()
    state = layer.state_dict()
    state["sign"] = torch.tensor([1.0, value, -1.0])
    with pytest.raises(ValueError, match=r"InvConv1x1: buffer 'sign' \(state dict key 'sign'\) should have shape "
                                         r"\[3\] with every entry \+1 or -1"):
        layer.load_state_dict(state)
    assert torch.equal(layer.sign, before)


def test_invconv_valid_state_dict_loads_under_a_prefix():
    torch.manual_seed(0)
    source = torch.nn.Sequential(InvConv1x1(5))
    target = torch.nn.Sequential(InvConv1x1(5))
    target.load_state_dict(source.state_dict())
    x = torch.randn(2, 5, 3, 3)
    torch.testing.assert_close(target(x)[0], source(x)[0], rtol=0, atol=0)
    state = source.state_dict()
    state["0.perm"] = torch.tensor([0, 1, 1, 3, 4])
    with pytest.raises(ValueError, match=r"buffer 'perm' \(state dict key '0.perm'\)"):
        target.load_state_dict(state)


def test_permute_rejects_a_bad_perm_or_a_mismatched_inverse():
    layer = Permute(4, "random")
    state = layer.state_dict()
    bad = dict(state, perm=torch.tensor([3, 3, 1, 0]))
    with pytest.raises(ValueError, match=r"Permute: buffer 'perm' \(state dict key 'perm'\) should be a permutation"):
        layer.load_state_dict(bad)
    mismatched = dict(state, inverse_perm=torch.arange(4) if not torch.equal(state["perm"], torch.arange(4))
                      else torch.tensor([1, 0, 2, 3]))
    with pytest.raises(ValueError, match=r"Permute: buffer 'inverse_perm' .* should be the inverse of perm"):
        layer.load_state_dict(mismatched)


def test_permute_loads_a_valid_perm_without_its_inverse():
    layer = Permute(5)
    perm = torch.tensor([2, 0, 4, 1, 3])
    layer.load_state_dict({"perm": perm}, strict=False)
    x = torch.randn(3, 5)
    y, _ = layer(x)
    assert torch.equal(y, x[:, perm]) and torch.equal(layer.inverse(y), x)
