"""How a person looks and is painted: skin, hair and clothes, their textures, and one posed body drawn
part by part, far to near, into the image and the label maps that the annotations are read from."""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from odkd.synth.body import (
    ARM_CHAINS, FACE, HAIR, HEAD, L_FOOT, L_FOREARM, L_SHIN, L_THIGH, L_UPPER_ARM, LEG_CHAINS, N_PARTS, R_FOOT,
    R_FOREARM, R_SHIN, R_THIGH, R_UPPER_ARM, SHOULDERS_AND_HIPS, TORSO, Body, Pose, View, body_geometry, project,
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


@dataclass
class RenderedPerson:
    """What annotation needs from a painted person: the owner index and joint facts."""

    index: int
    joints: np.ndarray  # (17, 2) image pixels
    labelled: np.ndarray  # (17,) bool; face points turned away are never labelled
    torso_hides: np.ndarray  # (17,) bool; shoulder/hip on the torso's far side
    window: int  # half-size of the pixel window that decides visibility


def random_colour(rng: np.random.Generator) -> np.ndarray:
    """A random BGR colour, sometimes muted as clothes and walls often are."""
    c = rng.uniform(15, 240, 3)
    if rng.random() < 0.4:
        c = c.mean() + (c - c.mean()) * rng.uniform(0.1, 0.5)
    return c.astype(np.float32)


def texture(
    rng: np.random.Generator, colour: np.ndarray, height: int, width: int, period: float
) -> np.ndarray:
    """A (h, w, 3) float texture: plain, stripes, checks or blotchy noise around a colour."""
    tex = np.empty((height, width, 3), np.float32)
    tex[:] = colour
    kind = rng.choice(["plain", "stripes", "checks", "noise"], p=[0.35, 0.3, 0.1, 0.25])
    if kind in ("stripes", "checks"):
        other, angle = random_colour(rng), rng.uniform(0, np.pi)
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
    colours = [skin, random_colour(rng), random_colour(rng), random_colour(rng) * 0.5, hair]
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
            paint[where] = texture(rng, colours[m], *label.shape, period)[where]
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
