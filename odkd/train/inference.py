"""Running a pose model on a batch of crops, with the official flip test."""

from __future__ import annotations

import torch

from odkd.data.decode import flip_back


@torch.inference_mode()
def predict_batch(model: torch.nn.Module, images: torch.Tensor, *, flip_test: bool = True,
                  shift_heatmap: bool = True):
    """Heatmaps (N, K, h, w) float32 and, for a model with a seg head, mask probabilities (N, 1, h, w).

    With flip_test the mirrored batch runs too and its flipped-back output is averaged in,
    shifted one pixel as the official SHIFT_HEATMAP does. `images` is already on the model's device.
    """
    out = model(images)
    heatmaps, mask_logits = out[0].float(), out[1]
    mask = None if mask_logits is None else torch.sigmoid(mask_logits.float())
    if flip_test:
        flipped = model(images.flip(3))
        heatmaps = (heatmaps + flip_back(flipped[0].float(), shift=shift_heatmap)) * 0.5
        if mask is not None:
            mask = (mask + flip_back(torch.sigmoid(flipped[1].float()), keypoint_channels=False,
                                     shift=shift_heatmap)) * 0.5
    return heatmaps, mask
