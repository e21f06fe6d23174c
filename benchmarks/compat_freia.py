"""FrEIA against invkernels.compat.freia: a checkpoint loaded across, and training speed.

    python benchmarks/compat_freia.py --freia /path/to/FrEIA-checkout [--threads 2]

1. Checkpoint: a FrEIA ``SequenceINN`` of 4 ``AllInOneBlock``s with conv subnets on [4, 8, 8]
   (float64, weights drawn away from their initial values); its state dict loaded into the compat
   ``SequenceINN`` (stored and ``memory_free=True``); the largest differences of the outputs,
   log-dets, inverse and gradients.
2. Speed: forward+backward of ``z.pow(2).mean() - logdet.mean()`` (float32, batch 64), FrEIA and
   the compat sequence stored and memory-free, timed interleaved in this process.

Writes docs/compat/freia-measured.md (machine, date, both tables).
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys

import torch
from torch import nn

import harness

SHAPE = (4, 8, 8)
DEPTH = 4
WIDTH = 32
BATCH = 64
OUT = os.path.join(os.path.dirname(harness.BENCH_DIR), "docs", "compat", "freia-measured.md")


def conv(c_in: int, c_out: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(c_in, WIDTH, 3, padding=1), nn.ReLU(), nn.Conv2d(WIDTH, c_out, 3, padding=1))


def build(Ff, Fm, Cm, dtype):
    torch.manual_seed(0)
    ref = Ff.SequenceINN(*SHAPE)
    for _ in range(DEPTH):
        ref.append(Fm.AllInOneBlock, subnet_constructor=conv, affine_clamping=2.0)
    ref.to(dtype)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    seqs = {"FrEIA": ref}
    for memory_free in (False, True):
        seq = Cm.SequenceINN(*SHAPE, memory_free=memory_free)
        for _ in range(DEPTH):
            seq.append(Cm.AllInOneBlock, subnet_constructor=conv, affine_clamping=2.0)
        seq.to(dtype)
        seq.load_state_dict(ref.state_dict())
        seqs["invkernels.compat " + ("memory-free" if memory_free else "stored")] = seq
    return seqs


def loss_and_grads(seq, x):
    leaf = x.clone().requires_grad_()
    z, logdet = seq(leaf)
    (z.pow(2).mean() - logdet.mean()).backward()
    grads = [leaf.grad] + [p.grad for p in seq.parameters() if p.requires_grad]
    seq.zero_grad(set_to_none=True)
    return z.detach(), logdet.detach(), grads


def checkpoint_rows(seqs) -> list[list[str]]:
    x = torch.randn(4, *SHAPE, dtype=torch.float64)
    z0, l0, g0 = loss_and_grads(seqs["FrEIA"], x)
    rows = []
    for name, seq in seqs.items():
        if name == "FrEIA":
            continue
        z, logdet, grads = loss_and_grads(seq, x)
        back, _ = seq(z, rev=True)
        grad_diff = max((a - b).abs().max().item() for a, b in zip(grads, g0))
        rows.append([name, f"{(z - z0).abs().max().item():.1e}", f"{(logdet - l0).abs().max().item():.1e}",
                     f"{(back - x).abs().max().item():.1e}", f"{grad_diff:.1e}"])
    return rows


def speed_rows(seqs, rounds: int) -> list[list[str]]:
    x = torch.randn(BATCH, *SHAPE)

    def step(seq):
        def run():
            leaf = x.detach().requires_grad_()
            z, logdet = seq(leaf)
            (z.pow(2).mean() - logdet.mean()).backward()
        return run

    times = harness.measure({name: step(seq) for name, seq in seqs.items()}, rounds=rounds, reps=5)
    return [[name, harness.fmt_ms(t), harness.fmt_ratio(harness.ratio(times, "FrEIA", name))]
            for name, t in times.items()]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--freia", help="a checkout of FrEIA's repository (default: the installed FrEIA)")
    parser.add_argument("--commit", help="the checkout's commit, for the report")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    harness.ensure_allocator_env()
    if args.freia:
        sys.path.insert(0, os.path.abspath(args.freia))
    import FrEIA  # noqa: PLC0415
    import FrEIA.framework as Ff  # noqa: PLC0415
    import FrEIA.modules as Fm  # noqa: PLC0415

    import invkernels.compat.freia as Cm  # noqa: PLC0415

    torch.set_num_threads(args.threads)
    checkpoint = checkpoint_rows(build(Ff, Fm, Cm, torch.float64))
    speed = speed_rows(build(Ff, Fm, Cm, torch.float32), args.rounds)
    source = os.path.dirname(os.path.dirname(os.path.abspath(FrEIA.__file__)))
    commit = f" at {args.commit}" if args.commit else ""
    report = "\n".join([
        f"# FrEIA and invkernels.compat.freia ({datetime.date.today()}, {harness.cpu_name()}, "
        f"{args.threads} threads, torch {torch.__version__}, FrEIA from {source}{commit})",
        "",
        f"FrEIA `SequenceINN` of {DEPTH} `AllInOneBlock`s (conv subnets of width {WIDTH}) on {list(SHAPE)}; its "
        "state dict loaded into the compat sequence. Largest absolute differences from FrEIA, float64, batch 4:",
        "",
        harness.markdown_table(["compat sequence", "z", "log-det", "inverse vs x", "gradients"], checkpoint),
        "",
        f"Forward+backward of `z.pow(2).mean() - logdet.mean()`, float32, batch {BATCH}, ms (median, p20-p80), "
        "interleaved in one process:",
        "",
        harness.markdown_table(["model", "ms", "speed-up over FrEIA"], speed),
        "",
    ])
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT, "w") as f:
        f.write(report)
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
