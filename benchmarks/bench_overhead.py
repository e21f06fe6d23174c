"""Fixed cost per call of each layer, on an input so small that the arithmetic is negligible: the
path from ``nn.Module`` call to kernel (argument checks, dispatch, autograd, log-det), next to an
aten op of the same size and to the layer's fused op called by itself.

Each layer runs on ``x`` of shape :data:`SHAPE` (CPU, float32), couplings and ``ReversibleBlock``
with :class:`Tile` subnets (a product, timed alone too). Providers, timed interleaved in one process:

- ``aten add``: ``torch.add`` of two tensors of ``x``'s shape, without grad; ``aten add fwd+bwd``:
  the same with grad, then ``backward`` of its sum;
- ``<layer>: op``: the layer's fused op through the dispatcher (``torch.ops.invkernels``), inputs
  without grad; ``<layer>: functional``: the same through ``invkernels.ops`` (its Python wrapper);
- ``<layer>: subnet``: the layer's subnet(s) alone, without grad;
- ``<layer>: module``: the module's forward without grad; ``<layer>: module fwd+bwd``: forward with
  grad, then ``backward`` of ``y.sum() + logdet.sum()`` (gradients of ``x`` and the parameters).

A pytest-benchmark suite (``pytest benchmarks/``); :func:`report` is its part of the report.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import harness

RESULT_SECTIONS = {"call_overhead"}

SHAPE = (2, 4, 2, 2)
REPS = 200
ATEN, ATEN_GRAD = "aten add", "aten add fwd+bwd"
LAYERS = ("AffineCoupling", "AdditiveCoupling", "ActNorm", "InvConv1x1", "Permute", "ReversibleBlock")
COLUMNS = ("op", "functional", "subnet", "module", "module fwd+bwd")


class Tile(nn.Module):
    """A subnet with almost no arithmetic: its input tiled to ``c_out`` channels times a per-channel
    weight (``c_out`` a multiple of ``c_in``)."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.repeats = c_out // c_in
        self.weight = nn.Parameter(torch.full((1, c_out, 1, 1), 0.1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.repeat(1, self.repeats, 1, 1) * self.weight


def _layers() -> dict[str, tuple[nn.Module, list[nn.Module]]]:
    """Each layer and its subnets."""
    from invkernels.nn import ActNorm, AdditiveCoupling, AffineCoupling, InvConv1x1, Permute  # noqa: PLC0415
    from invkernels.nn import ReversibleBlock  # noqa: PLC0415

    channels = SHAPE[1]
    actnorm = ActNorm(channels)
    actnorm.mark_initialized()
    layers = {"AffineCoupling": AffineCoupling(channels, Tile), "AdditiveCoupling": AdditiveCoupling(channels, Tile),
              "ActNorm": actnorm, "InvConv1x1": InvConv1x1(channels), "Permute": Permute(channels, "random"),
              "ReversibleBlock": ReversibleBlock(channels, Tile)}
    subnets = {"AffineCoupling": ["subnet"], "AdditiveCoupling": ["subnet"], "ReversibleBlock": ["f", "g"]}
    return {name: (layer, [getattr(layer, s) for s in subnets.get(name, [])]) for name, layer in layers.items()}


def build(device: str = "cpu") -> dict:
    """The providers: each a ``() -> object`` of one call."""
    import invkernels.ops as F  # noqa: PLC0415

    torch.manual_seed(0)
    x = torch.randn(SHAPE, device=device)
    leaf = x.clone().requires_grad_()
    ops = torch.ops.invkernels
    half = SHAPE[1] // 2
    h_affine = 0.1 * torch.randn(SHAPE[0], SHAPE[1], *SHAPE[2:], device=device)
    h_additive = torch.randn(SHAPE[0], SHAPE[1] - half, *SHAPE[2:], device=device)

    def no_grad(fn):
        def run():
            with torch.no_grad():
                return fn()
        return run

    def aten_grad():
        leaf.grad = None
        torch.add(leaf, leaf).sum().backward()

    providers = {ATEN: no_grad(lambda: torch.add(x, x)), ATEN_GRAD: aten_grad}
    layers = _layers()
    actnorm = layers["ActNorm"][0]
    fused = {
        "AffineCoupling": (lambda: ops.affine_coupling_fwd(x, h_affine, "exp", 2.0, half),
                           lambda: F.affine_coupling_fwd(x, h_affine, "exp", 2.0, half)),
        "AdditiveCoupling": (lambda: ops.additive_coupling_fwd(x, h_additive, half),
                             lambda: F.additive_coupling_fwd(x, h_additive, half)),
        "ActNorm": (lambda: ops.actnorm_fwd(x, actnorm.bias, actnorm.log_scale),
                    lambda: F.actnorm_fwd(x, actnorm.bias, actnorm.log_scale)),
    }
    for name, (layer, subnets) in layers.items():
        layer.to(device)
        if name in fused:
            providers[f"{name}: op"] = no_grad(fused[name][0])
            providers[f"{name}: functional"] = no_grad(fused[name][1])
        if subnets:
            inputs = [x[:, : half] for _ in subnets]
            providers[f"{name}: subnet"] = no_grad(lambda subnets=subnets, inputs=inputs: [
                s(a) for s, a in zip(subnets, inputs)])
        providers[f"{name}: module"] = no_grad(lambda layer=layer: layer(x))

        def fwd_bwd(layer=layer):
            leaf.grad = None
            y, logdet = layer(leaf)
            (y.sum() + logdet.sum()).backward()

        providers[f"{name}: module fwd+bwd"] = fwd_bwd
    return providers


@pytest.mark.benchmark(group="call_overhead")
def test_call_overhead(benchmark, settings):
    if settings.device != "cpu":
        pytest.skip("the per-call overhead is measured on CPU")
    harness.interleaved(benchmark, build(settings.device), rounds=settings.rounds, reps=REPS, device=settings.device,
                        section="call_overhead", label=f"{list(SHAPE)}")


def _us(t: dict[str, harness.Timing], name: str) -> float | None:
    return t[name].median * 1e3 if name in t else None


def _fmt(value: float | None) -> str:
    return "" if value is None else f"{value:.1f}"


def report(res: harness.Results) -> tuple[str, list[str]]:
    """The per-call part of the report (reported, no goal)."""
    entries = res.all("call_overhead")
    if not entries:
        return "", []
    t = res.timings(entries[-1])
    rows = []
    for layer in LAYERS:
        values = {c: _us(t, f"{layer}: {c}") for c in COLUMNS}
        own = None if values["module"] is None else values["module"] - (values["subnet"] or 0.0)
        rows.append([layer, *(_fmt(values[c]) for c in COLUMNS[:4]), _fmt(own), _fmt(values["module fwd+bwd"])])
    text = f"""## Per-call cost of each layer (CPU, float32, tiny input)

Each layer on x of shape {list(SHAPE)}, couplings and `ReversibleBlock` with subnets that tile
their input and multiply it by a weight (almost no arithmetic); µs per call, median of interleaved
rounds of {REPS} calls: the fused op through the dispatcher (`torch.ops.invkernels`, no grad) and
through `invkernels.ops`, the subnet(s) alone, the module's forward without grad and that minus
its subnets (the layer's own cost), and the module's forward+backward (loss
`y.sum() + logdet.sum()`). An aten op of the same size for scale: `torch.add`
{_fmt(_us(t, ATEN))} µs without grad, {_fmt(_us(t, ATEN_GRAD))} µs with grad and the backward of its sum.

{harness.markdown_table(["layer", "op µs", "functional µs", "subnet µs", "module µs", "module − subnet µs",
                         "module fwd+bwd µs"], rows)}
"""
    return text, []
