"""Shared benchmark harness: providers timed interleaved in one process, medians with p20/p80,
effective bandwidth, and the results read back from pytest-benchmark's JSON.

Every benchmark is a pytest-benchmark test (``benchmarks/bench_*.py``). A test builds the same
work for every provider and hands them to :func:`interleaved`: one ``benchmark.pedantic`` round
runs every provider in turn (``reps`` timed calls each, the order rotated by one provider per
round), so all providers see the same machine state; the per-call samples of each provider are
stored in the test's ``extra_info``, pytest-benchmark's own statistics are the time of a whole
round. ``benchmarks/run.py`` runs the tests and writes the report from the JSON.

Two traps measured on these machines shape it: glibc's allocator returns multi-MiB blocks to the
OS after every free (the benchmarks run with :data:`ALLOCATOR_ENV`, the same for every provider),
and separate processes differ by 20-50% (so providers are compared inside one process).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import pytest

ALLOCATOR_ENV = {"MALLOC_MMAP_THRESHOLD_": "1073741824", "MALLOC_TRIM_THRESHOLD_": "4294967296"}
BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
DEVICES = ("cpu", "cuda")
# The invkernels providers, named by backend; "cpp" runs the C++ kernels of the tensors' device.
INVKERNELS_BACKENDS = ("cpp", "triton")
# Timed calls per provider per round on the CPU: more for small cases, whose single calls are noisy.
SMALL_CASE_BYTES = 64 * 2**20
# On a GPU, the repetition time (ms) of triton.testing.do_bench per provider per round.
CUDA_REP_MS = 20


def cpu_name() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def reps_for(bytes_moved: int) -> int:
    """Timed calls per provider per round (CPU) for a case moving ``bytes_moved`` bytes."""
    return 10 if bytes_moved < SMALL_CASE_BYTES else 2


def allocator_env_in_effect() -> bool:
    """Whether this process was started with the allocator settings of :data:`ALLOCATOR_ENV`."""
    return all(os.environ.get(k) == v for k, v in ALLOCATOR_ENV.items())


def ensure_allocator_env() -> None:
    """Re-execute this process with the allocator settings when they are not in effect (glibc
    reads them at start-up only)."""
    if not allocator_env_in_effect():
        sys.stdout.flush()
        sys.stderr.flush()
        os.environ.update(ALLOCATOR_ENV)
        os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])


def provider_label(name: str, device: str) -> str:
    """How the report names a provider: the C++ backend by the kernels it runs on ``device``."""
    labels = {"eager": "eager", "compile": "torch.compile", "triton": "invkernels Triton",
              "cpp": "invkernels CUDA" if device == "cuda" else "invkernels C++"}
    return labels.get(name, name)


@dataclass
class Timing:
    """Per-call samples of one provider, in milliseconds."""

    samples_ms: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.samples_ms)

    def quantile(self, q: float) -> float:
        s = sorted(self.samples_ms)
        return s[min(len(s) - 1, int(q * len(s)))]


def cpu_samples(fn: Callable[[], object], reps: int) -> list[float]:
    """``reps`` calls of ``fn``, each timed with ``time.perf_counter`` (ms)."""
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def cuda_samples(fn: Callable[[], object]) -> list[float]:
    """Per-call CUDA-event times (ms) of ``fn`` from ``triton.testing.do_bench``, which clears the
    L2 cache before every call and repeats ``fn`` for about :data:`CUDA_REP_MS` ms."""
    import triton.testing  # noqa: PLC0415

    return list(triton.testing.do_bench(fn, warmup=1, rep=CUDA_REP_MS, return_mode="all"))


class Interleaved:
    """Providers timed round-robin: each :meth:`round` runs every provider in an order rotated by
    one provider per round and appends its per-call times to :attr:`samples`: ``reps`` calls on the
    CPU, :func:`cuda_samples` on a GPU."""

    def __init__(self, providers: dict[str, Callable[[], object]], reps: int, device: str = "cpu"):
        self.providers = dict(providers)
        self.timer = cuda_samples if device == "cuda" else (lambda fn: cpu_samples(fn, reps))
        self.samples: dict[str, list[float]] = {name: [] for name in providers}
        self.failed: dict[str, str] = {}
        self._rounds = 0

    def warmup(self, calls: int = 3) -> None:
        """Run every provider ``calls`` times untimed (compilation, caches, thread pools). A provider
        that raises is left out of the timing, its error kept in :attr:`failed`."""
        for name, fn in list(self.providers.items()):
            try:
                for _ in range(calls):
                    fn()
            except Exception as e:  # noqa: BLE001 -- the other providers are still timed; the test fails after
                self.failed[name] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                del self.providers[name], self.samples[name]

    def round(self) -> None:
        names = list(self.providers)
        shift = self._rounds % len(names)
        for name in names[shift:] + names[:shift]:
            self.samples[name] += self.timer(self.providers[name])
        self._rounds += 1


def measure(providers: dict[str, Callable[[], object]], rounds: int, reps: int, warmup: int = 3,
            device: str = "cpu") -> dict[str, Timing]:
    """Time each provider over ``rounds`` interleaved rounds of ``reps`` calls (the child
    processes' form of :func:`interleaved`)."""
    runner = Interleaved(providers, reps, device)
    runner.warmup(warmup)
    for _ in range(rounds):
        runner.round()
    return {name: Timing(s) for name, s in runner.samples.items()}


def interleaved(benchmark, providers: dict[str, Callable[[], object]], rounds: int, reps: int,
                device: str = "cpu", warmup: int = 3, **info) -> dict[str, Timing]:
    """Time ``providers`` interleaved as one pytest-benchmark test: ``benchmark.pedantic`` runs
    ``rounds`` rounds of :class:`Interleaved`; ``info`` and the samples go to ``extra_info``. A
    provider that raises is reported (``extra_info["failed"]``) and fails the test after the
    others were timed, so one broken kernel leaves the rest of the report."""
    runner = Interleaved(providers, reps, device)
    runner.warmup(warmup)
    if runner.providers:
        benchmark.pedantic(runner.round, rounds=rounds, iterations=1, warmup_rounds=0)
    benchmark.extra_info.update(info, samples_ms=runner.samples, failed=runner.failed, reps=reps, device=device)
    if runner.failed:
        pytest.fail(f"providers failed (the others were timed): {runner.failed}")
    return {name: Timing(s) for name, s in runner.samples.items()}


def record_once(benchmark, target: Callable[[], dict], **info) -> dict:
    """Run ``target`` once as a pytest-benchmark round (a measurement that is not a timing, or one
    made in a child process) and store the dict it returns in ``extra_info``."""
    result = benchmark.pedantic(target, rounds=1, iterations=1, warmup_rounds=0)
    benchmark.extra_info.update(info, **result)
    return result


def run_child(args: list[str], env: dict[str, str] | None = None) -> dict:
    """Run ``python args...`` and return the JSON object its last output line holds."""
    out = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"benchmark child {args} failed (exit {out.returncode}):\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def invkernels_backends(device: str) -> tuple[list[str], dict[str, str]]:
    """The invkernels backends timed on ``device``, and why each of the others is not.

    The C++ backend runs where its kernels were compiled for the device; Triton is timed only where
    it is compiled for a GPU, never under ``TRITON_INTERPRET=1``.
    """
    import invkernels  # noqa: PLC0415

    info = invkernels.build_info()
    timed, skipped = [], {}
    if device == "cpu" or info.get("cuda"):
        timed.append("cpp")
    else:
        skipped["cpp"] = "the extension was built without the CUDA backend"
    if device == "cpu":
        skipped["triton"] = "on the CPU Triton only runs under its interpreter, which is not timed"
    elif os.environ.get("TRITON_INTERPRET") == "1":
        skipped["triton"] = "TRITON_INTERPRET=1 is set (interpreted, not compiled)"
    elif info.get("triton_version") is None:
        skipped["triton"] = "triton is not installed"
    else:
        timed.append("triton")
    return timed, skipped


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def fmt_ms(t: Timing | None) -> str:
    """Median and p20–p80 of a provider's samples ("failed" for a provider that raised)."""
    return "failed" if t is None else f"{t.median:.3f} ({t.quantile(0.2):.3f}–{t.quantile(0.8):.3f})"


def ratio(t: dict[str, Timing], num: str, den: str) -> float | None:
    """Median time of ``num`` over that of ``den`` (None when either failed)."""
    return t[num].median / t[den].median if num in t and den in t else None


def fmt_ratio(r: float | None) -> str:
    return "–" if r is None else f"{r:.2f}x"


class Results:
    """A pytest-benchmark JSON file read back: the benchmarks' ``extra_info`` by section and key,
    and the run's description (``machine_info["invkernels"]``, written by conftest.py)."""

    def __init__(self, path: str):
        with open(path, encoding="utf-8") as f:
            self.data = json.load(f)
        self.meta = self.data["machine_info"]["invkernels"]
        self.device = self.meta["device"]
        self.backends = self.meta["backends"]
        self.entries = [b["extra_info"] for b in self.data["benchmarks"] if "section" in b["extra_info"]]

    def sections(self) -> set[str]:
        return {e["section"] for e in self.entries}

    def all(self, section: str) -> list[dict]:
        return [e for e in self.entries if e["section"] == section]

    def get(self, section: str, **keys) -> dict:
        """The one entry of ``section`` whose fields equal ``keys``."""
        found = [e for e in self.all(section) if all(e.get(k) == v for k, v in keys.items())]
        if len(found) != 1:
            raise KeyError(f"Results.get: expected one {section} entry with {keys}, found {len(found)}")
        return found[0]

    def timings(self, entry: dict) -> dict[str, Timing]:
        return {name: Timing(s) for name, s in entry["samples_ms"].items()}

    @property
    def commit(self) -> str:
        info = self.data.get("commit_info", {})
        commit = str(info.get("id", "unknown"))[:7]
        return commit + (" (with uncommitted changes)" if info.get("dirty") else "")

    def label(self, provider: str) -> str:
        return provider_label(provider, self.device)


def op_header(res: Results) -> list[str]:
    """Columns of an op table: every provider's time, each invkernels provider's ratios to eager
    and torch.compile, and its bandwidth (with % of the device's peak on a GPU)."""
    header = ["shape", "mode", "eager ms", "torch.compile ms"] + [f"{res.label(b)} ms" for b in res.backends]
    for b in res.backends:
        prefix = f"{res.label(b)} " if len(res.backends) > 1 else ""
        header += [f"{prefix}vs eager", f"{prefix}vs compile"]
    header += [f"{res.label(b)} GB/s" for b in res.backends]
    return header


def op_rows(res: Results, entries: list[dict], op: str, goals: Callable[[dict], dict[str, float]]
            ) -> tuple[list[list[str]], list[str]]:
    """Table rows and goal verdicts of op cases (providers eager, compile and the backends).

    ``goals(entry)`` maps ``"eager"`` / ``"compile"`` to the speedup each invkernels provider
    should reach over that provider (an empty dict: no goal)."""
    rows, verdicts = [], []
    peak = res.meta.get("peak_bandwidth_gbs")
    for entry in entries:
        t = res.timings(entry)
        gbs = {p: entry["bytes"] / (t[p].median * 1e-3) / 1e9 for p in t}
        row = [entry["label"], entry["mode"]] + [fmt_ms(t.get(p)) for p in ("eager", "compile", *res.backends)]
        for b in res.backends:
            row += [fmt_ratio(ratio(t, "eager", b)), fmt_ratio(ratio(t, "compile", b))]
        for b in res.backends:
            if b not in gbs:
                row.append("failed")
                continue
            cell = f"{gbs[b]:.1f}" + (f", {100 * gbs[b] / peak:.0f}% of peak" if peak else "")
            baselines = ", ".join(f"{p} {gbs[p]:.1f}" for p in ("eager", "compile") if p in gbs)
            row.append(cell + (f" ({baselines})" if baselines else ""))
        rows.append(row)
        case_goals = goals(entry)
        for b in res.backends if case_goals else ():
            who = f", {res.label(b)}" if len(res.backends) > 1 else ""
            have = {p: ratio(t, p, b) for p in case_goals}
            if None in have.values():
                failed = ", ".join(f"{p}: {why}" for p, why in entry.get("failed", {}).items())
                verdicts.append(f"- {op} {entry['label']} {entry['mode']}{who}: failed ({failed}): NOT met")
                continue
            ok = all(have[p] >= need for p, need in case_goals.items())
            text = ", ".join(f"{have[p]:.2f}x {res.label(p)} (goal ≥ {need}x)" for p, need in case_goals.items())
            verdicts.append(f"- {op} {entry['label']} {entry['mode']}{who}: {text}: {'met' if ok else 'NOT met'}")
    return rows, verdicts


def csv_rows(res: Results) -> list[list[str]]:
    """One row per provider of every timed benchmark (the history in benchmarks/results/)."""
    rows = []
    for e in res.entries:
        for name, samples in e.get("samples_ms", {}).items():
            t = Timing(samples)
            rows.append([res.meta["date"], res.meta["machine"], res.meta["torch"], res.commit, e["section"],
                         e.get("label", ""), e.get("mode", ""), name, f"{t.median:.4f}", f"{t.quantile(0.2):.4f}",
                         f"{t.quantile(0.8):.4f}"])
    return rows


CSV_HEADER = ["date", "machine", "torch", "commit", "op", "shape", "mode", "provider", "median_ms", "p20_ms", "p80_ms"]


def plot_speedups(res: Results, path: str) -> bool:
    """Bar chart of eager / invkernels and torch.compile / invkernels time for every op case of the
    run; False when the run has none."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    cases = [(e, t, b) for e in res.entries if e.get("kind") == "op" for t in [res.timings(e)] for b in res.backends
             if all(p in t for p in ("eager", "compile", b))]
    if not cases:
        return False
    labels = [f"{e['op']} {e['label']} {e['mode']}" + (f" ({b})" if len(res.backends) > 1 else "")
              for e, _, b in cases]
    vs_eager = [t["eager"].median / t[b].median for _, t, b in cases]
    vs_compile = [t["compile"].median / t[b].median for _, t, b in cases]
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(cases) + 1.5))
    ys = range(len(cases))
    ax.barh([y + 0.2 for y in ys], vs_eager, height=0.4, label="eager / invkernels")
    ax.barh([y - 0.2 for y in ys], vs_compile, height=0.4, label="torch.compile / invkernels")
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_yticks(list(ys))
    ax.set_yticklabels(labels, fontsize=8)
    ax.set_xlabel(f"speedup of invkernels (time ratio, {res.device.upper()} float32)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
