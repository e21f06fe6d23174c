"""Runs every benchmark in one process and writes docs/performance.md (``make bench``).

Providers are compared inside one process, interleaved round by round, with the allocator
settings of harness.ensure_allocator_env for all of them.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_actnorm  # noqa: E402
import bench_coupling  # noqa: E402
import bench_glow  # noqa: E402
import bench_memory  # noqa: E402
import harness  # noqa: E402

SECTIONS = {"coupling": bench_coupling, "actnorm": bench_actnorm, "glow": bench_glow, "memory": bench_memory}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--only", choices=sorted(SECTIONS), action="append", help="run only these sections")
    parser.add_argument("--write", metavar="MARKDOWN", help="write the report (e.g. docs/performance.md)")
    parser.add_argument("--plots", metavar="DIR", help="write PNG plots of the results to DIR (e.g. docs/plots)")
    parser.add_argument("--csv", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                      "results.csv"))
    args = parser.parse_args()
    harness.ensure_allocator_env()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    import invkernels  # noqa: PLC0415

    meta = harness.machine_description()
    meta["plots"] = args.plots or ""
    bandwidth = harness.copy_bandwidth_gbs()
    texts, csv_rows, verdicts = [], [], []
    for name in args.only or list(SECTIONS):
        text, rows, goals = SECTIONS[name].section(args.rounds, args.threads, meta)
        texts.append(text)
        csv_rows += rows
        verdicts += goals
    report = f"""# Performance

Written by `benchmarks/run.py` (`make bench`); every number below comes from one run.

- Date: {meta['date']}
- Machine: {meta['cpu']}
- torch {meta['torch']}, invkernels commit {meta['commit']}, CPU kernels `{invkernels.build_info()['cpu_library']}`
- Allocator: `MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=4294967296` for every provider
- Measured copy bandwidth (torch copy of 256 MiB, read + write): **{bandwidth:.1f} GB/s**
- Times: median ms over {args.rounds} interleaved rounds, p20–p80 in parentheses; ratios are
  provider time / invkernels time from the same run.

Goals (issues 2, 3 and 4):
{chr(10).join(verdicts)}

{(chr(10) * 2).join(texts)}
No GPU timings: no GPU was available where this report was produced.
"""
    if args.plots:
        harness.plot_speedups(csv_rows, os.path.join(args.plots, "speedups.png"))
        where = os.path.relpath(args.plots, os.path.dirname(os.path.abspath(args.write))) if args.write else args.plots
        report += (f"\nPlots: `{where}/speedups.png` (speedups over eager and torch.compile) and "
                   f"`{where}/memory.png` (memory of memory-free backprop).\n")
    print(report)
    if args.write:
        with open(args.write, "w", encoding="utf-8") as f:
            f.write(report)
    os.makedirs(os.path.dirname(args.csv), exist_ok=True)
    new = not os.path.exists(args.csv)
    with open(args.csv, "a", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        if new:
            w.writerow(harness.CSV_HEADER)
        w.writerows(csv_rows)


if __name__ == "__main__":
    main()
