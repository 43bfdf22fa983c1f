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


def dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    prob = torch.sigmoid(logits.float()).flatten(1)
    t = target.flatten(1)
    return (1.0 - (2.0 * (prob * t).sum(1) + eps) / (prob.sum(1) + t.sum(1) + eps)).mean()


def mask_loss(logits: torch.Tensor, target: torch.Tensor, kind: str = "bce") -> torch.Tensor:
    """Segmentation-head loss against the (soft) person mask at heatmap resolution: 'bce' or 'bce+dice'."""
    loss = F.binary_cross_entropy_with_logits(logits.float(), target)
    if kind == "bce+dice":
        loss = loss + dice_loss(logits, target)
    return loss
