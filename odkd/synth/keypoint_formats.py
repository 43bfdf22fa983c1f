"""The synthetic people's labels in the formats of other keypoint sets (odkd/keypoint_sets): COCO's 17
points rewritten as CrowdPose's 14, as COCO-WholeBody's own file format, as AP-10K's animals and as one
21-point hand an image, so that the tests and a user try those sets on data odkd makes. The images do not
change; only what the labels say does."""

from __future__ import annotations

import numpy as np
from pycocotools import mask as mask_utils

from odkd.data.keypoints import COCO_SET, keypoint_set


def set_category(set_name: str, category_id: int = 1, name: str = "person", supercategory: str = "person") -> dict:
    """A category of a synthetic file labelled with the set `set_name`: its names and 1-based skeleton."""
    kset = keypoint_set(set_name)
    return {"supercategory": supercategory, "id": category_id, "name": name, "keypoints": list(kset.names),
            "skeleton": kset.skeleton_1based}


def _points(ann: dict) -> np.ndarray:
    return np.asarray(ann["keypoints"], np.float64).reshape(COCO_SET.num_keypoints, 3)


def _flat(points) -> list:
    return [round(float(v), 2) if i % 3 < 2 else int(v) for i, v in enumerate(np.asarray(points).reshape(-1))]


def _midpoint(kp: np.ndarray, a: int, b: int) -> np.ndarray:
    """The point halfway between COCO points a and b with the lower of their flags; unlabelled unless both are."""
    if kp[a, 2] > 0 and kp[b, 2] > 0:
        return np.r_[(kp[a, :2] + kp[b, :2]) / 2, min(kp[a, 2], kp[b, 2])]
    return np.zeros(3)


def crowd_index(annotations: list[dict]) -> float:
    """CrowdPose's crowd index of one image: over its people, the mean of (other people's labelled points
    inside the person's box) / (the person's own labelled points)."""
    points = [np.asarray(a["keypoints"], np.float64).reshape(-1, 3) for a in annotations]
    ratios = []
    for i, ann in enumerate(annotations):
        own = int((points[i][:, 2] > 0).sum())
        if own == 0:
            continue
        x, y, w, h = ann["bbox"]
        others = sum(int(((p[:, 2] > 0) & (p[:, 0] >= x) & (p[:, 0] <= x + w) & (p[:, 1] >= y)
                          & (p[:, 1] <= y + h)).sum()) for j, p in enumerate(points) if j != i)
        ratios.append(others / own)
    return float(np.mean(ratios)) if ratios else 0.0


def as_crowdpose(images: list[dict], annotations: list[dict]) -> tuple[list[dict], list[dict], list[dict]]:
    """CrowdPose's 14 points: COCO's 12 limb points, then the head (at the nose) and the neck (between the
    shoulders, where both are labelled); no 'area', as CrowdPose's files have none; each image with its
    crowdIndex, from which CrowdPose's AP easy, medium and hard are scored."""
    out = []
    for ann in annotations:
        kp = _points(ann)
        head = kp[0] if kp[0, 2] > 0 else np.zeros(3)
        points = np.vstack([kp[5:17], head, _midpoint(kp, 5, 6)])
        new = {key: value for key, value in ann.items() if key != "area"}
        new.update(keypoints=_flat(points), num_keypoints=int((points[:, 2] > 0).sum()))
        out.append(new)
    people = {}
    for ann in out:
        if not ann.get("iscrowd", 0):
            people.setdefault(ann["image_id"], []).append(ann)
    images = [{**img, "crowdIndex": round(crowd_index(people.get(img["id"], [])), 4)} for img in images]
    return images, out, [set_category("crowdpose")]


# where each foot's big toe, small toe and heel sit from its ankle, in units of the person's box height
_FOOT = ((0.03, 0.04), (-0.03, 0.04), (0.0, 0.015))


def as_coco_wholebody(images: list[dict], annotations: list[dict]) -> tuple[list[dict], list[dict], list[dict]]:
    """COCO-WholeBody's own format: the body's 17 points in 'keypoints', six foot points beside the ankles
    in 'foot_kpts' (labelled where the ankle is), and a face and hands that nobody labelled, with the
    format's validity flags."""
    out = []
    for ann in annotations:
        kp = _points(ann)
        height = float(ann["bbox"][3])
        feet = np.zeros((6, 3))
        for side, ankle in enumerate((kp[15], kp[16])):
            if ankle[2] > 0:
                for j, (dx, dy) in enumerate(_FOOT):
                    feet[3 * side + j] = (ankle[0] + dx * height, ankle[1] + dy * height, ankle[2])
        new = dict(ann)
        new.update(foot_kpts=_flat(feet), face_kpts=[0] * 204, lefthand_kpts=[0] * 63, righthand_kpts=[0] * 63,
                   foot_valid=bool(feet[:, 2].any()), face_valid=False, lefthand_valid=False,
                   righthand_valid=False)
        out.append(new)
    return images, out, [set_category("coco_wholebody")]


# AP-10K's 17 points in its order, each a COCO point's index, or a midpoint of two: the neck between the
# shoulders, the root of the tail between the hips; the ears are left out
_AP10K_FROM_COCO = (1, 2, 0, (5, 6), (11, 12), 5, 7, 9, 6, 8, 10, 11, 13, 15, 12, 14, 16)
# the synthetic animals' species, taken in turn by image id
SPECIES = ((1, "dog", "Canidae"), (2, "cat", "Felidae"))


def as_ap10k(images: list[dict], annotations: list[dict]) -> tuple[list[dict], list[dict], list[dict]]:
    """AP-10K's 17 points: the body's points re-labelled as an animal's (eyes, nose, neck, root of tail,
    then each leg: shoulder or hip, elbow or knee, paw), every person of an image one species, the species
    alternating by image, so that a file holds two categories with the set's points."""
    out = []
    for ann in annotations:
        kp = _points(ann)
        points = np.array([_midpoint(kp, *source) if isinstance(source, tuple) else kp[source]
                           for source in _AP10K_FROM_COCO])
        species_id = SPECIES[ann["image_id"] % len(SPECIES)][0]
        out.append({**ann, "category_id": species_id, "keypoints": _flat(points),
                    "num_keypoints": int((points[:, 2] > 0).sum())})
    categories = [set_category("ap10k", species_id, name, family) for species_id, name, family in SPECIES]
    return images, out, categories


# The generator paints a hand as a capsule that continues the forearm past the wrist, as long against the
# forearm as body.py's mean hand against its mean forearm, and about a third as wide as long on each side.
HAND_PER_FOREARM = 0.065 / 0.15
HAND_HALF_WIDTH = 0.35
# hand21's points past the wrist, (along the hand, across it toward the thumb) in hand lengths: the thumb
# from its base, then each finger, base to tip, side by side
_THUMB = ((0.1, 0.14), (0.22, 0.22), (0.34, 0.28), (0.45, 0.32))
_FINGERS = ((0.2, 0.93), (0.07, 1.0), (-0.07, 0.95), (-0.2, 0.82))  # (across, tip along): fore, middle, ring, pinky
_FINGER_BASE = 0.45
HAND_LAYOUT = np.array([(0.0, 0.0), *_THUMB, *((_FINGER_BASE + (tip - _FINGER_BASE) * j / 3, across)
                                              for across, tip in _FINGERS for j in range(4))])
# COCO's (elbow, wrist) of the person's left and right arm, and the side the thumb lies on
_ARMS = ((7, 9, 1.0), (8, 10, -1.0))


def _hand_points(elbow: np.ndarray, wrist: np.ndarray, thumb_side: float) -> np.ndarray:
    """hand21's 21 points (21, 2) laid over the painted hand past `wrist`, away from `elbow`."""
    forearm = wrist - elbow
    along = forearm * HAND_PER_FOREARM
    across = thumb_side * np.array([-along[1], along[0]])
    return wrist + HAND_LAYOUT[:, :1] * along + HAND_LAYOUT[:, 1:] * across


def _mask_in_box(ann: dict, box: list[float], width: int, height: int) -> dict:
    """The person's mask inside `box` as compressed RLE: what of the person shows in the hand's box."""
    mask = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(ann["segmentation"], height, width)))
    x0, y0 = int(box[0]), int(box[1])
    x1, y1 = int(np.ceil(box[0] + box[2])), int(np.ceil(box[1] + box[3]))
    inside = np.zeros_like(mask)
    inside[y0:y1, x0:x1] = mask[y0:y1, x0:x1]
    rle = mask_utils.encode(np.asfortranarray(inside))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def _hand_annotation(ann: dict, image: dict, elbow: int, wrist: int, thumb_side: float) -> dict:
    """The person's hand past COCO point `wrist`, with the wrist's flag on every point inside the image."""
    kp = _points(ann)
    width, height = image["width"], image["height"]
    xy = _hand_points(kp[elbow, :2], kp[wrist, :2], thumb_side)
    inside = (xy[:, 0] >= 0) & (xy[:, 0] <= width - 1) & (xy[:, 1] >= 0) & (xy[:, 1] <= height - 1)
    points = np.where(inside[:, None], np.c_[xy, np.full(len(xy), kp[wrist, 2])], 0.0)
    pad = HAND_HALF_WIDTH * HAND_PER_FOREARM * np.linalg.norm(kp[wrist, :2] - kp[elbow, :2])
    x0, y0 = np.maximum(xy.min(axis=0) - pad, 0)
    x1, y1 = np.minimum(xy.max(axis=0) + pad, [width, height])
    box = [round(float(x0), 2), round(float(y0), 2), round(float(x1 - x0), 2), round(float(y1 - y0), 2)]
    return {**ann, "keypoints": _flat(points), "num_keypoints": int(inside.sum()), "bbox": box,
            "area": round(box[2] * box[3], 2), "segmentation": _mask_in_box(ann, box, width, height)}


def as_hand21(images: list[dict], annotations: list[dict]) -> tuple[list[dict], list[dict], list[dict]]:
    """One hand an image, hand21's 21 points (OneHand10K's): the hand past the longest labelled forearm of
    the image (the least foreshortened), drawn from that elbow and wrist over the hand the generator
    painted (it paints no fingers); its box is the points' with the hand's half-width around them, its mask
    the person's inside the box. An image where no forearm is labelled has no hand; crowd regions are left
    out."""
    longest: dict[int, tuple] = {}  # image id -> (forearm length, annotation, elbow, wrist, thumb side)
    for ann in annotations:
        if ann.get("iscrowd", 0):
            continue
        kp = _points(ann)
        for elbow, wrist, side in _ARMS:
            length = float(np.linalg.norm(kp[wrist, :2] - kp[elbow, :2]))
            if kp[elbow, 2] > 0 and kp[wrist, 2] > 0 and length > longest.get(ann["image_id"], (0.0,))[0]:
                longest[ann["image_id"]] = (length, ann, elbow, wrist, side)
    by_id = {image["id"]: image for image in images}
    hands = [_hand_annotation(ann, by_id[image_id], elbow, wrist, side)
             for image_id, (_, ann, elbow, wrist, side) in sorted(longest.items())]
    return images, hands, [set_category("hand21", name="hand", supercategory="hand")]


# the sets `odkd synth --keypoints` writes, and how
FORMATS = {"coco": None, "crowdpose": as_crowdpose, "coco_wholebody": as_coco_wholebody, "ap10k": as_ap10k,
           "hand21": as_hand21}
# the sets whose instances are the people an imitated person detector boxes: those with an unlabelled split
PERSON_FORMATS = ("coco", "crowdpose", "coco_wholebody")
