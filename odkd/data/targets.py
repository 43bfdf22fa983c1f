"""Training targets at heatmap resolution: unit-peak Gaussians and the person mask."""

from __future__ import annotations

import cv2
import numpy as np

from odkd.data.transforms import CropFrame


def gaussian_heatmaps(joints_xy: np.ndarray, visible: np.ndarray, input_size, heatmap_size, sigma: float):
    """The official HRNet Gaussian target.

    joints_xy (K, 2) are in input-crop pixels, visible (K,) is 0/1. A joint whose 3-sigma patch
    misses the heatmap entirely gets weight 0. Returns heatmaps (K, h, w) float32 with peak 1 and
    target_weight (K, 1) float32.
    """
    num_joints = joints_xy.shape[0]
    hm_w, hm_h = int(heatmap_size[0]), int(heatmap_size[1])
    stride = np.array([input_size[0] / hm_w, input_size[1] / hm_h], np.float32)
    target = np.zeros((num_joints, hm_h, hm_w), np.float32)
    weight = (np.asarray(visible, np.float32) > 0).astype(np.float32).reshape(num_joints, 1)
    radius = sigma * 3
    size = int(2 * radius + 1)
    xs = np.arange(size, dtype=np.float32)
    g = np.exp(-((xs[None, :] - size // 2) ** 2 + (xs[:, None] - size // 2) ** 2) / (2 * sigma ** 2))
    for k in range(num_joints):
        if weight[k, 0] == 0:
            continue
        mu_x = int(joints_xy[k, 0] / stride[0] + 0.5)
        mu_y = int(joints_xy[k, 1] / stride[1] + 0.5)
        ul = (int(mu_x - radius), int(mu_y - radius))
        br = (int(mu_x + radius + 1), int(mu_y + radius + 1))
        if ul[0] >= hm_w or ul[1] >= hm_h or br[0] < 0 or br[1] < 0:
            weight[k, 0] = 0
            continue
        gx = max(0, -ul[0]), min(br[0], hm_w) - ul[0]
        gy = max(0, -ul[1]), min(br[1], hm_h) - ul[1]
        hx = max(0, ul[0]), min(br[0], hm_w)
        hy = max(0, ul[1]), min(br[1], hm_h)
        target[k, hy[0]:hy[1], hx[0]:hx[1]] = g[gy[0]:gy[1], gx[0]:gx[1]]
    return target, weight


def mask_target(mask: np.ndarray, frame: CropFrame, heatmap_size) -> np.ndarray:
    """The person mask (H, W) of the original image, in the crop frame at heatmap size, (1, h, w) in [0, 1]."""
    size = (int(heatmap_size[0]), int(heatmap_size[1]))
    m = frame.matrix(size)
    zoom = np.sqrt(abs(np.linalg.det(m[:, :2])))
    src = mask.astype(np.float32)
    if zoom < 0.5:
        # a heatmap cell covers many image pixels: blur to that footprint first so the cell
        # gets its covered fraction (a soft BCE target) instead of one aliased sample
        k = int(round(1.0 / zoom)) | 1
        src = cv2.blur(src, (k, k))
    out = cv2.warpAffine(src, m, size, flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    return np.clip(out, 0.0, 1.0)[None]
