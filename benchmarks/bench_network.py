"""Whole-network benchmark (CPU float32): a RevNet-style stack of 8 two-sided additive blocks,
subnets conv3x3-ReLU-conv3x3 of width 16, input [8, 32, 64, 64], loss ``out.pow(2).mean()``,
forward+backward, against plain autograd and the peer libraries users pick for it (FrEIA,
RevLib, MemCNN; installed as benchmark extras with ``pip install --no-deps``). Also timed: the
subnets' forward alone (the floor of memory-free training is plain autograd plus one more
forward of every subnet), and profiles (top ops by self time) of plain autograd and of the
memory-free invkernels stack, so glue is visible.

A pytest-benchmark suite (``pytest benchmarks/``); :func:`report` is its part of the report.
"""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch
from torch import nn

import harness

RESULT_SECTIONS = {"network", "network_profile"}

SHAPE = (8, 32, 64, 64)
DEPTH = 8
WIDTH = 16
PEERS = ("revlib", "memcnn", "FrEIA")
GOAL_STORED = 0.95  # invkernels stored over plain autograd
GOAL_FLOOR = 1.05  # invkernels memory-free over (plain + one forward of every subnet)
GOAL_USER_SWAP = 1.4  # memory-free AdditiveCoupling + a user half swap over plain
PROFILE_STEPS = 3
PROFILE_ROWS = 12


def subnet(channels: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(channels, WIDTH, 3, padding=1), nn.ReLU(), nn.Conv2d(WIDTH, channels, 3, padding=1))


class PlainStack(nn.Module):
    """Plain autograd: MemCNN's AdditiveCoupling as written, without its memory-saving wrapper."""

    def __init__(self, fs, gs):
        super().__init__()
        self.f, self.g = nn.ModuleList(fs), nn.ModuleList(gs)

    def forward(self, x):
        for f, g in zip(self.f, self.g):
            x1, x2 = x.chunk(2, dim=1)
            y1 = x1 + f(x2)
            x = torch.cat([y1, x2 + g(y1)], dim=1)
        return x


class HalfSwap(nn.Module):
    """A user's half-swap module between single-sided couplings (takes the generic path)."""

    def forward(self, x):
        c = x.shape[1] // 2
        return torch.cat([x[:, c:], x[:, :c]], dim=1), x.new_zeros(x.shape[0])

    def inverse(self, y):
        return self.forward(y)[0]


class _FixedSubnets:
    """Hands out copies of the same f, g modules, in order, to a peer's subnet constructor."""

    def __init__(self, modules):
        self.modules = list(modules)

    def __call__(self, c_in, c_out):
        return copy.deepcopy(self.modules.pop(0))


def missing_peers() -> list[str]:
    return [p for p in PEERS if importlib.util.find_spec(p) is None]


def build(device: str = "cpu"):
    """The providers: each a ``() -> output`` of one forward+backward of its stack, from the same
    subnet weights."""
    from invkernels.nn import AdditiveCoupling, InvertibleSequential, ReversibleBlock  # noqa: PLC0415

    torch.manual_seed(0)
    half = SHAPE[1] // 2
    fs = [subnet(half) for _ in range(DEPTH)]
    gs = [subnet(half) for _ in range(DEPTH)]
    x = torch.randn(SHAPE, device=device)

    def fwd_bwd(model, pair):
        def run():
            leaf = x.detach().requires_grad_()
            out = model(leaf)
            (out[0] if pair else out).pow(2).mean().backward()
        return run

    def blocks():
        return [ReversibleBlock(SHAPE[1], f=copy.deepcopy(f), g=copy.deepcopy(g)) for f, g in zip(fs, gs)]

    def swapped():
        out = []
        for f, g in zip(fs, gs):
            for sub in (f, g):
                coupling = AdditiveCoupling(SHAPE[1], "conv", hidden=WIDTH)
                coupling.subnet = copy.deepcopy(sub)
                out += [coupling, HalfSwap()]
        return out

    models = {
        "plain": (PlainStack(copy.deepcopy(fs), copy.deepcopy(gs)), False),
        "invkernels stored": (InvertibleSequential(*blocks(), memory_free=False), True),
        "invkernels memory-free": (InvertibleSequential(*blocks()), True),
        "invkernels couplings + user swap, memory-free": (InvertibleSequential(*swapped()), True),
    }
    if not missing_peers():
        import FrEIA.framework as Ff  # noqa: PLC0415
        import FrEIA.modules as Fm  # noqa: PLC0415
        import memcnn  # noqa: PLC0415
        import revlib  # noqa: PLC0415

        freia = Ff.SequenceINN(*SHAPE[1:])
        subnets = _FixedSubnets([m for pair in zip(fs, gs) for m in pair])
        for _ in range(DEPTH):
            freia.append(Fm.NICECouplingBlock, subnet_constructor=subnets)
        models["FrEIA NICECouplingBlock (stored)"] = (freia, True)
        halves = [copy.deepcopy(m) for pair in zip(fs, gs) for m in pair]
        models["RevLib ReversibleSequential"] = (revlib.ReversibleSequential(*halves, split_dim=1), False)
        models["MemCNN InvertibleModuleWrapper"] = (nn.Sequential(*[
            memcnn.InvertibleModuleWrapper(memcnn.AdditiveCoupling(Fm=copy.deepcopy(f), Gm=copy.deepcopy(g)),
                                           keep_input=False, keep_input_inverse=False) for f, g in zip(fs, gs)]),
            False)
    providers = {name: fwd_bwd(model.to(device), pair) for name, (model, pair) in models.items()}
    h = torch.randn(SHAPE[0], half, *SHAPE[2:], device=device)

    def subnet_forward():
        with torch.no_grad():
            for f, g in zip(fs, gs):
                f(h)
                g(h)

    providers["subnets' forward alone"] = subnet_forward
    return providers


@pytest.mark.benchmark(group="network")
def test_revnet_stack(benchmark, settings):
    if settings.device != "cpu":
        pytest.skip("the network benchmark times the CPU")
    providers = build(settings.device)
    harness.interleaved(benchmark, providers, rounds=settings.rounds, reps=1, device=settings.device,
                        section="network", label=f"{list(SHAPE)}, {DEPTH} blocks", missing=missing_peers())


def _profile(run) -> list[list[str]]:
    from torch.profiler import profile  # noqa: PLC0415

    run()
    with profile() as prof:
        for _ in range(PROFILE_STEPS):
            run()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    return [[e.key, f"{e.self_cpu_time_total / 1e3 / PROFILE_STEPS:.2f}", f"{e.count / PROFILE_STEPS:g}"]
            for e in events[:PROFILE_ROWS]]


@pytest.mark.benchmark(group="network")
def test_revnet_profiles(benchmark, settings):
    if settings.device != "cpu":
        pytest.skip("the network benchmark times the CPU")
    providers = build(settings.device)
    chosen = ("plain", "invkernels memory-free")
    harness.record_once(benchmark, lambda: {"profiles": {name: _profile(providers[name]) for name in chosen}},
                        section="network_profile")


def report(res: harness.Results) -> tuple[str, list[str]]:
    """The whole-network part of the report and its goal verdicts."""
    parts, verdicts = [], []
    for e in res.all("network"):
        t = res.timings(e)
        plain = t["plain"].median
        sub = t["subnets' forward alone"].median
        rows = [[name, harness.fmt_ms(t[name]), f"{t[name].median / plain:.2f}x"] for name in t]
        floor = (plain + sub) / plain
        missing = e.get("missing") or []
        parts.append(f"""## Whole network: RevNet-style stack (CPU, float32, forward+backward)

{DEPTH} two-sided additive blocks (`y1 = x1 + f(x2)`, `y2 = x2 + g(y1)`), subnets
conv3x3-ReLU-conv3x3 of width {WIDTH}, input {list(SHAPE)}, loss `out.pow(2).mean()`, the same
weights in every provider, timed interleaved in one process. `plain`: MemCNN's AdditiveCoupling
as written, without its wrapper (chunk, two adds, cat). invkernels: `InvertibleSequential` of
`ReversibleBlock(32, f=f, g=g)`, stored (`memory_free=False`) and memory-free; and the
single-sided `AdditiveCoupling` with a user half-swap module between them (16 couplings). The
memory-free floor is plain autograd plus one more forward of every subnet: here
{harness.fmt_ratio(floor)} plain.{' Not installed (not timed): ' + ', '.join(missing) if missing else ''}

{harness.markdown_table(["provider", "ms", "vs plain"], rows)}
""")
        ratio = {name: t[name].median / plain for name in t}
        stored, free = ratio["invkernels stored"], ratio["invkernels memory-free"]
        verdicts.append(f"- RevNet stack stored: {stored:.2f}x plain (goal ≤ {GOAL_STORED}x): "
                        f"{'met' if stored <= GOAL_STORED else 'NOT met'}")
        verdicts.append(f"- RevNet stack memory-free: {free:.2f}x plain, {free / floor:.3f}x (plain + one subnet "
                        f"forward) (goal ≤ {GOAL_FLOOR}x): {'met' if free <= GOAL_FLOOR * floor else 'NOT met'}")
        revlib = ratio.get("RevLib ReversibleSequential")
        verdicts.append("- RevNet stack memory-free vs RevLib: " + (
            "RevLib not installed: NOT measured" if revlib is None else
            f"{free:.2f}x vs {revlib:.2f}x plain: {'met' if free < revlib else 'NOT met'}"))
        swap = ratio["invkernels couplings + user swap, memory-free"]
        verdicts.append(f"- couplings + user half swap memory-free: {swap:.2f}x plain (goal ≤ {GOAL_USER_SWAP}x): "
                        f"{'met' if swap <= GOAL_USER_SWAP else 'NOT met'}")
    for e in res.all("network_profile"):
        for name, rows in e["profiles"].items():
            parts.append(f"""### Profile: {name} (top {PROFILE_ROWS} ops by self CPU time, per step)

{harness.markdown_table(["op", "self ms per step", "calls per step"], rows)}
""")
    return "\n".join(parts), verdicts
