"""A detections file's own categories (`odkd evaluate --boxes`, `[data.unlabeled] boxes`): each box keeps its
category_id and is scored in it, boxes of a category the pipeline does not read ([data] categories) are
dropped and counted in the log, and COCO's person boxes (category 1) are read as they always were."""

import json
import logging
from pathlib import Path

import pytest

from conftest import make_tiny_coco, odkd_log
from odkd.config import parse_config
from odkd.data.instances import DetectedPersons, PersonInstances, UnlabeledPersons, load_instances
from odkd.errors import OdkdError
from odkd.eval.evaluate import evaluate_checkpoint
from odkd.models import build_model, save_checkpoint
from odkd.synth import make_synthetic_dataset

pytestmark = pytest.mark.usefixtures("one_torch_thread")
DOG, CAT, HORSE = 1, 2, 3  # the synthetic animals' species, and one the files do not have


@pytest.fixture(scope="module")
def animals(tmp_path_factory):
    """Synthetic AP-10K val images (dogs and cats by turns), a detections file of every animal's box under
    its species plus two horses and one box without a category, and its pipeline."""
    base = tmp_path_factory.mktemp("animals")
    make_synthetic_dataset(base / "data", train_images=0, val_images=4, keypoints="ap10k")
    val = json.loads((base / "data" / "annotations" / "person_keypoints_val.json").read_text())
    animals = [a for a in val["annotations"] if not a["iscrowd"] and a["num_keypoints"]]
    boxes = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.9}
             for a in animals]
    boxes += [{**boxes[0], "category_id": HORSE}, {**boxes[-1], "category_id": HORSE},
              {key: value for key, value in boxes[0].items() if key != "category_id"}]  # a person box: a dog
    detections = base / "dets.json"
    detections.write_text(json.dumps(boxes))
    (base / "data" / "image_info.json").write_text(json.dumps({k: val[k] for k in ("images", "categories")}))
    return base / "data", detections, [(b["image_id"], b.get("category_id", DOG)) for b in boxes]


def animal_pipeline(root: Path, detections: Path, *categories: str):
    """An AP-10K pipeline on the synthetic animals reading `categories` (all by default), with the val images
    as an unlabelled split boxed by `detections`."""
    return parse_config(f"""
[data]
root = "{root}"
keypoints = "ap10k"
categories = {json.dumps(list(categories))}
[data.unlabeled]
images = "images/val"
image_info = "image_info.json"
boxes = "{detections}"
""")


def dropped_line(detections: Path, count: int, categories: str, reads: str) -> str:
    return (f"{detections}: dropped {count} box(es) of categories the pipeline does not read (category_id "
            f"{categories}; it reads {reads}, [data] categories)")


@pytest.mark.parametrize("names, kept, dropped", [((), {DOG, CAT}, "3"), (("cat",), {CAT}, "1, 3")])
def test_each_box_keeps_its_category_and_the_others_are_counted(animals, caplog, names, kept, dropped):
    root, detections, boxes = animals
    data = animal_pipeline(root, detections, *names).data
    gt = load_instances(data, "val")
    assert gt.category_ids == tuple(sorted(kept))
    want = [box for box in boxes if box[1] in kept]
    caplog.clear()
    caplog.set_level(logging.INFO, logger="odkd")
    found = DetectedPersons(detections, gt.coco, data.image_dir("val"), num_keypoints=17, categories=gt.category_ids)
    assert [(i.image_id, i.category_id) for i in found] == want
    reads = ", ".join(map(str, sorted(kept)))
    assert odkd_log(caplog, logging.INFO) == [dropped_line(detections, len(boxes) - len(want), dropped, reads)]
    caplog.clear()
    unlabeled = load_instances(data, "unlabeled")  # the image-info file's categories name them as val's do
    assert unlabeled.category_ids == gt.category_ids
    assert sorted((i.image_id, i.category_id) for i in unlabeled) == sorted(want)
    assert odkd_log(caplog, logging.INFO) == [dropped_line(detections, len(boxes) - len(want), dropped, reads)]


def test_results_from_detections_are_scored_in_their_boxes_categories(animals, tmp_path):
    root, detections, boxes = animals
    checkpoint = tmp_path / "tiny.pth"
    save_checkpoint(checkpoint, build_model("hrnet_tiny"), model_name="hrnet_tiny", model_args={}, seg_head=False)
    for names, kept in (((), {DOG, CAT}), (("dog",), {DOG})):
        report = evaluate_checkpoint(animal_pipeline(root, detections, *names), str(checkpoint),
                                     boxes=str(detections), device="cpu")
        assert {r["category_id"] for r in report.results} == kept
        assert {(r["image_id"], r["category_id"]) for r in report.results} <= set(boxes)


def test_an_image_info_file_without_categories_keeps_category_1_unless_categories_are_named(animals, tmp_path):
    root, detections, boxes = animals
    info = tmp_path / "info.json"
    info.write_text(json.dumps({"images": json.loads((root / "image_info.json").read_text())["images"]}))
    images = root / "images" / "val"
    people = UnlabeledPersons(info, detections, images)
    assert people.category_ids == (1,) and [(i.image_id, i.category_id) for i in people] == sorted(
        box for box in boxes if box[1] == DOG)
    with pytest.raises(OdkdError) as error:
        UnlabeledPersons(info, detections, images, categories=("dog",))
    assert str(error.value) == f"{info}: no 'categories' to find [data] categories 'dog' in"


# COCO person boxes: one without a category_id (a person, as HRNet's files have none) and one of category 2
PERSON_BOXES = [
    {"image_id": 1, "category_id": 1, "bbox": [20.0, 10.0, 36.0, 90.0], "score": 0.9},
    {"image_id": 2, "bbox": [90.0, 20.0, 32.0, 80.0], "score": 0.7},
    {"image_id": 3, "category_id": 1, "bbox": [22.5, 11.0, 35.0, 88.0], "score": 0.6},
    {"image_id": 3, "category_id": 2, "bbox": [20.0, 10.0, 36.0, 90.0], "score": 0.95},
]
# UnlabeledPersons' fingerprint of PERSON_BOXES on the tiny set, as odkd computed it before boxes kept their
# category: a store of person boxes made then resumes
PERSON_BOXES_FINGERPRINT = "sha256:decbd0e4b8c19b774f3810a8141557f3"


def test_coco_person_boxes_are_read_as_before(tmp_path):
    ann_file = make_tiny_coco(tmp_path / "tiny")
    images = tmp_path / "tiny" / "images"
    detections = tmp_path / "dets.json"
    detections.write_text(json.dumps(PERSON_BOXES))
    gt = PersonInstances(ann_file, images)
    assert gt.category_ids == (1,)
    found = DetectedPersons(detections, gt.coco, images, categories=gt.category_ids)
    assert [(i.image_id, i.category_id, i.score) for i in found] == [(1, 1, 0.9), (2, 1, 0.7), (3, 1, 0.6)]
    unlabeled = UnlabeledPersons(ann_file, detections, images)  # the tiny annotation file as an image-info file
    assert unlabeled.fingerprint == PERSON_BOXES_FINGERPRINT
    assert [(i.image_id, i.ann_id, i.category_id, i.score) for i in unlabeled] == [
        (1, 0, 1, 0.9), (2, 1, 1, 0.7), (3, 2, 1, 0.6)]
