"""The spline demo (``python -m invkernels demo spline``): a neural spline flow fitted to
scikit-learn's two moons, a 2-D density you can look at.

The points come from ``sklearn.datasets.make_moons`` (nothing is downloaded), split into a
training and a test set and standardized with the training set's mean and standard deviation.
A small :class:`~invkernels.models.NeuralSplineFlow` (memory-free training) is fitted by maximum
likelihood; the demo reports the mean log-likelihood per point (nats, in the standardized
coordinates) on both sets next to a full-covariance Gaussian fitted to the same training points,
the density on the two moons against the density in the gap between them, and the round-trip
error. It writes one PNG of three panels (the data, the learned density ``exp(log_prob)`` on a
grid, samples from the model) and the numbers as JSON. The output directory is checked before
training; a file that cannot be written afterwards goes to a temporary directory instead, as in
the Glow demo (:mod:`invkernels.demo`). Docs: docs/models.md.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass

import torch

from invkernels import _backend
from invkernels._validation import check_int
from invkernels.demo import _save_json, _Writer, check_out_dir

# What the demo writes into its output directory (named apart from the Glow demo's files, so both
# demos can share one directory).
OUTPUT_FILES = {"figure": "spline_moons.png", "results": "spline_results.json"}
# Points in make_moons' own coordinates: the outer middle of each moon, and the gap between them
# (the centre of the data's point symmetry, about 0.44 from either moon's centre line).
MOON_POINTS = ((0.0, 1.0), (1.0, -0.5))
GAP_POINT = (0.5, 0.25)
_MAX_SEED = 2**32 - 1  # make_moons takes seeds in [0, 2**32 - 1]


def _check_number(owner: str, name: str, value, minimum: float, strict: bool) -> float:
    """``float(value)`` if it is a finite number above ``minimum`` (or equal, unless ``strict``),
    else a ValueError naming ``owner`` and ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or \
            value < minimum or (strict and value == minimum):
        bound = f"> {minimum:g}" if strict else f">= {minimum:g}"
        raise ValueError(f"{owner}: {name} should be a finite number {bound}, got {value!r}")
    return float(value)


@dataclass
class SplineDemoConfig:
    """Settings of the spline demo (the defaults are the documented run). Checked when created:
    a bad value is a ValueError naming the setting and the value."""

    steps: int = 1000
    batch_size: int = 256
    lr: float = 5e-3
    train_points: int = 5000
    test_points: int = 1000
    noise: float = 0.05
    blocks: int = 4
    hidden: int = 64
    bins: int = 8
    tail_bound: float = 4.0
    grid: int = 200
    samples: int = 2000
    seed: int = 0
    backend: str = "cpp"
    out_dir: str = "demo_output"

    def __post_init__(self):
        owner = type(self).__name__
        for name in ("steps", "batch_size", "test_points", "blocks", "hidden", "bins", "samples"):
            check_int(owner, name, getattr(self, name))
        # The Gaussian baseline's covariance needs a few points; the figure's grid needs two per side.
        check_int(owner, "train_points", self.train_points, minimum=3)
        check_int(owner, "grid", self.grid, minimum=2)
        check_int(owner, "seed", self.seed, minimum=0)
        if self.seed > _MAX_SEED:
            raise ValueError(f"{owner}: seed should be at most {_MAX_SEED} (make_moons' limit), got {self.seed!r}")
        _check_number(owner, "lr", self.lr, 0.0, strict=True)
        _check_number(owner, "noise", self.noise, 0.0, strict=False)
        _check_number(owner, "tail_bound", self.tail_bound, 0.0, strict=True)
        if self.backend not in _backend.BACKENDS:
            raise ValueError(f"{owner}: backend should be one of {_backend.BACKENDS}, got {self.backend!r}")
        if not isinstance(self.out_dir, str) or not self.out_dir.strip():
            raise ValueError(f"{owner}: out_dir should be a directory path, got {self.out_dir!r}")


def load_moons(cfg: SplineDemoConfig):
    """``(train, test, mean, std)``: ``cfg.train_points + cfg.test_points`` points of
    ``make_moons(noise=cfg.noise, random_state=cfg.seed)`` (shuffled), split in that order, both
    standardized (float32) with the training points' ``mean`` and ``std`` (shape ``[2]``)."""
    from sklearn.datasets import make_moons  # noqa: PLC0415

    points, _ = make_moons(cfg.train_points + cfg.test_points, noise=cfg.noise, random_state=cfg.seed)
    points = torch.tensor(points, dtype=torch.float32)
    train, test = points[:cfg.train_points], points[cfg.train_points:]
    mean, std = train.mean(0), train.std(0)
    return (train - mean) / std, (test - mean) / std, mean, std


def build_model(cfg: SplineDemoConfig):
    from invkernels.models import NeuralSplineFlow  # noqa: PLC0415

    return NeuralSplineFlow(2, blocks=cfg.blocks, hidden=cfg.hidden, bins=cfg.bins, tail_bound=cfg.tail_bound,
                            backend=cfg.backend)


def gaussian_log_likelihood(train: torch.Tensor, points: torch.Tensor) -> float:
    """Mean log-density (nats) of ``points`` under the full-covariance Gaussian fitted to ``train``
    by maximum likelihood, in float64."""
    a = train.double()
    cov = torch.cov(a.T, correction=0)
    gaussian = torch.distributions.MultivariateNormal(a.mean(0), covariance_matrix=cov)
    return gaussian.log_prob(points.double()).mean().item()


@torch.no_grad()
def mean_log_likelihood(model, points: torch.Tensor, batch: int = 8192) -> float:
    """Mean of ``model.log_prob`` over ``points`` (nats)."""
    return torch.cat([model.log_prob(chunk) for chunk in torch.split(points, batch)]).mean().item()


@torch.no_grad()
def density_grid(model, lim: float, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(axis, density)``: ``size`` points from ``-lim`` to ``lim`` on each axis, and
    ``exp(model.log_prob)`` on the ``size x size`` grid they span (row ``i``: second coordinate
    ``axis[i]``; column ``j``: first coordinate ``axis[j]``)."""
    axis = torch.linspace(-lim, lim, size)
    second, first = torch.meshgrid(axis, axis, indexing="ij")
    points = torch.stack([first.reshape(-1), second.reshape(-1)], 1)
    log_p = torch.cat([model.log_prob(chunk) for chunk in torch.split(points, 8192)])
    return axis, log_p.exp().reshape(size, size)


def train(model, train_x: torch.Tensor, test_x: torch.Tensor, cfg: SplineDemoConfig, progress: bool = True):
    """Adam with cosine decay on the negative log-likelihood of random batches; returns the
    history: every tenth of the run, the mean training log-likelihood of the batches since the
    last entry and the test log-likelihood."""
    from tqdm import tqdm  # noqa: PLC0415

    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.steps)
    every = max(1, cfg.steps // 10)
    history, window = [], []
    bar = tqdm(total=cfg.steps, desc="training NeuralSplineFlow", unit="step", disable=not progress)
    for step in range(1, cfg.steps + 1):
        model.train()
        batch = train_x[torch.randint(0, len(train_x), (cfg.batch_size,))]
        loss = -model.log_prob(batch).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        window.append(-loss.item())
        bar.update(1)
        bar.set_postfix(log_lik=f"{-loss.item():.3f}")
        if step % every == 0 or step == cfg.steps:
            model.eval()
            history.append({"step": step, "train_log_likelihood": sum(window) / len(window),
                            "test_log_likelihood": mean_log_likelihood(model, test_x)})
            window = []
    bar.close()
    model.eval()
    return history


def save_figure(train_x: torch.Tensor, axis: torch.Tensor, density: torch.Tensor, samples: torch.Tensor,
                results: dict, path: str) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    lim = axis[-1].item()
    fig, axes = plt.subplots(1, 3, figsize=(12, 4.8))
    flow, gauss = results["log_likelihood"]["spline_flow"], results["log_likelihood"]["gaussian"]
    axes[0].scatter(train_x[:, 0].numpy(), train_x[:, 1].numpy(), s=2, color="tab:blue")
    axes[0].set_title(f"data: {len(train_x)} training points", fontsize=9)
    # The colour scale tops out at the 99.5th percentile: a few sharp peaks would leave the rest dark.
    axes[1].imshow(density.numpy(), origin="lower", extent=(-lim, lim, -lim, lim), cmap="viridis",
                   vmin=0.0, vmax=torch.quantile(density.flatten(), 0.995).item())
    axes[1].set_title(f"learned density exp(log p)\ntest log-likelihood {flow['test']:.3f} nats "
                      f"(Gaussian {gauss['test']:.3f})", fontsize=9)
    axes[2].scatter(samples[:, 0].numpy(), samples[:, 1].numpy(), s=2, color="tab:orange")
    axes[2].set_title(f"{len(samples)} samples from the flow", fontsize=9)
    for ax in axes:
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        ax.set_aspect("equal")
        ax.set_xlabel("x1 (standardized)", fontsize=8)
    axes[0].set_ylabel("x2 (standardized)", fontsize=8)
    fig.suptitle(f"NeuralSplineFlow on scikit-learn's two moons (noise {results['config']['noise']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run(cfg: SplineDemoConfig, progress: bool = True) -> dict:
    """Runs the whole demo; returns the reported numbers (written to
    ``out_dir/spline_results.json``) and, under ``"model"`` (not written), the trained model in
    eval mode.

    Log-likelihoods are means per point in nats, in the standardized coordinates of
    :func:`load_moons`. ``out_dir`` is checked before training (:func:`check_out_dir`,
    ValueError). A file that cannot be written to ``out_dir`` after all is written to a temporary
    directory instead; ``results["write_failures"]`` lists each such file, its error and where it
    went (empty when everything was written where asked), and ``results["files"]`` holds the
    figure's path actually written."""
    check_out_dir("demo spline", cfg.out_dir, OUTPUT_FILES.values())
    os.makedirs(cfg.out_dir, exist_ok=True)
    writer = _Writer(cfg.out_dir)
    torch.manual_seed(cfg.seed)
    train_x, test_x, mean, std = load_moons(cfg)
    model = build_model(cfg)
    start = time.perf_counter()
    history = train(model, train_x, test_x, cfg, progress)
    train_seconds = time.perf_counter() - start

    moons = (torch.tensor(MOON_POINTS) - mean) / std
    gap = (torch.tensor([GAP_POINT]) - mean) / std
    with torch.no_grad():
        z, _ = model(test_x)
        round_trip = (model.inverse(z) - test_x).abs().max().item()
        on_moons = model.log_prob(moons).exp().tolist()
        in_gap = model.log_prob(gap).exp().item()
        torch.manual_seed(cfg.seed + 1)
        samples = model.sample(cfg.samples)
    lim = max(2.5, 1.1 * train_x.abs().max().item())  # the data's square, with a margin
    axis, density = density_grid(model, lim, cfg.grid)
    results = {
        "backend": cfg.backend,
        "train_points": len(train_x), "test_points": len(test_x),
        "parameters": sum(p.numel() for p in model.parameters()),
        "train_seconds": round(train_seconds, 1),
        "log_likelihood": {
            "spline_flow": {"train": mean_log_likelihood(model, train_x), "test": mean_log_likelihood(model, test_x)},
            "gaussian": {"train": gaussian_log_likelihood(train_x, train_x),
                         "test": gaussian_log_likelihood(train_x, test_x)},
        },
        "density": {"on_moons": dict(zip(map(str, MOON_POINTS), on_moons)), "in_gap": in_gap,
                    "ratio_moons_to_gap": min(on_moons) / in_gap if in_gap > 0 else math.inf},
        "round_trip_max_abs_error": round_trip,
        "standardization": {"mean": mean.tolist(), "std": std.tolist()},
        "history": history,
        "config": asdict(cfg),
    }
    figure = writer.write(OUTPUT_FILES["figure"],
                          lambda path: save_figure(train_x, axis, density, samples, results, path))
    results["files"] = {"figure": figure}
    results["write_failures"] = writer.failures
    writer.write(OUTPUT_FILES["results"], lambda path: _save_json(results, path))
    results["model"] = model
    return results


def report(results: dict) -> str:
    flow, gauss = results["log_likelihood"]["spline_flow"], results["log_likelihood"]["gaussian"]
    density = results["density"]
    lines = [
        f"NeuralSplineFlow on scikit-learn's two moons ({results['train_points']} train / {results['test_points']} "
        f"test points, {results['parameters']} parameters, backend {results['backend']}, memory-free training, "
        f"{results['train_seconds']} s)",
        "  mean log-likelihood per point (nats, standardized data):  train    test",
        f"    NeuralSplineFlow                                      {flow['train']:7.3f} {flow['test']:7.3f}",
        f"    full-covariance Gaussian                              {gauss['train']:7.3f} {gauss['test']:7.3f}",
        f"  density on the moons {', '.join(f'{v:.3g}' for v in density['on_moons'].values())}, "
        f"in the gap between them {density['in_gap']:.3g} (ratio {density['ratio_moons_to_gap']:.3g})",
        f"  round-trip error max |inverse(forward(x)) - x| on the test set: {results['round_trip_max_abs_error']:.2e}",
    ]
    lines += [f"  wrote {path}" for path in results["files"].values()]
    lines += [f"  could not write {f['file']} ({f['error']}); saved it to {f['saved_to']} instead"
              for f in results.get("write_failures", [])]
    return "\n".join(lines)
