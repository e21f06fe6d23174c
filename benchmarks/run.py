"""Runs the benchmarks (``pytest benchmarks/``, pytest-benchmark JSON) and writes the report from
that JSON: docs/performance.md (``make bench``) or, with ``--device cuda``, docs/performance-gpu.md.

``--from-json PATH`` writes the report from the JSON of an earlier run
(``pytest benchmarks/ --benchmark-json PATH``) instead of running the benchmarks.
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys

import bench_actnorm
import bench_bandwidth
import bench_coupling
import bench_glow
import bench_import
import bench_memory
import bench_network
import bench_overhead
import bench_spline
import bench_tabular
import harness

SECTIONS = {"coupling": bench_coupling, "actnorm": bench_actnorm, "spline": bench_spline, "glow": bench_glow,
            "memory": bench_memory, "network": bench_network, "tabular": bench_tabular,
            "overhead": bench_overhead, "import": bench_import}
ROOT = os.path.dirname(harness.BENCH_DIR)


def run_benchmarks(args: argparse.Namespace, json_path: str) -> int:
    """``pytest`` over the chosen sections (and the copy bandwidth), writing ``json_path``."""
    files = [bench_bandwidth.__file__] + [SECTIONS[name].__file__ for name in args.only or SECTIONS]
    os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
    cmd = [sys.executable, "-m", "pytest", *files, "-v", f"--benchmark-json={json_path}",
           "--benchmark-columns=median,iqr,rounds", "--bench-device", args.device, "--bench-rounds", str(args.rounds),
           "--bench-threads", str(args.threads)]
    print(" ".join(cmd), flush=True)
    return subprocess.call(cmd, cwd=ROOT, env=dict(os.environ, **harness.ALLOCATOR_ENV))


def header(res: harness.Results) -> str:
    """The report's first part: where and how it was measured."""
    m = res.meta
    on_gpu = res.device == "cuda"
    providers = ["`eager` (the pure-PyTorch reference, `invkernels.reference`)", "`compile` (`torch.compile` of it)"]
    providers += [f"`{res.label(b)}` (`backend=\"{b}\"`)" for b in res.backends]
    not_timed = "; ".join(f"`{res.label(b)}`: {why}" for b, why in m["not_timed"].items())
    allocator = ("`MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=4294967296` for every provider"
                 if m["allocator_env"] else "glibc's defaults (the allocator settings were not in effect)")
    lines = [
        f"- Date: {m['date']}",
        f"- Machine: {m['machine']}",
        f"- Device: {m['device_description']}"
        + (f", peak DRAM bandwidth {m['peak_bandwidth_gbs']:.0f} GB/s (memory clock × bus width, "
           "`triton.testing.get_dram_gbps`)" if on_gpu else ""),
        f"- torch {m['torch']}, triton {m['triton'] or 'not installed'}, invkernels commit {res.commit}, "
        f"CPU kernels `{m['cpu_library']}`, CUDA backend {'built' if m['cuda_build'] else 'not built'}",
        f"- Providers: {', '.join(providers)}" + (f". Not timed: {not_timed}" if not_timed else ""),
        f"- Allocator: {allocator}",
        f"- Measured copy bandwidth (torch copy of {bench_bandwidth.COPY_MIB} MiB, read + write): "
        f"**{bench_bandwidth.copy_bandwidth_gbs(res):.1f} GB/s**",
    ]
    if on_gpu:
        lines.append(f"- Times: CUDA-event times from `triton.testing.do_bench` (L2 cache cleared before every call, "
                     f"about {harness.CUDA_REP_MS} ms of calls per provider per round), median ms over "
                     f"{m['rounds']} interleaved rounds, p20–p80 in parentheses; ratios are\n  provider time / "
                     "invkernels time from the same run; GB/s also as % of the device's peak.")
    else:
        lines.append(f"- Times: median ms over {m['rounds']} interleaved rounds, p20–p80 in parentheses; ratios are\n"
                     "  provider time / invkernels time from the same run.")
    reps = (f"{harness.reps_for(0)} timed calls each, {harness.reps_for(harness.SMALL_CASE_BYTES)} for cases moving "
            "64 MiB or more")
    how = f"""Each table row is one pytest-benchmark test in `benchmarks/bench_*.py` (`pytest benchmarks/
--benchmark-json PATH`; this report is written from that JSON). A test builds the same work for
every provider, calls each 3 times untimed, then its `benchmark.pedantic` rounds run every provider
in turn ({reps if not on_gpu else '`triton.testing.do_bench` each'}), the order rotated by one
provider per round, so the providers of a row share one process and the same machine state. The
per-call times of every provider are in the test's `extra_info` in the JSON; pytest-benchmark's
own statistics there are the time of a whole round. The memory section's peak-RSS probes and its
K = 8 timing run in processes of their own."""
    return "\n".join(lines) + "\n\n" + how


def failures(res: harness.Results) -> str:
    """The benchmarks that failed in the run and their errors (empty when none did)."""
    failed = res.meta.get("failed", {})
    if not failed:
        return ""
    lines = "\n".join(f"- `{name}`: {why}" for name, why in failed.items())
    return f"""## Benchmarks that failed

These tests failed; a failed provider's cells read "failed", the others of its row were timed.

{lines}

"""


def device_note(res: harness.Results) -> str:
    """What the run found about GPUs, for the end of the report."""
    m = res.meta
    if res.device == "cuda":
        return f"GPU timings on {m['device_description']}; the CPU timings are in docs/performance.md (`make bench`)."
    if m["cuda_visible"]:
        return (f"A CUDA device ({m['visible_gpu']}) was visible; this report times the CPU. "
                "`benchmarks/run.py --device cuda` (`make gpu-check`) times the GPU.")
    return "No CUDA device was visible where this report was produced: it has CPU timings only."


README_MARKERS = ("<!-- performance-summary: start (benchmarks/run.py --readme writes this) -->",
                  "<!-- performance-summary: end -->")


def summary(res: harness.Results, verdicts: list[str]) -> str:
    """Every goal of the run in one table (what was measured, against which goal, met or not),
    dated and with the machine named, and what ran on a GPU."""
    rows = []
    for line in verdicts:
        what, _, status = line.removeprefix("- ").rpartition(": ")
        rows.append([what, "met" if status == "met" else f"**{status}**"])
    met = sum(row[1] == "met" for row in rows)
    gpu = ("GPU: measured in this run" if res.device == "cuda" else
           "GPU: not measured in this run (`make gpu-check` on a machine with one writes docs/performance-gpu.md)")
    return (f"Measured {res.meta['date']} on {res.meta['machine']}, commit {res.commit}: {met} of {len(rows)} "
            f"goals met. {gpu}.\n\n{harness.markdown_table(['measured (goal)', 'verdict'], rows)}")


def write_readme_summary(path: str, table: str) -> None:
    """Replace what stands between :data:`README_MARKERS` in ``path`` by ``table``."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    start, end = README_MARKERS
    if text.count(start) != 1 or text.count(end) != 1 or text.index(start) > text.index(end):
        raise SystemExit(f"run.py --readme: {path} should hold the markers {start!r} and {end!r} once each, in order")
    head, rest = text.split(start)
    _, tail = rest.split(end)
    with open(path, "w", encoding="utf-8") as f:
        f.write(f"{head}{start}\n{table}\n{end}{tail}")


def write_report(res: harness.Results, args: argparse.Namespace) -> tuple[str, list[str]]:
    """The report, and the goal verdicts it lists."""
    texts, verdicts = [], []
    for module in SECTIONS.values():
        if module.RESULT_SECTIONS & res.sections():
            text, goals = module.report(res)
            texts.append(text)
            verdicts += goals
    title = "# Performance on a GPU" if res.device == "cuda" else "# Performance"
    command = "`benchmarks/run.py --device cuda` (`make gpu-check`)" if res.device == "cuda" else \
        "`benchmarks/run.py` (`make bench`)"
    report = f"""{title}

Written by {command}; every number below comes from one run.

## Summary

{summary(res, verdicts)}

{header(res)}

{(chr(10) * 2).join(texts)}
{failures(res)}{device_note(res)}
"""
    if args.plots:
        suffix = "" if res.device == "cpu" else "-gpu"
        made = []
        if harness.plot_speedups(res, os.path.join(args.plots, f"speedups{suffix}.png")):
            made.append(f"speedups{suffix}.png` (speedups over eager and torch.compile)")
        if bench_memory.plot_memory(res, os.path.join(args.plots, f"memory{suffix}.png")):
            made.append(f"memory{suffix}.png` (memory of memory-free backprop)")
        where = os.path.relpath(args.plots, os.path.dirname(os.path.abspath(args.write))) if args.write else args.plots
        if made:
            report += "\nPlots: " + " and ".join(f"`{where}/{m}" for m in made) + ".\n"
    return report, verdicts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=harness.DEVICES, default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--only", choices=sorted(SECTIONS), action="append", help="run only these sections")
    parser.add_argument("--write", metavar="MARKDOWN", help="write the report (e.g. docs/performance.md)")
    parser.add_argument("--plots", metavar="DIR", help="write PNG plots of the results to DIR (e.g. docs/plots)")
    parser.add_argument("--json", metavar="PATH", help="where the pytest-benchmark JSON goes (default "
                        "benchmarks/results/benchmarks-DEVICE.json)")
    parser.add_argument("--from-json", metavar="PATH", help="write the report from this JSON instead of running")
    parser.add_argument("--csv", default=os.path.join(harness.BENCH_DIR, "results", "results.csv"))
    parser.add_argument("--readme", metavar="MARKDOWN", help="also write the summary table into this file (README.md), "
                        "between its performance-summary markers")
    args = parser.parse_args()
    for name in ("threads", "rounds"):
        if getattr(args, name) < 1:
            parser.error(f"argument --{name}: should be >= 1, got {getattr(args, name)}")
    if args.from_json:
        json_path = args.from_json
    else:
        import torch  # noqa: PLC0415

        if args.device == "cuda" and not torch.cuda.is_available():
            print("run.py: --device cuda: no CUDA device (torch.cuda.is_available() is False); the GPU benchmarks "
                  "need a machine with an NVIDIA GPU", file=sys.stderr)
            return 1
        json_path = args.json or os.path.join(harness.BENCH_DIR, "results", f"benchmarks-{args.device}.json")
        if os.path.exists(json_path):
            os.remove(json_path)
        code = run_benchmarks(args, json_path)
        if not os.path.exists(json_path):
            print(f"run.py: the benchmarks did not run (pytest exit {code}); no report written", file=sys.stderr)
            return code or 1
    res = harness.Results(json_path)
    report, verdicts = write_report(res, args)
    print(report)
    if args.write:
        with open(args.write, "w", encoding="utf-8") as f:
            f.write(report)
    if args.readme:
        write_readme_summary(args.readme, summary(res, verdicts))
    os.makedirs(os.path.dirname(args.csv), exist_ok=True)
    new = not os.path.exists(args.csv)
    with open(args.csv, "a", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        if new:
            w.writerow(harness.CSV_HEADER)
        w.writerows(harness.csv_rows(res))
    if res.meta.get("failed", {}):
        print(f"run.py: {len(res.meta['failed'])} benchmark(s) failed; the report lists them", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
