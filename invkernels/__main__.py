"""Command line: ``python -m invkernels {demo,invert,check,bench}``.

- ``demo`` (or ``demo glow``): trains a memory-free Glow on scikit-learn's digits and reports test
  bits/dim, a Gaussian baseline, anomaly-detection AUROCs and the round-trip error
  (invkernels/demo.py).
- ``demo spline``: fits a neural spline flow to scikit-learn's two moons and draws the data, the
  learned 2-D density and samples in one PNG, with train/test log-likelihoods next to a Gaussian
  (invkernels/spline_demo.py).
- ``invert``: inverts test digits from each depth of a small CNN by optimization and by a decoder,
  next to exactly invertible models (invkernels/invert_demo.py).
- ``check``: prints the build and runs a quick round trip and gradient check on every backend and
  device available; exits 1 if any fails.
- ``bench``: runs the benchmarks of a source checkout and writes docs/performance.md and plots.

Bad arguments (numbers out of range, an ``--out`` that cannot take the files, ``demo --backend
triton`` without a GPU or the interpreter, an option of one demo given to the other: ``--epochs``
is Glow's, ``--steps`` the spline demo's) are usage errors with exit code 2, found before
anything runs. ``demo`` exits with 1 when a file could not be written after training; it is
saved to a temporary directory instead, and the message says where.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys


def _set_threads(threads: int) -> None:
    import torch  # noqa: PLC0415

    if threads:
        torch.set_num_threads(threads)


def _demo(args: argparse.Namespace) -> int:
    _set_threads(args.threads)
    if args.model == "spline":
        from invkernels import spline_demo as module  # noqa: PLC0415

        settings = {} if args.steps is None else {"steps": args.steps}
        cfg = module.SplineDemoConfig(**settings, seed=args.seed, backend=args.backend, out_dir=args.out)
    else:
        from invkernels import demo as module  # noqa: PLC0415

        settings = {} if args.epochs is None else {"epochs": args.epochs}
        cfg = module.DemoConfig(**settings, seed=args.seed, backend=args.backend, out_dir=args.out)
    results = module.run(cfg, progress=not args.no_progress)
    print(module.report(results))
    failures = results["write_failures"]
    if failures:
        print(f"demo: {len(failures)} file(s) could not be written to {args.out!r}; the finished work was saved "
              f"instead to {os.path.dirname(failures[0]['saved_to'])}", file=sys.stderr)
        for f in failures:
            print(f"  {f['file']}: {f['error']} -> saved to {f['saved_to']}", file=sys.stderr)
        return 1
    return 0


def _invert(args: argparse.Namespace) -> int:
    from invkernels import invert_demo  # noqa: PLC0415

    _set_threads(args.threads)
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


# How ``check`` names the keys of ``invkernels.build_info()`` whose bare names are ambiguous
# (the others are printed with spaces for underscores).
_BUILD_INFO_LABELS = {
    "cpu": "cpu backend built",
    "cuda": "cuda backend built",
    "cuda_archs": "cuda archs built",
    "cuda_available": "cuda available (a GPU is visible now)",
}


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
        print(f"{_BUILD_INFO_LABELS.get(key, key.replace('_', ' '))}: {value}")
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
    if args.rounds is not None:
        cmd += ["--rounds", str(args.rounds)]
    return subprocess.call(cmd)


def _integer(minimum: int, maximum: int | None = None, note: str = ""):
    """An argparse ``type``: an integer in ``[minimum, maximum]``, else a usage error (exit 2)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"should be an integer, got {text!r}") from None
        if value < minimum or (maximum is not None and value > maximum):
            bound = f">= {minimum}" if maximum is None else f"between {minimum} and {maximum}"
            raise argparse.ArgumentTypeError(f"should be {bound}{note}, got {value}")
        return value

    return parse


def _directory(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError(f"should be a directory path, got {text!r}")
    return text


# The most torch threads ``--threads`` takes per logical CPU (docs/models.md states it).
THREADS_PER_CPU = 4


def _threads(text: str) -> int:
    cpus = os.cpu_count() or 1
    note = f" (0: torch's default; at most {THREADS_PER_CPU} per logical CPU, {cpus} here)"
    return _integer(0, THREADS_PER_CPU * cpus, note)(text)


# sklearn's train_test_split takes seeds in [0, 2**32 - 1].
_seed = _integer(0, 2**32 - 1)


def _check_demo(args: argparse.Namespace) -> None:
    """Usage errors of ``demo`` found before anything runs."""
    # Each demo's length option is its own; the other demo would silently ignore it.
    for option, value, owner in (("--epochs", args.epochs, "glow"), ("--steps", args.steps, "spline")):
        if value is not None and args.model != owner:
            args.parser.error(f"argument {option}: only demo {owner} takes it, got {value} for demo {args.model}")
    if args.backend == "triton" and os.environ.get("TRITON_INTERPRET") != "1":
        import torch  # noqa: PLC0415

        why = ("the demo runs on CPU tensors, and the Triton kernels run on CPU tensors only under the Triton "
               "interpreter" if torch.cuda.is_available() else
               "this machine has no CUDA GPU, and without one the Triton kernels run only under the Triton "
               "interpreter")
        args.parser.error(f"--backend triton: {why}, which is far too slow for the demo; use --backend cpp "
                          f"(or reference), or set TRITON_INTERPRET=1 to run it through the interpreter anyway")


# What invert_demo.run writes into its output directory.
_INVERT_OUTPUTS = ("inversions.png", "results.json")


def build_parser() -> argparse.ArgumentParser:
    """The command line's parser: one subparser per command, each setting ``run`` (and ``parser``
    for the commands whose arguments are checked further before they run)."""
    parser = argparse.ArgumentParser(prog="python -m invkernels", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    threads_help = f"torch threads, at most {THREADS_PER_CPU} per logical CPU (default 0: torch's choice)"
    demo_parser = sub.add_parser("demo", help="train a memory-free Glow on scikit-learn's digits (demo spline: "
                                              "a neural spline flow's 2-D density of two moons)")
    demo_parser.add_argument("model", nargs="?", choices=["glow", "spline"], default="glow",
                             help="glow (default): Glow on digits; spline: NeuralSplineFlow on two moons")
    demo_parser.add_argument("--epochs", type=_integer(1), default=None, help="demo glow: training epochs (default 40)")
    demo_parser.add_argument("--steps", type=_integer(1), default=None,
                             help="demo spline: training steps (default 1000)")
    demo_parser.add_argument("--seed", type=_seed, default=0)
    demo_parser.add_argument("--backend", choices=["cpp", "triton", "reference"], default="cpp")
    demo_parser.add_argument("--out", type=_directory, default="demo_output",
                             help="directory for the output files (glow: PNGs, checkpoint and results.json; spline: "
                                  "spline_moons.png and spline_results.json)")
    demo_parser.add_argument("--threads", type=_threads, default=0, help=threads_help)
    demo_parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    demo_parser.set_defaults(run=_demo, parser=demo_parser)
    invert_parser = sub.add_parser("invert", help="invert a CNN's layers on digits (optimization and decoder)")
    invert_parser.add_argument("--seed", type=_seed, default=0)
    invert_parser.add_argument("--out", type=_directory, default="invert_output",
                               help="directory for the PNG and results.json")
    invert_parser.add_argument("--threads", type=_threads, default=0, help=threads_help)
    invert_parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    invert_parser.set_defaults(run=_invert, parser=invert_parser)
    check_parser = sub.add_parser("check", help="build info and a quick round-trip and gradient check of every backend")
    check_parser.set_defaults(run=_check)
    bench_parser = sub.add_parser("bench", help="run the benchmarks (source checkout) and write docs/performance.md")
    bench_parser.add_argument("--rounds", type=_integer(1), default=None,
                              help="timing rounds per benchmark (default: the benchmarks' own)")
    bench_parser.set_defaults(run=_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Runs the command line; returns the exit code (argparse exits with 2 for bad arguments)."""
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        _check_demo(args)
    if args.command in ("demo", "invert"):
        from invkernels import demo, spline_demo  # noqa: PLC0415

        if args.command == "invert":
            outputs = _INVERT_OUTPUTS
        else:
            outputs = (spline_demo.OUTPUT_FILES if args.model == "spline" else demo.OUTPUT_FILES).values()
        try:
            demo.check_out_dir("--out", args.out, outputs)
        except ValueError as e:
            args.parser.error(str(e))
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
