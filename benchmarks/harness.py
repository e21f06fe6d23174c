"""Shared benchmark harness: providers timed interleaved in one process, medians with p20/p80,
effective bandwidth, and the machine description written next to the numbers.

Two traps measured on these machines shape it: glibc's allocator returns multi-MiB blocks to the
OS after every free (``ensure_allocator_env`` re-executes the script with thresholds that keep
them, the same for every provider), and separate processes differ by 20-50% (so providers are
compared inside one process, round-robin).
"""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

ALLOCATOR_ENV = {"MALLOC_MMAP_THRESHOLD_": "1073741824", "MALLOC_TRIM_THRESHOLD_": "4294967296"}


def ensure_allocator_env() -> None:
    """Re-execute this script with the allocator settings when they are not in effect."""
    if any(os.environ.get(k) != v for k, v in ALLOCATOR_ENV.items()):
        os.environ.update(ALLOCATOR_ENV)
        os.execv(sys.executable, [sys.executable, *sys.argv])


@dataclass
class Timing:
    samples_ms: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.samples_ms)

    def quantile(self, q: float) -> float:
        s = sorted(self.samples_ms)
        return s[min(len(s) - 1, int(q * len(s)))]


def measure(providers: dict[str, Callable[[], object]], rounds: int, reps: int, warmup: int = 3) -> dict[str, Timing]:
    """Time each provider ``rounds * reps`` times, interleaving providers round by round."""
    for fn in providers.values():
        for _ in range(warmup):
            fn()
    out = {name: Timing() for name in providers}
    names = list(providers)
    for r in range(rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            fn = providers[name]
            for _ in range(reps):
                t0 = time.perf_counter()
                fn()
                out[name].samples_ms.append((time.perf_counter() - t0) * 1e3)
    return out


def copy_bandwidth_gbs(mib: int = 256, reps: int = 20) -> float:
    """Measured DRAM copy bandwidth (bytes read + written per second) with torch's copy."""
    src = torch.randn(mib * 2**20 // 4)
    dst = torch.empty_like(src)
    timing = measure({"copy": lambda: dst.copy_(src)}, rounds=1, reps=reps)
    return 2 * src.numel() * 4 / (timing["copy"].median * 1e-3) / 1e9


def machine_description() -> dict[str, str]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": f"{cpu}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}, "
               f"capability {torch.backends.cpu.get_cpu_capability()}",
        "torch": torch.__version__,
        "commit": commit,
    }


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def fmt_ms(t: Timing) -> str:
    return f"{t.median:.3f} ({t.quantile(0.2):.3f}–{t.quantile(0.8):.3f})"


@dataclass
class Case:
    """One benchmark row: the same work done by each provider."""

    label: str
    mode: str
    providers: dict[str, Callable[[], object]]
    bytes_moved: int
    goal_vs_eager: float | None = None
    goal_vs_compile: float | None = None


PROVIDERS = ("eager", "compile", "invkernels")
HEADER = ["shape", "mode", "eager ms", "torch.compile ms", "invkernels ms", "vs eager", "vs compile", "invkernels GB/s"]


def run_cases(cases: list[Case], rounds: int, meta: dict[str, str], op: str) -> tuple[list[list[str]], list[list[str]],
                                                                                   list[str]]:
    """Time every case (providers interleaved) and return table rows, CSV rows and goal verdicts."""
    rows, csv_rows, verdicts = [], [], []
    for case in cases:
        reps = 10 if case.bytes_moved < 64 * 2**20 else 2
        t = measure(case.providers, rounds=rounds, reps=reps)
        e, c, k = (t[p].median for p in PROVIDERS)
        gbs = {p: case.bytes_moved / (t[p].median * 1e-3) / 1e9 for p in PROVIDERS}
        rows.append([case.label, case.mode] + [fmt_ms(t[p]) for p in PROVIDERS]
                    + [f"{e / k:.2f}x", f"{c / k:.2f}x",
                       f"{gbs['invkernels']:.1f} (eager {gbs['eager']:.1f}, compile {gbs['compile']:.1f})"])
        csv_rows += [[meta["date"], meta["cpu"], meta["torch"], meta["commit"], op, case.label, case.mode, p,
                      f"{t[p].median:.4f}", f"{t[p].quantile(0.2):.4f}", f"{t[p].quantile(0.8):.4f}"]
                     for p in PROVIDERS]
        goals = []
        if case.goal_vs_eager is not None:
            goals.append((e / k, case.goal_vs_eager, "eager"))
        if case.goal_vs_compile is not None:
            goals.append((c / k, case.goal_vs_compile, "torch.compile"))
        if goals:
            ok = all(have >= need for have, need, _ in goals)
            text = ", ".join(f"{have:.2f}x {name} (goal ≥ {need}x)" for have, need, name in goals)
            verdicts.append(f"- {op} {case.label} {case.mode}: {text}: {'met' if ok else 'NOT met'}")
        print(" | ".join(rows[-1]), flush=True)
    return rows, csv_rows, verdicts


CSV_HEADER = ["date", "machine", "torch", "commit", "op", "shape", "mode", "provider", "median_ms", "p20_ms", "p80_ms"]


def plot_speedups(csv_rows: list[list[str]], path: str) -> None:
    """Bar chart of eager / invkernels and torch.compile / invkernels time for every case of the
    run that has the three providers."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    times: dict[tuple[str, str, str], dict[str, float]] = {}
    for row in csv_rows:
        op, shape, mode, provider, median = row[4], row[5], row[6], row[7], float(row[8])
        times.setdefault((op, shape, mode), {})[provider] = median
    cases = [(k, v) for k, v in times.items() if all(p in v for p in PROVIDERS)]
    if not cases:
        return
    labels = [f"{op} {shape} {mode}" for (op, shape, mode), _ in cases]
    vs_eager = [v["eager"] / v["invkernels"] for _, v in cases]
    vs_compile = [v["compile"] / v["invkernels"] for _, v in cases]
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(cases) + 1.5))
    ys = range(len(cases))
    ax.barh([y + 0.2 for y in ys], vs_eager, height=0.4, label="eager / invkernels")
    ax.barh([y - 0.2 for y in ys], vs_compile, height=0.4, label="torch.compile / invkernels")
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_yticks(list(ys))
    ax.set_yticklabels(labels, fontsize=8)
    ax.set_xlabel("speedup of invkernels (time ratio, CPU float32)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
