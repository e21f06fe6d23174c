"""Memory-free backprop benchmark (float32): K Glow steps on [16, 64, 32, 32], hidden 128, as
plain autograd, torch.utils.checkpoint per step and InvertibleSequential(memory_free=True):
bytes saved for backward, peak memory (on the CPU the peak RSS, each configuration in its own
process; on a GPU the CUDA allocator's peak), time of one forward+backward, and the drift of the
rebuilt activations.

A pytest-benchmark suite (``pytest benchmarks/``); :func:`report` is its part of the report
written by ``benchmarks/run.py``. ``python benchmarks/bench_memory.py --child MODE K`` is the
per-process RSS probe and ``--time ROUNDS THREADS DEVICE BACKEND`` the timing process.
"""

from __future__ import annotations

import argparse
import gc
import json
import os

import pytest
import torch

import harness

# The extra_info sections these benchmarks write (report() renders them).
RESULT_SECTIONS = {"memory", "memory_time", "drift"}

SHAPE = (16, 64, 32, 32)
HIDDEN = 128
DEPTHS = (1, 4, 8, 16)
MODES = ("plain", "checkpoint", "memory_free")
TIME_DEPTH = 8
DRIFT_DEPTHS = (8, 64)
PRECISIONS = {"float32": None, "bf16 autocast": torch.bfloat16}
TIME_ROUND_FACTOR = 2  # the K = 8 timing takes twice the report's rounds: its spread is wide
GOAL_FLAT = 1.2  # memory-free saved bytes at K = 16 over K = 1
GOAL_VS_PLAIN = 0.1  # memory-free saved bytes over plain autograd's at K = 16
GOAL_TIME = 1.35  # memory-free time over plain autograd's at K = TIME_DEPTH (issue 4)


def build(depth: int, mode: str, device: str = "cpu"):
    """The model for ``mode`` and a function running one forward+backward on a fixed batch."""
    from bench_glow import _randomized_step  # noqa: PLC0415
    from torch.utils.checkpoint import checkpoint  # noqa: PLC0415

    from invkernels.nn import InvertibleSequential  # noqa: PLC0415

    torch.manual_seed(0)
    model = InvertibleSequential(*(_randomized_step(SHAPE[1], HIDDEN) for _ in range(depth)),
                                 memory_free=mode == "memory_free").to(device)
    x = torch.randn(SHAPE, device=device, requires_grad=True)
    g, gl = torch.randn(SHAPE, device=device), torch.ones(SHAPE[0], device=device)
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
    return harness.run_child([os.path.abspath(__file__), "--child", mode, str(depth)], env=env)["peak_growth"]


def peak_cuda_growth(fwd_bwd) -> int:
    """The CUDA allocator's peak of one forward+backward over the memory allocated before it,
    after a warm-up iteration."""
    fwd_bwd()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fwd_bwd()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def mib(n: int) -> str:
    return f"{n / 2**20:.1f}"


def _memory_backend(settings) -> str:
    return settings.backends[0]


@pytest.mark.benchmark(group="memory")
@pytest.mark.parametrize(("depth", "mode"), [(d, m) for d in DEPTHS for m in MODES],
                         ids=[f"K{d}-{m}" for d in DEPTHS for m in MODES])
def test_memory(benchmark, settings, depth, mode):
    """Bytes saved for backward and the peak memory of one forward+backward of K steps."""
    import invkernels  # noqa: PLC0415

    with invkernels.use_backend(_memory_backend(settings)):
        _, forward, fwd_bwd, _ = build(depth, mode, settings.device)

        def measure():
            saved = saved_bytes(forward)
            peak = peak_rss_growth(mode, depth) if settings.device == "cpu" else peak_cuda_growth(fwd_bwd)
            return {"saved_bytes": saved, "peak_growth": peak}

        harness.record_once(benchmark, measure, section="memory", depth=depth, mode=mode)


def time_child(rounds: int, threads: int, device: str, backend: str) -> None:
    """Prints the samples (ms) of one forward+backward at K = TIME_DEPTH for every mode, interleaved."""
    import invkernels  # noqa: PLC0415

    torch.set_num_threads(threads)
    invkernels.set_backend(backend)
    runs = {mode: build(TIME_DEPTH, mode, device)[2] for mode in MODES}
    t = harness.measure(runs, rounds=rounds, reps=1, warmup=1, device=device)
    print(json.dumps({"samples_ms": {mode: t[mode].samples_ms for mode in MODES}}))


@pytest.mark.benchmark(group="memory")
def test_memory_free_time(benchmark, settings):
    """One forward+backward at K = TIME_DEPTH per mode, the modes interleaved in a process of their
    own (so the timing does not depend on what the earlier benchmarks left in this process: heap
    layout, thread pools)."""
    rounds = TIME_ROUND_FACTOR * settings.rounds
    args = [os.path.abspath(__file__), "--time", str(rounds), str(settings.threads), settings.device,
            _memory_backend(settings)]
    harness.record_once(benchmark, lambda: harness.run_child(args), section="memory_time", depth=TIME_DEPTH,
                        rounds=rounds, label=str(list(SHAPE)), mode=f"K={TIME_DEPTH}")


@pytest.mark.benchmark(group="memory")
@pytest.mark.parametrize("depth", DRIFT_DEPTHS)
@pytest.mark.parametrize("precision", list(PRECISIONS), ids=["float32", "bf16"])
def test_drift(benchmark, settings, depth, precision):
    """Relative errors of the rebuilt activations (``reconstruction_error``)."""
    import invkernels  # noqa: PLC0415
    from invkernels.diagnostics import reconstruction_error  # noqa: PLC0415

    x = torch.randn(SHAPE, device=settings.device)
    with invkernels.use_backend(_memory_backend(settings)):
        model = build(depth, "memory_free", settings.device)[0]

        def measure():
            r = reconstruction_error(model, x, autocast_dtype=PRECISIONS[precision])
            return {"total": r.total, "per_block": max(r.per_block), "local": max(r.local)}

        harness.record_once(benchmark, measure, section="drift", depth=depth, precision=precision)


def plot_memory(res: harness.Results, path: str) -> bool:
    """Saved bytes and peak memory against K for every mode; False when the run has no memory
    benchmarks."""
    entries = res.all("memory")
    if not entries:
        return False
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    peak_title = "peak RSS growth" if res.device == "cpu" else "peak CUDA memory growth"
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for ax, key, title in zip(axes, ("saved_bytes", "peak_growth"), ("bytes saved for backward", peak_title)):
        for mode in MODES:
            points = sorted((e["depth"], e[key]) for e in entries if e["mode"] == mode)
            ax.plot([d for d, _ in points], [v / 2**20 for _, v in points], marker="o", label=mode)
        ax.set_xlabel("Glow steps K")
        ax.set_ylabel("MiB")
        ax.set_title(title)
        ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def report(res: harness.Results) -> tuple[str, list[str]]:
    """The memory-free part of the report and its goal verdicts."""
    dev = res.device.upper()
    backend = res.label(res.backends[0])
    parts, verdicts = [], []
    entries = {(e["mode"], e["depth"]): e for e in res.all("memory")}
    if entries:
        depths = sorted({d for _, d in entries})
        peak = "peak RSS growth" if res.device == "cpu" else "peak CUDA memory growth"
        def cell(mode, depth, key):
            return mib(entries[mode, depth][key]) if (mode, depth) in entries else "failed"

        rows = [[str(d)] + [cell(m, d, "saved_bytes") for m in MODES] + [cell(m, d, "peak_growth") for m in MODES]
                for d in depths]
        header = (["K", "plain saved MiB", "checkpoint saved MiB", "memory-free saved MiB"]
                  + [f"{m} {peak} MiB" for m in ("plain", "checkpoint", "memory-free")])
        if res.device == "cpu":
            how = """Peak RSS growth: the peak RSS (`VmHWM`,
reset after a warm-up iteration) of one forward+backward minus the RSS just before it, each
configuration in its own process with glibc's mmap threshold at 64 KiB (freed tensors go back to
the OS, so the RSS follows the live tensors); it includes the gradients and the backward's
temporaries."""
        else:
            how = """Peak CUDA memory growth:
`torch.cuda.max_memory_allocated()` of one forward+backward (after a warm-up iteration and
`torch.cuda.reset_peak_memory_stats()`) minus the memory allocated just before it; it includes the
gradients and the backward's temporaries."""
        parts.append(f"""## Memory-free backprop ({dev}, float32)

K Glow steps (`GlowStep(64, hidden={HIDDEN})`) on {list(SHAPE)}, forward+backward with the
gradients of x and every parameter, the steps on {backend}: `plain` is
`InvertibleSequential(memory_free=False)` (autograd stores the activations), `checkpoint` runs each
step under `torch.utils.checkpoint.checkpoint(use_reentrant=False)`, `memory_free` is
`InvertibleSequential(memory_free=True)`. Saved bytes: distinct storages autograd saves during the
forward (`torch.autograd.graph.saved_tensors_hooks`). {how}

{harness.markdown_table(header, rows)}
""")
        if ("memory_free", 1) in entries and ("memory_free", 16) in entries and ("plain", 16) in entries:
            free16, free1 = entries["memory_free", 16]["saved_bytes"], entries["memory_free", 1]["saved_bytes"]
            plain16 = entries["plain", 16]["saved_bytes"]
            verdicts += [
                f"- memory-free saved bytes, K=16 vs K=1: {free16 / free1:.2f}x (goal ≤ {GOAL_FLAT}x): "
                f"{'met' if free16 <= GOAL_FLAT * free1 else 'NOT met'}",
                f"- memory-free saved bytes at K=16 vs plain autograd: {free16 / plain16:.4f} "
                f"(goal ≤ {GOAL_VS_PLAIN}): "
                f"{'met' if free16 <= GOAL_VS_PLAIN * plain16 else 'NOT met'}",
            ]
    for e in res.all("memory_time"):
        t = res.timings(e)
        plain = t["plain"].median
        rows = [[mode, harness.fmt_ms(t[mode]), f"{t[mode].median / plain:.2f}x"] for mode in MODES]
        ratio = t["memory_free"].median / plain
        verdicts.append(f"- memory-free fwd+bwd time at K={e['depth']}: {ratio:.2f}x plain autograd "
                        f"(goal ≤ {GOAL_TIME}x): {'met' if ratio <= GOAL_TIME else 'NOT met'}")
        parts.append(f"""Time of one forward+backward at K = {e['depth']}: median of {e['rounds']} rounds, the modes
interleaved in one process of their own, ratio to plain autograd:

{harness.markdown_table(["mode", "ms", "vs plain"], rows)}
""")
    drift = res.all("drift")
    if drift:
        rows = [[str(e["depth"]), e["precision"], f"{e['total']:.2e}", f"{e['per_block']:.2e}", f"{e['local']:.2e}"]
                for e in sorted(drift, key=lambda e: (e["depth"], list(PRECISIONS).index(e["precision"])))]
        parts.append(f"""Drift of the rebuilt activations (`invkernels.diagnostics.reconstruction_error`, relative L2
errors): `total` is x rebuilt through the whole inverse, `per block` the largest error of a
block input rebuilt from the model output as memory-free backward does, `local` the largest error
one block's inverse adds. `bf16 autocast` runs forward and inverse under
`torch.autocast("{res.device}", torch.bfloat16)` (the subnets in bf16; the flow layers stay float32).

{harness.markdown_table(["depth", "precision", "total", "per block (max)", "local (max)"], rows)}
""")
    return "\n".join(parts), verdicts


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", nargs=2, metavar=("MODE", "K"))
    parser.add_argument("--time", nargs=4, metavar=("ROUNDS", "THREADS", "DEVICE", "BACKEND"))
    args = parser.parse_args()
    if args.child:
        child(args.child[0], int(args.child[1]))
    elif args.time:
        harness.ensure_allocator_env()
        time_child(int(args.time[0]), int(args.time[1]), args.time[2], args.time[3])
