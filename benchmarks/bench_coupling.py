"""Affine coupling benchmark: the fused C++ op against the eager reference and torch.compile of
the reference, CPU float32, forward and forward+backward, in one process.

Part of ``make bench`` (``benchmarks/run.py``).
"""

from __future__ import annotations

import os
import subprocess
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import harness  # noqa: E402

SHAPES = [(16, 32, 32, 32), (64, 64, 64, 64)]


def bytes_moved(shape: tuple[int, ...], mode: str) -> int:
    """Minimal DRAM traffic, float32: forward reads x, h and writes y; backward reads grad_y, x2,
    h and writes grad_x, grad_h."""
    n = 1
    for d in shape:
        n *= d
    c2 = shape[1] - shape[1] // 2
    n2 = n // shape[1] * c2
    fwd = n + 2 * n2 + n
    bwd = n + n2 + 2 * n2 + n + 2 * n2
    return 4 * (fwd if mode == "fwd" else fwd + bwd)


def providers_for(shape, mode):
    import invkernels  # noqa: PLC0415
    from invkernels.reference import coupling as R  # noqa: PLC0415

    x = torch.randn(shape)
    c2 = shape[1] - shape[1] // 2
    h = torch.randn((shape[0], 2 * c2, *shape[2:]))
    fns = {
        "eager": R.affine_coupling_fwd,
        "compile": torch.compile(R.affine_coupling_fwd),
        "invkernels": lambda a, b: invkernels.ops.affine_coupling_fwd(a, b, backend="cpp"),
    }
    if mode == "fwd":
        return {name: (lambda f=f: f(x, h)) for name, f in fns.items()}
    xr, hr = x.clone().requires_grad_(), h.clone().requires_grad_()
    gy, gl = torch.randn_like(x), torch.randn(shape[0])

    def fwd_bwd(f):
        y, logdet = f(xr, hr)
        return torch.autograd.grad((y, logdet), (xr, hr), (gy, gl))

    return {name: (lambda f=f: fwd_bwd(f)) for name, f in fns.items()}


CAPABILITY_SCRIPT = """
import sys, torch, invkernels
sys.path.insert(0, {bench_dir!r})
import harness
torch.set_num_threads({threads})
x = torch.randn({shape}); h = torch.randn({shape})
t = harness.measure({{"f": lambda: torch.ops.invkernels.affine_coupling_fwd(x, h, "exp", 2.0)}}, rounds=1, reps=60)
print(invkernels.build_info()["cpu_library"].split(".")[0], t["f"].median)
"""


def capability_rows(threads: int) -> list[list[str]]:
    """Forward time of each CPU-capability build, each in its own process: shows which vector
    path runs and what it is worth."""
    rows = []
    native = torch.backends.cpu.get_cpu_capability()
    order = ["DEFAULT", "AVX2", "AVX512"]
    for cap in order[: order.index(native) + 1] if native in order else ["DEFAULT"]:
        script = CAPABILITY_SCRIPT.format(bench_dir=os.path.dirname(os.path.abspath(__file__)), threads=threads,
                                          shape=SHAPES[0])
        out = subprocess.run([sys.executable, "-c", script], env=dict(os.environ, ATEN_CPU_CAPABILITY=cap.lower()),
                             capture_output=True, text=True, check=True).stdout.split()
        rows.append([cap, out[0], f"{float(out[1]):.3f}"])
    return rows


def section(rounds: int, threads: int, meta: dict[str, str]) -> tuple[str, list[list[str]], list[str]]:
    """The coupling part of docs/performance.md, its CSV rows and goal verdicts."""
    cases = []
    for shape in SHAPES:
        for mode in ("fwd", "fwd+bwd"):
            goal_compile = 1.0 if mode == "fwd" else 1.2
            cases.append(harness.Case(str(list(shape)), mode, providers_for(shape, mode), bytes_moved(shape, mode),
                                      goal_vs_eager=2.0, goal_vs_compile=goal_compile))
    rows, csv_rows, verdicts = harness.run_cases(cases, rounds, meta, "affine_coupling")
    caps = capability_rows(threads)
    text = f"""## Affine coupling (CPU, float32, scale="exp")

`eager` is `invkernels.reference.affine_coupling_fwd` (chunk, tanh, exp, cat, sum), `compile` is
`torch.compile` of it, `invkernels` the fused C++ op (`backend="cpp"`). Forward+backward is one
forward and `torch.autograd.grad` for x and h. GB/s counts the minimal traffic (forward: read x and
h, write y; backward: read grad_y, x2 and h, write grad_x and grad_h) over the median time.

{harness.markdown_table(harness.HEADER, rows)}

### Which CPU vector path runs

The CPU kernels are built once per capability; each row runs in its own process with
`ATEN_CPU_CAPABILITY` set, so it loads that build (median of 60 forward calls, [16, 32, 32, 32]).

{harness.markdown_table(["capability", "library loaded", "fused fwd ms [16,32,32,32]"], caps)}
"""
    return text, csv_rows, verdicts
