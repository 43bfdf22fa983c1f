"""What the student learns from a teacher's stored maps: one small family of target forms, like mmpose's
codecs. Each form reads one stored array and turns a batch of its rows into a target in every sample's
augmented crop; a stage names its form in `targets`, and the objective calls it without a branch per form.

- "disc" (the default, chosen on val AP for a student with room to grow): the ODKD paper's target, the
  warped binary blob itself (re-binarized, edges moved back to the teacher's blob size). JointsMSE
  against a flat disc teaches a flat-topped response whose peak may sit anywhere inside it, at full
  confidence.
- "disc_conf": the same disc at the height of the teacher's stored peak, so that it keeps how sure the
  teacher was; level with the disc from a student with room to grow, a little less harm from a trained one.
- "gaussian": each binarized blob's sub-pixel centroid, found in the stored crop, moved by
  the sample's exact affine and rendered as a unit-peak Gaussian of the GT's sigma. The student learns
  the same shape from the teachers as from the labels, and no warp interpolates the bits.
- "gaussian_conf": the same Gaussian with its peak at the teacher's stored peak value, so that the
  student learns how sure the teacher was, which the bits alone lose; it does a trained student the
  least harm.
- "soft": the raw maps, warped (needs [cache] store_soft); the reference of what the teachers know.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from odkd.data.keypoints import FLIP_INDEX
from odkd.distill.warp import flip_keypoint_channels, unpack_bits, warp_batch, warp_binary_batch


@dataclass(frozen=True)
class WarpInputs:
    """What moves a batch of stored rows into the samples' crops (from the loader)."""

    theta: torch.Tensor  # (B, 2, 3) affine_grid matrix: sample crop -> stored crop, normalized coordinates
    zoom: torch.Tensor  # (B,) stored-map pixels per crop pixel
    flip: torch.Tensor  # (B,) mirrored samples, whose keypoint channels swap
    out_size: tuple[int, int]  # the student's heatmap, width and height
    stored_width: int  # the stored maps' width, which bit-packing rounds up to bytes
    blob_radius: float  # the teacher's binary blob radius at the store's sigma and threshold
    keep_blob_size: bool  # move a warped disc's edges back to blob_radius under zoom
    sigma: float  # the GT heatmaps' Gaussian sigma, in heatmap pixels
    flip_index: np.ndarray = field(default_factory=lambda: FLIP_INDEX)  # the keypoint set's mirror permutation


def disc_target(stored: torch.Tensor, conf: torch.Tensor, warp: WarpInputs) -> torch.Tensor:
    return warp_binary_batch(stored, warp.stored_width, warp.theta, warp.out_size, warp.flip,
                             keypoint_channels=True, blob_radius=warp.blob_radius if warp.keep_blob_size else 0.0,
                             zoom=warp.zoom, flip_index=warp.flip_index)


def soft_target(stored: torch.Tensor, conf: torch.Tensor, warp: WarpInputs) -> torch.Tensor:
    return warp_batch(stored, warp.theta, warp.out_size, warp.flip, keypoint_channels=True, flip_index=warp.flip_index)


@functools.cache
def _pixel_grid(width: int, height: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    ys, xs = torch.meshgrid(torch.arange(height, dtype=torch.float32, device=device),
                            torch.arange(width, dtype=torch.float32, device=device), indexing="ij")
    return xs, ys


def blob_centroids(bits: torch.Tensor, window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """0/1 maps (B, K, h, w) -> the centroid (x, y) in pixels of the blob around each map's densest spot
    (within `window` pixels of it, so a second blob does not pull it), and the blob's pixel count (B, K);
    an empty map has count 0 and centroid (0, 0)."""
    b, k, h, w = bits.shape
    density = F.avg_pool2d(bits.flatten(0, 1)[:, None], 3, stride=1, padding=1).view(b, k, h * w)
    densest = density.argmax(-1)
    xs, ys = _pixel_grid(w, h, bits.device)
    near = (((xs - (densest % w)[..., None, None]).abs() <= window)
            & ((ys - (densest // w)[..., None, None]).abs() <= window))
    mass = bits * near
    count = mass.sum((-2, -1))
    safe = count.clamp(min=1)
    return torch.stack(((mass * xs).sum((-2, -1)) / safe, (mass * ys).sum((-2, -1)) / safe), -1), count


def points_into_crop(points: torch.Tensor, theta: torch.Tensor, src_size, dst_size) -> torch.Tensor:
    """Pixel points (B, K, 2) of maps of `src_size` (w, h) -> pixels of the sample crops of `dst_size`,
    through the inverse of affine_grid's theta (align_corners=True: pixel 0 is -1, pixel n-1 is +1)."""
    # the sizes scale x and y by Python floats: a small tensor made here each step would be one more
    # copy from pageable host memory that the device waits for
    x, y = points[..., 0] * (2.0 / (src_size[0] - 1)) - 1.0, points[..., 1] * (2.0 / (src_size[1] - 1)) - 1.0
    linear, shift = theta[:, :, :2].float(), theta[:, :, 2].float()
    moved = torch.linalg.solve(linear[:, None], (torch.stack((x, y), -1) - shift[:, None])[..., None])[..., 0]
    return torch.stack(((moved[..., 0] + 1.0) * ((dst_size[0] - 1) / 2.0),
                        (moved[..., 1] + 1.0) * ((dst_size[1] - 1) / 2.0)), -1)


def render_gaussians(points: torch.Tensor, present: torch.Tensor, size, sigma: float) -> torch.Tensor:
    """Unit-peak Gaussians of `sigma` at sub-pixel `points` (B, K, 2) on maps of `size` (w, h); an absent
    point (present 0) gives an empty map."""
    xs, ys = _pixel_grid(int(size[0]), int(size[1]), points.device)
    dist2 = (xs - points[..., 0, None, None]) ** 2 + (ys - points[..., 1, None, None]) ** 2
    return torch.exp(-dist2 / (2.0 * sigma ** 2)) * present[..., None, None]


def gaussian_target(stored: torch.Tensor, conf: torch.Tensor, warp: WarpInputs) -> torch.Tensor:
    bits = unpack_bits(stored, warp.stored_width)
    stored_size = (bits.shape[-1], bits.shape[-2])
    centroids, count = blob_centroids(bits, window=int(warp.blob_radius) + 2)
    points = points_into_crop(centroids, warp.theta, stored_size, warp.out_size)
    rendered = render_gaussians(points, (count > 0).float(), warp.out_size, warp.sigma)
    return flip_keypoint_channels(rendered, warp.flip, warp.flip_index)


def at_stored_peak(unit_form: Callable[[torch.Tensor, torch.Tensor, WarpInputs], torch.Tensor]):
    """A unit-height form with each joint's map scaled to the teacher's stored peak (conf (B, K), in the
    sample's channel order): a map as confident as the teacher's own."""
    def scaled(stored: torch.Tensor, conf: torch.Tensor, warp: WarpInputs) -> torch.Tensor:
        return unit_form(stored, conf, warp) * conf.clamp(0.0, 1.0)[..., None, None]
    return scaled


@dataclass(frozen=True)
class TargetForm:
    array: str  # the stored array it reads, under the teacher's prefix
    make: Callable[[torch.Tensor, torch.Tensor, WarpInputs], torch.Tensor]  # stored rows, conf, warp


TARGET_FORMS: dict[str, TargetForm] = {
    "disc": TargetForm("heatmaps", disc_target),
    "disc_conf": TargetForm("heatmaps", at_stored_peak(disc_target)),
    "gaussian": TargetForm("heatmaps", gaussian_target),
    "gaussian_conf": TargetForm("heatmaps", at_stored_peak(gaussian_target)),
    "soft": TargetForm("soft_heatmaps", soft_target),
}
