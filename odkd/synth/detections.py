"""What a real person detector would report on a synthetic image: the boxes of a COCO detections file
(the input of top-down pose estimation on images nobody labelled), drawn around the true people with
a detector's errors: loose boxes, spread scores, missed people and boxes on the background."""

from __future__ import annotations

import math

import numpy as np

# How hard a person is to detect, after the Caltech pedestrian benchmark's bands: "near" people are
# 80 px tall or more and "far" ones 30 px or less; heavy occlusion starts when 35% of the body is hidden.
EASY_HEIGHT = 80.0
HARD_HEIGHT = 30.0
# the share of the 17 keypoints not seen (v != 2) from which a person counts as occluded at all; a back
# view hides the face's five joints (0.29) and is no harder to detect, a person showing a limb or two is
# fully hard from HARD_HIDDEN on
EASY_HIDDEN = 0.35
HARD_HIDDEN = 0.8

# A detector's box is off by a few percent of the true one (COCO detectors reach AP50 near 0.9 but AP75
# near 0.6 on people): centre shift and log-size noise as fractions of the box, doubled for a hard person.
BOX_SHIFT = 0.03
BOX_LOG_SIZE = 0.05
# Misses: a few percent of the easy people, as a detector at a working threshold recalls ~95% of
# unoccluded pedestrians; a third of the hardest, as its recall on far or heavily occluded ones falls.
EASY_MISS = 0.03
HARD_MISS = 0.35
# Scores as logits: an easy person mostly scores 0.73-0.99 (logit 3 +- 2 sd), a hard one centres on
# 0.5, so a min_score of 0.5 keeps most people and drops about half the hardest.
PERSON_LOGIT = 3.0
HARD_LOGIT_DROP = 3.0
LOGIT_SPREAD = 1.0
# Background boxes: one per image on average, mostly low (logit -2 +- 1.2: one in twenty above 0.5),
# as a detector's results file keeps its low-scoring boxes for the AP ranking.
FALSE_POSITIVES_PER_IMAGE = 1.0
FALSE_POSITIVE_LOGIT = -2.0
FALSE_POSITIVE_SPREAD = 1.2
# a background box is person-shaped (height / width 1.5 to 3.5), 15% to 60% of the image's height, and
# overlaps no true person by more than this IoU (a box there would be a loose hit, not a false alarm)
FALSE_POSITIVE_HEIGHT = (0.15, 0.6)
FALSE_POSITIVE_ASPECT = (1.5, 3.5)
FALSE_POSITIVE_MAX_IOU = 0.3
FALSE_POSITIVE_TRIES = 10
MIN_BOX_SIDE = 2.0  # a box clipped by the image frame to thinner than this is no detection


def imitate_person_detector(rng: np.random.Generator, image: dict, annotations: list[dict]) -> list[dict]:
    """COCO detection results ({image_id, category_id 1, bbox, score}) for one image, highest score first.

    `image` is its COCO image entry; `annotations` are its true annotations. Each person (iscrowd 0) is
    missed, or found with a jittered box and a score, the more likely missed, the looser and the lower
    the smaller and more occluded it is; crowd regions are not detected, as COCOeval ignores boxes
    on them. Boxes are clipped to the image, as a detector's are.
    """
    width, height = image["width"], image["height"]
    people = [a for a in annotations if not a["iscrowd"]]
    detections = []
    for ann in people:
        hardness = detection_hardness(ann)
        if rng.random() < EASY_MISS + (HARD_MISS - EASY_MISS) * hardness:
            continue
        x, y, w, h = ann["bbox"]
        loose = 1.0 + hardness
        cx, cy = x + w / 2 + rng.normal(0, BOX_SHIFT * loose) * w, y + h / 2 + rng.normal(0, BOX_SHIFT * loose) * h
        w, h = w * math.exp(rng.normal(0, BOX_LOG_SIZE * loose)), h * math.exp(rng.normal(0, BOX_LOG_SIZE * loose))
        logit = PERSON_LOGIT - HARD_LOGIT_DROP * hardness + rng.normal(0, LOGIT_SPREAD)
        detections.append(_detection(image["id"], (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2), logit,
                                     width, height))
    boxes = [a["bbox"] for a in people]
    for _ in range(rng.poisson(FALSE_POSITIVES_PER_IMAGE)):
        corners = _background_box(rng, width, height, boxes)
        if corners is not None:
            logit = rng.normal(FALSE_POSITIVE_LOGIT, FALSE_POSITIVE_SPREAD)
            detections.append(_detection(image["id"], corners, logit, width, height))
    detections = [d for d in detections if d is not None]
    return sorted(detections, key=lambda d: -d["score"])


def detection_hardness(ann: dict) -> float:
    """0 for a tall, fully seen person, 1 for a far or heavily occluded one: the larger of the two."""
    small = (EASY_HEIGHT - ann["bbox"][3]) / (EASY_HEIGHT - HARD_HEIGHT)
    hidden = 1.0 - sum(v == 2 for v in ann["keypoints"][2::3]) / 17
    occluded = (hidden - EASY_HIDDEN) / (HARD_HIDDEN - EASY_HIDDEN)
    return float(np.clip(max(small, occluded), 0.0, 1.0))


def _box_iou(a, b) -> float:
    """IoU of two [x, y, w, h] boxes."""
    ix = max(0.0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = a[2] * a[3] + b[2] * b[3] - inter
    return inter / union if union > 0 else 0.0


def _background_box(rng: np.random.Generator, width: int, height: int, people: list) -> tuple | None:
    """Corners of a person-shaped box inside the image away from every person; None if none was found."""
    for _ in range(FALSE_POSITIVE_TRIES):
        h = rng.uniform(*FALSE_POSITIVE_HEIGHT) * height
        w = min(h / rng.uniform(*FALSE_POSITIVE_ASPECT), float(width))
        x, y = rng.uniform(0, width - w), rng.uniform(0, height - h)
        if all(_box_iou((x, y, w, h), p) <= FALSE_POSITIVE_MAX_IOU for p in people):
            return x, y, x + w, y + h
    return None


def _detection(image_id: int, corners, logit: float, width: int, height: int) -> dict | None:
    """One COCO result from box corners clipped to the image, in hundredths of a pixel; None if too thin."""
    x0, y0 = round(min(max(corners[0], 0.0), width), 2), round(min(max(corners[1], 0.0), height), 2)
    x1, y1 = round(min(max(corners[2], 0.0), width), 2), round(min(max(corners[3], 0.0), height), 2)
    if x1 - x0 < MIN_BOX_SIDE or y1 - y0 < MIN_BOX_SIDE:
        return None
    score = max(round(1.0 / (1.0 + math.exp(-logit)), 4), 1e-4)  # a result file's score is never 0
    return {"image_id": image_id, "category_id": 1, "bbox": [x0, y0, round(x1 - x0, 2), round(y1 - y0, 2)],
            "score": score}
