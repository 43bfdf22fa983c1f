"""Keypoint sets: the points a dataset labels, with their names, skeleton, mirror partners, body halves,
OKS sigmas, loss weights and parts. A pipeline names one with `[data] keypoints`: a preset
(odkd/keypoint_sets/NAME.toml, values from mmpose's dataset metainfo) or the path of a TOML file of the
same form. COCO's 17 person keypoints are the default and the synthetic data's set.
"""

from __future__ import annotations

import functools
import hashlib
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from odkd.errors import OdkdError, not_found

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

PRESETS_DIR = Path(__file__).resolve().parent.parent / "keypoint_sets"
_KEYS = ("name", "keypoints", "flip_pairs", "skeleton", "upper_body", "lower_body", "sigmas", "joint_weights",
         "parts")


@dataclass(frozen=True)
class KeypointSet:
    """K named points; every other field refers to them by 0-based index."""

    name: str
    names: tuple[str, ...]
    flip_pairs: tuple[tuple[int, int], ...] = ()  # each left/right pair once; unlisted points mirror to themselves
    skeleton: tuple[tuple[int, int], ...] = ()
    upper_body: tuple[int, ...] = ()
    lower_body: tuple[int, ...] = ()
    sigmas: tuple[float, ...] = ()  # OKS falloffs as COCOeval takes them (COCO's nose 0.026); () when the set has none
    joint_weights: tuple[float, ...] = ()  # per-point loss weights; () for all 1
    parts: dict[str, tuple[int, int]] = field(default_factory=dict)  # name -> [start, stop) of the points
    mirrored: bool = True  # False: nobody gave the flip pairs, so flip augmentation and flip test are off

    @property
    def num_keypoints(self) -> int:
        return len(self.names)

    @functools.cached_property
    def flip_index(self) -> np.ndarray:
        """The channel permutation a horizontal mirror applies to the points."""
        index = np.arange(self.num_keypoints)
        for a, b in self.flip_pairs:
            index[a], index[b] = b, a
        index.flags.writeable = False
        return index

    @property
    def skeleton_1based(self) -> list[list[int]]:
        """The skeleton as a COCO file's `categories` gives it (1-based ids)."""
        return [[a + 1, b + 1] for a, b in self.skeleton]

    def digest(self) -> str:
        """What a store records of the set: a change to any point, pair, sigma or part is another set."""
        fields = {key: getattr(self, key) for key in ("names", "flip_pairs", "skeleton", "upper_body", "lower_body",
                                                       "sigmas", "joint_weights", "parts", "mirrored")}
        return hashlib.sha256(json.dumps(fields, sort_keys=True, default=list).encode()).hexdigest()[:16]

    def record(self) -> dict:
        """The set as a store's settings and a checkpoint record it."""
        return {"name": self.name, "num_keypoints": self.num_keypoints, "digest": self.digest()}


def _indices(values, names: dict[str, int], where: str, count: int | None = None) -> tuple:
    """Names or 0-based indices -> indices; an unknown name or an index out of range is one error naming `where`."""
    if not isinstance(values, list):
        raise OdkdError(f"{where}: expected an array, got {values!r}")
    out = []
    for value in values:
        if isinstance(value, list):
            if count is not None and len(value) != count:
                raise OdkdError(f"{where}: {value!r} is not a pair of points")
            out.append(_indices(value, names, where))
            continue
        if isinstance(value, str):
            if value not in names:
                raise OdkdError(f"{where}: {value!r} is not one of the set's keypoints")
            out.append(names[value])
        elif isinstance(value, int) and not isinstance(value, bool):
            if not 0 <= value < len(names):
                raise OdkdError(f"{where}: point {value} is out of range for {len(names)} keypoints (0-based)")
            out.append(value)
        else:
            raise OdkdError(f"{where}: {value!r} is neither a keypoint name nor an index")
    return tuple(out)


def parse_keypoint_set(table: dict, source: str) -> KeypointSet:
    """A KeypointSet from a set file's TOML table; every error names `source` and the key."""
    unknown = sorted(set(table) - set(_KEYS))
    if unknown:
        raise OdkdError(f"{source}: unknown key {unknown[0]!r} (allowed: {', '.join(_KEYS)})")
    names = table.get("keypoints")
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names):
        raise OdkdError(f"{source}: keypoints: give the points' names, in the annotation file's order")
    if len(set(names)) != len(names):
        raise OdkdError(f"{source}: keypoints: {next(n for n in names if names.count(n) > 1)!r} is named twice")
    index = {name: i for i, name in enumerate(names)}
    k = len(names)
    flip_pairs = _indices(table.get("flip_pairs", []), index, f"{source}: flip_pairs", 2)
    seen = [i for pair in flip_pairs for i in pair]
    if len(seen) != len(set(seen)) or any(a == b for a, b in flip_pairs):
        raise OdkdError(f"{source}: flip_pairs: a point is in two pairs, or paired with itself")
    numbers = {}
    for key in ("sigmas", "joint_weights"):
        values = table.get(key, [])
        if not isinstance(values, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                   and v > 0 for v in values):
            raise OdkdError(f"{source}: {key}: expected positive numbers")
        if values and len(values) != k:
            raise OdkdError(f"{source}: {key}: {len(values)} values for {k} keypoints")
        numbers[key] = tuple(float(v) for v in values)
    parts = {}
    for part, span in (table.get("parts") or {}).items():
        if not (isinstance(span, list) and len(span) == 2 and all(isinstance(v, int) for v in span)
                and 0 <= span[0] < span[1] <= k):
            raise OdkdError(f"{source}: parts.{part}: expected [start, stop] within 0..{k}, got {span!r}")
        parts[part] = (span[0], span[1])
    return KeypointSet(
        name=str(table.get("name") or Path(source).stem), names=tuple(names), flip_pairs=flip_pairs,
        skeleton=_indices(table.get("skeleton", []), index, f"{source}: skeleton", 2),
        upper_body=_indices(table.get("upper_body", []), index, f"{source}: upper_body"),
        lower_body=_indices(table.get("lower_body", []), index, f"{source}: lower_body"),
        sigmas=numbers["sigmas"], joint_weights=numbers["joint_weights"], parts=parts,
        mirrored="flip_pairs" in table,
    )


def presets() -> list[str]:
    return sorted(path.stem for path in PRESETS_DIR.glob("*.toml"))


@functools.cache
def keypoint_set(spec: str) -> KeypointSet:
    """The set `spec` names: a preset's name, or the path of a set file (relative to the working directory)."""
    path = PRESETS_DIR / f"{spec}.toml" if "/" not in spec and not spec.endswith(".toml") else Path(spec)
    if not path.is_file():
        if path.parent == PRESETS_DIR:
            raise OdkdError(f"data.keypoints: {spec!r} is neither a preset ({', '.join(presets())}) nor a .toml file")
        raise not_found(path, "keypoint set file", "data.keypoints")
    try:
        table = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise OdkdError(f"{path}: not valid TOML ({exc})") from None
    return parse_keypoint_set(table, str(path))


# COCO's 17 person keypoints: the default set, and the one the synthetic people are labelled with
COCO_SET = keypoint_set("coco")
NUM_JOINTS = COCO_SET.num_keypoints
KEYPOINT_NAMES = COCO_SET.names
SKELETON = tuple((a + 1, b + 1) for a, b in COCO_SET.skeleton)  # 1-based, as in person_keypoints_val2017.json
FLIP_INDEX = COCO_SET.flip_index
UPPER_BODY_IDS = COCO_SET.upper_body
# as pycocotools writes them (/10.0), which differs from the preset's 0.026 in the last bit: COCOeval's default
COCO_SIGMAS = np.array(
    [0.26, 0.25, 0.25, 0.35, 0.35, 0.79, 0.79, 0.72, 0.72, 0.62, 0.62, 1.07, 1.07, 0.87, 0.87, 0.89, 0.89]
) / 10.0


def stored_record(kset: KeypointSet) -> dict | None:
    """What a store's settings keep of the set: nothing for COCO's (stores made before sets existed are
    COCO's and resume as they are), else its name, K and digest."""
    return None if kset.digest() == COCO_SET.digest() else kset.record()


def oks_sigmas(kset: KeypointSet) -> np.ndarray | None:
    """The set's OKS sigmas as COCOeval takes them (COCO's exactly as pycocotools has them); None without any."""
    if kset.digest() == COCO_SET.digest():
        return COCO_SIGMAS
    return np.array(kset.sigmas) if kset.sigmas else None


def val_stat(kset: KeypointSet) -> str:
    """The val stat a training run keeps its best.pth by: OKS AP, or PCK for a set without OKS sigmas."""
    return "AP" if oks_sigmas(kset) is not None else "PCK"
