"""Train a RevNet-style digit classifier whose reversible backbone runs memory-free.

A worked example (docs/examples/revnet_backbone.md). The data are scikit-learn's 8x8 digits
(1,797 images that ship with it: nothing is downloaded), split 80/20. The model:

- a non-invertible stem, ``Conv2d(1, C, 3) + ReLU``, lifts the one grey channel to ``C`` channels;
- the backbone, one :class:`invkernels.nn.InvertibleSequential` with ``memory_free=True``: stages of
  :class:`invkernels.nn.ReversibleBlock` at one resolution each, with an invertible
  :class:`invkernels.nn.Squeeze` (space-to-depth: channels x4, height and width /2) between stages,
  so ``C`` channels at 8x8, ``4C`` at 4x4, ``16C`` at 2x2 (i-RevNet's invertible downsampling);
- a non-invertible head, ``BatchNorm2d + ReLU + global average pooling + Linear``, for the 10 classes.

It trains with Adam on the cross-entropy, then prints the test accuracy; the activation memory one
training step keeps, memory-free and stored (:func:`invkernels.diagnostics.saved_bytes`), for the
trained model and for deeper backbones; and how far the memory-free parameter gradients are from
plain autograd's on one batch in float64. It writes ``revnet_backbone.png`` (loss and accuracy per
epoch, saved bytes against depth) and ``results.json`` into ``--out``.

Run ``python examples/revnet_backbone.py`` (20 epochs: 44 s with ``--threads 1`` on a 2-core machine) or
``python examples/revnet_backbone.py --help`` for the options.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import time

import torch
import torch.nn.functional as F
from torch import nn

from invkernels import diagnostics
from invkernels.demo import load_labelled_digits
from invkernels.nn import InvertibleSequential, ReversibleBlock, Squeeze

from cli_types import add_out_option, check_out_option, non_negative_int, positive_float, positive_int

FIGURE = "revnet_backbone.png"
RESULTS = "results.json"
CLASSES = 10
SIDE = 8  # the digits are 8x8
MAX_STAGES = 4  # 8x8, 4x4, 2x2, 1x1: each Squeeze halves the side
DEPTHS = (1, 2, 4, 8)  # blocks per stage of the saved-bytes sweep


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=positive_int, default=20, help="passes over the training set (default: 20)")
    parser.add_argument("--steps", type=positive_int, default=None,
                        help="stop after this many optimizer steps in all (default: no limit)")
    parser.add_argument("--batch-size", type=positive_int, default=64, help="images per step (default: 64)")
    parser.add_argument("--lr", type=positive_float, default=2e-3, help="Adam learning rate (default: 2e-3)")
    parser.add_argument("--channels", type=positive_int, default=8,
                        help="channels C after the stem, at 8x8; 4C at 4x4, 16C at 2x2 (default: 8, at least 2)")
    parser.add_argument("--blocks", type=positive_int, default=2, help="ReversibleBlocks per stage (default: 2)")
    parser.add_argument("--stages", type=positive_int, default=3,
                        help=f"resolutions 8x8, 4x4, ... (default: 3, at most {MAX_STAGES})")
    parser.add_argument("--hidden", type=positive_int, default=64, help="width of the conv subnets (default: 64)")
    parser.add_argument("--train-size", type=positive_int, default=None,
                        help="use only the first N training images (default: all 1437)")
    parser.add_argument("--seed", type=non_negative_int, default=0, help="random seed of split and training "
                        "(default: 0)")
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="torch CPU threads (default: torch's default, one per core)")
    add_out_option(parser, "revnet_backbone")
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    """The command line, checked: a bad value exits with a usage error naming the option."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.channels < 2:
        parser.error(f"argument --channels: should be at least 2 (a ReversibleBlock splits the channels in two "
                     f"halves), got {args.channels}")
    if args.stages > MAX_STAGES:
        parser.error(f"argument --stages: should be at most {MAX_STAGES} (the 8x8 images halve to 1x1 after "
                     f"{MAX_STAGES - 1} squeezes), got {args.stages}")
    check_out_option(parser, args, "revnet_backbone", (FIGURE, RESULTS))
    return args


class RevNetClassifier(nn.Module):
    """Stem (non-invertible) -> reversible backbone (memory-free) -> head (non-invertible).

    Args:
        channels: ``C``, the stem's output channels; stage ``s`` (from 0) runs at ``C * 4**s``
            channels and side ``8 / 2**s``.
        blocks: ReversibleBlocks per stage.
        stages: number of resolutions; a :class:`~invkernels.nn.Squeeze` goes between two stages.
        hidden: width of the blocks' conv subnets.
        memory_free: the backbone's setting (``True``, ``False`` or ``"auto"``).
    """

    def __init__(self, channels: int = 8, blocks: int = 2, stages: int = 3, hidden: int = 64,
                 memory_free: bool | str = True):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, channels, 3, padding=1), nn.ReLU())
        layers: list[nn.Module] = []
        for stage in range(stages):
            if stage:
                layers.append(Squeeze())  # C -> 4C channels, side / 2: a permutation, log-det 0
            layers += [ReversibleBlock(channels * 4**stage, "conv", hidden=hidden) for _ in range(blocks)]
        self.backbone = InvertibleSequential(*layers, memory_free=memory_free)
        final = channels * 4**(stages - 1)
        self.head = nn.Sequential(nn.BatchNorm2d(final), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                  nn.Linear(final, CLASSES))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z, _ = self.backbone(self.stem(x))  # the log-det of a classifier's backbone is not used
        return self.head(z)


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 512) -> tuple[float, float]:
    """``(mean cross-entropy, accuracy)`` of ``model`` in eval mode on ``(x, y)``."""
    model.eval()
    logits = torch.cat([model(chunk) for chunk in torch.split(x, batch)])
    return F.cross_entropy(logits, y).item(), (logits.argmax(1) == y).float().mean().item()


def train(model: RevNetClassifier, data: tuple, args: argparse.Namespace) -> tuple[list[dict], list[float]]:
    """Adam with cosine decay on the cross-entropy of shuffled batches. Returns one entry per
    epoch (mean training loss of its steps, training and test loss and accuracy after it) and the
    loss of every step."""
    train_x, train_y, test_x, test_y = data
    steps_per_epoch = math.ceil(len(train_x) / args.batch_size)
    total = args.epochs * steps_per_epoch if args.steps is None else min(args.steps, args.epochs * steps_per_epoch)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, total)
    history, step_losses = [], []
    step = 0
    for epoch in range(1, args.epochs + 1):
        start = time.perf_counter()
        model.train()
        order = torch.randperm(len(train_x))
        losses = []
        for i in range(steps_per_epoch):
            if step == total:
                break
            idx = order[i * args.batch_size:(i + 1) * args.batch_size]
            loss = F.cross_entropy(model(train_x[idx]), train_y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()  # the backbone rebuilds its activations block by block
            opt.step()
            sched.step()
            losses.append(loss.item())
            step += 1
        if not losses:
            break
        seconds = time.perf_counter() - start
        step_losses += losses
        train_loss, train_acc = evaluate(model, train_x, train_y)
        test_loss, test_acc = evaluate(model, test_x, test_y)
        history.append({"epoch": epoch, "steps": step, "seconds": seconds, "step_loss": sum(losses) / len(losses),
                        "train_loss": train_loss, "train_accuracy": train_acc, "test_loss": test_loss,
                        "test_accuracy": test_acc})
        print(f"  epoch {epoch:3d}  step loss {history[-1]['step_loss']:.4f}  train acc {train_acc:.4f}  "
              f"test acc {test_acc:.4f}  ({seconds:.1f} s)", flush=True)
    return history, step_losses


def saved_bytes_sweep(args: argparse.Namespace, x: torch.Tensor) -> list[dict]:
    """Saved activation bytes of one training step on ``x`` for fresh models with ``DEPTHS``
    blocks per stage (and the run's other sizes), memory-free and stored."""
    rows = []
    for blocks in DEPTHS:
        model = RevNetClassifier(args.channels, blocks, args.stages, args.hidden)
        saved = diagnostics.saved_bytes(model, x)
        rows.append({"blocks_per_stage": blocks, "memory_free": saved.memory_free, "stored": saved.stored})
    return rows


def gradient_difference(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Largest ``|g_mf - g_st| / max|g_st|`` over the parameters of a float64 copy of ``model``:
    its parameter gradients of the cross-entropy on ``(x, y)`` with the backbone memory-free
    against stored (plain autograd)."""
    twin = copy.deepcopy(model).double().train()
    grads = {}
    for memory_free in (True, False):
        twin.backbone.memory_free = memory_free
        loss = F.cross_entropy(twin(x.double()), y)
        grads[memory_free] = torch.autograd.grad(loss, list(twin.parameters()))
    return max(((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()
               for a, b in zip(grads[True], grads[False]))


def save_figure(history: list[dict], sweep: list[dict], blocks: int, title: str, path: str) -> None:
    """Three panels: losses per epoch, accuracies per epoch, saved MiB per step against depth."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415
    from matplotlib.ticker import MaxNLocator  # noqa: PLC0415

    epochs = [h["epoch"] for h in history]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    axes[0].plot(epochs, [h["step_loss"] for h in history], label="training steps (mean over the epoch)")
    axes[0].plot(epochs, [h["test_loss"] for h in history], label="test set (after the epoch)")
    axes[0].set_yscale("log")
    axes[0].set_xlabel("epoch")
    axes[0].set_ylabel("cross-entropy (nats)")
    axes[0].set_title("loss", fontsize=10)
    axes[0].legend(fontsize=8)
    axes[1].plot(epochs, [100 * h["train_accuracy"] for h in history], label="training set")
    axes[1].plot(epochs, [100 * h["test_accuracy"] for h in history], label="test set")
    axes[1].set_xlabel("epoch")
    axes[1].set_ylabel("accuracy (%)")
    axes[1].set_title(f"accuracy (final test {100 * history[-1]['test_accuracy']:.1f}%)", fontsize=10)
    axes[1].legend(fontsize=8)
    for ax in axes[:2]:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    depth = [r["blocks_per_stage"] for r in sweep]
    mib = 2.0 ** 20
    for key, label in (("stored", "whole model, backbone stored (plain autograd)"),
                       ("memory_free", "whole model, backbone memory-free")):
        values = [r[key] / mib for r in sweep]
        axes[2].plot(depth, values, "o-", label=label)
        for d, v in zip(depth, values):
            axes[2].annotate(f"{v:.2f}", (d, v), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=8)
    axes[2].axvline(blocks, color="grey", linestyle=":", label=f"trained model ({blocks} per stage)")
    axes[2].set_xticks(depth, [str(d) for d in depth])
    axes[2].margins(y=0.12)
    axes[2].set_xlabel("ReversibleBlocks per stage")
    axes[2].set_ylabel("saved activations per step (MiB)")
    axes[2].set_title("activation memory of one training step", fontsize=10)
    axes[2].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> dict:
    """Run the example with the command line ``argv`` (``sys.argv[1:]`` when None); returns the
    numbers it prints and the paths it wrote."""
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    train_x, train_y, test_x, test_y = load_labelled_digits(args.seed)
    if args.train_size is not None:
        train_x, train_y = train_x[:args.train_size], train_y[:args.train_size]
    torch.manual_seed(args.seed)
    model = RevNetClassifier(args.channels, args.blocks, args.stages, args.hidden)
    widths = ", ".join(f"{args.channels * 4**s} ch at {SIDE >> s}x{SIDE >> s}" for s in range(args.stages))
    print(f"RevNet backbone on the digits: {len(train_x)} training / {len(test_x)} test images, "
          f"{sum(p.numel() for p in model.parameters())} parameters; stages: {widths}, "
          f"{args.blocks} ReversibleBlocks each; torch threads {torch.get_num_threads()}")

    batch_x = train_x[:args.batch_size]
    model.train()
    saved = diagnostics.saved_bytes(model, batch_x)
    backbone_saved = diagnostics.saved_bytes(model.backbone, model.stem(batch_x).detach())
    start = time.perf_counter()
    history, step_losses = train(model, (train_x, train_y, test_x, test_y), args)
    seconds = time.perf_counter() - start
    sweep = saved_bytes_sweep(args, batch_x)
    grad_difference = gradient_difference(model, train_x[:16], train_y[:16])

    last = history[-1]
    kib = 1024.0
    print(f"  trained {last['steps']} steps in {seconds:.1f} s; test accuracy {100 * last['test_accuracy']:.2f}% "
          f"(training set {100 * last['train_accuracy']:.2f}%)")
    print(f"  saved activations per step (batch {len(batch_x)}), whole model: memory-free "
          f"{saved.memory_free / kib:.1f} KiB, stored {saved.stored / kib:.1f} KiB "
          f"({saved.stored / saved.memory_free:.1f}x); backbone alone: memory-free "
          f"{backbone_saved.memory_free / kib:.1f} KiB, stored {backbone_saved.stored / kib:.1f} KiB")
    print("  against depth (blocks per stage: memory-free / stored KiB): " + ", ".join(
        f"{r['blocks_per_stage']}: {r['memory_free'] / kib:.1f} / {r['stored'] / kib:.1f}" for r in sweep))
    print(f"  parameter gradients memory-free vs stored (float64, 16 images): max relative difference "
          f"{grad_difference:.1e}")

    figure = os.path.join(args.out, FIGURE)
    save_figure(history, sweep, args.blocks,
                f"RevNet-style classifier on the 8x8 digits: {args.stages} stages x {args.blocks} ReversibleBlocks, "
                f"C = {args.channels}, memory-free backbone", figure)
    results = {"test_accuracy": last["test_accuracy"], "train_accuracy": last["train_accuracy"],
               "first_step_loss": step_losses[0], "last_epoch_loss": last["step_loss"],
               "steps": last["steps"], "train_seconds": seconds,
               "saved_bytes": {"memory_free": saved.memory_free, "stored": saved.stored},
               "backbone_saved_bytes": {"memory_free": backbone_saved.memory_free, "stored": backbone_saved.stored},
               "saved_bytes_by_depth": sweep, "gradient_difference": grad_difference, "history": history,
               "settings": {k: v for k, v in vars(args).items()}}
    path = os.path.join(args.out, RESULTS)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2)
    print(f"  wrote {figure} and {path}")
    results["files"] = {"figure": figure, "results": path}
    return results


if __name__ == "__main__":
    main()
