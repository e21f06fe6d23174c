"""Pure-PyTorch rational-quadratic spline (neural spline flows, Durkan et al. 2019): the test
oracle (run in float64) and the eager baseline of the spline ops.

Conventions are those of nflows' ``unconstrained_rational_quadratic_spline`` with
``tails="linear"``: inside ``[-tail_bound, tail_bound]`` a monotone rational-quadratic spline of
``bins`` bins, identity outside. Per element the subnet gives ``bins`` unnormalized widths,
``bins`` unnormalized heights and ``bins - 1`` unnormalized interior derivatives, normalized by
:func:`knots` (softmax with minimum bin sizes, ``min_derivative + softplus``, boundary
derivatives 1). Formulas and numerics: docs/ops/spline.md.

The computation is split in two steps, as the kernels are: the normalization of the parameters
into knots (the only step that differs between the parameterizations of the flow libraries), and
the spline evaluated from the knots of an element's bin.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from invkernels._validation import check_spline, logdet_dtype

def derivative_limit(dtype: torch.dtype) -> float:
    """The largest knot derivative the spline uses when computing in ``dtype`` (float32 or float64):
    ``2**(e / 2 - 4)`` for the largest exponent ``e`` (2**60 in float32, 2**508 in float64), a
    sixteenth of the square root of the largest value. Below it every intermediate of the forward,
    the inverse's quadratic and both VJPs stays finite; a larger ``min_derivative +
    softplus(raw)`` is held at it (and gets no gradient)."""
    return 2.0 ** (math.frexp(torch.finfo(dtype).max)[1] // 2 - 4)


def _clamp_outside(v: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """``v`` clamped to ``[low, high]``, the values inside (the bounds included) left as they are, so
    their gradient passes (``torch.clamp`` gives 0 at the bounds themselves)."""
    return torch.where((v < low) | (v > high), v.clamp(low, high), v)


class Knots(NamedTuple):
    """The knots of every element's spline, on the last dimension: ``xs``, ``ys`` (``bins + 1``
    increasing positions, from ``-tail_bound`` to ``tail_bound``) and the derivatives ``ds`` at
    them (``bins + 1``, positive, the two boundary ones 1)."""

    xs: torch.Tensor
    ys: torch.Tensor
    ds: torch.Tensor


def _positions(raw: torch.Tensor, tail_bound: float, minimum: float) -> torch.Tensor:
    """Knot positions from unnormalized bin sizes (nflows' widths / heights): softmax with a
    minimum size, cumulated over ``[-tail_bound, tail_bound]``, the two ends set exactly."""
    bins = raw.shape[-1]
    sizes = minimum + (1 - minimum * bins) * torch.softmax(raw, dim=-1)
    cum = F.pad(torch.cumsum(sizes, dim=-1), (1, 0))
    cum = 2 * tail_bound * cum - tail_bound
    ends = torch.full_like(cum[..., :1], tail_bound)
    return torch.cat([-ends, cum[..., 1:-1], ends], dim=-1)


def knots(params: torch.Tensor, bins: int, tail_bound: float, min_bin_width: float, min_bin_height: float,
          min_derivative: float) -> Knots:
    """nflows' normalization (``tails="linear"``) of ``params`` (``[..., 3 * bins - 1]``: widths,
    heights, interior derivatives): widths and heights by a softmax (max-subtracted, so exact for
    any finite raw values and unchanged by adding a constant to all of them), the derivatives
    held at :func:`derivative_limit`."""
    widths, heights, derivs = params.split([bins, bins, bins - 1], dim=-1)
    ones = torch.ones_like(params[..., :1])
    limit = derivative_limit(params.dtype)
    interior = min_derivative + F.softplus(derivs)
    interior = torch.where(interior > limit, torch.full_like(interior, limit), interior)
    ds = torch.cat([ones, interior, ones], dim=-1)
    return Knots(_positions(widths, tail_bound, min_bin_width), _positions(heights, tail_bound, min_bin_height), ds)


class _Bin(NamedTuple):
    x0: torch.Tensor
    x1: torch.Tensor
    width: torch.Tensor
    y0: torch.Tensor
    y1: torch.Tensor
    height: torch.Tensor
    d0: torch.Tensor
    d1: torch.Tensor


def _bin(k: Knots, v: torch.Tensor, positions: torch.Tensor) -> _Bin:
    """The bin of each element ``v`` in ``positions`` (``k.xs`` forward, ``k.ys`` inverse): the last
    knot ``<= v`` among the first ``bins`` (a value on an interior knot belongs to the bin on its
    right, as in nflows)."""
    bins = positions.shape[-1] - 1
    idx = (v.unsqueeze(-1) >= positions[..., 1:bins]).sum(dim=-1, keepdim=True)

    def at(t: torch.Tensor, offset: int = 0) -> torch.Tensor:
        return t.gather(-1, idx + offset).squeeze(-1)

    x0, x1, y0, y1 = at(k.xs), at(k.xs, 1), at(k.ys), at(k.ys, 1)
    return _Bin(x0, x1, x1 - x0, y0, y1, y1 - y0, at(k.ds), at(k.ds, 1))


def _log_derivative(b: _Bin, theta: torch.Tensor) -> torch.Tensor:
    """``log dy/dx`` of the spline in bin ``b`` at the fraction ``theta`` of the bin, as ``2 log s +
    log Q - 2 log D`` (the product ``s² Q`` could overflow where each factor does not)."""
    s = b.height / b.width
    t1 = theta * (1 - theta)
    denominator = s + (b.d0 + b.d1 - 2 * s) * t1
    q = b.d1 * theta.pow(2) + 2 * s * t1 + b.d0 * (1 - theta).pow(2)
    return 2 * torch.log(s) + torch.log(q) - 2 * torch.log(denominator)


def spline_forward(v: torch.Tensor, k: Knots) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y, log dy/dx)`` per element of ``v`` (inside ``[-tail_bound, tail_bound]``) for knots ``k``."""
    b = _bin(k, v, k.xs)
    s = b.height / b.width
    theta = (v - b.x0) / b.width
    t1 = theta * (1 - theta)
    y = b.y0 + b.height * ((s * theta.pow(2) + b.d0 * t1) / (s + (b.d0 + b.d1 - 2 * s) * t1))
    return y, _log_derivative(b, theta)


def _root(dy: torch.Tensor, height: torch.Tensor, s: torch.Tensor, d0: torch.Tensor, d1: torch.Tensor) -> torch.Tensor:
    """The fraction ``theta`` of the bin, measured from the end whose derivative is ``d0``, at which
    the spline has moved by ``dy`` from that end: the root in ``[0, 1]`` of ``a θ² + b θ + c = 0``
    (divided by the bin's height, so that ``b²`` stays finite for any tail bound). ``c = -s dy / H
    <= 0`` and ``a + b + c = s (1 - dy / H) >= 0``, so the root is the one of the two forms without
    cancellation: ``2c / (-b - sqrt(b² - 4ac))`` for ``b >= 0`` (nflows' form), ``(-b + sqrt(b² -
    4ac)) / 2a`` for ``b < 0`` (then ``a > 0``; the first form loses every digit when the far
    derivative dwarfs the near one and the spline's plateau lies beyond ``dy``). The discriminant
    is clamped at 0 and the root to ``[0, 1]`` (both hold in exact arithmetic; rounded, next to a
    knot of a steep bin, a root just beyond the bin makes the derivative negative); a rise beyond
    the bin with ``b < 0`` gives 1. Each form is evaluated only where it is used (the other's
    denominator replaced by a finite one), so no NaN reaches a gradient."""
    rise = dy / height
    slope = d0 + d1 - 2 * s
    a = rise * slope + (s - d0)
    b = d0 - rise * slope
    c = -s * rise
    root = torch.sqrt((b.pow(2) - 4 * a * c).clamp_min(0))
    plus = b >= 0
    minus = ~plus & (a > 0)
    theta = torch.where(plus, 2 * c / torch.where(plus, -b - root, -torch.ones_like(b)),
                        torch.where(minus, (root - b) / (2 * torch.where(minus, a, torch.ones_like(a))),
                                    torch.ones_like(a)))
    return _clamp_outside(theta, 0.0, 1.0)


def spline_inverse(v: torch.Tensor, k: Knots) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, log dx/dy)`` per element of ``v`` (inside the bounds) for knots ``k``. The quadratic is
    solved from the bin's end nearer to ``v`` (the spline read backwards from the end is the same
    spline with the two derivatives exchanged), so the rounding of ``v`` against that knot, not
    against the far one, sets the error of the root."""
    bn = _bin(k, v, k.ys)
    s = bn.height / bn.width
    dy = v - bn.y0
    upper = dy > 0.5 * bn.height
    near = torch.where(upper, bn.y1 - v, dy)
    d_near, d_far = torch.where(upper, bn.d1, bn.d0), torch.where(upper, bn.d0, bn.d1)
    theta = _root(near, bn.height, s, d_near, d_far)
    x = torch.where(upper, bn.x1 - theta * bn.width, theta * bn.width + bn.x0)
    return x, -_log_derivative(bn._replace(d0=d_near, d1=d_far), theta)


def _transform(op: str, x: torch.Tensor, h: torch.Tensor, bins: int, tail_bound: float, min_bin_width: float,
               min_bin_height: float, min_derivative: float, passthrough: int, inverse: bool):
    check_spline(op, x, h, bins, tail_bound, min_bin_width, min_bin_height, min_derivative, passthrough,
                 "y" if inverse else "x")
    acc = torch.promote_types(x.dtype, torch.float32)
    v = x[:, passthrough:].to(acc)
    params = h.to(acc).unflatten(1, (v.shape[1], 3 * bins - 1)).movedim(2, -1)
    k = knots(params, bins, tail_bound, min_bin_width, min_bin_height, min_derivative)
    inside = (v >= -tail_bound) & (v <= tail_bound)
    # The spline is evaluated on the values clamped into the bounds, so the branch that
    # torch.where discards is finite and its gradient (multiplied by 0) cannot be NaN; the
    # bounds themselves keep their gradient (they are the spline's, as in nflows).
    out, log_d = (spline_inverse if inverse else spline_forward)(_clamp_outside(v, -tail_bound, tail_bound), k)
    out = torch.where(inside, out, v)
    log_d = torch.where(inside, log_d, torch.zeros_like(log_d))
    out = torch.cat([x[:, :passthrough], out.to(x.dtype)], dim=1)
    return out, log_d.flatten(1).sum(dim=1, dtype=logdet_dtype(x.dtype))


def rq_spline_fwd(x: torch.Tensor, h: torch.Tensor, bins: int, tail_bound: float = 3.0, min_bin_width: float = 1e-3,
                  min_bin_height: float = 1e-3, min_derivative: float = 1e-3,
                  passthrough: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y, logdet)`` of the rational-quadratic spline with linear tails, elementwise on
    ``x[:, passthrough:]``; ``y[:, :passthrough] = x[:, :passthrough]``.

    Args:
        x: ``[B, C, *spatial]``.
        h: ``[B, (C - passthrough) * (3 * bins - 1), *spatial]``;
            ``h.unflatten(1, (C - passthrough, 3 * bins - 1))`` holds per transformed element the
            unnormalized widths (``bins``), heights (``bins``) and interior derivatives
            (``bins - 1``).
        bins, tail_bound, min_bin_width, min_bin_height, min_derivative: as in nflows.
        passthrough: leading channels copied through (a coupling's untouched half), in ``[0, C)``.

    Returns:
        ``y`` (``x``'s dtype; float16/bfloat16 computed in float32) and ``logdet`` ``[B]`` in
        ``logdet_dtype(x.dtype)``.
    """
    return _transform("rq_spline_fwd", x, h, bins, tail_bound, min_bin_width, min_bin_height, min_derivative,
                      passthrough, inverse=False)


def rq_spline_inv(y: torch.Tensor, h: torch.Tensor, bins: int, tail_bound: float = 3.0, min_bin_width: float = 1e-3,
                  min_bin_height: float = 1e-3, min_derivative: float = 1e-3,
                  passthrough: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`rq_spline_fwd`: ``(x, logdet of the inverse)``, the log-det being minus the
    forward's at ``x``."""
    return _transform("rq_spline_inv", y, h, bins, tail_bound, min_bin_width, min_bin_height, min_derivative,
                      passthrough, inverse=True)


def rq_spline_vjp(grad_out: torch.Tensor, grad_logdet: torch.Tensor, x: torch.Tensor, h: torch.Tensor, bins: int,
                  tail_bound: float, min_bin_width: float, min_bin_height: float, min_derivative: float,
                  reverse: bool, passthrough: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(grad_in, grad_h)``: the VJP of :func:`rq_spline_fwd` at its input ``x`` (``reverse``
    False), or of :func:`rq_spline_inv` at its output ``x`` (``reverse`` True: the gradients with
    respect to the inverse's input ``y = forward(x)`` and ``h``), for the gradients ``(grad_out,
    grad_logdet)`` of the op's outputs, by autograd through the forward at ``x``.

    The inverse's VJP follows from the forward's by the implicit function theorem (``f(x, h) = y``
    elementwise, ``L = log f_x``): with ``u = (g_x - g_l L_x) / f_x`` it is ``grad_y = u`` and
    ``grad_h = -u f_h - g_l L_h``, all taken at ``x`` (no round trip through the inverse)."""
    settings = (bins, tail_bound, min_bin_width, min_bin_height, min_derivative, passthrough)
    with torch.enable_grad():
        leaf, h_leaf = x.detach().requires_grad_(), h.detach().requires_grad_()
        y, logdet = rq_spline_fwd(leaf, h_leaf, *settings)
        if not reverse:
            grad_in, grad_h = torch.autograd.grad((y, logdet), (leaf, h_leaf), (grad_out, grad_logdet))
            return grad_in, grad_h
        # Each element's output and log-derivative depend on that element alone: the gradients of
        # the sums are the elementwise derivatives.
        f_x, l_x = (torch.autograd.grad(t.sum(), leaf, retain_graph=True)[0] for t in (y, logdet))
        g_l = grad_logdet.to(l_x.dtype).view(-1, *([1] * (x.dim() - 1)))
        u = (grad_out.to(l_x.dtype) - g_l * l_x) / f_x
        grad_h = torch.autograd.grad((y, logdet), h_leaf, (-u.to(y.dtype), -grad_logdet))[0]
    return u.to(x.dtype), grad_h


def rq_spline_inv_bwd(y: torch.Tensor, h: torch.Tensor, grad_y: torch.Tensor, grad_logdet: torch.Tensor, bins: int,
                      tail_bound: float, min_bin_width: float, min_bin_height: float, min_derivative: float,
                      passthrough: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x, grad_x, grad_h)``: ``x`` rebuilt from the forward's output ``y`` and the VJP of the
    forward at ``x`` for ``(grad_y, grad_logdet)`` (the memory-free backward of the spline)."""
    settings = (bins, tail_bound, min_bin_width, min_bin_height, min_derivative)
    with torch.no_grad():
        x = rq_spline_inv(y, h, *settings, passthrough)[0]
    return (x, *rq_spline_vjp(grad_y, grad_logdet, x, h, *settings, False, passthrough))


def identity_derivative_offset(min_derivative: float) -> float:
    """The raw interior derivative whose normalized derivative is 1 (``min_derivative +
    softplus(raw) = 1``): with zero widths and heights and this offset the spline is the identity."""
    return math.log(math.expm1(1 - min_derivative))
