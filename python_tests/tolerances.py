"""One tolerance table, keyed by dtype, for comparisons against the float64 reference.

An output that sums ``n`` terms scales atol by ``n``; :func:`reduction_length` gives ``n`` for each
kind of op output (invkernels.ops._registry.OUTPUT_KINDS): an elementwise output's tolerance does
not depend on the tensor's size.
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
    if kind == "elementwise":
        return 1
    batch, channels = x.shape[0], x.shape[1]
    return {"logdet": x.numel() // max(batch, 1), "param_grad": x.numel() // max(channels, 1),
            "channel_mix": channels, "param_grad_channel_mix": x.numel()}[kind]


def assert_close(actual: torch.Tensor, expected: torch.Tensor, reduce_len: int = 1, **overrides) -> None:
    """Compare ``actual`` (any dtype) with ``expected`` (usually float64) at ``actual``'s tolerance."""
    tol = dict(TOL[actual.dtype])
    tol["atol"] *= max(1, reduce_len)
    tol.update(overrides)
    torch.testing.assert_close(actual.double(), expected.double().to(actual.device), **tol)
