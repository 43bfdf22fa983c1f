"""Running a pose model on a batch of crops: forward, the official flip test and flip-back.

Training, the teacher cache, evaluation and prediction all run models through here, so a
teacher's cached maps and its evaluated keypoints come from the same arithmetic.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from odkd.data.keypoints import FLIP_INDEX


def flip_back(maps: torch.Tensor, keypoint_channels: bool = True, shift: bool = True,
              flip_index: np.ndarray = FLIP_INDEX) -> torch.Tensor:
    """Output for a mirrored input (N, C, h, w) -> the unmirrored frame: flip the width, swap the pairs.

    With `shift`, move one pixel right, as the official SHIFT_HEATMAP does to undo the
    off-by-one of mirroring about a pixel edge.
    """
    out = maps.flip(3)
    if keypoint_channels:
        out = out[:, torch.tensor(flip_index.tolist(), device=maps.device)]
    if shift:
        out = torch.cat([out[..., :1], out[..., :-1]], dim=3)
    return out


def autocast_context(device: torch.device, dtype: torch.dtype | None):
    """torch.autocast to `dtype` on `device`, or nothing when dtype is None (full precision)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


@torch.inference_mode()
def predict_batch(model: torch.nn.Module, images: torch.Tensor, *, flip_test: bool = True,
                  shift_heatmap: bool = True, autocast_dtype: torch.dtype | None = None,
                  flip_index: np.ndarray = FLIP_INDEX):
    """Heatmaps (N, K, h, w) float32 and, for a model with a seg head, mask probabilities (N, 1, h, w).

    With flip_test the mirrored batch runs too and its flipped-back output is averaged in,
    shifted one pixel as the official SHIFT_HEATMAP does. `images` is already on the model's
    device; `autocast_dtype` (e.g. torch.bfloat16) runs the forward passes under autocast, and
    the averaging happens in float32 either way.
    """
    with autocast_context(images.device, autocast_dtype):
        out = model(images)
        flipped = model(images.flip(3)) if flip_test else None
    heatmaps, mask_logits = out[0].float(), out[1]
    mask = None if mask_logits is None else torch.sigmoid(mask_logits.float())
    if flipped is not None:
        heatmaps = (heatmaps + flip_back(flipped[0].float(), shift=shift_heatmap, flip_index=flip_index)) * 0.5
        if mask is not None:
            mask = (mask + flip_back(torch.sigmoid(flipped[1].float()), keypoint_channels=False,
                                     shift=shift_heatmap)) * 0.5
    return heatmaps, mask


@contextlib.contextmanager
def cuda_tf32(allowed: bool):
    """CUDA's TF32 switches for matmuls and cuDNN convolutions, restored afterwards (they are process-wide).

    cuDNN allows TF32 by default, so fp32 must switch it off to be IEEE float32; CPUs have no TF32.
    """
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = allowed
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before
