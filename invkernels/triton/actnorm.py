"""Triton kernels and launchers of ActNorm (Glow's per-channel affine normalization).

The ops ``torch.ops.invkernels.<op>_triton`` are defined by invkernels.ops.actnorm from the C++
schemas, one per entry of :data:`LAUNCHERS`; they check their arguments and call the launchers
here, which only check the device. Formulas, layout and op schemas: docs/ops/actnorm.md. The contiguous input is viewed as
``[B, C, S]`` (``S`` the product of the spatial sizes, 1 for vectors); element ``(b, c, s)`` sits at
``(b * C + c) * S + s``. ``bias`` and ``log_scale`` have shape ``[C]``.

Forward, inverse and log-determinant (the Jacobian is diagonal, so every sample has the same
log-det)::

    forward:  y = (x + b) * exp(log_scale),    logdet[b]     =  S * sum_c log_scale[c]
    inverse:  x = y * exp(-log_scale) - b,     logdet_inv[b] = -S * sum_c log_scale[c]

The inverse multiplies by ``exp(-log_scale)`` and never divides.

Vector-Jacobian products, with ``g`` the gradient of the op's output and ``gl`` that of its log-det
(shape ``[B]``); the sums run over the batch and the spatial positions of channel ``c``, and ``x`` is
always the data-side tensor (the forward's input or the inverse's output), so
``x + b = y * exp(-log_scale)`` in both directions::

    forward VJP (reverse=False):
        dx = g * exp(log_scale),   dbias[c] =  sum dx,   dlog_scale[c] =  sum dx * (x + b) + S * sum_b gl
    inverse VJP (reverse=True):
        dy = g * exp(-log_scale),  dbias[c] = -sum g,    dlog_scale[c] = -sum g * (x + b)  - S * sum_b gl

Numerics. Elementwise math runs in float32 for float16/bfloat16/float32 inputs and in float64 for
float64 inputs; tensor results are stored in the input dtype. The log-det depends on ``log_scale``
alone, so the launchers compute it with torch in the compute dtype and repeat it over the batch; it
is returned in that dtype (float32 for half inputs, whose log-det overflows at 65504), and
``grad_logdet`` has it too.

Tiling. Each program handles a tile of ``ROWS`` samples by ``CHANS`` channels by ``BLOCK`` spatial
positions. ``BLOCK`` covers ``S`` first, then ``CHANS`` covers the channels and ``ROWS`` the samples,
so for small ``S`` (vectors: ``S = 1``) a tile still reads runs of consecutive elements. On a GPU
the tile is one of the explicit set :func:`gpu_configs` (2048 elements: ``BLOCK`` the first of 1,
16, 256, 2048 that covers ``S``, ``CHANS`` 16 or 128 channels within the rest), which is what is
compiled ahead of time (invkernels.triton.aot); the interpreter, which runs each program as numpy
operations, gets tiles of up to 32768 elements. The
backward kernel sums its bias and log-scale terms over the samples and spatial positions of the
tile and writes one partial sum per channel and tile into ``[C, NRT * NST]`` buffers in the compute
dtype; torch adds the partials of a channel in a fixed order, so the parameter gradients are
deterministic (no atomics).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from invkernels.triton._common import MAX_TILE_GPU, MAX_TILE_INTERPRETER, check_device, compute_dtype, device_guard, \
    interpreting, meta

__all__ = [
    "LAUNCHERS",
    "TileConfig",
    "actnorm_backward",
    "actnorm_forward",
    "actnorm_inverse",
    "backward_terms",
    "aot_cases",
    "gpu_configs",
    "inv_scale",
    "scale",
    "tile_config",
]


@triton.jit
def scale(log_scale):
    """ActNorm's per-channel scale ``exp(log_scale)`` (also what the folded 1x1 convolution,
    invkernels.triton.invconv, applies to its weight's columns)."""
    return tl.exp(log_scale)


@triton.jit
def inv_scale(log_scale):
    """The inverse's per-channel scale ``exp(-log_scale)``: the inverse multiplies, never divides."""
    return tl.exp(-log_scale)


@triton.jit
def backward_terms(g, centred, log_scale, REVERSE: tl.constexpr):
    """One element's VJP given its centred value ``x + b``: ``(g_in, bias term, log-scale term)``;
    the log-det's term is added per channel by the caller. The folded 1x1 convolution runs it with
    the weight's entries as the centred values (``W diag(s)`` is the forward of ActNorm there)."""
    if REVERSE:
        return g * inv_scale(log_scale), -g, -(g * centred)
    g_in = g * scale(log_scale)
    return g_in, g_in, g_in * centred


@triton.jit
def _tile(B, C, S, NRT, NST, ROWS: tl.constexpr, CHANS: tl.constexpr, BLOCK: tl.constexpr):
    # Program pid covers samples rows, channels chans and spatial positions cols; tile is its index
    # among the NRT * NST tiles of each of its channels. The indices are int64 and every offset
    # multiplies them before adding (B, C and S arrive as int32 when below 2^31), so offsets past
    # 2^31 elements do not wrap.
    pid = tl.program_id(0).to(tl.int64)
    sp_blk = pid % NST
    row_blk = (pid // NST) % NRT
    chan_blk = pid // NST // NRT
    rows = row_blk * ROWS + tl.arange(0, ROWS)
    chans = chan_blk * CHANS + tl.arange(0, CHANS)
    cols = sp_blk * BLOCK + tl.arange(0, BLOCK)
    chan_ok = chans < C
    mask = (rows < B)[:, None, None] & chan_ok[None, :, None] & (cols < S)[None, None, :]
    offs = (rows[:, None, None] * C + chans[None, :, None]) * S + cols[None, None, :]
    return offs, mask, chans, chan_ok, row_blk * NST + sp_blk


@triton.jit
def _actnorm_apply_kernel(
    in_ptr,  # [B, C, S] contiguous: x (forward) or y (inverse)
    bias_ptr,  # [C]
    log_scale_ptr,  # [C]
    out_ptr,  # [B, C, S] contiguous: y (forward) or x (inverse)
    B,
    C,
    S,
    NRT,
    NST,
    INVERSE: tl.constexpr,
    ACC: tl.constexpr,
    ROWS: tl.constexpr,
    CHANS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs, mask, chans, chan_ok, _ = _tile(B, C, S, NRT, NST, ROWS, CHANS, BLOCK)
    b = tl.load(bias_ptr + chans, mask=chan_ok, other=0.0).to(ACC)[None, :, None]
    log_s = tl.load(log_scale_ptr + chans, mask=chan_ok, other=0.0).to(ACC)[None, :, None]
    v = tl.load(in_ptr + offs, mask=mask, other=0.0).to(ACC)
    if INVERSE:
        out = v * inv_scale(log_s) - b
    else:
        out = (v + b) * scale(log_s)
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _actnorm_bwd_kernel(
    g_ptr,  # [B, C, S] contiguous: gradient of the op's output
    x_ptr,  # [B, C, S] contiguous: data side, the forward's input or the inverse's output
    bias_ptr,  # [C]
    log_scale_ptr,  # [C]
    gin_ptr,  # [B, C, S] contiguous: gradient of the op's input (x forward, y inverse)
    partial_b_ptr,  # [C, NRT * NST] compute dtype: the tile's sum of the bias terms per channel
    partial_ls_ptr,  # [C, NRT * NST] compute dtype: the tile's sum of the log-scale terms per channel
    B,
    C,
    S,
    NRT,
    NST,
    REVERSE: tl.constexpr,
    ACC: tl.constexpr,
    ROWS: tl.constexpr,
    CHANS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs, mask, chans, chan_ok, tile = _tile(B, C, S, NRT, NST, ROWS, CHANS, BLOCK)
    b = tl.load(bias_ptr + chans, mask=chan_ok, other=0.0).to(ACC)[None, :, None]
    log_s = tl.load(log_scale_ptr + chans, mask=chan_ok, other=0.0).to(ACC)[None, :, None]
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(ACC)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
    gin, term_b, term_ls = backward_terms(g, x + b, log_s, REVERSE)
    tl.store(gin_ptr + offs, gin.to(gin_ptr.dtype.element_ty), mask=mask)
    # Masked lanes hold g = x = 0, but 0 * (0 + b) is NaN for an infinite b: zero them before summing.
    part_b = tl.sum(tl.sum(tl.where(mask, term_b, 0.0), axis=2), axis=0)
    part_ls = tl.sum(tl.sum(tl.where(mask, term_ls, 0.0), axis=2), axis=0)
    partial_offs = chans * (NRT * NST) + tile
    tl.store(partial_b_ptr + partial_offs, part_b, mask=chan_ok)
    tl.store(partial_ls_ptr + partial_offs, part_ls, mask=chan_ok)


class TileConfig(NamedTuple):
    """One program's tile: ``rows`` samples by ``chans`` channels by ``block`` spatial positions."""

    rows: int
    chans: int
    block: int
    num_warps: int


# The GPU tiles (2048 elements, 8 per thread at 8 warps): BLOCK from this ladder, then CHANS.
_GPU_BLOCKS = (1, 16, 256, MAX_TILE_GPU)
_GPU_CHANS = (16, 128)
_GPU_WARPS = 8


def tile_config(batch: int, channels: int, spatial: int) -> TileConfig:
    """The tile the launchers use for ``x`` of ``[batch, channels, spatial]``."""
    if not interpreting():
        block = next((b for b in _GPU_BLOCKS if b >= spatial), _GPU_BLOCKS[-1])
        room = MAX_TILE_GPU // block
        chans = min(next((c for c in _GPU_CHANS if c >= channels), _GPU_CHANS[-1]), room)
        return TileConfig(room // chans, chans, block, _GPU_WARPS)
    block = min(triton.next_power_of_2(spatial), MAX_TILE_INTERPRETER)
    chans = min(triton.next_power_of_2(channels), MAX_TILE_INTERPRETER // block)
    rows = min(triton.next_power_of_2(batch), MAX_TILE_INTERPRETER // (block * chans))
    return TileConfig(rows, chans, block, 4)


def gpu_configs() -> dict[str, tuple[TileConfig, ...]]:
    """Every tile each kernel launches with on a GPU (:func:`tile_config`): the set compiled ahead
    of time."""
    tiles = []
    for block in _GPU_BLOCKS:
        room = MAX_TILE_GPU // block
        for chans in sorted({min(c, room) for c in _GPU_CHANS}):
            tiles.append(TileConfig(room // chans, chans, block, _GPU_WARPS))
    return {"_actnorm_apply_kernel": tuple(tiles), "_actnorm_bwd_kernel": tuple(tiles)}


class _Tiling(NamedTuple):
    rows: int
    chans: int
    block: int
    nrt: int
    nst: int
    grid: tuple[int]
    num_warps: int


class _Geometry(NamedTuple):
    batch: int
    channels: int
    spatial: int


def _geometry(x: torch.Tensor) -> _Geometry:
    return _Geometry(x.shape[0], x.shape[1], math.prod(x.shape[2:]))


def _tiling(geo: _Geometry) -> _Tiling:
    tile = tile_config(*geo)
    nrt = triton.cdiv(geo.batch, tile.rows)
    nst = triton.cdiv(geo.spatial, tile.block)
    grid = (triton.cdiv(geo.channels, tile.chans) * nrt * nst,)
    return _Tiling(tile.rows, tile.chans, tile.block, nrt, nst, grid, tile.num_warps)


def _apply(src: torch.Tensor, bias: torch.Tensor, log_scale: torch.Tensor, inverse: bool):
    src = src.contiguous()
    bias = bias.contiguous()
    log_scale = log_scale.contiguous()
    geo = _geometry(src)
    acc_torch, acc_tl = compute_dtype(src.dtype)
    per_sample = log_scale.to(acc_torch).sum() * (-geo.spatial if inverse else geo.spatial)
    logdet = per_sample.repeat(geo.batch)
    out = torch.empty(src.shape, dtype=src.dtype, device=src.device)
    if out.numel() == 0:
        return out, logdet
    tiling = _tiling(geo)
    with device_guard(src):
        _actnorm_apply_kernel[tiling.grid](
            in_ptr=src,
            bias_ptr=bias,
            log_scale_ptr=log_scale,
            out_ptr=out,
            B=geo.batch,
            C=geo.channels,
            S=geo.spatial,
            NRT=tiling.nrt,
            NST=tiling.nst,
            INVERSE=inverse,
            ACC=acc_tl,
            ROWS=tiling.rows,
            CHANS=tiling.chans,
            BLOCK=tiling.block,
            num_warps=tiling.num_warps,
        )
    return out, logdet


def actnorm_forward(
    x: torch.Tensor, bias: torch.Tensor, log_scale: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y, logdet)`` of the ActNorm forward."""
    check_device("actnorm_fwd", x, "x")
    return _apply(x, bias, log_scale, inverse=False)


def actnorm_inverse(
    y: torch.Tensor, bias: torch.Tensor, log_scale: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, logdet_inv)`` of the ActNorm inverse; ``logdet_inv = -logdet``."""
    check_device("actnorm_inv", y, "y")
    return _apply(y, bias, log_scale, inverse=True)


def actnorm_backward(
    grad_out: torch.Tensor,
    grad_logdet: torch.Tensor,
    x: torch.Tensor,
    bias: torch.Tensor,
    log_scale: torch.Tensor,
    reverse: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(grad_in, grad_bias, grad_log_scale)`` of the ActNorm forward (``reverse=False``, ``x`` its
    input) or inverse (``reverse=True``, ``x`` its output)."""
    check_device("actnorm_bwd", x, "x")
    grad_out = grad_out.contiguous()
    x = x.contiguous()
    bias = bias.contiguous()
    log_scale = log_scale.contiguous()
    geo = _geometry(x)
    acc_torch, acc_tl = compute_dtype(x.dtype)
    logdet_term = grad_logdet.to(acc_torch).sum() * (-geo.spatial if reverse else geo.spatial)
    grad_in = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if grad_in.numel() == 0:
        sum_b = torch.zeros(geo.channels, dtype=acc_torch, device=x.device)
        sum_ls = torch.zeros(geo.channels, dtype=acc_torch, device=x.device)
    else:
        tiling = _tiling(geo)
        partial_b = torch.empty((geo.channels, tiling.nrt * tiling.nst), dtype=acc_torch, device=x.device)
        partial_ls = torch.empty_like(partial_b)
        with device_guard(x):
            _actnorm_bwd_kernel[tiling.grid](
                g_ptr=grad_out,
                x_ptr=x,
                bias_ptr=bias,
                log_scale_ptr=log_scale,
                gin_ptr=grad_in,
                partial_b_ptr=partial_b,
                partial_ls_ptr=partial_ls,
                B=geo.batch,
                C=geo.channels,
                S=geo.spatial,
                NRT=tiling.nrt,
                NST=tiling.nst,
                REVERSE=reverse,
                ACC=acc_tl,
                ROWS=tiling.rows,
                CHANS=tiling.chans,
                BLOCK=tiling.block,
                num_warps=tiling.num_warps,
            )
        sum_b = partial_b.sum(dim=1)
        sum_ls = partial_ls.sum(dim=1)
    return grad_in, sum_b.to(x.dtype), (sum_ls + logdet_term).to(x.dtype)


def aot_cases(dtype: torch.dtype):
    """Launcher calls ``(op, args)`` on meta tensors of ``dtype`` that reach every tile of
    :func:`gpu_configs` (invkernels.triton.aot)."""
    gl = meta(2, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    for tile in gpu_configs()["_actnorm_apply_kernel"]:
        x, p = meta(2, tile.chans, tile.block, dtype=dtype), meta(tile.chans, dtype=dtype)
        yield "actnorm_fwd", (x, p, p)
        yield "actnorm_inv", (x, p, p)
        for reverse in (False, True):
            yield "actnorm_bwd", (x, gl, x, p, p, reverse)


# The launcher of each registered op (docs/ops/actnorm.md). invkernels.ops.actnorm defines the
# Triton twins <op>_triton from the C++ schemas with them; the twins check their arguments (the
# checks of the C++ ops) before calling a launcher.
LAUNCHERS = {
    "actnorm_fwd": actnorm_forward,
    "actnorm_inv": actnorm_inverse,
    "actnorm_bwd": actnorm_backward,
}
