"""One whole image: how hard its scene is, the background and clutter, where people stand and how they
are seen, occluders, and the annotations of the people that show."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

import cv2
import numpy as np

from odkd.errors import OdkdError
from odkd.synth.annotation import crowd_annotation, person_annotation
from odkd.synth.appearance import SKIN_TONES_BGR, random_colour, render_person, texture
from odkd.synth.body import View, sample_body, sample_pose


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


def _background(rng: np.random.Generator, width: int, height: int, scene: Scene) -> np.ndarray:
    """Gradient, floor, blotches, random shapes and person-coloured distractors."""
    yy, xx = np.mgrid[:height, :width].astype(np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    ramp = xx * np.cos(angle) + yy * np.sin(angle)
    ramp = (ramp - ramp.min()) / max(float(np.ptp(ramp)), 1.0)
    c0, c1 = random_colour(rng), random_colour(rng)
    bg = c0 + ramp[..., None] * (c1 - c0)
    if rng.random() < 0.5:
        horizon = int(height * rng.uniform(0.4, 0.85))
        bg[horizon:] = texture(rng, random_colour(rng), height - horizon, width, rng.uniform(4, 30))
    bg *= texture(rng, np.ones(3, np.float32), height, width, rng.uniform(10, 60)) ** 0.5
    image = np.clip(bg, 0, 255).astype(np.uint8)
    for _ in range(rng.integers(*scene.clutter_shapes)):
        size = rng.uniform(0.05, 0.35) * min(width, height)
        _clutter_shape(rng, image, rng.uniform([0, 0], [width, height]), size)
    for _ in range(rng.integers(*scene.distractors)):  # head- and limb-like blobs in skin and cloth colours
        colour = SKIN_TONES_BGR[rng.integers(len(SKIN_TONES_BGR))] if rng.random() < 0.6 else random_colour(rng)
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
    colour = random_colour(rng).tolist()
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
        crowd = crowd_annotation(rng, owner, crowd_size)
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
    tex = texture(rng, random_colour(rng), y1 - y0, x1 - x0, rng.uniform(3, 15))
    image[y0:y1, x0:x1][where] = np.clip(tex[where], 0, 255).astype(np.uint8)
    owner[y0:y1, x0:x1][where] = -2
