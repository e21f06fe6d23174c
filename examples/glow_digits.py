"""Train a Glow on scikit-learn's 8x8 digits memory-free, report test bits/dim and the activation
memory a training step keeps, and draw samples.

A worked example for new users (docs/examples/glow_digits.md). The 1,797 digits (8x8 images, 17
grey levels) ship with scikit-learn, so nothing is downloaded. The model is
``Glow(..., memory_free=True)``: its forward keeps no activations for backward, and backward rebuilds
each step's input from its output with the step's exact inverse. The script

- trains with Adam on the dequantized negative log-likelihood in bits per dimension
  (``model.bits_per_dim``), with a progress bar;
- prints the test bits/dim next to a full-covariance Gaussian fitted to the training images;
- prints the bytes of activations one training step keeps for backward, memory-free and stored
  (plain autograd), measured by ``invkernels.diagnostics.saved_bytes``;
- writes ``samples.png``, a grid of samples drawn with ``model.sample``.

Run ``python examples/glow_digits.py`` (about a minute on one thread) or
``python examples/glow_digits.py --help`` for the options.
"""

from __future__ import annotations

import argparse
import math
import os
import time

import torch

from invkernels.demo import LEVELS, gaussian_baseline_bits_per_dim, load_digits_split, \
    mean_bits_per_dim, save_grid
from invkernels.diagnostics import saved_bytes
from invkernels.models import Glow

from cli_types import add_out_option, check_out_option, non_negative_int, positive_float, positive_int

FIGURE = "samples.png"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=positive_int, default=40, help="passes over the training set (default: 40)")
    parser.add_argument("--batch-size", type=positive_int, default=64, help="images per step (default: 64)")
    parser.add_argument("--lr", type=positive_float, default=2e-3, help="Adam learning rate (default: 2e-3)")
    parser.add_argument("--levels", type=int, choices=(1, 2, 3), default=2,
                        help="Glow levels (squeeze + steps [+ split]); 8x8 images allow 1 to 3 (default: 2)")
    parser.add_argument("--steps-per-level", type=positive_int, default=6, help="Glow steps per level (default: 6)")
    parser.add_argument("--hidden", type=positive_int, default=96, help="width of the coupling subnets (default: 96)")
    parser.add_argument("--train-images", type=non_negative_int, default=0,
                        help="train on the first N training images only (default: 0, all 1437)")
    parser.add_argument("--samples", type=positive_int, default=64, help="samples in the grid (default: 64)")
    parser.add_argument("--temperature", type=float, default=0.8, help="sampling temperature (default: 0.8)")
    parser.add_argument("--seed", type=non_negative_int, default=0, help="random seed (default: 0)")
    add_out_option(parser, "glow_digits")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    """The command line, checked: a bad value exits with a usage error naming the option."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        parser.error(f"argument --temperature: should be a finite number >= 0, got {args.temperature!r}")
    check_out_option(parser, args, "glow_digits", (FIGURE,))
    return args


def train(model: Glow, train_x: torch.Tensor, args: argparse.Namespace) -> list[float]:
    """Adam on the dequantized bits/dim of shuffled batches, a linear warm-up over the first 100
    steps; returns the mean training bits/dim of each epoch."""
    from tqdm import tqdm  # noqa: PLC0415

    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    warmup = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / 100))
    steps_per_epoch = math.ceil(len(train_x) / args.batch_size)
    epoch_bpd = []
    model.train()
    with tqdm(total=args.epochs * steps_per_epoch, desc="training Glow", unit="step",
              disable=args.no_progress) as bar:
        for epoch in range(args.epochs):
            losses = []
            for batch in torch.split(train_x[torch.randperm(len(train_x))], args.batch_size):
                # bits_per_dim dequantizes the batch (k + u) / 17 with fresh noise u at every call.
                loss = model.bits_per_dim(batch, LEVELS).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()  # memory-free: rebuilds each step's input from its output
                torch.nn.utils.clip_grad_norm_(model.parameters(), 50.0)
                opt.step()
                warmup.step()
                losses.append(loss.item())
                bar.update(1)
                bar.set_postfix(epoch=epoch + 1, bpd=f"{loss.item():.3f}")
            epoch_bpd.append(sum(losses) / len(losses))
    model.eval()
    return epoch_bpd


def main(argv=None) -> dict:
    """Run the example with the command line ``argv`` (``sys.argv[1:]`` when None); returns the
    numbers it prints and the path of the sample grid."""
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    torch.manual_seed(args.seed)

    train_x, test_x = load_digits_split(args.seed)  # [N, 1, 8, 8], values k / 16
    if args.train_images:
        train_x = train_x[:args.train_images]
    model = Glow((1, 8, 8), levels=args.levels, steps=args.steps_per_level, hidden=args.hidden, prior="learned",
                 memory_free=True)

    start = time.perf_counter()
    epoch_bpd = train(model, train_x, args)
    seconds = time.perf_counter() - start
    test_bpd = mean_bits_per_dim(model, test_x, LEVELS)
    baseline = gaussian_baseline_bits_per_dim(train_x, test_x, LEVELS)

    # The activations one training step keeps for backward, on a batch of the training size.
    model.train()
    memory = saved_bytes(model, model.dequantize(train_x[:args.batch_size], LEVELS))
    model.eval()

    samples = model.sample(args.samples, temperature=args.temperature)
    figure = os.path.join(args.out, FIGURE)
    save_grid(samples, figure, f"Glow samples, temperature {args.temperature}, test {test_bpd:.3f} bits/dim")

    batch = min(args.batch_size, len(train_x))
    epochs = f"{args.epochs} epoch{'s' * (args.epochs != 1)}"
    print(f"Glow on scikit-learn digits: {len(train_x)} training / {len(test_x)} test images, "
          f"{sum(p.numel() for p in model.parameters())} parameters, {epochs} in {seconds:.1f} s (memory-free)")
    print(f"  training bits/dim, mean of the epoch: first {epoch_bpd[0]:.3f}, last {epoch_bpd[-1]:.3f}")
    print(f"  test bits/dim: Glow {test_bpd:.3f}, full-covariance Gaussian {baseline:.3f}")
    print(f"  activations kept for backward by one training step on {batch} images:")
    print(f"    memory-free {memory.memory_free:>10,} bytes ({memory.memory_free / 2**20:.3f} MiB)")
    print(f"    stored      {memory.stored:>10,} bytes ({memory.stored / 2**20:.3f} MiB), "
          f"{memory.stored / max(memory.memory_free, 1):.1f}x the memory-free step")
    print(f"  wrote {figure}")
    return {"test_bpd": test_bpd, "gaussian_test_bpd": baseline, "epoch_train_bpd": epoch_bpd,
            "train_seconds": seconds, "saved_bytes_memory_free": memory.memory_free,
            "saved_bytes_stored": memory.stored, "samples_finite": bool(torch.isfinite(samples).all()),
            "files": {"samples": figure}}


if __name__ == "__main__":
    main()
