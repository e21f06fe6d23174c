"""The inversion demo (``python -m invkernels invert``): how much of a digit each depth of an
ordinary CNN keeps, by optimization with priors and by a learned decoder, against exactly
invertible models. Docs: docs/inversion.md.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass

import torch
from torch import nn

LAYERS = {"conv1": "1", "conv2": "3", "logits": "6"}


@dataclass
class InvertDemoConfig:
    """Settings of the inversion demo (the defaults are the documented run)."""

    classifier_epochs: int = 15
    steps: int = 300
    decoder_epochs: int = 40
    images: int = 8
    glow_epochs: int = 5
    seed: int = 0
    out_dir: str = "invert_output"


def classifier() -> nn.Sequential:
    """A small CNN for 8x8 digits; the layers of ``LAYERS`` are its ReLU outputs and logits."""
    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, stride=2, padding=1),
                         nn.ReLU(), nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.Linear(64, 10))


def train_classifier(train_x, train_y, test_x, test_y, epochs: int, seed: int):
    torch.manual_seed(seed)
    model = classifier()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    for _ in range(epochs):
        for idx in torch.split(torch.randperm(len(train_x)), 64):
            loss = nn.functional.cross_entropy(model(train_x[idx]), train_y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(test_x).argmax(1) == test_y).float().mean().item()
    return model, accuracy


def exact_contrast(train_x: torch.Tensor, test_x: torch.Tensor, x0: torch.Tensor, cfg: InvertDemoConfig) -> dict:
    """Relative round-trip errors of exactly invertible models on the same digits: a stack of
    InvertibleResidual blocks (fixed-point inverse) and a Glow trained briefly on the training
    digits (analytic inverse)."""
    from invkernels import demo  # noqa: PLC0415
    from invkernels.nn import InvertibleResidual, InvertibleSequential  # noqa: PLC0415

    torch.manual_seed(cfg.seed)
    x = x0.flatten(1).double()
    resnet = InvertibleSequential(*(InvertibleResidual(nn.Sequential(nn.Linear(64, 128), nn.ELU(), nn.Linear(128, 64)),
                                                       lipschitz=0.9) for _ in range(4))).double().eval()
    glow_cfg = demo.DemoConfig(epochs=cfg.glow_epochs, levels=2, steps=4, hidden=32, seed=cfg.seed)
    glow = demo.build_model(glow_cfg)
    history = demo.train(glow, train_x, test_x, glow_cfg, progress=False)
    glow.eval()
    with torch.no_grad():
        y, _ = resnet(x)
        res_err = ((resnet.inverse(y) - x).norm() / x.norm()).item()
        z, _ = glow(x0)
        glow_err = ((glow.inverse(z) - x0).norm() / x0.norm()).item()
    return {"InvertibleResidual x4 (fixed point, float64)": res_err,
            f"Glow trained {cfg.glow_epochs} epochs (test {history[-1]['test_bpd']:.2f} bits/dim, float32)": glow_err}


def save_grid(originals, rows: dict[str, torch.Tensor], path: str) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    n = originals.shape[0]
    names = ["original", *rows]
    fig, axes = plt.subplots(len(names), n, figsize=(n * 0.9 + 1.6, len(names) * 0.95))
    for r, name in enumerate(names):
        images = originals if name == "original" else rows[name]
        for c in range(n):
            ax = axes[r, c]
            ax.imshow(images[c, 0].clamp(0, 1).numpy(), cmap="gray_r", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(name, rotation=0, ha="right", va="center", fontsize=7)
    fig.suptitle("Test digits reconstructed from each depth of a CNN", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run(cfg: InvertDemoConfig, progress: bool = True) -> dict:
    from invkernels import inversion  # noqa: PLC0415
    from invkernels.demo import load_labelled_digits  # noqa: PLC0415

    os.makedirs(cfg.out_dir, exist_ok=True)
    train_x, train_y, test_x, test_y = load_labelled_digits(cfg.seed)
    model, accuracy = train_classifier(train_x, train_y, test_x, test_y, cfg.classifier_epochs, cfg.seed)
    x0 = test_x[:cfg.images]
    rows, table = {}, []
    for depth, layer in LAYERS.items():
        opt = inversion.invert(model, layer, x0=x0, steps=cfg.steps, lr=0.05, lambda_tv=1e-3, beta=2.0,
                               lambda_alpha=1e-4, alpha=2.0, bounds=(0.0, 1.0), seed=cfg.seed, progress=progress)
        dec = inversion.fit_decoder(model, layer, train_x, epochs=cfg.decoder_epochs, seed=cfg.seed,
                                    progress=progress).evaluate(x0, bounds=(0.0, 1.0))
        rows[f"{depth}, optimized"] = opt.x
        rows[f"{depth}, decoder"] = dec.x
        for method, res in (("optimization", opt), ("decoder", dec)):
            table.append({"depth": depth, "layer": layer, "method": method, "psnr_db": res.psnr.mean().item(),
                          "input_error": res.input_error.mean().item(),
                          "feature_error": res.feature_error.mean().item()})
    grid = os.path.join(cfg.out_dir, "inversions.png")
    save_grid(x0, rows, grid)
    results = {"classifier_test_accuracy": accuracy, "table": table, "exact": exact_contrast(train_x, test_x, x0, cfg),
               "files": {"grid": grid}, "config": asdict(cfg)}
    with open(os.path.join(cfg.out_dir, "results.json"), "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2)
    return results


def report(results: dict) -> str:
    lines = [f"CNN on scikit-learn digits, test accuracy {results['classifier_test_accuracy']:.3f}",
             "reconstructions of test digits (means over the shown digits):",
             f"  {'depth':8s} {'method':13s} {'PSNR dB':>8s} {'input error':>12s} {'feature error':>14s}"]
    for row in results["table"]:
        lines.append(f"  {row['depth']:8s} {row['method']:13s} {row['psnr_db']:8.2f} {row['input_error']:12.3f} "
                     f"{row['feature_error']:14.3g}")
    lines.append("exact inverses, relative round-trip error:")
    lines += [f"  {name}: {value:.2e}" for name, value in results["exact"].items()]
    lines.append(f"  wrote {results['files']['grid']}")
    return "\n".join(lines)
