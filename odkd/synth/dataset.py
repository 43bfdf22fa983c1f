"""A synthetic person-keypoint dataset in exact COCO 2017 format: the offline stand-in for COCO.

Each person is a 3D body (the 17 COCO joints with joint-angle limits and body proportions, plus
volumes for torso, limbs, head and hair) seen from any side, projected orthographically and
painted part by part, far to near. Left and right, self-occlusion and occlusion by other people
or by clutter therefore come out of the rendering itself. Keypoint flags, visible masks,
polygons and boxes are all read off the label maps that painted the image, so the labels agree
with the pixels.

A difficulty in [0, 1] sets how crowded, occluded, small and cluttered the scenes are; 0.5
("medium") is the default.

The labels are exact unless label_noise is set: then the train split's keypoints carry annotator
noise like COCO's, whose per-keypoint sigmas were measured from how far annotators' clicks fall
apart. missing_labels leaves a share of the train split's keypoints unlabelled, as COCO leaves the
joints its annotators skipped. Val and test stay exact and complete, so a model is scored against
where the joints are.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, fields, replace
from pathlib import Path

import cv2
import numpy as np
from pycocotools import mask as mask_utils
from tqdm import tqdm

from odkd.data.keypoints import COCO_SIGMAS, KEYPOINT_NAMES, SKELETON
from odkd.errors import OdkdError

PERSON_CATEGORY = {
    "supercategory": "person",
    "id": 1,
    "name": "person",
    "keypoints": list(KEYPOINT_NAMES),
    "skeleton": [list(pair) for pair in SKELETON],
}
LICENSE = {"url": "https://creativecommons.org/publicdomain/zero/1.0/", "id": 1, "name": "CC0 1.0"}
SPLITS = ("train", "val", "test")  # also the seed stream of each: test never shifts train or val
JPEG_QUALITY = 90

# Body parts: the values painted into a person's label map.
(TORSO, NECK, HEAD, HAIR, L_UPPER_ARM, L_FOREARM, L_HAND, R_UPPER_ARM, R_FOREARM, R_HAND,
 L_THIGH, L_SHIN, L_FOOT, R_THIGH, R_SHIN, R_FOOT) = range(1, 17)
N_PARTS = 17  # label 0 is "not this person"

# The parts a keypoint may be seen on; anything else painted over it occludes it (v=1).
KEYPOINT_PARTS = (
    (HEAD,), (HEAD,), (HEAD,), (HEAD, HAIR), (HEAD, HAIR),
    (TORSO, L_UPPER_ARM), (TORSO, R_UPPER_ARM), (L_UPPER_ARM, L_FOREARM), (R_UPPER_ARM, R_FOREARM),
    (L_FOREARM, L_HAND), (R_FOREARM, R_HAND), (TORSO, L_THIGH), (TORSO, R_THIGH),
    (L_THIGH, L_SHIN), (R_THIGH, R_SHIN), (L_SHIN, L_FOOT), (R_SHIN, R_FOOT),
)
FACE = np.arange(5)
SHOULDERS_AND_HIPS = np.array([5, 6, 11, 12])
# (side: +1 the person's left, joints root/middle/end, parts upper/lower/extremity)
ARM_CHAINS = (
    (1.0, (5, 7, 9), (L_UPPER_ARM, L_FOREARM, L_HAND)),
    (-1.0, (6, 8, 10), (R_UPPER_ARM, R_FOREARM, R_HAND)),
)
LEG_CHAINS = (
    (1.0, (11, 13, 15), (L_THIGH, L_SHIN, L_FOOT)),
    (-1.0, (12, 14, 16), (R_THIGH, R_SHIN, R_FOOT)),
)

# Materials: which colour/texture paints a part.
SKIN, TOP, BOTTOM, SHOES, HAIR_MAT = range(5)
SKIN_TONES_BGR = np.array(
    [[197, 224, 255], [160, 200, 241], [125, 173, 224], [99, 145, 198], [68, 110, 170],
     [52, 85, 141], [40, 62, 101], [30, 45, 70]], np.float32,
)
HAIR_BGR = np.array(
    [[20, 20, 20], [25, 40, 60], [40, 70, 110], [80, 150, 200], [150, 150, 150], [30, 50, 140]],
    np.float32,
)

# Joint-angle limits in degrees: (flexion, abduction, internal twist, elbow/knee bend).
ARM_LIMITS = np.array([[-45, 175], [0, 110], [-40, 90], [0, 150]], np.float64)
LEG_LIMITS = np.array([[-35, 125], [-12, 45], [-20, 20], [0, 150]], np.float64)
# (forward lean, side bend, twist, head yaw, head pitch)
TRUNK_LIMITS = np.array([[-15, 50], [-20, 20], [-35, 35], [-60, 60], [-30, 35]], np.float64)

MIN_PART_AREA = 6.0  # visible fragments smaller than this many pixels get no polygon
MIN_CROWD_AREA = 40


@dataclass(frozen=True)
class Scene:
    """What makes a scene hard: crowding, person size, occluders and background clutter."""

    crowd_prob: float  # an unannotated iscrowd group behind the people
    people_probs: tuple[float, float, float, float, float]  # P(1, 2, 3, 4, 5 annotated people)
    height_range: tuple[float, float]  # standing height / image height, log-uniform
    pelvis_x: tuple[float, float]  # where a person stands, as fractions of the image's width
    pelvis_y: tuple[float, float]  # and height: the nearer the middle, the less is cut off by the frame
    out_of_frame_prob: float  # a person of whom only a limb or two shows
    occluder_prob: float  # poles, boxes, blobs drawn over someone
    occluders: tuple[int, int]  # [low, high) occluders when there are any
    clutter_shapes: tuple[int, int]  # [low, high) random background shapes
    distractors: tuple[int, int]  # [low, high) head- and limb-like background blobs


EASY = Scene(
    crowd_prob=0.0, people_probs=(0.65, 0.3, 0.05, 0.0, 0.0), height_range=(0.4, 0.8),
    pelvis_x=(0.1, 0.9), pelvis_y=(0.45, 0.6), out_of_frame_prob=0.0,
    occluder_prob=0.1, occluders=(1, 2), clutter_shapes=(2, 6), distractors=(0, 1),
)
MEDIUM = Scene(  # the default: the scenes make demo and the README's figures were measured on
    crowd_prob=0.15, people_probs=(0.22, 0.3, 0.24, 0.14, 0.1), height_range=(0.25, 0.9),
    pelvis_x=(-0.1, 1.1), pelvis_y=(0.3, 0.8), out_of_frame_prob=0.08,
    occluder_prob=0.45, occluders=(1, 3), clutter_shapes=(5, 20), distractors=(0, 4),
)
HARD = Scene(
    crowd_prob=0.3, people_probs=(0.08, 0.17, 0.25, 0.25, 0.25), height_range=(0.12, 0.7),
    pelvis_x=(0.0, 1.0), pelvis_y=(0.3, 0.8), out_of_frame_prob=0.12,
    occluder_prob=0.9, occluders=(1, 5), clutter_shapes=(15, 35), distractors=(2, 8),
)
DIFFICULTY_LEVELS = {"easy": 0.0, "medium": 0.5, "hard": 1.0}


def difficulty_value(difficulty: str | float) -> float:
    """easy, medium, hard or a number in [0, 1] (as a string too) -> the number."""
    if isinstance(difficulty, str) and difficulty in DIFFICULTY_LEVELS:
        return DIFFICULTY_LEVELS[difficulty]
    try:
        value = float(difficulty)
    except (TypeError, ValueError):
        value = math.nan
    if isinstance(difficulty, bool) or not 0.0 <= value <= 1.0:
        raise OdkdError(f"synth.difficulty: expected easy, medium, hard or a number in [0, 1], got {difficulty!r}")
    return value


def scene_for(difficulty: float) -> Scene:
    """MEDIUM at 0.5, linear toward EASY at 0 and toward HARD at 1.

    The blend is exact at its ends: at 0.5 MEDIUM's floats come out bit for bit, so a medium
    dataset draws the very same random numbers as the default always has.
    """
    end, t = (EASY, 1.0 - 2.0 * difficulty) if difficulty < 0.5 else (HARD, 2.0 * difficulty - 1.0)

    def mix(medium, other):
        if isinstance(medium, tuple):
            return tuple(mix(m, o) for m, o in zip(medium, other))
        value = medium * (1.0 - t) + other * t
        # half up, not Python's half to even: rounded [low, high) ranges never close up
        return math.floor(value + 0.5) if isinstance(medium, int) else value

    return Scene(**{f.name: mix(getattr(MEDIUM, f.name), getattr(end, f.name)) for f in fields(Scene)})


@dataclass(frozen=True)
class Body:
    """Segment sizes as fractions of the standing height (1.0)."""

    head_w: float
    head_h: float
    head_d: float
    neck: float
    torso: float
    shoulder_w: float
    hip_w: float
    upper_arm: float
    forearm: float
    hand: float
    thigh: float
    shin: float
    foot: float
    arm_r: float
    leg_r: float
    torso_bulk: float
    hair: float  # 0 bald, 1 short, up to 1.5 long


@dataclass(frozen=True)
class Pose:
    """Joint angles in degrees; row 0 of arms/legs is the person's left side."""

    trunk: np.ndarray  # (5,) see TRUNK_LIMITS
    arms: np.ndarray  # (2, 4) see ARM_LIMITS
    legs: np.ndarray  # (2, 4) see LEG_LIMITS


@dataclass(frozen=True)
class View:
    """How a body lands on the image: yaw 0 faces the camera, 90 faces image right."""

    yaw: float  # degrees
    elevation: float  # degrees
    roll: float  # degrees, in-plane rotation of the whole body
    scale: float  # pixels per standing height
    cx: float  # pelvis position in pixels
    cy: float


@dataclass(frozen=True)
class Shape:
    """A part's volume: a convex hull of points (radii None), a disc (1 point) or a capsule (2)."""

    part: int
    points: np.ndarray  # (N, 3) body coordinates (person's left, up, forward)
    radii: np.ndarray | None
    depth_bias: float  # breaks near-ties the way bodies overlap (limbs over the torso)


@dataclass
class RenderedPerson:
    """What annotation needs from a painted person: the owner index and joint facts."""

    index: int
    joints: np.ndarray  # (17, 2) image pixels
    labelled: np.ndarray  # (17,) bool; face points turned away are never labelled
    torso_hides: np.ndarray  # (17,) bool; shoulder/hip on the torso's far side
    window: int  # half-size of the pixel window that decides visibility


def make_synthetic_dataset(
    out_dir: str | Path,
    train_images: int = 200,
    val_images: int = 50,
    seed: int = 0,
    image_size: tuple[int, int] = (320, 256),
    progress: bool = False,
    test_images: int = 0,
    difficulty: str | float = "medium",
    label_noise: float = 0.0,
    missing_labels: float = 0.0,
) -> dict:
    """Write a COCO person_keypoints dataset of synthetic people under out_dir.

    Layout: images/{train,val,test}/<12-digit id>.jpg and annotations/person_keypoints_{split}.json;
    the test split only when test_images > 0. Image and annotation ids run on across the splits.
    image_size is (width, height); each image varies within +-20% of it. difficulty is easy (0),
    medium (0.5), hard (1) or a number between; a non-medium one is recorded as info.difficulty.
    label_noise > 0 moves the train split's labelled keypoints as annotators would (see
    add_annotator_noise) and is recorded in its info.label_noise; missing_labels in [0, 1) unlabels
    each of its labelled keypoints with that probability (see unlabel_keypoints), recorded in
    info.missing_labels. Neither changes an image or another split.
    The same arguments give byte-identical files, and train and val do not depend on test_images.
    Returns {split: {"images", "annotations", "crowd_annotations"}}.
    """
    for name, value in (("train_images", train_images), ("val_images", val_images),
                        ("test_images", test_images), ("seed", seed)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 0:
            raise OdkdError(f"synth.{name}: expected an integer >= 0, got {value!r}")
    level = difficulty_value(difficulty)
    scene = scene_for(level)
    if isinstance(label_noise, bool) or not isinstance(label_noise, (int, float)) or not 0 <= label_noise <= 5:
        raise OdkdError(f"synth.label_noise: expected a number in [0, 5] (COCO's annotator noise is 1), "
                        f"got {label_noise!r}")
    if isinstance(missing_labels, bool) or not isinstance(missing_labels, (int, float)) or not 0 <= missing_labels < 1:
        raise OdkdError(f"synth.missing_labels: expected a share in [0, 1) of the train keypoints to leave "
                        f"unlabelled, got {missing_labels!r}")
    if len(image_size) != 2 or min(image_size) < 32:
        raise OdkdError(f"synth image_size: expected (width, height) both >= 32, got {image_size!r}")
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise OdkdError(f"{out_dir}: synthetic dataset directory is an existing file")

    counts = {"train": train_images, "val": val_images, "test": test_images}
    summary = {}
    next_image_id, next_ann_id = 1, 1
    for split_no, split in enumerate(SPLITS):
        if split == "test" and not test_images:
            continue  # no empty test files: a train/val dataset is the same bytes with or without this split
        image_dir = out_dir / "images" / split
        ann_path = out_dir / "annotations" / f"person_keypoints_{split}.json"
        image_dir.mkdir(parents=True, exist_ok=True)
        ann_path.parent.mkdir(parents=True, exist_ok=True)
        images, annotations = [], []
        noise, missing = (float(label_noise), float(missing_labels)) if split == "train" else (0.0, 0.0)
        for i in tqdm(range(counts[split]), desc=f"synth {split}", disable=not progress):
            rng = np.random.default_rng([seed, split_no, i])
            width = int(round(image_size[0] * rng.uniform(0.8, 1.2)))
            height = int(round(image_size[1] * rng.uniform(0.8, 1.2)))
            image, anns = render_image(rng, width, height, scene)
            if noise:
                # its own stream, so the noise leaves every image and every other label as they were
                add_annotator_noise(np.random.default_rng([seed, split_no, i, 1]), anns, noise, width, height)
            if missing:
                unlabel_keypoints(np.random.default_rng([seed, split_no, i, 2]), anns, missing)
            file_name = f"{next_image_id:012d}.jpg"
            if not cv2.imwrite(str(image_dir / file_name), image, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY]):
                raise OdkdError(f"{image_dir / file_name}: could not write the JPEG")
            images.append(_image_entry(next_image_id, file_name, width, height))
            for ann in anns:
                annotations.append({**ann, "image_id": next_image_id, "category_id": 1, "id": next_ann_id})
                next_ann_id += 1
            next_image_id += 1
        info = {
            "description": f"odkd synthetic person keypoints, COCO 2017 format (seed {seed})",
            "url": "",
            "version": "1.0",
            "year": 2017,
            "contributor": "odkd",
            "date_created": "",
        }
        if level != DIFFICULTY_LEVELS["medium"]:
            info["difficulty"] = level
        if noise:
            info["label_noise"] = noise
        if missing:
            info["missing_labels"] = missing
        dataset = {
            "info": info,
            "licenses": [LICENSE],
            "images": images,
            "annotations": annotations,
            "categories": [PERSON_CATEGORY],
        }
        tmp = ann_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(dataset, separators=(",", ":")))
        os.replace(tmp, ann_path)
        summary[split] = {
            "images": len(images),
            "annotations": len(annotations),
            "crowd_annotations": sum(a["iscrowd"] for a in annotations),
        }
    return summary


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


def _image_entry(image_id: int, file_name: str, width: int, height: int) -> dict:
    return {
        "license": 1,
        "file_name": file_name,
        "coco_url": "",
        "height": height,
        "width": width,
        "date_captured": "",
        "flickr_url": "",
        "id": image_id,
    }


# ---------------------------------------------------------------- body model


def sample_body(rng: np.random.Generator) -> Body:
    """Adult or child proportions, each segment jittered, clothing bulk varied."""
    child = rng.random() < 0.15
    head = 1.2 if child else 1.0
    limbs = 0.92 if child else 1.0
    style = rng.random()
    hair = 0.0 if style < 0.06 else 1.0 if style < 0.7 else float(rng.uniform(1.1, 1.5))

    def j(value: float, spread: float = 0.08) -> float:
        return float(value * rng.uniform(1 - spread, 1 + spread))

    return Body(
        head_w=j(0.046 * head), head_h=j(0.063 * head), head_d=j(0.056 * head), neck=j(0.035),
        torso=j(0.29), shoulder_w=j(0.215), hip_w=j(0.12), upper_arm=j(0.17 * limbs),
        forearm=j(0.15 * limbs), hand=j(0.065), thigh=j(0.24 * limbs), shin=j(0.24 * limbs),
        foot=j(0.13), arm_r=j(1.0, 0.2), leg_r=j(1.0, 0.2), torso_bulk=j(1.0, 0.2),
        hair=hair,
    )


def sample_pose(rng: np.random.Generator) -> Pose:
    """A pose from one of several activities, clipped to the joint limits."""
    u = rng.uniform
    trunk = np.array([u(-5, 10), u(-5, 5), u(-15, 15), u(-45, 45), u(-15, 20)])
    arms = np.array([[u(-15, 20), u(3, 25), u(-10, 30), u(0, 50)] for _ in range(2)])
    legs = np.array([[u(-8, 8), u(0, 12), u(-10, 10), u(0, 15)] for _ in range(2)])
    activity = rng.choice(["stand", "walk", "run", "sit", "arms_up", "crouch", "free"],
                          p=[0.2, 0.2, 0.1, 0.1, 0.12, 0.08, 0.2])
    if activity == "walk" or activity == "run":
        swing = u(10, 35) if activity == "walk" else u(30, 60)
        lead = rng.choice([-1.0, 1.0])
        arms[:, 0] = [lead * swing, -lead * swing * u(0.6, 1.0)]
        legs[:, 0] = [-lead * swing * 0.8, lead * swing]
        if activity == "run":
            trunk[0] = u(5, 25)
            arms[:, 3] = u(60, 110, 2)
            legs[:, 3] = [u(40, 110), u(20, 80)] if lead > 0 else [u(20, 80), u(40, 110)]
        else:
            legs[:, 3] = u(0, 35, 2)
    elif activity == "sit":
        legs[:] = [[u(70, 105), u(0, 25), u(-10, 10), u(70, 110)] for _ in range(2)]
        arms[:, 0], arms[:, 3] = u(-10, 60, 2), u(20, 120, 2)
    elif activity == "arms_up":
        for side in range(2) if rng.random() < 0.6 else [rng.integers(2)]:
            if rng.random() < 0.5:
                arms[side] = [u(110, 175), u(0, 40), u(-20, 40), u(0, 60)]
            else:
                arms[side] = [u(-10, 30), u(70, 110), u(-30, 60), u(0, 100)]
    elif activity == "crouch":
        trunk[0] = u(20, 50)
        legs[:] = [[u(60, 110), u(5, 35), u(-10, 10), u(100, 150)] for _ in range(2)]
        arms[:, 0], arms[:, 3] = u(0, 90, 2), u(30, 120, 2)
    elif activity == "free":
        arms = np.array([[u(lo, hi) for lo, hi in ARM_LIMITS] for _ in range(2)])
        legs[:, 0], legs[:, 1], legs[:, 3] = u(-30, 90, 2), u(-10, 40, 2), u(0, 100, 2)
    if rng.random() < 0.15:  # hands on hips
        arms[:] = [[u(-10, 10), u(30, 50), u(60, 90), u(90, 130)] for _ in range(2)]
    return Pose(
        trunk=np.clip(trunk, TRUNK_LIMITS[:, 0], TRUNK_LIMITS[:, 1]),
        arms=np.clip(arms, ARM_LIMITS[:, 0], ARM_LIMITS[:, 1]),
        legs=np.clip(legs, LEG_LIMITS[:, 0], LEG_LIMITS[:, 1]),
    )


def _rot_left(a: float) -> np.ndarray:
    """About the person's left axis; positive turns 'down' toward 'forward'."""
    c, s = np.cos(a), np.sin(a)
    return np.array([[1, 0, 0], [0, c, s], [0, -s, c]])


def _rot_up(a: float) -> np.ndarray:
    """About the up axis; positive turns 'forward' toward the person's left."""
    c, s = np.cos(a), np.sin(a)
    return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])


def _rot_forward(a: float) -> np.ndarray:
    """About the forward axis; positive turns 'down' toward the person's left."""
    c, s = np.cos(a), np.sin(a)
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])


def _twist(v: np.ndarray, axis: np.ndarray, a: float) -> np.ndarray:
    """v rotated about the unit axis by a (Rodrigues)."""
    return v * np.cos(a) + np.cross(axis, v) * np.sin(a) + axis * (axis @ v) * (1 - np.cos(a))


def _ellipsoid(centre: np.ndarray, frame: np.ndarray, axes: tuple[float, float, float]) -> np.ndarray:
    """Points on an ellipsoid whose projected convex hull is its silhouette."""
    t = np.linspace(0, 2 * np.pi, 12, endpoint=False)
    rings = [(np.sqrt(1 - s * s) * np.cos(t), np.full_like(t, s), np.sqrt(1 - s * s) * np.sin(t))
             for s in (-0.7, 0.0, 0.7)]
    unit = np.concatenate([np.stack(r, 1) for r in rings] + [np.array([[0, 1, 0], [0, -1, 0]])])
    return centre + (unit * np.asarray(axes)) @ frame.T


def body_geometry(body: Body, pose: Pose) -> tuple[np.ndarray, list[Shape], np.ndarray]:
    """Joints (17, 3) in body coordinates (left, up, forward; pelvis at 0), part volumes, head centre."""
    lean, bend, twist, head_yaw, head_pitch = np.radians(pose.trunk)
    chest = _rot_left(-lean) @ _rot_forward(-bend) @ _rot_up(twist)
    head = chest @ _rot_up(head_yaw) @ _rot_left(-head_pitch)
    b = body
    joints = np.zeros((17, 3))
    neck_base = chest @ [0, b.torso + 0.02, 0]
    neck_top = neck_base + head @ [0, b.neck, 0]
    head_centre = neck_top + head @ [0, b.head_h * 0.85, 0]
    hw, hh, hd = b.head_w, b.head_h, b.head_d
    face = [[0, -0.25 * hh, 0.9 * hd], [0.38 * hw, 0.08 * hh, 0.78 * hd], [-0.38 * hw, 0.08 * hh, 0.78 * hd],
            [0.95 * hw, 0, -0.1 * hd], [-0.95 * hw, 0, -0.1 * hd]]
    joints[:5] = head_centre + np.array(face) @ head.T
    arm_r = np.array([0.033, 0.027, 0.022]) * b.arm_r
    leg_r = np.array([0.052, 0.038, 0.027]) * b.leg_r
    shapes = [
        Shape(HEAD, _ellipsoid(head_centre, head, (hw, hh, hd)), None, -0.004),
        Shape(NECK, np.array([neck_base, neck_top + head @ [0, 0.3 * hh, 0]]), np.full(2, 0.024 * b.arm_r),
              0.05),
        Shape(HEAD, joints[3:4], np.array([0.22 * hw]), -0.002),
        Shape(HEAD, joints[4:5], np.array([0.22 * hw]), -0.002),
    ]
    if b.hair:  # long hair hangs lower and further back, over the nape
        hair_centre = head_centre + head @ [0, (1.12 - 0.92 * b.hair) * hh, -0.3 * hd]
        hair_axes = (1.06 * hw, 0.92 * b.hair * hh, (1.0 + 0.1 * (b.hair - 1)) * hd)
        shapes.append(Shape(HAIR, _ellipsoid(hair_centre, head, hair_axes), None, 0.0))
    for side_no, (side, (j0, j1, j2), parts) in enumerate(ARM_CHAINS):
        upper, fore, _ = _limb_directions(pose.arms[side_no], side, np.array([0.0, 0.0, 1.0]))
        joints[j0] = chest @ [side * b.shoulder_w / 2, b.torso, 0]
        joints[j1] = joints[j0] + chest @ upper * b.upper_arm
        joints[j2] = joints[j1] + chest @ fore * b.forearm
        hand = np.array([joints[j2], joints[j2] + chest @ fore * b.hand])
        shapes += [
            Shape(parts[0], joints[[j0, j1]], arm_r[[0, 1]], -0.01),
            Shape(parts[1], joints[[j1, j2]], arm_r[[1, 2]], -0.011),
            Shape(parts[2], hand, np.array([1.15, 0.9]) * arm_r[2], -0.012),
        ]
    for side_no, (side, (j0, j1, j2), parts) in enumerate(LEG_CHAINS):
        thigh, shin, toe_dir = _limb_directions(pose.legs[side_no], side, np.array([0.0, 0.0, -1.0]))
        joints[j0] = [side * b.hip_w / 2, 0, 0]
        joints[j1] = joints[j0] + thigh * b.thigh
        joints[j2] = joints[j1] + shin * b.shin
        foot = joints[j2] + np.array([shin * 0.02 - toe_dir * 0.025, shin * 0.03 + toe_dir * b.foot * 0.8])
        shapes += [
            Shape(parts[0], joints[[j0, j1]], leg_r[[0, 1]], -0.008),
            Shape(parts[1], joints[[j1, j2]], leg_r[[1, 2]], -0.009),
            Shape(parts[2], foot, np.array([0.8, 0.65]) * leg_r[2], -0.01),
        ]
    shapes.append(Shape(TORSO, _torso_points(b, chest), None, 0.0))
    return joints, shapes, head_centre


def _limb_directions(angles: np.ndarray, side: float, bend_toward: np.ndarray):
    """Unit directions of a limb's upper and lower segment and the lower one's outward normal.

    angles are (flexion, abduction, internal twist, bend) in degrees; the middle joint bends the
    lower segment toward bend_toward (forward for elbows, backward for knees), twisted inward.
    """
    flex, abduct, inward, bend = np.radians(angles)
    frame = _rot_left(flex) @ _rot_forward(side * abduct)
    upper = frame @ [0.0, -1.0, 0.0]
    toward = _twist(frame @ bend_toward, upper, side * inward)
    lower = np.cos(bend) * upper + np.sin(bend) * toward
    return upper, lower, np.sin(bend) * upper - np.cos(bend) * toward


def _torso_points(b: Body, chest: np.ndarray) -> np.ndarray:
    """Elliptic cross-sections from hips to neck; their hull is the torso from any side."""
    t = np.linspace(0, 2 * np.pi, 10, endpoint=False)
    ring = np.stack([np.cos(t), np.zeros_like(t), np.sin(t)], 1)
    hip_half = (b.hip_w / 2 + 0.045 * b.leg_r) * b.torso_bulk
    half_sw = b.shoulder_w / 2
    sections = [  # (frame, height, half width, half depth)
        (np.eye(3), -0.03, hip_half, 0.75 * hip_half),
        (chest, 0.45 * b.torso, 0.8 * half_sw * b.torso_bulk, 0.5 * half_sw * b.torso_bulk),
        (chest, 0.8 * b.torso, (half_sw + 0.015) * b.torso_bulk, 0.5 * half_sw * b.torso_bulk),
        (chest, b.torso + 0.01, half_sw + 0.01, 0.4 * half_sw),
        (chest, b.torso + 0.04, 0.6 * half_sw, 0.5 * half_sw),
    ]
    return np.concatenate([(ring * [w, 0, d] + [0, y, 0]) @ frame.T for frame, y, w, d in sections])


def project(points: np.ndarray, view: View) -> tuple[np.ndarray, np.ndarray]:
    """Body coordinates (N, 3) -> image pixels (N, 2) and depth in pixels (larger is farther)."""
    yaw, elev, roll = np.radians([view.yaw, view.elevation, view.roll])
    left, up, fwd = points[:, 0], points[:, 1], points[:, 2]
    x = left * np.cos(yaw) + fwd * np.sin(yaw)
    y = -up
    z = left * np.sin(yaw) - fwd * np.cos(yaw)
    y, z = y * np.cos(elev) + z * np.sin(elev), -y * np.sin(elev) + z * np.cos(elev)
    x, y = x * np.cos(roll) - y * np.sin(roll), x * np.sin(roll) + y * np.cos(roll)
    return np.stack([x * view.scale + view.cx, y * view.scale + view.cy], 1), z * view.scale


# ---------------------------------------------------------------- appearance


def _colour(rng: np.random.Generator) -> np.ndarray:
    """A random BGR colour, sometimes muted as clothes and walls often are."""
    c = rng.uniform(15, 240, 3)
    if rng.random() < 0.4:
        c = c.mean() + (c - c.mean()) * rng.uniform(0.1, 0.5)
    return c.astype(np.float32)


def _texture(
    rng: np.random.Generator, colour: np.ndarray, height: int, width: int, period: float
) -> np.ndarray:
    """A (h, w, 3) float texture: plain, stripes, checks or blotchy noise around a colour."""
    tex = np.empty((height, width, 3), np.float32)
    tex[:] = colour
    kind = rng.choice(["plain", "stripes", "checks", "noise"], p=[0.35, 0.3, 0.1, 0.25])
    if kind in ("stripes", "checks"):
        other, angle = _colour(rng), rng.uniform(0, np.pi)
        yy, xx = np.mgrid[:height, :width].astype(np.float32)
        bands = ((xx * np.cos(angle) + yy * np.sin(angle)) / period) % 2 < 1
        if kind == "checks":
            bands ^= ((yy * np.cos(angle) - xx * np.sin(angle)) / period) % 2 < 1
        tex[bands] = other
    elif kind == "noise":
        grid = rng.uniform(0.6, 1.4, (max(2, int(height / period)), max(2, int(width / period))))
        tex *= cv2.resize(grid.astype(np.float32), (width, height), interpolation=cv2.INTER_LINEAR)[..., None]
    return tex


def _outfit(rng: np.random.Generator) -> tuple[list[np.ndarray], np.ndarray]:
    """Colours of (skin, top, bottom, shoes, hair) and the material index of every part."""
    skin = SKIN_TONES_BGR[rng.integers(len(SKIN_TONES_BGR))] * rng.uniform(0.9, 1.1)
    hair = HAIR_BGR[rng.integers(len(HAIR_BGR))] * rng.uniform(0.8, 1.2)
    colours = [skin, _colour(rng), _colour(rng), _colour(rng) * 0.5, hair]
    material = np.zeros(N_PARTS, np.intp)
    material[[TORSO, L_UPPER_ARM, R_UPPER_ARM, L_FOREARM, R_FOREARM]] = TOP
    material[[L_THIGH, R_THIGH, L_SHIN, R_SHIN]] = BOTTOM
    material[[L_FOOT, R_FOOT]] = SHOES
    material[HAIR] = HAIR_MAT
    sleeves = rng.choice(["long", "short", "none"], p=[0.45, 0.4, 0.15])
    if sleeves != "long":
        material[[L_FOREARM, R_FOREARM]] = SKIN
    if sleeves == "none":
        material[[L_UPPER_ARM, R_UPPER_ARM]] = SKIN
    if rng.random() < 0.25:  # shorts
        material[[L_SHIN, R_SHIN]] = SKIN
    return colours, material


def _draw_shape(label: np.ndarray, xy: np.ndarray, radii: np.ndarray | None, value: int) -> None:
    """Fill one projected part into a label map, with 4 fractional bits of precision."""
    fixed = np.round(xy * 16).astype(np.int32)
    if radii is None:
        cv2.fillConvexPoly(label, cv2.convexHull(fixed), value, cv2.LINE_8, 4)
        return
    r = np.maximum(radii, 0.7)
    for centre, radius in zip(fixed, r):
        cv2.circle(label, tuple(int(v) for v in centre), int(round(radius * 16)), value, -1, cv2.LINE_8, 4)
    if len(xy) == 2:
        along = xy[1] - xy[0]
        normal = np.array([-along[1], along[0]]) / max(np.hypot(*along), 1e-6)
        quad = np.array([xy[0] + normal * r[0], xy[1] + normal * r[1], xy[1] - normal * r[1],
                         xy[0] - normal * r[0]])
        cv2.fillConvexPoly(label, np.round(quad * 16).astype(np.int32), value, cv2.LINE_8, 4)


def render_person(
    rng: np.random.Generator,
    image: np.ndarray,
    owner: np.ndarray,
    part_map: np.ndarray,
    index: int,
    body: Body,
    pose: Pose,
    view: View,
) -> RenderedPerson:
    """Paint one person over image (far parts first) and claim its pixels in owner/part_map."""
    joints3d, shapes, head_centre = body_geometry(body, pose)
    joints, joint_depth = project(joints3d, view)
    _, head_depth = project(head_centre[None], view)
    labelled = np.ones(17, bool)
    labelled[FACE] = joint_depth[FACE] - head_depth[0] < 0.3 * body.head_d * view.scale
    torso_depth = joint_depth[SHOULDERS_AND_HIPS].mean()
    half_span = np.array([body.shoulder_w, body.shoulder_w, body.hip_w, body.hip_w]) / 2 * view.scale
    torso_hides = np.zeros(17, bool)
    torso_hides[SHOULDERS_AND_HIPS] = joint_depth[SHOULDERS_AND_HIPS] - torso_depth > 0.6 * half_span
    window = int(np.clip(round(0.012 * view.scale), 1, 3))
    rendered = RenderedPerson(index, joints, labelled, torso_hides, window)

    projected = []
    for shape in shapes:
        xy, depth = project(shape.points, view)
        radii = None if shape.radii is None else shape.radii * view.scale
        projected.append((depth.mean() + shape.depth_bias * view.scale, xy, radii, shape.part))
    projected.sort(key=lambda item: -item[0])
    height, width = owner.shape
    lo = np.floor(np.min([xy.min(0) for _, xy, _, _ in projected], 0) - 0.1 * view.scale).astype(int)
    hi = np.ceil(np.max([xy.max(0) for _, xy, _, _ in projected], 0) + 0.1 * view.scale).astype(int)
    x0, y0 = max(lo[0], 0), max(lo[1], 0)
    x1, y1 = min(hi[0], width), min(hi[1], height)
    if x1 <= x0 or y1 <= y0:
        return rendered
    label = np.zeros((y1 - y0, x1 - x0), np.uint8)
    origin = np.array([x0, y0])
    for _, xy, radii, part in projected:
        _draw_shape(label, xy - origin, radii, part)

    colours, material = _outfit(rng)
    period = max(2.0, view.scale * rng.uniform(0.015, 0.05))
    mat = material[label]
    paint = np.zeros((*label.shape, 3), np.float32)
    for m in np.unique(mat[label > 0]):
        where = (mat == m) & (label > 0)
        if m in (SKIN, HAIR_MAT, SHOES):
            paint[where] = colours[m]
        else:
            paint[where] = _texture(rng, colours[m], *label.shape, period)[where]
    # far-side limbs in shade and dark seams where parts overlap keep limbs apart in the image
    shade = np.ones(N_PARTS, np.float32)
    for _, (_, middle, end), parts in ARM_CHAINS + LEG_CHAINS:
        for part, joint in zip(parts, (middle, end, end)):
            if joint_depth[joint] > torso_depth + 0.3 * half_span[0]:
                shade[part] = 0.78
    paint *= shade[label][..., None] * rng.uniform(0.85, 1.15)
    seam = np.zeros(label.shape, bool)
    seam[:, 1:] |= (label[:, 1:] != label[:, :-1]) & (label[:, :-1] > 0)
    seam[1:, :] |= (label[1:, :] != label[:-1, :]) & (label[:-1, :] > 0)
    paint[seam & (label > 0)] *= 0.6
    _paint_face(paint, label, joints - origin, labelled, body, view, colours[SKIN])

    mine = label > 0
    image[y0:y1, x0:x1][mine] = np.clip(paint[mine], 0, 255).astype(np.uint8)
    owner[y0:y1, x0:x1][mine] = index
    part_map[y0:y1, x0:x1][mine] = label[mine]
    return rendered


def _paint_face(paint, label, face_xy, labelled, body: Body, view: View, skin) -> None:
    """Eyes and nose where they face the camera, so the face says which way the head turns."""
    features = np.zeros(label.shape, np.uint8)
    eye_r = max(0.6, 0.16 * body.head_w * view.scale)
    for k, value, radius in ((1, 1, eye_r), (2, 1, eye_r), (0, 2, 0.8 * eye_r)):
        if labelled[k]:
            centre = tuple(int(v) for v in np.round(face_xy[k] * 16))
            cv2.circle(features, centre, int(round(radius * 16)), value, -1, cv2.LINE_8, 4)
    on_head = label == HEAD
    paint[(features == 1) & on_head] = (30, 25, 25)
    paint[(features == 2) & on_head] = skin * 0.7


# ---------------------------------------------------------------- scene


def _background(rng: np.random.Generator, width: int, height: int, scene: Scene) -> np.ndarray:
    """Gradient, floor, blotches, random shapes and person-coloured distractors."""
    yy, xx = np.mgrid[:height, :width].astype(np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    ramp = xx * np.cos(angle) + yy * np.sin(angle)
    ramp = (ramp - ramp.min()) / max(float(np.ptp(ramp)), 1.0)
    c0, c1 = _colour(rng), _colour(rng)
    bg = c0 + ramp[..., None] * (c1 - c0)
    if rng.random() < 0.5:
        horizon = int(height * rng.uniform(0.4, 0.85))
        bg[horizon:] = _texture(rng, _colour(rng), height - horizon, width, rng.uniform(4, 30))
    bg *= _texture(rng, np.ones(3, np.float32), height, width, rng.uniform(10, 60)) ** 0.5
    image = np.clip(bg, 0, 255).astype(np.uint8)
    for _ in range(rng.integers(*scene.clutter_shapes)):
        size = rng.uniform(0.05, 0.35) * min(width, height)
        _clutter_shape(rng, image, rng.uniform([0, 0], [width, height]), size)
    for _ in range(rng.integers(*scene.distractors)):  # head- and limb-like blobs in skin and cloth colours
        colour = SKIN_TONES_BGR[rng.integers(len(SKIN_TONES_BGR))] if rng.random() < 0.6 else _colour(rng)
        centre = rng.uniform([0, 0], [width, height])
        size = rng.uniform(0.03, 0.12) * height
        if rng.random() < 0.5:
            axes = (int(size * 0.75), int(size))
            cv2.ellipse(image, tuple(int(v) for v in centre), axes, rng.uniform(0, 180), 0, 360,
                        colour.tolist(), -1, cv2.LINE_AA)
        else:
            end = centre + rng.normal(0, 1, 2) * size * 2
            cv2.line(image, tuple(int(v) for v in centre), tuple(int(v) for v in end), colour.tolist(),
                     max(1, int(size * 0.5)), cv2.LINE_AA)
    return image


def _clutter_shape(rng: np.random.Generator, image: np.ndarray, centre: np.ndarray, size: float) -> None:
    """One random filled shape: rectangle, ellipse, polygon or thick line."""
    colour = _colour(rng).tolist()
    c = tuple(int(v) for v in centre)
    kind = rng.integers(4)
    if kind == 0:
        half = rng.uniform(0.2, 1.0, 2) * size
        corners = np.concatenate([centre - half, centre + half]).astype(int).tolist()
        cv2.rectangle(image, corners[:2], corners[2:], colour, -1)
    elif kind == 1:
        axes = tuple(int(v) for v in rng.uniform(0.2, 1.0, 2) * size)
        cv2.ellipse(image, c, axes, rng.uniform(0, 180), 0, 360, colour, -1, cv2.LINE_AA)
    elif kind == 2:
        points = centre + rng.normal(0, size * 0.6, (rng.integers(3, 7), 2))
        cv2.fillPoly(image, [points.astype(np.int32)], colour, cv2.LINE_AA)
    else:
        end = centre + rng.normal(0, size, 2)
        thickness = max(1, int(size * rng.uniform(0.05, 0.2)))
        cv2.line(image, c, tuple(int(v) for v in end), colour, thickness, cv2.LINE_AA)


def _sample_view(rng: np.random.Generator, width: int, height: int, height_frac: float, scene: Scene) -> View:
    """Viewing side, camera tilt, body roll (upright, leaning, lying), size and place."""
    u = rng.uniform
    side = rng.random()
    if side < 0.35:
        yaw = u(-35, 35)
    elif side < 0.55:
        yaw = 180 + u(-35, 35)
    elif side < 0.8:
        yaw = rng.choice([-90.0, 90.0]) + u(-25, 25)
    else:
        yaw = u(-180, 180)
    tilt = rng.random()
    if tilt < 0.08:
        roll = rng.choice([-1.0, 1.0]) * u(65, 105)
    elif tilt < 0.25:
        roll = rng.choice([-1.0, 1.0]) * u(15, 40)
    else:
        roll = rng.normal(0, 5)
    scale = height_frac * height
    if rng.random() < scene.out_of_frame_prob:  # mostly out of frame: only a limb or two shows
        cx = -u(0.1, 0.35) * scale if rng.random() < 0.5 else width + u(0.1, 0.35) * scale
    else:
        cx = u(*scene.pelvis_x) * width
    return View(yaw=yaw, elevation=u(-15, 25), roll=roll, scale=scale, cx=cx, cy=u(*scene.pelvis_y) * height)


def render_image(
    rng: np.random.Generator, width: int, height: int, scene: Scene = MEDIUM
) -> tuple[np.ndarray, list[dict]]:
    """One BGR image and its annotations (without ids): people, a crowd sometimes, occluders."""
    image = _background(rng, width, height, scene)
    owner = np.full((height, width), -1, np.int16)  # person index; -1 background, -2 occluder
    part_map = np.zeros((height, width), np.uint8)

    crowd_size = int(rng.integers(4, 11)) if rng.random() < scene.crowd_prob else 0
    crowd_centre = rng.uniform([0.2 * width, 0.3 * height], [0.8 * width, 0.6 * height])
    for index in range(crowd_size):
        cx, cy = crowd_centre + rng.normal(0, [0.1 * width, 0.04 * height])
        view = _sample_view(rng, width, height, rng.uniform(0.12, 0.22), scene)
        view = replace(view, roll=rng.normal(0, 4), cx=cx, cy=cy)  # upright, packed together
        render_person(rng, image, owner, part_map, index, sample_body(rng), sample_pose(rng), view)

    n_people = int(rng.choice([1, 2, 3, 4, 5], p=scene.people_probs))
    low, high = scene.height_range
    height_fracs = np.exp(rng.uniform(np.log(low), np.log(high), n_people))
    order = np.argsort(height_fracs + rng.normal(0, 0.15, n_people))  # smaller people mostly farther
    people = []
    for rank, k in enumerate(order):
        view = _sample_view(rng, width, height, height_fracs[k], scene)
        people.append(render_person(rng, image, owner, part_map, crowd_size + rank, sample_body(rng),
                                    sample_pose(rng), view))

    for _ in range(rng.integers(*scene.occluders) if rng.random() < scene.occluder_prob else 0):
        _occlude(rng, image, owner, people[rng.integers(len(people))].joints)
    noise = rng.standard_normal(image.shape, dtype=np.float32) * rng.uniform(2, 8)
    image = np.clip(image + noise, 0, 255).astype(np.uint8)
    if rng.random() < 0.3:
        image = cv2.GaussianBlur(image, (3, 3), 0)

    anns = []
    if crowd_size:
        crowd = _crowd_annotation(rng, owner, crowd_size)
        if crowd is not None:
            anns.append(crowd)
    for person in people:
        ann = person_annotation(owner, part_map, person)
        if ann is not None:
            anns.append(ann)
    return image, anns


def _occlude(rng: np.random.Generator, image: np.ndarray, owner: np.ndarray, joints: np.ndarray) -> None:
    """Draw a pole, box or blob over part of a person; its pixels occlude whatever is below."""
    height, width = owner.shape
    lo, hi = joints.min(0), joints.max(0)
    centre = rng.uniform(lo, np.maximum(hi, lo + 1))
    size = max(float(np.max(hi - lo)), 8.0)
    mask = np.zeros((height, width), np.uint8)
    kind = rng.integers(3)
    c = tuple(int(v) for v in centre)
    if kind == 0:
        half = int(rng.uniform(0.03, 0.1) * size) + 1
        cv2.rectangle(mask, (c[0] - half, -1), (c[0] + half, height), 1, -1)
    elif kind == 1:
        half = rng.uniform(0.1, 0.35, 2) * size
        corners = np.concatenate([centre - half, centre + half]).astype(int).tolist()
        cv2.rectangle(mask, corners[:2], corners[2:], 1, -1)
    else:
        axes = tuple(int(v) + 1 for v in rng.uniform(0.08, 0.3, 2) * size)
        cv2.ellipse(mask, c, axes, rng.uniform(0, 180), 0, 360, 1, -1)
    ys, xs = np.nonzero(mask)
    if len(ys) == 0:
        return
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    where = mask[y0:y1, x0:x1] > 0
    tex = _texture(rng, _colour(rng), y1 - y0, x1 - x0, rng.uniform(3, 15))
    image[y0:y1, x0:x1][where] = np.clip(tex[where], 0, 255).astype(np.uint8)
    owner[y0:y1, x0:x1][where] = -2


# ---------------------------------------------------------------- annotation


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


def _crowd_annotation(rng: np.random.Generator, owner: np.ndarray, crowd_size: int) -> dict | None:
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
