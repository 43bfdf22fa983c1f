"""The top-down training/eval dataset and its DataLoader."""

from __future__ import annotations

import random
from typing import Protocol

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from odkd.data.augment import canonical_frame, random_frame
from odkd.data.image import read_image
from odkd.data.instances import PersonInstances
from odkd.data.keypoints import keypoint_set
from odkd.data.targets import gaussian_heatmaps, mask_target
from odkd.data.transforms import CropFrame, affine_transform, crop_image, grid_sample_theta, map_zoom, normalize_image


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


class StoredRows(Protocol):
    """A teacher store's rows, one instance at a time (odkd.store.local.LocalRows): `row(i)` holds at least
    meta/center and meta/scale, the crop its maps were stored in, at `map_size` (w, h)."""

    map_size: tuple[int, int]

    def row(self, index: int) -> dict[str, np.ndarray]: ...


class TopDownDataset(Dataset):
    """One sample per person instance: the normalized crop, Gaussian targets and (optionally) the mask.

    A sample is addressed by (epoch, index), as EpochSampler yields it, or by a plain index for
    epoch 0. Augmentation draws from a generator seeded by (seed, epoch, index), so a sample is the
    same whichever worker makes it, workers can live across epochs, and a resumed run sees exactly
    the samples it would have seen. With `stored_rows`, each sample also carries its instance's stored
    rows under their store names ("pt/heatmaps", "meta/ok", ...), so they travel with the image through
    the loader's workers, collation and pinned memory, and `teacher_theta`: the grid_sample matrix that
    moves the stored teacher maps into this sample's crop, and `teacher_zoom`, stored-map pixels per
    heatmap pixel.
    """

    def __init__(self, instances: PersonInstances, data_cfg, train: bool, with_mask: bool = False, seed: int = 0,
                 stored_rows: StoredRows | None = None, stream: int = 0):
        self.instances = instances
        self.cfg = data_cfg
        self.keypoints = keypoint_set(data_cfg.keypoints)
        # (K, 1), as target_weight; None leaves the weights 0/1, bit for bit as before the option existed
        self.point_weights = (np.asarray(self.keypoints.joint_weights, np.float32).reshape(-1, 1)
                              if data_cfg.joint_weights and self.keypoints.joint_weights else None)
        self.train = train
        self.with_mask = with_mask
        self.seed = seed
        # another stream draws other augmentations for the same (seed, epoch, index): a second set's
        # instance i is not augmented like the first set's; stream 0 keeps the generators runs were made with
        self.rng_key = (seed,) if stream == 0 else (seed, stream)
        self.stored_rows = stored_rows
        self.aspect_ratio = data_cfg.input_size[0] / data_cfg.input_size[1]

    def __len__(self) -> int:
        return len(self.instances)

    def frame(self, index: int, epoch: int = 0) -> CropFrame:
        inst = self.instances[index]
        if not self.train:
            return canonical_frame(inst)
        rng = np.random.default_rng((*self.rng_key[:1], epoch, index, *self.rng_key[1:]))
        return random_frame(inst, self.cfg.augment, rng, self.aspect_ratio, self.keypoints)

    def __getitem__(self, key) -> dict:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        inst = self.instances[index]
        frame = self.frame(index, epoch)
        image = read_image(self.instances.image_path(inst))
        crop = crop_image(image, frame, self.cfg.input_size)

        joints = inst.joints
        visible = joints[:, 2] > 0
        xy = affine_transform(joints[:, :2], frame.matrix(self.cfg.input_size)).astype(np.float32)
        if frame.flip:
            xy, visible = xy[self.keypoints.flip_index], visible[self.keypoints.flip_index]
        heatmaps, weight = gaussian_heatmaps(xy, visible, self.cfg.input_size, self.cfg.heatmap_size, self.cfg.sigma)
        if self.point_weights is not None:  # channel k after a flip is point k of the set, as its weight is
            weight = weight * self.point_weights

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
        if self.stored_rows is not None:
            rows = self.stored_rows.row(index)
            stored = CropFrame(center=tuple(map(float, rows["meta/center"])), scale=tuple(map(float, rows["meta/scale"])))
            map_size = self.stored_rows.map_size
            sample.update({name: torch.from_numpy(value) for name, value in rows.items()})
            sample["teacher_theta"] = torch.from_numpy(grid_sample_theta(stored, map_size, frame, self.cfg.heatmap_size))
            sample["teacher_zoom"] = np.float32(map_zoom(stored, map_size, frame, self.cfg.heatmap_size))
        return sample


class EpochSampler(Sampler):
    """Yields (epoch, index) for one epoch at a time: the epoch travels with the index, so persistent
    workers augment for the right epoch without being told.

    The order is a function of (seed, epoch) alone. With world_size > 1 each rank takes every
    world_size-th index of the same order (padded by wrapping, as DistributedSampler does), so the
    ranks together see every sample of the epoch once.
    """

    def __init__(self, size: int, *, shuffle: bool, seed: int = 0, rank: int = 0, world_size: int = 1):
        self.size, self.shuffle, self.seed = size, shuffle, seed
        self.rank, self.world_size = rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def order(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.size))
        generator = torch.Generator()
        generator.manual_seed(self.seed * 100_003 + self.epoch)
        # one draw before the permutation, as torch's DataLoader takes its workers' base seed from the
        # same generator first: orders stay those of runs made before this sampler existed
        torch.empty((), dtype=torch.int64).random_(generator=generator)
        return torch.randperm(self.size, generator=generator).tolist()

    def __len__(self) -> int:
        return -(-self.size // self.world_size)

    def __iter__(self):
        order = self.order()
        padded = order + order[: len(self) * self.world_size - len(order)]
        return iter([(self.epoch, i) for i in padded[self.rank::self.world_size]])


class LabeledAndUnlabeled(Dataset):
    """A labelled training set followed by an unlabelled one (instances with no labelled joint, so no GT
    loss): index i < len(labeled) is labelled instance i, the rest unlabelled instance i - len(labeled).
    Every sample says which it is under "labeled"."""

    def __init__(self, labeled: TopDownDataset, unlabeled: TopDownDataset):
        self.labeled, self.unlabeled = labeled, unlabeled

    def __len__(self) -> int:
        return len(self.labeled) + len(self.unlabeled)

    def __getitem__(self, key) -> dict:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        first = len(self.labeled)
        sample = self.labeled[epoch, index] if index < first else self.unlabeled[epoch, index - first]
        return {**sample, "labeled": index < first}


def mixed_batch_size(labeled_batch: int, ratio: float) -> int:
    """A MixedEpochSampler's loader batch: `labeled_batch` labelled samples and round(labeled_batch * ratio)
    unlabelled ones, on average."""
    return labeled_batch + round(labeled_batch * ratio)


class MixedEpochSampler(EpochSampler):
    """(epoch, index) over a LabeledAndUnlabeled set: every labelled instance once per epoch, and
    round(labelled * `ratio`) unlabelled ones, shuffled together, so a batch of batch_size * (1 + ratio)
    samples holds batch_size labelled ones on average and the epoch has a labelled-only epoch's steps.

    The unlabelled instances are walked through in seeded passes that run on across epochs: none comes
    twice before all have come once, however many an epoch takes. Ranks split the order as EpochSampler's.
    """

    def __init__(self, labeled: int, unlabeled: int, ratio: float, *, seed: int = 0, rank: int = 0,
                 world_size: int = 1):
        self.labeled, self.unlabeled = labeled, unlabeled
        self.per_epoch = round(labeled * ratio) if unlabeled else 0
        super().__init__(labeled + self.per_epoch, shuffle=True, seed=seed, rank=rank, world_size=world_size)

    def _permutation(self, size: int, *key: int) -> list[int]:
        generator = torch.Generator()
        generator.manual_seed(int(np.random.SeedSequence((self.seed, *key)).generate_state(1, np.uint64)[0] >> 1))
        return torch.randperm(size, generator=generator).tolist()

    def unlabeled_indices(self) -> list[int]:
        """This epoch's unlabelled instances: positions [epoch * per_epoch, (epoch + 1) * per_epoch) of the
        passes laid end to end."""
        start, stop = self.epoch * self.per_epoch, (self.epoch + 1) * self.per_epoch
        taken = []
        for walk in range(start // self.unlabeled, -(-stop // self.unlabeled)):
            order = self._permutation(self.unlabeled, 1, walk)
            offset = walk * self.unlabeled
            taken += order[max(start - offset, 0):stop - offset]
        return taken

    def order(self) -> list[int]:
        samples = list(range(self.labeled)) + [self.labeled + i for i in self.unlabeled_indices()]
        return [samples[i] for i in self._permutation(len(samples), 0, self.epoch)]


def _seed_worker(worker_id: int) -> None:
    # the augmentation has its own per-sample generators; this keeps any stray numpy/random
    # use in third-party transforms distinct per worker and reproducible
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def make_loader(dataset: TopDownDataset, batch_size: int, workers: int, sampler: EpochSampler | None = None,
                drop_last: bool = False) -> DataLoader:
    """A loader whose workers live as long as it does; step epochs with `sampler.set_epoch`.

    Without a sampler it walks the dataset in order (evaluation).
    """
    return DataLoader(
        dataset, batch_size=batch_size, sampler=sampler or EpochSampler(len(dataset), shuffle=False),
        num_workers=workers, drop_last=drop_last, pin_memory=torch.cuda.is_available(),
        worker_init_fn=_seed_worker, persistent_workers=workers > 0,
    )
