"""Drawing poses and masks over images, for `odkd browse` and `odkd predict`."""

from __future__ import annotations

import cv2
import numpy as np

from odkd.data.keypoints import COCO_SET, KeypointSet
from odkd.data.transforms import IMAGENET_MEAN_RGB, IMAGENET_STD_RGB

_LEFT, _RIGHT, _CENTER = (0, 200, 255), (255, 128, 0), (0, 255, 0)  # BGR


def side_colors(kset: KeypointSet) -> list[tuple[int, int, int]]:
    """Each point's colour: the first of each flip pair (the sets list the left one first) left, the other
    right, a point that is its own mirror centre."""
    colors = [_CENTER] * kset.num_keypoints
    for left, right in kset.flip_pairs:
        colors[left], colors[right] = _LEFT, _RIGHT
    return colors


def tint_mask(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """A copy of BGR `image` with the pixels of `mask` tinted purple."""
    out = image.copy()
    m = mask.astype(bool)
    out[m] = (0.55 * out[m] + 0.45 * np.array([180, 60, 200])).astype(np.uint8)
    return out


def draw_pose(image: np.ndarray, keypoints: np.ndarray, mask: np.ndarray | None = None, min_score: float = 0.0,
              radius: int = 3, kset: KeypointSet = COCO_SET) -> np.ndarray:
    """A copy of BGR `image` with one person's (K, 3) keypoints and skeleton, and an optional mask tint.

    The third keypoint column is a visibility flag or a confidence; points at or below `min_score`
    are not drawn. Left limbs are orange, right limbs blue, so a swapped side shows at a glance.
    """
    out = image.copy() if mask is None else tint_mask(image, mask)
    pts = np.asarray(keypoints, np.float64)
    ok = pts[:, 2] > min_score
    colors = side_colors(kset)
    for i, j in kset.skeleton:
        if ok[i] and ok[j]:
            color = colors[i] if colors[i] == colors[j] else _CENTER
            cv2.line(out, tuple(np.round(pts[i, :2]).astype(int)), tuple(np.round(pts[j, :2]).astype(int)),
                     color, max(1, radius // 2), cv2.LINE_AA)
    for k in np.flatnonzero(ok):
        cv2.circle(out, tuple(np.round(pts[k, :2]).astype(int)), radius, colors[k], -1, cv2.LINE_AA)
    return out


def denormalize_image(chw: np.ndarray) -> np.ndarray:
    """Undo normalize_image: RGB float (3, H, W) -> BGR uint8 (H, W, 3)."""
    rgb = chw.transpose(1, 2, 0) * IMAGENET_STD_RGB + IMAGENET_MEAN_RGB
    return np.clip(rgb[..., ::-1] * 255.0 + 0.5, 0, 255).astype(np.uint8)
