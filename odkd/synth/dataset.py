"""Writing the dataset: the splits and their seed streams, one JPEG per image, one COCO annotation file
per split, the unlabelled split's image-info, detections and true-label files, and what the files record
about how they were made."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from odkd.errors import OdkdError
from odkd.synth.annotation import add_annotator_noise, unlabel_keypoints
from odkd.synth.detections import imitate_person_detector
from odkd.synth.keypoint_formats import FORMATS, PERSON_FORMATS, set_category
from odkd.synth.scene import DIFFICULTY_LEVELS, Scene, difficulty_value, render_image, scene_for

PERSON_CATEGORY = set_category("coco")
LICENSE = {"url": "https://creativecommons.org/publicdomain/zero/1.0/", "id": 1, "name": "CC0 1.0"}
# also the seed stream of each: test and unlabeled never shift the splits before them
SPLITS = ("train", "val", "test", "unlabeled")
JPEG_QUALITY = 90
# the unlabelled split's files, beside its images/unlabeled: what a user of COCO's unlabeled2017 has
# (image info, a person detector's boxes) and the labels nobody would have, to score pseudo-labels with
UNLABELED_IMAGE_INFO = "annotations/image_info_unlabeled.json"
UNLABELED_DETECTIONS = "person_detections_unlabeled.json"
UNLABELED_TRUE_ANNOTATIONS = "annotations/person_keypoints_unlabeled_true.json"
# what a previous run left in OUT_DIR, all that odkd synth --force clears: images/<split>/<12-digit id>.jpg,
# these annotation files (and a .tmp of one, from an interrupted write), and the detections file
SYNTH_ANNOTATIONS = (*(f"annotations/person_keypoints_{split}.json" for split in SPLITS[:3]), UNLABELED_IMAGE_INFO,
                     UNLABELED_TRUE_ANNOTATIONS)
_SYNTH_IMAGE = re.compile(r"[0-9]{12}\.jpg")
# how every JSON file synth writes begins (compact, info first): a file that does not is someone else's
_SYNTH_JSON_STARTS = {"annotations": b'{"info":{"description":"odkd synthetic', "detections": (b'[{"image_id":', b"[]")}
EXISTING = ("write_over", "refuse", "replace")


@dataclass(frozen=True)
class SplitPlan:
    """One split to write: its seed stream, its images and their first id, and the label errors it gets."""

    name: str
    stream: int  # the split's place in SPLITS
    images: int
    first_image_id: int
    label_noise: float
    missing_labels: float


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
    unlabeled_images: int = 0,
    existing: str = "write_over",
    keypoints: str = "coco",
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
    unlabeled_images > 0 adds images/unlabeled, made like train's images but with ids after test's,
    with UNLABELED_IMAGE_INFO (COCO's image-info format, no annotations), UNLABELED_DETECTIONS (an
    imitated person detector's boxes, see imitate_person_detector) and UNLABELED_TRUE_ANNOTATIONS
    (their exact, complete labels, which no command reads by default).
    The same arguments give byte-identical files, and train and val do not depend on test_images, nor
    train, val and test on unlabeled_images.
    `existing` says what to do with a dataset already in out_dir (see previous_dataset): "write_over" writes
    the files over it and leaves any others; "refuse" is a one-line OdkdError; "replace" removes it first
    (only what synth writes, and refuses if images/ or annotations/ hold anything else). odkd synth refuses,
    or replaces with --force.
    Returns {split: {"images", "annotations", "crowd_annotations"}}, and "detections" for unlabeled.
    """
    out_dir = Path(out_dir)
    level = _check_arguments(out_dir, train_images, val_images, test_images, unlabeled_images, seed, difficulty,
                             label_noise, missing_labels, image_size)
    if keypoints not in FORMATS:
        raise OdkdError(f"synth.keypoints: expected one of {', '.join(FORMATS)}, got {keypoints!r}")
    if unlabeled_images and keypoints not in PERSON_FORMATS:
        raise OdkdError(f"synth.unlabeled_images: the unlabelled split's detections box people, whom --keypoints "
                        f"{keypoints} does not label; give it with {', '.join(PERSON_FORMATS)}")
    if existing not in EXISTING:
        raise OdkdError(f"synth.existing: expected one of {', '.join(EXISTING)}, got {existing!r}")
    found = previous_dataset(out_dir) if existing != "write_over" else []
    if found and existing == "refuse":
        raise OdkdError(f"{out_dir}: already holds a dataset ({', '.join(found)}); odkd synth --force replaces it, "
                        f"or give an empty folder")
    if found:
        _clear_previous_dataset(out_dir)
    scene = scene_for(level)
    counts = {"train": train_images, "val": val_images, "test": test_images, "unlabeled": unlabeled_images}
    summary = {}
    first_ann_id = 1
    for plan in plan_splits(counts, label_noise, missing_labels):
        images, annotations = render_split(out_dir, plan, seed, image_size, scene, first_ann_id, progress)
        first_ann_id += len(annotations)  # over the people rendered, whatever a format keeps of them
        if plan.name == "unlabeled":  # a person format: every person kept
            detections = write_unlabeled(out_dir, plan, seed, level, images, annotations, keypoints)
            written = annotations
        else:
            written = write_annotations(out_dir / "annotations" / f"person_keypoints_{plan.name}.json",
                                        dataset_info(seed, level, plan), images, annotations, keypoints)
        summary[plan.name] = {
            "images": len(images),
            "annotations": len(written),
            "crowd_annotations": sum(a["iscrowd"] for a in written),
        }
        if plan.name == "unlabeled":
            summary[plan.name]["detections"] = detections
    return summary


def _check_arguments(out_dir: Path, train_images, val_images, test_images, unlabeled_images, seed, difficulty,
                     label_noise, missing_labels, image_size) -> float:
    """The difficulty as a number, once every argument is known good; the first bad one is a one-line OdkdError."""
    for name, value in (("train_images", train_images), ("val_images", val_images),
                        ("test_images", test_images), ("unlabeled_images", unlabeled_images), ("seed", seed)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 0:
            raise OdkdError(f"synth.{name}: expected an integer >= 0, got {value!r}")
    level = difficulty_value(difficulty)
    if isinstance(label_noise, bool) or not isinstance(label_noise, (int, float)) or not 0 <= label_noise <= 5:
        raise OdkdError(f"synth.label_noise: expected a number in [0, 5] (COCO's annotator noise is 1), "
                        f"got {label_noise!r}")
    if isinstance(missing_labels, bool) or not isinstance(missing_labels, (int, float)) or not 0 <= missing_labels < 1:
        raise OdkdError(f"synth.missing_labels: expected a share in [0, 1) of the train keypoints to leave "
                        f"unlabelled, got {missing_labels!r}")
    if len(image_size) != 2 or min(image_size) < 32:
        raise OdkdError(f"synth image_size: expected (width, height) both >= 32, got {image_size!r}")
    if out_dir.exists() and not out_dir.is_dir():
        raise OdkdError(f"{out_dir}: synthetic dataset directory is an existing file")
    return level


def previous_dataset(out_dir: Path) -> list[str]:
    """What of a dataset out_dir holds already: 'images/' and 'annotations/' when not empty, the detections file."""
    found = [f"{name}/" for name in ("images", "annotations")
             if (out_dir / name).is_dir() and any((out_dir / name).iterdir())]
    return found + [name for name in (UNLABELED_DETECTIONS,) if (out_dir / name).exists()]


def _synth_files(out_dir: Path) -> list[Path]:
    """Every file a previous synth run left in out_dir, checked to be its own: a one-line OdkdError naming the
    first file in images/ or annotations/ that synth does not write, or a JSON file that another tool made."""
    def foreign(path: Path) -> OdkdError:
        return OdkdError(f"{path}: not written by odkd synth; --force replaces only a dataset that odkd synth "
                         f"wrote, so move it away or give another folder")

    files = []
    images = out_dir / "images"
    for entry in sorted(images.iterdir()) if images.is_dir() else []:
        if entry.name not in SPLITS or not entry.is_dir() or entry.is_symlink():
            raise foreign(entry)
        for image in sorted(entry.iterdir()):
            if not (_SYNTH_IMAGE.fullmatch(image.name) and image.is_file() and not image.is_symlink()):
                raise foreign(image)
            files.append(image)
    names = {*SYNTH_ANNOTATIONS, UNLABELED_DETECTIONS}
    annotations = out_dir / "annotations"
    entries = sorted(annotations.iterdir()) if annotations.is_dir() else []
    entries += [path for path in (out_dir / UNLABELED_DETECTIONS,) if path.exists()]
    for entry in entries:
        name = entry.relative_to(out_dir).as_posix()
        if name.removesuffix(".tmp") not in names or not entry.is_file() or entry.is_symlink():
            raise foreign(entry)
        if not name.endswith(".tmp"):
            with open(entry, "rb") as f:
                head = f.read(64)
            if not head.startswith(_SYNTH_JSON_STARTS["detections" if name == UNLABELED_DETECTIONS else "annotations"]):
                raise foreign(entry)
        files.append(entry)
    return files + [path.with_name(path.name + ".tmp") for path in (out_dir / UNLABELED_DETECTIONS,)
                    if path.with_name(path.name + ".tmp").is_file()]


def _clear_previous_dataset(out_dir: Path) -> None:
    """Remove what a previous synth run wrote in out_dir (nothing else), once all of it is known to be its own."""
    for path in _synth_files(out_dir):
        path.unlink()
    for split in SPLITS:
        if (out_dir / "images" / split).is_dir():
            (out_dir / "images" / split).rmdir()
    for name in ("images", "annotations"):
        if (out_dir / name).is_dir():
            (out_dir / name).rmdir()


def plan_splits(counts: dict[str, int], label_noise: float, missing_labels: float) -> list[SplitPlan]:
    """The splits to write, in SPLITS order, with image ids running on across them; label errors go to train alone."""
    plans = []
    first_image_id = 1
    for stream, name in enumerate(SPLITS):
        if name in ("test", "unlabeled") and not counts[name]:
            continue  # no empty files: a dataset is the same bytes with or without these splits
        noise, missing = (float(label_noise), float(missing_labels)) if name == "train" else (0.0, 0.0)
        plans.append(SplitPlan(name, stream, int(counts[name]), first_image_id, noise, missing))
        first_image_id += int(counts[name])
    return plans


def render_split(
    out_dir: Path, plan: SplitPlan, seed: int, image_size: tuple[int, int], scene: Scene, first_ann_id: int,
    progress: bool,
) -> tuple[list[dict], list[dict]]:
    """Write a split's JPEGs to out_dir/images/<split>; return its COCO image entries and its annotations, with ids."""
    image_dir = out_dir / "images" / plan.name
    image_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for i in tqdm(range(plan.images), desc=f"synth {plan.name}", disable=not progress):
        image, anns = labelled_image(plan, seed, i, image_size, scene)
        image_id = plan.first_image_id + i
        file_name = f"{image_id:012d}.jpg"
        if not cv2.imwrite(str(image_dir / file_name), image, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY]):
            raise OdkdError(f"{image_dir / file_name}: could not write the JPEG")
        height, width = image.shape[:2]
        images.append(_image_entry(image_id, file_name, width, height))
        for ann in anns:
            annotations.append({**ann, "image_id": image_id, "category_id": 1, "id": first_ann_id + len(annotations)})
    return images, annotations


def labelled_image(
    plan: SplitPlan, seed: int, i: int, image_size: tuple[int, int], scene: Scene
) -> tuple[np.ndarray, list[dict]]:
    """Image i of a split and its annotations (without ids), with the split's label errors."""
    rng = np.random.default_rng([seed, plan.stream, i])
    width = int(round(image_size[0] * rng.uniform(0.8, 1.2)))
    height = int(round(image_size[1] * rng.uniform(0.8, 1.2)))
    image, anns = render_image(rng, width, height, scene)
    # each label error draws from its own stream, so it leaves every image and every other label as they were
    if plan.label_noise:
        add_annotator_noise(np.random.default_rng([seed, plan.stream, i, 1]), anns, plan.label_noise, width, height)
    if plan.missing_labels:
        unlabel_keypoints(np.random.default_rng([seed, plan.stream, i, 2]), anns, plan.missing_labels)
    return image, anns


def dataset_info(seed: int, level: float, plan: SplitPlan) -> dict:
    """The annotation file's info: the seed, and whatever sets the split apart from a default one."""
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
    if plan.label_noise:
        info["label_noise"] = plan.label_noise
    if plan.missing_labels:
        info["missing_labels"] = plan.missing_labels
    return info


def write_unlabeled(out_dir: Path, plan: SplitPlan, seed: int, level: float, images: list[dict],
                    annotations: list[dict], keypoints: str = "coco") -> int:
    """The unlabelled split's image-info, detections and true-label files; returns how many detections."""
    info = {**dataset_info(seed, level, plan), "unlabeled_images": len(images),
            "image_info": UNLABELED_IMAGE_INFO, "detections": UNLABELED_DETECTIONS,
            "true_annotations": UNLABELED_TRUE_ANNOTATIONS}
    per_image: dict[int, list[dict]] = {image["id"]: [] for image in images}
    for ann in annotations:
        per_image[ann["image_id"]].append(ann)
    detections = []
    for i, image in enumerate(images):
        # a stream after the label errors' 1 and 2: each image's boxes depend on it alone, not on how many follow
        rng = np.random.default_rng([seed, plan.stream, i, 3])
        detections += imitate_person_detector(rng, image, per_image[image["id"]])
    write_annotations(out_dir / UNLABELED_TRUE_ANNOTATIONS, info, images, annotations, keypoints)
    _write_json(out_dir / UNLABELED_DETECTIONS, detections)
    _write_json(out_dir / UNLABELED_IMAGE_INFO,
                {"info": info, "licenses": [LICENSE], "images": images, "categories": [PERSON_CATEGORY]})
    return len(detections)


def write_annotations(path: Path, info: dict, images: list[dict], annotations: list[dict],
                      keypoints: str = "coco") -> list[dict]:
    """One COCO person_keypoints file, written whole or not at all; with another keypoint set, in its format
    (odkd.synth.keypoint_formats), its name recorded as info.keypoints. Returns the annotations written."""
    categories = [PERSON_CATEGORY]
    if FORMATS[keypoints] is not None:
        images, annotations, categories = FORMATS[keypoints](images, annotations)
        info = {**info, "keypoints": keypoints}
    _write_json(path, {
        "info": info,
        "licenses": [LICENSE],
        "images": images,
        "annotations": annotations,
        "categories": categories,
    })
    return annotations


def _write_json(path: Path, content) -> None:
    """Compact JSON, written whole or not at all."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(content, separators=(",", ":")))
    os.replace(tmp, path)


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
