"""`odkd predict`: poses (and person masks) for the boxes of one image, drawn over it."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import torch

from odkd.data.decode import decode_heatmaps
from odkd.data.image import read_image
from odkd.data.instances import load_coco
from odkd.data.transforms import CropFrame, box_to_center_scale, crop_image, invert_affine, normalize_image
from odkd.data.keypoints import COCO_SET, KeypointSet
from odkd.data.visualize import draw_pose, tint_mask
from odkd.errors import OdkdError, not_found
from odkd.models.inference import predict_batch


def boxes_from_file(path: str | Path) -> list[list[float]]:
    """[x, y, w, h] boxes from a JSON list of boxes or of detections ({"bbox": ..., "score": ...})."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise not_found(path, "boxes file") from None
    except json.JSONDecodeError as exc:
        raise OdkdError(f"{path}: not valid JSON ({exc})") from None
    boxes = [d["bbox"] if isinstance(d, dict) and "bbox" in d else d for d in data] if isinstance(data, list) else None
    if not boxes or not all(isinstance(b, list) and len(b) == 4 for b in boxes):
        raise OdkdError(f"{path}: expected a non-empty list of [x, y, w, h] boxes or of {{'bbox': [x, y, w, h]}}")
    return boxes


def boxes_from_annotations(ann_file: str | Path, image_path: str | Path) -> list[list[float]]:
    """The non-crowd boxes that a COCO-format file gives for the image with this file name; only the boxes
    are read, so the file may label any keypoint set (COCO-WholeBody's own format too)."""
    coco = load_coco(Path(ann_file))
    name = Path(image_path).name
    ids = [i for i, img in coco.imgs.items() if Path(img["file_name"]).name == name]
    if not ids:
        raise OdkdError(f"{ann_file}: no image named {name}")
    anns = coco.loadAnns(coco.getAnnIds(imgIds=ids, iscrowd=False))
    for ann in anns:
        if not (isinstance(ann.get("bbox"), list) and len(ann["bbox"]) == 4):
            raise OdkdError(f"{ann_file}: annotation {ann.get('id')} has no 'bbox' [x, y, w, h]")
    boxes = [a["bbox"] for a in anns if a["bbox"][2] > 0 and a["bbox"][3] > 0]
    if not boxes:
        raise OdkdError(f"{ann_file}: image {name} has no person boxes")
    return boxes


def predict_image(model, image: np.ndarray, boxes, input_size, *, device, flip_test: bool = True,
                  decode: str = "argmax", sigma: float = 2.0, kset: KeypointSet = COCO_SET):
    """Keypoints (P, K, 3) in image coordinates and, for a seg-head model, the union person mask (H, W).
    `decode` and `sigma` (the targets', in heatmap pixels) pick the decoder, as [eval] decode does."""
    h, w = image.shape[:2]
    aspect = input_size[0] / input_size[1]
    frames = []
    for box in boxes:
        center, scale = box_to_center_scale(box, aspect)
        frames.append(CropFrame(center=tuple(map(float, center)), scale=tuple(map(float, scale)), image_width=w))
    batch = torch.from_numpy(np.stack([normalize_image(crop_image(image, f, input_size)) for f in frames]))
    model.eval()
    heatmaps, masks = predict_batch(model, batch.to(device), flip_test=flip_test and kset.mirrored,
                                    flip_index=kset.flip_index)
    preds, maxvals = decode_heatmaps(heatmaps.cpu().numpy(), frames, decode, sigma, kset.flip_index)
    keypoints = np.concatenate([preds, maxvals], axis=2)
    if masks is None:
        return keypoints, None
    hm_size = (masks.shape[3], masks.shape[2])
    union = np.zeros((h, w), np.float32)
    for f, m in zip(frames, masks.cpu().numpy()):
        back = cv2.warpAffine(m[0], invert_affine(f.matrix(hm_size)), (w, h), flags=cv2.INTER_LINEAR)
        union = np.maximum(union, back)
    return keypoints, union >= 0.5


def check_picture_name(out_path) -> None:
    """The picture's format is its extension, as OpenCV writes it: .png (lossless), .jpg, .bmp, .tif, .webp
    ...; a name OpenCV has no writer for is one line, before any work."""
    if not cv2.haveImageWriter(str(out_path)):
        suffix = Path(out_path).suffix
        raise OdkdError(f"{out_path}: OpenCV writes no image format named {suffix or '(no extension)'!r}; "
                        "name the picture .png (lossless) or .jpg, or another extension OpenCV writes "
                        "(.bmp, .tif, .webp)")


def predict_to_png(model, image_path, boxes, input_size, out_path, *, device, flip_test=True,
                   min_score: float = 0.2, decode: str = "argmax", sigma: float = 2.0,
                   kset: KeypointSet = COCO_SET) -> np.ndarray:
    """Draw every person's skeleton (and the mask) over the image, write out_path (in the format of its
    extension, check_picture_name); return the keypoints."""
    check_picture_name(out_path)
    image = read_image(image_path)
    keypoints, mask = predict_image(model, image, boxes, input_size, device=device, flip_test=flip_test,
                                    decode=decode, sigma=sigma, kset=kset)
    canvas = image if mask is None else tint_mask(image, mask)
    for person in keypoints:
        canvas = draw_pose(canvas, person, min_score=min_score, kset=kset)
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(out_path), canvas):
        raise OdkdError(f"{out_path}: cannot write image (use a .png or .jpg name)")
    return keypoints
