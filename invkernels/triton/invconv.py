"""Triton kernels and launchers of the LU-decomposed invertible 1x1 convolution (Glow): the weight
assembly ``W = P L U'`` and the per-position product ``y = W' x + b'``, each with its backward.

Formulas, layouts and op schemas: docs/ops/invconv.md (the C++ ops: csrc/ops/invconv_weight.h,
csrc/ops/conv1x1.h). :data:`LAUNCHERS` maps each registered op to its launcher here, which takes
the op's arguments, already checked by the op's checks (the launchers check only the device), and
returns results in the C++ op's layouts; a launcher runs only the kernels below (plus torch
allocations), never a C++ op.

Weight assembly (``C x C``), with ``(P M)[i, :] = M[perm[i], :]``::

    L = tril(lower, -1) + I,   U' = triu(upper, 1) + diag(sign * exp(log_s)),   W = P L U'
    W[i, j] = sum_k L[perm[i], k] U'[k, j]          (a GEMM whose left rows are gathered by perm)

    VJP (dW = grad_w; substituting r = perm[i] in dM = P^T dW, so that no inverse permutation is
    needed):
        dU'[k, j]            = sum_i L[perm[i], k] dW[i, j]     ((P L)^T dW)
        dupper               = triu(dU', 1),    dlog_s[k] = dU'[k, k] * sign[k] * exp(log_s[k])
        dlower[perm[i], k]   = sum_j dW[i, j] U'[k, j]  for k < perm[i], else 0   (rows scattered)

The two products of the backward are one launch: the first half of the programs computes tiles of
``dU'`` (the diagonal tiles also ``dlog_s``), the second half tiles of ``dW U'^T``. A ``perm`` entry
outside ``[0, C)`` (the C++ op raises there) reads no memory: it gives a NaN row of ``W`` and NaN in
``dupper`` and ``dlog_s``.

Per-position product. ``x`` is viewed as ``[B, C, S]`` with its own strides: a view for ``[B, C]``,
contiguous and channels-last-like inputs and slices (other strides are copied once by
``reshape``). The ``B * S`` positions ``n = (b, s)`` are the GEMM's columns, taken in tiles of
``BLOCK`` positions: ``BLOCK / SP`` samples by ``SP = min(next_pow2(S), BLOCK)`` positions each, so
a lane's sample and position come from shifts and masks (no division per lane), and small ``S``
(vectors: ``S = 1``) still fill a tile::

    y[:, n] = W' x[:, n] + b',   W' = W diag(exp(log_scale)),   b' = W' bias     (no ActNorm: W' = W)
    VJP with g = grad_y and sums over all positions n:
        dx = W'^T g  (= exp(log_scale) * (W^T g): the same GEMM with the weight read transposed
                      and the rows scaled in the epilogue)
        A = sum g x^T,   gb = sum g,   dW' = A + gb bias^T,   dW = dW' diag(exp(log_scale)),
        dbias = W'^T gb,   dlog_scale = column sums of W' * dW'

ActNorm's factors and the ``dW`` / ``dlog_scale`` terms come from invkernels.triton.actnorm
(``scale``, ``backward_terms``). The product kernel scales the weight tile's columns by
``exp(log_scale)`` and accumulates ``b' = W' bias`` in its channel loop, and adds ``b'`` in the
epilogue: the folded ActNorm costs no extra pass. ``A`` and ``gb`` are reduced in two stages without atomics: the positions are split
into chunks, each program of the partial kernel writes ``sum g x^T`` of one chunk and one tile of
channels (and ``sum g`` of its rows) to a buffer, and the finishing kernel adds the chunks of each
entry in chunk order and applies the ActNorm terms. The results depend only on the sizes, not on
scheduling: two runs are bit-identical.

Numerics. Every product is ``tl.dot`` with ``input_precision="ieee"`` (never tf32) in float32 for
float16/bfloat16/float32 inputs and float64 for float64 inputs; the partial sums are in that
compute dtype; results are stored in the input dtype. Masked lanes load zeros, and sums over
masked lanes that could meet an infinite parameter (``0 * inf``) select zeros first, so NaN and
Inf reach the entries they reach in the C++ op, whose formulas these are (an infinite ``x`` makes
``dlog_scale`` NaN there too, where the reference's order of sums gives Inf).

Launch configurations. On a GPU each kernel uses one of a small explicit set of tile sizes
(:func:`gpu_configs`, compiled ahead of time for sm_80 and sm_90), picked by the channel count. The
interpreter (``TRITON_INTERPRET=1``) runs each program as numpy operations at about 1 ms per
program, so there the tiles cover a small problem in one program (not compiled, so not limited to
the explicit set).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from invkernels.ops.invconv import product_like
from invkernels.triton import actnorm
from invkernels.triton._common import check_device, compute_dtype, device_guard, interpreting, max_tile_elements, \
    meta

__all__ = [
    "LAUNCHERS",
    "Conv1x1BwdConfigs",
    "GemmConfig",
    "ReduceConfig",
    "conv1x1",
    "conv1x1_bwd",
    "conv1x1_bwd_configs",
    "conv1x1_config",
    "aot_cases",
    "gpu_configs",
    "invconv_weight",
    "invconv_weight_bwd",
    "invconv_weight_bwd_config",
    "invconv_weight_config",
]

# Product modes of _conv1x1_kernel.
_PLAIN = 0  # out = W in
_FOLD = 1  # out = W' in + b' (the forward with an ActNorm folded in)
_ROW_SCALE = 2  # out = exp(log_scale) * (W in) (grad_x with an ActNorm folded in; W read transposed)


@triton.jit
def _unit_lower(lower_ptr, src, lane_ok, ks, C, stride_0, stride_1, ACC: tl.constexpr):
    # L[src, ks] of L = tril(lower, -1) + I for broadcastable row indices src and columns ks; lanes
    # with lane_ok false give 0, an in-range lane whose src is outside [0, C) gives NaN.
    valid = (src >= 0) & (src < C)
    v = tl.load(lower_ptr + src * stride_0 + ks * stride_1, mask=lane_ok & valid & (ks < src), other=0.0).to(ACC)
    v = tl.where(lane_ok & (ks == src), 1.0, v)
    return tl.where(lane_ok & ~valid, float("nan"), v)


@triton.jit
def _upper_factor(upper_ptr, sign_ptr, log_s_ptr, ks, js, k_ok, j_ok, s_up0, s_up1, s_sign, s_log_s,
                  ACC: tl.constexpr):
    # U'[ks, js] of U' = triu(upper, 1) + diag(sign * exp(log_s)) for broadcastable ks and js; masked
    # lanes give 0.
    v = tl.load(upper_ptr + ks * s_up0 + js * s_up1, mask=k_ok & j_ok & (js > ks), other=0.0).to(ACC)
    sign = tl.load(sign_ptr + ks * s_sign, mask=k_ok, other=0.0).to(ACC)
    diag = sign * tl.exp(tl.load(log_s_ptr + ks * s_log_s, mask=k_ok, other=0.0).to(ACC))
    return tl.where(js == ks, diag, v)


@triton.jit
def _square_tile(pid, C, BLOCK: tl.constexpr):
    # Rows and columns (int64) of tile pid (int32) of the square C x C matrix, row-major tile order.
    nb = tl.cdiv(C, BLOCK)
    rows = (pid // nb).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    cols = (pid % nb).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    return rows, cols, rows < C, cols < C


@triton.jit
def _invconv_weight_kernel(
    perm_ptr,  # [C] int64
    lower_ptr,  # [C, C] strided
    upper_ptr,  # [C, C] strided
    sign_ptr,  # [C] strided
    log_s_ptr,  # [C] strided
    w_ptr,  # [C, C] contiguous: W = P L U'
    C,
    s_perm,
    s_lo0,
    s_lo1,
    s_up0,
    s_up1,
    s_sign,
    s_log_s,
    ACC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    rows, cols, row_ok, col_ok = _square_tile(pid, C, BLOCK_M)
    src = tl.load(perm_ptr + rows * s_perm, mask=row_ok, other=0)
    acc = tl.zeros((BLOCK_M, BLOCK_M), dtype=ACC)
    for k0 in range(0, C, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < C
        lo = _unit_lower(lower_ptr, src[:, None], row_ok[:, None], ks[None, :], C, s_lo0, s_lo1, ACC)
        up = _upper_factor(upper_ptr, sign_ptr, log_s_ptr, ks[:, None], cols[None, :], k_ok[:, None],
                           col_ok[None, :], s_up0, s_up1, s_sign, s_log_s, ACC)
        acc = tl.dot(lo, up, acc, input_precision="ieee")
    mask = row_ok[:, None] & col_ok[None, :]
    tl.store(w_ptr + rows[:, None] * C + cols[None, :], acc.to(w_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _invconv_weight_bwd_kernel(
    grad_w_ptr,  # [C, C] strided: dW
    perm_ptr,  # [C] int64
    lower_ptr,  # [C, C] strided
    upper_ptr,  # [C, C] strided
    sign_ptr,  # [C] strided
    log_s_ptr,  # [C] strided
    grad_lower_ptr,  # [C, C] contiguous, zero-filled: row perm[i] written by the tiles of row i
    grad_upper_ptr,  # [C, C] contiguous
    grad_log_s_ptr,  # [C]
    C,
    s_g0,
    s_g1,
    s_perm,
    s_lo0,
    s_lo1,
    s_up0,
    s_up1,
    s_sign,
    s_log_s,
    ACC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    nb = tl.cdiv(C, BLOCK_M)
    tiles = nb * nb
    rows, cols, row_ok, col_ok = _square_tile(pid % tiles, C, BLOCK_M)
    acc = tl.zeros((BLOCK_M, BLOCK_M), dtype=ACC)
    if pid < tiles:
        # Tile (k = rows, j = cols) of dU' = (P L)^T dW, summed over i.
        for i0 in range(0, C, BLOCK_K):
            i = i0 + tl.arange(0, BLOCK_K)
            i_ok = i < C
            src = tl.load(perm_ptr + i * s_perm, mask=i_ok, other=0)
            lo_t = _unit_lower(lower_ptr, src[None, :], i_ok[None, :], rows[:, None], C, s_lo0, s_lo1, ACC)
            dw = tl.load(grad_w_ptr + i[:, None] * s_g0 + cols[None, :] * s_g1,
                         mask=i_ok[:, None] & col_ok[None, :], other=0.0).to(ACC)
            acc = tl.dot(lo_t, dw, acc, input_precision="ieee")
        mask = row_ok[:, None] & col_ok[None, :]
        upper_part = tl.where(cols[None, :] > rows[:, None], acc, 0.0)
        tl.store(grad_upper_ptr + rows[:, None] * C + cols[None, :],
                 upper_part.to(grad_upper_ptr.dtype.element_ty), mask=mask)
        diag = tl.sum(tl.where(cols[None, :] == rows[:, None], acc, 0.0), axis=1)
        sign = tl.load(sign_ptr + rows * s_sign, mask=row_ok, other=0.0).to(ACC)
        scale = sign * tl.exp(tl.load(log_s_ptr + rows * s_log_s, mask=row_ok, other=0.0).to(ACC))
        on_diagonal = (pid // nb) == (pid % nb)
        tl.store(grad_log_s_ptr + rows, (diag * scale).to(grad_log_s_ptr.dtype.element_ty),
                 mask=row_ok & on_diagonal)
    else:
        # Tile (i = rows, k = cols) of dW U'^T, summed over j, stored at rows perm[i] of dlower.
        for j0 in range(0, C, BLOCK_K):
            j = j0 + tl.arange(0, BLOCK_K)
            j_ok = j < C
            dw = tl.load(grad_w_ptr + rows[:, None] * s_g0 + j[None, :] * s_g1,
                         mask=row_ok[:, None] & j_ok[None, :], other=0.0).to(ACC)
            up_t = _upper_factor(upper_ptr, sign_ptr, log_s_ptr, cols[None, :], j[:, None], col_ok[None, :],
                                 j_ok[:, None], s_up0, s_up1, s_sign, s_log_s, ACC)
            acc = tl.dot(dw, up_t, acc, input_precision="ieee")
        src = tl.load(perm_ptr + rows * s_perm, mask=row_ok, other=-1)
        src_ok = row_ok & (src >= 0) & (src < C)
        lower_part = tl.where(cols[None, :] < src[:, None], acc, 0.0)
        tl.store(grad_lower_ptr + src[:, None] * C + cols[None, :], lower_part.to(grad_lower_ptr.dtype.element_ty),
                 mask=src_ok[:, None] & col_ok[None, :])


@triton.jit
def _position_tile(q, S, S_TILES, LOG_SP, SP, SAMPLES, BLOCK: tl.constexpr):
    # Sample b and spatial index s (int64) of each lane of position tile q: SAMPLES = BLOCK >> LOG_SP
    # samples (those of block q // S_TILES) by SP = 1 << LOG_SP positions (block q % S_TILES of
    # each sample); shifts and masks, no division per lane.
    lane = tl.arange(0, BLOCK)
    b = (q // S_TILES).to(tl.int64) * SAMPLES + (lane >> LOG_SP)
    s = (q % S_TILES).to(tl.int64) * SP + (lane & (SP - 1))
    return b, s


@triton.jit
def _conv1x1_kernel(
    in_ptr,  # [B, C, S] strided: x (forward) or grad_y (grad_x)
    w_ptr,  # [C, C] strided: read as out[o] = sum_k w[o, k] in[k] (the weight transposed for grad_x)
    bias_ptr,  # [C] strided: the folded ActNorm's bias (MODE _FOLD)
    log_scale_ptr,  # [C] strided: the folded ActNorm's log-scale (MODE _FOLD and _ROW_SCALE)
    out_ptr,  # [B, C, S] strided: y (forward) or grad_x
    B,
    C,
    S,
    S_TILES,
    LOG_SP,
    SP,
    SAMPLES,
    s_in_b,
    s_in_c,
    s_in_s,
    s_w_o,
    s_w_k,
    s_bias,
    s_log_scale,
    s_out_b,
    s_out_c,
    s_out_s,
    MODE: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # Program pid: output channels rows (fastest, so the programs that read one tile of positions
    # run together) by position tile q. Tile indices are int32 (the grid is below 2^31); every
    # element offset is int64.
    pid = tl.program_id(0)
    nm = tl.cdiv(C, BLOCK_M)
    rows = (pid % nm).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < C
    b, s = _position_tile(pid // nm, S, S_TILES, LOG_SP, SP, SAMPLES, BLOCK_N)
    col_ok = (b < B) & (s < S)
    in_cols = b * s_in_b + s * s_in_s
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    folded_bias = tl.zeros((BLOCK_M,), dtype=ACC)
    for k0 in range(0, C, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < C
        w = tl.load(w_ptr + rows[:, None] * s_w_o + ks[None, :] * s_w_k, mask=row_ok[:, None] & k_ok[None, :],
                    other=0.0).to(ACC)
        if MODE == 1:
            scale = actnorm.scale(tl.load(log_scale_ptr + ks * s_log_scale, mask=k_ok, other=0.0).to(ACC))
            w = w * scale[None, :]
            bias = tl.load(bias_ptr + ks * s_bias, mask=k_ok, other=0.0).to(ACC)
            folded_bias += tl.sum(w * bias[None, :], axis=1)
        v = tl.load(in_ptr + ks[:, None].to(tl.int64) * s_in_c + in_cols[None, :],
                    mask=k_ok[:, None] & col_ok[None, :], other=0.0).to(ACC)
        acc = tl.dot(w, v, acc, input_precision="ieee")
    if MODE == 1:
        acc += folded_bias[:, None]
    if MODE == 2:
        scale = actnorm.scale(tl.load(log_scale_ptr + rows * s_log_scale, mask=row_ok, other=0.0).to(ACC))
        acc = acc * scale[:, None]
    out_cols = b * s_out_b + s * s_out_s
    tl.store(out_ptr + rows[:, None] * s_out_c + out_cols[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _conv1x1_outer_kernel(
    g_ptr,  # [B, C, S] strided: grad_y
    x_ptr,  # [B, C, S] strided: x
    partial_ptr,  # [NT, C, C] contiguous, compute dtype: sum over chunk t of g x^T
    partial_gb_ptr,  # [NT, C] contiguous, compute dtype: sum over chunk t of g
    B,
    C,
    S,
    TILES,
    CHUNK,
    S_TILES,
    LOG_SP,
    SP,
    SAMPLES,
    s_g_b,
    s_g_c,
    s_g_s,
    s_x_b,
    s_x_c,
    s_x_s,
    ACC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # Program pid: channels rows of g by channels cols of x, over the position tiles
    # [t * CHUNK, (t + 1) * CHUNK) of the TILES tiles (chunk t), in order.
    pid = tl.program_id(0)
    nm = tl.cdiv(C, BLOCK_M)
    nmn = nm * tl.cdiv(C, BLOCK_N)
    t = pid // nmn
    pid_n = (pid % nmn) // nm
    rows = (pid % nm).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < C
    col_ok = cols < C
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    gb = tl.zeros((BLOCK_M,), dtype=ACC)
    first = t * CHUNK
    for q in range(first, tl.minimum(first + CHUNK, TILES)):
        b, s = _position_tile(q, S, S_TILES, LOG_SP, SP, SAMPLES, BLOCK_K)
        pos_ok = (b < B) & (s < S)
        g = tl.load(g_ptr + rows[:, None] * s_g_c + (b * s_g_b + s * s_g_s)[None, :],
                    mask=row_ok[:, None] & pos_ok[None, :], other=0.0).to(ACC)
        x_t = tl.load(x_ptr + (b * s_x_b + s * s_x_s)[:, None] + cols[None, :] * s_x_c,
                      mask=pos_ok[:, None] & col_ok[None, :], other=0.0).to(ACC)
        acc = tl.dot(g, x_t, acc, input_precision="ieee")
        gb += tl.sum(g, axis=1)
    plane = t.to(tl.int64) * C * C
    tl.store(partial_ptr + plane + rows[:, None] * C + cols[None, :], acc, mask=row_ok[:, None] & col_ok[None, :])
    tl.store(partial_gb_ptr + t.to(tl.int64) * C + rows, gb, mask=row_ok & (pid_n == 0))


@triton.jit
def _conv1x1_finish_kernel(
    partial_ptr,  # [NT, C, C] contiguous, compute dtype
    partial_gb_ptr,  # [NT, C] contiguous, compute dtype
    w_ptr,  # [C, C] strided: the weight W
    bias_ptr,  # [C] strided (read when FOLDED)
    log_scale_ptr,  # [C] strided (read when FOLDED)
    grad_w_ptr,  # [C, C] contiguous: dW
    grad_bias_ptr,  # [C] (written when FOLDED)
    grad_log_scale_ptr,  # [C] (written when FOLDED)
    C,
    NT,
    FOLDED,
    s_w_o,
    s_w_k,
    s_bias,
    s_log_scale,
    ACC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # Program pid: the columns cols of dW; it walks all rows, adding the chunks of each entry in
    # chunk order, so it also holds the column sums of the ActNorm terms. FOLDED is a runtime flag
    # (this kernel is C x C work): without it bias reads as 0 and log_scale as 0.
    pid = tl.program_id(0)
    cols = pid.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < C
    folded = FOLDED != 0
    log_scale = tl.load(log_scale_ptr + cols * s_log_scale, mask=col_ok & folded, other=0.0).to(ACC)[None, :]
    scale = actnorm.scale(log_scale)
    bias = tl.load(bias_ptr + cols * s_bias, mask=col_ok & folded, other=0.0).to(ACC)
    grad_bias = tl.zeros((BLOCK_N,), dtype=ACC)
    grad_log_scale = tl.zeros((BLOCK_N,), dtype=ACC)
    for r0 in range(0, C, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M).to(tl.int64)
        row_ok = rows < C
        mask = row_ok[:, None] & col_ok[None, :]
        a_ptrs = partial_ptr + rows[:, None] * C + cols[None, :]
        gb_ptrs = partial_gb_ptr + rows
        a = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
        gb = tl.zeros((BLOCK_M,), dtype=ACC)
        for _ in range(0, NT):
            a += tl.load(a_ptrs, mask=mask, other=0.0)
            gb += tl.load(gb_ptrs, mask=row_ok, other=0.0)
            a_ptrs += C * C
            gb_ptrs += C
        # Without the ActNorm dW = A exactly (an infinite gb times a zero bias would give NaN).
        grad_w_folded = tl.where(folded, a + gb[:, None] * bias[None, :], a)
        w = tl.load(w_ptr + rows[:, None] * s_w_o + cols[None, :] * s_w_k, mask=mask, other=0.0).to(ACC)
        # ActNorm's VJP with W's entries as the centred values: dW and the entries' dlog_scale terms.
        grad_w, _, term_ls = actnorm.backward_terms(grad_w_folded, w, log_scale, False)
        tl.store(grad_w_ptr + rows[:, None] * C + cols[None, :], grad_w.to(grad_w_ptr.dtype.element_ty), mask=mask)
        # Masked rows hold gb = 0, but 0 * inf is NaN for an infinite bias: select before summing.
        grad_log_scale += tl.sum(tl.where(mask, term_ls, 0.0), axis=0)
        grad_bias += tl.sum(tl.where(mask, (w * scale) * gb[:, None], 0.0), axis=0)
    tl.store(grad_bias_ptr + cols, grad_bias.to(grad_bias_ptr.dtype.element_ty), mask=col_ok & folded)
    tl.store(grad_log_scale_ptr + cols, grad_log_scale.to(grad_log_scale_ptr.dtype.element_ty),
             mask=col_ok & folded)


class GemmConfig(NamedTuple):
    """Tiles of one GEMM-like kernel launch: ``block_m`` x ``block_n`` outputs per program, ``block_k``
    terms of the sum per step, and the warps per program."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int


class ReduceConfig(NamedTuple):
    """Tiles of the finishing kernel: ``block_n`` columns per program, ``block_m`` rows per step."""

    block_m: int
    block_n: int
    num_warps: int


class Conv1x1BwdConfigs(NamedTuple):
    """The launches of :func:`conv1x1_bwd`: the ``grad_x`` product (``_conv1x1_kernel``), the partial
    sums of ``g x^T`` (``_conv1x1_outer_kernel``, ``block_k`` positions per step) and the finishing
    kernel (``_conv1x1_finish_kernel``)."""

    grad_x: GemmConfig
    outer: GemmConfig
    finish: ReduceConfig


# The GPU configurations: the explicit set that is compiled ahead of time. The products of float32
# (and half, computed in float32) inputs run on the FMA units (ieee precision), whose operand
# fragments live in registers: 8 terms per step keep every configuration free of spills. The
# product and the partial sums have one configuration for C <= 16 and one for larger C; the
# weight assembly (square tiles: a diagonal tile of dU' holds the diagonal's dlog_s) and the
# finishing kernel are C x C work and have one.
_GPU_WEIGHT = (GemmConfig(32, 32, 8, 4),)
_GPU_PRODUCT = (GemmConfig(16, 128, 8, 4), GemmConfig(64, 64, 8, 4))
_GPU_OUTER = (GemmConfig(16, 16, 32, 2), GemmConfig(64, 64, 8, 4))
_GPU_FINISH = (ReduceConfig(32, 32, 8),)
# Programs the partial kernel aims at on a GPU (a few per SM); the interpreter gets one chunk.
_GPU_OUTER_PROGRAMS = 256
# Largest channel tile under the interpreter (a tile of C up to this size is one program).
_INTERPRETER_MAX_CHANNELS = 128


def _bucket(channels: int) -> int:
    return 0 if channels <= 16 else 1


def _channel_tile(channels: int) -> int:
    """The interpreter's channel tile: all channels, at least 16."""
    return min(max(16, triton.next_power_of_2(channels)), _INTERPRETER_MAX_CHANNELS)


def _positions_tile(batch: int, spatial: int, other: int) -> int:
    """The interpreter's tile of positions: all of them, within the tile limit next to ``other``."""
    whole = triton.next_power_of_2(max(batch, 1)) * triton.next_power_of_2(max(spatial, 1))
    return max(16, min(whole, max_tile_elements() // other))


def gpu_configs() -> dict[str, tuple[GemmConfig | ReduceConfig, ...]]:
    """Every configuration the launchers use on a GPU, per kernel name: the set to compile ahead of
    time. (``_conv1x1_kernel`` serves :func:`conv1x1` and the ``grad_x`` of :func:`conv1x1_bwd`.)"""
    return {
        "_invconv_weight_kernel": _GPU_WEIGHT,
        "_invconv_weight_bwd_kernel": _GPU_WEIGHT,
        "_conv1x1_kernel": _GPU_PRODUCT,
        "_conv1x1_outer_kernel": _GPU_OUTER,
        "_conv1x1_finish_kernel": _GPU_FINISH,
    }


def invconv_weight_config(channels: int) -> GemmConfig:
    """The configuration :func:`invconv_weight` launches with for ``C = channels``."""
    if not interpreting():
        return _GPU_WEIGHT[0]
    block = _channel_tile(channels)
    return GemmConfig(block, block, block, 4)


def invconv_weight_bwd_config(channels: int) -> GemmConfig:
    """The configuration :func:`invconv_weight_bwd` launches with for ``C = channels``."""
    return invconv_weight_config(channels)


def conv1x1_config(channels: int, batch: int, spatial: int) -> GemmConfig:
    """The configuration of the product (:func:`conv1x1`, and ``grad_x`` of :func:`conv1x1_bwd`) for
    ``x`` of ``batch`` samples, ``channels`` channels and ``spatial`` positions per sample."""
    if not interpreting():
        return _GPU_PRODUCT[_bucket(channels)]
    block = _channel_tile(channels)
    return GemmConfig(block, _positions_tile(batch, spatial, block), block, 4)


def conv1x1_bwd_configs(channels: int, batch: int, spatial: int) -> Conv1x1BwdConfigs:
    """The configurations :func:`conv1x1_bwd` launches with for ``x`` of these sizes."""
    grad_x = conv1x1_config(channels, batch, spatial)
    if not interpreting():
        bucket = _bucket(channels)
        return Conv1x1BwdConfigs(grad_x, _GPU_OUTER[bucket], _GPU_FINISH[0])
    block = _channel_tile(channels)
    return Conv1x1BwdConfigs(grad_x, GemmConfig(block, block, _positions_tile(batch, spatial, block), 4),
                             ReduceConfig(block, block, 4))


class _PositionTiles(NamedTuple):
    """Tiles of ``block`` positions: ``samples`` samples by ``sp = 2^log_sp`` positions each,
    ``s_tiles`` tiles per sample along ``S``, ``count`` tiles in all (see ``_position_tile``)."""

    s_tiles: int
    log_sp: int
    sp: int
    samples: int
    count: int


def _position_tiles(batch: int, spatial: int, block: int) -> _PositionTiles:
    # A tile holds whole samples when S < block (S rounded up to a power of 2), else one sample's
    # run of block positions.
    sp = min(triton.next_power_of_2(spatial), block)
    samples = block // sp
    s_tiles = triton.cdiv(spatial, sp)
    return _PositionTiles(s_tiles, sp.bit_length() - 1, sp, samples, triton.cdiv(batch, samples) * s_tiles)


def _chunks(position_tiles: int, channel_tiles: int) -> tuple[int, int]:
    """``(number of chunks, position tiles per chunk)`` of the partial sums: as many chunks as make
    about ``_GPU_OUTER_PROGRAMS`` programs on a GPU, one under the interpreter. A function of the
    sizes alone, so the summation order is reproducible."""
    target = 1 if interpreting() else max(1, _GPU_OUTER_PROGRAMS // channel_tiles)
    chunk = triton.cdiv(position_tiles, min(position_tiles, target))
    return triton.cdiv(position_tiles, chunk), chunk


def _factor_args(perm: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor, sign: torch.Tensor,
                 log_s: torch.Tensor, cfg: GemmConfig) -> dict:
    """The launch arguments the two weight kernels share: the factors, their strides, the compute
    dtype and the tiles."""
    return dict(perm_ptr=perm, lower_ptr=lower, upper_ptr=upper, sign_ptr=sign, log_s_ptr=log_s, s_perm=perm.stride(0),
                s_lo0=lower.stride(0), s_lo1=lower.stride(1), s_up0=upper.stride(0), s_up1=upper.stride(1),
                s_sign=sign.stride(0), s_log_s=log_s.stride(0), ACC=compute_dtype(lower.dtype)[1],
                BLOCK_M=cfg.block_m, BLOCK_K=cfg.block_k, num_warps=cfg.num_warps)


def invconv_weight(perm: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor, sign: torch.Tensor,
                   log_s: torch.Tensor) -> torch.Tensor:
    """``W = P L U'`` (contiguous, ``lower``'s dtype) from the LU factors, as ``invkernels::invconv_weight``."""
    check_device("invconv_weight", lower, "lower")
    c = lower.shape[0]
    w = torch.empty((c, c), dtype=lower.dtype, device=lower.device)
    if c == 0:
        return w
    cfg = invconv_weight_config(c)
    tiles = triton.cdiv(c, cfg.block_m) ** 2
    with device_guard(lower):
        _invconv_weight_kernel[(tiles,)](
            w_ptr=w,
            C=c,
            **_factor_args(perm, lower, upper, sign, log_s, cfg),
        )
    return w


def invconv_weight_bwd(grad_w: torch.Tensor, perm: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor,
                       sign: torch.Tensor, log_s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(grad_lower, grad_upper, grad_log_s)`` of :func:`invconv_weight` for the gradient ``grad_w``
    of ``W``, as ``invkernels::invconv_weight_bwd`` (contiguous, the factors' dtype)."""
    check_device("invconv_weight_bwd", lower, "lower")
    c = lower.shape[0]
    grad_lower = torch.zeros((c, c), dtype=lower.dtype, device=lower.device)
    grad_upper = torch.empty((c, c), dtype=upper.dtype, device=upper.device)
    grad_log_s = torch.empty((c,), dtype=log_s.dtype, device=log_s.device)
    if c == 0:
        return grad_lower, grad_upper, grad_log_s
    cfg = invconv_weight_bwd_config(c)
    tiles = triton.cdiv(c, cfg.block_m) ** 2
    with device_guard(lower):
        _invconv_weight_bwd_kernel[(2 * tiles,)](
            grad_w_ptr=grad_w,
            grad_lower_ptr=grad_lower,
            grad_upper_ptr=grad_upper,
            grad_log_s_ptr=grad_log_s,
            C=c,
            s_g0=grad_w.stride(0),
            s_g1=grad_w.stride(1),
            **_factor_args(perm, lower, upper, sign, log_s, cfg),
        )
    return grad_lower, grad_upper, grad_log_s


def _as_bcs(t: torch.Tensor) -> torch.Tensor:
    """``t`` as ``[B, C, S]``: a view where the spatial dimensions merge (contiguous, channels-last,
    ``[B, C]``, slices along one dimension), a copy otherwise."""
    return t.reshape(t.shape[0], t.shape[1], math.prod(t.shape[2:]))


def _product(src: torch.Tensor, weight: torch.Tensor, out: torch.Tensor, bias: torch.Tensor | None,
             log_scale: torch.Tensor | None, mode: int, transpose: bool) -> None:
    """``out[:, n] = weight' src[:, n]`` at every position (see ``_conv1x1_kernel``'s modes)."""
    src3 = _as_bcs(src)
    out3 = out.view(src3.shape)
    b, c, s = src3.shape
    if b * s == 0 or c == 0:
        return
    cfg = conv1x1_config(c, b, s)
    pos = _position_tiles(b, s, cfg.block_n)
    _, acc = compute_dtype(src.dtype)
    # The transpose is a swap of the weight's strides: out[o] = sum_k weight[k, o] src[k].
    s_w_o, s_w_k = (weight.stride(1), weight.stride(0)) if transpose else (weight.stride(0), weight.stride(1))
    # Unused parameters (per mode) point at the weight's first row: any valid [C] vector.
    bias = weight[0] if bias is None else bias
    log_scale = weight[0] if log_scale is None else log_scale
    with device_guard(src):
        _conv1x1_kernel[(triton.cdiv(c, cfg.block_m) * pos.count,)](
            in_ptr=src3,
            w_ptr=weight,
            bias_ptr=bias,
            log_scale_ptr=log_scale,
            out_ptr=out3,
            B=b,
            C=c,
            S=s,
            S_TILES=pos.s_tiles,
            LOG_SP=pos.log_sp,
            SP=pos.sp,
            SAMPLES=pos.samples,
            s_in_b=src3.stride(0),
            s_in_c=src3.stride(1),
            s_in_s=src3.stride(2),
            s_w_o=s_w_o,
            s_w_k=s_w_k,
            s_bias=bias.stride(0),
            s_log_scale=log_scale.stride(0),
            s_out_b=out3.stride(0),
            s_out_c=out3.stride(1),
            s_out_s=out3.stride(2),
            MODE=mode,
            ACC=acc,
            BLOCK_M=cfg.block_m,
            BLOCK_N=cfg.block_n,
            BLOCK_K=cfg.block_k,
            num_warps=cfg.num_warps,
        )


def _outer(grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
           log_scale: torch.Tensor | None):
    """``(grad_weight, grad_bias, grad_log_scale)`` by the two-stage reduction (the ActNorm pair is
    None without ``bias``)."""
    g3, x3 = _as_bcs(grad_y), _as_bcs(x)
    b, c, s = x3.shape
    folded = bias is not None
    acc_torch, acc = compute_dtype(x.dtype)
    grad_w = torch.empty((c, c), dtype=weight.dtype, device=x.device)
    grad_bias = torch.empty((c,), dtype=bias.dtype, device=x.device) if folded else None
    grad_log_scale = torch.empty((c,), dtype=log_scale.dtype, device=x.device) if folded else None
    if c == 0:
        return grad_w, grad_bias, grad_log_scale
    cfgs = conv1x1_bwd_configs(c, b, s)
    outer = cfgs.outer
    with device_guard(x):
        if b * s == 0:
            # No positions: one chunk of zeros, so the ActNorm terms follow the formulas (0 * bias).
            nt = 1
            partial = torch.zeros((1, c, c), dtype=acc_torch, device=x.device)
            partial_gb = torch.zeros((1, c), dtype=acc_torch, device=x.device)
        else:
            pos = _position_tiles(b, s, outer.block_k)
            channel_tiles = triton.cdiv(c, outer.block_m) * triton.cdiv(c, outer.block_n)
            nt, chunk = _chunks(pos.count, channel_tiles)
            partial = torch.empty((nt, c, c), dtype=acc_torch, device=x.device)
            partial_gb = torch.empty((nt, c), dtype=acc_torch, device=x.device)
            _conv1x1_outer_kernel[(channel_tiles * nt,)](
                g_ptr=g3,
                x_ptr=x3,
                partial_ptr=partial,
                partial_gb_ptr=partial_gb,
                B=b,
                C=c,
                S=s,
                TILES=pos.count,
                CHUNK=chunk,
                S_TILES=pos.s_tiles,
                LOG_SP=pos.log_sp,
                SP=pos.sp,
                SAMPLES=pos.samples,
                s_g_b=g3.stride(0),
                s_g_c=g3.stride(1),
                s_g_s=g3.stride(2),
                s_x_b=x3.stride(0),
                s_x_c=x3.stride(1),
                s_x_s=x3.stride(2),
                ACC=acc,
                BLOCK_M=outer.block_m,
                BLOCK_N=outer.block_n,
                BLOCK_K=outer.block_k,
                num_warps=outer.num_warps,
            )
        finish = cfgs.finish
        bias_arg = bias if folded else weight[0]
        log_scale_arg = log_scale if folded else weight[0]
        _conv1x1_finish_kernel[(triton.cdiv(c, finish.block_n),)](
            partial_ptr=partial,
            partial_gb_ptr=partial_gb,
            w_ptr=weight,
            bias_ptr=bias_arg,
            log_scale_ptr=log_scale_arg,
            grad_w_ptr=grad_w,
            grad_bias_ptr=grad_bias if folded else grad_w,
            grad_log_scale_ptr=grad_log_scale if folded else grad_w,
            C=c,
            NT=nt,
            FOLDED=int(folded),
            s_w_o=weight.stride(0),
            s_w_k=weight.stride(1),
            s_bias=bias_arg.stride(0),
            s_log_scale=log_scale_arg.stride(0),
            ACC=acc,
            BLOCK_M=finish.block_m,
            BLOCK_N=finish.block_n,
            num_warps=finish.num_warps,
        )
    return grad_w, grad_bias, grad_log_scale


def conv1x1(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
            log_scale: torch.Tensor | None = None) -> torch.Tensor:
    """``y = W' x + b'`` at every position (``W' = weight diag(exp(log_scale))``, ``b' = W' bias`` with
    an ActNorm folded in, ``W' = weight`` without), as ``invkernels::conv1x1``: channels-last result
    for a channels-last-like ``x``, contiguous otherwise, in ``x``'s dtype."""
    check_device("conv1x1", x, "x")
    y = product_like(x)
    _product(x, weight, y, bias, log_scale, _PLAIN if bias is None else _FOLD, transpose=False)
    return y


def conv1x1_bwd(grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                log_scale: torch.Tensor | None, output_mask):
    """``(grad_x, grad_weight, grad_bias, grad_log_scale)`` of :func:`conv1x1`, as
    ``invkernels::conv1x1_bwd``: ``output_mask`` picks ``(grad_x, grad_weight, the ActNorm pair)``;
    the others, and the ActNorm pair without ``bias``, are None. ``grad_x`` has the layout of
    :func:`conv1x1`'s result for ``x``."""
    check_device("conv1x1_bwd", x, "x")
    need_x, need_w, need_pair = (bool(m) for m in output_mask)
    folded = bias is not None
    need_pair = need_pair and folded
    grad_x = None
    if need_x:
        grad_x = product_like(x)
        _product(grad_y, weight, grad_x, None, log_scale, _ROW_SCALE if folded else _PLAIN, transpose=True)
    if not (need_w or need_pair):
        return grad_x, None, None, None
    grad_w, grad_bias, grad_log_scale = _outer(grad_y, x, weight, bias, log_scale)
    return (grad_x, grad_w if need_w else None, grad_bias if need_pair else None,
            grad_log_scale if need_pair else None)


def aot_cases(dtype: torch.dtype):
    """Launcher calls ``(op, args)`` on meta tensors of ``dtype`` that reach every configuration of
    :func:`gpu_configs` (invkernels.triton.aot): a small and a large channel count."""
    for c in (5, 40):
        perm, w, v, x = meta(c, dtype=torch.int64), meta(c, c, dtype=dtype), meta(c, dtype=dtype), meta(2, c, 7, dtype=dtype)
        yield "invconv_weight", (perm, w, w, v, v)
        yield "invconv_weight_bwd", (w, perm, w, w, v, v)
        yield "conv1x1", (x, w, None, None)
        yield "conv1x1", (x, w, v, v)
        yield "conv1x1_bwd", (x, x, w, None, None, [True, True, True])
        yield "conv1x1_bwd", (x, x, w, v, v, [True, True, True])


# The launcher of each registered op (docs/ops/invconv.md), called with the op's arguments.
LAUNCHERS = {
    "invconv_weight": invconv_weight,
    "invconv_weight_bwd": invconv_weight_bwd,
    "conv1x1": conv1x1,
    "conv1x1_bwd": conv1x1_bwd,
}
