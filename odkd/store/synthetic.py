"""Deterministic stand-in targets (binarized Gaussians and an elliptic mask) for exercising the store
without teachers: the tests and bench/cache.py drive the writer with them."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from odkd.store.bitpack import bitpack_maps
from odkd.store.schema import StoreLayout
from odkd.store.writer import ShardTargets


@dataclass(frozen=True)
class SyntheticTargets:
    """A producer: rows [start, stop) of unit-peak Gaussians (sigma in map pixels), binarized at `threshold`."""

    layout: StoreLayout
    seed: int = 0
    sigma: float = 2.0
    threshold: float = 0.5

    def binary_maps(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(pt, st, mask) as bool (n, C, H, W) and the peaks (n, 2, K) of the maps before thresholding."""
        rng = np.random.default_rng([self.seed, start, stop])
        n, k = stop - start, self.layout.num_joints
        w, h = self.layout.map_size
        body = rng.uniform([0.25 * w, 0.2 * h], [0.75 * w, 0.8 * h], size=(n, 1, 2))
        joints = body + rng.normal(0.0, [0.12 * w, 0.2 * h], size=(n, k, 2))
        peaks = rng.uniform(0.3, 1.0, size=(n, 2, k))
        xs, ys = np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32)
        maps = []
        for t, jitter in enumerate((0.0, 0.5)):
            mu = (joints + rng.normal(0.0, jitter, size=joints.shape)).astype(np.float32)
            # a 2-D Gaussian is the outer product of two 1-D ones
            gx = np.exp(-((xs - mu[..., 0, None]) ** 2) / (2 * self.sigma ** 2))
            gy = np.exp(-((ys - mu[..., 1, None]) ** 2) / (2 * self.sigma ** 2))
            gy *= peaks[:, t, :, None].astype(np.float32)
            maps.append(gy[..., :, None] * gx[..., None, :] >= self.threshold)
        ys, xs = ys[:, None], xs[None, :]
        radii = np.array([0.22 * w, 0.38 * h])
        bx, by = body[:, 0, 0, None, None], body[:, 0, 1, None, None]
        mask = ((xs - bx) / radii[0]) ** 2 + ((ys - by) / radii[1]) ** 2 <= 1
        return maps[0], maps[1], mask[:, None], peaks

    def __call__(self, start: int, stop: int) -> ShardTargets:
        pt, st, mask, peaks = self.binary_maps(start, stop)
        out = self.layout.allocate(stop - start)
        out["pt/heatmaps"][:] = bitpack_maps(pt)
        out["st/heatmaps"][:] = bitpack_maps(st)
        out["st/mask"][:] = bitpack_maps(mask)
        out["pt/conf"][:] = peaks[:, 0]
        out["st/conf"][:] = peaks[:, 1]
        index = np.arange(start, stop)
        out["meta/index"][:] = index
        out["meta/image_id"][:] = index // 3
        out["meta/ann_id"][:] = index + 1000
        out["meta/center"][:] = np.stack([index * 0.5, index * 0.25], axis=1)
        out["meta/scale"][:] = 1.0
        out["meta/ok"][:] = 1
        return ShardTargets(out)
