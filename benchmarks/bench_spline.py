"""Rational-quadratic spline benchmark: the fused invkernels op against nflows'
``unconstrained_rational_quadratic_spline(..., tails="linear")`` (what nflows, sbi and most neural
spline flows run) eager and under torch.compile, float32, 8 bins, forward and forward+backward
(gradients of x and of the raw parameters h). nflows is a test extra (``pip install --no-deps
nflows``); without it the rows have the invkernels columns alone.

A pytest-benchmark suite (``pytest benchmarks/``); :func:`report` is its part of the report
written by ``benchmarks/run.py``.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

import harness

RESULT_SECTIONS = {"spline"}

SHAPES = [(4096, 8), (16, 16, 32, 32)]
MODES = ("fwd", "fwd+bwd")
CASES = [(shape, mode) for shape in SHAPES for mode in MODES]
BINS = 8
TAIL_BOUND = 3.0
GOALS = {"fwd": {"eager": 15.0, "compile": 5.0}, "fwd+bwd": {"eager": 10.0, "compile": 4.0}}


def numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def bytes_moved(shape: tuple[int, ...], mode: str) -> int:
    """Minimal DRAM traffic, float32, with ``P = 3 * bins - 1`` raw parameters per element: the
    forward reads x and h and writes y (the log-det is one value per sample); the backward reads
    grad_y, x and h and writes grad_x and grad_h."""
    n, p = numel(shape), 3 * BINS - 1
    forward = n * (2 + p)
    return 4 * (forward if mode == "fwd" else forward + n * (3 + 2 * p))


def nflows_spline():
    """nflows' spline in this package's layout ``(x, h) -> (y, logdet [B])``, or None without nflows."""
    if importlib.util.find_spec("nflows") is None:
        return None
    from nflows.transforms.splines.rational_quadratic import (  # noqa: PLC0415
        unconstrained_rational_quadratic_spline,
    )

    def run(x, h):
        p = h.unflatten(1, (x.shape[1], 3 * BINS - 1)).movedim(2, -1)
        y, lad = unconstrained_rational_quadratic_spline(x, p[..., :BINS], p[..., BINS:2 * BINS], p[..., 2 * BINS:],
                                                         tails="linear", tail_bound=TAIL_BOUND)
        return y, lad.flatten(1).sum(1)

    return run


def providers_for(shape, mode, device, backends):
    import invkernels  # noqa: PLC0415

    x = torch.randn(shape, device=device)
    h = torch.randn(shape[0], shape[1] * (3 * BINS - 1), *shape[2:], device=device)
    fns = {}
    reference = nflows_spline()
    if reference is not None:
        fns["eager"], fns["compile"] = reference, torch.compile(reference)
    for b in backends:
        fns[b] = lambda a, p, b=b: invkernels.ops.rq_spline_fwd(a, p, BINS, TAIL_BOUND, backend=b)
    if mode == "fwd":
        return {name: (lambda f=f: f(x, h)) for name, f in fns.items()}
    inputs = [t.clone().requires_grad_() for t in (x, h)]
    gy, gl = torch.randn_like(x), torch.randn(shape[0], device=device)

    def fwd_bwd(f):
        y, logdet = f(*inputs)
        return torch.autograd.grad((y, logdet), inputs, (gy, gl))

    return {name: (lambda f=f: fwd_bwd(f)) for name, f in fns.items()}


@pytest.mark.benchmark(group="spline")
@pytest.mark.parametrize(("shape", "mode"), CASES, ids=[f"{'x'.join(map(str, s))}-{m}" for s, m in CASES])
def test_spline(benchmark, settings, shape, mode):
    n = bytes_moved(shape, mode)
    missing = [] if nflows_spline() is not None else ["nflows"]
    harness.interleaved(benchmark, providers_for(shape, mode, settings.device, settings.backends), settings.rounds,
                        harness.reps_for(n), settings.device, section="spline", kind="op", op="rq_spline_fwd",
                        label=str(list(shape)), mode=mode, bytes=n, missing=missing)


def report(res: harness.Results) -> tuple[str, list[str]]:
    """The spline part of the report and its goal verdicts."""
    rows, verdicts = harness.op_rows(res, res.all("spline"), "rq_spline", lambda e: GOALS[e["mode"]])
    invk = ", ".join(f"`{res.label(b)}` is the fused op (`backend=\"{b}\"`)" for b in res.backends)
    text = f"""## Rational-quadratic spline ({res.device.upper()}, float32, {BINS} bins)

`eager` is nflows' `unconstrained_rational_quadratic_spline(..., tails="linear")` (nflows 0.14, the
spline of nflows, sbi and most neural spline flows), `compile` is `torch.compile` of it; {invk}.
Raw parameters of standard deviation 1, tail bound {TAIL_BOUND:g}. Forward+backward computes the
gradients of x and of the raw parameters h. GB/s counts the minimal traffic with
`P = 3 · bins − 1 = {3 * BINS - 1}` raw parameters per element (forward: read x and h, write y;
backward: read grad_y, x and h, write grad_x and grad_h).

{harness.markdown_table(harness.op_header(res), rows)}
"""
    return text, verdicts
