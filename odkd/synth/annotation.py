"""COCO annotations read off the label maps that painted an image, so the labels agree with the pixels,
and the errors that annotators add to them: noise in where they click, and joints they skip."""

from __future__ import annotations

import math

import cv2
import numpy as np
from pycocotools import mask as mask_utils

from odkd.data.keypoints import COCO_SIGMAS
from odkd.synth.appearance import RenderedPerson
from odkd.synth.body import KEYPOINT_PARTS, TORSO

MIN_PART_AREA = 6.0  # visible fragments smaller than this many pixels get no polygon
MIN_CROWD_AREA = 40


def mask_polygons(mask: np.ndarray) -> list[list[float]]:
    """COCO polygons tracing the pixel edges of a binary mask; tiny fragments are dropped.

    Contours are traced on the mask upsampled 2x, so that pycocotools rasterizes the polygons
    back to the very same pixels (tracing pixel centres would shave half a pixel off all round).
    """
    ys, xs = np.nonzero(mask)
    if len(ys) == 0:
        return []
    y0, x0 = ys.min(), xs.min()
    crop = mask[y0 : ys.max() + 1, x0 : xs.max() + 1].astype(np.uint8)
    double = cv2.resize(crop, None, fx=2, fy=2, interpolation=cv2.INTER_NEAREST)
    contours, _ = cv2.findContours(double, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    polygons = []
    for contour in contours:
        if len(contour) < 3 or cv2.contourArea(contour) < 4 * MIN_PART_AREA:
            continue
        xy = contour.reshape(-1, 2) / 2 + 0.25 + [x0, y0]  # quarter pixels: exact in JSON
        polygons.append(xy.ravel().tolist())
    return polygons


def person_annotation(owner: np.ndarray, part_map: np.ndarray, person: RenderedPerson) -> dict | None:
    """COCO annotation of one person's visible body; None if nothing of it shows."""
    height, width = owner.shape
    polygons = mask_polygons(owner == person.index)
    if not polygons:
        return None
    rle = mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
    visible = mask_utils.decode(rle) > 0  # without the fragments too small to get a polygon
    keypoints = []
    for k, (x, y) in enumerate(person.joints):
        xi, yi = int(round(x)), int(round(y))
        if not person.labelled[k] or not (0 <= xi < width and 0 <= yi < height):
            keypoints += [0, 0, 0]
            continue
        allowed = [p for p in KEYPOINT_PARTS[k] if not (p == TORSO and person.torso_hides[k])]
        r = person.window
        window = np.s_[max(yi - r, 0) : yi + r + 1, max(xi - r, 0) : xi + r + 1]
        seen = visible[window] & (owner[window] == person.index) & np.isin(part_map[window], allowed)
        keypoints += [xi, yi, 2 if seen.mean() >= 0.5 else 1]
    return {
        "segmentation": polygons,
        "num_keypoints": int(sum(v > 0 for v in keypoints[2::3])),
        "area": float(mask_utils.area(rle)),
        "iscrowd": 0,
        "keypoints": keypoints,
        "bbox": [float(v) for v in mask_utils.toBbox(rle)],
    }


def crowd_annotation(rng: np.random.Generator, owner: np.ndarray, crowd_size: int) -> dict | None:
    """One iscrowd=1 region over the crowd's visible pixels, as compressed or uncompressed RLE."""
    region = ((owner >= 0) & (owner < crowd_size)).astype(np.uint8)
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (7, 7))
    region = cv2.morphologyEx(region, cv2.MORPH_CLOSE, kernel)
    region[owner >= crowd_size] = 0  # the annotated people in front stay theirs
    if region.sum() < MIN_CROWD_AREA:
        return None
    rle = mask_utils.encode(np.asfortranarray(region))
    if rng.random() < 0.5:
        segmentation = {"counts": rle["counts"].decode("ascii"), "size": [int(v) for v in rle["size"]]}
    else:
        segmentation = {"counts": uncompressed_rle_counts(region), "size": [int(v) for v in region.shape]}
    return {
        "segmentation": segmentation,
        "num_keypoints": 0,
        "area": float(mask_utils.area(rle)),
        "iscrowd": 1,
        "keypoints": [0] * 51,
        "bbox": [float(v) for v in mask_utils.toBbox(rle)],
    }


def uncompressed_rle_counts(mask: np.ndarray) -> list[int]:
    """COCO's uncompressed RLE counts: run lengths over the column-major mask, zeros first."""
    flat = mask.ravel(order="F") > 0
    changes = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate([[0], changes, [flat.size]])
    runs = np.diff(bounds).tolist()
    return [0] + runs if flat[0] else runs


def add_annotator_noise(rng: np.random.Generator, anns: list[dict], scale: float, width: int, height: int) -> None:
    """Move every labelled keypoint of the non-crowd annotations in place by a 2D Gaussian whose mean
    squared distance is (scale * sigma_k)^2 * area: COCO's definition of the per-keypoint sigmas, so
    at scale 1 the labels disagree with the truth as much as COCO's annotators disagree with each
    other. The points stay integer pixels inside the image, with their visibility flags."""
    for ann in anns:
        if ann["iscrowd"]:
            continue
        keypoints = np.array(ann["keypoints"]).reshape(-1, 3)
        spread = scale * COCO_SIGMAS * math.sqrt(ann["area"] / 2.0)  # per axis
        offsets = rng.normal(0.0, 1.0, (len(COCO_SIGMAS), 2)) * spread[:, None]
        moved = np.clip(np.rint(keypoints[:, :2] + offsets), 0, [width - 1, height - 1])
        labelled = keypoints[:, 2] > 0
        keypoints[labelled, :2] = moved[labelled]
        ann["keypoints"] = keypoints.ravel().tolist()


def unlabel_keypoints(rng: np.random.Generator, anns: list[dict], share: float) -> None:
    """Leave each labelled keypoint of the non-crowd annotations unlabelled with probability share,
    in place: stored as COCO stores a joint its annotator skipped, (0, 0, 0), with num_keypoints
    recounted. Box, area and mask stay, so a person left with no keypoint is still a person."""
    for ann in anns:
        if ann["iscrowd"]:
            continue
        keypoints = np.array(ann["keypoints"]).reshape(-1, 3)
        keypoints[(keypoints[:, 2] > 0) & (rng.random(len(keypoints)) < share)] = 0
        ann["keypoints"] = keypoints.ravel().tolist()
        ann["num_keypoints"] = int((keypoints[:, 2] > 0).sum())
