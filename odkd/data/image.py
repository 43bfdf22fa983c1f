"""Reading images: one clear error for a missing or undecodable file."""

from pathlib import Path

import cv2
import numpy as np

from odkd.errors import OdkdError


def read_image(path: str | Path) -> np.ndarray:
    """BGR uint8 (H, W, 3). EXIF orientation is ignored, as the COCO annotations assume."""
    path = Path(path)
    if not path.is_file():
        raise OdkdError(f"{path}: image not found")
    data = np.fromfile(path, dtype=np.uint8)
    image = cv2.imdecode(data, cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    if image is None:
        raise OdkdError(f"{path}: cannot decode image (corrupt or not an image)")
    return image
