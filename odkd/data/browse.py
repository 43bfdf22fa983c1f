"""`odkd browse`: instance crops as the network sees them, with keypoints, skeleton, mask and targets drawn."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from odkd.data.dataset import TopDownDataset
from odkd.data.instances import load_instances
from odkd.data.keypoints import COCO_SET, KeypointSet
from odkd.data.visualize import denormalize_image, draw_pose


def render_sample(sample: dict, kset: KeypointSet = COCO_SET) -> np.ndarray:
    """One PNG panel: the crop with pose and mask | the Gaussian targets over the crop."""
    crop = denormalize_image(sample["image"].numpy())
    h, w = crop.shape[:2]
    mask = cv2.resize(sample["mask"][0].numpy(), (w, h), interpolation=cv2.INTER_LINEAR) >= 0.5
    left = draw_pose(crop, sample["joints"].numpy(), mask=mask, kset=kset)
    heat = cv2.resize(sample["heatmaps"].numpy().max(axis=0), (w, h), interpolation=cv2.INTER_LINEAR)
    heat = cv2.applyColorMap((np.clip(heat, 0, 1) * 255).astype(np.uint8), cv2.COLORMAP_JET)
    right = cv2.addWeighted(crop, 0.5, heat, 0.5, 0)
    return np.concatenate([left, right], axis=1)


def browse_dataset(data_cfg, split: str, out_dir: str | Path, augment: bool = False, count: int = 16,
                   seed: int = 0) -> list[Path]:
    """Write `count` evenly spread instances of `split` as PNGs into out_dir; return their paths."""
    instances = load_instances(data_cfg, split)
    dataset = TopDownDataset(instances, data_cfg, train=augment, with_mask=True, seed=seed)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    picks = np.unique(np.linspace(0, len(dataset) - 1, num=min(count, len(dataset))).astype(int))
    written = []
    for index in tqdm(picks, desc="browse", unit="crop"):
        inst = instances[int(index)]
        path = out_dir / f"{split}_{index:06d}_img{inst.image_id}_ann{inst.ann_id}.png"
        cv2.imwrite(str(path), render_sample(dataset[int(index)], dataset.keypoints))
        written.append(path)
    return written
