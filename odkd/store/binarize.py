"""What a binarized teacher map is: the rule the cache applies, and the trainer applies again.

Kept apart from the teacher code so the student side can gate stored maps by the stored mask
without importing anything that builds a teacher.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def binarize(heatmaps: torch.Tensor, threshold: float, mode: str) -> torch.Tensor:
    """`map >= threshold`, absolute or relative to each map's peak (a map without a positive peak is empty)."""
    if mode == "absolute":
        return heatmaps >= threshold
    peak = heatmaps.amax(dim=(-2, -1), keepdim=True)
    return (heatmaps >= threshold * peak) & (peak > 0)


def gate_by_mask(binary: torch.Tensor, mask: torch.Tensor, dilation: int) -> torch.Tensor:
    """Keep keypoint responses inside the person mask grown by `dilation` pixels."""
    if dilation > 0:
        mask = F.max_pool2d(mask.float(), 2 * dilation + 1, stride=1, padding=dilation) > 0
    return binary & mask
