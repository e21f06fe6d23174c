"""Accuracy of the scale functions of the affine coupling for every clamp and raw log-scale, and
per-element results that do not depend on the tensor's size (docs/ops/coupling.md, "Accuracy").

The soft clamp ``L = c * tanh(h / c)`` of the "exp" scale must be accurate for small ``h / c``,
which every large clamp produces: the textbook ``tanh(u) = 1 - 2 / (1 + exp(2u))`` loses all of its
digits there. The log-scale of one element is read from the op's log-det: sample ``b`` of a
``[N, 2, S]`` input carries its test value at position ``b % S`` of the transformed half and the
neutral raw value (``L = 0``) everywhere else, so ``logdet[b] = L(h_b)`` exactly while ``h_b``
runs through the vector loop or its remainder as in any other tensor.
"""

import math
import os

import numpy as np
import pytest
import torch

from invkernels.ops import coupling as C
from invkernels.reference import coupling as R

BACKENDS = ["cpp", pytest.param("triton", marks=pytest.mark.triton),
            pytest.param("cuda-cpp", marks=pytest.mark.cuda), pytest.param("cuda-triton", marks=pytest.mark.cuda)]
CLAMPS = [0.5, 2.0, 100.0, 1e6]
# |h| from 1e-6 to 50: 36 magnitudes, each with 3 nearby values of either sign.
MAGNITUDES = np.geomspace(1e-6, 50.0, 36)
SPATIAL = 67  # 4 full AVX512 float vectors and a remainder of 3


def ops_of(backend):
    """The ops of ``backend`` and the device of their inputs ("cuda-cpp": the C++ CUDA kernels)."""
    device = "cuda" if backend.startswith("cuda-") else "cpu"
    return (C.cpp_ops() if backend.endswith("cpp") else C.triton_ops()), device


def raw_values(dtype):
    """``[len(MAGNITUDES), 6]`` raw log-scales in ``dtype``: row m holds ±MAGNITUDES[m] * (1, 1.1, 1.3)."""
    base = torch.tensor(MAGNITUDES, dtype=torch.float64)[:, None] * torch.tensor([1.0, 1.1, 1.3, -1.0, -1.1, -1.3])
    return base.to(dtype)


def one_hot_inputs(hs, neutral, spatial=SPATIAL):
    """x, h of shape ``[N, 2, spatial]`` for the N raw log-scales ``hs``: sample b has x2 = 1, t = 0,
    ``hs[b]`` at position ``b % spatial`` and ``neutral`` elsewhere."""
    n = hs.shape[0]
    x = torch.ones(n, 2, spatial, dtype=hs.dtype)
    h = torch.zeros(n, 2, spatial, dtype=hs.dtype)
    h[:, 0] = neutral
    pos = torch.arange(n) % spatial
    h[torch.arange(n), 0, pos] = hs
    return x, h, pos


def exact_soft_clamp(hs, clamp):
    """``(L, exp(L))`` with ``L = clamp * tanh(hs / clamp)``, in long double (64-bit mantissa), as float64."""
    h = hs.double().numpy().astype(np.longdouble)
    c = np.longdouble(clamp)
    L = c * np.tanh(h / c)
    return torch.from_numpy(L.astype(np.float64)), torch.from_numpy(np.exp(L).astype(np.float64))


def ulp(v, dtype):
    """One unit in the last place of ``|v|`` in ``dtype``."""
    a = v.abs().to(dtype)
    return (torch.nextafter(a, torch.tensor(math.inf, dtype=dtype)) - a).double()


def assert_within_twice_the_reference_error(got, ref_low, exact, dtype, what):
    """Per magnitude (row): max |got - exact| <= 2 * max |ref_low - exact| + 2 ulp of max |exact|."""
    err = (got.double() - exact).abs().amax(dim=1)
    ref_err = (ref_low.double() - exact).abs().amax(dim=1)
    bound = 2 * ref_err + 2 * ulp(exact.abs().amax(dim=1), dtype)
    bad = (err > bound).nonzero().flatten()
    assert bad.numel() == 0, (what, [(MAGNITUDES[i], err[i].item(), bound[i].item()) for i in bad.tolist()])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("clamp", CLAMPS)
def test_soft_clamp_log_scale_and_output_are_accurate_for_every_clamp(backend, dtype, clamp):
    values = raw_values(dtype)
    hs = values.flatten()
    x, h, pos = one_hot_inputs(hs, neutral=0.0)
    ops, device = ops_of(backend)
    y, logdet = (t.cpu() for t in ops.affine_fwd(x.to(device), h.to(device), "exp", clamp))
    exact, exact_y = (t.view_as(values) for t in exact_soft_clamp(hs, clamp))
    # The reference in the same dtype: clamp * torch.tanh(hs / clamp).
    ref_low = R.log_scale(values, "exp", clamp)
    assert logdet.dtype == dtype
    assert_within_twice_the_reference_error(logdet.view_as(values), ref_low, exact, dtype, "log-scale")
    y2 = y[torch.arange(hs.shape[0]), 1, pos].view_as(values)
    assert_within_twice_the_reference_error(y2, torch.exp(ref_low), exact_y, dtype, "y = exp(L)")


def exact_log_sigmoid(hs):
    z = hs.double().numpy().astype(np.longdouble) + 2
    return torch.from_numpy((np.minimum(z, 0) - np.log1p(np.exp(-np.abs(z)))).astype(np.float64))


@pytest.mark.parametrize("backend", BACKENDS)
def test_sigmoid_log_scale_keeps_its_relative_accuracy_for_large_raw_values(backend):
    """L = log sigmoid(hs + 2) -> -exp(-(hs + 2)) for large hs; log(1 + e) rounds it to 0 once
    e < 2^-24. The neutral raw value of the sigmoid scale is +inf (L = 0)."""
    hs = torch.tensor([5.0, 10.0, 15.0, 17.0, 20.0, 25.0, 30.0, 40.0, 60.0, 80.0])
    x, h, _ = one_hot_inputs(hs, neutral=math.inf)
    ops, device = ops_of(backend)
    logdet = ops.affine_fwd(x.to(device), h.to(device), "sigmoid", 2.0)[1].cpu()
    exact = exact_log_sigmoid(hs)
    assert torch.all(logdet < 0), logdet
    rel = ((logdet.double() - exact) / exact).abs()
    assert rel.max().item() <= 4 * torch.finfo(torch.float32).eps, rel


# Raw log-scales for the size test: one of each magnitude from 1e-6 to 50, both signs, in a fixed
# random order.
SIZE_VALUES = (torch.tensor(np.geomspace(1e-6, 50.0, 257)) *
               torch.where(torch.rand(257, generator=torch.Generator().manual_seed(3)) < 0.5, -1.0, 1.0))
SIZE_CASES = [("exp", 1e4), ("exp", 2.0), ("sigmoid", 2.0)]


def size_case(n, dtype, scale):
    """Inputs of spatial size n whose element i is the same for every n: y or x of [1, 2, n] and h."""
    g = torch.Generator().manual_seed(5)
    data = torch.randn(4, 257, generator=g, dtype=torch.float64)
    hs = SIZE_VALUES if scale == "exp" else SIZE_VALUES.abs().log() * 3
    x = torch.stack([data[0], data[1]])[None, :, :n].to(dtype)
    h = torch.stack([hs, data[2]])[None, :, :n].to(dtype)
    g_out = torch.stack([data[3], data[0]])[None, :, :n].to(dtype)
    return x.contiguous(), h.contiguous(), g_out.contiguous()


def sizes_of(backend):
    """Sizes 1..257 put an element in the vector loop or in its remainder at every position (C++),
    in tiles of every width (Triton). Interpreted Triton takes one tile of ``next_power_of_2(n)``
    elements and computes every element of it in the same vectorized numpy operations, masked past
    ``n``: what can differ between sizes is the tile width and the mask, so each width is run at
    both ends of its range and once inside (2^k, 2^k + 1, and one size between)."""
    if backend == "triton" and os.environ.get("TRITON_INTERPRET") == "1":
        return sorted({n for k in range(9) for n in (2**k, 2**k + 1, 3 * 2**k // 2 + 1) if n <= 257})
    return range(1, 258)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scale,clamp", SIZE_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_each_element_is_bit_identical_for_every_tensor_size(scale, clamp, dtype, backend):
    """Per element the same bits at every size of :func:`sizes_of`."""
    ops, device = ops_of(backend)
    x, h, g = (t.to(device) for t in size_case(257, dtype, scale))
    gl = torch.full((1,), 0.5, dtype=torch.promote_types(dtype, torch.float32), device=device)
    full = {
        "fwd": ops.affine_fwd(x, h, scale, clamp)[0],
        "inv": ops.affine_inv(x, h, scale, clamp)[0],
        "bwd": ops.affine_bwd(g, gl, x, h, scale, clamp, False),
        "inv_bwd": ops.affine_inv_bwd(x, h, g, gl, scale, clamp),
    }
    hs = h[0, 0].cpu()
    neutral = 0.0 if scale == "exp" else math.inf
    xo, ho, _ = (t.to(device) for t in one_hot_inputs(hs, neutral, spatial=257))
    log_scales = ops.affine_fwd(xo, ho, scale, clamp)[1]
    for n in sizes_of(backend):
        xn, hn, gn = (t.to(device) for t in size_case(n, dtype, scale))
        got = {
            "fwd": ops.affine_fwd(xn, hn, scale, clamp)[0],
            "inv": ops.affine_inv(xn, hn, scale, clamp)[0],
            "bwd": ops.affine_bwd(gn, gl, xn, hn, scale, clamp, False),
            "inv_bwd": ops.affine_inv_bwd(xn, hn, gn, gl, scale, clamp),
        }
        for name, value in got.items():
            outs = value if isinstance(value, tuple) else (value,)
            wants = full[name] if isinstance(full[name], tuple) else (full[name],)
            for out, want in zip(outs, wants):
                assert torch.equal(out, want[..., :n]), (name, n)
        xo, ho, _ = (t.to(device) for t in one_hot_inputs(hs[:n], neutral, spatial=n))
        assert torch.equal(ops.affine_fwd(xo, ho, scale, clamp)[1], log_scales[:n]), ("log-scale", n)
