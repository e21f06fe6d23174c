"""One tolerance table, keyed by dtype, for comparisons against the float64 reference.

An output that sums ``n`` terms scales atol by ``n``; :func:`reduction_length` gives ``n`` for each
kind of op output (invkernels.ops._registry.OUTPUT_KINDS): an elementwise output's tolerance does
not depend on the tensor's size. A ``"conditioned"`` output's absolute tolerance is instead twice
the error of the reference computed in the input's dtype (:func:`conditioned_atol`): its rounding
depends on the data, and the same formulas in that dtype measure it.
"""

import torch

from invkernels.ops._registry import OUTPUT_KINDS

TOL = {
    torch.float64: {"atol": 1e-10, "rtol": 1e-10},
    torch.float32: {"atol": 2e-6, "rtol": 2e-5},
    torch.bfloat16: {"atol": 2e-2, "rtol": 2e-2},
    torch.float16: {"atol": 2e-3, "rtol": 2e-3},
}


def reduction_length(kind: str, x: torch.Tensor) -> int:
    """The number of terms one output element of ``kind`` sums, for an op whose main tensor is ``x``
    (its first argument with a batch, ``[B, C, *spatial]``, or for the LU weight's ops its first
    ``[C, C]`` matrix)."""
    if kind not in OUTPUT_KINDS:
        raise ValueError(f"reduction_length: kind should be one of {sorted(OUTPUT_KINDS)}, got {kind!r}")
    if kind in ("elementwise", "conditioned"):
        return 1
    batch, channels = x.shape[0], x.shape[1]
    return {"logdet": x.numel() // max(batch, 1), "param_grad": x.numel() // max(channels, 1),
            "channel_mix": channels, "param_grad_channel_mix": x.numel()}[kind]


def conditioned_atol(actual: torch.Tensor, in_dtype: torch.Tensor, expected: torch.Tensor) -> float:
    """The absolute tolerance of a ``"conditioned"`` output ``actual``: the larger of its dtype's
    and twice the largest error of ``in_dtype`` (the reference run in the input's dtype) against
    ``expected`` (float64)."""
    error = (in_dtype.double() - expected.double()).abs().max().item() if expected.numel() else 0.0
    return max(TOL[actual.dtype]["atol"], 2 * error)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, reduce_len: int = 1, **overrides) -> None:
    """Compare ``actual`` (any dtype) with ``expected`` (usually float64) at ``actual``'s tolerance."""
    tol = dict(TOL[actual.dtype])
    tol["atol"] *= max(1, reduce_len)
    tol.update(overrides)
    torch.testing.assert_close(actual.double(), expected.double().to(actual.device), **tol)
