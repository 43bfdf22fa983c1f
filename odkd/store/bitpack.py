"""Binary maps <-> bytes packed along the width (8 pixels a byte, numpy's big-endian bit order)."""

from __future__ import annotations

import numpy as np


def packed_width(width: int) -> int:
    """Bytes one row of `width` pixels takes once packed."""
    return (int(width) + 7) // 8


def bitpack_maps(binary: np.ndarray) -> np.ndarray:
    """bool (..., H, W) -> uint8 (..., H, ceil(W/8)); the last byte of a row is zero-padded."""
    binary = np.asarray(binary)
    if binary.dtype != np.bool_:
        raise TypeError(f"bitpack_maps expects a bool array, got {binary.dtype}")
    return np.packbits(binary, axis=-1)


def unpack_maps(packed: np.ndarray, width: int) -> np.ndarray:
    """uint8 (..., H, ceil(W/8)) -> bool (..., H, W), the inverse of bitpack_maps."""
    packed = np.asarray(packed)
    if packed.dtype != np.uint8:
        raise TypeError(f"unpack_maps expects a uint8 array, got {packed.dtype}")
    if packed.shape[-1] != packed_width(width):
        raise ValueError(f"packed rows of {packed.shape[-1]} bytes cannot hold width {width}")
    return np.unpackbits(packed, axis=-1, count=int(width)).view(np.bool_)
