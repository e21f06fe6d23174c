"""Anomaly detection by likelihood: inputs a flow finds unlikely are flagged. Docs: docs/anomaly.md."""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def score(model: nn.Module, x: torch.Tensor, levels: int | None = None, batch_size: int = 512) -> torch.Tensor:
    """Anomaly scores of ``x`` under a trained flow: the negative log-likelihood, higher meaning
    more anomalous.

    Args:
        model: a flow with ``log_prob`` (and ``bits_per_dim`` when ``levels`` is given), e.g.
            :class:`invkernels.models.Glow`; put it in eval mode first.
        x: the inputs, ``[N, *event_shape]``.
        levels: for discrete data with ``levels`` grey levels: the score is the dequantized
            negative log-likelihood in bits per dimension (:meth:`FlowModel.bits_per_dim`);
            None: ``-log_prob(x)`` in nats.
        batch_size: inputs scored at once.

    Returns:
        ``[N]`` float tensor of scores, on ``x``'s device.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"score: batch_size should be a positive integer, got {batch_size!r}")
    if not isinstance(x, torch.Tensor) or x.dim() < 1:
        raise ValueError(f"score: x should be a tensor [N, ...], got {type(x).__name__}")
    out = []
    for chunk in torch.split(x, batch_size):
        out.append(model.bits_per_dim(chunk, levels) if levels is not None else -model.log_prob(chunk))
    return torch.cat(out) if out else x.new_zeros(0)


def auroc(inlier_scores: torch.Tensor, outlier_scores: torch.Tensor) -> float:
    """Area under the ROC curve of telling outliers (positives) from inliers by score
    (``sklearn.metrics.roc_auc_score``): 1.0 separates them perfectly, 0.5 is chance."""
    from sklearn.metrics import roc_auc_score  # noqa: PLC0415

    inl = inlier_scores.detach().double().cpu()
    outl = outlier_scores.detach().double().cpu()
    if inl.numel() == 0 or outl.numel() == 0:
        raise ValueError(f"auroc: both score sets should be non-empty, got {inl.numel()} and {outl.numel()}")
    labels = torch.cat([torch.zeros(inl.numel()), torch.ones(outl.numel())])
    return float(roc_auc_score(labels.numpy(), torch.cat([inl, outl]).numpy()))
