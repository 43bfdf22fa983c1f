"""The stored crop's geometry: the student's canonical crop widened by `margin` at the same pixel scale.

Same center, the same image pixels per heatmap pixel, and a proportionally larger map (each side
rounded up to a multiple of 8, so the teacher's input stays a multiple of 32 as HRNet needs). The
stored center and scale are those of that wider crop, so a map cell sits exactly where the
student's heatmap cell at the same image point sits, and the trainer can warp the stored maps into
any augmented frame with `odkd.data.transforms.warp_maps`.
"""

from __future__ import annotations

import numpy as np

from odkd.errors import OdkdError

MAP_MULTIPLE = 8


def cache_geometry(heatmap_size, input_size, margin: float) -> tuple[tuple[int, int], tuple[int, int]]:
    """(stored map size, teacher input size), both (w, h), for the student's sizes and a margin >= 1."""
    if margin < 1.0:
        raise OdkdError(f"cache.margin must be >= 1.0 (1.0 caches exactly the student's crop), got {margin}")
    if margin == 1.0:
        return tuple(heatmap_size), tuple(input_size)
    map_size = tuple(int(np.ceil(s * margin / MAP_MULTIPLE - 1e-9)) * MAP_MULTIPLE for s in heatmap_size)
    stride = (input_size[0] // heatmap_size[0], input_size[1] // heatmap_size[1])
    return map_size, (map_size[0] * stride[0], map_size[1] * stride[1])


def stored_frame_scale(scale: np.ndarray, heatmap_size, map_size) -> np.ndarray:
    """The scale of the widened crop: the student's scale times the map's growth on each side."""
    grow = np.array([map_size[0] / heatmap_size[0], map_size[1] / heatmap_size[1]], np.float32)
    return (np.asarray(scale, np.float32) * grow).astype(np.float32)
