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

import collections
import contextlib
import hashlib
import io
import json
import logging
import math
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pycocotools.coco import COCO

from odkd.data.keypoints import COCO_SET, KeypointSet, keypoint_set
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
    joints: np.ndarray  # (K, 3) float32: x, y, COCO visibility flag (zeros for detections)
    area: float
    score: float = 1.0  # the detector's box score; 1 for ground-truth boxes
    category_id: int = 1  # the annotation's or the detection's category (an AP-10K species, say)


def load_coco(ann_file: Path) -> COCO:
    """A COCO-format file's images, annotations and categories, indexed; its keypoints are not read here."""
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


def fill_box_areas(dataset: dict) -> None:
    """Give every annotation without 'area' its box's, in place: CrowdPose and AIC files have none, and
    their evaluators take the box's; loading and COCOeval then read one value."""
    for ann in dataset.get("annotations", []):
        box = ann.get("bbox")
        if "area" not in ann and isinstance(box, list) and len(box) == 4 and all(
                isinstance(v, (int, float)) for v in box):
            ann["area"] = float(box[2]) * float(box[3])


def _clean_box(bbox, width: int, height: int):
    """The official HRNet box cleaning: clip to the image; None when nothing is left."""
    x, y, w, h = bbox
    x1, y1 = max(0.0, x), max(0.0, y)
    x2 = min(width - 1.0, x1 + max(0.0, w - 1.0))
    y2 = min(height - 1.0, y1 + max(0.0, h - 1.0))
    if x2 < x1 or y2 < y1:
        return None
    return (x1, y1, x2 - x1, y2 - y1)


def _overlaps_image(bbox, width: int, height: int) -> bool:
    """A box with area that covers some of its image; HRNet's cleaning would keep one wholly left of or
    above it (it moves such a box to the edge) while its crop, made from the box as given, is padding."""
    x, y, w, h = bbox
    return w > 0 and h > 0 and x < width and y < height and x + w > 0 and y + h > 0


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


# COCO-WholeBody's annotation fields, concatenated in this order into its 133 points (mmpose's order)
WHOLE_BODY_FIELDS = (("keypoints", 17), ("foot_kpts", 6), ("face_kpts", 68), ("lefthand_kpts", 21),
                     ("righthand_kpts", 21))


def join_whole_body(coco: COCO, keypoints: KeypointSet, source: Path) -> None:
    """COCO-WholeBody's own format (the body's 17 points in 'keypoints', the rest in foot_kpts, face_kpts,
    lefthand_kpts and righthand_kpts) rewritten in place as one 'keypoints' of the set's 133, with
    num_keypoints counted over all of them, so that loading and COCOeval read one list. Files already in
    the 133-point form are left as they are; an annotation of the own format that lacks a part's field,
    or holds one of another length, is one error naming `source`, the annotation and the field."""
    if keypoints.num_keypoints != sum(n for _, n in WHOLE_BODY_FIELDS):
        return
    for ann in coco.dataset["annotations"]:
        if not any(name in ann for name, _ in WHOLE_BODY_FIELDS[1:]):
            continue
        joined = []
        for name, count in WHOLE_BODY_FIELDS:
            part = ann.get(name)
            if not isinstance(part, list) or len(part) != 3 * count:
                got = f"holds {len(part)} numbers" if isinstance(part, list) else "is missing"
                raise OdkdError(f"{source}: annotation {ann.get('id')}: '{name}' {got}; COCO-WholeBody's "
                                f"format gives {count} points ({3 * count} numbers) there")
            joined += list(part)
        ann["keypoints"] = joined
        ann["num_keypoints"] = sum(1 for v in joined[2::3] if v > 0)


def chosen_categories(categories: list[dict], keypoints: KeypointSet, names: tuple[str, ...],
                      source: Path) -> tuple[int, ...]:
    """The ids of the categories a pipeline reads from a file's `categories`: those `names` names ([data]
    categories), else those whose points are the set's (every AP-10K species, say), else those named person."""
    if names:
        named = {c.get("name"): c["id"] for c in categories}
        unknown = [name for name in names if name not in named]
        if unknown:
            raise OdkdError(f"{source}: no category {unknown[0]!r} ([data] categories); it has "
                            f"{', '.join(map(str, named))}")
        return tuple(sorted({named[name] for name in names}))
    k = keypoints.num_keypoints
    ids = ({c["id"] for c in categories if len(c.get("keypoints") or []) == k}
           or {c["id"] for c in categories if c.get("name") == "person"})
    if not ids:
        raise OdkdError(f"{source}: no category with the {k} keypoints of the set {keypoints.name!r} "
                        f"([data] keypoints), and none named 'person'")
    return tuple(sorted(ids))


class PersonInstances(_InstanceList):
    """Every usable person annotation of one COCO-format split, in a stable order."""

    def __init__(self, ann_file: str | Path, image_dir: str | Path, aspect_ratio: float = 0.75,
                 strict: bool = False, keypoints: KeypointSet = COCO_SET, categories: tuple[str, ...] = ()):
        self.ann_file = Path(ann_file)
        self.keypoints = keypoints
        self.categories = tuple(categories)
        self.image_dir = Path(image_dir)
        if not self.image_dir.is_dir():
            raise not_found(self.image_dir, "image folder")
        self.coco = load_coco(self.ann_file)
        join_whole_body(self.coco, keypoints, self.ann_file)
        fill_box_areas(self.coco.dataset)
        self.aspect_ratio = aspect_ratio
        self.strict = strict
        self.skipped_ann_ids: list[int] = []
        self.category_ids = chosen_categories(self.coco.dataset["categories"], keypoints, self.categories,
                                              self.ann_file)
        self.instances = self._collect()
        if self.skipped_ann_ids:
            log.warning(_skipped_warning(self.ann_file, self.skipped_ann_ids))
        log.debug(f"{self.ann_file}: {len(self.instances)} person instance(s) on {len(self.coco.imgs)} image(s)")
        self.fingerprint = self._fingerprint()

    def _collect(self) -> list[Instance]:
        k = self.keypoints.num_keypoints
        out: list[Instance] = []
        for image_id in sorted(self.coco.imgs):
            img = self.coco.imgs[image_id]
            for key in ("file_name", "width", "height"):
                if key not in img:
                    raise OdkdError(f"{self.ann_file}: image {image_id} has no '{key}'")
            for ann in sorted(self.coco.imgToAnns.get(image_id, []), key=lambda a: a["id"]):
                if ann.get("iscrowd", 0) or ann.get("category_id") not in self.category_ids:
                    continue
                where = f"{self.ann_file}: annotation {ann.get('id')}"
                kpts = ann.get("keypoints")
                if not isinstance(kpts, list) or len(kpts) != k * 3:
                    got = f"{len(kpts)} numbers" if isinstance(kpts, list) else repr(kpts)
                    raise OdkdError(f"{where}: 'keypoints' holds {got}, but the set {self.keypoints.name!r} "
                                    f"([data] keypoints) has {k} points: {k * 3} numbers")
                joints = np.asarray(kpts, dtype=np.float32).reshape(k, 3)
                if joints[:, 2].max() <= 0:
                    continue
                bbox = ann.get("bbox")
                if not isinstance(bbox, list) or len(bbox) != 4:
                    raise OdkdError(f"{where}: 'bbox' must be [x, y, w, h]")
                box = _clean_box(bbox, img["width"], img["height"])
                area = ann.get("area", 0)
                problem = _box_problem(bbox, box, area, img)
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
                    joints=joints, area=float(area), category_id=int(ann["category_id"]),
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


def _read_json(path: Path, what: str):
    if not path.is_file():
        raise not_found(path, what)
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise OdkdError(f"{path}: not valid JSON ({exc})") from None


# the kinds of detection record skipped before any image is looked at, in the order they are checked
BAD_SCORE = "with a 'score' that is not a finite number"
BAD_IMAGE_ID = "with an 'image_id' that is not an integer"
# a box whose crop centre or scale is not a finite float32 (inf, NaN, or a size like 1e300 that overflows)
BAD_BOX = "with a box too large or not finite for a crop"


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _record_problem(det: dict) -> tuple[str, str]:
    """(kind, what is wrong) for a detection whose score or image_id cannot be used; ("", "") when both can."""
    score, image_id = det["score"], det["image_id"]
    if not (_is_number(score) and math.isfinite(score)):
        return BAD_SCORE, f"'score' {json.dumps(score)} is not a finite number"
    if not (_is_number(image_id) and float(image_id).is_integer()):
        return BAD_IMAGE_ID, f"'image_id' {json.dumps(image_id)} is not an integer"
    return "", ""


def _crop_of(bbox, aspect_ratio: float):
    """The box's (center, scale), or None when either is not finite (HRNet's _box2cs would give inf or NaN)."""
    with np.errstate(over="ignore", invalid="ignore"):
        center, scale = box_to_center_scale(bbox, aspect_ratio)
    if not (np.isfinite(center).all() and np.isfinite(scale).all()):
        return None
    return center, scale


def detection_category(det: dict):
    """A detection record's category; a record without one is a person (category 1), as HRNet's files are."""
    return det.get("category_id", 1)


def read_detections(det_file: Path, min_score: float, strict: bool = False, categories: Collection[int] = (1,)
                    ) -> tuple[list[tuple[int, dict]], dict[str, list[int]]]:
    """The boxes of a COCO detections JSON ([{image_id, category_id, bbox, score}]) as (position in the file,
    record): those of `categories` (the pipeline's; COCO's person, 1, as the official HRNet code keeps), score
    at least `min_score`, as HRNet filters them (image_thre). The boxes of other categories are dropped and
    counted in one logged line. A kept record whose score is not a finite number or whose image_id is not an
    integer is skipped; the second value lists the skipped positions by kind (BAD_SCORE, BAD_IMAGE_ID).
    With `strict` the first one is an error."""
    dets = _read_json(det_file, "detections file")
    if not isinstance(dets, list):
        raise OdkdError(f"{det_file}: must be a list of detections")
    kept = []
    skipped: dict[str, list[int]] = {BAD_SCORE: [], BAD_IMAGE_ID: []}
    other_categories: collections.Counter = collections.Counter()
    for i, det in enumerate(dets):
        if not isinstance(det, dict) or not {"image_id", "bbox", "score"} <= det.keys():
            raise OdkdError(f"{det_file}: detection [{i}] needs image_id, bbox and score")
        bbox = det["bbox"]
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(_is_number(v) for v in bbox)):
            raise OdkdError(f"{det_file}: detection [{i}] 'bbox' must be [x, y, w, h]")
        if detection_category(det) not in categories:
            other_categories[json.dumps(detection_category(det))] += 1
            continue
        kind, problem = _record_problem(det)
        if kind:
            if strict:
                raise OdkdError(f"{det_file}: detection [{i}] {problem} ([data] strict = true)")
            skipped[kind].append(i)
        elif det["score"] >= min_score:
            kept.append((i, det))
    if other_categories:
        log.info(f"{det_file}: dropped {other_categories.total()} box(es) of categories the pipeline does not "
                 f"read (category_id {_first_ids(list(other_categories))}; it reads "
                 f"{', '.join(map(str, categories))}, [data] categories)")
    return kept, skipped


def _skipped_lines(det_file: Path, noun: str, skipped: dict[str, list[int]]) -> list[str]:
    """One warning line per kind of skipped detection: how many, and the first few positions in the file."""
    return [f"warning: {det_file}: skipped {len(positions)} {noun} {why} (detections [{_first_ids(positions)}]); "
            f"[data] strict = true makes this an error" for why, positions in skipped.items() if positions]


def _detected_instance(index: int, det: dict, img: dict, crop, num_keypoints: int, ann_id: int = -1) -> Instance:
    """A detector's box as a crop, by the rule ground-truth boxes follow; no box cleaning (HRNet's _box2cs).
    `crop` is the box's (center, scale) from _crop_of."""
    bbox = tuple(float(v) for v in det["bbox"])
    center, scale = crop
    return Instance(index=index, image_id=int(det["image_id"]), ann_id=ann_id, file_name=img["file_name"],
                    image_width=int(img["width"]), image_height=int(img["height"]), bbox=bbox, center=center,
                    scale=scale, joints=np.zeros((num_keypoints, 3), np.float32), area=bbox[2] * bbox[3],
                    score=float(det["score"]), category_id=int(detection_category(det)))


class DetectedPersons(_InstanceList):
    """Crops from a COCO detections JSON ([{image_id, category_id, bbox, score}]), for evaluation.

    Follows the official HRNet detection path: the boxes of `categories` (the ids the ground truth's
    PersonInstances reads; COCO's person, 1, the one HRNet keeps), each keeping its category, boxes scored
    at least `score_thr`, no box cleaning, the same center/scale rule as ground-truth boxes. Records whose
    score is not a finite number or whose image_id is not an integer, boxes too large or not finite for a
    crop, and boxes on images the annotations do not have (a full val2017 detections file on a val subset)
    are skipped and counted in one logged warning per kind; with `strict` the first is an error.
    """

    def __init__(self, det_file: str | Path, coco: COCO, image_dir: str | Path, aspect_ratio: float = 0.75,
                 score_thr: float = 0.0, strict: bool = False, num_keypoints: int = COCO_SET.num_keypoints,
                 categories: Collection[int] = (1,)):
        self.det_file = Path(det_file)
        self.image_dir = Path(image_dir)
        self.coco = coco
        self.instances: list[Instance] = []
        unknown_image_ids: list[int] = []
        kept, skipped = read_detections(self.det_file, score_thr, strict, categories)
        skipped[BAD_BOX] = []
        for i, det in kept:
            img = coco.imgs.get(det["image_id"])
            if img is None:
                if strict:
                    raise OdkdError(f"{self.det_file}: detection [{i}] image_id {det['image_id']} is not in the "
                                    f"annotations ([data] strict = true)")
                unknown_image_ids.append(det["image_id"])
                continue
            crop = _crop_of(det["bbox"], aspect_ratio)
            if crop is None:
                if strict:
                    raise OdkdError(f"{self.det_file}: detection [{i}] 'bbox' {json.dumps(det['bbox'])} is too "
                                    f"large or not finite for a crop ([data] strict = true)")
                skipped[BAD_BOX].append(i)
                continue
            self.instances.append(_detected_instance(len(self.instances), det, img, crop, num_keypoints))
        for line in _skipped_lines(self.det_file, "detection(s)", skipped):
            log.warning(line)
        if unknown_image_ids:
            images = list(dict.fromkeys(unknown_image_ids))
            log.warning(f"warning: {self.det_file}: skipped {len(unknown_image_ids)} detection(s) on {len(images)} "
                        f"image(s) not in the annotations (image ids {_first_ids(images)}); [data] strict = true "
                        f"makes this an error")


def read_image_info(info_file: Path) -> tuple[dict[int, dict], list[dict] | None]:
    """Image id -> image record of a COCO image-info JSON (images, no annotations: image_info_unlabeled2017),
    and its `categories` (None when it has none)."""
    info = _read_json(info_file, "image-info file")
    if not isinstance(info, dict) or not isinstance(info.get("images"), list):
        raise OdkdError(f"{info_file}: expected a JSON object with an 'images' list (COCO's image-info format)")
    images = {}
    for i, img in enumerate(info["images"]):
        if not isinstance(img, dict) or not {"id", "file_name", "width", "height"} <= img.keys():
            raise OdkdError(f"{info_file}: images[{i}] needs id, file_name, width and height")
        images[int(img["id"])] = img
    categories = info.get("categories")
    if categories is not None and not (isinstance(categories, list)
                                       and all(isinstance(c, dict) and "id" in c for c in categories)):
        raise OdkdError(f"{info_file}: 'categories' must be a list of categories with an id, as COCO's files have")
    return images, categories


def unlabeled_categories(info_file: Path, categories: list[dict] | None, keypoints: KeypointSet,
                         names: tuple[str, ...]) -> tuple[int, ...]:
    """The category ids the unlabelled boxes are kept for, chosen from the image-info file's categories as a
    labelled file's are; a file without categories names none, and its boxes of category 1 (HRNet's person)
    are kept."""
    if categories is not None:
        return chosen_categories(categories, keypoints, names, info_file)
    if names:
        raise OdkdError(f"{info_file}: no 'categories' to find [data] categories {names[0]!r} in")
    return (1,)


class UnlabeledPersons(_InstanceList):
    """The people of images nobody labelled, as a detector boxed them: what the teachers label for the student.

    Each box of the detections file scored at least `min_score` becomes a crop the way the official
    val protocol turns detections into crops (HRNet's _box2cs, no cleaning), keeping its category: the boxes
    of the categories `unlabeled_categories` chooses (COCO's person, 1, as HRNet keeps). A record whose
    score is not a finite number or whose image_id is not an integer, a box on an image id the
    image-info file lacks, a box with no area or wholly outside its image, a box too large or not finite
    for a crop (inf, NaN, 1e300), and a box on an image whose file is missing are skipped and counted in
    one logged warning per kind; with `strict` the first is an error. `ann_id` is the box's position in the detections file, so a stored row leads
    back to its record. The order is the image id, then that position; the fingerprint covers the
    images and the boxes with their scores.
    """

    def __init__(self, image_info: str | Path, boxes: str | Path, image_dir: str | Path, aspect_ratio: float = 0.75,
                 min_score: float = 0.5, strict: bool = False, keypoints: KeypointSet = COCO_SET,
                 categories: tuple[str, ...] = ()):
        self.image_info, self.boxes, self.image_dir = Path(image_info), Path(boxes), Path(image_dir)
        if not self.image_dir.is_dir():
            raise not_found(self.image_dir, "image folder")
        self.aspect_ratio, self.min_score = aspect_ratio, min_score
        images, info_categories = read_image_info(self.image_info)
        self.category_ids = unlabeled_categories(self.image_info, info_categories, keypoints, tuple(categories))
        records, skipped = read_detections(self.boxes, min_score, strict, self.category_ids)
        skipped.update({"not in the image-info file": [], "with no area or outside the image": [],
                        BAD_BOX: [], "on a missing image file": []})
        present: dict[int, bool] = {}
        kept = []
        for i, det in records:
            img = images.get(det["image_id"])
            crop = None
            if img is None:
                why = "not in the image-info file"
            elif not _overlaps_image(det["bbox"], img["width"], img["height"]):
                why = "with no area or outside the image"
            elif (crop := _crop_of(det["bbox"], aspect_ratio)) is None:
                why = BAD_BOX
            elif not present.setdefault(img["id"], (self.image_dir / img["file_name"]).is_file()):
                why = "on a missing image file"
            else:
                kept.append((int(img["id"]), i, det, img, crop))
                continue
            if strict:
                raise OdkdError(f"{self.boxes}: detection [{i}] (image_id {det['image_id']}) is {why} "
                                f"([data] strict = true)")
            skipped[why].append(i)
        self.skipped = {why: positions for why, positions in skipped.items() if positions}
        for line in _skipped_lines(self.boxes, "box(es)", self.skipped):
            log.warning(line)
        kept.sort(key=lambda item: item[:2])
        self.instances = [_detected_instance(n, det, img, crop, keypoints.num_keypoints, ann_id=i)
                          for n, (_, i, det, img, crop) in enumerate(kept)]
        log.debug(f"{self.boxes}: {len(self.instances)} box(es) on {len(images)} unlabelled image(s)")
        self.fingerprint = self._fingerprint()

    def _fingerprint(self) -> str:
        h = hashlib.sha256()
        h.update(f"odkd-unlabeled-v1 aspect={self.aspect_ratio:.6f} min_score={self.min_score!r} "
                 f"n={len(self.instances)}\n".encode())
        for inst in self.instances:
            # category 1 adds nothing: stores of person boxes made before boxes kept their category resume
            category = "" if inst.category_id == 1 else f" category={inst.category_id}"
            h.update(f"{inst.image_id} {inst.ann_id} {inst.file_name} {inst.image_width}x{inst.image_height} "
                     f"{inst.score!r}{category}\n".encode())
            h.update(np.asarray(inst.bbox, np.float64).tobytes())
        return "sha256:" + h.hexdigest()[:32]


def load_instances(data_cfg, split: str) -> PersonInstances | UnlabeledPersons:
    """The instances of `split` ('train', 'val', 'test', or 'unlabeled': the boxes of [data.unlabeled])
    named by a `[data]` config section."""
    aspect = data_cfg.input_size[0] / data_cfg.input_size[1]
    kset = keypoint_set(data_cfg.keypoints)
    if split != "unlabeled":
        return PersonInstances(data_cfg.ann_file(split), data_cfg.image_dir(split), aspect, strict=data_cfg.strict,
                               keypoints=kset, categories=data_cfg.categories)
    unlabeled = data_cfg.unlabeled
    unset = [key for key in ("images", "image_info", "boxes") if not getattr(unlabeled, key)]
    if unset:
        raise OdkdError(f"[data.unlabeled] {', '.join(unset)} not set: the unlabeled split needs its images, their "
                        f"image-info file and a detections file (docs/config.md, [data.unlabeled])")
    return UnlabeledPersons(data_cfg.ann_file(split), Path(data_cfg.root) / unlabeled.boxes,
                            data_cfg.image_dir(split), aspect, unlabeled.min_score, strict=data_cfg.strict,
                            keypoints=kset, categories=data_cfg.categories)
