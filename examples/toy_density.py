"""Fit a 2-D toy density with RealNVP by maximum likelihood, draw it, save and reload the model.

A worked example for new users (docs/examples/toy_density.md). The data are points of a 2-D toy
distribution: ``ring`` (eight Gaussian blobs on a circle, drawn with torch) or ``moons``
(scikit-learn's ``make_moons``). A :class:`invkernels.models.RealNVP` is trained on them with Adam
on the negative log-likelihood ``-model.log_prob(x).mean()``; then the script

- prints the mean negative log-likelihood (NLL, nats per point) of held-out points, next to a
  full-covariance Gaussian fitted to the training points;
- writes ``toy_density.png``: the training data, the model's log-density ``log_prob`` on a grid,
  and samples drawn with ``model.sample``;
- saves the model with ``model.save`` and reloads it with ``RealNVP.load``, checking that the
  reloaded model gives identical ``log_prob``.

Run ``python examples/toy_density.py`` (about a minute on one thread) or
``python examples/toy_density.py --help`` for the options.
"""

from __future__ import annotations

import argparse
import math
import os
import time

import torch

from invkernels.models import RealNVP

from cli_types import add_out_option, check_out_option, non_negative_int, positive_float, positive_int

DATASETS = ("ring", "moons")
FIGURE = "toy_density.png"
CHECKPOINT = "realnvp_toy.pt"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", choices=DATASETS, default="ring", help="toy distribution (default: ring)")
    parser.add_argument("--steps", type=positive_int, default=3000, help="optimizer steps (default: 3000)")
    parser.add_argument("--batch-size", type=positive_int, default=512, help="points per step (default: 512)")
    parser.add_argument("--lr", type=positive_float, default=2e-3, help="Adam learning rate (default: 2e-3)")
    parser.add_argument("--blocks", type=positive_int, default=8, help="RealNVP coupling blocks (default: 8)")
    parser.add_argument("--hidden", type=positive_int, default=128, help="width of the coupling MLPs (default: 128)")
    parser.add_argument("--train-points", type=positive_int, default=20000, help="training points (default: 20000)")
    parser.add_argument("--test-points", type=positive_int, default=5000, help="held-out points (default: 5000)")
    parser.add_argument("--grid", type=positive_int, default=200, help="density grid points per side (default: 200)")
    parser.add_argument("--samples", type=positive_int, default=5000, help="samples drawn for the figure "
                        "(default: 5000)")
    parser.add_argument("--seed", type=non_negative_int, default=0, help="random seed (default: 0)")
    add_out_option(parser, "toy_density")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    """The command line, checked: a bad value exits with a usage error naming the option."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.train_points < 3:
        parser.error(f"argument --train-points: should be at least 3 (the Gaussian baseline fits a covariance), "
                     f"got {args.train_points}")
    if args.grid < 2:
        parser.error(f"argument --grid: should be at least 2, got {args.grid}")
    check_out_option(parser, args, "toy_density", (FIGURE, CHECKPOINT))
    return args


def make_data(name: str, n: int, seed: int) -> torch.Tensor:
    """``n`` points ``[n, 2]`` (float32) of the toy distribution ``name``, both coordinates within
    about [-3, 3]."""
    g = torch.Generator().manual_seed(seed)
    if name == "ring":
        # Eight Gaussian blobs (std 0.15) evenly spaced on the circle of radius 2.
        angle = torch.randint(0, 8, (n,), generator=g) * (2 * math.pi / 8)
        centres = 2.0 * torch.stack([angle.cos(), angle.sin()], 1)
        return centres + 0.15 * torch.randn(n, 2, generator=g)
    from sklearn.datasets import make_moons  # noqa: PLC0415

    points, _ = make_moons(n, noise=0.05, random_state=seed)
    # Centred on the moons' centre of symmetry (0.5, 0.25) and scaled to about [-3, 3] x [-1.5, 1.5].
    return (torch.tensor(points, dtype=torch.float32) - torch.tensor([0.5, 0.25])) * 2.0


def gaussian_nll(train_x: torch.Tensor, test_x: torch.Tensor) -> float:
    """Mean NLL (nats) of ``test_x`` under the full-covariance Gaussian fitted to ``train_x``."""
    a = train_x.double()
    gaussian = torch.distributions.MultivariateNormal(a.mean(0), covariance_matrix=torch.cov(a.T, correction=0))
    return -gaussian.log_prob(test_x.double()).mean().item()


@torch.no_grad()
def mean_nll(model: RealNVP, x: torch.Tensor) -> float:
    """Mean ``-log_prob`` (nats per point) of ``x``, in chunks."""
    return -torch.cat([model.log_prob(chunk) for chunk in torch.split(x, 8192)]).mean().item()


def train(model: RealNVP, train_x: torch.Tensor, args: argparse.Namespace) -> list[float]:
    """Adam with cosine learning-rate decay on the NLL of random batches; returns the loss of
    every step (nats per point)."""
    from tqdm import tqdm  # noqa: PLC0415

    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.steps)
    losses = []
    model.train()
    with tqdm(range(args.steps), desc="training RealNVP", unit="step", disable=args.no_progress) as bar:
        for _ in bar:
            batch = train_x[torch.randint(0, len(train_x), (args.batch_size,))]
            loss = -model.log_prob(batch).mean()  # the first call also initializes ActNorm from the batch
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
            bar.set_postfix(nll=f"{loss.item():.3f}")
    model.eval()
    return losses


@torch.no_grad()
def log_density_grid(model: RealNVP, lim: float, size: int) -> torch.Tensor:
    """``model.log_prob`` on a ``size x size`` grid over ``[-lim, lim]^2`` (row: second
    coordinate, column: first coordinate, both increasing)."""
    axis = torch.linspace(-lim, lim, size)
    second, first = torch.meshgrid(axis, axis, indexing="ij")
    points = torch.stack([first.reshape(-1), second.reshape(-1)], 1)
    return torch.cat([model.log_prob(chunk) for chunk in torch.split(points, 8192)]).reshape(size, size)


def save_figure(train_x: torch.Tensor, log_p: torch.Tensor, samples: torch.Tensor, lim: float, title: str,
                path: str) -> None:
    """Three panels: the training data, the log-density on the grid, the samples."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, axes = plt.subplots(1, 3, figsize=(13, 4.4))
    shown = train_x[:5000]
    axes[0].scatter(shown[:, 0].numpy(), shown[:, 1].numpy(), s=1, color="tab:blue")
    axes[0].set_title(f"training data ({len(shown)} of {len(train_x)} points)", fontsize=9)
    # Log-densities more than 12 nats below the peak are shown as the floor colour.
    top = log_p.max().item()
    image = axes[1].imshow(log_p.numpy(), origin="lower", extent=(-lim, lim, -lim, lim), cmap="viridis",
                           vmin=top - 12.0, vmax=top)
    fig.colorbar(image, ax=axes[1], fraction=0.046, pad=0.04, label="log p(x), nats")
    axes[1].set_title("model log-density log_prob(x)", fontsize=9)
    axes[2].scatter(samples[:, 0].numpy(), samples[:, 1].numpy(), s=1, color="tab:orange")
    axes[2].set_title(f"{len(samples)} samples, model.sample", fontsize=9)
    for ax in axes:
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        ax.set_aspect("equal")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> dict:
    """Run the example with the command line ``argv`` (``sys.argv[1:]`` when None); returns the
    numbers it prints and the paths it wrote."""
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    torch.manual_seed(args.seed)

    data = make_data(args.dataset, args.train_points + args.test_points, args.seed)
    train_x, test_x = data[:args.train_points], data[args.train_points:]
    model = RealNVP(2, blocks=args.blocks, hidden=args.hidden)

    start = time.perf_counter()
    losses = train(model, train_x, args)
    seconds = time.perf_counter() - start
    test_nll = mean_nll(model, test_x)
    baseline = gaussian_nll(train_x, test_x)

    checkpoint = os.path.join(args.out, CHECKPOINT)
    model.save(checkpoint, metadata={"dataset": args.dataset, "steps": args.steps, "seed": args.seed})
    reloaded = RealNVP.load(checkpoint)
    with torch.no_grad():
        reload_identical = torch.equal(reloaded.log_prob(test_x), model.log_prob(test_x))

    lim = 1.15 * data.abs().max().item()
    log_p = log_density_grid(model, lim, args.grid)
    samples = model.sample(args.samples)
    figure = os.path.join(args.out, FIGURE)
    save_figure(train_x, log_p, samples, lim, f"RealNVP ({args.blocks} blocks, width {args.hidden}) on the "
                f"{args.dataset} data: test NLL {test_nll:.3f} nats (Gaussian {baseline:.3f})", figure)

    first = sum(losses[:10]) / len(losses[:10])
    last = sum(losses[-10:]) / len(losses[-10:])
    print(f"RealNVP on the {args.dataset} data: {args.train_points} training / {args.test_points} held-out "
          f"points, {sum(p.numel() for p in model.parameters())} parameters, {args.steps} steps in {seconds:.1f} s")
    print(f"  training NLL (nats/point), mean of 10 steps: first {first:.3f}, last {last:.3f}")
    print(f"  held-out NLL: RealNVP {test_nll:.3f}, full-covariance Gaussian {baseline:.3f}")
    print(f"  saved {checkpoint}; RealNVP.load gives identical log_prob: {reload_identical}")
    print(f"  wrote {figure}")
    return {"test_nll": test_nll, "gaussian_test_nll": baseline, "first_train_nll": first, "last_train_nll": last,
            "train_seconds": seconds, "reload_identical": reload_identical,
            "samples_finite": bool(torch.isfinite(samples).all()),
            "files": {"figure": figure, "checkpoint": checkpoint}}


if __name__ == "__main__":
    main()
