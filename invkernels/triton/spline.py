"""Triton kernels and launchers of the rational-quadratic spline (neural spline flows, linear tails).

The ops ``torch.ops.invkernels.<op>_triton`` are defined by invkernels.ops.spline from the C++
schemas, one per entry of :data:`LAUNCHERS`; they check their arguments and call the launchers
here, which only check the device. Formulas, layout and op schemas: docs/ops/spline.md; the
per-element math is that of csrc/kernels/spline.h (which the C++ and CUDA kernels run), function
for function, and invkernels/reference/spline.py is its float64 oracle.

Layout. The contiguous input is viewed as ``[B, P_ + C, S]`` (``S`` the product of the spatial
sizes, 1 for vectors; the first ``P_ = passthrough`` channels copied through, ``C`` transformed)
and each sample's transformed part as ``N = C * S`` elements: element ``(b, c, s)`` sits at
``b * (P_ * S + N) + P_ * S + c * S + s``: the launchers pass the data tensors from their first
transformed element, with samples ``ROW_STRIDE = P_ * S + N`` apart. ``h`` is ``[B, C * P, S]`` with
``P = 3 * bins - 1``: the raw parameter ``j`` of element ``(b, c, s)`` (``bins`` widths, then
``bins`` heights, then ``bins - 1`` interior derivatives) sits at ``((b * C + c) * P + j) * S + s``,
so one element's parameters are ``S`` apart.

Normalization (``B_ = tail_bound``; per element, for raw widths ``w``, heights ``h`` and
derivatives ``r``)::

    sw_j = exp(w_j - max w) / sum_i exp(w_i - max w)          (no clamp: exact for any finite w)
    X_0 = -B_,  X_m = B_ * (2 * sum_{j<m} (min_bin_width + (1 - bins * min_bin_width) sw_j) - 1),
    X_bins = B_                                                (the ends set exactly; Y_m likewise)
    d_0 = d_bins = 1,  d_m = min(min_derivative + softplus(r_{m-1}), D_max)
    D_max = 2^60 (float32 compute) or 2^508 (float64); d d_m / d r = sigmoid(r), 0 beyond D_max

Bin ``k`` of ``v`` is the last knot ``<= v`` among the first ``bins`` (by ``X`` for the forward
and the VJPs, by ``Y`` for the inverse); with ``w = X_{k+1} - X_k``, ``H = Y_{k+1} - Y_k``,
``s = H / w``, ``d0 = d_k``, ``d1 = d_{k+1}``, ``theta = (x - X_k) / w``, ``t = theta (1 - theta)``::

    A = s theta^2 + d0 t,   D = s + (d0 + d1 - 2 s) t,   Q = d1 theta^2 + 2 s t + d0 (1 - theta)^2
    forward:  y = Y_k + H (A / D),   log dy/dx = 2 log s + log Q - 2 log D
    inverse:  from the bin's nearer end (upper = y - Y_k > H / 2: then dy = Y_{k+1} - y and d0, d1
              exchanged), rho = dy / H, the quadratic a theta^2 + b theta + c = 0 with
              a = rho (d0 + d1 - 2 s) + (s - d0),  b = d0 - rho (d0 + d1 - 2 s),  c = -s rho,
              theta = 2c / (-b - sqrt(disc)) for b >= 0, (sqrt(disc) - b) / 2a for b < 0 (1 if
              a <= 0), disc = max(b^2 - 4ac, 0), theta clamped to [0, 1];
              x = X_k + theta w (x = X_{k+1} - theta w from the upper end), log-det minus the
              forward's at theta
    outside [-B_, B_] (the bounds themselves are inside): identity, log-det 0

Vector-Jacobian products (``g`` the output's gradient, ``gl = grad_logdet[b]``): the partials of
``y`` and ``L = log dy/dx`` in ``theta, s, H, d0, d1`` (``dy/dtheta = H s Q / D^2``), chained
through ``theta = (x - X_k) / w`` and ``s = H / w`` to ``x`` and the bin's knots and derivatives,
then to the raw parameters: ``d X_m / d w_j = 2 B_ (1 - bins * min_bin_width) sw_j ([j < m] -
C_m)`` with ``C_m = sum_{j<m} sw_j`` (heights likewise), ``d d_m / d r_{m-1}`` as above. The
inverse's VJP at its output ``x`` is the forward's for ``(-u, -gl)`` with
``u = (g - gl dL/dx) / (dy/dx)``, and ``u`` the input's gradient. Outside the bounds the input
gradient is ``g`` and every parameter gradient 0. The memory-free backward (``rq_spline_inv_bwd``)
locates ``y``, inverts it and runs the forward's VJP at the rebuilt ``x`` in the same bin.

Numerics. Elementwise math runs in float32 for float16/bfloat16/float32 inputs and in float64 for
float64 inputs; tensor results are stored in the input dtype, log-dets in the compute dtype. The
settings arrive as float32 pairs ``hi + lo`` added in the compute dtype (Triton passes Python
floats as float32): the float32 rounding of each in float32, each to 2^-48 relative in float64.
The sums over the bins (softmax statistics, cumulative knots) run in the order of spline.h, one
bin after the other. Division is IEEE (``tl.div_rn`` in float32, where Triton's ``/`` is a 2-ulp
division on a GPU that could put ``theta`` past 1 next to a knot) and so is the square root
(``tl.sqrt_rn``); ``exp`` and ``log`` are Triton's. ``tl.math`` has no ``log1p``, so
``softplus(r) = max(r, 0) + log1p(exp(-|r|))`` takes ``log1p(e) = log(w) + (e - (w - 1))``,
``w = 1 + e``, accurate to a few ulps on ``[0, 1]`` (as invkernels.triton.coupling). The root's
two forms divide by a finite stand-in where they are not taken, so no lane divides 0 by 0. A NaN
input stays NaN; the spline is evaluated on the input clamped into the bounds and the identity
selected outside, so the discarded branch is finite. The gradients of the interior derivatives
are computed for the bin's two inner knots only and stored as 0 elsewhere (spline.h stores
``0 * sigmoid(r)`` there: the same but for a NaN raw derivative of a knot outside the bin).

Tiling. Each program handles ``ROWS`` samples by ``BLOCK`` elements of each sample (element
index ``c * S + s``, its channel ``c`` found by one division) and loops over the bins: per
element the registers do not depend on ``bins`` (any ``bins``, one compiled kernel for all), and
each loop iteration loads the tile's parameter ``j``, consecutive in memory across the tile's
elements of a channel when ``S > 1``. (A tile of elements by a power-of-two block of bins would
put one element's bins on several lanes of a warp, each repeating the per-element math, which
dominates.)
The forward and inverse read the widths and heights three times (their maximum, the sum of the
exponentials, the knots), the VJPs four times (then their gradients); the derivatives of the
bin's two inner knots are gathered once. On a GPU the tile is one of the explicit set
:data:`GPU_TILES` (256 elements at 4 warps, two per thread: the first whose ``BLOCK`` covers
``N``, else the last), which is what is compiled ahead of time (invkernels.triton.aot); the
interpreter, which runs each program as numpy operations, gets tiles of up to 32768 elements. The
forward and inverse write one partial log-det per sample and tile into a ``[B, NBLK]`` buffer in
the compute dtype; torch adds the partials of a sample in a fixed order, so the log-det is
deterministic (no atomics).
"""

from __future__ import annotations

import math
import struct
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from invkernels.triton._common import MAX_TILE_INTERPRETER, check_device, compute_dtype, device_guard, interpreting, \
    meta

__all__ = [
    "GPU_TILES",
    "LAUNCHERS",
    "TileConfig",
    "aot_cases",
    "gpu_configs",
    "rq_spline_backward",
    "rq_spline_forward",
    "rq_spline_inverse",
    "rq_spline_inverse_backward",
    "tile_config",
]


@triton.jit
def _div(a, b):
    # a / b rounded to nearest, as in C++ (Triton's float32 "/" is div.full.f32 on a GPU).
    if b.dtype == tl.float64:
        q = a / b
    else:
        q = tl.div_rn(a, b)
    return q


@triton.jit
def _sqrt(v):
    # The square root rounded to nearest, as in C++ (tl.sqrt is an approximation in float32).
    if v.dtype == tl.float64:
        r = tl.sqrt(v)
    else:
        r = tl.sqrt_rn(v)
    return r


@triton.jit
def _tile(B, C, S, ROW_STRIDE, NBLK, bins, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    # Program pid covers samples rows (ROWS of them) and transformed elements cols (BLOCK of them)
    # of each sample. Returns the samples, the tile's column block, which rows exist, the mask and
    # offsets of the tile's elements in the data tensors (from their first transformed element,
    # samples ROW_STRIDE apart), the offsets of their parameter 0 in h and the parameter
    # stride S as an int64 tensor. Every offset is int64 and multiplies before adding (C, S, ROW_STRIDE
    # and bins arrive as int32 when below 2^31), so offsets past 2^31 elements do not wrap; the
    # launchers keep C * S below 2^31.
    pid = tl.program_id(0).to(tl.int64)
    col_blk = pid % NBLK
    rows = (pid // NBLK) * ROWS + tl.arange(0, ROWS)
    cols = col_blk * BLOCK + tl.arange(0, BLOCK)
    row_ok = rows < B
    mask = row_ok[:, None] & (cols < C * S)[None, :]
    chan = cols // S
    pos = cols - chan * S
    offs = rows[:, None] * ROW_STRIDE + cols[None, :]
    base = ((rows[:, None] * C + chan[None, :]) * (3 * bins - 1)) * S + pos[None, :]
    stride = tl.zeros([ROWS, BLOCK], tl.int64) + S
    return rows, col_blk, row_ok, mask, offs, base, stride


@triton.jit
def _settings(bound_hi, bound_lo, min_w_hi, min_w_lo, min_h_hi, min_h_lo, min_d_hi, min_d_lo, ACC: tl.constexpr):
    # The spline's settings in the compute dtype: tail_bound, min_bin_width, min_bin_height,
    # min_derivative (each a float32 pair hi + lo).
    bound = tl.cast(bound_hi, ACC) + tl.cast(bound_lo, ACC)
    min_w = tl.cast(min_w_hi, ACC) + tl.cast(min_w_lo, ACC)
    min_h = tl.cast(min_h_hi, ACC) + tl.cast(min_h_lo, ACC)
    min_d = tl.cast(min_d_hi, ACC) + tl.cast(min_d_lo, ACC)
    return bound, min_w, min_h, min_d


@triton.jit
def _inside(v, bound):
    # (outside, v clamped into [-bound, bound]): the bounds are inside, NaN is neither clamped nor
    # outside (it stays NaN, as in the C++ kernels).
    outside = (v < -bound) | (v > bound)
    return outside, tl.where(v < -bound, -bound, tl.where(v > bound, bound, v))


@triton.jit
def _load(h_ptr, offs, mask, ACC: tl.constexpr):
    return tl.load(h_ptr + offs, mask=mask, other=0.0).to(ACC)


@triton.jit
def _derivative_limit(ACC: tl.constexpr):
    # SplineLimits: 2^(e/2 - 4) for the compute dtype's largest exponent e.
    if ACC == tl.float64:
        limit = 2.0**508
    else:
        limit = 2.0**60
    return limit


@triton.jit
def _softplus(r):
    e = tl.exp(-tl.abs(r))
    w = 1.0 + e
    return tl.where(r > 0.0, r, 0.0) + (tl.log(w) + (e - (w - 1.0)))


@triton.jit
def _sigmoid(r):
    e = tl.exp(-tl.abs(r))
    return tl.where(r >= 0.0, _div(tl.full(r.shape, 1.0, r.dtype), 1.0 + e), _div(e, 1.0 + e))


@triton.jit
def _derivative(r, min_d, ACC: tl.constexpr):
    # An interior knot derivative from its raw value: min_derivative + softplus(r), held at the limit.
    limit = _derivative_limit(ACC)
    d = min_d + _softplus(r)
    return tl.where(d > limit, limit, d)


@triton.jit
def _derivative_grad(r, min_d, ACC: tl.constexpr):
    # d _derivative / d r: sigmoid(r), 0 where the derivative is held at the limit.
    return tl.where(min_d + _softplus(r) > _derivative_limit(ACC), 0.0, _sigmoid(r))


@triton.jit
def _softmax_stats(h_ptr, base, stride, mask, bins, ACC: tl.constexpr):
    # Max and sum of exp(r - max) of the raw widths (parameters 0 .. bins-1) and of the raw heights
    # (bins .. 2 bins - 1) of every element of the tile.
    heights = bins * stride
    max_w = tl.full(base.shape, float("-inf"), ACC)
    max_h = tl.full(base.shape, float("-inf"), ACC)
    for j in range(0, bins):
        offs = base + j * stride
        max_w = tl.maximum(max_w, _load(h_ptr, offs, mask, ACC))
        max_h = tl.maximum(max_h, _load(h_ptr, offs + heights, mask, ACC))
    sum_w = tl.zeros(base.shape, ACC)
    sum_h = tl.zeros(base.shape, ACC)
    for j in range(0, bins):
        offs = base + j * stride
        sum_w += tl.exp(_load(h_ptr, offs, mask, ACC) - max_w)
        sum_h += tl.exp(_load(h_ptr, offs + heights, mask, ACC) - max_h)
    return max_w, sum_w, max_h, sum_h


@triton.jit
def _locate(h_ptr, base, stride, mask, v, bins, bound, min_w, min_h, min_d, max_w, sum_w, max_h, sum_h,
            BY_Y: tl.constexpr, ACC: tl.constexpr):
    # spline_locate: the bin k of v (inside the bounds) among the knots in x (BY_Y false) or in y,
    # its knots (x0, y0), (x1, y1), derivatives d0, d1, the cumulative softmax of the widths and
    # heights at its two knots (cw0, cw1, ch0, ch1) and the raw derivatives rd0, rd1 of d0, d1
    # (0 at the boundary knots). The knots are accumulated one bin after the other, as in
    # spline.h; the first bin whose upper knot exceeds v (or the last) is taken.
    heights = bins * stride
    scale_w = 1.0 - min_w * bins
    scale_h = 1.0 - min_h * bins
    zero = tl.zeros(base.shape, ACC)
    k = tl.zeros(base.shape, tl.int32)
    done = k != 0
    cum_w = zero
    cum_h = zero
    cw_lo = zero
    ch_lo = zero
    x_lo = zero - bound
    y_lo = zero - bound
    x0 = x_lo
    y0 = y_lo
    x1 = x_lo
    y1 = y_lo
    cw0 = zero
    cw1 = zero
    ch0 = zero
    ch1 = zero
    for j in range(0, bins):
        offs = base + j * stride
        sw = _div(tl.exp(_load(h_ptr, offs, mask, ACC) - max_w), sum_w)
        sh = _div(tl.exp(_load(h_ptr, offs + heights, mask, ACC) - max_h), sum_h)
        cw_hi = cw_lo + sw
        ch_hi = ch_lo + sh
        cum_w += min_w + scale_w * sw
        cum_h += min_h + scale_h * sh
        last = j == bins - 1
        # bound * (2 cum - 1) rather than 2 bound cum - bound: 2 bound overflows for bounds beyond
        # half the float32 range.
        x_hi = tl.where(last, bound, bound * (2.0 * cum_w - 1.0))
        y_hi = tl.where(last, bound, bound * (2.0 * cum_h - 1.0))
        if BY_Y:
            below = v < y_hi
        else:
            below = v < x_hi
        take = (below | last) & ~done
        k = tl.where(take, j, k)
        x0 = tl.where(take, x_lo, x0)
        x1 = tl.where(take, x_hi, x1)
        y0 = tl.where(take, y_lo, y0)
        y1 = tl.where(take, y_hi, y1)
        cw0 = tl.where(take, cw_lo, cw0)
        cw1 = tl.where(take, cw_hi, cw1)
        ch0 = tl.where(take, ch_lo, ch0)
        ch1 = tl.where(take, ch_hi, ch1)
        done = done | take
        x_lo = x_hi
        y_lo = y_hi
        cw_lo = cw_hi
        ch_lo = ch_hi
    derivs = base + 2 * heights
    has_d0 = k > 0
    has_d1 = k < bins - 1
    rd0 = _load(h_ptr, derivs + (k - 1) * stride, mask & has_d0, ACC)
    rd1 = _load(h_ptr, derivs + k * stride, mask & has_d1, ACC)
    d0 = tl.where(has_d0, _derivative(rd0, min_d, ACC), 1.0)
    d1 = tl.where(has_d1, _derivative(rd1, min_d, ACC), 1.0)
    return k, x0, x1, y0, y1, d0, d1, cw0, cw1, ch0, ch1, rd0, rd1


@triton.jit
def _terms(theta, s, d0, d1):
    # spline_terms at the fraction theta of a bin of slope s: (t, A, D, Q).
    t = theta * (1.0 - theta)
    a = s * theta * theta + d0 * t
    den = s + (d0 + d1 - 2.0 * s) * t
    u = 1.0 - theta
    q = d1 * theta * theta + 2.0 * s * t + d0 * u * u
    return t, a, den, q


@triton.jit
def _log_derivative(s, den, q):
    # 2 log s + log Q - 2 log D (s^2 Q could overflow where s and Q do not).
    return 2.0 * tl.log(s) + tl.log(q) - 2.0 * tl.log(den)


@triton.jit
def _forward(x, x0, x1, y0, y1, d0, d1):
    # spline_forward: y and log dy/dx at x in the bin.
    w = x1 - x0
    height = y1 - y0
    s = _div(height, w)
    theta = _div(x - x0, w)
    _, a, den, q = _terms(theta, s, d0, d1)
    return y0 + height * _div(a, den), _log_derivative(s, den, q)


@triton.jit
def _root(dy, height, s, d_near, d_far):
    # spline_root: the fraction of the bin at which the spline rises by dy from the end whose
    # derivative is d_near; each form of the root where it has no cancellation, clamped to [0, 1].
    rise = _div(dy, height)
    slope = d_near + d_far - 2.0 * s
    a = rise * slope + (s - d_near)
    bq = d_near - rise * slope
    c = -s * rise
    disc = bq * bq - 4.0 * a * c
    sq = _sqrt(tl.where(disc > 0.0, disc, 0.0))
    # Each form divides by a finite stand-in where it is not taken, so no lane divides 0 by 0.
    plus = bq >= 0.0
    minus = ~plus & (a > 0.0)
    root = tl.where(plus, _div(2.0 * c, tl.where(plus, -bq - sq, -1.0)),
                    tl.where(minus, _div(sq - bq, tl.where(minus, 2.0 * a, 1.0)), 1.0))
    return tl.where(root < 0.0, 0.0, tl.where(root > 1.0, 1.0, root))


@triton.jit
def _inverse(y, x0, x1, y0, y1, d0, d1):
    # spline_inverse: x and log dx/dy at y in the bin (located by y), solved from the nearer end.
    w = x1 - x0
    height = y1 - y0
    s = _div(height, w)
    dy = y - y0
    upper = dy > 0.5 * height
    d_near = tl.where(upper, d1, d0)
    d_far = tl.where(upper, d0, d1)
    theta = _root(tl.where(upper, y1 - y, dy), height, s, d_near, d_far)
    x = tl.where(upper, x1 - theta * w, theta * w + x0)
    _, _, den, q = _terms(theta, s, d_near, d_far)
    return x, -_log_derivative(s, den, q)


@triton.jit
def _chain(f_theta, f_s, f_h, theta, s, w, VALUE: tl.constexpr):
    # spline_chain: the partials of F (y for VALUE, else L) in theta, s and H taken to x, x0, x1,
    # y0 and y1 (theta = (x - x0) / w, s = H / w, H = y1 - y0, and y = y0 + ...).
    g_x = _div(f_theta, w)
    g_x0 = _div(f_theta * (theta - 1.0) + f_s * s, w)
    g_x1 = _div(-(f_theta * theta + f_s * s), w)
    f_sw = _div(f_s, w)
    if VALUE:
        g_y0 = 1.0 - f_h - f_sw
    else:
        g_y0 = 0.0 - f_h - f_sw
    g_y1 = f_h + f_sw
    return g_x, g_x0, g_x1, g_y0, g_y1


@triton.jit
def _vjp(x, x0, x1, y0, y1, d0, d1, g, gl, INVERSE: tl.constexpr):
    # spline_forward_vjp (INVERSE false: the gradients of g * y + gl * log dy/dx at x) or
    # spline_inverse_vjp (of g * x(y) + gl * log dx/dy at the rebuilt x): the input's gradient and
    # those of the bin's knots x0, x1, y0, y1 and derivatives d0, d1.
    w = x1 - x0
    height = y1 - y0
    s = _div(height, w)
    th = _div(x - x0, w)
    t, a, den, q = _terms(th, s, d0, d1)
    # Partials of y (spline_value_partials); dy/dtheta = H s Q / D^2.
    r = _div(a, den)
    hd = _div(height, den)
    py_theta = _div(hd * s * q, den)
    py_s = hd * (th * th - r * (1.0 - 2.0 * t))
    py_h = r
    py_d0 = hd * t * (1.0 - r)
    py_d1 = -hd * r * t
    # Partials of L (spline_log_partials; its H partial is 0).
    slope = d0 + d1 - 2.0 * s
    u = 1.0 - th
    pl_theta = (_div(2.0 * d1 * th + 2.0 * s * (1.0 - 2.0 * th) - 2.0 * d0 * u, q)
                - _div(2.0 * slope * (1.0 - 2.0 * th), den))
    pl_s = _div(tl.full(s.shape, 2.0, s.dtype), s) + _div(2.0 * t, q) - _div(2.0 * (1.0 - 2.0 * t), den)
    pl_d0 = _div(u * u, q) - _div(2.0 * t, den)
    pl_d1 = _div(th * th, q) - _div(2.0 * t, den)
    vx, vx0, vx1, vy0, vy1 = _chain(py_theta, py_s, py_h, th, s, w, True)
    lx, lx0, lx1, ly0, ly1 = _chain(pl_theta, pl_s, 0.0, th, s, w, False)
    if INVERSE:
        # u = (g - gl L_x) / y_x; the knots' gradients are the forward's for (-u, -gl).
        g_in = _div(g - _div(gl * pl_theta, w), _div(py_theta, w))
        g_y = -g_in
        g_l = -gl
    else:
        g_y = g
        g_l = gl
        g_in = g_y * vx + g_l * lx
    return (g_in, g_y * vx0 + g_l * lx0, g_y * vx1 + g_l * lx1, g_y * vy0 + g_l * ly0, g_y * vy1 + g_l * ly1,
            g_y * py_d0 + g_l * pl_d0, g_y * py_d1 + g_l * pl_d1)


@triton.jit
def _param_grads(h_ptr, gh_ptr, base, stride, mask, inside, bins, k, g_x0, g_x1, g_y0, g_y1, g_d0, g_d1, cw0, cw1,
                 ch0, ch1, rd0, rd1, max_w, sum_w, max_h, sum_h, bound, min_w, min_h, min_d, ACC: tl.constexpr):
    # spline_param_grads: the bin's gradients taken back to every raw parameter of the element,
    # each written once into gh (0 outside the bounds). Knot m depends on raw width j through
    # 2 bound (1 - bins min_width) sw_j ([j < m] - C_m); only the bin's two inner knot derivatives
    # get gradients.
    heights = bins * stride
    g0w = tl.where(k > 0, g_x0, 0.0)
    g1w = tl.where(k + 1 < bins, g_x1, 0.0)
    g0h = tl.where(k > 0, g_y0, 0.0)
    g1h = tl.where(k + 1 < bins, g_y1, 0.0)
    base_w = g0w * cw0 + g1w * cw1
    base_h = g0h * ch0 + g1h * ch1
    scale_w = 1.0 - min_w * bins
    scale_h = 1.0 - min_h * bins
    out_ty = gh_ptr.dtype.element_ty
    for j in range(0, bins):
        offs = base + j * stride
        sw = _div(tl.exp(_load(h_ptr, offs, mask, ACC) - max_w), sum_w)
        sh = _div(tl.exp(_load(h_ptr, offs + heights, mask, ACC) - max_h), sum_h)
        in_w = tl.where(j < k, g0w, 0.0) + tl.where(j < k + 1, g1w, 0.0)
        in_h = tl.where(j < k, g0h, 0.0) + tl.where(j < k + 1, g1h, 0.0)
        gw = 2.0 * (bound * (scale_w * sw * (in_w - base_w)))
        gh = 2.0 * (bound * (scale_h * sh * (in_h - base_h)))
        tl.store(gh_ptr + offs, tl.where(inside, gw, 0.0).to(out_ty), mask=mask)
        tl.store(gh_ptr + offs + heights, tl.where(inside, gh, 0.0).to(out_ty), mask=mask)
    # Interior derivative j is d at knot j + 1: the bin's d1 for j == k, its d0 for j == k - 1.
    gd1 = g_d1 * _derivative_grad(rd1, min_d, ACC)
    gd0 = g_d0 * _derivative_grad(rd0, min_d, ACC)
    derivs = base + 2 * heights
    for j in range(0, bins - 1):
        gd = tl.where(j == k, gd1, 0.0) + tl.where(j + 1 == k, gd0, 0.0)
        tl.store(gh_ptr + derivs + j * stride, tl.where(inside, gd, 0.0).to(out_ty), mask=mask)


@triton.jit(do_not_specialize=["bound_hi", "bound_lo", "min_w_hi", "min_w_lo", "min_h_hi", "min_h_lo",
                               "min_d_hi", "min_d_lo"])
def _rq_spline_kernel(
    in_ptr,  # [B, C, S], samples ROW_STRIDE apart: x (forward) or y (inverse)
    h_ptr,  # [B, C * P, S] contiguous: raw widths, heights, interior derivatives per element
    out_ptr,  # [B, C, S], samples ROW_STRIDE apart: y (forward) or x (inverse)
    partial_ptr,  # [B, NBLK] compute dtype: sum of log |d out / d in| over the tile's part of each sample
    B,
    C,
    S,
    ROW_STRIDE,
    NBLK,
    bins,
    bound_hi,
    bound_lo,
    min_w_hi,
    min_w_lo,
    min_h_hi,
    min_h_lo,
    min_d_hi,
    min_d_lo,
    INVERSE: tl.constexpr,
    ACC: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    rows, col_blk, row_ok, mask, offs, base, stride = _tile(B, C, S, ROW_STRIDE, NBLK, bins, ROWS, BLOCK)
    bound, min_w, min_h, min_d = _settings(bound_hi, bound_lo, min_w_hi, min_w_lo, min_h_hi, min_h_lo, min_d_hi,
                                           min_d_lo, ACC)
    v = tl.load(in_ptr + offs, mask=mask, other=0.0).to(ACC)
    outside, vc = _inside(v, bound)
    max_w, sum_w, max_h, sum_h = _softmax_stats(h_ptr, base, stride, mask, bins, ACC)
    _, x0, x1, y0, y1, d0, d1, _, _, _, _, _, _ = _locate(h_ptr, base, stride, mask, vc, bins, bound, min_w, min_h,
                                                          min_d, max_w, sum_w, max_h, sum_h, INVERSE, ACC)
    if INVERSE:
        out, log_d = _inverse(vc, x0, x1, y0, y1, d0, d1)
    else:
        out, log_d = _forward(vc, x0, x1, y0, y1, d0, d1)
    tl.store(out_ptr + offs, tl.where(outside, v, out).to(out_ptr.dtype.element_ty), mask=mask)
    part = tl.sum(tl.where(mask & ~outside, log_d, 0.0), axis=1)
    tl.store(partial_ptr + rows * NBLK + col_blk, part, mask=row_ok)


@triton.jit(do_not_specialize=["bound_hi", "bound_lo", "min_w_hi", "min_w_lo", "min_h_hi", "min_h_lo",
                               "min_d_hi", "min_d_lo"])
def _rq_spline_bwd_kernel(
    g_ptr,  # [B, C, S], samples ROW_STRIDE apart: gradient of the op's output
    gl_ptr,  # [B] compute dtype: gradient of the op's log-det
    x_ptr,  # [B, C, S], samples ROW_STRIDE apart: data side, the forward's input or the inverse's output
    h_ptr,  # [B, C * P, S] contiguous: raw parameters
    gin_ptr,  # [B, C, S], samples ROW_STRIDE apart: gradient of the op's input (x forward, y inverse)
    gh_ptr,  # [B, C * P, S] contiguous: gradient of h
    B,
    C,
    S,
    ROW_STRIDE,
    NBLK,
    bins,
    bound_hi,
    bound_lo,
    min_w_hi,
    min_w_lo,
    min_h_hi,
    min_h_lo,
    min_d_hi,
    min_d_lo,
    REVERSE: tl.constexpr,
    ACC: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    rows, col_blk, row_ok, mask, offs, base, stride = _tile(B, C, S, ROW_STRIDE, NBLK, bins, ROWS, BLOCK)
    bound, min_w, min_h, min_d = _settings(bound_hi, bound_lo, min_w_hi, min_w_lo, min_h_hi, min_h_lo, min_d_hi,
                                           min_d_lo, ACC)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(ACC)
    gl = tl.load(gl_ptr + rows, mask=row_ok, other=0.0).to(ACC)[:, None]
    outside, xc = _inside(x, bound)
    max_w, sum_w, max_h, sum_h = _softmax_stats(h_ptr, base, stride, mask, bins, ACC)
    k, x0, x1, y0, y1, d0, d1, cw0, cw1, ch0, ch1, rd0, rd1 = _locate(
        h_ptr, base, stride, mask, xc, bins, bound, min_w, min_h, min_d, max_w, sum_w, max_h, sum_h, False, ACC)
    g_in, g_x0, g_x1, g_y0, g_y1, g_d0, g_d1 = _vjp(xc, x0, x1, y0, y1, d0, d1, g, gl, REVERSE)
    tl.store(gin_ptr + offs, tl.where(outside, g, g_in).to(gin_ptr.dtype.element_ty), mask=mask)
    _param_grads(h_ptr, gh_ptr, base, stride, mask, ~outside, bins, k, g_x0, g_x1, g_y0, g_y1, g_d0, g_d1, cw0, cw1,
                 ch0, ch1, rd0, rd1, max_w, sum_w, max_h, sum_h, bound, min_w, min_h, min_d, ACC)


@triton.jit(do_not_specialize=["bound_hi", "bound_lo", "min_w_hi", "min_w_lo", "min_h_hi", "min_h_lo",
                               "min_d_hi", "min_d_lo"])
def _rq_spline_inv_bwd_kernel(
    y_ptr,  # [B, C, S], samples ROW_STRIDE apart: the forward's output
    h_ptr,  # [B, C * P, S] contiguous: raw parameters
    g_ptr,  # [B, C, S], samples ROW_STRIDE apart: gradient of y
    gl_ptr,  # [B] compute dtype: gradient of the log-det
    x_ptr,  # [B, C, S], samples ROW_STRIDE apart: the rebuilt input
    gx_ptr,  # [B, C, S], samples ROW_STRIDE apart: gradient of x
    gh_ptr,  # [B, C * P, S] contiguous: gradient of h
    B,
    C,
    S,
    ROW_STRIDE,
    NBLK,
    bins,
    bound_hi,
    bound_lo,
    min_w_hi,
    min_w_lo,
    min_h_hi,
    min_h_lo,
    min_d_hi,
    min_d_lo,
    ACC: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # Inverse and forward VJP in one pass: the bin located by y, x rebuilt in it, and the forward's
    # VJP at x in the same bin (spline_element_inv_vjp).
    rows, col_blk, row_ok, mask, offs, base, stride = _tile(B, C, S, ROW_STRIDE, NBLK, bins, ROWS, BLOCK)
    bound, min_w, min_h, min_d = _settings(bound_hi, bound_lo, min_w_hi, min_w_lo, min_h_hi, min_h_lo, min_d_hi,
                                           min_d_lo, ACC)
    y = tl.load(y_ptr + offs, mask=mask, other=0.0).to(ACC)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(ACC)
    gl = tl.load(gl_ptr + rows, mask=row_ok, other=0.0).to(ACC)[:, None]
    outside, yc = _inside(y, bound)
    max_w, sum_w, max_h, sum_h = _softmax_stats(h_ptr, base, stride, mask, bins, ACC)
    k, x0, x1, y0, y1, d0, d1, cw0, cw1, ch0, ch1, rd0, rd1 = _locate(
        h_ptr, base, stride, mask, yc, bins, bound, min_w, min_h, min_d, max_w, sum_w, max_h, sum_h, True, ACC)
    x, _ = _inverse(yc, x0, x1, y0, y1, d0, d1)
    g_x, g_x0, g_x1, g_y0, g_y1, g_d0, g_d1 = _vjp(x, x0, x1, y0, y1, d0, d1, g, gl, False)
    out_ty = x_ptr.dtype.element_ty
    tl.store(x_ptr + offs, tl.where(outside, y, x).to(out_ty), mask=mask)
    tl.store(gx_ptr + offs, tl.where(outside, g, g_x).to(out_ty), mask=mask)
    _param_grads(h_ptr, gh_ptr, base, stride, mask, ~outside, bins, k, g_x0, g_x1, g_y0, g_y1, g_d0, g_d1, cw0, cw1,
                 ch0, ch1, rd0, rd1, max_w, sum_w, max_h, sum_h, bound, min_w, min_h, min_d, ACC)


class TileConfig(NamedTuple):
    """One program's tile: ``rows`` samples by ``block`` elements of each sample."""

    rows: int
    block: int
    num_warps: int


# The GPU tiles, for N = C * S up to 8, 64 and beyond (then several tiles per sample): 256
# elements at 4 warps, two per thread. At most 127 registers per thread in float32 and 196 in
# float64 (the VJP kernels), no spills, on sm_80 and sm_90: measured with invkernels.triton.aot.
GPU_TILES = (TileConfig(32, 8, 4), TileConfig(4, 64, 4), TileConfig(1, 256, 4))


def tile_config(batch: int, n: int) -> TileConfig:
    """The tile the launchers use for ``batch`` samples of ``n`` elements each."""
    if not interpreting():
        return next((t for t in GPU_TILES if t.block >= n), GPU_TILES[-1])
    block = min(triton.next_power_of_2(n), MAX_TILE_INTERPRETER)
    return TileConfig(min(triton.next_power_of_2(batch), MAX_TILE_INTERPRETER // block), block, 4)


class _Geometry(NamedTuple):
    batch: int
    channels: int  # the transformed channels
    spatial: int
    passthrough: int


def _geometry(x: torch.Tensor, passthrough: int) -> _Geometry:
    return _Geometry(x.shape[0], x.shape[1] - passthrough, math.prod(x.shape[2:]), passthrough)


def _split(value: float) -> tuple[float, float]:
    """``value`` as a float32 pair ``hi + lo``: the kernels add the two in the compute dtype, which
    gives the float32 rounding of ``value`` in float32 and ``value`` to 2^-48 relative in float64,
    although Triton passes Python floats as float32."""
    hi = struct.unpack("f", struct.pack("f", value))[0]
    lo = struct.unpack("f", struct.pack("f", value - hi))[0]
    return hi, lo


def _launch_args(geo: _Geometry, bins: int, tail_bound: float, min_bin_width: float, min_bin_height: float,
                 min_derivative: float, dtype: torch.dtype) -> tuple[tuple[int], int, dict]:
    """``(grid, NBLK, keyword arguments)`` shared by every spline kernel: the sizes, the tile and
    the settings."""
    n = geo.channels * geo.spatial
    if n >= 2**31:
        raise ValueError(f"the Triton spline kernels transform fewer than 2^31 elements per sample, got {n} "
                         f"({geo.channels} channels of {geo.spatial} positions); use backend='cpp'")
    tile = tile_config(geo.batch, n)
    nblk = triton.cdiv(n, tile.block)
    settings = {}
    for name, value in (("bound", tail_bound), ("min_w", min_bin_width), ("min_h", min_bin_height),
                        ("min_d", min_derivative)):
        settings[f"{name}_hi"], settings[f"{name}_lo"] = _split(float(value))
    kwargs = dict(B=geo.batch, C=geo.channels, S=geo.spatial, ROW_STRIDE=n + geo.passthrough * geo.spatial,
                  NBLK=nblk, bins=bins, **settings,
                  ACC=compute_dtype(dtype)[1], ROWS=tile.rows, BLOCK=tile.block, num_warps=tile.num_warps)
    return (triton.cdiv(geo.batch, tile.rows) * nblk,), nblk, kwargs


def _copy_passthrough(to: torch.Tensor, src: torch.Tensor, passthrough: int) -> None:
    """The first ``passthrough`` channels of an op's output (or gradient) are its input's."""
    if passthrough:
        to[:, :passthrough] = src[:, :passthrough]


def _apply(op: str, src: torch.Tensor, h: torch.Tensor, bins: int, tail_bound: float, min_bin_width: float,
           min_bin_height: float, min_derivative: float, passthrough: int,
           inverse: bool) -> tuple[torch.Tensor, torch.Tensor]:
    check_device(op, src, "y" if inverse else "x")
    src = src.contiguous()
    h = h.contiguous()
    geo = _geometry(src, passthrough)
    acc_torch, _ = compute_dtype(src.dtype)
    out = torch.empty(src.shape, dtype=src.dtype, device=src.device)
    _copy_passthrough(out, src, passthrough)
    if h.numel() == 0:
        return out, torch.zeros(geo.batch, dtype=acc_torch, device=src.device)
    grid, nblk, kwargs = _launch_args(geo, bins, tail_bound, min_bin_width, min_bin_height, min_derivative,
                                      src.dtype)
    partial = torch.empty((geo.batch, nblk), dtype=acc_torch, device=src.device)
    with device_guard(src):
        _rq_spline_kernel[grid](in_ptr=src[:, passthrough:], h_ptr=h, out_ptr=out[:, passthrough:], partial_ptr=partial,
                                INVERSE=inverse, **kwargs)
    return out, partial.sum(dim=1)


def rq_spline_forward(x: torch.Tensor, h: torch.Tensor, bins: int, tail_bound: float = 3.0,
                      min_bin_width: float = 1e-3, min_bin_height: float = 1e-3, min_derivative: float = 1e-3,
                      passthrough: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y, logdet)`` of the spline forward (the first ``passthrough`` channels copied)."""
    return _apply("rq_spline_fwd", x, h, bins, tail_bound, min_bin_width, min_bin_height, min_derivative,
                  passthrough, inverse=False)


def rq_spline_inverse(y: torch.Tensor, h: torch.Tensor, bins: int, tail_bound: float = 3.0,
                      min_bin_width: float = 1e-3, min_bin_height: float = 1e-3, min_derivative: float = 1e-3,
                      passthrough: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, logdet_inv)`` of the spline inverse; ``logdet_inv`` is minus the forward's at ``x``."""
    return _apply("rq_spline_inv", y, h, bins, tail_bound, min_bin_width, min_bin_height, min_derivative,
                  passthrough, inverse=True)


def rq_spline_backward(grad_out: torch.Tensor, grad_logdet: torch.Tensor, x: torch.Tensor, h: torch.Tensor,
                       bins: int, tail_bound: float, min_bin_width: float, min_bin_height: float,
                       min_derivative: float, reverse: bool,
                       passthrough: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(grad_in, grad_h)`` of the spline forward (``reverse=False``, ``x`` its input) or inverse
    (``reverse=True``, ``x`` its output: ``grad_in`` is the gradient of its input ``y``)."""
    check_device("rq_spline_bwd", x, "x")
    grad_out, grad_logdet, x, h = (t.contiguous() for t in (grad_out, grad_logdet, x, h))
    grad_in = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    grad_h = torch.empty(h.shape, dtype=h.dtype, device=h.device)
    _copy_passthrough(grad_in, grad_out, passthrough)
    if grad_h.numel() == 0:
        return grad_in, grad_h
    grid, _, kwargs = _launch_args(_geometry(x, passthrough), bins, tail_bound, min_bin_width, min_bin_height,
                                   min_derivative, x.dtype)
    with device_guard(x):
        _rq_spline_bwd_kernel[grid](g_ptr=grad_out[:, passthrough:], gl_ptr=grad_logdet, x_ptr=x[:, passthrough:],
                                    h_ptr=h, gin_ptr=grad_in[:, passthrough:], gh_ptr=grad_h, REVERSE=reverse,
                                    **kwargs)
    return grad_in, grad_h


def rq_spline_inverse_backward(y: torch.Tensor, h: torch.Tensor, grad_y: torch.Tensor, grad_logdet: torch.Tensor,
                               bins: int, tail_bound: float, min_bin_width: float, min_bin_height: float,
                               min_derivative: float,
                               passthrough: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x, grad_x, grad_h)``: the forward's input rebuilt from its output ``y`` and the gradients
    of the forward at it, in one pass (memory-free backprop)."""
    check_device("rq_spline_inv_bwd", y, "y")
    y, h, grad_y, grad_logdet = (t.contiguous() for t in (y, h, grad_y, grad_logdet))
    x = torch.empty(y.shape, dtype=y.dtype, device=y.device)
    grad_x = torch.empty(y.shape, dtype=y.dtype, device=y.device)
    grad_h = torch.empty(h.shape, dtype=h.dtype, device=h.device)
    _copy_passthrough(x, y, passthrough)
    _copy_passthrough(grad_x, grad_y, passthrough)
    if grad_h.numel() == 0:
        return x, grad_x, grad_h
    grid, _, kwargs = _launch_args(_geometry(y, passthrough), bins, tail_bound, min_bin_width, min_bin_height,
                                   min_derivative, y.dtype)
    with device_guard(y):
        _rq_spline_inv_bwd_kernel[grid](y_ptr=y[:, passthrough:], h_ptr=h, g_ptr=grad_y[:, passthrough:],
                                        gl_ptr=grad_logdet, x_ptr=x[:, passthrough:], gx_ptr=grad_x[:, passthrough:],
                                        gh_ptr=grad_h, **kwargs)
    return x, grad_x, grad_h


_KERNELS = ("_rq_spline_kernel", "_rq_spline_bwd_kernel", "_rq_spline_inv_bwd_kernel")


def gpu_configs() -> dict[str, tuple[TileConfig, ...]]:
    """Every tile each kernel launches with on a GPU (:func:`tile_config`): the set compiled ahead
    of time."""
    return {name: GPU_TILES for name in _KERNELS}


def aot_cases(dtype: torch.dtype):
    """Launcher calls ``(op, args)`` on meta tensors of ``dtype`` that reach every tile of
    :func:`gpu_configs` (invkernels.triton.aot); ``bins`` is a runtime argument, so one value
    serves every bin count."""
    gl = meta(2, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    bins = 8
    settings = (bins, 3.0, 1e-3, 1e-3, 1e-3)
    for tile in GPU_TILES:
        x, h = meta(2, 1, tile.block, dtype=dtype), meta(2, 3 * bins - 1, tile.block, dtype=dtype)
        yield "rq_spline_fwd", (x, h, *settings)
        yield "rq_spline_inv", (x, h, *settings)
        for reverse in (False, True):
            yield "rq_spline_bwd", (x, gl, x, h, *settings, reverse)
        yield "rq_spline_inv_bwd", (x, h, x, gl, *settings)


# The launcher of each registered op (docs/ops/spline.md). invkernels.ops.spline defines the Triton
# twins <op>_triton from the C++ schemas with them; the twins check their arguments (the checks of
# the C++ ops) before calling a launcher.
LAUNCHERS = {
    "rq_spline_fwd": rq_spline_forward,
    "rq_spline_inv": rq_spline_inverse,
    "rq_spline_bwd": rq_spline_backward,
    "rq_spline_inv_bwd": rq_spline_inverse_backward,
}
