"""Top-down crop geometry, with the official HRNet conventions.

A crop is a `CropFrame`: a box center and scale (in pixel_std = 200 units), a rotation in
degrees and a horizontal-mirror flag. `CropFrame.matrix(size)` maps original image
coordinates into a crop of `size` (width, height); the same frame at heatmap size is the
heatmap frame, because get_affine_transform scales linearly with the output size. Every
augmentation is therefore one matrix plus a flip flag, and any per-instance map can follow the
image through `warp_maps`.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from odkd.data.keypoints import FLIP_INDEX

PIXEL_STD = 200.0
BOX_PADDING = 1.25
IMAGENET_MEAN_RGB = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD_RGB = np.array([0.229, 0.224, 0.225], dtype=np.float32)
# OpenCV 5 takes an image of at most 128 channels (4.x: 512): COCO-WholeBody's 133 maps go in two calls
CV_MAX_CHANNELS = 128


def box_to_center_scale(box, aspect_ratio: float, padding: float = BOX_PADDING):
    """HRNet's _xywh2cs: the box grown to `aspect_ratio` (w/h), in pixel_std units, padded."""
    x, y, w, h = (float(v) for v in box)
    center = np.array([x + w * 0.5, y + h * 0.5], dtype=np.float32)
    if w > aspect_ratio * h:
        h = w / aspect_ratio
    elif w < aspect_ratio * h:
        w = h * aspect_ratio
    scale = np.array([w / PIXEL_STD, h / PIXEL_STD], dtype=np.float32) * padding
    return center, scale


def _rotate(point, rot_rad: float) -> np.ndarray:
    sn, cs = np.sin(rot_rad), np.cos(rot_rad)
    return np.array([point[0] * cs - point[1] * sn, point[0] * sn + point[1] * cs], np.float32)


def _third_point(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    d = a - b
    return b + np.array([-d[1], d[0]], dtype=np.float32)


def get_affine_transform(center, scale, rot: float, output_size, shift=(0.0, 0.0), inv: bool = False):
    """The official HRNet affine: (center, scale, rot) in the image -> a crop of output_size (w, h).

    Only scale[0] sets the zoom, as in the official code: boxes are made to the crop's aspect first.
    """
    center = np.asarray(center, np.float32)
    scale_px = np.asarray(scale, np.float32) * PIXEL_STD
    shift = np.asarray(shift, np.float32)
    dst_w, dst_h = float(output_size[0]), float(output_size[1])
    rot_rad = np.pi * rot / 180.0
    src_dir = _rotate([0.0, scale_px[0] * -0.5], rot_rad)
    dst_dir = np.array([0.0, dst_w * -0.5], np.float32)

    src = np.zeros((3, 2), np.float32)
    dst = np.zeros((3, 2), np.float32)
    src[0] = center + scale_px * shift
    src[1] = center + src_dir + scale_px * shift
    dst[0] = [dst_w * 0.5, dst_h * 0.5]
    dst[1] = dst[0] + dst_dir
    src[2] = _third_point(src[0], src[1])
    dst[2] = _third_point(dst[0], dst[1])
    if inv:
        return cv2.getAffineTransform(dst, src)
    return cv2.getAffineTransform(src, dst)


def affine_transform(points: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """Apply a 2x3 affine to (..., 2) points."""
    points = np.asarray(points, dtype=np.float64)
    return points @ matrix[:, :2].T + matrix[:, 2]


def _to3x3(matrix: np.ndarray) -> np.ndarray:
    return np.vstack([matrix, [0.0, 0.0, 1.0]])


def invert_affine(matrix: np.ndarray) -> np.ndarray:
    return np.linalg.inv(_to3x3(matrix))[:2]


def compose_affine(outer: np.ndarray, inner: np.ndarray) -> np.ndarray:
    """outer after inner, both 2x3."""
    return (_to3x3(outer) @ _to3x3(inner))[:2]


@dataclass(frozen=True)
class CropFrame:
    """One crop of one person: where it sits in the original image, and how it is oriented.

    `flip` means the image is mirrored (x -> image_width - 1 - x) before the crop is taken, which
    is how the official code flips; keypoint channels then swap by the COCO flip pairs.
    """

    center: tuple[float, float]
    scale: tuple[float, float]
    rotation: float = 0.0
    flip: bool = False
    image_width: int = 0

    def matrix(self, output_size) -> np.ndarray:
        """2x3 map from original image coordinates into this crop at output_size (w, h)."""
        cx, cy = self.center
        if not self.flip:
            return get_affine_transform((cx, cy), self.scale, self.rotation, output_size)
        crop = get_affine_transform((self.image_width - 1 - cx, cy), self.scale, self.rotation, output_size)
        mirror = np.array([[-1.0, 0.0, self.image_width - 1.0], [0.0, 1.0, 0.0]])
        return compose_affine(crop, mirror)


def crop_image(image: np.ndarray, frame: CropFrame, output_size) -> np.ndarray:
    """The crop of `image` in `frame`, as cv2.warpAffine with bilinear sampling (official)."""
    size = (int(output_size[0]), int(output_size[1]))
    return cv2.warpAffine(image, frame.matrix(output_size), size, flags=cv2.INTER_LINEAR)


def normalize_image(crop_bgr: np.ndarray) -> np.ndarray:
    """BGR uint8 (H, W, 3) -> RGB float32 (3, H, W) normalized with the ImageNet mean and std."""
    rgb = crop_bgr[..., ::-1].astype(np.float32) / 255.0
    return np.ascontiguousarray(((rgb - IMAGENET_MEAN_RGB) / IMAGENET_STD_RGB).transpose(2, 0, 1))


def cv_on_maps(op, maps: np.ndarray) -> np.ndarray:
    """`op`, an OpenCV call on one (h, w, c) image, over a stack of maps (C, h, w), at most CV_MAX_CHANNELS
    at a time; (C, h', w')."""
    parts = []
    for start in range(0, len(maps), CV_MAX_CHANNELS):
        out = op(np.ascontiguousarray(maps[start:start + CV_MAX_CHANNELS].transpose(1, 2, 0)))
        parts.append(out.reshape(out.shape[0], out.shape[1], -1).transpose(2, 0, 1))
    return np.concatenate(parts)


def warp_maps(
    maps: np.ndarray,
    src: CropFrame,
    src_size,
    dst: CropFrame,
    dst_size,
    keypoint_channels: bool = True,
    interpolation: int = cv2.INTER_LINEAR,
    flip_index: np.ndarray = FLIP_INDEX,
) -> np.ndarray:
    """Move a stack of per-instance maps (C, h, w) from crop `src` into crop `dst`.

    Sizes are (w, h) of the maps in each frame (heatmap resolution). When exactly one of the
    frames is mirrored and the maps are keypoint channels, channels swap by the flip pairs, so
    channel k still means keypoint k of the person. Outside the source crop the result is 0.
    """
    m = compose_affine(dst.matrix(dst_size), invert_affine(src.matrix(src_size)))
    size = (int(dst_size[0]), int(dst_size[1]))
    out = cv_on_maps(lambda stack: cv2.warpAffine(stack, m, size, flags=interpolation,
                                                  borderMode=cv2.BORDER_CONSTANT, borderValue=0),
                     np.asarray(maps, dtype=np.float32))
    if keypoint_channels and src.flip != dst.flip:
        out = out[flip_index]
    return np.ascontiguousarray(out)


def _normalized_to_pixels(size) -> np.ndarray:
    """3x3 map from grid_sample's [-1, 1] coordinates (align_corners=True) to pixel centers of a (w, h) map."""
    w, h = float(size[0]), float(size[1])
    return np.array([[(w - 1) / 2, 0.0, (w - 1) / 2], [0.0, (h - 1) / 2, (h - 1) / 2], [0.0, 0.0, 1.0]])


def grid_sample_theta(src: CropFrame, src_size, dst: CropFrame, dst_size) -> np.ndarray:
    """The 2x3 `theta` of torch's affine_grid(align_corners=True) that moves maps from crop `src` into
    crop `dst`: the same move as `warp_maps`, but as one matrix per sample, so a whole batch warps on
    the device with grid_sample. Channel swaps for mirrored frames are the caller's, as in warp_maps.
    """
    dst_to_src = compose_affine(src.matrix(src_size), invert_affine(dst.matrix(dst_size)))
    theta = np.linalg.inv(_normalized_to_pixels(src_size)) @ _to3x3(dst_to_src) @ _normalized_to_pixels(dst_size)
    return theta[:2].astype(np.float32)


def map_zoom(src: CropFrame, src_size, dst: CropFrame, dst_size) -> float:
    """Pixels of the `src` map per pixel of the `dst` map (> 1: dst is zoomed out)."""
    dst_to_src = compose_affine(src.matrix(src_size), invert_affine(dst.matrix(dst_size)))
    return float(np.sqrt(abs(np.linalg.det(dst_to_src[:, :2]))))
