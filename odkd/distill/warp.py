"""Stored teacher maps -> the augmented crop, for a whole batch on the device.

The store keeps each instance's maps bit-packed in its canonical crop. Per sample the loader ships
one 2x3 grid_sample matrix (odkd.data.transforms.grid_sample_theta, the same affine that made the
image crop); here the batch is unpacked, warped with affine_grid + grid_sample (bilinear), mirrored
samples swap their left/right channels, and binary maps are binarized again at 0.5.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F

from odkd.data.keypoints import FLIP_INDEX

ERODE_BLUR, DILATE_BLUR = 1.4, 0.7  # pixels: the edge ramps of move_edges


@functools.cache
def _flip_index(device: torch.device, flip_index: tuple[int, ...]) -> torch.Tensor:
    # made once per device: a copy from pageable host memory would make every step wait for the device
    return torch.tensor(flip_index, device=device)


@functools.cache
def _bit_shifts(device: torch.device) -> torch.Tensor:
    return torch.arange(7, -1, -1, dtype=torch.uint8, device=device)  # numpy packbits is big-endian: MSB first


def unpack_bits(packed: torch.Tensor, width: int) -> torch.Tensor:
    """uint8 (..., H, ceil(W/8)) packed as odkd.store.bitpack does -> float32 0/1 (..., H, W)."""
    bits = (packed.unsqueeze(-1) >> _bit_shifts(packed.device)) & 1
    return bits.flatten(-2)[..., :width].float()


def warp_batch(maps: torch.Tensor, theta: torch.Tensor, out_size, flip: torch.Tensor,
               keypoint_channels: bool, flip_index: np.ndarray = FLIP_INDEX) -> torch.Tensor:
    """Maps (B, C, h, w) in their stored crops -> (B, C, out_h, out_w) in each sample's crop.

    Outside the stored crop the result is 0. Where `flip` is set and the channels are keypoints,
    channel k is swapped with its mirror pair, so it still means keypoint k of the person.
    """
    b, c = maps.shape[:2]
    grid = F.affine_grid(theta.float(), [b, c, int(out_size[1]), int(out_size[0])], align_corners=True)
    out = F.grid_sample(maps.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    return flip_keypoint_channels(out, flip, flip_index) if keypoint_channels else out


def flip_keypoint_channels(maps: torch.Tensor, flip: torch.Tensor, flip_index: np.ndarray = FLIP_INDEX) -> torch.Tensor:
    """Keypoint maps (B, K, h, w) of mirrored samples with each channel swapped with its mirror pair."""
    swapped = maps[:, _flip_index(maps.device, tuple(flip_index.tolist()))]
    return torch.where(flip.view(-1, 1, 1, 1).bool(), swapped, maps)


@functools.cache
def _blur_taps(width: float) -> tuple[float, ...]:
    """Five taps of a normalized Gaussian of `width` pixels (the widths in use were measured with five)."""
    taps = torch.exp(-torch.arange(-2, 3, dtype=torch.float32) ** 2 / (2 * width ** 2))
    return tuple((taps / taps.sum()).tolist())


def _blurred(maps: torch.Tensor, taps: list[torch.Tensor]) -> torch.Tensor:
    """A separable blur as shifted sums, each sample (B, C, h, w) with its own taps (five of (B, 1, 1, 1)):
    conv2d on thousands of one-channel maps is several times slower on a CPU."""
    h, w = maps.shape[-2:]
    # the crop's border cuts a blob, it is no edge of it: replicate rather than erode from there
    x = F.pad(maps, (2, 2, 2, 2), mode="replicate")
    x = sum(t * x[..., :, k:k + w] for k, t in enumerate(taps))
    return sum(t * x[..., k:k + h, :] for k, t in enumerate(taps))


def move_edges(maps: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Binary-ish maps (B, C, h, w) with every edge moved inwards by `shift` (B,) pixels (outwards when
    negative): a Gaussian blur turns each edge into the normal CDF of its signed distance, so one
    threshold per sample erodes or dilates by a fraction of a pixel. The blur widths are measured
    (tests/test_student.py) on blobs of a few pixels, whose curvature a straight-edge model ignores.
    Below a third of a pixel a sample is only thresholded: the blur's rounding of corners would cost
    more than the move gains."""
    shift = shift.float().to(maps.device).view(-1, 1, 1, 1)
    erode, dilate = shift >= 1 / 3, shift <= -1 / 3
    # one blur of the whole batch, each sample at its own width, then a select: no boolean indexing, so
    # the device never waits for the host to learn which samples move
    taps = [torch.where(erode, e, d) for e, d in zip(_blur_taps(ERODE_BLUR), _blur_taps(DILATE_BLUR))]
    level = torch.special.ndtr(shift / torch.where(erode, ERODE_BLUR, DILATE_BLUR)).clamp(0.02, 0.98)
    moved = (_blurred(maps, taps) >= level).float()
    return torch.where(erode | dilate, moved, (maps >= 0.5).float())


def warp_binary_batch(packed: torch.Tensor, width: int, theta: torch.Tensor, out_size, flip: torch.Tensor,
                      keypoint_channels: bool, blob_radius: float = 0.0, zoom: torch.Tensor | None = None,
                      flip_index: np.ndarray = FLIP_INDEX) -> torch.Tensor:
    """Packed binary maps -> 0/1 float maps in each sample's crop, binarized again after interpolation.

    A warp scales every blob by 1/zoom (zoom: stored-map pixels per crop pixel). A teacher run on the
    zoomed crop would not: its response keeps the width it was trained with, about `blob_radius`
    pixels around the uncertain region. With blob_radius > 0 the edges move back by
    blob_radius * (1/zoom - 1), so the target keeps the teacher's own blob size.
    """
    warped = warp_batch(unpack_bits(packed, width), theta, out_size, flip, keypoint_channels, flip_index)
    if blob_radius <= 0 or zoom is None:
        return (warped >= 0.5).float()
    return move_edges(warped, blob_radius * (1.0 / zoom - 1.0))


def flip_keypoint_values(values: torch.Tensor, flip: torch.Tensor, flip_index: np.ndarray = FLIP_INDEX) -> torch.Tensor:
    """Per-keypoint values (B, K) of mirrored samples reordered by the flip pairs, as their maps are."""
    swapped = values[:, _flip_index(values.device, tuple(flip_index.tolist()))]
    return torch.where(flip.view(-1, 1).bool(), swapped, values)
