"""Command line: ``python -m invkernels {demo,invert,check,bench}``.

- ``demo``: trains a memory-free Glow on scikit-learn's digits and reports test bits/dim, a
  Gaussian baseline, anomaly-detection AUROCs and the round-trip error (invkernels/demo.py).
- ``invert``: inverts test digits from each depth of a small CNN by optimization and by a decoder,
  next to exactly invertible models (invkernels/invert_demo.py).
- ``check``: prints the build and runs a quick round trip and gradient check on every backend and
  device available; exits 1 if any fails.
- ``bench``: runs the benchmarks of a source checkout and writes docs/performance.md and plots.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys


def _demo(args: argparse.Namespace) -> int:
    import torch  # noqa: PLC0415

    from invkernels import demo  # noqa: PLC0415

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = demo.DemoConfig(epochs=args.epochs, seed=args.seed, backend=args.backend, out_dir=args.out)
    results = demo.run(cfg, progress=not args.no_progress)
    print(demo.report(results))
    return 0


def _invert(args: argparse.Namespace) -> int:
    import torch  # noqa: PLC0415

    from invkernels import invert_demo  # noqa: PLC0415

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = invert_demo.InvertDemoConfig(seed=args.seed, out_dir=args.out)
    print(invert_demo.report(invert_demo.run(cfg, progress=not args.no_progress)))
    return 0


def _check_backend(backend: str, device: str) -> tuple[float, float]:
    """(round-trip error, largest relative gradient difference memory-free vs plain autograd) of a
    small chain of every block type in float64."""
    import torch  # noqa: PLC0415

    from invkernels.nn import (  # noqa: PLC0415
        ActNorm,
        AdditiveCoupling,
        AffineCoupling,
        GlowStep,
        InvConv1x1,
        InvertibleSequential,
    )

    torch.manual_seed(0)
    model = InvertibleSequential(
        ActNorm(4, backend=backend), InvConv1x1(4, backend=backend),
        AffineCoupling(4, "conv", hidden=8, backend=backend),
        AdditiveCoupling(4, "conv", hidden=8, backend=backend),
        GlowStep(4, hidden=8, scale="sigmoid", backend=backend)).to(device=device, dtype=torch.float64)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64, device=device, requires_grad=True)
    model(x)
    model.eval()
    with torch.no_grad():
        y, _ = model(x)
        round_trip = ((model.inverse(y) - x).norm() / x.norm()).item()
    model.train()
    grads = {}
    for memory_free in (True, False):
        model.memory_free = memory_free
        out, logdet = model(x)
        grads[memory_free] = torch.autograd.grad(out.square().sum() + logdet.sum(), [x, *model.parameters()])
    diff = max(((a - b).norm() / b.norm().clamp_min(1e-300)).item() for a, b in zip(grads[True], grads[False]))
    return round_trip, diff


def _check(args: argparse.Namespace) -> int:
    import torch  # noqa: PLC0415

    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        # Triton kernels run on CPU tensors only under its interpreter, which must be chosen
        # before triton is imported: run the check again in a process that has it.
        env = dict(os.environ, TRITON_INTERPRET="1")
        return subprocess.call([sys.executable, "-m", "invkernels", "check"], env=env)
    import invkernels  # noqa: PLC0415

    info = invkernels.build_info()
    for key, value in info.items():
        print(f"{key}: {value}")
    runs = [("cpp", "cpu"), ("triton", "cpu"), ("reference", "cpu")]
    if torch.cuda.is_available() and info.get("cuda"):
        runs += [("cpp", "cuda"), ("triton", "cuda")]
    failed = 0
    print("backend    device  round-trip error  grad difference (memory-free vs autograd)  result")
    for backend, device in runs:
        try:
            err, diff = _check_backend(backend, device)
            ok = err < 1e-10 and diff < 1e-9
            line = f"{err:16.2e}  {diff:41.2e}  {'ok' if ok else 'FAILED'}"
        except Exception as e:  # noqa: BLE001 -- every failure is reported, then the exit code says it
            ok, line = False, f"FAILED: {type(e).__name__}: {e}"
        failed += not ok
        print(f"{backend:10s} {device:6s}  {line}")
    print("all checks passed" if not failed else f"{failed} check(s) failed")
    return 0 if not failed else 1


def _bench(args: argparse.Namespace) -> int:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = os.path.join(root, "benchmarks", "run.py")
    if not os.path.exists(script):
        print(f"bench: {script} not found; the benchmarks ship with the source checkout, not the wheel",
              file=sys.stderr)
        return 2
    cmd = [sys.executable, script, "--write", os.path.join(root, "docs", "performance.md"),
           "--plots", os.path.join(root, "docs", "plots")]
    if args.rounds:
        cmd += ["--rounds", str(args.rounds)]
    return subprocess.call(cmd)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m invkernels", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train a memory-free Glow on scikit-learn's digits")
    demo.add_argument("--epochs", type=int, default=40, help="training epochs (default 40)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--backend", choices=["cpp", "triton", "reference"], default="cpp")
    demo.add_argument("--out", default="demo_output", help="directory for the PNGs, checkpoint and results.json")
    demo.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    demo.add_argument("--no-progress", action="store_true", help="no progress bar")
    demo.set_defaults(run=_demo)
    invert = sub.add_parser("invert", help="invert a CNN's layers on digits (optimization and decoder)")
    invert.add_argument("--seed", type=int, default=0)
    invert.add_argument("--out", default="invert_output", help="directory for the PNG and results.json")
    invert.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    invert.add_argument("--no-progress", action="store_true", help="no progress bars")
    invert.set_defaults(run=_invert)
    check = sub.add_parser("check", help="build info and a quick round-trip and gradient check of every backend")
    check.set_defaults(run=_check)
    bench = sub.add_parser("bench", help="run the benchmarks (source checkout) and write docs/performance.md")
    bench.add_argument("--rounds", type=int, default=0)
    bench.set_defaults(run=_bench)
    args = parser.parse_args(argv)
    if getattr(args, "epochs", 1) < 1:
        parser.error(f"--epochs should be >= 1, got {args.epochs}")
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
