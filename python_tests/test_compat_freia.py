"""invkernels.compat.freia: FrEIA's blocks under FrEIA's names.

The oracle is FrEIA itself where the installed release computes what its main branch computes
(the coupling blocks, PermuteRandom, SequenceINN's stored forward); AllInOneBlock and ActNorm,
which changed since the release, are checked against their formulas from FrEIA's main branch and
against the dense Jacobian's log-determinant. scripts/peer_suites.py runs FrEIA's own tests on a
checkout of its main branch with these classes swapped in (docs/compat/freia.md).
"""

from __future__ import annotations

import copy
import importlib

import numpy as np
import pytest
import torch
from torch import nn

Fm = importlib.import_module("FrEIA.modules")  # a test extra: make env installs it
Ff = importlib.import_module("FrEIA.framework")
import invkernels.compat as compat  # noqa: E402
import invkernels.compat.freia as Cm  # noqa: E402

ACTIVATIONS = ["ATAN", "TANH", "SIGMOID", lambda u: u / (1 + u.abs())]
COUPLINGS = ["GLOWCouplingBlock", "RNVPCouplingBlock", "AffineCouplingOneSided", "NICECouplingBlock"]


def conv(c_in: int, c_out: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(c_in, 6, 3, padding=1), nn.Tanh(), nn.Conv2d(6, c_out, 3, padding=1))


def mlp(c_in: int, c_out: int) -> nn.Module:
    return nn.Sequential(nn.Linear(c_in, 12), nn.Tanh(), nn.Linear(12, c_out))


def run(block, x, rev=False, c=None):
    kwargs = {} if c is None else {"c": c}
    (y,), logdet = block([x], rev=rev, **kwargs)
    return y, torch.as_tensor(logdet, dtype=torch.float64) + torch.zeros(x.shape[0], dtype=torch.float64)


def assert_same(block_a, block_b, x, c=None, rtol=1e-10):
    for rev in (False, True):
        ya, la = run(block_a, x, rev, c)
        yb, lb = run(block_b, x, rev, c)
        torch.testing.assert_close(ya, yb, rtol=rtol, atol=rtol)
        torch.testing.assert_close(la, lb, rtol=rtol, atol=rtol * x[0].numel())


def dense_logdet(block, x):
    flat = x.reshape(x.shape[0], -1)
    out = []
    for i in range(x.shape[0]):
        jac = torch.autograd.functional.jacobian(
            lambda v: run(block, v.reshape(1, *x.shape[1:]))[0].reshape(-1), flat[i])
        out.append(torch.linalg.slogdet(jac)[1])
    return torch.stack(out)


@pytest.mark.parametrize("name,activation", [(name, a) for name in COUPLINGS[:3] for a in range(len(ACTIVATIONS))]
                         + [("NICECouplingBlock", None)])
@pytest.mark.parametrize("channels", [4, 5])
def test_coupling_blocks_equal_freia_after_loading_its_state_dict(name, channels, activation):
    kwargs = {} if activation is None else {"clamp_activation": ACTIVATIONS[activation], "clamp": 1.5}
    dims = [(channels, 3, 3)]
    ref = getattr(Fm, name)(dims, subnet_constructor=conv, **kwargs).double()
    new = getattr(Cm, name)(dims, subnet_constructor=conv, **kwargs).double()
    new.load_state_dict(ref.state_dict())
    assert new.state_dict().keys() == ref.state_dict().keys()
    x = torch.randn(3, channels, 3, 3, dtype=torch.float64)
    assert_same(ref, new, x)


@pytest.mark.parametrize("name", ["GLOWCouplingBlock", "AffineCouplingOneSided", "RNVPCouplingBlock"])
def test_conditional_couplings_equal_freia(name):
    dims, dims_c = [(6,)], [(2,), (3,)]
    ref = getattr(Fm, name)(dims, dims_c, subnet_constructor=mlp, clamp_activation="TANH").double()
    new = getattr(Cm, name)(dims, dims_c, subnet_constructor=mlp, clamp_activation="TANH").double()
    new.load_state_dict(ref.state_dict())
    x = torch.randn(4, 6, dtype=torch.float64)
    c = [torch.randn(4, 2, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)]
    assert_same(ref, new, x, c)


@pytest.mark.parametrize("split_len", [0.5, 0.3, 2, 3])
def test_split_rounding_is_freias(split_len):
    ref = Fm.GLOWCouplingBlock([(5,)], subnet_constructor=mlp, split_len=split_len)
    new = Cm.GLOWCouplingBlock([(5,)], subnet_constructor=mlp, split_len=split_len)
    assert (new.split_len1, new.split_len2) == (ref.split_len1, ref.split_len2)


def test_permute_random_draws_freias_permutation():
    ref = Fm.PermuteRandom([(7, 2)], seed=11)
    new = Cm.PermuteRandom([(7, 2)], seed=11)
    assert torch.equal(new.perm, ref.perm) and torch.equal(new.perm_inv, ref.perm_inv)
    x = torch.randn(2, 7, 2)
    assert_same(ref, new, x.double())


def allinone_formula(block, x, c=None):
    """FrEIA main's AllInOneBlock forward (hard permutation, no GIN), written out."""
    c1 = x.shape[1] - x.shape[1] // 2
    x1, x2 = x[:, :c1], x[:, c1:]
    a = 0.1 * block.subnet(x1 if c is None else torch.cat([x1, *c], 1))
    alpha = block.clamp
    s = alpha * torch.tanh(a[:, : x2.shape[1]] / alpha)
    u = torch.cat([x1, x2 * torch.exp(s) + a[:, x2.shape[1]:]], 1)
    scale = 0.1 * nn.functional.softplus(block.global_scale, beta=0.5)
    y = (u * scale + block.global_offset)[:, block.w_perm]
    logdet = s.flatten(1).sum(1) + x[0, :1].numel() * torch.log(scale).sum()
    return y, logdet


@pytest.mark.parametrize("shape", [(4, 3, 3), (5, 2, 2), (6,)])
def test_allinone_block_is_freias_formula_and_its_logdet_the_jacobians(shape):
    torch.manual_seed(0)
    block = Cm.AllInOneBlock([shape], subnet_constructor=conv if len(shape) == 3 else mlp, affine_clamping=1.5)
    block.double()
    for p in block.subnet.parameters():
        nn.init.normal_(p, std=0.3)
    with torch.no_grad():
        block.global_offset.normal_()
        block.global_scale.add_(torch.randn_like(block.global_scale))
    x = torch.randn(2, *shape, dtype=torch.float64)
    y, logdet = run(block, x)
    y_ref, logdet_ref = allinone_formula(block, x)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(logdet, logdet_ref, rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(logdet, dense_logdet(block, x), rtol=1e-10, atol=1e-10)
    back, inv_logdet = run(block, y, rev=True)
    torch.testing.assert_close(back, x, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(inv_logdet, -logdet, rtol=1e-12, atol=1e-10)


@pytest.mark.parametrize("kwargs", [{"gin_block": True}, {"global_affine_type": "EXP"},
                                    {"global_affine_type": "SIGMOID"}, {"permute_soft": True},
                                    {"learned_householder_permutation": 2}, {"reverse_permutation": True}])
def test_allinone_block_options_invert_and_give_the_jacobians_logdet(kwargs):
    torch.manual_seed(1)
    block = Cm.AllInOneBlock([(4, 2, 2)], subnet_constructor=conv, **kwargs).double()
    x = torch.randn(2, 4, 2, 2, dtype=torch.float64)
    y, logdet = run(block, x)
    expected = dense_logdet(block, x)
    # FrEIA's rotations (soft, Householder) are float32 matrices, orthogonal to float32 rounding
    # only: their log-det is taken as 0 and their transpose as the inverse, as in FrEIA.
    tol = 1e-10
    if block.householder or kwargs.get("permute_soft"):
        w = block._construct_householder_permutation() if block.householder else block.w_perm
        expected = expected - x[0, :1].numel() * torch.linalg.slogdet(w.reshape(4, 4).double())[1]
        tol = 10 * torch.finfo(torch.float32).eps
    torch.testing.assert_close(logdet, expected, rtol=1e-10, atol=1e-10)
    back, inv_logdet = run(block, y, rev=True)
    torch.testing.assert_close(back, x, rtol=tol, atol=tol)
    torch.testing.assert_close(inv_logdet, -logdet, rtol=tol, atol=tol * x[0].numel())


def test_allinone_block_draws_its_parameters_in_freias_order():
    """FrEIA main draws the permutation (torch.randperm), then builds the subnet: a seed gives the
    block FrEIA gives."""
    torch.manual_seed(3)
    block = Cm.AllInOneBlock([(4,)], subnet_constructor=mlp)
    torch.manual_seed(3)
    perm = torch.randperm(4)
    subnet = mlp(2, 4)
    assert torch.equal(block.w_perm, perm) and torch.equal(block.w_perm_inv, torch.argsort(perm))
    for got, want in zip(block.subnet.state_dict().values(), subnet.state_dict().values()):
        assert torch.equal(got, want)
    assert set(block.state_dict()) == {"global_scale", "global_offset", "w_perm", "w_perm_inv",
                                       *(f"subnet.{k}" for k in subnet.state_dict())}


def test_actnorm_is_freias_formula_initialized_from_the_first_batch():
    x = 3 * torch.randn(16, 3, 2, 2, dtype=torch.float64) + 1
    block = Cm.ActNorm([(3, 2, 2)]).double()
    y, logdet = run(block, x)
    assert bool(block.is_initialized)
    torch.testing.assert_close(y.mean(dim=(0, 2, 3)), torch.zeros(3, dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(y.std(dim=(0, 2, 3)), torch.ones(3, dtype=torch.float64), atol=1e-12, rtol=0)
    x2 = torch.randn(2, 3, 2, 2, dtype=torch.float64)
    y2, logdet2 = run(block, x2)
    torch.testing.assert_close(y2, (x2 - block.loc) / torch.exp(block.log_scale), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(logdet2, dense_logdet(block, x2), rtol=1e-10, atol=1e-10)
    back, _ = run(block, y2, rev=True)
    torch.testing.assert_close(back, x2, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="unconditional"):
        block([x2], c=[x2])


def sequence(cls, memory_free=None):
    torch.manual_seed(5)
    inn = cls(4, 4, 4) if memory_free is None else cls(4, 4, 4, memory_free=memory_free)
    for k in range(3):
        inn.append(Cm.AllInOneBlock, subnet_constructor=conv, affine_clamping=2.0)
        inn.append(Cm.AllInOneBlock, cond=0, cond_shape=(2, 4, 4), subnet_constructor=conv,
                   global_affine_type="EXP" if k == 1 else "SIGMOID")
        inn.append(Cm.ActNorm)
        inn.append(Cm.PermuteRandom, seed=k)
        inn.append(Cm.GLOWCouplingBlock, cond=0, cond_shape=(2, 4, 4), subnet_constructor=conv,
                   clamp_activation="TANH")
        inn.append(Fm.NICECouplingBlock, subnet_constructor=conv)
    return inn.double()


def test_memory_free_sequence_gives_the_gradients_of_freias_sequence_and_keeps_its_state_dict(monkeypatch):
    """AllInOneBlock's fused memory-free backward (affine_coupling_inv_bwd), the generic rebuild of
    the other blocks (FrEIA's own NICECouplingBlock too): FrEIA's SequenceINN's gradients."""
    from op_spy import spy  # noqa: PLC0415

    plain = sequence(Ff.SequenceINN)
    free = sequence(Cm.SequenceINN, memory_free=True)
    x = torch.randn(3, 4, 4, 4, dtype=torch.float64)
    c = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    with torch.no_grad():
        plain(x, c=[c])  # ActNorm's data initialization
    free.load_state_dict(plain.state_dict())
    assert free.state_dict().keys() == plain.state_dict().keys()
    results = []
    calls = spy(monkeypatch, ["affine_coupling_inv_bwd"], importlib.import_module("invkernels.ops.coupling"))
    for inn in (plain, free):
        leaf, cond = x.clone().requires_grad_(), c.clone().requires_grad_()
        z, logdet = inn(leaf, c=[cond])
        (z.pow(2).sum() / 2 - logdet.sum()).backward()
        results.append((z.detach(), logdet.detach(), leaf.grad, cond.grad,
                        [p.grad for p in inn.parameters() if p.requires_grad]))
    assert calls["affine_coupling_inv_bwd"] == 6  # the six AllInOneBlocks, once each
    (z0, l0, gx0, gc0, gp0), (z1, l1, gx1, gc1, gp1) = results
    for a, b in [(z0, z1), (l0, l1), (gx0, gx1), (gc0, gc1), *zip(gp0, gp1)]:
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-10)
    back, _ = free(z1, c=[c], rev=True)
    torch.testing.assert_close(back, x, rtol=1e-10, atol=1e-10)
    clone = copy.deepcopy(free)
    torch.testing.assert_close(clone(x, c=[c])[0], z1, rtol=0, atol=0)


@pytest.mark.parametrize("soft", [False, True], ids=["hard", "soft"])
@pytest.mark.parametrize("shape", [(4, 4, 4), (5,)], ids=["image", "vector"])
def test_memory_free_all_in_one_block_global_affine_and_permutations(shape, soft):
    """AllInOneBlock's memory-free backward undoes its global affine and hard permutation in closed
    form (every global scale activation, frozen global parameters too) and a soft permutation
    through autograd: the gradients of the same sequence run stored. FrEIA keeps the soft
    permutation's rotation and its transpose (the inverse) in float32, so its rebuild is exact to
    float32's precision, not float64's."""
    subnet = conv if len(shape) == 3 else mlp

    def build(memory_free):
        torch.manual_seed(6)
        np.random.seed(6)  # the soft permutation's rotation (scipy)
        inn = Cm.SequenceINN(*shape, memory_free=memory_free)
        for kind in ("SOFTPLUS", "SIGMOID", "EXP"):
            inn.append(Cm.AllInOneBlock, subnet_constructor=subnet, global_affine_type=kind, permute_soft=soft)
        if not soft:
            # Scales at their extremes: the sigmoid's near its cap of 10, the softplus where it is linear.
            inn.append(Cm.AllInOneBlock, subnet_constructor=subnet, global_affine_type="SIGMOID",
                       global_affine_init=9.9999999)
            inn.append(Cm.AllInOneBlock, subnet_constructor=subnet, global_affine_init=4.2)
        inn.module_list[2].global_scale.requires_grad_(False)
        inn.module_list[0].global_offset.requires_grad_(False)
        inn = inn.double()
        with torch.no_grad():
            for p in inn.parameters():
                if p.requires_grad:
                    p.add_(0.1 * torch.randn_like(p))
        return inn

    x = torch.randn(3, *shape, dtype=torch.float64)
    grads = []
    for memory_free in (False, True):
        inn = build(memory_free)
        leaf = x.clone().requires_grad_()
        z, logdet = inn(leaf)
        (z.pow(2).sum() / 2 - 1.7 * logdet.sum()).backward()
        grads.append([leaf.grad] + [p.grad for p in inn.parameters() if p.requires_grad])
    assert all(g is not None for g in grads[1])
    tol = 1e-5 if soft else 1e-10
    for got, want in zip(grads[1], grads[0]):
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)


def test_memory_free_sequence_refuses_what_it_cannot_run():
    with pytest.raises(TypeError, match="memory_free should be a bool"):
        Cm.SequenceINN(4, memory_free="yes")
    inn = Cm.SequenceINN(4, memory_free=True)
    inn.append(Cm.GLOWCouplingBlock, cond=0, cond_shape=(2,), subnet_constructor=mlp)
    inn.append(Cm.GLOWCouplingBlock, cond=1, cond_shape=(3,), subnet_constructor=mlp)
    x = torch.randn(2, 4, requires_grad=True)
    with pytest.raises(ValueError, match=r"one condition; these use conditions \[0, 1\]"):
        inn(x, c=[torch.randn(2, 2), torch.randn(2, 3)])
    single = Cm.SequenceINN(4, memory_free=True)
    single.append(Cm.GLOWCouplingBlock, cond=0, cond_shape=(2,), subnet_constructor=mlp)
    with pytest.raises(ValueError, match="c should be the list of conditions"):
        single(x)


def test_bad_arguments_name_themselves():
    with pytest.raises(ValueError, match='Unknown clamp activation "ATN"'):
        Cm.GLOWCouplingBlock([(4,)], subnet_constructor=mlp, clamp_activation="ATN")
    with pytest.raises(TypeError, match="clamp_activation should be"):
        Cm.GLOWCouplingBlock([(4,)], subnet_constructor=mlp, clamp_activation=3)
    with pytest.raises(ValueError, match="split_len must be in range"):
        Cm.AffineCouplingOneSided([(4,)], subnet_constructor=mlp, split_len=1.5)
    with pytest.raises(ValueError, match="Global affine activation"):
        Cm.AllInOneBlock([(4,)], subnet_constructor=mlp, global_affine_type="RELU")
    with pytest.raises(ValueError, match="subnet_constructor"):
        Cm.AllInOneBlock([(4,)])
    with pytest.raises(ValueError, match="conditions"):
        Cm.GLOWCouplingBlock([(4, 2, 2)], [(2, 3, 3)], subnet_constructor=conv)


def test_module_resolves_classes_lazily_and_counts_constructions():
    assert set(Cm.__all__) <= set(dir(Cm))
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        Cm.Nope  # noqa: B018
    before = compat.constructed["freia.AllInOneBlock"]
    Cm.AllInOneBlock([(4,)], subnet_constructor=mlp)
    assert compat.constructed["freia.AllInOneBlock"] == before + 1
    assert issubclass(Cm.AllInOneBlock, Fm.InvertibleModule)
    assert issubclass(Cm.SequenceINN, Ff.SequenceINN)


def test_memory_free_sequence_replays_dropout_in_train_mode():
    """Subnets with dropout, in training mode: the memory-free backward (AllInOneBlock's fused one
    and the generic rebuild of the two-sided blocks, whose inverse runs the halves in the other
    order) replays the forward's random draws, so the gradients are FrEIA's."""
    def dropout_conv(c_in, c_out):
        return nn.Sequential(nn.Conv2d(c_in, 6, 3, padding=1), nn.Dropout(0.3), nn.Tanh(),
                             nn.Conv2d(6, c_out, 3, padding=1))

    def build(cls, **kwargs):
        torch.manual_seed(11)
        inn = cls(4, 4, 4, **kwargs)
        for _ in range(2):
            inn.append(Cm.AllInOneBlock, subnet_constructor=dropout_conv)
            inn.append(Cm.GLOWCouplingBlock, subnet_constructor=dropout_conv)
            inn.append(Cm.RNVPCouplingBlock, subnet_constructor=dropout_conv)
            inn.append(Cm.NICECouplingBlock, subnet_constructor=dropout_conv)
        return inn.double().train()

    plain, free = build(Ff.SequenceINN), build(Cm.SequenceINN, memory_free=True)
    free.load_state_dict(plain.state_dict())
    x = torch.randn(3, 4, 4, 4, dtype=torch.float64)
    grads = []
    for inn in (plain, free):
        torch.manual_seed(3)
        leaf = x.clone().requires_grad_()
        z, logdet = inn(leaf)
        (z.pow(2).sum() - logdet.sum()).backward()
        grads.append([leaf.grad, *(p.grad for p in inn.parameters() if p.requires_grad)])
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-10)


def test_memory_free_sequence_refuses_a_foreign_block_with_dropout_in_training():
    """FrEIA's own two-sided block draws other masks in its inverse: refused, not silently wrong."""
    def dropout_mlp(c_in, c_out):
        return nn.Sequential(nn.Linear(c_in, 8), nn.Dropout(0.2), nn.Linear(8, c_out))

    inn = Cm.SequenceINN(4, memory_free=True)
    inn.append(Cm.AllInOneBlock, subnet_constructor=dropout_mlp)
    inn.append(Fm.GLOWCouplingBlock, subnet_constructor=dropout_mlp)
    x = torch.randn(3, 4, requires_grad=True)
    with pytest.raises(ValueError, match=r"cannot rebuild block 1 \(FrEIA.modules.coupling_layers.GLOWCouplingBlock\) "
                                         r"with dropout in training mode"):
        inn(x)
    inn.eval()
    z, logdet = inn(x)
    (z.sum() + logdet.sum()).backward()
    assert x.grad is not None
