"""Stored teacher maps -> the augmented crop, for a whole batch on the device.

The store keeps each instance's maps bit-packed in its canonical crop. Per sample the loader ships
one 2x3 grid_sample matrix (odkd.data.transforms.grid_sample_theta, the same affine that made the
image crop); here the batch is unpacked, warped with affine_grid + grid_sample (bilinear), mirrored
samples swap their left/right channels, and binary maps are binarized again at 0.5.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from odkd.data.keypoints import FLIP_INDEX

_FLIP = torch.tensor(FLIP_INDEX.tolist())
ERODE_BLUR, DILATE_BLUR = 1.4, 0.7  # pixels: the edge ramps of move_edges
_BIT_SHIFTS = torch.arange(7, -1, -1, dtype=torch.uint8)  # numpy packbits is big-endian: MSB first


def unpack_bits(packed: torch.Tensor, width: int) -> torch.Tensor:
    """uint8 (..., H, ceil(W/8)) packed as odkd.cache.bitpack does -> float32 0/1 (..., H, W)."""
    bits = (packed.unsqueeze(-1) >> _BIT_SHIFTS.to(packed.device)) & 1
    return bits.flatten(-2)[..., :width].float()


def warp_batch(maps: torch.Tensor, theta: torch.Tensor, out_size, flip: torch.Tensor,
               keypoint_channels: bool) -> torch.Tensor:
    """Maps (B, C, h, w) in their stored crops -> (B, C, out_h, out_w) in each sample's crop.

    Outside the stored crop the result is 0. Where `flip` is set and the channels are keypoints,
    channel k is swapped with its mirror pair, so it still means keypoint k of the person.
    """
    b, c = maps.shape[:2]
    grid = F.affine_grid(theta.float(), [b, c, int(out_size[1]), int(out_size[0])], align_corners=True)
    out = F.grid_sample(maps.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    if keypoint_channels:
        swapped = out[:, _FLIP.to(out.device)]
        out = torch.where(flip.view(-1, 1, 1, 1).bool(), swapped, out)
    return out


def _blurred(maps: torch.Tensor, width: float) -> torch.Tensor:
    b, c, h, w = maps.shape
    radius = 2  # five taps: measured with these widths; wider kernels round small blobs away
    taps = torch.exp(-torch.arange(-radius, radius + 1, dtype=torch.float32, device=maps.device) ** 2
                     / (2 * width ** 2))
    kernel = torch.outer(taps, taps)
    # the crop's border cuts a blob, it is no edge of it: replicate rather than erode from there
    padded = F.pad(maps.reshape(b * c, 1, h, w), (radius,) * 4, mode="replicate")
    return F.conv2d(padded, (kernel / kernel.sum())[None, None]).reshape(b, c, h, w)


def move_edges(maps: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Binary-ish maps (B, C, h, w) with every edge moved inwards by `shift` (B,) pixels (outwards when
    negative): a Gaussian blur turns each edge into the normal CDF of its signed distance, so one
    threshold per sample erodes or dilates by a fraction of a pixel. The blur widths are measured
    (bench/fidelity.py) on blobs of a few pixels, whose curvature a straight-edge model ignores."""
    shift = shift.float().view(-1, 1, 1, 1)
    eroded = _blurred(maps, ERODE_BLUR) >= torch.special.ndtr(shift / ERODE_BLUR).clamp(0.02, 0.98)
    dilated = _blurred(maps, DILATE_BLUR) >= torch.special.ndtr(shift / DILATE_BLUR).clamp(0.02, 0.98)
    # below a third of a pixel the blur's rounding of corners costs more than the move gains
    moved = torch.where(shift > 0, eroded, dilated)
    return torch.where(shift.abs() < 1 / 3, maps >= 0.5, moved).float()


def warp_binary_batch(packed: torch.Tensor, width: int, theta: torch.Tensor, out_size, flip: torch.Tensor,
                      keypoint_channels: bool, blob_radius: float = 0.0, zoom: torch.Tensor | None = None
                      ) -> torch.Tensor:
    """Packed binary maps -> 0/1 float maps in each sample's crop, binarized again after interpolation.

    A warp scales every blob by 1/zoom (zoom: stored-map pixels per crop pixel). A teacher run on the
    zoomed crop would not: its response keeps the width it was trained with, about `blob_radius`
    pixels around the uncertain region. With blob_radius > 0 the edges move back by
    blob_radius * (1/zoom - 1), so the target keeps the teacher's own blob size.
    """
    warped = warp_batch(unpack_bits(packed, width), theta, out_size, flip, keypoint_channels)
    if blob_radius <= 0 or zoom is None:
        return (warped >= 0.5).float()
    return move_edges(warped, blob_radius * (1.0 / zoom - 1.0))


def flip_keypoint_values(values: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """Per-keypoint values (B, K) of mirrored samples reordered by the flip pairs, as their maps are."""
    swapped = values[:, _FLIP.to(values.device)]
    return torch.where(flip.view(-1, 1).bool(), swapped, values)
