"""Agreement of the float64 spline reference (invkernels.reference.spline) with nflows'
``unconstrained_rational_quadratic_spline(..., tails="linear")``: the table of docs/ops/spline.md.

For each direction and scale of the raw parameters, the largest relative difference
``|ours - nflows| / max(|nflows|, 1)`` of values, log-dets and gradients (of a random linear
function of both outputs, to ``x`` and ``h``) over ``[64, 4, 8, 8]`` inputs with 1, 2, 8 and 16
bins, tail bounds 3, 1 and 5, minimum sizes and derivative 1e-3; for the inverse also how
closely the forward maps each one's result back to ``y`` (the same relative measure), which says
whose round-off the differences are. Needs nflows (``pip install --no-deps nflows``). Run:
``python scripts/spline_agreement.py``.
"""

from __future__ import annotations

import torch
from nflows.transforms.splines.rational_quadratic import unconstrained_rational_quadratic_spline

from invkernels.reference import spline as S

F64 = torch.float64
SHAPE = (64, 4, 8, 8)
BINS = (1, 2, 8, 16)
TAIL_BOUNDS = (3.0, 1.0, 5.0)
H_STDS = (1.0, 5.0, 20.0, 1000.0)
MINIMUM = 1e-3


def nflows_spline(x, h, bins, tail_bound, inverse):
    p = h.unflatten(1, (x.shape[1], 3 * bins - 1)).movedim(2, -1)
    y, lad = unconstrained_rational_quadratic_spline(
        x, p[..., :bins], p[..., bins:2 * bins], p[..., 2 * bins:], inverse=inverse, tails="linear",
        tail_bound=tail_bound, min_bin_width=MINIMUM, min_bin_height=MINIMUM, min_derivative=MINIMUM)
    return y, lad.flatten(1).sum(1)


def relative(actual, expected) -> float:
    return ((actual - expected).abs() / expected.abs().clamp_min(1.0)).max().item()


def differences(inverse: bool, h_std: float) -> list[float]:
    worst = [0.0] * 5
    for bins in BINS:
        for tail_bound in TAIL_BOUNDS:
            torch.manual_seed(bins * 100 + int(tail_bound))
            x = torch.randn(SHAPE, dtype=F64) * 0.8 * tail_bound
            h = torch.randn(SHAPE[0], SHAPE[1] * (3 * bins - 1), *SHAPE[2:], dtype=F64) * h_std
            if inverse:
                x = nflows_spline(x, h, bins, tail_bound, False)[0]
            gy, gl = torch.randn_like(x), torch.randn(SHAPE[0], dtype=F64)
            results = []
            for fn in (lambda a, b: (S.rq_spline_inv if inverse else S.rq_spline_fwd)(
                           a, b, bins, tail_bound, MINIMUM, MINIMUM, MINIMUM),
                       lambda a, b: nflows_spline(a, b, bins, tail_bound, inverse)):
                a, b = x.clone().requires_grad_(), h.clone().requires_grad_()
                y, logdet = fn(a, b)
                grads = torch.autograd.grad((y * gy).sum() + (logdet * gl).sum(), (a, b))
                results.append((y.detach(), logdet.detach(), grads))
            (y, ld, g), (y_ref, ld_ref, g_ref) = results
            worst[0] = max(worst[0], relative(y, y_ref))
            worst[1] = max(worst[1], relative(ld, ld_ref))
            worst[2] = max(worst[2], *(relative(a, b) for a, b in zip(g, g_ref)))
            if inverse:
                for k, rebuilt in ((3, y), (4, y_ref)):
                    back = S.rq_spline_fwd(rebuilt, h, bins, tail_bound, MINIMUM, MINIMUM, MINIMUM)[0]
                    worst[k] = max(worst[k], relative(back, x))
    return worst


def main() -> None:
    print("| direction | std of h | values | log-dets | gradients (x and h) | forward of the inverse vs y: ours | "
          "nflows |")
    print("|---|---|---|---|---|---|---|")
    for inverse in (False, True):
        for h_std in H_STDS:
            values, logdets, grads, ours, theirs = differences(inverse, h_std)
            back = f"{ours:.2g} | {theirs:.2g}" if inverse else "– | –"
            print(f"| {'inverse' if inverse else 'forward'} | {h_std:g} | {values:.2g} | {logdets:.2g} | {grads:.2g} "
                  f"| {back} |")


if __name__ == "__main__":
    main()
