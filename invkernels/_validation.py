"""Argument checks of every op wrapper (the one fake implementation per op, the Triton twins, the
reference path) and the modules.

The C++ backend performs the op checks in csrc/checks.h and csrc/ops/*.h with the same wording, so
a user sees one message for one mistake whichever backend runs. The log-det dtype rule (``logdet_dtype``)
and the integer, permutation and value descriptions used in error messages live here too.
"""

from __future__ import annotations

import torch

SCALES = ("exp", "sigmoid", "sigmoid_eps", "atan", "rational")
# The scales whose clamp is used (and checked); the sigmoid scales ignore it.
CLAMPED_SCALES = ("exp", "atan", "rational")
SCALE_CHOICES = "one of " + ", ".join(repr(s) for s in SCALES)
_FLOAT32_MIN = torch.finfo(torch.float32).tiny
_FLOAT32_MAX = torch.finfo(torch.float32).max


def _fail(op: str, message: str) -> None:
    raise ValueError(f"{op}: {message}")


def logdet_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of a log-determinant for inputs of ``dtype``: float32 for float16, bfloat16 and
    float32 (a half-precision log-det overflows at 65504), float64 for float64."""
    return torch.promote_types(dtype, torch.float32)


def describe(value) -> str:
    """What ``value`` is, for an error message: its type, and for a tuple or list its items' types."""
    if isinstance(value, (tuple, list)):
        return f"a {type(value).__name__} of {len(value)} ({', '.join(type(v).__name__ for v in value)})"
    return type(value).__name__


def check_int(owner: str, name: str, value, minimum: int = 1) -> int:
    """``value`` if it is an integer (not a bool) of at least ``minimum``, else a ValueError naming
    ``owner`` and ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        kind = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ValueError(f"{owner}: {name} should be {kind}, got {value!r}")
    return value


def check_scale(op: str, scale: str, clamp: float) -> None:
    if scale not in SCALES:
        _fail(op, f"scale should be {SCALE_CHOICES}, got {scale!r}")
    # 1 / clamp and clamp must both be finite in float32, the compute type of most inputs.
    if scale in CLAMPED_SCALES and not (_FLOAT32_MIN <= clamp <= _FLOAT32_MAX):
        _fail(op, f"clamp should be positive and finite (within the float32 range) for scale={scale!r}, "
                  f"got {clamp:g}")


def check_permutation(owner: str, name: str, perm, n: int, key: str) -> None:
    """ValueError naming ``owner``, the buffer ``name`` and the state-dict ``key`` unless ``perm`` is an
    integer tensor of shape ``[n]`` holding each of ``0 .. n-1`` once."""
    if not isinstance(perm, torch.Tensor) or perm.dtype != torch.int64 or perm.shape != (n,):
        got = f"{perm.dtype} of shape {list(perm.shape)}" if isinstance(perm, torch.Tensor) else type(perm).__name__
        raise ValueError(f"{owner}: buffer '{name}' (state dict key '{key}') should be an int64 tensor of shape "
                         f"[{n}], got {got}")
    if not torch.equal(torch.sort(perm).values.cpu(), torch.arange(n)):
        raise ValueError(f"{owner}: buffer '{name}' (state dict key '{key}') should be a permutation of 0..{n - 1} "
                         f"(each index once), got {perm.tolist() if n <= 32 else perm}")


def split_channels(channels: int, passthrough: int | None = None) -> tuple[int, int]:
    """Channels of the conditioning half and of the transformed half: ``passthrough`` and the rest,
    or ``C // 2`` and the rest when it is None."""
    c1 = channels // 2 if passthrough is None else passthrough
    return c1, channels - c1


def check_input(op: str, x: torch.Tensor, x_name: str = "x") -> None:
    """Validate an op's data input ``x``: floating point, ``[B, C, *spatial]``."""
    if not x.is_floating_point():
        _fail(op, f"{x_name} should be a floating-point tensor, got {x.dtype}")
    if x.dim() < 2:
        _fail(op, f"{x_name} should be at least 2-D (B, C, ...), got {x.dim()}-D")


def check_coupling_input(op: str, x: torch.Tensor, x_name: str = "x", passthrough: int | None = None) -> None:
    """Validate a coupling input ``x``: floating point, ``[B, C, *spatial]``, and ``passthrough`` an
    integer in ``[0, C)`` (or None: ``C // 2``, then ``C >= 2``)."""
    check_input(op, x, x_name)
    channels = x.shape[1]
    if passthrough is None:
        if channels < 2:
            _fail(op, f"{x_name} should have at least 2 channels to split, got C={channels}")
    elif isinstance(passthrough, bool) or not isinstance(passthrough, int) or not 0 <= passthrough < channels:
        _fail(op, f"passthrough should be an integer in [0, C) = [0, {channels}) for {x_name} with C={channels}, "
                  f"got {passthrough!r}")


def check_coupling(op: str, x: torch.Tensor, h: torch.Tensor, affine: bool, x_name: str = "x",
                   passthrough: int | None = None) -> None:
    """Validate a coupling input ``x`` ([B, C, *spatial]), its ``passthrough`` and the subnet output ``h``."""
    check_coupling_input(op, x, x_name, passthrough)
    channels = x.shape[1]
    if h.dtype != x.dtype:
        _fail(op, f"{x_name} and h should have the same dtype, got {x_name} {x.dtype} and h {h.dtype}")
    if h.device != x.device:
        _fail(op, f"{x_name} and h should be on the same device, got {x_name} on {x.device} and h on {h.device}")
    if h.dim() != x.dim():
        _fail(op, f"h should have the same number of dimensions as {x_name} ({x.dim()}), got {h.dim()}")
    if h.shape[0] != x.shape[0]:
        _fail(op, f"h should have the batch size of {x_name} ({x.shape[0]}), got {h.shape[0]}")
    if h.shape[2:] != x.shape[2:]:
        _fail(op, f"h should have the spatial shape of {x_name} {list(x.shape[2:])}, got {list(h.shape[2:])}")
    _, c2 = split_channels(channels, passthrough)
    want = 2 * c2 if affine else c2
    if h.shape[1] != want:
        rest = "C // 2" if passthrough is None else "passthrough"
        formula = f"2 * (C - {rest})" if affine else f"C - {rest}"
        given = "" if passthrough is None else f", passthrough={passthrough}"
        _fail(op, f"h should have {formula} = {want} channels for {x_name} with C={channels}{given}, got {h.shape[1]}")


def check_grad(op: str, grad: torch.Tensor, like: torch.Tensor, name: str, like_name: str) -> None:
    if grad.shape != like.shape:
        _fail(op, f"{name} should have the shape of {like_name} {list(like.shape)}, got {list(grad.shape)}")
    if grad.dtype != like.dtype:
        _fail(op, f"{name} should have the dtype of {like_name} ({like.dtype}), got {grad.dtype}")
    if grad.device != like.device:
        _fail(op, f"{name} should be on the device of {like_name} ({like.device}), got {grad.device}")


def check_grad_logdet(op: str, grad_logdet: torch.Tensor, x: torch.Tensor) -> None:
    """Validate the gradient of an op's log-det: shape ``[B]``, dtype ``logdet_dtype(x.dtype)`` (the
    dtype the op returns its log-det in), on ``x``'s device."""
    if grad_logdet.dim() != 1 or grad_logdet.shape[0] != x.shape[0]:
        _fail(op, f"grad_logdet should have shape [{x.shape[0]}], got {list(grad_logdet.shape)}")
    want = logdet_dtype(x.dtype)
    if grad_logdet.dtype != want:
        _fail(op, f"grad_logdet should have the log-det dtype {want} (for x of {x.dtype}), got {grad_logdet.dtype}")
    if grad_logdet.device != x.device:
        _fail(op, f"grad_logdet should be on the device of x ({x.device}), got {grad_logdet.device}")


def check_actnorm(op: str, x: torch.Tensor, bias: torch.Tensor, log_scale: torch.Tensor, x_name: str = "x") -> None:
    """Validate an ActNorm input ``x`` ([B, C, *spatial]) and its parameters ``bias``, ``log_scale`` ([C])."""
    check_input(op, x, x_name)
    channels = x.shape[1]
    for p, name in ((bias, "bias"), (log_scale, "log_scale")):
        if p.dim() != 1 or p.shape[0] != channels:
            _fail(op, f"{name} should have shape [C] = [{channels}] for {x_name} with C={channels}, "
                      f"got {list(p.shape)}")
        if p.dtype != x.dtype:
            _fail(op, f"{x_name} and {name} should have the same dtype, got {x_name} {x.dtype} and {name} {p.dtype}")
        if p.device != x.device:
            _fail(op, f"{x_name} and {name} should be on the same device, got {x_name} on {x.device} and {name} "
                      f"on {p.device}")


def check_factors(op: str, perm: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor, sign: torch.Tensor,
                  log_s: torch.Tensor) -> None:
    """Validate the LU factors of an invertible 1x1 convolution (csrc/ops/invconv_weight.h)."""
    if lower.dim() != 2 or lower.shape[0] != lower.shape[1]:
        _fail(op, f"lower should be a square matrix, got shape {list(lower.shape)}")
    c = lower.shape[0]
    if not lower.is_floating_point():
        _fail(op, f"lower should be a floating-point tensor, got {lower.dtype}")
    if upper.shape != lower.shape:
        _fail(op, f"upper should have the shape of lower {list(lower.shape)}, got {list(upper.shape)}")
    if perm.dim() != 1 or perm.shape[0] != c or perm.dtype != torch.int64:
        _fail(op, f"perm should be an int64 vector of length {c}, got {perm.dtype} of shape {list(perm.shape)}")
    for t, name in ((sign, "sign"), (log_s, "log_s")):
        if t.dim() != 1 or t.shape[0] != c:
            _fail(op, f"{name} should have shape [{c}], got {list(t.shape)}")
    for t, name in ((upper, "upper"), (sign, "sign"), (log_s, "log_s")):
        if t.dtype != lower.dtype:
            _fail(op, f"{name} should have the dtype of lower ({lower.dtype}), got {t.dtype}")
    for t, name in ((perm, "perm"), (upper, "upper"), (sign, "sign"), (log_s, "log_s")):
        if t.device != lower.device:
            _fail(op, f"{name} should be on the device of lower ({lower.device}), got {t.device}")


def check_product(op: str, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None,
                  log_scale: torch.Tensor | None, x_name: str = "x") -> None:
    """Validate the per-position product's input ``x``, weight ``w`` ([C, C]) and the optional folded
    ActNorm ``bias``, ``log_scale`` (csrc/ops/conv1x1.h)."""
    check_input(op, x, x_name)
    c = x.shape[1]
    if w.dim() != 2 or w.shape[0] != c or w.shape[1] != c:
        _fail(op, f"weight should have shape [C, C] = [{c}, {c}] for {x_name} with C={c}, got {list(w.shape)}")
    if w.dtype != x.dtype:
        _fail(op, f"{x_name} and weight should have the same dtype, got {x_name} {x.dtype} and weight {w.dtype}")
    if w.device != x.device:
        _fail(op, f"{x_name} and weight should be on the same device, got {x_name} on {x.device} and weight on "
                  f"{w.device}")
    if (bias is None) != (log_scale is None):
        _fail(op, "bias and log_scale (the folded ActNorm) should be given together or both be None, got "
                  f"{'bias' if bias is not None else 'log_scale'} alone")
    if bias is not None:
        check_actnorm(op, x, bias, log_scale, x_name)


# The smallest minimum bin size and derivative of a spline: a bin of this fraction of the range
# is still ~8 float32 steps wide next to the bounds, and a derivative of this size keeps every
# float32 intermediate of the spline finite (docs/ops/spline.md, numerics).
SPLINE_MIN_FRACTION = 1e-6


def _number(value) -> str:
    """A number as the C++ checks print it (``%g``-like); anything else as its repr."""
    return f"{value:g}" if isinstance(value, (int, float)) and not isinstance(value, bool) else repr(value)


def _check_fraction(op: str, name: str, value, limit: float, limit_text: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (SPLINE_MIN_FRACTION <= value < limit):
        _fail(op, f"{name} should be a number in [{SPLINE_MIN_FRACTION:g}, {limit_text}), got {_number(value)}")


def check_spline(op: str, x: torch.Tensor, h: torch.Tensor, bins: int, tail_bound: float, min_bin_width: float,
                 min_bin_height: float, min_derivative: float, passthrough: int = 0, x_name: str = "x") -> None:
    """Validate a rational-quadratic spline input ``x`` ([B, C, *spatial]) whose first
    ``passthrough`` channels are copied through, the parameters ``h`` ([B, (C - passthrough) *
    (3 * bins - 1), *spatial]) of the others and the spline's settings."""
    check_input(op, x, x_name)
    check_int(op, "bins", bins)
    if isinstance(tail_bound, bool) or not isinstance(tail_bound, (int, float)) or \
            not (_FLOAT32_MIN <= tail_bound <= _FLOAT32_MAX):
        _fail(op, f"tail_bound should be positive and finite (within the float32 range), got {_number(tail_bound)}")
    _check_fraction(op, "min_bin_width", min_bin_width, 1 / bins, f"1 / bins = {1 / bins:g}")
    _check_fraction(op, "min_bin_height", min_bin_height, 1 / bins, f"1 / bins = {1 / bins:g}")
    _check_fraction(op, "min_derivative", min_derivative, 1, "1")
    c = x.shape[1]
    if isinstance(passthrough, bool) or not isinstance(passthrough, int) or not 0 <= passthrough < c:
        _fail(op, f"passthrough should be an integer in [0, C) = [0, {c}) for {x_name} with C={c}, got {passthrough}")
    if h.dtype != x.dtype:
        _fail(op, f"{x_name} and h should have the same dtype, got {x_name} {x.dtype} and h {h.dtype}")
    if h.device != x.device:
        _fail(op, f"{x_name} and h should be on the same device, got {x_name} on {x.device} and h on {h.device}")
    want = (c - passthrough) * (3 * bins - 1)
    if h.dim() != x.dim() or h.shape[0] != x.shape[0] or h.shape[2:] != x.shape[2:]:
        _fail(op, f"h should have shape [B, (C - passthrough) * (3 * bins - 1), *spatial] = "
                  f"{[x.shape[0], want, *x.shape[2:]]} for {x_name} of shape {list(x.shape)}, "
                  f"passthrough={passthrough} and bins={bins}, got {list(h.shape)}")
    if h.shape[1] != want:
        _fail(op, f"h should have (C - passthrough) * (3 * bins - 1) = {want} channels for {x_name} with C={c}, "
                  f"passthrough={passthrough} and bins={bins}, got {h.shape[1]}")
