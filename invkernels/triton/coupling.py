"""Triton kernels and launchers of the affine and additive coupling layers.

The ops ``torch.ops.invkernels.<op>_triton`` are defined by invkernels.ops.coupling from the C++
schemas, one per entry of :data:`LAUNCHERS`; they check their arguments and call the launchers
here, which only check the device. Formulas, layout and op schemas: docs/ops/coupling.md. Per sample ``b`` the contiguous input is
viewed as ``[C, S]`` and split into the passthrough half ``x1`` (``C1 = C // 2`` channels,
``N1 = C1 * S`` elements, at offset ``b * C * S``) and the transformed half ``x2`` (``C2 = C - C1``
channels, ``N2 = C2 * S`` elements, at offset ``b * C * S + N1``). The affine subnet output ``h``
holds the raw log-scale ``hs`` (at ``b * 2 * N2``) and the shift ``t`` (at ``b * 2 * N2 + N2``);
the additive one holds ``t`` alone (at ``b * N2``).

Scale functions (``SCALE`` constexpr; ``c`` is the clamp, ``z = hs + 2``)::

    exp:      L = c * tanh(hs / c)                  L' = 1 - tanh(hs / c)^2
    sigmoid:  L = min(z, 0) - log1p(exp(-|z|))      L' = sigmoid(-z)

Forward, inverse and log-determinant (the Jacobian is block lower-triangular with identity on
``x1`` and ``diag(exp(L))`` on ``x2``)::

    forward:  y1 = x1,  y2 = x2 * exp(L) + t,      logdet[b]     =  sum_{c,s} L
    inverse:  x1 = y1,  x2 = (y2 - t) * exp(-L),   logdet_inv[b] = -sum_{c,s} L

The inverse multiplies by ``exp(-L)`` (``1 + exp(-z)`` for the sigmoid scale) and never divides.

Vector-Jacobian products, with ``g = (g1, g2)`` the gradient of the op's output and
``gl = grad_logdet[b]``; ``x2`` is always the data-side value::

    forward VJP (reverse=False, x the forward's input):
        dx1 = g1,  dx2 = g2 * exp(L),   dt = g2,    dhs =  (g2 * x2 * exp(L) + gl) * L'
    inverse VJP (reverse=True, x the inverse's output, since dx2/dhs = -x2 * L'):
        dy1 = g1,  dy2 = g2 * exp(-L),  dt = -dy2,  dhs = -(g2 * x2 + gl) * L'
    additive:  y2 = x2 + t,  x2 = y2 - t,  logdet 0;  VJP: d_in = g,  dt = +g2 (fwd) or -g2 (inv)
    inverse + forward VJP in one pass (memory-free backprop, from y): x2 = (y2 - t) * exp(-L),
        dx1 = g1,  dx2 = g2 * exp(L),  dt = g2,  dhs = (g2 * (y2 - t) + gl) * L'

Numerics. Elementwise math runs in float32 for float16/bfloat16/float32 inputs and in float64 for
float64 inputs; tensor results are stored in the input dtype, log-dets in the compute dtype
(float32 for half inputs: a half log-det overflows at 65504). ``tl.math`` has no ``tanh`` or
``log1p`` and ``libdevice`` does not run under ``TRITON_INTERPRET=1``, so both are built from
``exp``, ``log`` and arithmetic, accurate to a few ulps relative for every input (the formulas of
``soft_clamp`` in csrc/kernels/coupling.h, which the C++ and CUDA kernels run)::

    u = hs / c,  a = |u|
    a <= 0.625:  tanh(u) = u (1 + q),  q = u^2 P(u^2) (float32) or u^2 P(u^2) / Q(u^2) (float64),
                 Cephes' minimax fit;  L = hs + hs * q,  L' = 1 - tanh(u)^2
    otherwise:   e = exp(-2a);  L = sign(hs) * c * (1 - e) / (1 + e),  L' = 4e / (1 + e)^2
    log1p(e) = log(w) + (e - (w - 1)),  w = 1 + e   (adds the rounding error of w, which is exact:
                 a few ulps for e in [0, 1], where log(w) alone is off by an ulp of 1)

The small branch needs no ``exp`` at all; the textbook ``tanh(u) = (1 - e) / (1 + e)`` for every
``u`` has an absolute error of an ulp of 1, which is all of ``tanh(u)`` as ``u -> 0`` (a large
clamp). Both formulas map +-inf to the limits and keep NaN. Their accuracy is measured under the
interpreter (numpy's ``exp`` and ``log``); compiled for a GPU the large branch and ``log1p`` are as
accurate as ``tl.exp`` and ``tl.log`` there, while the small branch uses neither.

Each program handles a tile of ``ROWS`` samples by ``BLOCK`` elements of the transformed half and
the matching elements of the passthrough half; the tiles cover ``max(N1, N2)`` elements of a
sample (where the passthrough half is the longer, the last tiles only copy). On a GPU the tile is
one of the explicit set :data:`GPU_TILES` (from 128 samples by 8 elements to 2 samples by 512: the
first whose ``BLOCK`` covers ``max(N1, N2)``, else the last), which is what
is compiled ahead of time (invkernels.triton.aot); the interpreter runs each program as numpy
operations, so there a tile covers up to 32768 elements. The affine forward and inverse kernels write one partial log-det per sample and tile
into a ``[B, NBLK]`` buffer, in the compute dtype; torch adds the partials of a sample in a fixed
order, so the log-det is deterministic (no atomics).
"""

from __future__ import annotations

import math
import struct
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from invkernels._validation import CLAMPED_SCALES, SCALES, split_channels
from invkernels.triton._common import MAX_TILE_INTERPRETER, check_device, compute_dtype, device_guard, interpreting, \
    meta

__all__ = [
    "GPU_TILES",
    "LAUNCHERS",
    "TileConfig",
    "additive_coupling_backward",
    "additive_coupling_forward",
    "additive_coupling_inverse",
    "additive_coupling_inverse_backward",
    "affine_coupling_backward",
    "affine_coupling_forward",
    "affine_coupling_inverse",
    "affine_coupling_inverse_backward",
    "aot_cases",
    "gpu_configs",
    "tile_config",
]


@triton.jit
def _tile(B, N1, N2, NBLK, H_PARTS: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    # The indexing of every coupling kernel. Program pid covers samples rows (ROWS of them) and
    # columns cols (BLOCK of them) of each sample's transformed half, and the same columns of its
    # passthrough half (the grid covers the longer of the two). Returns, for a tensor shaped like x
    # ([B, C, S]: x1 at b * (N1 + N2) + col, x2 at that + N1) and one shaped like h
    # ([B, H_PARTS * C2, S]: part k at b * H_PARTS * N2 + k * N2 + col):
    #   rows, col_blk, row_ok   the samples, the tile's column block, which rows exist
    #   mask1, x1_off           passthrough elements of the tile and their offsets in x
    #   mask2, x2_off, h_off    transformed elements, their offsets in x and in h (part 0)
    # rows and cols are int64 and every offset multiplies them before adding (N1 and N2 arrive as
    # int32 when below 2^31), so offsets past 2^31 elements do not wrap.
    pid = tl.program_id(0).to(tl.int64)
    col_blk = pid % NBLK
    rows = (pid // NBLK) * ROWS + tl.arange(0, ROWS)
    cols = col_blk * BLOCK + tl.arange(0, BLOCK)
    row_ok = rows < B
    mask1 = row_ok[:, None] & (cols < N1)[None, :]
    mask2 = row_ok[:, None] & (cols < N2)[None, :]
    x1_off = rows[:, None] * N1 + rows[:, None] * N2 + cols[None, :]
    h_off = H_PARTS * (rows[:, None] * N2) + cols[None, :]
    return rows, col_blk, row_ok, mask1, x1_off, mask2, x1_off + N1, h_off


@triton.jit
def _copy_passthrough(src_ptr, dst_ptr, x1_off, mask1):
    # src_ptr, dst_ptr: [B, C, S] contiguous; copies the tile's passthrough elements.
    tl.store(dst_ptr + x1_off, tl.load(src_ptr + x1_off, mask=mask1), mask=mask1)


@triton.jit
def _atan(h, ACC: tl.constexpr):
    # Cephes' atan (float64) and atanf (float32): the argument reduced to |x| <= tan(pi / 8)
    # (float32) or 0.66 (float64) through atan(a) = pi / 2 - atan(1 / a) and
    # pi / 4 + atan((a - 1) / (a + 1)), then a minimax polynomial (rational for float64), with the
    # low part of pi / 2 added back in float64. NaN stays NaN; +-inf gives +-pi / 2.
    a = tl.abs(h)
    big = a > 2.414213562373095
    if ACC == tl.float64:
        mid = a > 0.66
    else:
        mid = a > 0.4142135623730950
    x = tl.where(big, -1.0 / tl.where(big, a, 1.0), tl.where(mid, (a - 1.0) / (a + 1.0), a))
    # A literal alone in tl.where is a float32 constant: the offsets are added to a tensor of ACC.
    zero = tl.zeros_like(a)
    base = tl.where(big, zero + 1.5707963267948966, tl.where(mid, zero + 0.7853981633974483, zero))
    z = x * x
    if ACC == tl.float64:
        p = (((-8.750608600031904122785e-1 * z - 1.615753718733365076637e1) * z - 7.500855792314704667340e1) * z
             - 1.228866684490136173410e2) * z - 6.485021904942025371773e1
        q = ((((z + 2.485846490142306297962e1) * z + 1.650270098316988542046e2) * z + 4.328810604912902668951e2) * z
             + 4.853903996359136964868e2) * z + 1.945506571482613964425e2
        r = x * (z * p / q) + x
        low = tl.where(mid, zero + 3.061616997868382943065e-17, zero)
        r = r + tl.where(big, zero + 6.123233995736765886130e-17, low)
    else:
        r = (((8.05374449538e-2 * z - 1.38776856032e-1) * z + 1.99777106478e-1) * z - 3.33329491539e-1) * z * x + x
    y = base + r
    return tl.where(h < 0.0, -y, y)


@triton.jit
def _scale_terms(hs, c, SCALE: tl.constexpr, ACC: tl.constexpr):
    # (L, L', s = exp(L), 1 / s) of the raw log-scale hs; c is the clamp in the compute dtype ACC
    # (unused by the sigmoid scales); a kernel computes only what it uses. The formulas of
    # log_scale_with_grad in csrc/kernels/coupling.h, and of the CPU's log1p (module docstring).
    if SCALE == "exp":
        u = hs / c
        a = tl.abs(u)
        small = a <= 0.625
        # The first branch runs on 0 where it is not taken, so an infinite hs makes no inf * 0.
        us = tl.where(small, u, 0.0)
        z = us * us
        if ACC == tl.float64:
            q = (z * ((-9.64399179425052238628e-1 * z - 9.92877231001918586564e1) * z - 1.61468768441708447952e3)
                 / (((z + 1.12811678491632931402e2) * z + 2.23548839060100448583e3) * z + 4.84406305325125486048e3))
        else:
            q = z * (
                (((-5.70498872745e-3 * z + 2.06390887954e-2) * z - 5.37397155531e-2) * z + 1.33314422036e-1) * z
                - 3.33332819422e-1
            )
        e = tl.exp(-2.0 * a)
        one_e = 1.0 + e
        signed_clamp = tl.where(hs < 0.0, -c, c)
        hss = tl.where(small, hs, 0.0)
        log_s = tl.where(small, hss + hss * q, (signed_clamp - signed_clamp * e) / one_e)
        t = us + us * q
        dlog_s = tl.where(small, 1.0 - t * t, 4.0 * e / (one_e * one_e))
        s = tl.exp(log_s)
        inv_s = tl.exp(-log_s)
    elif SCALE == "sigmoid":
        z = hs + 2.0
        e = tl.exp(-tl.abs(z))
        one_e = 1.0 + e
        lp = tl.log(one_e) + (e - (one_e - 1.0))
        log_s = tl.where(z < 0.0, z, 0.0) - lp
        dlog_s = tl.exp(tl.where(z > 0.0, -z, 0.0) - lp)
        s = tl.exp(log_s)
        # 1 + exp(-z), which does not round through L.
        inv_s = 1.0 + tl.exp(-z)
    elif SCALE == "sigmoid_eps":
        # nflows: s = sigmoid(z) + 1e-3 = w / d with d = 1 + e, w = (z >= 0 ? 1 : e) + 1e-3 d and
        # e = exp(-|z|): s and 1 / s each one division (not exp(+-L): they round once),
        # L = log w - log d, dL/dh = sigmoid(z) (1 - sigmoid(z)) / s = n (1 - n') / (d w).
        z = hs + 2.0
        e = tl.exp(-tl.abs(z))
        d = 1.0 + e
        n = tl.where(z >= 0.0, 1.0, e)
        w = n + 1e-3 * d
        log_s = tl.log(w) - (tl.log(d) + (e - (d - 1.0)))
        dlog_s = n * tl.where(z >= 0.0, e, 1.0) / (d * w)
        s = w / d
        inv_s = d / w
    elif SCALE == "atan":
        # FrEIA's ATAN: L = c (0.636 atan(h)), L' = 0.636 c / (1 + h^2).
        log_s = c * (0.636 * _atan(hs, ACC))
        dlog_s = c * 0.636 / (1.0 + hs * hs)
        s = tl.exp(log_s)
        inv_s = tl.exp(-log_s)
    else:
        # zuko's soft clamp: L = h / (1 + |h| / c), L' = 1 / (1 + |h| / c)^2.
        q = 1.0 + tl.abs(hs) * (1.0 / c)
        log_s = hs / q
        dlog_s = 1.0 / (q * q)
        s = tl.exp(log_s)
        inv_s = tl.exp(-log_s)
    return log_s, dlog_s, s, inv_s


@triton.jit(do_not_specialize=["clamp_hi", "clamp_lo"])
def _affine_coupling_fwd_kernel(
    in_ptr,  # [B, C, S] contiguous: x (x1 = first N1 elements of a sample, x2 = next N2)
    h_ptr,  # [B, 2 * C2, S] contiguous: hs = first N2 elements of a sample, t = next N2
    out_ptr,  # [B, C, S] contiguous: y
    partial_ptr,  # [B, NBLK] compute dtype: sum of L over the tile's part of each sample
    B,
    N1,
    N2,
    NBLK,
    clamp_hi,
    clamp_lo,
    SCALE: tl.constexpr,
    ACC: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    rows, col_blk, row_ok, mask1, x1_off, mask2, x2_off, h_off = _tile(B, N1, N2, NBLK, 2, ROWS, BLOCK)
    _copy_passthrough(in_ptr, out_ptr, x1_off, mask1)
    c = tl.cast(clamp_hi, ACC) + tl.cast(clamp_lo, ACC)
    x2 = tl.load(in_ptr + x2_off, mask=mask2, other=0.0).to(ACC)
    hs = tl.load(h_ptr + h_off, mask=mask2, other=0.0).to(ACC)
    t = tl.load(h_ptr + h_off + N2, mask=mask2, other=0.0).to(ACC)
    log_s, _, s, _ = _scale_terms(hs, c, SCALE, ACC)
    y2 = x2 * s + t
    tl.store(out_ptr + x2_off, y2.to(out_ptr.dtype.element_ty), mask=mask2)
    # Masked lanes hold L(0), which is not 0 for the sigmoid scale: zero them before summing.
    part = tl.sum(tl.where(mask2, log_s, 0.0), axis=1)
    tl.store(partial_ptr + rows * NBLK + col_blk, part, mask=row_ok)


@triton.jit(do_not_specialize=["clamp_hi", "clamp_lo"])
def _affine_coupling_inv_kernel(
    in_ptr,  # [B, C, S] contiguous: y (y1 = first N1 elements of a sample, y2 = next N2)
    h_ptr,  # [B, 2 * C2, S] contiguous: hs = first N2 elements of a sample, t = next N2
    out_ptr,  # [B, C, S] contiguous: x
    partial_ptr,  # [B, NBLK] compute dtype: sum of -L over the tile's part of each sample
    B,
    N1,
    N2,
    NBLK,
    clamp_hi,
    clamp_lo,
    SCALE: tl.constexpr,
    ACC: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    rows, col_blk, row_ok, mask1, x1_off, mask2, x2_off, h_off = _tile(B, N1, N2, NBLK, 2, ROWS, BLOCK)
    _copy_passthrough(in_ptr, out_ptr, x1_off, mask1)
    c = tl.cast(clamp_hi, ACC) + tl.cast(clamp_lo, ACC)
    y2 = tl.load(in_ptr + x2_off, mask=mask2, other=0.0).to(ACC)
    hs = tl.load(h_ptr + h_off, mask=mask2, other=0.0).to(ACC)
    t = tl.load(h_ptr + h_off + N2, mask=mask2, other=0.0).to(ACC)
    log_s, _, _, inv_s = _scale_terms(hs, c, SCALE, ACC)
    x2 = (y2 - t) * inv_s
    tl.store(out_ptr + x2_off, x2.to(out_ptr.dtype.element_ty), mask=mask2)
    part = -tl.sum(tl.where(mask2, log_s, 0.0), axis=1)
    tl.store(partial_ptr + rows * NBLK + col_blk, part, mask=row_ok)


@triton.jit(do_not_specialize=["clamp_hi", "clamp_lo"])
def _affine_coupling_bwd_kernel(
    g_ptr,  # [B, C, S] contiguous: gradient of the op's output (g1 = first N1 elements, g2 = next N2)
    gl_ptr,  # [B]: gradient of the op's log-det
    x_ptr,  # [B, C, S] contiguous: data side, the forward's input or the inverse's output
    h_ptr,  # [B, 2 * C2, S] contiguous: hs = first N2 elements of a sample, t = next N2
    gin_ptr,  # [B, C, S] contiguous: gradient of the op's input (x forward, y inverse)
    gh_ptr,  # [B, 2 * C2, S] contiguous: gradient of h (dhs, then dt)
    B,
    N1,
    N2,
    NBLK,
    clamp_hi,
    clamp_lo,
    SCALE: tl.constexpr,
    REVERSE: tl.constexpr,
    ACC: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    rows, col_blk, row_ok, mask1, x1_off, mask2, x2_off, h_off = _tile(B, N1, N2, NBLK, 2, ROWS, BLOCK)
    _copy_passthrough(g_ptr, gin_ptr, x1_off, mask1)
    c = tl.cast(clamp_hi, ACC) + tl.cast(clamp_lo, ACC)
    g2 = tl.load(g_ptr + x2_off, mask=mask2, other=0.0).to(ACC)
    x2 = tl.load(x_ptr + x2_off, mask=mask2, other=0.0).to(ACC)
    hs = tl.load(h_ptr + h_off, mask=mask2, other=0.0).to(ACC)
    gl = tl.load(gl_ptr + rows, mask=row_ok, other=0.0).to(ACC)[:, None]
    _, dlog_s, s, inv_s = _scale_terms(hs, c, SCALE, ACC)
    if REVERSE:
        gin2 = g2 * inv_s
        gt = -gin2
        ghs = -(g2 * x2 + gl) * dlog_s
    else:
        gin2 = g2 * s
        gt = g2
        ghs = (gin2 * x2 + gl) * dlog_s
    out_ty = gin_ptr.dtype.element_ty
    tl.store(gin_ptr + x2_off, gin2.to(out_ty), mask=mask2)
    tl.store(gh_ptr + h_off, ghs.to(out_ty), mask=mask2)
    tl.store(gh_ptr + h_off + N2, gt.to(out_ty), mask=mask2)


@triton.jit(do_not_specialize=["clamp_hi", "clamp_lo"])
def _affine_coupling_inv_bwd_kernel(
    y_ptr,  # [B, C, S] contiguous: the forward's output (y1 = first N1 elements, y2 = next N2)
    h_ptr,  # [B, 2 * C2, S] contiguous: hs = first N2 elements of a sample, t = next N2
    g_ptr,  # [B, C, S] contiguous: gradient of y
    gl_ptr,  # [B]: gradient of the log-det
    x_ptr,  # [B, C, S] contiguous: the rebuilt input
    gin_ptr,  # [B, C, S] contiguous: gradient of x (g1, then g2 * exp(L))
    gh_ptr,  # [B, 2 * C2, S] contiguous: gradient of h (dhs, then dt)
    B,
    N1,
    N2,
    NBLK,
    clamp_hi,
    clamp_lo,
    SCALE: tl.constexpr,
    ACC: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # Inverse and forward VJP in one pass: x2 = (y2 - t) * exp(-L), dx2 = g2 * exp(L), dt = g2,
    # dhs = (g2 * (y2 - t) + gl) * L' (g2 * x2 * exp(L) with x2 * exp(L) = y2 - t).
    rows, col_blk, row_ok, mask1, x1_off, mask2, x2_off, h_off = _tile(B, N1, N2, NBLK, 2, ROWS, BLOCK)
    _copy_passthrough(y_ptr, x_ptr, x1_off, mask1)
    _copy_passthrough(g_ptr, gin_ptr, x1_off, mask1)
    c = tl.cast(clamp_hi, ACC) + tl.cast(clamp_lo, ACC)
    y2 = tl.load(y_ptr + x2_off, mask=mask2, other=0.0).to(ACC)
    g2 = tl.load(g_ptr + x2_off, mask=mask2, other=0.0).to(ACC)
    hs = tl.load(h_ptr + h_off, mask=mask2, other=0.0).to(ACC)
    t = tl.load(h_ptr + h_off + N2, mask=mask2, other=0.0).to(ACC)
    gl = tl.load(gl_ptr + rows, mask=row_ok, other=0.0).to(ACC)[:, None]
    _, dlog_s, s, inv_s = _scale_terms(hs, c, SCALE, ACC)
    shifted = y2 - t
    out_ty = gin_ptr.dtype.element_ty
    tl.store(x_ptr + x2_off, (shifted * inv_s).to(out_ty), mask=mask2)
    tl.store(gin_ptr + x2_off, (g2 * s).to(out_ty), mask=mask2)
    tl.store(gh_ptr + h_off, ((g2 * shifted + gl) * dlog_s).to(out_ty), mask=mask2)
    tl.store(gh_ptr + h_off + N2, g2.to(out_ty), mask=mask2)


@triton.jit
def _additive_coupling_inv_bwd_kernel(
    y_ptr,  # [B, C, S] contiguous: the forward's output
    h_ptr,  # [B, C2, S] contiguous: shift t
    g_ptr,  # [B, C, S] contiguous: gradient of y
    x_ptr,  # [B, C, S] contiguous: the rebuilt input (y1, y2 - t)
    gin_ptr,  # [B, C, S] contiguous: gradient of x, a copy of g
    gh_ptr,  # [B, C2, S] contiguous: gradient of the shift, g2
    B,
    N1,
    N2,
    NBLK,
    ACC: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    rows, col_blk, row_ok, mask1, x1_off, mask2, x2_off, t_off = _tile(B, N1, N2, NBLK, 1, ROWS, BLOCK)
    _copy_passthrough(y_ptr, x_ptr, x1_off, mask1)
    _copy_passthrough(g_ptr, gin_ptr, x1_off, mask1)
    y2 = tl.load(y_ptr + x2_off, mask=mask2, other=0.0).to(ACC)
    t = tl.load(h_ptr + t_off, mask=mask2, other=0.0).to(ACC)
    g2 = tl.load(g_ptr + x2_off, mask=mask2, other=0.0)
    tl.store(x_ptr + x2_off, (y2 - t).to(x_ptr.dtype.element_ty), mask=mask2)
    tl.store(gin_ptr + x2_off, g2, mask=mask2)
    tl.store(gh_ptr + t_off, g2, mask=mask2)


@triton.jit
def _additive_coupling_kernel(
    in_ptr,  # [B, C, S] contiguous: x (forward) or y (inverse)
    h_ptr,  # [B, C2, S] contiguous: shift t
    out_ptr,  # [B, C, S] contiguous: y (forward) or x (inverse)
    B,
    N1,
    N2,
    NBLK,
    SIGN: tl.constexpr,
    ACC: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    rows, col_blk, row_ok, mask1, x1_off, mask2, x2_off, t_off = _tile(B, N1, N2, NBLK, 1, ROWS, BLOCK)
    _copy_passthrough(in_ptr, out_ptr, x1_off, mask1)
    a = tl.load(in_ptr + x2_off, mask=mask2, other=0.0).to(ACC)
    t = tl.load(h_ptr + t_off, mask=mask2, other=0.0).to(ACC)
    if SIGN > 0:
        b = a + t
    else:
        b = a - t
    tl.store(out_ptr + x2_off, b.to(out_ptr.dtype.element_ty), mask=mask2)


@triton.jit
def _additive_coupling_bwd_kernel(
    g_ptr,  # [B, C, S] contiguous: gradient of the op's output
    gin_ptr,  # [B, C, S] contiguous: gradient of the op's input, a copy of g
    gh_ptr,  # [B, C2, S] contiguous: gradient of the shift, SIGN * g2
    B,
    N1,
    N2,
    NBLK,
    SIGN: tl.constexpr,
    ACC: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    rows, col_blk, row_ok, mask1, x1_off, mask2, x2_off, t_off = _tile(B, N1, N2, NBLK, 1, ROWS, BLOCK)
    _copy_passthrough(g_ptr, gin_ptr, x1_off, mask1)
    g2 = tl.load(g_ptr + x2_off, mask=mask2, other=0.0)
    tl.store(gin_ptr + x2_off, g2, mask=mask2)
    if SIGN < 0:
        # Negated in the compute dtype: the interpreter holds bfloat16 values as their raw bits.
        g2 = (-g2.to(ACC)).to(gh_ptr.dtype.element_ty)
    tl.store(gh_ptr + t_off, g2, mask=mask2)


class TileConfig(NamedTuple):
    """One program's tile: ``rows`` samples by ``block`` elements of the transformed half."""

    rows: int
    block: int
    num_warps: int


# The GPU tiles, for N2 up to 8, 64 and beyond (then several tiles per sample): 1024 elements at 8
# warps, 4 per thread. (8 per thread spill registers in the float64 backward kernels on sm_80, and
# with tiles of one sample ptxas spills 4 bytes in the float64 sigmoid inverse on sm_90, at 1024 or
# 512 elements, 4 or 8 warps: measured with invkernels.triton.aot.)
GPU_TILES = (TileConfig(128, 8, 8), TileConfig(16, 64, 8), TileConfig(2, 512, 8))


def tile_config(batch: int, n: int) -> TileConfig:
    """The tile the launchers use for ``batch`` samples of ``n`` elements each (the longer half)."""
    if not interpreting():
        return next((t for t in GPU_TILES if t.block >= n), GPU_TILES[-1])
    block = min(triton.next_power_of_2(n), MAX_TILE_INTERPRETER)
    return TileConfig(min(triton.next_power_of_2(batch), MAX_TILE_INTERPRETER // block), block, 4)


class _Tiling(NamedTuple):
    rows: int
    block: int
    nblk: int
    grid: tuple[int]
    num_warps: int


def _split_clamp(scale: str, clamp: float) -> tuple[float, float]:
    """``clamp`` as a float32 pair ``hi + lo``: the kernels add the two in the compute dtype, which
    recovers a float64 clamp to 2^-48 relative although Triton passes Python floats as float32."""
    if scale not in CLAMPED_SCALES:
        return 1.0, 0.0
    hi = struct.unpack("f", struct.pack("f", clamp))[0]
    lo = struct.unpack("f", struct.pack("f", clamp - hi))[0]
    return hi, lo


def _geometry(x: torch.Tensor, passthrough: int | None) -> tuple[int, int, int]:
    """``(B, N1, N2)`` of a coupling input ``[B, C, *spatial]`` whose first ``passthrough`` channels
    (``C // 2`` when None) pass through."""
    c1, c2 = split_channels(x.shape[1], passthrough)
    spatial = math.prod(x.shape[2:])
    return x.shape[0], c1 * spatial, c2 * spatial


def _tiling(batch: int, n1: int, n2: int) -> _Tiling:
    n = max(n1, n2)
    tile = tile_config(batch, n)
    nblk = triton.cdiv(n, tile.block)
    return _Tiling(tile.rows, tile.block, nblk, (triton.cdiv(batch, tile.rows) * nblk,), tile.num_warps)


def _affine_apply(kernel, src: torch.Tensor, h: torch.Tensor, scale: str, clamp: float, passthrough: int | None):
    clamp_hi, clamp_lo = _split_clamp(scale, clamp)
    src = src.contiguous()
    h = h.contiguous()
    batch, n1, n2 = _geometry(src, passthrough)
    out = torch.empty(src.shape, dtype=src.dtype, device=src.device)
    acc_torch, acc_tl = compute_dtype(src.dtype)
    if out.numel() == 0:
        return out, torch.zeros(batch, dtype=acc_torch, device=src.device)
    tiling = _tiling(batch, n1, n2)
    partial = torch.empty((batch, tiling.nblk), dtype=acc_torch, device=src.device)
    with device_guard(src):
        kernel[tiling.grid](
            in_ptr=src,
            h_ptr=h,
            out_ptr=out,
            partial_ptr=partial,
            B=batch,
            N1=n1,
            N2=n2,
            NBLK=tiling.nblk,
            clamp_hi=clamp_hi,
            clamp_lo=clamp_lo,
            SCALE=scale,
            ACC=acc_tl,
            ROWS=tiling.rows,
            BLOCK=tiling.block,
            num_warps=tiling.num_warps,
        )
    return out, partial.sum(dim=1)


def affine_coupling_forward(
    x: torch.Tensor, h: torch.Tensor, scale: str = "exp", clamp: float = 2.0, passthrough: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y, logdet)`` of the affine coupling forward."""
    check_device("affine_coupling_fwd", x, "x")
    return _affine_apply(_affine_coupling_fwd_kernel, x, h, scale, clamp, passthrough)


def affine_coupling_inverse(
    y: torch.Tensor, h: torch.Tensor, scale: str = "exp", clamp: float = 2.0, passthrough: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, logdet_inv)`` of the affine coupling inverse; ``logdet_inv = -logdet``."""
    check_device("affine_coupling_inv", y, "y")
    return _affine_apply(_affine_coupling_inv_kernel, y, h, scale, clamp, passthrough)


def affine_coupling_backward(
    grad_out: torch.Tensor,
    grad_logdet: torch.Tensor,
    x: torch.Tensor,
    h: torch.Tensor,
    scale: str = "exp",
    clamp: float = 2.0,
    reverse: bool = False,
    passthrough: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(grad_in, grad_h)`` of the affine coupling forward (``reverse=False``, ``x`` its input) or
    inverse (``reverse=True``, ``x`` its output)."""
    check_device("affine_coupling_bwd", x, "x")
    clamp_hi, clamp_lo = _split_clamp(scale, clamp)
    grad_out = grad_out.contiguous()
    grad_logdet = grad_logdet.contiguous()
    x = x.contiguous()
    h = h.contiguous()
    batch, n1, n2 = _geometry(x, passthrough)
    grad_in = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    grad_h = torch.empty(h.shape, dtype=h.dtype, device=h.device)
    if grad_in.numel() == 0:
        return grad_in, grad_h
    _, acc_tl = compute_dtype(x.dtype)
    tiling = _tiling(batch, n1, n2)
    with device_guard(x):
        _affine_coupling_bwd_kernel[tiling.grid](
            g_ptr=grad_out,
            gl_ptr=grad_logdet,
            x_ptr=x,
            h_ptr=h,
            gin_ptr=grad_in,
            gh_ptr=grad_h,
            B=batch,
            N1=n1,
            N2=n2,
            NBLK=tiling.nblk,
            clamp_hi=clamp_hi,
            clamp_lo=clamp_lo,
            SCALE=scale,
            REVERSE=reverse,
            ACC=acc_tl,
            ROWS=tiling.rows,
            BLOCK=tiling.block,
            num_warps=tiling.num_warps,
        )
    return grad_in, grad_h


def _additive_apply(src: torch.Tensor, h: torch.Tensor, sign: int, passthrough: int | None) -> torch.Tensor:
    src = src.contiguous()
    h = h.contiguous()
    batch, n1, n2 = _geometry(src, passthrough)
    out = torch.empty(src.shape, dtype=src.dtype, device=src.device)
    if out.numel() == 0:
        return out
    _, acc_tl = compute_dtype(src.dtype)
    tiling = _tiling(batch, n1, n2)
    with device_guard(src):
        _additive_coupling_kernel[tiling.grid](
            in_ptr=src,
            h_ptr=h,
            out_ptr=out,
            B=batch,
            N1=n1,
            N2=n2,
            NBLK=tiling.nblk,
            SIGN=sign,
            ACC=acc_tl,
            ROWS=tiling.rows,
            BLOCK=tiling.block,
            num_warps=tiling.num_warps,
        )
    return out


def additive_coupling_forward(x: torch.Tensor, h: torch.Tensor, passthrough: int | None = None) -> torch.Tensor:
    """``y`` of the additive coupling forward (its log-det is 0)."""
    check_device("additive_coupling_fwd", x, "x")
    return _additive_apply(x, h, 1, passthrough)


def additive_coupling_inverse(y: torch.Tensor, h: torch.Tensor, passthrough: int | None = None) -> torch.Tensor:
    """``x`` of the additive coupling inverse."""
    check_device("additive_coupling_inv", y, "y")
    return _additive_apply(y, h, -1, passthrough)


def additive_coupling_backward(grad_out: torch.Tensor, reverse: bool = False,
                               passthrough: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(grad_in, grad_h)`` of the additive coupling forward (``reverse=False``) or inverse;
    ``grad_h`` has the shift's shape ``[B, C - passthrough, *spatial]``."""
    check_device("additive_coupling_bwd", grad_out, "grad_out")
    grad_out = grad_out.contiguous()
    batch, n1, n2 = _geometry(grad_out, passthrough)
    grad_in = torch.empty(grad_out.shape, dtype=grad_out.dtype, device=grad_out.device)
    grad_h = grad_out.new_empty((batch, split_channels(grad_out.shape[1], passthrough)[1], *grad_out.shape[2:]))
    if grad_in.numel() == 0:
        return grad_in, grad_h
    _, acc_tl = compute_dtype(grad_out.dtype)
    tiling = _tiling(batch, n1, n2)
    with device_guard(grad_out):
        _additive_coupling_bwd_kernel[tiling.grid](
            g_ptr=grad_out,
            gin_ptr=grad_in,
            gh_ptr=grad_h,
            B=batch,
            N1=n1,
            N2=n2,
            NBLK=tiling.nblk,
            SIGN=-1 if reverse else 1,
            ACC=acc_tl,
            ROWS=tiling.rows,
            BLOCK=tiling.block,
            num_warps=tiling.num_warps,
        )
    return grad_in, grad_h


def affine_coupling_inverse_backward(
    y: torch.Tensor,
    h: torch.Tensor,
    grad_y: torch.Tensor,
    grad_logdet: torch.Tensor,
    scale: str = "exp",
    clamp: float = 2.0,
    passthrough: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x, grad_x, grad_h)``: the forward's input rebuilt from its output ``y`` and the gradients
    of the forward at it, in one pass (memory-free backprop)."""
    check_device("affine_coupling_inv_bwd", y, "y")
    clamp_hi, clamp_lo = _split_clamp(scale, clamp)
    y, h, grad_y, grad_logdet = (t.contiguous() for t in (y, h, grad_y, grad_logdet))
    batch, n1, n2 = _geometry(y, passthrough)
    x = torch.empty(y.shape, dtype=y.dtype, device=y.device)
    grad_x = torch.empty(y.shape, dtype=y.dtype, device=y.device)
    grad_h = torch.empty(h.shape, dtype=h.dtype, device=h.device)
    if x.numel() == 0:
        return x, grad_x, grad_h
    _, acc_tl = compute_dtype(y.dtype)
    tiling = _tiling(batch, n1, n2)
    with device_guard(y):
        _affine_coupling_inv_bwd_kernel[tiling.grid](
            y_ptr=y,
            h_ptr=h,
            g_ptr=grad_y,
            gl_ptr=grad_logdet,
            x_ptr=x,
            gin_ptr=grad_x,
            gh_ptr=grad_h,
            B=batch,
            N1=n1,
            N2=n2,
            NBLK=tiling.nblk,
            clamp_hi=clamp_hi,
            clamp_lo=clamp_lo,
            SCALE=scale,
            ACC=acc_tl,
            ROWS=tiling.rows,
            BLOCK=tiling.block,
            num_warps=tiling.num_warps,
        )
    return x, grad_x, grad_h


def additive_coupling_inverse_backward(
    y: torch.Tensor, h: torch.Tensor, grad_y: torch.Tensor, passthrough: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x, grad_x, grad_h)`` of the additive coupling, as :func:`affine_coupling_inverse_backward`."""
    check_device("additive_coupling_inv_bwd", y, "y")
    y, h, grad_y = (t.contiguous() for t in (y, h, grad_y))
    batch, n1, n2 = _geometry(y, passthrough)
    x = torch.empty(y.shape, dtype=y.dtype, device=y.device)
    grad_x = torch.empty(y.shape, dtype=y.dtype, device=y.device)
    grad_h = torch.empty(h.shape, dtype=h.dtype, device=h.device)
    if x.numel() == 0:
        return x, grad_x, grad_h
    _, acc_tl = compute_dtype(y.dtype)
    tiling = _tiling(batch, n1, n2)
    with device_guard(y):
        _additive_coupling_inv_bwd_kernel[tiling.grid](
            y_ptr=y,
            h_ptr=h,
            g_ptr=grad_y,
            x_ptr=x,
            gin_ptr=grad_x,
            gh_ptr=grad_h,
            B=batch,
            N1=n1,
            N2=n2,
            NBLK=tiling.nblk,
            ACC=acc_tl,
            ROWS=tiling.rows,
            BLOCK=tiling.block,
            num_warps=tiling.num_warps,
        )
    return x, grad_x, grad_h


_KERNELS = ("_affine_coupling_fwd_kernel", "_affine_coupling_inv_kernel", "_affine_coupling_bwd_kernel",
            "_affine_coupling_inv_bwd_kernel", "_additive_coupling_kernel", "_additive_coupling_bwd_kernel",
            "_additive_coupling_inv_bwd_kernel")


def gpu_configs() -> dict[str, tuple[TileConfig, ...]]:
    """Every tile each kernel launches with on a GPU (:func:`tile_config`): the set compiled ahead
    of time."""
    return {name: GPU_TILES for name in _KERNELS}


def aot_cases(dtype: torch.dtype):
    """Launcher calls ``(op, args)`` on meta tensors of ``dtype`` that reach every tile of
    :func:`gpu_configs` (invkernels.triton.aot)."""
    gl = meta(2, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    for tile in GPU_TILES:
        x, h, shift = (meta(2, c, tile.block, dtype=dtype) for c in (2, 2, 1))
        for scale in SCALES:
            yield "affine_coupling_fwd", (x, h, scale, 2.0)
            yield "affine_coupling_inv", (x, h, scale, 2.0)
            yield "affine_coupling_bwd", (x, gl, x, h, scale, 2.0, False)
            yield "affine_coupling_inv_bwd", (x, h, x, gl, scale, 2.0)
        yield "additive_coupling_fwd", (x, shift)
        yield "additive_coupling_inv", (x, shift)
        yield "additive_coupling_bwd", (x, True)
        yield "additive_coupling_inv_bwd", (x, shift, x)


# The launcher of each registered op (docs/ops/coupling.md). invkernels.ops.coupling defines the
# Triton twins <op>_triton from the C++ schemas with them; the twins check their arguments (the
# checks of the C++ ops) before calling a launcher.
LAUNCHERS = {
    "affine_coupling_fwd": affine_coupling_forward,
    "affine_coupling_inv": affine_coupling_inverse,
    "affine_coupling_bwd": affine_coupling_backward,
    "affine_coupling_inv_bwd": affine_coupling_inverse_backward,
    "additive_coupling_fwd": additive_coupling_forward,
    "additive_coupling_inv": additive_coupling_inverse,
    "additive_coupling_bwd": additive_coupling_backward,
    "additive_coupling_inv_bwd": additive_coupling_inverse_backward,
}
