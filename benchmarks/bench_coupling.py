"""Affine coupling benchmark: the fused C++ op against the eager reference and torch.compile of
the reference, CPU float32, forward and forward+backward, in one process.

Run: ``make bench`` (or ``python benchmarks/bench_coupling.py --write docs/performance.md``).
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import harness  # noqa: E402

SHAPES = [(16, 32, 32, 32), (64, 64, 64, 64)]
PROVIDERS = ("eager", "compile", "invkernels")


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--write", metavar="MARKDOWN", help="write the report (e.g. docs/performance.md)")
    parser.add_argument("--csv", default=os.path.join(os.path.dirname(__file__), "results", "coupling.csv"))
    args = parser.parse_args()
    harness.ensure_allocator_env()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    import invkernels  # noqa: PLC0415

    machine = harness.machine_description()
    bandwidth = harness.copy_bandwidth_gbs()
    rows, csv_rows, verdicts = [], [], []
    for shape in SHAPES:
        reps = 10 if shape[0] * shape[1] * shape[2] * shape[3] < 4e6 else 2
        for mode in ("fwd", "fwd+bwd"):
            t = harness.measure(providers_for(shape, mode), rounds=args.rounds, reps=reps)
            e, c, k = (t[p].median for p in PROVIDERS)
            gbs = {p: bytes_moved(shape, mode) / (t[p].median * 1e-3) / 1e9 for p in PROVIDERS}
            rows.append([str(list(shape)), mode] + [harness.fmt_ms(t[p]) for p in PROVIDERS]
                        + [f"{e / k:.2f}x", f"{c / k:.2f}x", f"{gbs['invkernels']:.1f} (eager {gbs['eager']:.1f}, "
                                                              f"compile {gbs['compile']:.1f})"])
            csv_rows += [[machine["date"], machine["cpu"], machine["torch"], machine["commit"], str(list(shape)), mode,
                          p, f"{t[p].median:.4f}", f"{t[p].quantile(0.2):.4f}", f"{t[p].quantile(0.8):.4f}"]
                         for p in PROVIDERS]
            need_e, need_c = (2.0, 1.0) if mode == "fwd" else (2.0, 1.2)
            ok = e / k >= need_e and c / k >= need_c
            verdicts.append(f"- {list(shape)} {mode}: {e / k:.2f}x eager (goal ≥ {need_e}x), {c / k:.2f}x "
                            f"torch.compile (goal ≥ {need_c}x): {'met' if ok else 'NOT met'}")
            print(" | ".join(rows[-1]), flush=True)
    caps = capability_rows(args.threads)
    table = harness.markdown_table(
        ["shape", "mode", "eager ms", "torch.compile ms", "invkernels ms", "vs eager", "vs compile",
         "invkernels GB/s"], rows)
    cap_table = harness.markdown_table(["capability", "library loaded", "fused fwd ms [16,32,32,32]"], caps)
    report = f"""# Performance

Written by `benchmarks/bench_coupling.py` (`make bench`); every number below comes from one run.

- Date: {machine['date']}
- Machine: {machine['cpu']}
- torch {machine['torch']}, invkernels commit {machine['commit']}, CPU kernels `{invkernels.build_info()['cpu_library']}`
- Allocator: `MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=4294967296` for every provider
- Measured copy bandwidth (torch copy of 256 MiB, read + write): **{bandwidth:.1f} GB/s**

## Affine coupling (CPU, float32, scale="exp")

Median ms over {args.rounds} interleaved rounds (p20–p80 in parentheses). `eager` is
`invkernels.reference.affine_coupling_fwd` (chunk, tanh, exp, cat, sum), `compile` is
`torch.compile` of it, `invkernels` the fused C++ op (`backend="cpp"`). Forward+backward is one
forward and `torch.autograd.grad` for x and h. GB/s counts the minimal traffic (forward: read x and
h, write y; backward: read grad_y, x2 and h, write grad_x and grad_h) over the median time.

{table}

Against the goals of issue 2:
{chr(10).join(verdicts)}

## Which CPU vector path runs

The CPU kernels are built once per capability; each row runs in its own process with
`ATEN_CPU_CAPABILITY` set, so it loads that build (median of 60 forward calls, [16, 32, 32, 32]).

{cap_table}

No GPU timings: no GPU was available where this report was produced.
"""
    print(report)
    if args.write:
        with open(args.write, "w", encoding="utf-8") as f:
            f.write(report)
    os.makedirs(os.path.dirname(args.csv), exist_ok=True)
    new = not os.path.exists(args.csv)
    with open(args.csv, "a", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        if new:
            w.writerow(["date", "machine", "torch", "commit", "shape", "mode", "provider", "median_ms", "p20_ms",
                        "p80_ms"])
        w.writerows(csv_rows)


if __name__ == "__main__":
    main()
