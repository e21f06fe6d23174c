"""The rational-quadratic spline reference (invkernels.reference.spline), the oracle of the spline
ops: agreement with nflows' ``unconstrained_rational_quadratic_spline`` (``tails="linear"``,
installed as a test dependency with ``pip install --no-deps nflows``), the inverse, the log-det
against the dense Jacobian, hostile values, layouts, reduced precision and bad arguments."""

import math

import pytest
import torch

from invkernels.reference import spline as S

F64 = torch.float64


def params_of(h, channels, bins):
    """nflows' three parameter tensors ``[..., bins]``, ``[..., bins]``, ``[..., bins - 1]`` from ``h``."""
    p = h.unflatten(1, (channels, 3 * bins - 1)).movedim(2, -1)
    return p[..., :bins], p[..., bins:2 * bins], p[..., 2 * bins:]


def nflows_reference(x, h, bins, inverse=False, **kw):
    """nflows' result in this package's layout: ``(y, logdet [B])`` (nflows imported here: the
    GPU check collects this file where only torch is installed)."""
    from nflows.transforms.splines.rational_quadratic import (  # noqa: PLC0415
        unconstrained_rational_quadratic_spline as nflows_spline,
    )

    y, lad = nflows_spline(x, *params_of(h, x.shape[1], bins), inverse=inverse, tails="linear", **kw)
    return y, lad.flatten(1).sum(1)


def inputs(shape, bins, x_scale, h_scale, dtype=F64):
    x = torch.randn(shape, dtype=dtype) * x_scale
    h = torch.randn(shape[0], shape[1] * (3 * bins - 1), *shape[2:], dtype=dtype) * h_scale
    return x, h


def grads(fn, x, h, gy, gl):
    x, h = x.detach().requires_grad_(), h.detach().requires_grad_()
    y, logdet = fn(x, h)
    return torch.autograd.grad((y * gy).sum() + (logdet * gl).sum(), (x, h))


def assert_relative(actual, expected, rtol=1e-9):
    scale = expected.abs().clamp_min(1.0)
    err = ((actual - expected).abs() / scale).max().item()
    assert err <= rtol, f"relative error {err:.3g} > {rtol:g}"


@pytest.mark.parametrize("shape", [(5, 3), (2, 3, 4, 5)])
@pytest.mark.parametrize("bins", [1, 2, 8])
# (tail_bound, scale of h, inverse); the inverse with the largest parameters, where it is
# ill-conditioned, is test_inverse_with_large_parameters.
@pytest.mark.parametrize("tail_bound,h_scale,inverse", [(3.0, 1.0, False), (1.0, 5.0, False), (5.0, 20.0, False),
                                                        (3.0, 1.0, True), (1.0, 5.0, True)])
def test_matches_nflows(shape, bins, tail_bound, h_scale, inverse):
    x, h = inputs(shape, bins, tail_bound * 0.8, h_scale)
    kw = {"tail_bound": tail_bound, "min_bin_width": 1e-3, "min_bin_height": 2e-3, "min_derivative": 1e-2}
    if inverse:
        x = nflows_reference(x, h, bins, **kw)[0]
    ours = S.rq_spline_inv if inverse else S.rq_spline_fwd

    def mine(a, b):
        return ours(a, b, bins, kw["tail_bound"], kw["min_bin_width"], kw["min_bin_height"], kw["min_derivative"])

    def theirs(a, b):
        return nflows_reference(a, b, bins, inverse=inverse, **kw)

    y, logdet = mine(x, h)
    y_ref, logdet_ref = theirs(x, h)
    assert_relative(y, y_ref)
    assert_relative(logdet, logdet_ref)
    inside = (x.abs() <= tail_bound)
    assert inside.any() and (~inside).any(), "the inputs should cover the spline and both tails"
    gy, gl = torch.randn_like(x), torch.randn(x.shape[0], dtype=F64)
    for g, g_ref in zip(grads(mine, x, h, gy, gl), grads(theirs, x, h, gy, gl)):
        assert_relative(g, g_ref)


@pytest.mark.parametrize("shape", [(5, 3), (2, 3, 4, 5)])
def test_inverse_with_large_parameters(shape):
    """Parameters of standard deviation 20 make bins of the minimum height over most of the range,
    where the inverse's condition number (dx/dy) reaches ~1e6: values and log-dets still agree
    with nflows to 1e-9, and the forward maps the result back to the input at least as closely as
    it maps nflows' result (the gradients agree to the round-off times that condition number,
    ~5e-9 here, so they are compared at the smaller parameters of test_matches_nflows)."""
    bins, kw = 8, {"tail_bound": 5.0, "min_bin_width": 1e-3, "min_bin_height": 2e-3, "min_derivative": 1e-2}
    x, h = inputs(shape, bins, 4.0, 20.0)
    args = (bins, *kw.values())
    y = S.rq_spline_fwd(x, h, *args)[0]
    x_back, logdet = S.rq_spline_inv(y, h, *args)
    x_ref, logdet_ref = nflows_reference(y, h, bins, inverse=True, **kw)
    assert_relative(x_back, x_ref)
    assert_relative(logdet, logdet_ref)
    ours = (S.rq_spline_fwd(x_back, h, *args)[0] - y).abs().max()
    theirs = (S.rq_spline_fwd(x_ref, h, *args)[0] - y).abs().max()
    assert ours <= theirs + 4 * torch.finfo(F64).eps * y.abs().max()


@pytest.mark.parametrize("bins", [1, 3, 8])
def test_round_trip_and_inverse_logdet(bins):
    x, h = inputs((4, 3, 6), bins, 2.0, 1.0)
    y, logdet = S.rq_spline_fwd(x, h, bins)
    x_back, logdet_inv = S.rq_spline_inv(y, h, bins)
    torch.testing.assert_close(x_back, x, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(logdet_inv, -logdet, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("inverse", [False, True])
def test_logdet_is_slogdet_of_the_jacobian(inverse):
    bins = 4
    x, h = inputs((2, 3, 2), bins, 2.0, 2.0)
    fn = S.rq_spline_inv if inverse else S.rq_spline_fwd
    _, logdet = fn(x, h, bins)
    for b in range(x.shape[0]):
        jac = torch.autograd.functional.jacobian(lambda v, b=b: fn(v.unsqueeze(0), h[b:b + 1], bins)[0][0], x[b])
        dense = jac.reshape(x[b].numel(), x[b].numel())
        sign, logabsdet = torch.linalg.slogdet(dense)
        assert sign.item() == 1.0
        torch.testing.assert_close(logdet[b], logabsdet, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype,tol", [(F64, 1e-12), (torch.float32, 1e-6)])
def test_identity_parameters(dtype, tol):
    """Zero widths and heights with the derivative offset give the identity (log-det 0)."""
    bins, min_derivative = 8, 1e-3
    x = torch.linspace(-4.0, 4.0, 81, dtype=dtype).reshape(1, 3, 27)
    p = torch.zeros(1, 3, 3 * bins - 1, 27, dtype=dtype)
    p[:, :, 2 * bins:] = S.identity_derivative_offset(min_derivative)
    y, logdet = S.rq_spline_fwd(x, p.flatten(1, 2), bins, min_derivative=min_derivative)
    assert (y - x).abs().max().item() <= tol
    assert logdet.abs().max().item() <= tol * 81


def hostile_inputs(bins, tail_bound, dtype=F64):
    """Inputs on every knot, on and just beyond the bounds, far out, and huge, with parameters
    from 0 to ±1e30 and bins collapsed to their minimum size."""
    x = torch.tensor([0.0, tail_bound, -tail_bound, math.nextafter(tail_bound, math.inf),
                      -math.nextafter(tail_bound, math.inf), 1e30, -1e30, 1e300, 1e-300, 0.5 * tail_bound],
                     dtype=F64)
    h_scales = torch.tensor([0.0, 1.0, 50.0, 60.0, 1e4, 1e30], dtype=F64)
    n = x.numel() * h_scales.numel()
    xs = x.repeat(h_scales.numel())[:, None]
    hs = torch.randn(n, 3 * bins - 1, dtype=F64) * h_scales.repeat_interleave(x.numel())[:, None]
    # One widths vector pushed to a single dominant bin (all others at their minimum size).
    hs[0, :bins] = torch.tensor([1e4] + [-1e4] * (bins - 1), dtype=F64)
    knots = S.knots(hs, bins, tail_bound, 1e-3, 1e-3, 1e-3)
    # Every knot position of the first sample's splines, exactly, as inputs of the same parameters.
    knot_x = knots.xs[:1].reshape(-1, 1)
    xs = torch.cat([xs, knot_x]).to(dtype)
    hs = torch.cat([hs, hs[:1].expand(knot_x.shape[0], -1)]).to(dtype)
    return xs, hs


@pytest.mark.parametrize("dtype", [F64, torch.float32])
@pytest.mark.parametrize("bins", [1, 8])
@pytest.mark.parametrize("inverse", [False, True])
@pytest.mark.parametrize("minimum", [1e-3, 1e-6])
def test_hostile_values_stay_finite(dtype, bins, inverse, minimum):
    """``minimum``: the minimum bin width, height and derivative (1e-6 is the smallest accepted)."""
    tail_bound = 3.0
    x, h = hostile_inputs(bins, tail_bound, dtype)
    if dtype == torch.float32:
        x = x.clamp(-1e30, 1e30)
    fn = S.rq_spline_inv if inverse else S.rq_spline_fwd
    x, h = x.requires_grad_(), h.requires_grad_()
    y, logdet = fn(x, h, bins, tail_bound, minimum, minimum, minimum)
    assert torch.isfinite(y).all() and torch.isfinite(logdet).all()
    gx, gh = torch.autograd.grad(y.sum() + logdet.sum(), (x, h))
    assert torch.isfinite(gx).all() and torch.isfinite(gh).all()
    outside = x.detach().abs() > tail_bound
    assert torch.equal(y.detach()[outside], x.detach()[outside])
    assert torch.equal(logdet.detach()[outside[:, 0]], torch.zeros_like(logdet.detach()[outside[:, 0]]))
    # Inside the bounds the result stays inside, to one rounding of the bound.
    assert (y.detach()[~outside].abs() <= tail_bound * (1 + torch.finfo(dtype).eps)).all()


def test_hostile_knots_match_nflows():
    """On the knots, at the bounds and with raw parameters up to ±1e30 the reference agrees with
    nflows, values, log-dets and gradients."""
    bins, tail_bound = 8, 3.0
    x, h = hostile_inputs(bins, tail_bound)
    keep = x[:, 0].abs() <= tail_bound
    x, h = x[keep], h[keep]
    assert x.shape[0] >= bins + 1 and h.abs().max() > 1e29

    def mine(a, b):
        return S.rq_spline_fwd(a, b, bins, tail_bound)

    def theirs(a, b):
        return nflows_reference(a, b, bins, tail_bound=tail_bound)

    for got, want in zip(mine(x, h), theirs(x, h)):
        assert_relative(got, want)
    gy, gl = torch.randn_like(x), torch.randn(x.shape[0], dtype=F64)
    for got, want in zip(grads(mine, x, h, gy, gl), grads(theirs, x, h, gy, gl)):
        assert_relative(got, want)


@pytest.mark.parametrize("inverse", [False, True])
def test_raw_widths_and_heights_of_any_size_match_nflows(inverse):
    """Raw widths and heights far beyond ±50 (where a clamp before the softmax would change the
    spline: raw widths 60 and 52 give y = -2.624 in nflows) agree with nflows, gradients included."""
    bins, kw = 4, {"tail_bound": 3.0, "min_bin_width": 1e-3, "min_bin_height": 1e-3, "min_derivative": 1e-3}
    x = torch.tensor([[-1.0]], dtype=F64)
    h = torch.zeros(1, 3 * bins - 1, dtype=F64)
    h[0, :2] = torch.tensor([60.0, 52.0], dtype=F64)
    y, _ = S.rq_spline_fwd(x, h, bins, **kw)
    assert abs(y.item() - nflows_reference(x, h, bins, **kw)[0].item()) <= 1e-12
    x, h = inputs((64, 2), bins, 2.5, 1.0)
    h[:, :2 * bins] *= torch.logspace(1, 4, 64, dtype=F64)[:, None]
    if inverse:
        x = nflows_reference(x, h, bins, **kw)[0]
    ours = S.rq_spline_inv if inverse else S.rq_spline_fwd

    def mine(a, b):
        return ours(a, b, bins, *kw.values())

    def theirs(a, b):
        return nflows_reference(a, b, bins, inverse=inverse, **kw)

    for got, want in zip(mine(x, h), theirs(x, h)):
        assert_relative(got, want)
    gy, gl = torch.randn_like(x), torch.randn(x.shape[0], dtype=F64)
    # The inverse in bins of the minimum height is ill-conditioned (dx/dy up to ~1e3 here): its
    # gradients agree to that times the round-off.
    for got, want in zip(grads(mine, x, h, gy, gl), grads(theirs, x, h, gy, gl)):
        assert_relative(got, want, 1e-9 if not inverse else 1e-7)


@pytest.mark.parametrize("part", ["widths", "heights"])
@pytest.mark.parametrize("shift", [-1e3, 60.0, 1e6])
def test_adding_a_constant_to_raw_widths_or_heights_changes_nothing(part, shift):
    bins = 6
    x, h = inputs((8, 3), bins, 2.5, 30.0)
    block = slice(0, bins) if part == "widths" else slice(bins, 2 * bins)
    shifted = h.unflatten(1, (3, 3 * bins - 1)).clone()
    shifted[:, :, block] += shift
    shifted = shifted.flatten(1, 2)
    for fn in (S.rq_spline_fwd, S.rq_spline_inv):
        for got, want in zip(fn(x, shifted, bins), fn(x, h, bins)):
            # Adding the shift rounds each raw value to the spacing of floats near the shift.
            torch.testing.assert_close(got, want, rtol=0, atol=1e-12 * (1 + abs(shift)))


@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_derivatives_are_held_at_the_limit(dtype):
    """A raw derivative whose ``min_derivative + softplus`` exceeds the limit (2**508 in float64,
    2**60 when computing in float32) acts as the limit and gets no gradient; one below it counts
    in full; values, log-dets and gradients stay finite."""
    bins = 3
    limit = S.derivative_limit(dtype)
    assert limit == (2.0 ** 508 if dtype == F64 else 2.0 ** 60)
    x = torch.tensor([[-0.4], [0.2], [1.1]], dtype=dtype)
    h = torch.zeros(3, 3 * bins - 1, dtype=dtype)
    h[:, 2 * bins:] = torch.tensor([4 * limit, 0.5 * limit], dtype=dtype)
    at_limit = h.clone()
    at_limit[:, 2 * bins] = limit
    for fn in (S.rq_spline_fwd, S.rq_spline_inv):
        assert all(torch.equal(a, b) for a, b in zip(fn(x, h, bins), fn(x, at_limit, bins)))
        leaf = h.clone().requires_grad_()
        out, logdet = fn(x, leaf, bins)
        assert torch.isfinite(out).all() and torch.isfinite(logdet).all()
        grad = torch.autograd.grad(out.sum() + logdet.sum(), leaf)[0]
        assert torch.isfinite(grad).all()
        assert (grad[:, 2 * bins] == 0).all() and (grad[:, 2 * bins + 1] != 0).any()


@pytest.mark.parametrize("inverse", [False, True])
def test_gradcheck_and_gradgradcheck(inverse):
    bins = 3
    x, h = inputs((2, 2, 3), bins, 1.5, 1.0)
    x[0, 0, 0] = 4.0  # one element in the tail
    fn = S.rq_spline_inv if inverse else S.rq_spline_fwd
    x, h = x.requires_grad_(), h.requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: fn(a, b, bins), (x, h))
    assert torch.autograd.gradgradcheck(lambda a, b: fn(a, b, bins), (x, h))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reduced_precision_computes_in_float32(dtype):
    bins = 8
    x, h = inputs((4, 3, 5), bins, 2.0, 1.0, torch.float32)
    x, h = x.to(dtype), h.to(dtype)
    y, logdet = S.rq_spline_fwd(x, h, bins)
    assert y.dtype == dtype and logdet.dtype == torch.float32
    y32, logdet32 = S.rq_spline_fwd(x.float(), h.float(), bins)
    assert torch.equal(y, y32.to(dtype))
    torch.testing.assert_close(logdet, logdet32, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("change,message", [
    ({"bins": 0}, "bins should be a positive integer, got 0"),
    ({"bins": 2.0}, "bins should be a positive integer, got 2.0"),
    ({"tail_bound": 0.0}, "tail_bound should be positive and finite"),
    ({"tail_bound": math.inf}, "tail_bound should be positive and finite"),
    ({"min_bin_width": 0.25}, r"min_bin_width should be a number in \[1e-06, 1 / bins = 0.25\), got 0.25"),
    ({"min_bin_height": -1e-3}, r"min_bin_height should be a number in \[1e-06, 1 / bins = 0.25\), got -0.001"),
    ({"min_bin_height": 1e-7}, r"min_bin_height should be a number in \[1e-06, 1 / bins = 0.25\), got 1e-07"),
    ({"min_derivative": 0.0}, r"min_derivative should be a number in \[1e-06, 1\), got 0"),
    ({"h": torch.zeros(2, 3 * 10, 5, dtype=F64)},
     r"h should have \(C - passthrough\) \* \(3 \* bins - 1\) = 33 channels for x with C=3, passthrough=0"),
    ({"h": torch.zeros(2, 33, 4, dtype=F64)},
     r"h should have shape \[B, \(C - passthrough\) \* \(3 \* bins - 1\), \*spatial\] = \[2, 33, 5\]"),
    ({"passthrough": 1}, r"h should have \(C - passthrough\) \* \(3 \* bins - 1\) = 22 channels for x with C=3, "
                         r"passthrough=1 and bins=4, got 33"),
    ({"passthrough": 3}, r"passthrough should be an integer in \[0, C\) = \[0, 3\) for x with C=3, got 3"),
    ({"passthrough": -1}, r"passthrough should be an integer in \[0, C\) = \[0, 3\) for x with C=3, got -1"),
    ({"passthrough": 1.0}, r"passthrough should be an integer in \[0, C\) = \[0, 3\) for x with C=3, got 1.0"),
    ({"h": torch.zeros(2, 33, 5)}, "x and h should have the same dtype"),
    ({"x": torch.zeros(3, dtype=F64)}, "x should be at least 2-D"),
    ({"x": torch.zeros(2, 3, 5, dtype=torch.int64)}, "x should be a floating-point tensor"),
])
def test_bad_arguments(change, message):
    args = {"x": torch.zeros(2, 3, 5, dtype=F64), "h": torch.zeros(2, 33, 5, dtype=F64), "bins": 4,
            "tail_bound": 3.0, "min_bin_width": 1e-3, "min_bin_height": 1e-3, "min_derivative": 1e-3}
    args.update(change)
    with pytest.raises(ValueError, match=f"rq_spline_fwd: {message}"):
        S.rq_spline_fwd(**args)


def test_inverse_next_to_the_knots_in_float32():
    """One float32 step from every height knot, where the rounded discriminant of the inverse's
    quadratic goes negative (nflows asserts there, nflows #87) and the root falls just outside its
    bin: the clamped discriminant and root give finite values and log-dets, and the forward maps
    the result back to the input (the inverse itself is ill-conditioned in the nearly flat bins
    that large parameters make, so it is checked through the well-conditioned forward)."""
    bins, n = 8, 20000
    h = torch.randn(n, 3 * bins - 1) * 8
    ys = S.knots(h, bins, 3.0, 1e-3, 1e-3, 1e-3).ys
    y = ys.gather(-1, torch.randint(0, bins + 1, (n, 1)))[:, 0]
    step = torch.where(torch.rand(n) < 0.5, 10.0, -10.0)
    y = torch.nextafter(y, step).clamp(-3.0, 3.0)[:, None]
    x, logdet = S.rq_spline_inv(y, h, bins)
    assert torch.isfinite(x).all() and torch.isfinite(logdet).all()
    y_back, logdet_fwd = S.rq_spline_fwd(x, h, bins)
    torch.testing.assert_close(y_back, y, rtol=0, atol=1e-5)
    assert torch.isfinite(logdet_fwd).all()


def test_root_stays_in_the_bin():
    """The inverse's root for rises beyond the bin (what rounding produces next to a knot, at
    worst; the rise is never negative, as the bin search puts the input above the knot it is
    measured from): the clamped discriminant and root keep it finite, 0 at the start and 1 beyond
    the end. With both derivatives below the bin's slope the discriminant is negative far from
    the bin."""
    s, height = torch.tensor(4.0, dtype=F64), torch.tensor(0.5, dtype=F64)
    dy = height * torch.tensor([0.0, 1.0 + 1e-9, 1.5, 10.0, 1e3], dtype=F64)
    for d0, d1 in ((0.01, 30.0), (0.01, 0.01)):
        theta = S._root(dy, height, s, torch.tensor(d0, dtype=F64), torch.tensor(d1, dtype=F64))
        assert torch.equal(theta, torch.tensor([0.0, 1.0, 1.0, 1.0, 1.0], dtype=F64)), (d0, d1, theta)


def test_root_without_cancellation_when_the_far_derivative_dwarfs_the_near_one():
    """With the far derivative 1e8 times the near one the spline from the near end rises to its
    plateau (a 1e-8 of the bin) at once and to ``dy`` only next to the far end; there ``b < 0`` and
    nflows' form ``2c / (-b - sqrt(b² - 4ac))`` cancels (~8 digits lost), while the root taken in
    the form without cancellation agrees with a bisection of the spline to round-off."""
    s, height, d_near, d_far = (torch.tensor(v, dtype=F64) for v in (1.0, 1.0, 1.0, 1e8))
    rises = torch.tensor([0.05, 0.2, 0.45, 0.5], dtype=F64)

    def rise_at(theta):
        t = theta * (1 - theta)
        return (s * theta ** 2 + d_near * t) / (s + (d_near + d_far - 2 * s) * t)

    low, high = torch.zeros_like(rises), torch.ones_like(rises)
    for _ in range(200):
        mid = (low + high) / 2
        below = rise_at(mid) < rises
        low, high = torch.where(below, mid, low), torch.where(below, high, mid)
    exact = (low + high) / 2
    theta = S._root(rises * height, height, s, d_near, d_far)
    assert (theta - exact).abs().max() <= 1e-14
    slope = d_near + d_far - 2 * s
    a, b, c = rises * slope + s - d_near, d_near - rises * slope, -s * rises
    nflows_form = 2 * c / (-b - torch.sqrt(b ** 2 - 4 * a * c))
    assert (nflows_form - exact).abs().max() > 1e-10


@pytest.mark.parametrize("inverse", [False, True])
def test_layouts_and_empty_inputs(inverse):
    """Channels-last and strided inputs give the contiguous results (to round-off: torch's softmax
    and cumsum may sum in another order on another layout); an empty batch or an empty spatial
    size gives empty outputs (the log-det of an empty sample is 0)."""
    bins = 3
    fn = S.rq_spline_inv if inverse else S.rq_spline_fwd
    x, h = inputs((2, 3, 4, 5), bins, 2.0, 1.0)
    y, logdet = fn(x, h, bins)
    y_cl, logdet_cl = fn(x.to(memory_format=torch.channels_last), h.to(memory_format=torch.channels_last), bins)
    for got, want in ((y_cl, y), (logdet_cl, logdet)):
        torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-13)
    wide_x = torch.zeros(2, 3, 4, 10, dtype=F64)
    wide_x[..., ::2] = x
    wide_h = torch.zeros(2, h.shape[1], 4, 10, dtype=F64)
    wide_h[..., ::2] = h
    y_s, logdet_s = fn(wide_x[..., ::2], wide_h[..., ::2], bins)
    for got, want in ((y_s, y), (logdet_s, logdet)):
        torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-13)
    y0, logdet0 = fn(x[:0], h[:0], bins)
    assert y0.shape == (0, 3, 4, 5) and logdet0.shape == (0,)
    y1, logdet1 = fn(x[..., :0], h[..., :0], bins)
    assert y1.shape == (2, 3, 4, 0) and torch.equal(logdet1, torch.zeros(2, dtype=F64))
