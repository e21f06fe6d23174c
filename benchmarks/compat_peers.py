"""nflows, zuko and normflows against their invkernels.compat classes: checkpoints and speed.

    python benchmarks/compat_peers.py [--threads 2] [--rounds 20]

For each model of the compat acceptance (nflows ``SimpleRealNVP(features=8, hidden_features=32,
num_layers=4)``, zuko ``NICE(features=5, context=2)``, normflows ``GlowBlock`` x 4 on [4, 8, 8]
with LU), their variants and a wider tabular size ([4096, 32]): the peer's state dict loaded into the
compat model, the largest difference of the log-likelihoods in float64; then forward+backward of
the negative log-likelihood in float32, peer and compat timed interleaved in this process.
Writes docs/compat/measured.md (FrEIA: benchmarks/compat_freia.py, docs/compat/freia-measured.md).
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import os
import sys
from typing import Callable

import torch

import harness

OUT = os.path.join(os.path.dirname(harness.BENCH_DIR), "docs", "compat", "measured.md")


def nflows_case(volume_preserving: bool, features: int = 8) -> tuple[Callable, Callable, Callable, Callable]:
    peer = importlib.import_module("nflows.flows.realnvp")
    compat = importlib.import_module("invkernels.compat.nflows")
    kwargs = dict(features=features, hidden_features=32, num_layers=4, num_blocks_per_layer=2,
                  use_volume_preserving=volume_preserving, batch_norm_between_layers=False)

    def data(dtype, batch):
        return (torch.randn(batch, features, dtype=dtype),)

    return (lambda: peer.SimpleRealNVP(**kwargs), lambda: compat.SimpleRealNVP(**kwargs),
            lambda model, x: model.log_prob(x), data)


def zuko_case(additive: bool, features: int = 5):
    zflows = importlib.import_module("zuko.flows")
    compat = importlib.import_module("invkernels.compat.zuko")
    kwargs = dict(features=features, context=2)
    if additive:
        kwargs.update(univariate=importlib.import_module("zuko.transforms").AdditiveTransform, shapes=[()])

    def data(dtype, batch):
        return torch.randn(batch, features, dtype=dtype), torch.randn(batch, 2, dtype=dtype)

    return (lambda: zflows.NICE(**kwargs), lambda: compat.NICE(**kwargs),
            lambda model, x, c: model(c).log_prob(x), data)


def normflows_case(scale_map: str):
    nf = importlib.import_module("normflows")
    compat = importlib.import_module("invkernels.compat.normflows")

    def model(block):
        torch.manual_seed(0)
        flows = [block(4, 32, scale_map=scale_map, use_lu=True) for _ in range(4)]
        return nf.NormalizingFlow(nf.distributions.DiagGaussian((4, 8, 8)), flows)

    def data(dtype, batch):
        return (torch.randn(batch, 4, 8, 8, dtype=dtype),)

    return (lambda: model(nf.flows.GlowBlock), lambda: model(compat.GlowBlock),
            lambda m, x: m.log_prob(x), data)


CASES = {
    "nflows SimpleRealNVP (affine, nflows' default)": (lambda: nflows_case(False), 512),
    "nflows SimpleRealNVP (use_volume_preserving)": (lambda: nflows_case(True), 512),
    "nflows SimpleRealNVP, 32 features (affine)": (lambda: nflows_case(False, 32), 4096),
    "zuko NICE(5, context=2) (affine, zuko's default)": (lambda: zuko_case(False), 512),
    "zuko NICE(5, context=2) (additive)": (lambda: zuko_case(True), 512),
    "zuko NICE(32, context=2) (affine)": (lambda: zuko_case(False, 32), 4096),
    "normflows GlowBlock x 4, LU (scale_map='sigmoid', default)": (lambda: normflows_case("sigmoid"), 64),
    "normflows GlowBlock x 4, LU (scale_map='sigmoid_inv')": (lambda: normflows_case("sigmoid_inv"), 64),
}


def build(case, dtype):
    make_peer, make_compat, log_prob, data = case
    torch.manual_seed(0)
    peer = make_peer().to(dtype)
    compat = make_compat().to(dtype)
    with torch.no_grad():  # ActNorm's data initialization, then weights away from their start
        args = data(dtype, 16)
        log_prob(peer, *args)
        for p in peer.parameters():
            p.add_(0.05 * torch.randn_like(p))
    compat.load_state_dict(peer.state_dict())
    return peer, compat, log_prob, data


def checkpoint_difference(case) -> float:
    """The largest difference of the per-sample log-likelihoods, float64, batch 8."""
    peer, compat, log_prob, data = build(case, torch.float64)
    args = data(torch.float64, 8)
    return (log_prob(peer, *args) - log_prob(compat, *args)).abs().max().item()


def step(model, log_prob, args):
    def run():
        model.zero_grad(set_to_none=True)
        (-log_prob(model, *args).mean()).backward()
    return run


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    harness.ensure_allocator_env()
    torch.set_num_threads(args.threads)
    rows = []
    for name, (make_case, batch) in CASES.items():
        case = make_case()
        diff = checkpoint_difference(case)
        peer, compat, log_prob, data = build(case, torch.float32)
        inputs = data(torch.float32, batch)
        times = harness.measure({"peer": step(peer, log_prob, inputs), "compat": step(compat, log_prob, inputs)},
                                rounds=args.rounds, reps=5)
        rows.append([name, str(batch), f"{diff:.1e}", harness.fmt_ms(times["peer"]), harness.fmt_ms(times["compat"]),
                     harness.fmt_ratio(harness.ratio(times, "peer", "compat"))])
        print(" | ".join(rows[-1]), flush=True)
    report = "\n".join([
        f"# The peers and invkernels.compat ({datetime.date.today()}, {harness.cpu_name()}, {args.threads} threads, "
        f"torch {torch.__version__})",
        "",
        "Generated by `python benchmarks/compat_peers.py`. Checkpoint: the peer's state dict loaded into the compat "
        "model, the largest difference of the per-sample log-likelihoods in float64 (batch 8). Speed: forward+backward "
        "of the negative log-likelihood, float32, ms (median, p20-p80), peer and compat interleaved in one process; "
        "speed-up = peer / compat.",
        "",
        harness.markdown_table(["model", "batch", "checkpoint max |Δ log p|", "peer ms", "compat ms", "speed-up"],
                               rows),
        "",
    ])
    with open(OUT, "w") as f:
        f.write(report)
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
