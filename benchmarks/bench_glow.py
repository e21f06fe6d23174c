"""Glow layers benchmark (CPU, float32): InvConv1x1 inverse (float64-built and cached vs the eager
torch.inverse route), ActNorm + InvConv1x1 folded into one GEMM vs the two eager layers, and a
whole Glow step against the eager reference step, with the time outside the subnet convolutions.

Part of ``make bench`` (``benchmarks/run.py``).
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import harness  # noqa: E402

STEP_SHAPE = (16, 64, 32, 32)
HIDDEN = 128


def _randomized_step(channels: int, hidden: int):
    from invkernels.nn import GlowStep  # noqa: PLC0415

    step = GlowStep(channels, hidden=hidden)
    with torch.no_grad():
        for p in step.coupling.subnet[-1].parameters():
            p.copy_(0.01 * torch.randn_like(p))
        step.actnorm.bias.copy_(0.1 * torch.randn(channels))
        step.actnorm.log_scale.copy_(0.1 * torch.randn(channels))
    step.actnorm.mark_initialized()
    return step


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


def inverse_rows(rounds: int) -> list[list[str]]:
    from invkernels.nn import InvConv1x1  # noqa: PLC0415
    from invkernels.reference import invconv as RI  # noqa: PLC0415

    rows = []
    for c in (64, 256, 512):
        conv = InvConv1x1(c)
        with torch.no_grad():
            conv.log_s.add_(torch.empty(c).uniform_(-0.5, 0.5))
        y = torch.randn(16, c, 16, 16)

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

        def gemm_only():
            with torch.no_grad():
                return torch.matmul(conv.weight(), y.reshape(16, c, -1))

        t = harness.measure({"eager": eager, "uncached": uncached, "cached": cached, "gemm": gemm_only},
                            rounds=rounds, reps=5)
        rows.append([str(c), str(list(y.shape))] + [harness.fmt_ms(t[k]) for k in ("eager", "uncached", "cached",
                                                                                     "gemm")]
                    + [f"{t['eager'].median / t['cached'].median:.2f}x"])
    return rows


def front_cases():
    from invkernels.reference import actnorm as RA  # noqa: PLC0415
    from invkernels.reference import invconv as RI  # noqa: PLC0415

    step = _randomized_step(STEP_SHAPE[1], 8)
    x = torch.randn(STEP_SHAPE)

    def eager_front(inp):
        y, ld1 = RA.actnorm_fwd(inp, step.actnorm.bias, step.actnorm.log_scale)
        conv = step.invconv
        w = RI.invconv_weight(conv.perm, conv.lower, conv.upper, conv.sign, conv.log_s)
        return torch.nn.functional.conv2d(y, w[:, :, None, None]), ld1 + y[0, 0].numel() * conv.log_s.sum()

    fns = {"eager": eager_front, "compile": torch.compile(eager_front), "invkernels": step._front}
    n = x.numel()
    cases = [harness.Case(str(list(STEP_SHAPE)), "fwd", {k: (lambda f=f: f(x)) for k, f in fns.items()}, 4 * 2 * n,
                          goal_vs_eager=None)]
    xr = x.clone().requires_grad_()
    params = [xr, step.actnorm.bias, step.actnorm.log_scale, step.invconv.lower, step.invconv.upper,
              step.invconv.log_s]
    g = torch.randn_like(x)

    def fwd_bwd(f):
        y, logdet = f(xr)
        return torch.autograd.grad((y, logdet), params, (g, torch.ones(x.shape[0])))

    cases.append(harness.Case(str(list(STEP_SHAPE)), "fwd+bwd", {k: (lambda f=f: fwd_bwd(f)) for k, f in fns.items()},
                              4 * 5 * n))
    return cases


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


def step_rows(rounds: int) -> tuple[list[list[str]], list[list[str]], str]:
    step = _randomized_step(STEP_SHAPE[1], HIDDEN)
    x = torch.randn(STEP_SHAPE, requires_grad=True)
    g = torch.randn(STEP_SHAPE)
    ones = torch.ones(STEP_SHAPE[0])

    def run(f, params):
        y, logdet = f(x)
        return torch.autograd.grad((y, logdet), params, (g, ones))

    real = [x, *step.parameters()]
    totals = harness.measure({"eager": lambda: run(lambda v: eager_step(step, v), real),
                              "invkernels": lambda: run(step, real)}, rounds=rounds, reps=2)

    subnet = step.coupling.subnet
    with torch.no_grad():
        h = subnet(torch.randn(STEP_SHAPE[0], step.coupling.c1, *STEP_SHAPE[2:]))
    step.coupling.subnet = ReplayedSubnet(h, torch.randn(STEP_SHAPE[0], step.coupling.c1, *STEP_SHAPE[2:]))
    from invkernels.ops import invconv as invconv_ops  # noqa: PLC0415

    outside_params = [x, *step.actnorm.parameters(), *step.invconv.parameters()]
    w_leaf = step.invconv.weight().detach().requires_grad_()
    an = step.actnorm
    gemm_params = [x, w_leaf, an.bias, an.log_scale]

    def eager_gemm():
        y = torch.nn.functional.conv2d(x, w_leaf[:, :, None, None])
        return torch.autograd.grad(y, [x, w_leaf], g)

    def invkernels_gemm():
        return torch.autograd.grad(invconv_ops.conv1x1(x, w_leaf, an.bias, an.log_scale), gemm_params, g)

    t = harness.measure({"eager": lambda: run(lambda v: eager_step(step, v), outside_params),
                         "invkernels": lambda: run(step, outside_params),
                         "eager_gemm": eager_gemm, "invkernels_gemm": invkernels_gemm}, rounds=rounds, reps=3)
    step.coupling.subnet = subnet
    e, k = t["eager"].median, t["invkernels"].median
    ge, gk = t["eager_gemm"].median, t["invkernels_gemm"].median
    total_rows = [[str(list(STEP_SHAPE)), str(HIDDEN), harness.fmt_ms(totals["eager"]),
                   harness.fmt_ms(totals["invkernels"]),
                   f"{totals['eager'].median / totals['invkernels'].median:.2f}x"]]
    outside_rows = [[str(list(STEP_SHAPE)), harness.fmt_ms(t["eager"]), harness.fmt_ms(t["invkernels"]), f"{e / k:.2f}x",
                     harness.fmt_ms(t["eager_gemm"]), harness.fmt_ms(t["invkernels_gemm"]), f"{e - ge:.2f}",
                     f"{k - gk:.2f}", f"{(e - ge) / (k - gk):.2f}x"]]
    verdict = (f"- glow_step {list(STEP_SHAPE)} fwd+bwd outside the subnet: {e / k:.2f}x eager "
               f"(goal ≥ 3.0x): {'met' if e / k >= 3.0 else 'NOT met'}")
    return total_rows, outside_rows, verdict


def section(rounds: int, threads: int, meta: dict[str, str]) -> tuple[str, list[list[str]], list[str]]:
    """The Glow-layers part of docs/performance.md, its CSV rows and goal verdicts."""
    inv = inverse_rows(rounds)
    front, csv_rows, verdicts = harness.run_cases(front_cases(), rounds, meta, "actnorm+invconv")
    totals, outside, verdict = step_rows(rounds)
    verdicts.append(verdict)
    text = f"""## InvConv1x1 inverse (CPU, float32, no grad)

`eager`: `torch.inverse` of the float32 weight, then the product (what Glow ports do on every
inverse); `uncached`: the module's inverse with its cache cleared (W⁻¹ from the LU factors by
float64 triangular solves, cast once, then the product); `cached`: the module's inverse with W⁻¹
cached (the parameters did not change); `gemm`: the forward direction for comparison (W assembled
by the `invconv_weight` op, then one `matmul`).

{harness.markdown_table(["C", "input", "eager ms", "uncached ms", "cached ms", "gemm ms", "eager / cached"], inv)}

## ActNorm + InvConv1x1 folded into one GEMM (CPU, float32)

`eager`: the two reference layers in turn (ActNorm, weight from the LU factors, 1x1 product);
`compile`: torch.compile of that; `invkernels`: `GlowStep`'s front, one GEMM with
`W · diag(exp(log_scale))` and bias `W · (exp(log_scale) ⊙ bias)`. Forward+backward computes the
gradients of x and of all five parameters.

{harness.markdown_table(harness.HEADER, front)}

## Glow step (CPU, float32, forward+backward)

ActNorm → InvConv1x1 (LU) → affine coupling (sigmoid scale) with Glow's 3-conv subnet of width
{HIDDEN}; gradients of x and of every parameter. `eager` is the same step as Glow ports write it
(`benchmarks/bench_glow.py:eager_step`: reference ActNorm, weight from the LU factors, `F.conv2d`,
log-det `S·Σ log_s`, reference coupling), `invkernels` is `invkernels.nn.GlowStep`.

{harness.markdown_table(["shape", "hidden", "eager ms", "invkernels ms", "eager / invkernels"], totals)}

Outside the subnet: the same two steps with the subnet replaced by `ReplayedSubnet`, which returns
a stored output and input gradient and does no work, so the whole time is spent outside the
subnet convolutions (gradients of x, ActNorm and InvConv1x1). `1x1 GEMMs` is the per-position
product alone, forward+backward with the gradients of x and the weight: `F.conv2d` for eager, the
`conv1x1` op with the ActNorm folded in for invkernels; the last three columns subtract it.

{harness.markdown_table(["shape", "eager outside ms", "invkernels outside ms", "eager / invkernels",
                         "eager 1x1 GEMMs ms", "invkernels 1x1 GEMMs ms", "eager rest ms", "invkernels rest ms",
                         "rest: eager / invkernels"], outside)}
"""
    return text, csv_rows, verdicts
