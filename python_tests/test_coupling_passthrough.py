"""The coupling ops' ``passthrough``: any split of the channels, fused.

The op matrix (test_op_matrix.py) checks every op's ``passthrough`` variants against the float64
reference, with gradcheck and opcheck, on every backend; here: the split is the one the default
split would give on a narrower tensor (bit for bit), autograd through the functional API, and the
messages.
"""

from __future__ import annotations

import pytest
import torch
from optest import KERNEL_BACKENDS, to_device

from invkernels._validation import logdet_dtype
from invkernels.ops import coupling as C

F64 = torch.float64


def ops_of(backend: str):
    return C.cpp_ops() if backend == "cpp" else C.triton_ops()


@pytest.mark.parametrize("backend_device", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, F64, torch.bfloat16])
@pytest.mark.parametrize("shape,passthrough", [((3, 9), 7), ((2, 5, 3, 2), 4), ((4, 6, 5), 3), ((2, 7, 1), 5)])
def test_passthrough_is_the_default_split_of_the_last_channels(backend_device, dtype, shape, passthrough):
    """With ``C - p <= p`` the op with ``passthrough=p`` equals the default-split op on the last
    ``2 (C - p)`` channels with the others copied (values, log-dets, gradients; bit for bit): the
    passthrough half longer than the transformed one, where the tiles only copy."""
    backend, device = backend_device
    ops = ops_of(backend)
    c2 = shape[1] - passthrough
    k = shape[1] - 2 * c2
    x = to_device(torch.randn(shape, dtype=F64), device).to(dtype)
    h = to_device(torch.randn(shape[0], 2 * c2, *shape[2:], dtype=F64), device).to(dtype)
    t = h[:, :c2].contiguous()
    g = to_device(torch.randn(shape, dtype=F64), device).to(dtype)
    gl = to_device(torch.randn(shape[0], dtype=F64), device).to(logdet_dtype(dtype))

    def tail(v):
        return v[:, k:].contiguous()

    def whole(v, part):
        return torch.cat([v[:, :k], part], 1)

    for scale in ("exp", "sigmoid"):
        for op in (ops.affine_fwd, ops.affine_inv):
            y, logdet = op(x, h, scale, 1.5, passthrough)
            y2, logdet2 = op(tail(x), h, scale, 1.5)
            assert torch.equal(y, whole(x, y2)) and torch.equal(logdet, logdet2)
        for reverse in (False, True):
            g_in, g_h = ops.affine_bwd(g, gl, x, h, scale, 1.5, reverse, passthrough)
            g_in2, g_h2 = ops.affine_bwd(tail(g), gl, tail(x), h, scale, 1.5, reverse)
            assert torch.equal(g_in, whole(g, g_in2)) and torch.equal(g_h, g_h2)
        got = ops.affine_inv_bwd(x, h, g, gl, scale, 1.5, passthrough)
        want = ops.affine_inv_bwd(tail(x), h, tail(g), gl, scale, 1.5)
        assert torch.equal(got[0], whole(x, want[0])) and torch.equal(got[1], whole(g, want[1]))
        assert torch.equal(got[2], want[2])
    for op in (ops.additive_fwd, ops.additive_inv):
        assert torch.equal(op(x, t, passthrough), whole(x, op(tail(x), t)))
    for reverse in (False, True):
        g_in, g_h = ops.additive_bwd(g, reverse, passthrough)
        g_in2, g_h2 = ops.additive_bwd(tail(g), reverse)
        assert torch.equal(g_in, whole(g, g_in2)) and torch.equal(g_h, g_h2)
    got = ops.additive_inv_bwd(x, t, g, passthrough)
    want = ops.additive_inv_bwd(tail(x), t, tail(g))
    assert all(torch.equal(a, whole(v, b)) for a, b, v in zip(got[:2], want[:2], (x, g)))
    assert torch.equal(got[2], want[2])


@pytest.mark.parametrize("passthrough", [0, 1, 3])
def test_passthrough_through_autograd_and_the_functional_api(passthrough):
    """``affine_coupling_fwd(..., passthrough=p)`` and the additive op on every backend: the passed
    channels' gradient is the output's; values and gradients equal the reference's."""
    x = torch.randn(3, 5, 2, dtype=F64)
    c2 = 5 - passthrough
    h = torch.randn(3, 2 * c2, 2, dtype=F64)
    gy, gl = torch.randn_like(x), torch.randn(3, dtype=F64)
    results = {}
    for backend in ("reference", "cpp", "triton"):
        a, b, t = x.clone().requires_grad_(), h.clone().requires_grad_(), h[:, :c2].clone().requires_grad_()
        y, logdet = C.affine_coupling_fwd(a, b, "exp", 2.0, passthrough, backend=backend)
        y_add = C.additive_coupling_fwd(a, t, passthrough, backend=backend)
        ((y + y_add) * gy).sum().backward(inputs=[a, b, t], retain_graph=True)
        (logdet * gl).sum().backward(inputs=[a, b])
        assert torch.equal(a.grad[:, :passthrough], 2 * gy[:, :passthrough])
        back, _ = C.affine_coupling_inv(y.detach(), h, "exp", 2.0, passthrough, backend=backend)
        torch.testing.assert_close(back, x, rtol=1e-12, atol=1e-12)
        results[backend] = (y, logdet, y_add, a.grad, b.grad, t.grad)
    for backend in ("cpp", "triton"):
        for got, want in zip(results[backend], results["reference"]):
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", ["reference", "cpp", "triton"])
def test_passthrough_messages(backend):
    x = torch.randn(2, 5, 3)
    with pytest.raises(ValueError, match=r"passthrough should be an integer in \[0, C\) = \[0, 5\) for x with C=5, "
                                         r"got 5"):
        C.affine_coupling_fwd(x, torch.randn(2, 2, 3), "exp", 2.0, 5, backend=backend)
    with pytest.raises(ValueError, match=r"h should have 2 \* \(C - passthrough\) = 4 channels for y with C=5, "
                                         r"passthrough=3, got 6"):
        C.affine_coupling_inv(x, torch.randn(2, 6, 3), "exp", 2.0, 3, backend=backend)
    with pytest.raises(ValueError, match=r"h should have C - passthrough = 4 channels for x with C=5, "
                                         r"passthrough=1, got 3"):
        C.additive_coupling_fwd(x, torch.randn(2, 3, 3), 1, backend=backend)
    with pytest.raises(ValueError, match=r"h should have 2 \* \(C - C // 2\) = 6 channels"):
        C.affine_coupling_fwd(x, torch.randn(2, 4, 3), backend=backend)


def _mlp(c_in: int, c_out: int) -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(c_in, 8), torch.nn.Tanh(), torch.nn.Linear(8, c_out))


@pytest.mark.parametrize("backend", ["reference", "cpp", "triton"])
def test_modules_split_where_passthrough_says_and_train_memory_free(backend):
    """Couplings with ``passthrough=p``: the subnet sees ``x[:, :p]``, the output is the reference
    coupling's, and a memory-free chain of them gives the stored chain's gradients (float64)."""
    from invkernels.nn import AdditiveCoupling, AffineCoupling, InvertibleSequential, Permute, RQSplineCoupling

    torch.manual_seed(0)
    blocks = [AffineCoupling(5, _mlp, passthrough=4, backend=backend), Permute(5, "reverse"),
              AdditiveCoupling(5, _mlp, passthrough=1, backend=backend), Permute(5, "reverse"),
              RQSplineCoupling(5, _mlp, passthrough=3, bins=3, backend=backend)]
    for block in blocks:
        for p in block.parameters():
            torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(4, 5, dtype=F64)
    affine = blocks[0].double()
    y, logdet = affine(x)
    want, want_logdet = C.affine_coupling_fwd(x, affine.subnet(x[:, :4]), "exp", 2.0, 4, backend="reference")
    torch.testing.assert_close(y, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(logdet, want_logdet, rtol=1e-12, atol=1e-12)
    assert affine.subnet[0].in_features == 4 and affine.subnet[-1].out_features == 2
    grads = []
    for memory_free in (False, True):
        chain = InvertibleSequential(*blocks, memory_free=memory_free).double()
        leaf = x.clone().requires_grad_()
        z, ld = chain(leaf)
        (z.pow(2).sum() - ld.sum()).backward()
        grads.append([leaf.grad, *(p.grad.clone() for p in chain.parameters())])
        chain.zero_grad(set_to_none=True)
        torch.testing.assert_close(chain.inverse(z.detach()), x, rtol=1e-10, atol=1e-10)
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-10)


def test_module_passthrough_is_checked():
    from invkernels.nn import AffineCoupling

    for bad in (0, 5, 2.0, True):
        with pytest.raises(ValueError, match=r"AffineCoupling: passthrough should be None \(channels // 2\) or an "
                                             r"integer in \[1, channels\) = \[1, 5\)"):
            AffineCoupling(5, _mlp, passthrough=bad)
