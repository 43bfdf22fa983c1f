"""Heatmaps -> keypoints in image coordinates: HRNet's argmax, a plateau centroid, or DARK.

Every decoder works in heatmap pixels; the inverse affine of the crop comes last, as in HRNet's
get_final_preds. The confidence (maxval) is always the map's peak, whichever decoder places it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import cv2
import numpy as np
from odkd.data.keypoints import FLIP_INDEX
from odkd.data.transforms import CropFrame, affine_transform, cv_on_maps, invert_affine

DECODERS = ("argmax", "centroid", "dark")

# Half the peak: the level at which the cached teacher maps were binarized, so the centroid
# weighs what the student learned as "inside the keypoint" and ignores its soft rim.
CENTROID_FRACTION = 0.5


def get_max_preds(heatmaps: np.ndarray):
    """Argmax per map: coords (N, K, 2) in heatmap pixels and maxvals (N, K, 1); non-positive peaks give (0, 0)."""
    n, k, h, w = heatmaps.shape
    flat = heatmaps.reshape(n, k, h * w)
    idx = flat.argmax(axis=2)
    maxvals = np.take_along_axis(flat, idx[..., None], axis=2).astype(np.float32)
    coords = np.stack([idx % w, idx // w], axis=-1).astype(np.float32)
    coords *= maxvals > 0.0
    return coords, maxvals


def _sample_index(n: int, k: int):
    return np.meshgrid(np.arange(n), np.arange(k), indexing="ij")


def refine_quarter_pixel(heatmaps: np.ndarray, coords: np.ndarray) -> np.ndarray:
    """Move each argmax a quarter pixel towards the higher neighbour (HRNet's POST_PROCESS)."""
    n, k, h, w = heatmaps.shape
    px = np.floor(coords[..., 0] + 0.5).astype(np.int64)
    py = np.floor(coords[..., 1] + 0.5).astype(np.int64)
    inside = (px > 1) & (px < w - 1) & (py > 1) & (py < h - 1)
    pxc, pyc = np.clip(px, 1, w - 2), np.clip(py, 1, h - 2)
    ni, ki = _sample_index(n, k)
    dx = heatmaps[ni, ki, pyc, pxc + 1] - heatmaps[ni, ki, pyc, pxc - 1]
    dy = heatmaps[ni, ki, pyc + 1, pxc] - heatmaps[ni, ki, pyc - 1, pxc]
    shift = np.stack([np.sign(dx), np.sign(dy)], axis=-1) * 0.25 * inside[..., None]
    return coords + shift.astype(np.float32)


def plateau_centroid(heatmaps: np.ndarray, coords: np.ndarray, maxvals: np.ndarray, sigma: float) -> np.ndarray:
    """The weighted centroid of the plateau around each argmax, weights max(0, v - 0.5 * peak).

    Only a (2r+1)^2 window around the argmax counts, r = ceil(2.5 * sigma), so another person's
    blob further away never pulls the estimate; a flood fill of the connected region would do the
    same but cannot be vectorized over (N, K). The window is that wide because on a flat top the
    argmax is the plateau's first pixel in raster order, on its rim: the half-peak disc of a sigma
    Gaussian target is 2.35 sigma across, and the window must reach over all of it from there.
    """
    n, k, h, w = heatmaps.shape
    r = math.ceil(2.5 * sigma)
    offsets = np.arange(-r, r + 1)
    xs = coords[..., 0].astype(np.int64)[..., None, None] + offsets[None, :]
    ys = coords[..., 1].astype(np.int64)[..., None, None] + offsets[:, None]
    ni, ki = _sample_index(n, k)
    values = heatmaps[ni[..., None, None], ki[..., None, None], np.clip(ys, 0, h - 1), np.clip(xs, 0, w - 1)]
    inside = (xs >= 0) & (xs < w) & (ys >= 0) & (ys < h)
    weights = np.maximum(values - CENTROID_FRACTION * maxvals[..., None], 0.0) * inside
    total = weights.sum(axis=(2, 3))
    # a non-positive peak leaves every weight at zero: keep get_max_preds' (0, 0) there
    found = total > 0
    total = np.where(found, total, 1.0)
    centroid = np.stack([(weights * xs).sum(axis=(2, 3)), (weights * ys).sum(axis=(2, 3))], axis=-1) / total[..., None]
    return np.where(found[..., None], centroid, coords).astype(np.float32)


def gaussian_modulate(heatmaps: np.ndarray, sigma: float) -> np.ndarray:
    """DARK's distribution modulation: blur each map with the target's Gaussian, rescale to its old peak.

    The kernel is 2 * ceil(2.5 * sigma) + 1 wide (11 for sigma 2, DarkPose's and mmpose's size),
    and outside the map is zero, as in their padded blur.
    """
    size = 2 * math.ceil(2.5 * sigma) + 1
    blurred = np.stack([
        cv_on_maps(lambda stack: cv2.GaussianBlur(stack, (size, size), sigma, borderType=cv2.BORDER_CONSTANT), m)
        for m in heatmaps
    ])
    old_peak = heatmaps.max(axis=(2, 3), keepdims=True)
    new_peak = blurred.max(axis=(2, 3), keepdims=True)
    # the peak fixes how deep DARK's log floor (1e-10) lies under it, as in the reference code
    return np.where(new_peak > 0, blurred * (old_peak / np.where(new_peak > 0, new_peak, 1.0)), blurred)


def refine_dark(heatmaps: np.ndarray, coords: np.ndarray, sigma: float) -> np.ndarray:
    """DARK (Zhang et al. 2020): one Newton step on the log of the modulated map from each argmax.

    The derivatives are DarkPose's central differences (mmpose's refine_keypoints_dark), which
    need two pixels on every side: argmaxes closer to the border stay where they are. So do those
    where the Hessian is not negative definite, since there the step would not go towards a maximum.
    """
    n, k, h, w = heatmaps.shape
    logmap = np.log(np.maximum(gaussian_modulate(heatmaps, sigma), 1e-10))
    px = coords[..., 0].astype(np.int64)
    py = coords[..., 1].astype(np.int64)
    inside = (px > 1) & (px < w - 2) & (py > 1) & (py < h - 2)
    px, py = np.clip(px, 2, w - 3), np.clip(py, 2, h - 3)
    ni, ki = _sample_index(n, k)

    def at(dx: int, dy: int) -> np.ndarray:
        return logmap[ni, ki, py + dy, px + dx].astype(np.float64)

    gx = 0.5 * (at(1, 0) - at(-1, 0))
    gy = 0.5 * (at(0, 1) - at(0, -1))
    hxx = 0.25 * (at(2, 0) - 2 * at(0, 0) + at(-2, 0))
    hyy = 0.25 * (at(0, 2) - 2 * at(0, 0) + at(0, -2))
    hxy = 0.25 * (at(1, 1) - at(1, -1) - at(-1, 1) + at(-1, -1))
    det = hxx * hyy - hxy ** 2
    newton = inside & (det > 0) & (hxx < 0)
    det = np.where(newton, det, 1.0)
    step = np.stack([(hxy * gy - hyy * gx) / det, (hxy * gx - hxx * gy) / det], axis=-1)
    return (coords + step * newton[..., None]).astype(np.float32)


def heatmap_coords(heatmaps: np.ndarray, method: str = "argmax", sigma: float = 2.0):
    """Keypoints (N, K, 2) in heatmap pixels by `method` (one of DECODERS) and maxvals (N, K, 1).

    sigma is the training targets' Gaussian sigma, in heatmap pixels.
    """
    coords, maxvals = get_max_preds(heatmaps)
    if method == "argmax":
        return refine_quarter_pixel(heatmaps, coords), maxvals
    if method == "centroid":
        return plateau_centroid(heatmaps, coords, maxvals, sigma), maxvals
    if method == "dark":
        return refine_dark(heatmaps, coords, sigma), maxvals
    raise ValueError(f"decode method must be one of {', '.join(DECODERS)}, got {method!r}")


def decode_heatmaps(heatmaps: np.ndarray, frames: Sequence[CropFrame], method: str = "argmax", sigma: float = 2.0,
                    flip_index: np.ndarray = FLIP_INDEX):
    """HRNet's get_final_preds: keypoints (N, K, 2) in image coordinates and maxvals (N, K, 1).

    Each sample's heatmap frame is inverted at heatmap size. For the canonical frames used at
    evaluation this is exactly the official transform_preds; rotated or mirrored frames are
    inverted too (mirrored ones swap the channels back), so any augmented output decodes.
    """
    heatmaps = np.asarray(heatmaps, np.float32)
    coords, maxvals = heatmap_coords(heatmaps, method, sigma)
    hm_size = (heatmaps.shape[3], heatmaps.shape[2])
    preds = np.empty_like(coords)
    for i, frame in enumerate(frames):
        preds[i] = affine_transform(coords[i], invert_affine(frame.matrix(hm_size)))
        if frame.flip:
            preds[i], maxvals[i] = preds[i][flip_index], maxvals[i][flip_index]
    return preds, maxvals
