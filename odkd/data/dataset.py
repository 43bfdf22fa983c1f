"""The top-down training/eval dataset and its DataLoader."""

from __future__ import annotations

import random

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from odkd.data.augment import canonical_frame, random_frame
from odkd.data.image import read_image
from odkd.data.instances import PersonInstances
from odkd.data.keypoints import FLIP_INDEX
from odkd.data.targets import gaussian_heatmaps, mask_target
from odkd.data.transforms import CropFrame, affine_transform, crop_image, normalize_image


def frame_fields(frame: CropFrame) -> dict:
    """A CropFrame as collatable numbers, so a batch can rebuild each sample's exact frame."""
    return {
        "center": np.asarray(frame.center, np.float64),
        "scale": np.asarray(frame.scale, np.float64),
        "rotation": np.float64(frame.rotation),
        "flip": bool(frame.flip),
        "image_width": int(frame.image_width),
    }


def frame_from_batch(batch: dict, i: int) -> CropFrame:
    return CropFrame(center=tuple(float(v) for v in batch["center"][i]),
                     scale=tuple(float(v) for v in batch["scale"][i]),
                     rotation=float(batch["rotation"][i]), flip=bool(batch["flip"][i]),
                     image_width=int(batch["image_width"][i]))


class TopDownDataset(Dataset):
    """One sample per person instance: the normalized crop, Gaussian targets and (optionally) the mask.

    Augmentation draws from a generator seeded by (seed, epoch, index), so a sample is the same
    whichever worker makes it and a resumed run sees exactly the samples it would have seen.
    """

    def __init__(self, instances: PersonInstances, data_cfg, train: bool, with_mask: bool = False, seed: int = 0):
        self.instances = instances
        self.cfg = data_cfg
        self.train = train
        self.with_mask = with_mask
        self.seed = seed
        self.epoch = 0
        self.aspect_ratio = data_cfg.input_size[0] / data_cfg.input_size[1]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.instances)

    def frame(self, index: int) -> CropFrame:
        inst = self.instances[index]
        if not self.train:
            return canonical_frame(inst)
        rng = np.random.default_rng((self.seed, self.epoch, index))
        return random_frame(inst, self.cfg.augment, rng, self.aspect_ratio)

    def __getitem__(self, index: int) -> dict:
        inst = self.instances[index]
        frame = self.frame(index)
        image = read_image(self.instances.image_path(inst))
        crop = crop_image(image, frame, self.cfg.input_size)

        joints = inst.joints
        visible = joints[:, 2] > 0
        xy = affine_transform(joints[:, :2], frame.matrix(self.cfg.input_size)).astype(np.float32)
        if frame.flip:
            xy, visible = xy[FLIP_INDEX], visible[FLIP_INDEX]
        heatmaps, weight = gaussian_heatmaps(xy, visible, self.cfg.input_size, self.cfg.heatmap_size, self.cfg.sigma)

        sample = {
            "image": torch.from_numpy(normalize_image(crop)),
            "heatmaps": torch.from_numpy(heatmaps),
            "target_weight": torch.from_numpy(weight),
            "joints": torch.from_numpy(np.concatenate([xy, visible[:, None].astype(np.float32)], 1)),
            "index": index,
            **frame_fields(frame),
        }
        if self.with_mask:
            sample["mask"] = torch.from_numpy(mask_target(self.instances.mask(inst), frame, self.cfg.heatmap_size))
        return sample


def _seed_worker(worker_id: int) -> None:
    # the augmentation has its own per-sample generators; this keeps any stray numpy/random
    # use in third-party transforms distinct per worker and reproducible
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def make_loader(dataset: TopDownDataset, batch_size: int, workers: int, shuffle: bool, seed: int = 0,
                drop_last: bool = False) -> DataLoader:
    generator = torch.Generator()
    generator.manual_seed(seed)
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle, num_workers=workers, drop_last=drop_last,
        pin_memory=torch.cuda.is_available(), worker_init_fn=_seed_worker, generator=generator,
        persistent_workers=False,
    )
