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


def dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0,
              weight: torch.Tensor | None = None) -> torch.Tensor:
    """1 - soft dice per sample, averaged over the samples (each weighted by `weight` (N,) when given)."""
    prob = torch.sigmoid(logits.float()).flatten(1)
    t = target.flatten(1)
    dice = 1.0 - (2.0 * (prob * t).sum(1) + eps) / (prob.sum(1) + t.sum(1) + eps)
    return (dice if weight is None else dice * weight).mean()


def mask_loss(logits: torch.Tensor, target: torch.Tensor, kind: str = "bce",
              weight: torch.Tensor | None = None) -> torch.Tensor:
    """Segmentation-head loss against the (soft) person mask at heatmap resolution: 'bce' or 'bce+dice';
    with `weight` (N,) of 0/1, over the samples weighted 1 only, and 0 when none is. No boolean indexing,
    so no host sync; when every sample counts, the same bits forward and backward as the unweighted loss
    (every weight and the rescale are exactly 1)."""
    w = None if weight is None else weight.float()
    loss = F.binary_cross_entropy_with_logits(logits.float(), target, weight=None if w is None else w.view(-1, 1, 1, 1))
    if kind == "bce+dice":
        loss = loss + dice_loss(logits, target, weight=w)
    return loss if w is None else loss * (w.numel() / w.sum().clamp(min=1.0))
