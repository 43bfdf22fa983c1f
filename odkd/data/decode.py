"""Heatmaps -> keypoints in image coordinates, as the official HRNet code decodes them."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from odkd.data.keypoints import FLIP_INDEX
from odkd.data.transforms import CropFrame, affine_transform, invert_affine


def get_max_preds(heatmaps: np.ndarray):
    """Argmax per map: coords (N, K, 2) in heatmap pixels and maxvals (N, K, 1); non-positive peaks give (0, 0)."""
    n, k, h, w = heatmaps.shape
    flat = heatmaps.reshape(n, k, h * w)
    idx = flat.argmax(axis=2)
    maxvals = np.take_along_axis(flat, idx[..., None], axis=2).astype(np.float32)
    coords = np.stack([idx % w, idx // w], axis=-1).astype(np.float32)
    coords *= maxvals > 0.0
    return coords, maxvals


def refine_quarter_pixel(heatmaps: np.ndarray, coords: np.ndarray) -> np.ndarray:
    """Move each argmax a quarter pixel towards the higher neighbour (HRNet's POST_PROCESS)."""
    n, k, h, w = heatmaps.shape
    px = np.floor(coords[..., 0] + 0.5).astype(np.int64)
    py = np.floor(coords[..., 1] + 0.5).astype(np.int64)
    inside = (px > 1) & (px < w - 1) & (py > 1) & (py < h - 1)
    pxc, pyc = np.clip(px, 1, w - 2), np.clip(py, 1, h - 2)
    ni, ki = np.meshgrid(np.arange(n), np.arange(k), indexing="ij")
    dx = heatmaps[ni, ki, pyc, pxc + 1] - heatmaps[ni, ki, pyc, pxc - 1]
    dy = heatmaps[ni, ki, pyc + 1, pxc] - heatmaps[ni, ki, pyc - 1, pxc]
    shift = np.stack([np.sign(dx), np.sign(dy)], axis=-1) * 0.25 * inside[..., None]
    return coords + shift.astype(np.float32)


def decode_heatmaps(heatmaps: np.ndarray, frames: Sequence[CropFrame], refine: bool = True):
    """HRNet's get_final_preds: keypoints (N, K, 2) in image coordinates and maxvals (N, K, 1).

    Each sample's heatmap frame is inverted at heatmap size. For the canonical frames used at
    evaluation this is exactly the official transform_preds; rotated or mirrored frames are
    inverted too (mirrored ones swap the channels back), so any augmented output decodes.
    """
    heatmaps = np.asarray(heatmaps, np.float32)
    coords, maxvals = get_max_preds(heatmaps)
    if refine:
        coords = refine_quarter_pixel(heatmaps, coords)
    hm_size = (heatmaps.shape[3], heatmaps.shape[2])
    preds = np.empty_like(coords)
    for i, frame in enumerate(frames):
        preds[i] = affine_transform(coords[i], invert_affine(frame.matrix(hm_size)))
        if frame.flip:
            preds[i], maxvals[i] = preds[i][FLIP_INDEX], maxvals[i][FLIP_INDEX]
    return preds, maxvals
