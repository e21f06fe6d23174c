"""What ``import invkernels`` adds to ``import torch``: wall time of a fresh interpreter that imports
torch alone and one that imports torch then invkernels, :data:`RUNS` of each in alternation, the
medians compared. The suite checks which modules the import loads (python_tests/test_import.py);
the time itself is measured only here, as a benchmark line, never asserted in a test.

A pytest-benchmark suite (``pytest benchmarks/``); :func:`report` is its part of the report.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time

import pytest

import harness

RESULT_SECTIONS = {"import"}

RUNS = 7
GOAL_S = 0.5  # invkernels' import on top of torch's, seconds
PROGRAMS = {"import torch": "import torch", "import torch, invkernels": "import torch\nimport invkernels"}


def _wall_s(code: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
    return time.perf_counter() - start


def measure() -> dict:
    """Seconds of each program per run (one untimed run of each first, which fills the file cache)."""
    for code in PROGRAMS.values():
        _wall_s(code)
    times: dict[str, list[float]] = {name: [] for name in PROGRAMS}
    for _ in range(RUNS):
        for name, code in PROGRAMS.items():
            times[name].append(_wall_s(code))
    return {"seconds": times}


@pytest.mark.benchmark(group="import")
def test_import_time(benchmark):
    harness.record_once(benchmark, measure, section="import")


def report(res: harness.Results) -> tuple[str, list[str]]:
    """The import part of the report and its goal verdict."""
    entries = res.all("import")
    if not entries:
        return "", []
    seconds = entries[-1]["seconds"]
    median = {name: statistics.median(values) for name, values in seconds.items()}
    torch_only, both = median["import torch"], median["import torch, invkernels"]
    added = both - torch_only
    rows = [[name, f"{median[name]:.2f}", f"{min(values):.2f}–{max(values):.2f}"] for name, values in seconds.items()]
    text = f"""## Import time

A fresh `python -c` importing torch alone and one importing torch then invkernels, {RUNS} runs of
each in alternation after one untimed run of each: `import invkernels` adds **{added:.2f} s** (median
against median; torch._dynamo and Triton are imported when first used, not here).

{harness.markdown_table(["program", "median s", "range s"], rows)}
"""
    verdict = (f"- import invkernels on top of import torch: +{added:.2f} s (goal ≤ {GOAL_S} s): "
               f"{'met' if added <= GOAL_S else 'NOT met'}")
    return text, [verdict]
