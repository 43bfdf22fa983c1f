"""Random top-down augmentation as one CropFrame: half-body, scale, rotation, mirror (official HRNet)."""

from __future__ import annotations

import numpy as np

from odkd.data.instances import Instance
from odkd.data.keypoints import COCO_SET, KeypointSet
from odkd.data.transforms import PIXEL_STD, CropFrame

HALF_BODY_PADDING = 1.5


def canonical_frame(inst: Instance, margin: float = 1.0) -> CropFrame:
    """The unaugmented crop of an instance; `margin` > 1 widens it around the same center."""
    return CropFrame(center=tuple(map(float, inst.center)), scale=tuple(float(s) * margin for s in inst.scale),
                     image_width=inst.image_width)


def half_body_box(joints: np.ndarray, rng: np.random.Generator, aspect_ratio: float,
                  keypoints: KeypointSet = COCO_SET):
    """Center and scale around the upper or lower body's labelled joints of the set, or None if too few."""
    labelled = joints[:, 2] > 0
    upper = [j for j in keypoints.upper_body if labelled[j]]
    lower = [j for j in keypoints.lower_body if labelled[j]]
    # the official draw is randn() < 0.5, which picks the upper body ~69% of the time
    if rng.standard_normal() < 0.5 and len(upper) > 2:
        chosen = upper
    else:
        chosen = lower if len(lower) > 2 else upper
    if len(chosen) < 2:
        return None
    pts = joints[chosen, :2]
    center = pts.mean(axis=0)
    w, h = pts.max(axis=0) - pts.min(axis=0)
    if w > aspect_ratio * h:
        h = w / aspect_ratio
    elif w < aspect_ratio * h:
        w = h * aspect_ratio
    scale = np.array([w / PIXEL_STD, h / PIXEL_STD], np.float32) * HALF_BODY_PADDING
    return center.astype(np.float32), scale


def random_frame(inst: Instance, aug, rng: np.random.Generator, aspect_ratio: float,
                 keypoints: KeypointSet = COCO_SET) -> CropFrame:
    """One training crop of `inst` under the `[data.augment]` settings. A set without body halves has no
    half-body crops, and one without flip pairs is never mirrored (the draws are made all the same)."""
    center, scale = inst.center, inst.scale
    n_labelled = int((inst.joints[:, 2] > 0).sum())
    halves = bool(keypoints.upper_body and keypoints.lower_body)
    if n_labelled > aug.half_body_min_joints and rng.random() < aug.half_body_prob and halves:
        box = half_body_box(inst.joints, rng, aspect_ratio, keypoints)
        if box is not None:
            center, scale = box
    sf, rf = aug.scale_factor, aug.rotation_factor
    scale = scale * float(np.clip(rng.standard_normal() * sf + 1.0, 1.0 - sf, 1.0 + sf))
    rotation = float(np.clip(rng.standard_normal() * rf, -2.0 * rf, 2.0 * rf)) if rng.random() <= aug.rotation_prob else 0.0
    flip = bool(rng.random() < aug.flip_prob) and keypoints.mirrored
    return CropFrame(center=tuple(map(float, center)), scale=tuple(map(float, scale)), rotation=rotation,
                     flip=flip, image_width=inst.image_width)
