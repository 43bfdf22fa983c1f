"""COCO-format person instances, loaded through pycocotools, with the official HRNet rules.

Crowd annotations and annotations without any labelled keypoint are skipped (the official
code does so for training and for GT-box evaluation), so an image with only crowd regions gives
no instance. Boxes are cleaned and clipped to the image, then turned into a center and scale at
the crop's aspect. A labelled person whose cleaned box is empty (it starts past the image's right
or bottom edge) or whose area is not positive is dropped, as the official box cleaning drops it;
so is a box with a non-positive width or height, which the official code would keep as a sliver.
A box that starts left of or above the image is moved to start at its edge and kept, as officially
(however far out it was). The drops are
counted in one logged warning naming the first few annotation ids; with `strict` they are
an error naming the first one. Keypoints outside the image are kept as labelled, with their
visibility, as the official joints_3d are. The order is deterministic (image id, then annotation
id) and every instance gets a stable index. The fingerprint hashes everything the kept instance
list depends on, so a teacher cache can be keyed on it.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pycocotools.coco import COCO

from odkd.data.keypoints import NUM_JOINTS
from odkd.data.transforms import box_to_center_scale
from odkd.errors import OdkdError, not_found

SKIPPED_IDS_SHOWN = 5

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Instance:
    index: int
    image_id: int
    ann_id: int
    file_name: str
    image_width: int
    image_height: int
    bbox: tuple[float, float, float, float]  # cleaned x, y, w, h
    center: np.ndarray  # (2,) float32
    scale: np.ndarray  # (2,) float32, pixel_std units, padded
    joints: np.ndarray  # (17, 3) float32: x, y, COCO visibility flag (zeros for detections)
    area: float
    score: float = 1.0  # the detector's box score; 1 for ground-truth boxes


def _load_coco(ann_file: Path) -> COCO:
    if not ann_file.is_file():
        raise not_found(ann_file, "annotation file")
    try:
        with open(ann_file) as f:
            dataset = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise OdkdError(f"{ann_file}: not valid JSON ({exc})") from None
    if not isinstance(dataset, dict):
        raise OdkdError(f"{ann_file}: top level must be a JSON object with 'images' and 'annotations'")
    for key in ("images", "annotations", "categories"):
        if not isinstance(dataset.get(key), list):
            raise OdkdError(f"{ann_file}: missing or invalid '{key}' list")
    coco = COCO()
    coco.dataset = dataset
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            coco.createIndex()
    except (KeyError, TypeError) as exc:
        raise OdkdError(f"{ann_file}: malformed COCO annotation (missing field {exc})") from None
    return coco


def _clean_box(bbox, width: int, height: int):
    """The official HRNet box cleaning: clip to the image; None when nothing is left."""
    x, y, w, h = bbox
    x1, y1 = max(0.0, x), max(0.0, y)
    x2 = min(width - 1.0, x1 + max(0.0, w - 1.0))
    y2 = min(height - 1.0, y1 + max(0.0, h - 1.0))
    if x2 < x1 or y2 < y1:
        return None
    return (x1, y1, x2 - x1, y2 - y1)


def _box_problem(bbox, box, area, img) -> str:
    """Why a labelled person's box gives no crop, or "" when it does."""
    if bbox[2] <= 0 or bbox[3] <= 0:
        return f"'bbox' {bbox} has zero area"
    if box is None:
        return f"'bbox' {bbox} lies outside its {img['width']}x{img['height']} image"
    if not isinstance(area, (int, float)) or not area > 0:
        return f"'area' {area!r} is not positive (OKS divides by it)"
    return ""


def _first_ids(ids: list[int]) -> str:
    return ", ".join(map(str, ids[:SKIPPED_IDS_SHOWN])) + (", ..." if len(ids) > SKIPPED_IDS_SHOWN else "")


def _skipped_warning(ann_file: Path, ann_ids: list[int]) -> str:
    """The one line that reports the labelled persons dropped by the box cleaning."""
    return (f"warning: {ann_file}: skipped {len(ann_ids)} labelled person(s) with an empty box or area, as the "
            f"official HRNet box cleaning does (annotation ids {_first_ids(ann_ids)}); [data] strict = true "
            f"makes this an error")


class _InstanceList:
    instances: list[Instance]
    image_dir: Path

    def __len__(self) -> int:
        return len(self.instances)

    def __getitem__(self, index: int) -> Instance:
        return self.instances[index]

    def image_path(self, inst: Instance) -> Path:
        return self.image_dir / inst.file_name


class PersonInstances(_InstanceList):
    """Every usable person annotation of one COCO-format split, in a stable order."""

    def __init__(self, ann_file: str | Path, image_dir: str | Path, aspect_ratio: float = 0.75,
                 strict: bool = False):
        self.ann_file = Path(ann_file)
        self.image_dir = Path(image_dir)
        if not self.image_dir.is_dir():
            raise not_found(self.image_dir, "image folder")
        self.coco = _load_coco(self.ann_file)
        self.aspect_ratio = aspect_ratio
        self.strict = strict
        self.skipped_ann_ids: list[int] = []
        self.instances = self._collect()
        if self.skipped_ann_ids:
            log.warning(_skipped_warning(self.ann_file, self.skipped_ann_ids))
        log.debug(f"{self.ann_file}: {len(self.instances)} person instance(s) on {len(self.coco.imgs)} image(s)")
        self.fingerprint = self._fingerprint()

    def _collect(self) -> list[Instance]:
        person_ids = {c["id"] for c in self.coco.dataset["categories"] if c.get("name") == "person"}
        if not person_ids:
            raise OdkdError(f"{self.ann_file}: no 'person' category")
        out: list[Instance] = []
        for image_id in sorted(self.coco.imgs):
            img = self.coco.imgs[image_id]
            for key in ("file_name", "width", "height"):
                if key not in img:
                    raise OdkdError(f"{self.ann_file}: image {image_id} has no '{key}'")
            for ann in sorted(self.coco.imgToAnns.get(image_id, []), key=lambda a: a["id"]):
                if ann.get("iscrowd", 0) or ann.get("category_id") not in person_ids:
                    continue
                where = f"{self.ann_file}: annotation {ann.get('id')}"
                kpts = ann.get("keypoints")
                if not isinstance(kpts, list) or len(kpts) != NUM_JOINTS * 3:
                    raise OdkdError(f"{where}: 'keypoints' must hold {NUM_JOINTS * 3} numbers")
                joints = np.asarray(kpts, dtype=np.float32).reshape(NUM_JOINTS, 3)
                if joints[:, 2].max() <= 0:
                    continue
                bbox = ann.get("bbox")
                if not isinstance(bbox, list) or len(bbox) != 4:
                    raise OdkdError(f"{where}: 'bbox' must be [x, y, w, h]")
                box = _clean_box(bbox, img["width"], img["height"])
                problem = _box_problem(bbox, box, ann.get("area", 0), img)
                if problem:
                    if self.strict:
                        raise OdkdError(f"{where}: {problem} ([data] strict = true)")
                    self.skipped_ann_ids.append(int(ann["id"]))
                    continue
                center, scale = box_to_center_scale(box, self.aspect_ratio)
                out.append(Instance(
                    index=len(out), image_id=int(image_id), ann_id=int(ann["id"]),
                    file_name=img["file_name"], image_width=int(img["width"]),
                    image_height=int(img["height"]), bbox=box, center=center, scale=scale,
                    joints=joints, area=float(ann["area"]),
                ))
        return out

    def _fingerprint(self) -> str:
        h = hashlib.sha256()
        h.update(f"odkd-instances-v1 aspect={self.aspect_ratio:.6f} n={len(self.instances)}\n".encode())
        for inst in self.instances:
            h.update(f"{inst.image_id} {inst.ann_id} {inst.file_name} "
                     f"{inst.image_width}x{inst.image_height}\n".encode())
            h.update(np.asarray(inst.bbox, np.float64).tobytes())
            h.update(inst.joints.tobytes())
        return "sha256:" + h.hexdigest()[:32]

    def mask(self, inst: Instance) -> np.ndarray:
        """The instance's person mask (H, W) uint8 from its polygons or RLE (pycocotools)."""
        ann = self.coco.anns[inst.ann_id]
        if not ann.get("segmentation"):
            return np.zeros((inst.image_height, inst.image_width), np.uint8)
        return self.coco.annToMask(ann)


class DetectedPersons(_InstanceList):
    """Person crops from a COCO detections JSON ([{image_id, category_id, bbox, score}]), for evaluation.

    Follows the official HRNet detection path: only category 1, boxes with score above
    `score_thr`, no box cleaning, the same center/scale rule as ground-truth boxes. Boxes on images
    the annotations do not have (a full val2017 detections file on a val subset) are skipped and
    counted in one logged warning; with `strict` the first is an error.
    """

    def __init__(self, det_file: str | Path, coco: COCO, image_dir: str | Path, aspect_ratio: float = 0.75,
                 score_thr: float = 0.0, strict: bool = False):
        self.det_file = Path(det_file)
        self.image_dir = Path(image_dir)
        self.coco = coco
        if not self.det_file.is_file():
            raise not_found(self.det_file, "detections file")
        try:
            dets = json.loads(self.det_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise OdkdError(f"{self.det_file}: not valid JSON ({exc})") from None
        if not isinstance(dets, list):
            raise OdkdError(f"{self.det_file}: must be a list of detections")
        self.instances: list[Instance] = []
        unknown_image_ids: list[int] = []
        for i, det in enumerate(dets):
            if not isinstance(det, dict) or not {"image_id", "bbox", "score"} <= det.keys():
                raise OdkdError(f"{self.det_file}: detection [{i}] needs image_id, bbox and score")
            if det.get("category_id", 1) != 1 or det["score"] <= score_thr:
                continue
            img = coco.imgs.get(det["image_id"])
            if img is None:
                if strict:
                    raise OdkdError(f"{self.det_file}: detection [{i}] image_id {det['image_id']} is not in the "
                                    f"annotations ([data] strict = true)")
                unknown_image_ids.append(det["image_id"])
                continue
            center, scale = box_to_center_scale(det["bbox"], aspect_ratio)
            self.instances.append(Instance(
                index=len(self.instances), image_id=int(det["image_id"]), ann_id=-1, file_name=img["file_name"],
                image_width=int(img["width"]), image_height=int(img["height"]),
                bbox=tuple(float(v) for v in det["bbox"]), center=center, scale=scale,
                joints=np.zeros((NUM_JOINTS, 3), np.float32), area=float(det["bbox"][2] * det["bbox"][3]),
                score=float(det["score"]),
            ))
        if unknown_image_ids:
            images = list(dict.fromkeys(unknown_image_ids))
            log.warning(f"warning: {self.det_file}: skipped {len(unknown_image_ids)} detection(s) on {len(images)} "
                        f"image(s) not in the annotations (image ids {_first_ids(images)}); [data] strict = true "
                        f"makes this an error")


def load_instances(data_cfg, split: str) -> PersonInstances:
    """The instances of `split` ('train', 'val' or 'test') named by a `[data]` config section."""
    aspect = data_cfg.input_size[0] / data_cfg.input_size[1]
    return PersonInstances(data_cfg.ann_file(split), data_cfg.image_dir(split), aspect, strict=data_cfg.strict)
