"""The synthetic people's labels in the formats of other keypoint sets (odkd/keypoint_sets): COCO's 17
points rewritten as CrowdPose's 14 and as COCO-WholeBody's own file format, so that the tests and a user
try those sets on data odkd makes. The images do not change; only what the labels say does."""

from __future__ import annotations

import numpy as np

from odkd.data.keypoints import COCO_SET, keypoint_set


def person_category(set_name: str) -> dict:
    """The one category of a synthetic file labelled with the set `set_name`: its names and 1-based skeleton."""
    kset = keypoint_set(set_name)
    return {"supercategory": "person", "id": 1, "name": "person", "keypoints": list(kset.names),
            "skeleton": kset.skeleton_1based}


def _points(ann: dict) -> np.ndarray:
    return np.asarray(ann["keypoints"], np.float64).reshape(COCO_SET.num_keypoints, 3)


def _flat(points) -> list:
    return [round(float(v), 2) if i % 3 < 2 else int(v) for i, v in enumerate(np.asarray(points).reshape(-1))]


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


def as_crowdpose(images: list[dict], annotations: list[dict]) -> tuple[list[dict], list[dict], dict]:
    """CrowdPose's 14 points: COCO's 12 limb points, then the head (at the nose) and the neck (between the
    shoulders, where both are labelled); no 'area', as CrowdPose's files have none; each image with its
    crowdIndex, from which CrowdPose's AP easy, medium and hard are scored."""
    out = []
    for ann in annotations:
        kp = _points(ann)
        head = kp[0] if kp[0, 2] > 0 else np.zeros(3)
        both = kp[5, 2] > 0 and kp[6, 2] > 0
        neck = np.r_[(kp[5, :2] + kp[6, :2]) / 2, min(kp[5, 2], kp[6, 2])] if both else np.zeros(3)
        points = np.vstack([kp[5:17], head, neck])
        new = {key: value for key, value in ann.items() if key != "area"}
        new.update(keypoints=_flat(points), num_keypoints=int((points[:, 2] > 0).sum()))
        out.append(new)
    people = {}
    for ann in out:
        if not ann.get("iscrowd", 0):
            people.setdefault(ann["image_id"], []).append(ann)
    images = [{**img, "crowdIndex": round(crowd_index(people.get(img["id"], [])), 4)} for img in images]
    return images, out, person_category("crowdpose")


# where each foot's big toe, small toe and heel sit from its ankle, in units of the person's box height
_FOOT = ((0.03, 0.04), (-0.03, 0.04), (0.0, 0.015))


def as_coco_wholebody(images: list[dict], annotations: list[dict]) -> tuple[list[dict], list[dict], dict]:
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
    return images, out, person_category("coco_wholebody")


# the sets `odkd synth --keypoints` writes, and how
FORMATS = {"coco": None, "crowdpose": as_crowdpose, "coco_wholebody": as_coco_wholebody}
