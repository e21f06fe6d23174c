"""Affine coupling benchmark: the fused invkernels op against the eager reference and
torch.compile of the reference, float32, forward and forward+backward, in one process; on the CPU
also the forward of each CPU-capability build.

A pytest-benchmark suite (``pytest benchmarks/``); :func:`report` is its part of the report
written by ``benchmarks/run.py``.
"""

from __future__ import annotations

import os

import pytest
import torch

import harness

# The extra_info sections these benchmarks write (report() renders them).
RESULT_SECTIONS = {"coupling", "capability"}

SHAPES = [(16, 32, 32, 32), (64, 64, 64, 64)]
MODES = ("fwd", "fwd+bwd")
CASES = [(shape, mode) for shape in SHAPES for mode in MODES]
GOAL_VS_EAGER = 2.0
GOAL_VS_COMPILE = {"fwd": 1.0, "fwd+bwd": 1.2}
CAPABILITIES = ("DEFAULT", "AVX2", "AVX512")
CAPABILITY_CALLS = 60


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


def providers_for(shape, mode, device, backends):
    import invkernels  # noqa: PLC0415
    from invkernels.reference import coupling as R  # noqa: PLC0415

    x = torch.randn(shape, device=device)
    c2 = shape[1] - shape[1] // 2
    h = torch.randn((shape[0], 2 * c2, *shape[2:]), device=device)
    fns = {"eager": R.affine_coupling_fwd, "compile": torch.compile(R.affine_coupling_fwd)}
    for b in backends:
        fns[b] = lambda a, c, b=b: invkernels.ops.affine_coupling_fwd(a, c, backend=b)
    if mode == "fwd":
        return {name: (lambda f=f: f(x, h)) for name, f in fns.items()}
    xr, hr = x.clone().requires_grad_(), h.clone().requires_grad_()
    gy, gl = torch.randn_like(x), torch.randn(shape[0], device=device)

    def fwd_bwd(f):
        y, logdet = f(xr, hr)
        return torch.autograd.grad((y, logdet), (xr, hr), (gy, gl))

    return {name: (lambda f=f: fwd_bwd(f)) for name, f in fns.items()}


@pytest.mark.benchmark(group="coupling")
@pytest.mark.parametrize(("shape", "mode"), CASES, ids=[f"{'x'.join(map(str, s))}-{m}" for s, m in CASES])
def test_affine_coupling(benchmark, settings, shape, mode):
    n = bytes_moved(shape, mode)
    harness.interleaved(benchmark, providers_for(shape, mode, settings.device, settings.backends), settings.rounds,
                        harness.reps_for(n), settings.device, section="coupling", kind="op", op="affine_coupling",
                        label=str(list(shape)), mode=mode, bytes=n)


CAPABILITY_SCRIPT = """
import json, sys, torch, invkernels
sys.path.insert(0, {bench_dir!r})
import harness
torch.set_num_threads({threads})
x = torch.randn({shape}); h = torch.randn({shape})
t = harness.measure({{"f": lambda: torch.ops.invkernels.affine_coupling_fwd(x, h, "exp", 2.0)}}, rounds=1,
                    reps={calls})
print(json.dumps({{"library": invkernels.build_info()["cpu_library"].split(".")[0], "median_ms": t["f"].median}}))
"""


def _capabilities() -> list[str]:
    native = torch.backends.cpu.get_cpu_capability()
    return list(CAPABILITIES[: CAPABILITIES.index(native) + 1]) if native in CAPABILITIES else ["DEFAULT"]


@pytest.mark.benchmark(group="coupling")
@pytest.mark.parametrize("capability", _capabilities())
def test_cpu_capability(benchmark, settings, capability):
    """Forward time of one CPU-capability build in a process of its own (``ATEN_CPU_CAPABILITY``
    makes it load that build): shows which vector path runs and what it is worth."""
    if settings.device != "cpu":
        pytest.skip("the CPU vector paths are measured in the CPU run")
    script = CAPABILITY_SCRIPT.format(bench_dir=harness.BENCH_DIR, threads=settings.threads, shape=SHAPES[0],
                                      calls=CAPABILITY_CALLS)
    env = dict(os.environ, ATEN_CPU_CAPABILITY=capability.lower())
    harness.record_once(benchmark, lambda: harness.run_child(["-c", script], env=env), section="capability",
                        capability=capability)


def report(res: harness.Results) -> tuple[str, list[str]]:
    """The coupling part of the report and its goal verdicts."""
    rows, verdicts = harness.op_rows(res, res.all("coupling"), "affine_coupling",
                                     lambda e: {"eager": GOAL_VS_EAGER, "compile": GOAL_VS_COMPILE[e["mode"]]})
    invk = ", ".join(f"`{res.label(b)}` is the fused op (`backend=\"{b}\"`)" for b in res.backends)
    text = f"""## Affine coupling ({res.device.upper()}, float32, scale="exp")

`eager` is `invkernels.reference.affine_coupling_fwd` (chunk, tanh, exp, cat, sum), `compile` is
`torch.compile` of it;
{invk}.
Forward+backward is one forward and `torch.autograd.grad` for x and h. GB/s counts the minimal
traffic (forward: read x and h, write y; backward: read grad_y, x2 and h, write grad_x and grad_h)
over the median time.

{harness.markdown_table(harness.op_header(res), rows)}
"""
    caps = res.all("capability")
    if caps:
        cap_rows = [[e["capability"], e["library"], f"{e['median_ms']:.3f}"] for e in caps]
        text += f"""
### Which CPU vector path runs

The CPU kernels are built once per capability; each row runs in its own process with
`ATEN_CPU_CAPABILITY` set, so it loads that build (median of {CAPABILITY_CALLS} forward calls, {list(SHAPES[0])}).

{harness.markdown_table(["capability", "library loaded", f"fused fwd ms {list(SHAPES[0])}"], cap_rows)}
"""
    return text, verdicts
