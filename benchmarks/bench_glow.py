"""Glow layers benchmark (float32): InvConv1x1 inverse (float64-built and cached vs the eager
torch.inverse route), ActNorm + InvConv1x1 folded into one GEMM vs the two eager layers, and a
whole Glow step against the eager reference step, with the time outside the subnet convolutions.

A pytest-benchmark suite (``pytest benchmarks/``); :func:`report` is its part of the report
written by ``benchmarks/run.py``.
"""

from __future__ import annotations

import pytest
import torch

import harness

# The extra_info sections these benchmarks write (report() renders them).
RESULT_SECTIONS = {"invconv_inverse", "glow_front", "glow_step", "glow_step_outside"}

STEP_SHAPE = (16, 64, 32, 32)
HIDDEN = 128
INVERSE_CHANNELS = (64, 256, 512)
GOAL_OUTSIDE_VS_EAGER = 3.0


def _randomized_step(channels: int, hidden: int, device: str = "cpu"):
    """A GlowStep with random (not identity) ActNorm and last subnet layer, marked initialized."""
    from invkernels.nn import GlowStep  # noqa: PLC0415

    step = GlowStep(channels, hidden=hidden)
    with torch.no_grad():
        for p in step.coupling.subnet[-1].parameters():
            p.copy_(0.01 * torch.randn_like(p))
        step.actnorm.bias.copy_(0.1 * torch.randn(channels))
        step.actnorm.log_scale.copy_(0.1 * torch.randn(channels))
    step.actnorm.mark_initialized()
    return step.to(device)


def eager_step(step, x):
    """The same step in plain PyTorch ops, as Glow ports write it (the eager baseline): ActNorm, the
    1x1 convolution (conv2d) with its weight assembled from the LU factors and log-det S·Σ log_s,
    and the affine coupling with Glow's sigmoid scale."""
    from invkernels.reference import actnorm as RA  # noqa: PLC0415
    from invkernels.reference import coupling as RC  # noqa: PLC0415
    from invkernels.reference import invconv as RI  # noqa: PLC0415

    y, ld1 = RA.actnorm_fwd(x, step.actnorm.bias, step.actnorm.log_scale)
    conv = step.invconv
    w = RI.invconv_weight(conv.perm, conv.lower, conv.upper, conv.sign, conv.log_s)
    y = torch.nn.functional.conv2d(y, w[:, :, None, None])
    ld2 = (y[0, 0].numel() * conv.log_s.sum()).expand(y.shape[0])
    h = step.coupling.subnet(y[:, : step.coupling.c1])
    y, ld3 = RC.affine_coupling_fwd(y, h, step.coupling.scale, step.coupling.clamp)
    return y, ld1 + ld2 + ld3




def _with_backend(backend: str, fn):
    """``fn`` run with ``backend`` as invkernels' default (for the modules' providers)."""
    import invkernels  # noqa: PLC0415

    def run(*args):
        with invkernels.use_backend(backend):
            return fn(*args)

    return run


@pytest.mark.benchmark(group="glow")
@pytest.mark.parametrize("channels", INVERSE_CHANNELS)
def test_invconv_inverse(benchmark, settings, channels):
    from invkernels.nn import InvConv1x1  # noqa: PLC0415
    from invkernels.reference import invconv as RI  # noqa: PLC0415

    conv = InvConv1x1(channels).to(settings.device)
    with torch.no_grad():
        conv.log_s.add_(torch.empty(channels, device=settings.device).uniform_(-0.5, 0.5))
    y = torch.randn(16, channels, 16, 16, device=settings.device)

    def eager():
        with torch.no_grad():
            return RI.conv1x1(y, RI.eager_inverse_weight(conv.weight()))

    def uncached():
        conv.clear_inverse_cache()
        with torch.no_grad():
            return conv.inverse(y)

    def cached():
        with torch.no_grad():
            return conv.inverse(y)

    def gemm():
        with torch.no_grad():
            return torch.matmul(conv.weight(), y.reshape(16, channels, -1))

    harness.interleaved(benchmark, {"eager": eager, "uncached": uncached, "cached": cached, "gemm": gemm},
                        settings.rounds, 5, settings.device, section="invconv_inverse", channels=channels,
                        label=str(list(y.shape)))


@pytest.mark.benchmark(group="glow")
@pytest.mark.parametrize("mode", ("fwd", "fwd+bwd"))
def test_glow_front(benchmark, settings, mode):
    """ActNorm + InvConv1x1: the two eager layers (and torch.compile of them) against GlowStep's
    front, one GEMM with the ActNorm folded in."""
    from invkernels.reference import actnorm as RA  # noqa: PLC0415
    from invkernels.reference import invconv as RI  # noqa: PLC0415

    step = _randomized_step(STEP_SHAPE[1], 8, settings.device)
    x = torch.randn(STEP_SHAPE, device=settings.device)

    def eager_front(inp):
        y, ld1 = RA.actnorm_fwd(inp, step.actnorm.bias, step.actnorm.log_scale)
        conv = step.invconv
        w = RI.invconv_weight(conv.perm, conv.lower, conv.upper, conv.sign, conv.log_s)
        return torch.nn.functional.conv2d(y, w[:, :, None, None]), ld1 + y[0, 0].numel() * conv.log_s.sum()

    fns = {"eager": eager_front, "compile": torch.compile(eager_front)}
    fns.update({b: _with_backend(b, step._front) for b in settings.backends})
    n = x.numel()
    if mode == "fwd":
        providers, moved = {k: (lambda f=f: f(x)) for k, f in fns.items()}, 4 * 2 * n
    else:
        xr = x.clone().requires_grad_()
        params = [xr, step.actnorm.bias, step.actnorm.log_scale, step.invconv.lower, step.invconv.upper,
                  step.invconv.log_s]
        g, ones = torch.randn_like(x), torch.ones(x.shape[0], device=settings.device)

        def fwd_bwd(f):
            y, logdet = f(xr)
            return torch.autograd.grad((y, logdet), params, (g, ones))

        providers, moved = {k: (lambda f=f: fwd_bwd(f)) for k, f in fns.items()}, 4 * 5 * n
    harness.interleaved(benchmark, providers, settings.rounds, harness.reps_for(moved), settings.device,
                        section="glow_front", kind="op", op="actnorm+invconv", label=str(list(STEP_SHAPE)), mode=mode,
                        bytes=moved)


class _Replay(torch.autograd.Function):
    """Returns a stored subnet output and, in backward, a stored gradient of the subnet input."""

    @staticmethod
    def forward(ctx, x1, h, grad_x1):
        ctx.grad_x1 = grad_x1
        return h.view_as(h)

    @staticmethod
    def backward(ctx, grad_h):
        return ctx.grad_x1, None, None


class ReplayedSubnet(torch.nn.Module):
    """A stand-in for the coupling subnet that does no work: it replays a stored output and input
    gradient, so a step timed with it measures everything outside the subnet convolutions."""

    def __init__(self, h: torch.Tensor, grad_x1: torch.Tensor):
        super().__init__()
        self.h, self.grad_x1 = h, grad_x1

    def forward(self, x1):
        return _Replay.apply(x1, self.h, self.grad_x1)



def _step_inputs(device: str):
    x = torch.randn(STEP_SHAPE, device=device, requires_grad=True)
    return x, torch.randn(STEP_SHAPE, device=device), torch.ones(STEP_SHAPE[0], device=device)


@pytest.mark.benchmark(group="glow")
def test_glow_step(benchmark, settings):
    """A whole Glow step, forward+backward: the eager step against GlowStep."""
    step = _randomized_step(STEP_SHAPE[1], HIDDEN, settings.device)
    x, g, ones = _step_inputs(settings.device)
    params = [x, *step.parameters()]

    def run(f):
        y, logdet = f(x)
        return torch.autograd.grad((y, logdet), params, (g, ones))

    providers = {"eager": lambda: run(lambda v: eager_step(step, v))}
    providers.update({b: (lambda f=_with_backend(b, step): run(f)) for b in settings.backends})
    harness.interleaved(benchmark, providers, settings.rounds, 2, settings.device, section="glow_step",
                        label=str(list(STEP_SHAPE)))


@pytest.mark.benchmark(group="glow")
def test_glow_step_outside(benchmark, settings):
    """The same steps with the subnet replaced by :class:`ReplayedSubnet` (the time outside the
    subnet convolutions), and the 1x1 GEMMs alone."""
    from invkernels.ops import invconv as invconv_ops  # noqa: PLC0415

    step = _randomized_step(STEP_SHAPE[1], HIDDEN, settings.device)
    x, g, ones = _step_inputs(settings.device)
    half = (STEP_SHAPE[0], step.coupling.c1, *STEP_SHAPE[2:])
    with torch.no_grad():
        h = step.coupling.subnet(torch.randn(half, device=settings.device))
    step.coupling.subnet = ReplayedSubnet(h, torch.randn(half, device=settings.device))
    params = [x, *step.actnorm.parameters(), *step.invconv.parameters()]
    an = step.actnorm
    w_leaf = step.invconv.weight().detach().requires_grad_()

    def run(f):
        y, logdet = f(x)
        return torch.autograd.grad((y, logdet), params, (g, ones))

    def eager_gemm():
        y = torch.nn.functional.conv2d(x, w_leaf[:, :, None, None])
        return torch.autograd.grad(y, [x, w_leaf], g)

    def gemm(backend):
        y = invconv_ops.conv1x1(x, w_leaf, an.bias, an.log_scale, backend=backend)
        return torch.autograd.grad(y, [x, w_leaf, an.bias, an.log_scale], g)

    providers = {"eager": lambda: run(lambda v: eager_step(step, v))}
    providers.update({b: (lambda f=_with_backend(b, step): run(f)) for b in settings.backends})
    providers["eager_gemm"] = eager_gemm
    providers.update({f"{b}_gemm": (lambda b=b: gemm(b)) for b in settings.backends})
    harness.interleaved(benchmark, providers, settings.rounds, 3, settings.device, section="glow_step_outside",
                        label=str(list(STEP_SHAPE)))


def report(res: harness.Results) -> tuple[str, list[str]]:
    """The Glow-layers part of the report and its goal verdicts."""
    parts, verdicts = [], []
    dev = res.device.upper()
    inverse = res.all("invconv_inverse")
    if inverse:
        rows = []
        for e in inverse:
            t = res.timings(e)
            rows.append([str(e["channels"]), e["label"]]
                        + [harness.fmt_ms(t.get(k)) for k in ("eager", "uncached", "cached", "gemm")]
                        + [harness.fmt_ratio(harness.ratio(t, "eager", "cached"))])
        parts.append(f"""## InvConv1x1 inverse ({dev}, float32, no grad)

`eager`: `torch.inverse` of the float32 weight, then the product (what Glow ports do on every
inverse); `uncached`: the module's inverse with its cache cleared (W⁻¹ from the LU factors by
float64 triangular solves, cast once, then the product); `cached`: the module's inverse with W⁻¹
cached (the parameters did not change); `gemm`: the forward direction for comparison (W assembled
by the `invconv_weight` op, then one `matmul`). The module runs invkernels' default backend.

{harness.markdown_table(["C", "input", "eager ms", "uncached ms", "cached ms", "gemm ms", "eager / cached"], rows)}
""")
    front = res.all("glow_front")
    if front:
        rows, _ = harness.op_rows(res, front, "actnorm+invconv", lambda e: {})
        parts.append(f"""## ActNorm + InvConv1x1 folded into one GEMM ({dev}, float32)

`eager`: the two reference layers in turn (ActNorm, weight from the LU factors, 1x1 product);
`compile`: torch.compile of that; invkernels: `GlowStep`'s front, one GEMM with
`W · diag(exp(log_scale))` and bias `W · (exp(log_scale) ⊙ bias)`. Forward+backward computes the
gradients of x and of all five parameters.

{harness.markdown_table(harness.op_header(res), rows)}
""")
    steps = res.all("glow_step")
    outside = res.all("glow_step_outside")
    if steps or outside:
        text = f"""## Glow step ({dev}, float32, forward+backward)

ActNorm → InvConv1x1 (LU) → affine coupling (sigmoid scale) with Glow's 3-conv subnet of width
{HIDDEN}; gradients of x and of every parameter. `eager` is the same step as Glow ports write it
(`benchmarks/bench_glow.py:eager_step`: reference ActNorm, weight from the LU factors, `F.conv2d`,
log-det `S·Σ log_s`, reference coupling), invkernels is `invkernels.nn.GlowStep`.
"""
        labels = [res.label(b) for b in res.backends]
        for e in steps:
            t = res.timings(e)
            rows = [[e["label"], str(HIDDEN), harness.fmt_ms(t.get("eager"))]
                    + [harness.fmt_ms(t.get(b)) for b in res.backends]
                    + [harness.fmt_ratio(harness.ratio(t, "eager", b)) for b in res.backends]]
            text += "\n" + harness.markdown_table(["shape", "hidden", "eager ms"] + [f"{x} ms" for x in labels]
                                                   + [f"eager / {x}" for x in labels], rows) + "\n"
        for e in outside:
            t = res.timings(e)
            rows = []
            for b, name in zip(res.backends, labels):
                outside_ratio = harness.ratio(t, "eager", b)
                rest = ["–", "–", "–"]
                if all(k in t for k in ("eager", b, "eager_gemm", f"{b}_gemm")):
                    eager_rest = t["eager"].median - t["eager_gemm"].median
                    kernel_rest = t[b].median - t[f"{b}_gemm"].median
                    rest = [f"{eager_rest:.2f}", f"{kernel_rest:.2f}", f"{eager_rest / kernel_rest:.2f}x"]
                rows.append([e["label"], name, harness.fmt_ms(t.get("eager")), harness.fmt_ms(t.get(b)),
                             harness.fmt_ratio(outside_ratio), harness.fmt_ms(t.get("eager_gemm")),
                             harness.fmt_ms(t.get(f"{b}_gemm")), *rest])
                who = f", {name}" if len(res.backends) > 1 else ""
                verdict = ("failed" if outside_ratio is None else
                           f"{outside_ratio:.2f}x eager (goal ≥ {GOAL_OUTSIDE_VS_EAGER}x)")
                ok = outside_ratio is not None and outside_ratio >= GOAL_OUTSIDE_VS_EAGER
                verdicts.append(f"- glow_step {e['label']} fwd+bwd outside the subnet{who}: {verdict}: "
                                f"{'met' if ok else 'NOT met'}")
            text += f"""
Outside the subnet: the same two steps with the subnet replaced by `ReplayedSubnet`, which returns
a stored output and input gradient and does no work, so the whole time is spent outside the
subnet convolutions (gradients of x, ActNorm and InvConv1x1). `1x1 GEMMs` is the per-position
product alone, forward+backward with the gradients of x and the weight: `F.conv2d` for eager, the
`conv1x1` op with the ActNorm folded in for invkernels; the last three columns subtract it.

{harness.markdown_table(["shape", "invkernels", "eager outside ms", "invkernels outside ms", "eager / invkernels",
                         "eager 1x1 GEMMs ms", "invkernels 1x1 GEMMs ms", "eager rest ms", "invkernels rest ms",
                         "rest: eager / invkernels"], rows)}
"""
        parts.append(text)
    return "\n".join(parts), verdicts
