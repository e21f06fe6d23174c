"""ActNorm benchmark: the fused C++ op against the eager reference and torch.compile of the
reference, CPU float32, forward and forward+backward (input and parameter gradients).

Part of ``make bench`` (``benchmarks/run.py``).
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import harness  # noqa: E402

SHAPES = [(16, 64, 32, 32), (64, 64, 64, 64)]


def bytes_moved(shape: tuple[int, ...], mode: str) -> int:
    """Minimal DRAM traffic, float32: forward reads x, writes y; backward reads grad_y and x,
    writes grad_x."""
    n = 1
    for d in shape:
        n *= d
    return 4 * (2 * n if mode == "fwd" else 5 * n)


def providers_for(shape, mode):
    import invkernels  # noqa: PLC0415
    from invkernels.reference import actnorm as R  # noqa: PLC0415

    x = torch.randn(shape)
    bias, log_scale = torch.randn(shape[1]), 0.1 * torch.randn(shape[1])
    fns = {
        "eager": R.actnorm_fwd,
        "compile": torch.compile(R.actnorm_fwd),
        "invkernels": lambda *a: invkernels.ops.actnorm_fwd(*a, backend="cpp"),
    }
    if mode == "fwd":
        return {name: (lambda f=f: f(x, bias, log_scale)) for name, f in fns.items()}
    inputs = [t.clone().requires_grad_() for t in (x, bias, log_scale)]
    gy, gl = torch.randn_like(x), torch.randn(shape[0])

    def fwd_bwd(f):
        y, logdet = f(*inputs)
        return torch.autograd.grad((y, logdet), inputs, (gy, gl))

    return {name: (lambda f=f: fwd_bwd(f)) for name, f in fns.items()}


def section(rounds: int, threads: int, meta: dict[str, str]) -> tuple[str, list[list[str]], list[str]]:
    """The ActNorm part of docs/performance.md, its CSV rows and goal verdicts."""
    cases = [harness.Case(str(list(shape)), mode, providers_for(shape, mode), bytes_moved(shape, mode),
                          goal_vs_eager=2.0)
             for shape in SHAPES for mode in ("fwd", "fwd+bwd")]
    rows, csv_rows, verdicts = harness.run_cases(cases, rounds, meta, "actnorm")
    text = f"""## ActNorm (CPU, float32)

`eager` is `invkernels.reference.actnorm_fwd` (`(x + b) * exp(log_scale)` with broadcasting),
`compile` is `torch.compile` of it, `invkernels` the fused C++ op. Forward+backward computes the
gradients of x, bias and log_scale (the parameter gradients are per-channel reductions, summed
deterministically in float32). GB/s counts the minimal traffic (forward: read x, write y;
backward: read grad_y and x, write grad_x).

{harness.markdown_table(harness.HEADER, rows)}
"""
    return text, csv_rows, verdicts
