"""ActNorm benchmark: the fused invkernels op against the eager reference and torch.compile of the
reference, float32, forward and forward+backward (input and parameter gradients).

A pytest-benchmark suite (``pytest benchmarks/``); :func:`report` is its part of the report
written by ``benchmarks/run.py``.
"""

from __future__ import annotations

import pytest
import torch

import harness

# The extra_info sections these benchmarks write (report() renders them).
RESULT_SECTIONS = {"actnorm"}

SHAPES = [(16, 64, 32, 32), (64, 64, 64, 64)]
MODES = ("fwd", "fwd+bwd")
CASES = [(shape, mode) for shape in SHAPES for mode in MODES]
GOAL_VS_EAGER = 2.0


def bytes_moved(shape: tuple[int, ...], mode: str) -> int:
    """Minimal DRAM traffic, float32: forward reads x, writes y; backward reads grad_y and x,
    writes grad_x."""
    n = 1
    for d in shape:
        n *= d
    return 4 * (2 * n if mode == "fwd" else 5 * n)


def providers_for(shape, mode, device, backends):
    import invkernels  # noqa: PLC0415
    from invkernels.reference import actnorm as R  # noqa: PLC0415

    x = torch.randn(shape, device=device)
    bias, log_scale = torch.randn(shape[1], device=device), 0.1 * torch.randn(shape[1], device=device)
    fns = {"eager": R.actnorm_fwd, "compile": torch.compile(R.actnorm_fwd)}
    for b in backends:
        fns[b] = lambda *a, b=b: invkernels.ops.actnorm_fwd(*a, backend=b)
    if mode == "fwd":
        return {name: (lambda f=f: f(x, bias, log_scale)) for name, f in fns.items()}
    inputs = [t.clone().requires_grad_() for t in (x, bias, log_scale)]
    gy, gl = torch.randn_like(x), torch.randn(shape[0], device=device)

    def fwd_bwd(f):
        y, logdet = f(*inputs)
        return torch.autograd.grad((y, logdet), inputs, (gy, gl))

    return {name: (lambda f=f: fwd_bwd(f)) for name, f in fns.items()}


@pytest.mark.benchmark(group="actnorm")
@pytest.mark.parametrize(("shape", "mode"), CASES, ids=[f"{'x'.join(map(str, s))}-{m}" for s, m in CASES])
def test_actnorm(benchmark, settings, shape, mode):
    n = bytes_moved(shape, mode)
    harness.interleaved(benchmark, providers_for(shape, mode, settings.device, settings.backends), settings.rounds,
                        harness.reps_for(n), settings.device, section="actnorm", kind="op", op="actnorm",
                        label=str(list(shape)), mode=mode, bytes=n)


def report(res: harness.Results) -> tuple[str, list[str]]:
    """The ActNorm part of the report and its goal verdicts."""
    rows, verdicts = harness.op_rows(res, res.all("actnorm"), "actnorm", lambda e: {"eager": GOAL_VS_EAGER})
    invk = ", ".join(f"`{res.label(b)}` is the fused op (`backend=\"{b}\"`)" for b in res.backends)
    text = f"""## ActNorm ({res.device.upper()}, float32)

`eager` is `invkernels.reference.actnorm_fwd` (`(x + b) * exp(log_scale)` with broadcasting),
`compile` is `torch.compile` of it;
{invk}.
Forward+backward computes the gradients of x, bias and log_scale (the parameter gradients are
per-channel reductions, summed deterministically in float32). GB/s counts the minimal traffic
(forward: read x, write y; backward: read grad_y and x, write grad_x).

{harness.markdown_table(harness.op_header(res), rows)}
"""
    return text, verdicts
