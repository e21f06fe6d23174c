"""One tolerance table, keyed by dtype, for comparisons against the float64 reference.

Reductions (the per-sample log-det, which sums ``n`` terms) scale atol by ``n``.
"""

import torch

TOL = {
    torch.float64: {"atol": 1e-10, "rtol": 1e-10},
    torch.float32: {"atol": 2e-6, "rtol": 2e-5},
    torch.bfloat16: {"atol": 2e-2, "rtol": 2e-2},
    torch.float16: {"atol": 2e-3, "rtol": 2e-3},
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, reduce_len: int = 1, **overrides) -> None:
    """Compare ``actual`` (any dtype) with ``expected`` (usually float64) at ``actual``'s tolerance."""
    tol = dict(TOL[actual.dtype])
    tol["atol"] *= max(1, reduce_len)
    tol.update(overrides)
    torch.testing.assert_close(actual.double(), expected.double().to(actual.device), **tol)
