"""Shared fixtures: a tiny hand-made COCO-format dataset (independent of the synthetic generator), and a
tiny world of synthetic data with two seeded tiny teachers."""

import json
import logging
import os
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from odkd.data.keypoints import KEYPOINT_NAMES, SKELETON
from odkd.synth import make_synthetic_dataset
from odkd.models import build_model, save_checkpoint
from odkd.store.local import LOCAL_COPIES_ENV

# the tiny teacher pair of the cache and student tests: role -> (model_args, seg_head)
TINY_TEACHERS = {"primary": ({"width": 8}, False), "senior": ({"width": 8}, True)}


def hrnet_tiny_teachers_toml(primary_width: int, senior_width: int) -> str:
    """[teachers.*] of two hrnet_tiny teachers of these widths, the senior with a seg head."""
    return f"""[teachers.primary]
model = "hrnet_tiny"
model_args = {{ width = {primary_width} }}
[teachers.senior]
model = "hrnet_tiny"
model_args = {{ width = {senior_width} }}
seg_head = true"""


TINY_TEACHERS_TOML = hrnet_tiny_teachers_toml(8, 8)


def _person_keypoints(x0: float, y0: float, h: float) -> list[float]:
    """17 plausible keypoints of an upright person whose box starts at (x0, y0) with height h."""
    w = 0.4 * h
    cx = x0 + w / 2
    rel = [(0, .08), (-.05, .06), (.05, .06), (-.1, .07), (.1, .07), (-.3, .2), (.3, .2), (-.4, .38),
           (.4, .38), (-.45, .55), (.45, .55), (-.18, .55), (.18, .55), (-.2, .77), (.2, .77), (-.2, .97),
           (.2, .97)]
    out = []
    for dx, dy in rel:
        out += [round(cx + dx * w, 2), round(y0 + dy * h, 2), 2]
    return out


def make_tiny_coco(root: Path, n_images: int = 3, size=(160, 120)) -> Path:
    """Images with one or two people each; polygon, compressed-RLE and uncompressed-RLE masks and a crowd region."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    images, anns = [], []
    w_img, h_img = size
    for i in range(1, n_images + 1):
        img = rng.integers(0, 255, (h_img, w_img, 3), dtype=np.uint8)
        file_name = f"{i:012d}.jpg"
        cv2.imwrite(str(root / "images" / file_name), img)
        images.append({"id": i, "file_name": file_name, "width": w_img, "height": h_img})
        for j, (x0, y0, h) in enumerate([(20, 10, 90), (90, 20, 80)][: 1 + (i % 2)]):
            w = 0.4 * h
            poly = [x0, y0, x0 + w, y0, x0 + w, y0 + h, x0, y0 + h]
            seg = [poly]
            kind = (i + j) % 3
            if kind:
                m = np.zeros((h_img, w_img), np.uint8)
                cv2.fillPoly(m, [np.array(poly, np.float32).reshape(-1, 2).round().astype(np.int32)], 1)
                rle = mask_utils.encode(np.asfortranarray(m))
                if kind == 1:
                    seg = {"size": rle["size"], "counts": rle["counts"].decode("ascii")}
                else:
                    flat = m.flatten(order="F")
                    changes = np.flatnonzero(np.diff(flat)) + 1
                    runs = np.diff(np.concatenate([[0], changes, [flat.size]]))
                    counts = ([0] if flat[0] else []) + runs.tolist()
                    seg = {"size": [h_img, w_img], "counts": counts}
            anns.append({"id": 100 * i + j, "image_id": i, "category_id": 1, "iscrowd": 0,
                         "bbox": [x0, y0, w, h], "area": w * h, "segmentation": seg,
                         "keypoints": _person_keypoints(x0, y0, h), "num_keypoints": 17})
        crowd = np.zeros((h_img, w_img), np.uint8)
        crowd[80:110, 120:150] = 1
        rle = mask_utils.encode(np.asfortranarray(crowd))
        anns.append({"id": 100 * i + 50, "image_id": i, "category_id": 1, "iscrowd": 1,
                     "bbox": [120, 80, 30, 30], "area": 900,
                     "segmentation": {"size": rle["size"], "counts": rle["counts"].decode("ascii")},
                     "keypoints": [0] * 51, "num_keypoints": 0})
    categories = [{"id": 1, "name": "person", "supercategory": "person",
                   "keypoints": list(KEYPOINT_NAMES), "skeleton": [list(s) for s in SKELETON]}]
    ann_file = root / "annotations" / "person_keypoints_val.json"
    ann_file.write_text(json.dumps({"images": images, "annotations": anns, "categories": categories}))
    return ann_file


@pytest.fixture(scope="session", autouse=True)
def local_copies(tmp_path_factory):
    """Local copies of stores go to a folder of the session's own, never the user's ~/.cache; subprocesses
    (torchrun, the CLI) inherit it."""
    folder = tmp_path_factory.mktemp("local-copies")
    os.environ[LOCAL_COPIES_ENV] = str(folder)
    return folder


@pytest.fixture
def tiny_coco(tmp_path):
    ann_file = make_tiny_coco(tmp_path / "tiny")
    return ann_file, tmp_path / "tiny" / "images"


def tiny_teacher(seg_head: bool, **model_args) -> torch.nn.Module:
    """hrnet_tiny moved away from its near-zero init, so its maps and masks have structure."""
    model = build_model("hrnet_tiny", seg_head=seg_head, **model_args)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def make_tiny_world(base: Path, val_images: int = 2, val_aps: dict | None = None) -> Path:
    """A 6-image synthetic dataset (16 train instances) and the two tiny teachers, seeded, at
    base/runs/teacher_ROLE/best.pth (with `val_aps[role]` recorded as their best_ap)."""
    make_synthetic_dataset(base / "data", train_images=6, val_images=val_images, seed=0)
    torch.manual_seed(0)
    for role, (args, seg) in TINY_TEACHERS.items():
        save_checkpoint(base / "runs" / f"teacher_{role}" / "best.pth", tiny_teacher(seg, **args),
                        model_name="hrnet_tiny", model_args=args, seg_head=seg,
                        extra={"best_ap": val_aps[role]} if val_aps else None)
    return base


def odkd_log(caplog, level: int = logging.WARNING) -> list[str]:
    """The messages that odkd's loggers sent at `level` or above in this test (since caplog.clear())."""
    return [r.getMessage() for r in caplog.records if r.name.startswith("odkd.") and r.levelno >= level]


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread: two OpenMP threads spin at every barrier when other processes hold the cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# The released demo teachers: trained on the demo's synthetic people at the tests' geometry (96x128 crops,
# 24x32 maps), so they and students that start from them score above 0 on make_tiny_world's val split,
# where the tiny teachers above score 0 and a test could not tell one checkpoint's AP from another's.
ZOO = Path(__file__).resolve().parents[1] / "zoo"


def from_zoo_primary(toml: str) -> str:
    """student_toml's pipeline with the student as the zoo's primary teacher (hrnet_tiny, width 12) and
    initialised from it."""
    student = 'model = "mobilenetv2_tiny"'
    assert toml.count(student) == 1, "student_toml no longer names the student's model once"
    return toml.replace(student, f'model = "hrnet_tiny"\nmodel_args = {{ width = 12 }}\n'
                                 f'init = "{ZOO / "demo_primary.pth"}"')
