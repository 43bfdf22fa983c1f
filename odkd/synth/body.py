"""The body model: the 17 COCO joints on a 3D body with joint-angle limits and proportions, the volumes
of its parts, and the orthographic projection that lands it on an image."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

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

# Joint-angle limits in degrees: (flexion, abduction, internal twist, elbow/knee bend).
ARM_LIMITS = np.array([[-45, 175], [0, 110], [-40, 90], [0, 150]], np.float64)
LEG_LIMITS = np.array([[-35, 125], [-12, 45], [-20, 20], [0, 150]], np.float64)
# (forward lean, side bend, twist, head yaw, head pitch)
TRUNK_LIMITS = np.array([[-15, 50], [-20, 20], [-35, 35], [-60, 60], [-30, 35]], np.float64)


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
