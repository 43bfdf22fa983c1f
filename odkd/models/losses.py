"""Supervised pose losses: the official masked heatmap MSE, and BCE (+ dice) for the person mask."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def joints_mse_loss(pred: torch.Tensor, target: torch.Tensor, target_weight: torch.Tensor) -> torch.Tensor:
    """HRNet's JointsMSELoss with target weights: 0.5 * mean squared error of weighted heatmaps.

    pred/target (N, K, h, w), target_weight (N, K, 1). Equal to the official per-joint loop.
    """
    w = target_weight.unsqueeze(-1)
    return 0.5 * F.mse_loss(pred.float() * w, target * w)


def _sample_mean(values: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """The mean of per-sample values (N, ...) over the samples whose weight is 1 (all when None), with no
    host sync: no boolean indexing, and 0 when no sample counts."""
    if weight is None:
        return values.mean()
    w = weight.float().view(-1, *([1] * (values.dim() - 1)))
    return (values * w).sum() / (weight.float().sum() * values[0].numel()).clamp(min=1.0)


def dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0,
              weight: torch.Tensor | None = None) -> torch.Tensor:
    prob = torch.sigmoid(logits.float()).flatten(1)
    t = target.flatten(1)
    return _sample_mean(1.0 - (2.0 * (prob * t).sum(1) + eps) / (prob.sum(1) + t.sum(1) + eps), weight)


def mask_loss(logits: torch.Tensor, target: torch.Tensor, kind: str = "bce",
              weight: torch.Tensor | None = None) -> torch.Tensor:
    """Segmentation-head loss against the (soft) person mask at heatmap resolution: 'bce' or 'bce+dice';
    with `weight` (N,) of 0/1, over the samples weighted 1 only."""
    loss = _sample_mean(F.binary_cross_entropy_with_logits(logits.float(), target, reduction="none"), weight)
    if kind == "bce+dice":
        loss = loss + dice_loss(logits, target, weight=weight)
    return loss
