"""Whole-network benchmarks (CPU float32, forward+backward), each against what users would pick
instead, in one process:

- a RevNet-style stack of 8 two-sided additive blocks, subnets conv3x3-ReLU-conv3x3 of width 16,
  input [8, 32, 64, 64], loss ``out.pow(2).mean()``, against plain autograd and the peer libraries
  (FrEIA, RevLib, MemCNN; installed as benchmark extras with ``pip install --no-deps``);
- FrEIA's ``AllInOneBlock`` stack against the invkernels equivalent (affine coupling, per-channel
  affine, fixed permutation), stored and memory-free;
- K = 8 Glow steps, memory-free against plain autograd;
- the per-block overhead of each chain on a tiny input, where the tensor work is negligible.

Every memory-free case is also timed against its floor: plain autograd plus one more forward of
every subnet (what rebuilding the activations cannot avoid). Profiles (top ops by self time) of
plain autograd, FrEIA and the invkernels stacks make the glue visible.

A pytest-benchmark suite (``pytest benchmarks/``); :func:`report` is its part of the report.
"""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch
from torch import nn

import harness

RESULT_SECTIONS = {"network", "network_profile", "network_allinone", "network_glow", "network_overhead"}

SHAPE = (8, 32, 64, 64)
DEPTH = 8
WIDTH = 16
PEERS = ("revlib", "memcnn", "FrEIA")
GOAL_STORED = 0.95  # invkernels stored over plain autograd
GOAL_FLOOR = 1.04  # invkernels memory-free over (plain + one forward of every subnet)
GOAL_USER_SWAP = 1.10  # memory-free AdditiveCoupling + a user half swap over its floor
SWAPS_ALONE = "user swaps alone (forward, inverse)"
AIO_SHAPE = (16, 8, 16, 16)
AIO_WIDTH = 32
AIO_CLAMP = 2.0
GOAL_AIO_STORED = 1.3  # FrEIA AllInOneBlock stack over the invkernels equivalent, stored
GOAL_AIO_FREE = 1.0  # invkernels memory-free over FrEIA's (stored) AllInOneBlock stack
GLOW_DEPTH = 8
GOAL_GLOW = 1.03  # memory-free K = GLOW_DEPTH Glow steps over their floor, in this run
OVERHEAD_SHAPE = (2, 4, 2, 2)
OVERHEAD_DEPTH = 16
GOAL_OVERHEAD_US = 100  # memory-free µs per block over plain on the tiny input
PROFILE_STEPS = 3
PROFILE_ROWS = 12


def subnet(channels: int, width: int = WIDTH, out_channels: int | None = None) -> nn.Module:
    return nn.Sequential(nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(width, out_channels or channels, 3, padding=1))


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


class PlainSwapStack(nn.Module):
    """The couplings + user swap network as a user writes it for plain autograd: per subnet
    ``s``, ``y = cat([x1 + s(x2), x2])`` then the half swap."""

    def __init__(self, subnets):
        super().__init__()
        self.subnets = nn.ModuleList(subnets)
        self.swap = HalfSwap()

    def forward(self, x):
        for s in self.subnets:
            x1, x2 = x.chunk(2, dim=1)
            x = self.swap(torch.cat([x1 + s(x2), x2], dim=1))[0]
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


def forward_alone(subnets, h: torch.Tensor):
    """A provider running every subnet once on ``h`` without grad: the extra work of the
    memory-free floor."""

    def run():
        with torch.no_grad():
            for s in subnets:
                s(h)

    return run


def missing_peers() -> list[str]:
    return [p for p in PEERS if importlib.util.find_spec(p) is None]


class ChannelScale(nn.Module):
    """A subnet with almost no tensor work (a per-channel product), for timing the overhead."""

    def __init__(self, channels: int):
        super().__init__()
        self.weight = nn.Parameter(torch.full((1, channels, 1, 1), 0.5))

    def forward(self, x):
        return x * self.weight


def build(device: str = "cpu", shape: tuple[int, ...] = SHAPE, depth: int = DEPTH,
          make_subnet=lambda channels: subnet(channels, WIDTH)):
    """The RevNet-style providers: each a ``() -> output`` of one forward+backward of its stack of
    ``depth`` blocks on ``shape``, from the same subnet weights (``make_subnet(channels)``)."""
    from invkernels.nn import AdditiveCoupling, InvertibleSequential, ReversibleBlock  # noqa: PLC0415

    torch.manual_seed(0)
    half = shape[1] // 2
    fs = [make_subnet(half) for _ in range(depth)]
    gs = [make_subnet(half) for _ in range(depth)]
    x = torch.randn(shape, device=device)

    def fwd_bwd(model, pair):
        def run():
            leaf = x.detach().requires_grad_()
            out = model(leaf)
            (out[0] if pair else out).pow(2).mean().backward()
        return run

    def blocks():
        return [ReversibleBlock(shape[1], f=copy.deepcopy(f), g=copy.deepcopy(g)) for f, g in zip(fs, gs)]

    def swapped():
        out = []
        for f, g in zip(fs, gs):
            for sub in (f, g):
                coupling = AdditiveCoupling(shape[1], "conv", hidden=2)
                coupling.subnet = copy.deepcopy(sub)
                out += [coupling, HalfSwap()]
        return out

    models = {
        "plain": (PlainStack(copy.deepcopy(fs), copy.deepcopy(gs)), False),
        "invkernels stored": (InvertibleSequential(*blocks(), memory_free=False), True),
        "invkernels memory-free": (InvertibleSequential(*blocks(), memory_free=True), True),
        "invkernels couplings + user swap, memory-free": (InvertibleSequential(*swapped(), memory_free=True), True),
        "plain couplings + user swap": (PlainSwapStack([copy.deepcopy(m) for pair in zip(fs, gs) for m in pair]),
                                        False),
    }
    if not missing_peers():
        import FrEIA.framework as Ff  # noqa: PLC0415
        import FrEIA.modules as Fm  # noqa: PLC0415
        import memcnn  # noqa: PLC0415
        import revlib  # noqa: PLC0415

        freia = Ff.SequenceINN(*shape[1:])
        subnets = _FixedSubnets([m for pair in zip(fs, gs) for m in pair])
        for _ in range(depth):
            freia.append(Fm.NICECouplingBlock, subnet_constructor=subnets)
        models["FrEIA NICECouplingBlock (stored)"] = (freia, True)
        halves = [copy.deepcopy(m) for pair in zip(fs, gs) for m in pair]
        models["RevLib ReversibleSequential"] = (revlib.ReversibleSequential(*halves, split_dim=1), False)
        models["MemCNN InvertibleModuleWrapper"] = (nn.Sequential(*[
            memcnn.InvertibleModuleWrapper(memcnn.AdditiveCoupling(Fm=copy.deepcopy(f), Gm=copy.deepcopy(g)),
                                           keep_input=False, keep_input_inverse=False) for f, g in zip(fs, gs)]),
            False)
    providers = {name: fwd_bwd(model.to(device), pair) for name, (model, pair) in models.items()}
    h = torch.randn(shape[0], half, *shape[2:], device=device)

    providers["subnets' forward alone"] = forward_alone([m for pair in zip(fs, gs) for m in pair], h)
    swap = HalfSwap()
    # One input and one output gradient per swap, as in the chain: the swaps move data from and
    # to memory, not within a cache that one reused tensor would stay in.
    swap_inputs = [torch.randn(shape, device=device) for _ in range(2 * depth)]

    def swaps_alone():
        # What the memory-free chain runs of the user's swap modules beyond plain autograd's forward
        # and backward of them: their forward without grad and their inverse (the rebuild).
        with torch.no_grad():
            for a in swap_inputs:
                swap(a)
                swap.inverse(a)

    providers[SWAPS_ALONE] = swaps_alone
    return providers


def _cpu_only(settings) -> None:
    if settings.device != "cpu":
        pytest.skip("the network benchmarks time the CPU")


@pytest.mark.benchmark(group="network")
def test_revnet_stack(benchmark, settings):
    _cpu_only(settings)
    providers = build(settings.device)
    harness.interleaved(benchmark, providers, rounds=settings.rounds, reps=1, device=settings.device,
                        section="network", label=f"{list(SHAPE)}, {DEPTH} blocks", missing=missing_peers())


def build_allinone(device: str = "cpu"):
    """FrEIA's ``AllInOneBlock(permute_soft=False)`` stack (its defaults otherwise: clamp 2.0, a
    softplus per-channel affine, a fixed random permutation) and the invkernels equivalent,
    ``AffineCoupling(clamp=2.0)`` + ``ActNorm`` + ``Permute("random")``, with the same subnets
    (last layer drawn small, as trained flows start); loss ``y.pow(2).mean() - logdet.mean()``."""
    from invkernels.nn import ActNorm, AffineCoupling, InvertibleSequential, Permute  # noqa: PLC0415

    torch.manual_seed(0)
    channels = AIO_SHAPE[1]
    c1, c2 = channels - channels // 2, channels // 2
    subs = [subnet(c1, AIO_WIDTH, 2 * c2) for _ in range(DEPTH)]
    for s in subs:
        nn.init.normal_(s[-1].weight, std=0.01)
    x = torch.randn(AIO_SHAPE, device=device)

    def fwd_bwd(model):
        def run():
            leaf = x.detach().requires_grad_()
            y, logdet = model(leaf)
            (y.pow(2).mean() - logdet.mean()).backward()
        return run

    def stack(memory_free: bool):
        blocks = []
        for s in subs:
            actnorm = ActNorm(channels)
            actnorm.mark_initialized()
            blocks += [AffineCoupling(channels, _FixedSubnets([s]), clamp=AIO_CLAMP), actnorm,
                       Permute(channels, "random")]
        return InvertibleSequential(*blocks, memory_free=memory_free)

    models = {"invkernels stored": stack(False), "invkernels memory-free": stack(True)}
    if importlib.util.find_spec("FrEIA") is not None:
        import FrEIA.framework as Ff  # noqa: PLC0415
        import FrEIA.modules as Fm  # noqa: PLC0415

        import invkernels.compat.freia as Cm  # noqa: PLC0415

        freia = Ff.SequenceINN(*AIO_SHAPE[1:])
        constructor = _FixedSubnets(subs)
        for _ in range(DEPTH):
            freia.append(Fm.AllInOneBlock, subnet_constructor=constructor, affine_clamping=AIO_CLAMP,
                         permute_soft=False)
        models = {"FrEIA AllInOneBlock (stored)": freia, **models}
        for memory_free in (False, True):
            # The drop-in: FrEIA's network with one import changed (the compat blocks follow FrEIA's main
            # branch, which permutes by index where the installed FrEIA multiplies by a permutation matrix).
            compat = Cm.SequenceINN(*AIO_SHAPE[1:], memory_free=memory_free)
            constructor = _FixedSubnets(subs)
            for _ in range(DEPTH):
                compat.append(Cm.AllInOneBlock, subnet_constructor=constructor, affine_clamping=AIO_CLAMP,
                              permute_soft=False)
            models[f"invkernels.compat.freia {'memory-free' if memory_free else 'stored'}"] = compat
    providers = {name: fwd_bwd(model.to(device)) for name, model in models.items()}
    h = torch.randn(AIO_SHAPE[0], c1, *AIO_SHAPE[2:], device=device)

    providers["subnets' forward alone"] = forward_alone(subs, h)
    return providers


def build_glow(device: str = "cpu"):
    """K = GLOW_DEPTH Glow steps of the memory benchmark, plain autograd and memory-free, and the
    coupling subnets' forward alone (for the floor)."""
    import bench_memory  # noqa: PLC0415

    providers = {"plain": bench_memory.build(GLOW_DEPTH, "plain", device)[2]}
    model, _, providers["invkernels memory-free"], x = bench_memory.build(GLOW_DEPTH, "memory_free", device)
    subnets = [step.coupling.subnet for step in model.blocks]
    h = torch.randn(x.shape[0], model.blocks[0].coupling.c1, *x.shape[2:], device=device)

    providers["subnets' forward alone"] = forward_alone(subnets, h)
    return providers


@pytest.mark.benchmark(group="network")
def test_allinone_stack(benchmark, settings):
    _cpu_only(settings)
    missing = [] if importlib.util.find_spec("FrEIA") is not None else ["FrEIA"]
    harness.interleaved(benchmark, build_allinone(settings.device), rounds=settings.rounds, reps=5,
                        device=settings.device, section="network_allinone",
                        label=f"{list(AIO_SHAPE)}, {DEPTH} blocks", missing=missing)


@pytest.mark.benchmark(group="network")
def test_glow_stack(benchmark, settings):
    _cpu_only(settings)
    import bench_memory  # noqa: PLC0415

    harness.interleaved(benchmark, build_glow(settings.device), rounds=settings.rounds, reps=1,
                        device=settings.device, section="network_glow",
                        label=f"{list(bench_memory.SHAPE)}, K = {GLOW_DEPTH}")


@pytest.mark.benchmark(group="network")
def test_block_overhead(benchmark, settings):
    """The RevNet-style stacks on a tiny input with :class:`ChannelScale` subnets: the time per
    block is the overhead of each chain's layers (autograd nodes, Python, small allocations)."""
    _cpu_only(settings)
    providers = build(settings.device, OVERHEAD_SHAPE, OVERHEAD_DEPTH, ChannelScale)
    del providers["subnets' forward alone"], providers[SWAPS_ALONE]
    harness.interleaved(benchmark, providers, rounds=settings.rounds, reps=20, device=settings.device,
                        section="network_overhead", label=f"{list(OVERHEAD_SHAPE)}, {OVERHEAD_DEPTH} blocks",
                        missing=missing_peers())


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
    _cpu_only(settings)
    providers = build(settings.device)
    chosen = ("plain", "invkernels memory-free")
    harness.record_once(benchmark, lambda: {"profiles": {name: _profile(providers[name]) for name in chosen}},
                        section="network_profile", stack="RevNet-style stack")


@pytest.mark.benchmark(group="network")
def test_allinone_profiles(benchmark, settings):
    _cpu_only(settings)
    providers = build_allinone(settings.device)
    chosen = [name for name in ("FrEIA AllInOneBlock (stored)", "invkernels stored", "invkernels memory-free")
              if name in providers]
    harness.record_once(benchmark, lambda: {"profiles": {name: _profile(providers[name]) for name in chosen}},
                        section="network_profile", stack="AllInOneBlock stack")


def report(res: harness.Results) -> tuple[str, list[str]]:
    """The whole-network part of the report and its goal verdicts."""
    parts, verdicts = [], []
    for e in res.all("network"):
        t = res.timings(e)
        plain = t["plain"].median
        sub = t["subnets' forward alone"].median
        rows = [[name, harness.fmt_ms(t[name]), f"{t[name].median / plain:.2f}x"] for name in t]
        floor = (plain + sub) / plain
        swap_floor = (t["plain couplings + user swap"].median + sub + t[SWAPS_ALONE].median) / plain
        missing = e.get("missing") or []
        parts.append(f"""## Whole network: RevNet-style stack (CPU, float32, forward+backward)

{DEPTH} two-sided additive blocks (`y1 = x1 + f(x2)`, `y2 = x2 + g(y1)`), subnets
conv3x3-ReLU-conv3x3 of width {WIDTH}, input {list(SHAPE)}, loss `out.pow(2).mean()`, the same
weights in every provider, timed interleaved in one process. `plain`: MemCNN's AdditiveCoupling
as written, without its wrapper (chunk, two adds, cat). invkernels: `InvertibleSequential` of
`ReversibleBlock(32, f=f, g=g)`, stored (`memory_free=False`) and memory-free; and the
single-sided `AdditiveCoupling` with a user half-swap module between them (16 couplings), and
that network written for plain autograd (`plain couplings + user swap`: `cat([x1 + s(x2), x2])`
then the swap, per subnet). The memory-free floor is plain autograd of the same network plus one
more forward of every subnet: here {harness.fmt_ratio(floor)} plain. With the user's swap modules,
the chain also runs each swap's forward without grad and its inverse (the rebuild; timed alone,
each swap on an input of its own), so their floor is `plain couplings + user swap` + the subnets'
forward + those swaps: {harness.fmt_ratio(swap_floor)} plain.{' Not installed (not timed): ' + ', '.join(missing) if missing else ''}

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
        verdicts.append(f"- couplings + user half swap memory-free: {swap:.2f}x plain, {swap / swap_floor:.3f}x its "
                        f"floor {swap_floor:.2f}x (goal ≤ {GOAL_USER_SWAP}x its floor): "
                        f"{'met' if swap <= GOAL_USER_SWAP * swap_floor else 'NOT met'}")
    for e in res.all("network_allinone"):
        t = res.timings(e)
        sub = t.pop("subnets' forward alone").median
        freia = t.get("FrEIA AllInOneBlock (stored)")
        base = freia.median if freia is not None else t["invkernels stored"].median
        rows = [[name, harness.fmt_ms(t[name]), f"{base / t[name].median:.2f}x"] for name in t]
        parts.append(f"""## Whole network: FrEIA AllInOneBlock stack and the invkernels equivalent (CPU, float32)

{DEPTH} blocks on {list(AIO_SHAPE)}: FrEIA `AllInOneBlock(permute_soft=False)` (clamp {AIO_CLAMP}, its
softplus per-channel affine, a fixed permutation applied as a 1x1 convolution) against
`InvertibleSequential` of `AffineCoupling(clamp={AIO_CLAMP})` + `ActNorm` + `Permute("random")`, the same
subnets conv3x3-ReLU-conv3x3 of width {AIO_WIDTH} (last layer drawn with std 0.01), loss
`y.pow(2).mean() - logdet.mean()`, forward+backward; and FrEIA's network with one import changed
(`invkernels.compat.freia`, the same subnets), stored and memory-free (not goals of their own). Speed-up = FrEIA time / provider time. The
subnets' forward alone takes {sub:.2f} ms.{' FrEIA not installed (not timed).' if freia is None else ''}

{harness.markdown_table(["provider", "ms", "speed-up vs FrEIA" if freia is not None else "vs invkernels stored"], rows)}
""")
        if freia is None:
            verdicts.append("- AllInOneBlock stack: FrEIA not installed: NOT measured")
            continue
        stored = freia.median / t["invkernels stored"].median
        free = t["invkernels memory-free"].median / freia.median
        verdicts.append(f"- AllInOneBlock stack stored: {stored:.2f}x faster than FrEIA (goal ≥ {GOAL_AIO_STORED}x): "
                        f"{'met' if stored >= GOAL_AIO_STORED else 'NOT met'}")
        verdicts.append(f"- AllInOneBlock stack memory-free: {free:.2f}x FrEIA's stored time "
                        f"(goal ≤ {GOAL_AIO_FREE}x, as fast as FrEIA stored): {'met' if free <= GOAL_AIO_FREE else 'NOT met'}")
    for e in res.all("network_glow"):
        import bench_memory  # noqa: PLC0415

        t = res.timings(e)
        plain = t["plain"].median
        floor = (plain + t["subnets' forward alone"].median) / plain
        rows = [[name, harness.fmt_ms(t[name]), f"{t[name].median / plain:.2f}x"] for name in t]
        free = t["invkernels memory-free"].median / plain
        parts.append(f"""## Whole network: K = {GLOW_DEPTH} Glow steps (CPU, float32)

The memory benchmark's K = {GLOW_DEPTH} `GlowStep(64, hidden={bench_memory.HIDDEN})` on
{list(bench_memory.SHAPE)}, forward+backward with the gradients of x and every parameter, timed here
interleaved in the same process: plain autograd (`memory_free=False`) and memory-free. Floor of
memory-free (plain + one forward of every coupling subnet): {harness.fmt_ratio(floor)} plain.

{harness.markdown_table(["provider", "ms", "vs plain"], rows)}
""")
        verdicts.append(f"- K={GLOW_DEPTH} Glow steps memory-free (network run): {free:.2f}x plain, "
                        f"{free / floor:.3f}x its floor (goal ≤ {GOAL_GLOW}x its floor): "
                        f"{'met' if free <= GOAL_GLOW * floor else 'NOT met'}")
    for e in res.all("network_overhead"):
        t = res.timings(e)
        plain = t["plain"].median
        rows = [[name, f"{t[name].median * 1e3 / OVERHEAD_DEPTH:.0f}",
                 f"{(t[name].median - plain) * 1e3 / OVERHEAD_DEPTH:+.0f}"] for name in t]
        missing = e.get("missing") or []
        parts.append(f"""## Per-block overhead (RevNet-style stack on a tiny input)

The providers of the RevNet-style table with {OVERHEAD_DEPTH} blocks on {list(OVERHEAD_SHAPE)}, each subnet a
per-channel product (`ChannelScale`): the tensor work is negligible, so the time per block is the
overhead of each chain's layers (autograd nodes, Python, allocations) per forward+backward.{' Not installed (not timed): ' + ', '.join(missing) if missing else ''}

{harness.markdown_table(["provider", "µs per block", "µs per block over plain"], rows)}
""")
        over = (t["invkernels memory-free"].median - plain) * 1e3 / OVERHEAD_DEPTH
        verdicts.append(f"- per-block overhead, memory-free: {over:+.0f} µs over plain "
                        f"(goal ≤ +{GOAL_OVERHEAD_US} µs): {'met' if over <= GOAL_OVERHEAD_US else 'NOT met'}")
    if res.all("network_profile"):
        parts.append(f"""## Profiles: where the glue goes

{PROFILE_STEPS} forward+backward steps of each stack under `torch.profiler`, the top {PROFILE_ROWS} ops by self
CPU time per step (the profiler's own overhead included). Rows other than the convolutions and
the ReLUs are glue.
""")
    for e in res.all("network_profile"):
        for name, rows in e["profiles"].items():
            parts.append(f"""### Profile, {e.get('stack', 'RevNet-style stack')}: {name} (top {PROFILE_ROWS} ops by self CPU time, per step)

{harness.markdown_table(["op", "self ms per step", "calls per step"], rows)}
""")
    return "\n".join(parts), verdicts
