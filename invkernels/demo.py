"""The demo (``python -m invkernels demo``): a memory-free Glow fitted to scikit-learn's digits.

1,797 real 8x8 images with 17 grey levels ship inside scikit-learn, so nothing is downloaded.
The demo trains on a fixed split with a fixed seed, reports test bits/dim next to a
full-covariance Gaussian fitted to the training set, writes a PNG grid of samples and a PNG
training curve, saves a checkpoint and reloads it (``weights_only=True``), reports the round-trip
error and scores held-out digits against out-of-distribution inputs (anomaly detection by
likelihood). The output directory is checked before training; a file that still cannot be
written afterwards is saved to a temporary directory instead, so the trained model and the
results are never lost. Docs: docs/models.md, docs/anomaly.md.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass

import torch

from invkernels.models.base import uniform_dequantize

LEVELS = 17  # grey levels of the digits (0..16)
# What the demo writes into its output directory.
OUTPUT_FILES = {"samples": "samples.png", "training_curve": "training_curve.png", "checkpoint": "glow_digits.pt",
                "results": "results.json"}


@dataclass
class DemoConfig:
    """Settings of the demo run (the defaults are the documented run)."""

    epochs: int = 40
    batch_size: int = 64
    lr: float = 2e-3
    warmup_steps: int = 100
    levels: int = 2
    steps: int = 6
    hidden: int = 96
    prior: str = "learned"
    seed: int = 0
    backend: str = "cpp"
    out_dir: str = "demo_output"
    temperature: float = 0.8


def check_out_dir(owner: str, out_dir: str, names) -> None:
    """ValueError naming ``owner`` unless ``out_dir`` is a directory (or can be created as one) in
    which the files ``names`` can be written: no existing non-directory at ``out_dir`` or on the
    way to it, none of the files an existing directory, and a file can be created there (tried
    with a temporary file). Creates nothing."""
    path = os.path.abspath(out_dir)
    if os.path.lexists(path) and not os.path.isdir(path):
        raise ValueError(f"{owner}: the output directory {out_dir!r} exists and is not a directory")
    probe = path
    while not os.path.lexists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise ValueError(f"{owner}: the output directory {out_dir!r} cannot be created: {probe!r} is not a directory")
    for name in names:
        target = os.path.join(path, name)
        if os.path.isdir(target):
            raise ValueError(f"{owner}: {os.path.join(out_dir, name)!r} is a directory, but the run writes a file "
                             f"there: remove it or choose another output directory")
        if os.path.lexists(target) and not os.access(target, os.W_OK):
            raise ValueError(f"{owner}: {os.path.join(out_dir, name)!r} exists and is not writable")
    try:
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as e:
        where = "in it" if probe == path else f"in {probe!r} to create it"
        raise ValueError(f"{owner}: the output directory {out_dir!r} is not writable: cannot create a file "
                         f"{where} ({e.strerror or e})") from e


class _Writer:
    """Writes the demo's files; one that cannot be written where asked is written to a temporary
    directory instead (created on the first failure), and the failure is recorded in ``failures``."""

    def __init__(self, out_dir: str):
        self.out_dir = out_dir
        self.fallback_dir: str | None = None
        self.failures: list[dict] = []

    def write(self, name: str, write_to) -> str:
        """``write_to(path)`` for ``out_dir/name``, or the fallback; returns the path written."""
        path = os.path.join(self.out_dir, name)
        try:
            write_to(path)
            return path
        except OSError as e:
            if self.fallback_dir is None:
                self.fallback_dir = tempfile.mkdtemp(prefix="invkernels-demo-")
            fallback = os.path.join(self.fallback_dir, name)
            self.failures.append({"file": path, "error": f"{type(e).__name__}: {e}", "saved_to": fallback})
            write_to(fallback)
            return fallback


def _json_value(value):
    """``value`` as JSON writes it natively (booleans, numbers, strings, None kept as they are); the
    text of anything else."""
    return value if value is None or isinstance(value, (bool, int, float, str)) else str(value)


def _save_json(obj, path: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)


def load_labelled_digits(seed: int = 0):
    """``(train_x, train_y, test_x, test_y)``: scikit-learn's ``load_digits`` as ``[N, 1, 8, 8]``
    float32 images with values ``k / 16`` and their int64 labels, an 80/20 split with
    ``train_test_split(random_state=seed)``."""
    from sklearn.datasets import load_digits  # noqa: PLC0415
    from sklearn.model_selection import train_test_split  # noqa: PLC0415

    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / (LEVELS - 1)
    labels = torch.tensor(data.target)
    train_idx, test_idx = train_test_split(list(range(len(images))), test_size=0.2, random_state=seed)
    return images[train_idx], labels[train_idx], images[test_idx], labels[test_idx]


def load_digits_split(seed: int = 0):
    """``(train, test)`` images of :func:`load_labelled_digits`."""
    train_x, _, test_x, _ = load_labelled_digits(seed)
    return train_x, test_x


def gaussian_baseline_bits_per_dim(train: torch.Tensor, test: torch.Tensor, levels: int = LEVELS) -> float:
    """Test bits/dim of a full-covariance Gaussian fitted (maximum likelihood, a 1e-4 ridge) to the
    dequantized training set, with the same dequantization correction as the flow."""
    a = uniform_dequantize(train, levels).flatten(1).double()
    b = uniform_dequantize(test, levels).flatten(1).double()
    dims = a.shape[1]
    mean = a.mean(0)
    cov = torch.cov(a.T, correction=0) + 1e-4 * torch.eye(dims, dtype=torch.float64)
    dist = torch.distributions.MultivariateNormal(mean, covariance_matrix=cov)
    nll = -(dist.log_prob(b) - dims * math.log(levels)) / (dims * math.log(2))
    return nll.mean().item()


def build_model(cfg: DemoConfig):
    from invkernels.models import Glow  # noqa: PLC0415

    return Glow((1, 8, 8), levels=cfg.levels, steps=cfg.steps, hidden=cfg.hidden, prior=cfg.prior,
                memory_free=True, backend=cfg.backend)


@torch.no_grad()
def mean_bits_per_dim(model, x: torch.Tensor, levels: int = LEVELS, batch: int = 512) -> float:
    return torch.cat([model.bits_per_dim(chunk, levels) for chunk in torch.split(x, batch)]).mean().item()


def train(model, train_x: torch.Tensor, test_x: torch.Tensor, cfg: DemoConfig, progress: bool = True):
    """Adam with linear warm-up on the dequantized bits/dim; returns the per-epoch history."""
    from tqdm import tqdm  # noqa: PLC0415

    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / cfg.warmup_steps))
    history = []
    steps_per_epoch = math.ceil(len(train_x) / cfg.batch_size)
    bar = tqdm(total=cfg.epochs * steps_per_epoch, desc="training Glow", unit="step", disable=not progress)
    for epoch in range(cfg.epochs):
        model.train()
        order = torch.randperm(len(train_x))
        losses = []
        for i in range(steps_per_epoch):
            batch = train_x[order[i * cfg.batch_size:(i + 1) * cfg.batch_size]]
            loss = model.bits_per_dim(batch, LEVELS).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 50.0)
            opt.step()
            sched.step()
            losses.append(loss.item())
            bar.update(1)
            bar.set_postfix(epoch=epoch + 1, bpd=f"{loss.item():.3f}")
        model.eval()
        history.append({"epoch": epoch + 1, "train_bpd": sum(losses) / len(losses),
                        "test_bpd": mean_bits_per_dim(model, test_x)})
    bar.close()
    return history


def photo_patches(n: int, seed: int = 0) -> torch.Tensor:
    """``n`` 8x8 greyscale patches cut at random from the photographs scikit-learn ships
    (``load_sample_images``), quantized to the digits' 17 levels, as ``[n, 1, 8, 8]`` in [0, 1]."""
    from sklearn.datasets import load_sample_images  # noqa: PLC0415

    g = torch.Generator().manual_seed(seed)
    patches = []
    images = [torch.tensor(img, dtype=torch.float32).mean(-1) / 255.0 for img in load_sample_images().images]
    for k in range(n):
        img = images[k % len(images)]
        r = int(torch.randint(0, img.shape[0] - 8, (1,), generator=g))
        c = int(torch.randint(0, img.shape[1] - 8, (1,), generator=g))
        patches.append(img[r:r + 8, c:c + 8])
    return (torch.round(torch.stack(patches) * (LEVELS - 1)) / (LEVELS - 1)).unsqueeze(1)


def out_of_distribution(test_x: torch.Tensor, seed: int = 0) -> dict[str, torch.Tensor]:
    """The demo's out-of-distribution sets, as many as test digits each."""
    g = torch.Generator().manual_seed(seed)
    n = len(test_x)
    return {
        "uniform noise": torch.randint(0, LEVELS, (n, 1, 8, 8), generator=g).float() / (LEVELS - 1),
        "digits upside down": test_x.flip(-2),
        "photo patches": photo_patches(n, seed),
    }


def save_grid(images: torch.Tensor, path: str, title: str) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    n = images.shape[0]
    cols = int(math.ceil(math.sqrt(n)))
    rows = int(math.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 0.8, rows * 0.8 + 0.4))
    for ax, k in zip(axes.flat, range(rows * cols)):
        ax.axis("off")
        if k < n:
            ax.imshow(images[k, 0].clamp(0, 1).numpy(), cmap="gray_r", vmin=0, vmax=1)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def save_curve(history: list[dict], baseline: float, path: str) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    epochs = [h["epoch"] for h in history]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(epochs, [h["train_bpd"] for h in history], label="Glow, train")
    ax.plot(epochs, [h["test_bpd"] for h in history], label="Glow, test")
    ax.axhline(baseline, color="gray", linestyle="--", label="full-covariance Gaussian, test")
    ax.set_xlabel("epoch")
    ax.set_ylabel("bits / dim (dequantized)")
    ax.set_title("Memory-free Glow on scikit-learn digits")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run(cfg: DemoConfig, progress: bool = True) -> dict:
    """Runs the whole demo; returns (and writes to ``out_dir/results.json``) the reported numbers.

    ``out_dir`` is checked before training (:func:`check_out_dir`, ValueError). The checkpoint is
    saved as soon as training ends. A file that cannot be written to ``out_dir`` after all is
    written to a temporary directory instead; ``results["write_failures"]`` lists each such file,
    its error and where it went (empty when everything was written where asked), and
    ``results["files"]`` holds the paths actually written."""
    import invkernels  # noqa: PLC0415
    from invkernels import anomaly  # noqa: PLC0415

    check_out_dir("demo", cfg.out_dir, OUTPUT_FILES.values())
    os.makedirs(cfg.out_dir, exist_ok=True)
    writer = _Writer(cfg.out_dir)
    torch.manual_seed(cfg.seed)
    train_x, test_x = load_digits_split(cfg.seed)
    baseline = gaussian_baseline_bits_per_dim(train_x, test_x)
    model = build_model(cfg)
    start = time.perf_counter()
    history = train(model, train_x, test_x, cfg, progress)
    train_seconds = time.perf_counter() - start
    model.eval()
    checkpoint = writer.write(OUTPUT_FILES["checkpoint"], lambda path: model.save(path, metadata=asdict(cfg)))

    torch.manual_seed(cfg.seed + 1)
    test_bpd = mean_bits_per_dim(model, test_x)
    with torch.no_grad():
        z, _ = model(test_x)
        round_trip = ((model.inverse(z) - test_x).norm() / test_x.norm()).item()
        torch.manual_seed(cfg.seed + 2)
        samples = model.sample(64, temperature=cfg.temperature)

    from invkernels.models import Glow  # noqa: PLC0415

    reloaded = Glow.load(checkpoint)
    probe = uniform_dequantize(test_x[:256], LEVELS)
    with torch.no_grad():
        reload_diff = (model.log_prob(probe) - reloaded.log_prob(probe)).abs().max().item()

    torch.manual_seed(cfg.seed + 3)
    inlier = anomaly.score(model, test_x, levels=LEVELS)
    aurocs = {}
    for name, data in out_of_distribution(test_x, cfg.seed).items():
        aurocs[name] = anomaly.auroc(inlier, anomaly.score(model, data, levels=LEVELS))

    samples_png = writer.write(OUTPUT_FILES["samples"],
                               lambda path: save_grid(samples, path, f"Glow samples, temperature {cfg.temperature}"))
    curve_png = writer.write(OUTPUT_FILES["training_curve"], lambda path: save_curve(history, baseline, path))
    results = {
        "backend": cfg.backend,
        "build": {k: _json_value(v) for k, v in invkernels.build_info().items()},
        "train_images": len(train_x), "test_images": len(test_x),
        "parameters": sum(p.numel() for p in model.parameters()),
        "train_seconds": round(train_seconds, 1),
        "test_bits_per_dim": test_bpd,
        "gaussian_baseline_bits_per_dim": baseline,
        "round_trip_relative_error": round_trip,
        "checkpoint_reload_max_log_prob_difference": reload_diff,
        "auroc": aurocs,
        "files": {"samples": samples_png, "training_curve": curve_png, "checkpoint": checkpoint},
        "write_failures": writer.failures,
        "history": history,
        "config": asdict(cfg),
    }
    writer.write(OUTPUT_FILES["results"], lambda path: _save_json(results, path))
    return results


def report(results: dict) -> str:
    lines = [
        f"Glow on scikit-learn digits ({results['train_images']} train / {results['test_images']} test images, "
        f"{results['parameters']} parameters, backend {results['backend']}, memory-free training, "
        f"{results['train_seconds']} s)",
        f"  test bits/dim:                      {results['test_bits_per_dim']:.3f}",
        f"  full-covariance Gaussian baseline:  {results['gaussian_baseline_bits_per_dim']:.3f}",
        f"  round-trip error |inverse(forward(x)) - x| / |x| on the test set: "
        f"{results['round_trip_relative_error']:.2e}",
        f"  checkpoint reloaded (weights_only): max |log_prob difference| = "
        f"{results['checkpoint_reload_max_log_prob_difference']:.3g}",
        "  anomaly detection, AUROC of test digits against:",
    ]
    lines += [f"    {name:20s} {value:.4f}" for name, value in results["auroc"].items()]
    lines += [f"  wrote {path}" for path in results["files"].values()]
    lines += [f"  could not write {f['file']} ({f['error']}); saved it to {f['saved_to']} instead"
              for f in results.get("write_failures", [])]
    return "\n".join(lines)
