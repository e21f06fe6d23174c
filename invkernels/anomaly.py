"""Anomaly detection by likelihood: inputs a flow finds unlikely are flagged. Docs: docs/anomaly.md."""

from __future__ import annotations

import torch
from torch import nn

from invkernels import _state, _validation
from invkernels.models.base import check_levels
from invkernels.nn.actnorm import check_initialized


def score(model: nn.Module, x: torch.Tensor, levels: int | None = None, batch_size: int = 512) -> torch.Tensor:
    """Anomaly scores of ``x`` under a trained flow: the negative log-likelihood, higher meaning
    more anomalous.

    Scoring only evaluates: the model runs in eval mode and without grad, and every submodule's
    train/eval flag is restored afterwards. A model whose ActNorm layers were never initialized
    (an untrained flow) raises ValueError rather than being initialized from the scored data.

    Args:
        model: a trained flow with ``log_prob`` (and ``bits_per_dim`` when ``levels`` is given),
            e.g. :class:`invkernels.models.Glow`.
        x: the inputs, ``[N, *event_shape]``.
        levels: for discrete data with ``levels`` grey levels: the score is the dequantized
            negative log-likelihood in bits per dimension (:meth:`FlowModel.bits_per_dim`);
            None: ``-log_prob(x)`` in nats.
        batch_size: inputs scored at once.

    Returns:
        ``[N]`` float tensor of scores, on ``x``'s device.
    """
    _validation.check_int("score", "batch_size", batch_size)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"score: x should be a tensor [N, ...], got {type(x).__name__}")
    if x.dim() < 1:
        raise ValueError(f"score: x should be a batch [N, ...] of inputs, got a 0-D tensor ({x.item()!r}); "
                         f"pass x.reshape(1, ...) with the model's event shape to score a single input")
    if levels is not None:
        check_levels("score", levels)
    check_initialized(model, "score")
    out = []
    with torch.no_grad(), _state.eval_mode(model):
        for chunk in torch.split(x, batch_size):
            out.append(model.bits_per_dim(chunk, levels) if levels is not None else -model.log_prob(chunk))
    return torch.cat(out) if out else x.new_zeros(0)


def _scores(name: str, scores) -> torch.Tensor:
    """``scores`` as a flat float64 CPU tensor; ValueError naming ``name`` for NaN or no values."""
    flat = torch.as_tensor(scores).detach().reshape(-1).double().cpu()
    if flat.numel() == 0:
        raise ValueError(f"auroc: {name} should be non-empty, got {flat.numel()} scores")
    nan = torch.isnan(flat)
    if bool(nan.any()):
        raise ValueError(f"auroc: {name} has {int(nan.sum())} NaN score(s) of {flat.numel()} (first at index "
                         f"{int(nan.nonzero()[0])}); a NaN score has no rank: find where the model gives NaN")
    return flat


def auroc(inlier_scores: torch.Tensor, outlier_scores: torch.Tensor) -> float:
    """Area under the ROC curve of telling outliers (positives) from inliers by score
    (``sklearn.metrics.roc_auc_score``): 1.0 separates them perfectly, 0.5 is chance.

    Only the order of the scores matters: an infinite score (an input the flow gives zero
    likelihood, ``+inf``) ranks above every finite one, ``-inf`` below, equal scores tie. NaN
    scores raise ValueError."""
    from sklearn.metrics import roc_auc_score  # noqa: PLC0415

    inl = _scores("inlier_scores", inlier_scores)
    outl = _scores("outlier_scores", outlier_scores)
    labels = torch.cat([torch.zeros(inl.numel()), torch.ones(outl.numel())])
    # Dense ranks keep the order and the ties and are finite, which roc_auc_score requires.
    _, ranks = torch.unique(torch.cat([inl, outl]), return_inverse=True)
    return float(roc_auc_score(labels.numpy(), ranks.numpy()))
