"""Tabular flows (CPU float32, forward+backward of the negative log-likelihood), invkernels against a
hand-written PyTorch flow and the peer libraries nflows and zuko (installed with ``pip install
--no-deps``), in one process.

The architecture is the same in every provider: RealNVP-style, :data:`DEPTH` blocks on ``D``
features, each a fixed random permutation of the features (the same permutations everywhere) and a
coupling that passes ``x1 = x[:, :D // 2]`` through and transforms the other ``D - D // 2`` features
with a subnet MLP ``Linear(D // 2, 64)-ReLU-Linear(64, 64)-ReLU-Linear(64, out)`` (the same weights
everywhere, the last layer drawn with std 0.01 so that the flow is not the identity): affine,
``y2 = x2 * exp(log s) + t`` with ``(h_s, t)`` the subnet's output and ``log s = 2 tanh(h_s / 2)``
(``AffineCoupling``'s default ``scale="exp"``, clamp 2), or additive, ``y2 = x2 + t``. Loss
``-(log N(z; 0, I) + logdet).mean()``; one timed call is its forward and backward (gradients of
the parameters, accumulated). Shapes [512, 8] and [4096, 32].

Providers:

- ``hand-written``: plain PyTorch (``x[:, perm]``, slices, the subnet, ``chunk``, ``tanh``/``exp``,
  ``cat``, log-det sums), autograd storing the activations;
- ``invkernels stored`` / ``invkernels memory-free``: ``InvertibleSequential`` of
  ``Permute(D, perm=...)`` + ``AffineCoupling(D, subnet)`` / ``AdditiveCoupling(D, subnet)``, with
  ``memory_free=False`` / ``True``;
- ``nflows``: ``nflows.flows.base.Flow`` of a ``CompositeTransform`` of ``Permutation`` +
  ``AffineCouplingTransform`` / ``AdditiveCouplingTransform`` (mask 1 on the last ``D - D // 2``
  features: nflows transforms the features where the mask is positive and feeds the others, in
  order, to the net), base ``StandardNormal``; the subnet in a module that drops nflows' ``context``
  argument; loss ``-flow.log_prob(x).mean()``;
- ``zuko``: ``zuko.flows.Flow`` of ``UnconditionalTransform(PermutationTransform, perm)`` +
  ``GeneralCouplingTransform`` (mask true on the first ``D // 2`` features: zuko keeps the features
  where the mask is true), zuko's own ``MLP`` with hidden features (64, 64) loaded with the subnet's
  weights, ``univariate=MonotonicAffineTransform`` (affine, zuko's default) or
  ``AdditiveTransform`` (additive), base ``DiagNormal(0, 1)``; loss ``-flow().log_prob(x).mean()``.

The peers' affine couplings use scales of their own, so their affine flows compute other functions
of the same weights: nflows ``s = sigmoid(h_s + 2) + 1e-3`` with its net's output ordered
``(t, h_s)``, zuko ``log s = h_s / (1 + |h_s| / log 1000)`` with the output interleaved per feature
``(t_j, h_s_j)``. Their copies of the last layer are reordered to those layouts, so every provider
reads the same ``h_s`` and ``t``. At build time every NLL is checked against a reference (relative
:data:`CHECK_RTOL`): the hand-written flow for the invkernels providers and for the peers' additive
flows; for the peers' affine flows the invkernels stored flow with the peer's scale function
(``AffineCoupling(scale="sigmoid_eps")`` for nflows, ``scale="rational", clamp=log 1000`` for zuko),
which checks that their masks, permutations and layouts implement the same architecture.

A profile (top ops by self CPU time) of ``invkernels stored`` and ``hand-written`` at [512, 8],
affine, shows the glue. A pytest-benchmark suite (``pytest benchmarks/``); :func:`report` is its
part of the report.
"""

from __future__ import annotations

import copy
import importlib.util
import math

import pytest
import torch
from torch import nn

import bench_network
import harness

RESULT_SECTIONS = {"tabular", "tabular_profile"}

SHAPES = ((512, 8), (4096, 32))
KINDS = ("affine", "additive")
DEPTH = 10
HIDDEN = 64
CLAMP = 2.0
LAST_STD = 0.01
ZUKO_CLAMP = math.log(1e3)  # zuko's MonotonicAffineTransform, slope 1e-3: |log s| < log 1000
PEERS = ("nflows", "zuko")
# Timed calls per provider per round: a round of the five providers takes about 50-100 ms at [512, 8]
# (2 threads); at [4096, 32] one call each already takes about 200 ms.
REPS = {(512, 8): 3, (4096, 32): 1}
CHECK_RTOL = 1e-4
GOAL_STORED = 0.9  # invkernels stored over hand-written
GOAL_PEER = 1.3  # the faster of nflows and zuko over invkernels stored
GOAL_FREE = 1.0  # invkernels memory-free over the faster of nflows and zuko
GOAL_SHAPE = (512, 8)  # the goals' shape; the others' verdicts are reported alike

HAND = "hand-written"
STORED = "invkernels stored"
FREE = "invkernels memory-free"
PROVIDERS = (HAND, STORED, FREE, *PEERS)


def mlp(c_in: int, c_out: int) -> nn.Sequential:
    net = nn.Sequential(nn.Linear(c_in, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, HIDDEN), nn.ReLU(),
                        nn.Linear(HIDDEN, c_out))
    nn.init.normal_(net[-1].weight, std=LAST_STD)
    return net


def reordered(net: nn.Sequential, rows: torch.Tensor | None) -> nn.Sequential:
    """A copy of ``net`` whose last layer's outputs come in the order ``rows`` (None: as they are)."""
    net = copy.deepcopy(net)
    if rows is not None:
        with torch.no_grad():
            net[-1].weight.copy_(net[-1].weight[rows])
            net[-1].bias.copy_(net[-1].bias[rows])
    return net


def gaussian_nll(z: torch.Tensor, logdet: torch.Tensor) -> torch.Tensor:
    return (0.5 * z.pow(2).sum(dim=1) + 0.5 * z.shape[1] * math.log(2 * math.pi) - logdet).mean()


def missing_peers() -> list[str]:
    return [p for p in PEERS if importlib.util.find_spec(p) is None]


class HandWrittenFlow(nn.Module):
    """The flow as a user writes it in plain PyTorch."""

    def __init__(self, perms, subnets, affine: bool):
        super().__init__()
        self.perms = [p.clone() for p in perms]
        self.subnets = nn.ModuleList(copy.deepcopy(s) for s in subnets)
        self.affine = affine

    def forward(self, x):
        c1 = x.shape[1] // 2
        logdet = x.new_zeros(x.shape[0])
        for perm, net in zip(self.perms, self.subnets):
            x = x[:, perm]
            x1, x2 = x[:, :c1], x[:, c1:]
            h = net(x1)
            if self.affine:
                hs, t = h.chunk(2, dim=1)
                log_s = CLAMP * torch.tanh(hs / CLAMP)
                x2 = x2 * torch.exp(log_s) + t
                logdet = logdet + log_s.sum(dim=1)
            else:
                x2 = x2 + h
            x = torch.cat([x1, x2], dim=1)
        return x, logdet


class _NoContext(nn.Module):
    """nflows calls its coupling nets as ``net(x, context)``."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x, context=None):
        return self.net(x)


def invkernels_flow(features: int, perms, subnets, affine: bool, memory_free: bool, scale: str = "exp",
                    clamp: float = CLAMP):
    from invkernels.nn import AdditiveCoupling, AffineCoupling, InvertibleSequential, Permute  # noqa: PLC0415

    blocks = []
    for perm, net in zip(perms, subnets):
        subnet = bench_network._FixedSubnets([net])
        coupling = (AffineCoupling(features, subnet, scale=scale, clamp=clamp) if affine
                    else AdditiveCoupling(features, subnet))
        blocks += [Permute(features, perm=perm), coupling]
    return InvertibleSequential(*blocks, memory_free=memory_free)


def nflows_flow(features: int, perms, subnets, affine: bool):
    from nflows.distributions.normal import StandardNormal  # noqa: PLC0415
    from nflows.flows.base import Flow  # noqa: PLC0415
    from nflows.transforms.base import CompositeTransform  # noqa: PLC0415
    from nflows.transforms.coupling import AdditiveCouplingTransform, AffineCouplingTransform  # noqa: PLC0415
    from nflows.transforms.permutations import Permutation  # noqa: PLC0415

    c1 = features // 2
    c2 = features - c1
    rows = torch.cat([torch.arange(c2, 2 * c2), torch.arange(c2)]) if affine else None
    mask = (torch.arange(features) >= c1).int()
    coupling = AffineCouplingTransform if affine else AdditiveCouplingTransform
    transforms = []
    for perm, net in zip(perms, subnets):
        transforms += [Permutation(perm.clone()),
                       coupling(mask, lambda c_in, c_out, net=net: _NoContext(reordered(net, rows)))]
    return Flow(CompositeTransform(transforms), StandardNormal([features]))


def zuko_flow(features: int, perms, subnets, affine: bool):
    from zuko.distributions import DiagNormal  # noqa: PLC0415
    from zuko.flows import Flow, GeneralCouplingTransform  # noqa: PLC0415
    from zuko.flows import UnconditionalDistribution, UnconditionalTransform  # noqa: PLC0415
    from zuko.transforms import AdditiveTransform, MonotonicAffineTransform, PermutationTransform  # noqa: PLC0415

    c1 = features // 2
    c2 = features - c1
    rows = torch.stack([torch.arange(c2, 2 * c2), torch.arange(c2)], dim=1).flatten() if affine else None
    univariate = dict(univariate=MonotonicAffineTransform, shapes=((), ())) if affine else \
        dict(univariate=AdditiveTransform, shapes=((),))
    transforms = []
    for perm, net in zip(perms, subnets):
        coupling = GeneralCouplingTransform(features, mask=torch.arange(features) < c1,
                                            hidden_features=(HIDDEN, HIDDEN), **univariate)
        coupling.hyper.load_state_dict(reordered(net, rows).state_dict())
        transforms += [UnconditionalTransform(PermutationTransform, perm.clone(), buffer=True), coupling]
    base = UnconditionalDistribution(DiagNormal, torch.zeros(features), torch.ones(features), buffer=True)
    return Flow(transforms, base)


def build(shape: tuple[int, int] = SHAPES[0], kind: str = "affine", device: str = "cpu"):
    """The providers at ``shape`` = (batch, D) with ``kind`` couplings: each a ``() -> None`` of one
    forward+backward of its NLL, from the same permutations and subnet weights. Raises
    AssertionError when a provider's NLL differs from its reference (see the module docstring)."""
    torch.manual_seed(0)
    features = shape[1]
    affine = kind == "affine"
    c1 = features // 2
    c2 = features - c1
    perms = [torch.randperm(features) for _ in range(DEPTH)]
    subnets = [mlp(c1, (2 if affine else 1) * c2) for _ in range(DEPTH)]
    x = torch.randn(shape, device=device)

    def flow_nll(model):
        return lambda: gaussian_nll(*model(x))

    nlls = {HAND: flow_nll(HandWrittenFlow(perms, subnets, affine).to(device)),
            STORED: flow_nll(invkernels_flow(features, perms, subnets, affine, False).to(device)),
            FREE: flow_nll(invkernels_flow(features, perms, subnets, affine, True).to(device))}
    references = dict.fromkeys(nlls, HAND)
    peer_scales = {"nflows": ("sigmoid_eps", CLAMP), "zuko": ("rational", ZUKO_CLAMP)}
    missing = missing_peers()
    if "nflows" not in missing:
        flow = nflows_flow(features, perms, subnets, affine).to(device)
        nlls["nflows"] = lambda: -flow.log_prob(x).mean()
    if "zuko" not in missing:
        lazy = zuko_flow(features, perms, subnets, affine).to(device)
        nlls["zuko"] = lambda: -lazy().log_prob(x).mean()
    for peer in PEERS:
        if peer in nlls:
            references[peer] = HAND
            if affine:
                scale, clamp = peer_scales[peer]
                references[peer] = f"invkernels stored, scale={scale!r}"
                nlls[references[peer]] = flow_nll(invkernels_flow(features, perms, subnets, True, False, scale,
                                                                  clamp).to(device))
    values = {name: nll().item() for name, nll in nlls.items()}
    for name, ref in references.items():
        assert math.isclose(values[name], values[ref], rel_tol=CHECK_RTOL), (
            f"tabular {list(shape)} {kind}: {name} NLL {values[name]!r} differs from {ref}'s {values[ref]!r}")

    def fwd_bwd(nll):
        def run():
            nll().backward()
        return run

    return {name: fwd_bwd(nlls[name]) for name in PROVIDERS if name in nlls}


def _cpu_only(settings) -> None:
    if settings.device != "cpu":
        pytest.skip("the tabular benchmarks time the CPU")


@pytest.mark.benchmark(group="tabular")
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_tabular_flow(benchmark, settings, shape, kind):
    _cpu_only(settings)
    harness.interleaved(benchmark, build(shape, kind, settings.device), rounds=settings.rounds, reps=REPS[shape],
                        device=settings.device, section="tabular", label=f"{list(shape)}", mode=kind,
                        missing=missing_peers())


@pytest.mark.benchmark(group="tabular")
def test_tabular_profiles(benchmark, settings):
    _cpu_only(settings)
    providers = build(GOAL_SHAPE, "affine", settings.device)
    harness.record_once(benchmark, lambda: {"profiles": {name: bench_network._profile(providers[name])
                                                         for name in (STORED, HAND)}},
                        section="tabular_profile", stack=f"tabular flow {list(GOAL_SHAPE)}, affine")


def _faster_peer(t: dict[str, harness.Timing]) -> str | None:
    timed = [p for p in PEERS if p in t]
    return min(timed, key=lambda p: t[p].median) if timed else None


def _verdict(what: str, value: float | None, describe, met) -> str:
    """``- what: describe(value): met/NOT met`` (``met(value)``), or failed when ``value`` is None."""
    if value is None:
        return f"- {what}: failed: NOT met"
    return f"- {what}: {describe(value)}: {'met' if met(value) else 'NOT met'}"


def _verdicts(e: dict, t: dict[str, harness.Timing]) -> list[str]:
    what = f"tabular {e['label']} {e['mode']}" + ("" if e["label"] == f"{list(GOAL_SHAPE)}" else " (reported)")
    out = [_verdict(f"{what} stored", harness.ratio(t, STORED, HAND),
                    lambda r: f"{r:.2f}x hand-written (goal ≤ {GOAL_STORED}x)", lambda r: r <= GOAL_STORED)]
    peer = _faster_peer(t)
    if peer is None:
        missing = e.get("missing") or []
        why = f"{', '.join(missing)} not installed: NOT measured" if missing else "nflows and zuko failed: NOT met"
        return out + [f"- {what} vs nflows and zuko: {why}"]
    free = harness.ratio(t, FREE, HAND)
    out.append(_verdict(f"{what} stored", harness.ratio(t, peer, STORED),
                        lambda r: f"{r:.2f}x faster than {peer}, the faster peer (goal ≥ {GOAL_PEER}x)",
                        lambda r: r >= GOAL_PEER))
    out.append(_verdict(f"{what} memory-free", harness.ratio(t, FREE, peer),
                        lambda r: f"{r:.2f}x the time of {peer}, the faster peer (goal ≤ {GOAL_FREE}x)"
                        + ("" if free is None else f"; {free:.2f}x hand-written"), lambda r: r <= GOAL_FREE))
    return out


def report(res: harness.Results) -> tuple[str, list[str]]:
    """The tabular part of the report and its goal verdicts."""
    parts, verdicts = [], []
    entries = res.all("tabular")
    if entries:
        missing = sorted({p for e in entries for p in e.get("missing") or []})
        parts.append(f"""## Tabular flows: RealNVP-style couplings with permutations (CPU, float32)

{DEPTH} blocks on D features, each a fixed random permutation and a coupling that passes
`x[:, :D // 2]` through and transforms the rest with an MLP
`Linear(D // 2, {HIDDEN})-ReLU-Linear({HIDDEN}, {HIDDEN})-ReLU-Linear` (the same permutations and weights in every
provider, last layer drawn with std {LAST_STD}); affine
(`log s = {CLAMP:g} tanh(h_s / {CLAMP:g})`) or additive. Loss `-(log N(z; 0, I) + logdet).mean()`, forward+backward,
timed interleaved in one process. `hand-written`: plain PyTorch (index, slices, chunk, tanh, exp,
cat); invkernels: `InvertibleSequential` of `Permute(D, perm=...)` + `AffineCoupling` /
`AdditiveCoupling`, stored (`memory_free=False`) and memory-free; `nflows`: `Flow` of `Permutation` +
`AffineCouplingTransform` / `AdditiveCouplingTransform`; `zuko`: `Flow` of `PermutationTransform` +
`GeneralCouplingTransform` (its own MLP with these weights). The peers' affine couplings compute their
own scales from the same subnet outputs (nflows `sigmoid(h_s + 2) + 1e-3`, zuko
`log s = h_s / (1 + |h_s| / log 1000)`); every provider's NLL was checked at build time against the same
function written with the hand-written flow or invkernels (relative {CHECK_RTOL:g}). Ratios are time
over the hand-written flow's and over the faster of nflows and zuko (below 1: faster).{
' Not installed (not timed): ' + ', '.join(missing) if missing else ''}
""")
    for shape in SHAPES:
        label = f"{list(shape)}"
        rows = []
        for kind in KINDS:
            for e in [e for e in entries if e["label"] == label and e["mode"] == kind]:
                t = res.timings(e)
                peer = _faster_peer(t)
                names = [n for n in PROVIDERS if n in t or n in e.get("failed", {})]
                rows += [[kind, name, harness.fmt_ms(t.get(name)), harness.fmt_ratio(harness.ratio(t, name, HAND)),
                          harness.fmt_ratio(harness.ratio(t, name, peer)) + (f" ({peer})" if peer else "")
                          if name in (STORED, FREE) else ""] for name in names]
                if kind == "affine":
                    verdicts += _verdicts(e, t)
        if rows:
            parts.append(f"""### Tabular flow {label}, {DEPTH} blocks

{harness.markdown_table(["coupling", "provider", "ms", "vs hand-written", "vs faster peer"], rows)}
""")
    steps, top = bench_network.PROFILE_STEPS, bench_network.PROFILE_ROWS
    if res.all("tabular_profile"):
        parts.append(f"""### Profiles: where the glue goes ({list(GOAL_SHAPE)}, affine)

{steps} forward+backward steps of each flow under `torch.profiler`, the top {top} ops by self
CPU time per step (the profiler's own overhead included): the matrix products and the ReLUs are the
subnets, the rest is the couplings and their glue.
""")
    for e in res.all("tabular_profile"):
        for name, rows in e["profiles"].items():
            stack = e.get("stack", "tabular flow")
            parts.append(f"""#### Profile, {stack}: {name} (top {top} ops by self CPU time, per step)

{harness.markdown_table(["op", "self ms per step", "calls per step"], rows)}
""")
    return "\n".join(parts), verdicts
