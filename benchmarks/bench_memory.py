"""Memory-free backprop benchmark (CPU, float32): K Glow steps on [16, 64, 32, 32], hidden 128, as
plain autograd, torch.utils.checkpoint per step and InvertibleSequential(memory_free=True):
bytes saved for backward, peak RSS (each configuration in its own process), time of one
forward+backward, and the drift of the rebuilt activations.

Part of ``make bench`` (``benchmarks/run.py``); ``python benchmarks/bench_memory.py --child MODE K``
is the per-process RSS probe and ``--time ROUNDS THREADS`` the timing process.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import harness  # noqa: E402

SHAPE = (16, 64, 32, 32)
HIDDEN = 128
DEPTHS = (1, 4, 8, 16)
MODES = ("plain", "checkpoint", "memory_free")
TIME_DEPTH = 8
DRIFT_DEPTHS = (8, 64)
TIME_ROUND_FACTOR = 2  # the K = 8 timing takes twice the report's rounds: its spread is wide


def build(depth: int, mode: str):
    """The model for ``mode`` and a function running one forward+backward on a fixed batch."""
    from bench_glow import _randomized_step  # noqa: PLC0415
    from torch.utils.checkpoint import checkpoint  # noqa: PLC0415

    from invkernels.nn import InvertibleSequential  # noqa: PLC0415

    torch.manual_seed(0)
    model = InvertibleSequential(*(_randomized_step(SHAPE[1], HIDDEN) for _ in range(depth)),
                                 memory_free=mode == "memory_free")
    x = torch.randn(SHAPE, requires_grad=True)
    g, gl = torch.randn(SHAPE), torch.ones(SHAPE[0])
    params = [x, *model.parameters()]

    def forward():
        if mode != "checkpoint":
            return model(x)
        y, logdet = x, 0
        for step in model.blocks:
            y, block_logdet = checkpoint(step, y, use_reentrant=False)
            logdet = logdet + block_logdet
        return y, logdet

    def fwd_bwd():
        y, logdet = forward()
        return torch.autograd.grad((y, logdet), params, (g, gl))

    return model, forward, fwd_bwd, x


def saved_bytes(forward) -> int:
    """Bytes of distinct storages that autograd saves for backward during ``forward()``."""
    storages: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward()
    return sum(storages.values())


def _status_bytes(key: str) -> int:
    with open("/proc/self/status", encoding="utf-8") as f:
        kb = next(int(line.split()[1]) for line in f if line.startswith(key + ":"))
    return kb * 1024


def child(mode: str, depth: int) -> None:
    """Prints the peak RSS growth of one forward+backward over the RSS just before it, after a
    warm-up iteration (the libraries' one-time allocations) and a reset of the peak (VmHWM)."""
    torch.set_num_threads(2)
    _, _, fwd_bwd, _ = build(depth, mode)
    fwd_bwd()
    gc.collect()
    with open("/proc/self/clear_refs", "w", encoding="utf-8") as f:
        f.write("5")
    base = _status_bytes("VmRSS")
    fwd_bwd()
    print(json.dumps({"peak_growth": _status_bytes("VmHWM") - base}))


def peak_rss_growth(mode: str, depth: int) -> int:
    # Every allocation of 64 KiB or more is its own mapping, returned to the OS when freed, so the
    # RSS follows the live tensors (the timing runs keep freed memory instead: harness.py).
    env = {k: v for k, v in os.environ.items() if k not in harness.ALLOCATOR_ENV}
    env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", mode, str(depth)],
                         capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_growth"]


def mib(n: int) -> str:
    return f"{n / 2**20:.1f}"


def memory_rows() -> tuple[list[list[str]], dict]:
    saved, rss = {}, {}
    for depth in DEPTHS:
        for mode in MODES:
            _, forward, _, _ = build(depth, mode)
            saved[mode, depth] = saved_bytes(forward)
            rss[mode, depth] = peak_rss_growth(mode, depth)
            print(f"memory {mode} K={depth}: saved {mib(saved[mode, depth])} MiB, "
                  f"peak RSS growth {mib(rss[mode, depth])} MiB", flush=True)
    rows = [[str(depth)] + [mib(saved[m, depth]) for m in MODES] + [mib(rss[m, depth]) for m in MODES]
            for depth in DEPTHS]
    return rows, {"saved": saved, "rss": rss}


def plot_memory(m: dict, path: str) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for ax, key, title in zip(axes, ("saved", "rss"), ("bytes saved for backward", "peak RSS growth")):
        for mode in MODES:
            ax.plot(DEPTHS, [m[key][mode, d] / 2**20 for d in DEPTHS], marker="o", label=mode)
        ax.set_xlabel("Glow steps K")
        ax.set_ylabel("MiB")
        ax.set_title(title)
        ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def time_child(rounds: int, threads: int) -> None:
    """Prints the samples (ms) of one forward+backward at K = TIME_DEPTH for every mode, interleaved."""
    torch.set_num_threads(threads)
    runs = {mode: build(TIME_DEPTH, mode)[2] for mode in MODES}
    t = harness.measure(runs, rounds=rounds, reps=1, warmup=1)
    print(json.dumps({mode: t[mode].samples_ms for mode in MODES}))


def time_rows(rounds: int, threads: int) -> tuple[list[list[str]], dict]:
    # A process of its own (the modes interleaved inside it), so the timing does not depend on what
    # the earlier sections of the report left in this process (heap layout, thread pools).
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--time", str(rounds), str(threads)],
                         capture_output=True, text=True, check=True)
    samples = json.loads(out.stdout.strip().splitlines()[-1])
    t = {mode: harness.Timing(samples[mode]) for mode in MODES}
    plain = t["plain"].median
    rows = [[mode, harness.fmt_ms(t[mode]), f"{t[mode].median / plain:.2f}x"] for mode in MODES]
    return rows, {mode: t[mode].median for mode in MODES}


def drift_rows() -> list[list[str]]:
    from invkernels.diagnostics import reconstruction_error  # noqa: PLC0415

    rows = []
    x = torch.randn(SHAPE)
    for depth in DRIFT_DEPTHS:
        model = build(depth, "memory_free")[0]
        for label, dtype in (("float32", None), ("bf16 autocast", torch.bfloat16)):
            r = reconstruction_error(model, x, autocast_dtype=dtype)
            rows.append([str(depth), label, f"{r.total:.2e}", f"{max(r.per_block):.2e}", f"{max(r.local):.2e}"])
            print("drift", rows[-1], flush=True)
    return rows


def section(rounds: int, threads: int, meta: dict[str, str]) -> tuple[str, list[list[str]], list[str]]:
    """The memory-free part of docs/performance.md, its CSV rows and goal verdicts."""
    mem, m = memory_rows()
    if meta.get("plots"):
        plot_memory(m, os.path.join(meta["plots"], "memory.png"))
    times, tm = time_rows(TIME_ROUND_FACTOR * rounds, threads)
    drift = drift_rows()
    free16, free1 = m["saved"]["memory_free", 16], m["saved"]["memory_free", 1]
    plain16 = m["saved"]["plain", 16]
    ok_flat = free16 <= 1.2 * free1
    ok_plain = free16 <= plain16 / 10
    ratio = tm["memory_free"] / tm["plain"]
    verdicts = [
        f"- memory-free saved bytes, K=16 vs K=1: {free16 / free1:.2f}x (goal ≤ 1.2x): {'met' if ok_flat else 'NOT met'}",
        f"- memory-free saved bytes at K=16 vs plain autograd: {free16 / plain16:.4f} (goal ≤ 0.1): "
        f"{'met' if ok_plain else 'NOT met'}",
        f"- memory-free fwd+bwd time at K={TIME_DEPTH}: {ratio:.2f}x plain autograd (goal ≤ 1.35x): "
        f"{'met' if ratio <= 1.35 else 'NOT met'}",
    ]
    csv_rows = [[meta["date"], meta["cpu"], meta["torch"], meta["commit"], "glow_chain_time", str(list(SHAPE)),
                 f"K={TIME_DEPTH}", mode, f"{tm[mode]:.4f}", "", ""] for mode in MODES]
    text = f"""## Memory-free backprop (CPU, float32)

K Glow steps (`GlowStep(64, hidden={HIDDEN})`) on {list(SHAPE)}, forward+backward with the
gradients of x and every parameter: `plain` is `InvertibleSequential(memory_free=False)` (autograd
stores the activations), `checkpoint` runs each step under
`torch.utils.checkpoint.checkpoint(use_reentrant=False)`, `memory_free` is
`InvertibleSequential(memory_free=True)`. Saved bytes: distinct storages autograd saves during the
forward (`torch.autograd.graph.saved_tensors_hooks`). Peak RSS growth: the peak RSS (`VmHWM`,
reset after a warm-up iteration) of one forward+backward minus the RSS just before it, each
configuration in its own process with glibc's mmap threshold at 64 KiB (freed tensors go back to
the OS, so the RSS follows the live tensors); it includes the gradients and the backward's
temporaries.

| K | plain saved MiB | checkpoint saved MiB | memory-free saved MiB | plain peak RSS growth MiB | checkpoint peak RSS growth MiB | memory-free peak RSS growth MiB |
|---|---|---|---|---|---|---|
{chr(10).join("| " + " | ".join(r) + " |" for r in mem)}

Time of one forward+backward at K = {TIME_DEPTH}: median of {TIME_ROUND_FACTOR * rounds} rounds, the modes interleaved
in one process of their own, ratio to plain autograd:

{harness.markdown_table(["mode", "ms", "vs plain"], times)}

Drift of the rebuilt activations (`invkernels.diagnostics.reconstruction_error`, relative L2
errors): `total` is x rebuilt through the whole inverse, `per block` the largest error of a
block input rebuilt from the model output as memory-free backward does, `local` the largest error
one block's inverse adds. `bf16 autocast` runs forward and inverse under
`torch.autocast("cpu", torch.bfloat16)` (the subnets in bf16; the flow layers stay float32).

{harness.markdown_table(["depth", "precision", "total", "per block (max)", "local (max)"], drift)}
"""
    return text, csv_rows, verdicts


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", nargs=2, metavar=("MODE", "K"))
    parser.add_argument("--time", nargs=2, type=int, metavar=("ROUNDS", "THREADS"))
    args = parser.parse_args()
    if args.child:
        child(args.child[0], int(args.child[1]))
    elif args.time:
        harness.ensure_allocator_env()
        time_child(*args.time)
