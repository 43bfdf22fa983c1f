"""Real annotations: bad boxes are dropped the official way and reported in one line, crowd-only images
give nothing, keypoints outside the image keep the official target weights, a missing image is a failed row."""

from __future__ import annotations

import json
import math
import shutil

import cv2
import numpy as np
import pytest
from test_cache_teachers import make_config, world  # noqa: F401  (shared fixtures)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

from odkd.config import DataConfig, parse_config
from odkd.data.dataset import TopDownDataset
from odkd.data.instances import DetectedPersons, PersonInstances, UnlabeledPersons, load_instances
from odkd.data.targets import gaussian_heatmaps
from odkd.errors import OdkdError
from odkd.store import TeacherTargets
from odkd.teachers import build_cache

from conftest import make_tiny_coco, odkd_log


def edit_annotations(ann_file, edit) -> None:
    data = json.loads(ann_file.read_text())
    edit(data)
    ann_file.write_text(json.dumps(data))


def annotation(data, ann_id) -> dict:
    return next(a for a in data["annotations"] if a["id"] == ann_id)


def test_boxes_without_a_crop_are_skipped_and_counted_in_one_line(tiny_coco, caplog):
    ann_file, image_dir = tiny_coco
    before = PersonInstances(ann_file, image_dir)
    assert [i.ann_id for i in before.instances] == [100, 101, 200, 300, 301]
    assert odkd_log(caplog) == []

    def break_boxes(data):
        annotation(data, 100)["bbox"][0] = 160.0  # starts at the 160 px image's right edge: nothing left
        annotation(data, 200)["bbox"][2] = 0.0  # zero width
        annotation(data, 301)["area"] = 0  # OKS divides by it
        annotation(data, 101)["bbox"][0] = 159.0  # one pixel column left: kept, as the official cleaning keeps it
        annotation(data, 300)["bbox"][0] = -900.0  # the official x1 = max(0, x) moves it to the left edge
    edit_annotations(ann_file, break_boxes)
    after = PersonInstances(ann_file, image_dir)

    assert [i.ann_id for i in after.instances] == [101, 300]
    assert [i.index for i in after.instances] == [0, 1]
    assert after.skipped_ann_ids == [100, 200, 301]
    assert after[0].bbox == (159.0, 20.0, 0.0, 79.0)  # x2 = min(width - 1, x1 + w - 1), y2 likewise
    assert after[1].bbox == (0.0, 10.0, 35.0, 89.0)
    np.testing.assert_array_equal(after[1].joints, before[3].joints)
    lines = odkd_log(caplog)
    assert len(lines) == 1 and "\n" not in lines[0]
    assert str(ann_file) in lines[0] and "skipped 3 " in lines[0]
    assert "annotation ids 100, 200, 301)" in lines[0] and "strict = true" in lines[0]


def test_warning_names_only_the_first_few_ids(tmp_path, caplog):
    ann_file = make_tiny_coco(tmp_path / "many", n_images=5)

    def move_everyone_out(data):
        for ann in data["annotations"]:
            ann["bbox"][1] = 500.0
    edit_annotations(ann_file, move_everyone_out)
    assert len(PersonInstances(ann_file, tmp_path / "many" / "images")) == 0
    (line,) = odkd_log(caplog)
    assert "skipped 8 " in line and "annotation ids 100, 101, 200, 300, 301, ...)" in line


def test_strict_makes_a_bad_box_an_error_naming_the_file_and_annotation(tiny_coco, caplog):
    ann_file, image_dir = tiny_coco

    def move_right_of_the_image(data):
        for ann_id in (101, 300):
            annotation(data, ann_id)["bbox"][0] = 900.0
    edit_annotations(ann_file, move_right_of_the_image)
    cfg = DataConfig(root=str(ann_file.parent.parent), val_images=image_dir.name, strict=True)
    with pytest.raises(OdkdError) as exc:
        load_instances(cfg, "val")
    message = str(exc.value)
    assert message.startswith(f"{ann_file}: annotation 101: 'bbox' [900.0, ")
    assert "lies outside its 160x120 image" in message and "\n" not in message
    assert odkd_log(caplog) == []
    assert len(load_instances(DataConfig(root=cfg.root, val_images=cfg.val_images), "val")) == 3


def write_detections(path, image_ids) -> None:
    path.write_text(json.dumps([{"image_id": i, "category_id": 1, "bbox": [20.0, 10.0, 36.0, 90.0], "score": 0.9}
                                for i in image_ids]))


def test_detections_on_images_not_annotated_are_skipped_and_counted_in_one_line(tiny_coco, tmp_path, caplog):
    """A full val2017 detections file on a val subset: the other images' boxes are skipped, the rest kept."""
    ann_file, image_dir = tiny_coco
    coco = PersonInstances(ann_file, image_dir).coco
    dets = tmp_path / "dets.json"
    write_detections(dets, [1, 999999, 2, 999999, 3, 424242])
    caplog.clear()
    kept = DetectedPersons(dets, coco, image_dir)
    assert [inst.image_id for inst in kept.instances] == [1, 2, 3]
    (line,) = odkd_log(caplog)
    assert line == (f"warning: {dets}: skipped 3 detection(s) on 2 image(s) not in the annotations "
                    f"(image ids 999999, 424242); [data] strict = true makes this an error")


def test_strict_makes_a_detection_on_an_unknown_image_an_error(tiny_coco, tmp_path, caplog):
    ann_file, image_dir = tiny_coco
    coco = PersonInstances(ann_file, image_dir).coco
    dets = tmp_path / "dets.json"
    write_detections(dets, [1, 999999])
    caplog.clear()
    with pytest.raises(OdkdError) as exc:
        DetectedPersons(dets, coco, image_dir, strict=True)
    assert str(exc.value) == f"{dets}: detection [1] image_id 999999 is not in the annotations ([data] strict = true)"
    assert odkd_log(caplog) == []


def test_strict_is_a_data_key():
    assert parse_config("[data]\nstrict = true\n").data.strict is True
    assert parse_config("").data.strict is False
    with pytest.raises(OdkdError, match="data.strict: expected true or false"):
        parse_config("[data]\nstrict = 1\n")


def test_fingerprint_covers_the_kept_instances(tiny_coco):
    ann_file, image_dir = tiny_coco
    original = PersonInstances(ann_file, image_dir).fingerprint
    text = ann_file.read_text()
    edit_annotations(ann_file, lambda data: annotation(data, 200).update(area=0))
    dropped = PersonInstances(ann_file, image_dir).fingerprint
    ann_file.write_text(text)
    edit_annotations(ann_file, lambda data: data["annotations"].remove(annotation(data, 200)))
    removed = PersonInstances(ann_file, image_dir).fingerprint
    assert dropped != original
    assert dropped == removed  # a dropped box is as if it were not there: a cache keys on what is kept


def test_crowd_only_image_gives_no_instance_and_no_warning(tiny_coco, caplog):
    ann_file, image_dir = tiny_coco
    cv2.imwrite(str(image_dir / "crowd.jpg"), np.zeros((120, 160, 3), np.uint8))

    def add_crowd_image(data):
        data["images"].append({"id": 9, "file_name": "crowd.jpg", "width": 160, "height": 120})
        crowd = dict(annotation(data, 100), id=900, image_id=9, iscrowd=1)  # labelled keypoints, still a crowd
        data["annotations"].append(crowd)
        data["annotations"].append(dict(crowd, id=901, bbox=[500, 500, 10, 10]))  # a crowd box is never counted
    edit_annotations(ann_file, add_crowd_image)
    inst = PersonInstances(ann_file, image_dir)
    assert 9 in inst.coco.imgs and [i.ann_id for i in inst.instances] == [100, 101, 200, 300, 301]
    assert all(i.image_id != 9 for i in inst.instances)
    assert odkd_log(caplog) == []


def test_keypoints_outside_the_image_are_kept_as_labelled(tiny_coco):
    ann_file, image_dir = tiny_coco

    def move_joints(data):
        kpts = annotation(data, 100)["keypoints"]
        kpts[0:3] = [-3.0, 40.0, 2]  # left of the image, inside the padded crop
        kpts[3:6] = [-200.0, 40.0, 1]  # far outside the crop
        kpts[6:9] = [170.0, 40.0, 0]  # unlabelled
    edit_annotations(ann_file, move_joints)
    inst = PersonInstances(ann_file, image_dir)
    np.testing.assert_array_equal(inst[0].joints[:3], [[-3, 40, 2], [-200, 40, 1], [170, 40, 0]])

    cfg = DataConfig(input_size=(96, 128), heatmap_size=(24, 32), sigma=1.0)
    sample = TopDownDataset(inst, cfg, train=False)[0]
    weight, heatmaps = sample["target_weight"][:, 0], sample["heatmaps"]
    assert weight[:3].tolist() == [1.0, 0.0, 0.0]
    assert heatmaps[0].max() == 1.0 and heatmaps[0, :, 0].max() == 1.0  # peak in the first column
    assert heatmaps[1].max() == 0 and heatmaps[2].max() == 0
    assert weight[3:].min() == 1.0


@pytest.mark.parametrize("x, y, weight, peak, peak_cell", [
    # heatmap 24x32, stride 4, sigma 2: the 13x13 patch reaches 6 cells from mu = int(x / 4 + 0.5)
    (116.0, 64.0, 1.0, math.exp(-36 / 8), (16, 23)),  # mu_x 29: only the patch's left column lands
    (120.0, 64.0, 0.0, 0.0, None),  # mu_x 30: ul = 24 = heatmap width, the patch misses
    (-6.4, 64.0, 1.0, math.exp(-1 / 8), (16, 0)),  # int(-1.1) = -1: truncated towards zero, as int() officially
    (-30.0, 64.0, 1.0, 0.0, None),  # mu_x -7: br = 0 is not < 0, so the weight stays 1 over an empty map
    (-34.0, 64.0, 0.0, 0.0, None),  # mu_x -8: br = -1 < 0
    (40.0, 130.0, 1.0, math.exp(-4 / 8), (31, 10)),  # mu_y 33, below the 32 rows: its top rows land
])
def test_target_weight_follows_the_official_gaussian_bounds(x, y, weight, peak, peak_cell):
    heatmaps, weights = gaussian_heatmaps(np.array([[x, y]], np.float32), np.array([1]), (96, 128), (24, 32), 2.0)
    assert weights[0, 0] == weight
    hm = heatmaps[0]
    assert hm.max() == pytest.approx(peak, rel=1e-6)
    if peak_cell:
        assert np.unravel_index(hm.argmax(), hm.shape) == peak_cell


def test_unlabelled_joint_has_no_target():
    heatmaps, weights = gaussian_heatmaps(np.array([[40.0, 64.0]] * 2, np.float32), np.array([2, 0]),
                                          (96, 128), (24, 32), 2.0)
    assert weights[:, 0].tolist() == [1.0, 0.0]
    assert heatmaps[0].max() == 1.0 and heatmaps[1].max() == 0.0


def test_missing_image_is_a_failed_row_not_an_abort(world, tmp_path):  # noqa: F811
    data = tmp_path / "data"
    shutil.copytree(world / "data", data)
    cfg = make_config(data, world / "runs", margin=1.0)
    instances = load_instances(cfg.data, "train")
    missing = instances.image_path(instances[8])
    missing.unlink()
    hit = [i.index for i in instances.instances if instances.image_path(i) == missing]
    url = build_cache(cfg, "train", str(tmp_path / "s.zarr"), scheduler="synchronous", progress=False)

    targets = TeacherTargets.open(url, dataset_fingerprint=instances.fingerprint)
    assert targets.attrs["complete"]
    failed = targets.attrs["failed"]
    assert [f["index"] for f in failed] == hit and len(hit) >= 1
    assert all(f["file"] == str(missing) and "image not found" in f["reason"] for f in failed)
    ok = targets.get_batch(np.arange(len(instances)))["meta/ok"]
    assert [i for i in range(len(instances)) if not ok[i]] == hit


# A good box, then each kind of bad record a detections file can hold: a score that is a string, null or NaN,
# an image_id that is a list, a box whose crop centre or scale is not finite, and a last good one.
BAD_RECORDS = [
    {"image_id": 1, "category_id": 1, "bbox": [20.0, 10.0, 36.0, 90.0], "score": 0.9},
    {"image_id": 1, "category_id": 1, "bbox": [20.0, 10.0, 36.0, 90.0], "score": "0.9"},
    {"image_id": 2, "category_id": 1, "bbox": [20.0, 10.0, 36.0, 90.0], "score": None},
    {"image_id": 2, "category_id": 1, "bbox": [20.0, 10.0, 36.0, 90.0], "score": float("nan")},
    {"image_id": [1, 2], "category_id": 1, "bbox": [20.0, 10.0, 36.0, 90.0], "score": 0.9},
    {"image_id": 2, "category_id": 1, "bbox": [0.0, 0.0, float("inf"), 100.0], "score": 0.9},
    {"image_id": 3, "category_id": 1, "bbox": [0.0, 0.0, 1e300, 1e300], "score": 0.9},
    {"image_id": 3, "category_id": 2, "bbox": [20.0, 10.0, 36.0, 90.0], "score": None},  # not a person: not counted
    {"image_id": 3, "category_id": 1, "bbox": [20.0, 10.0, 36.0, 90.0], "score": 0.8},
]


def bad_record_lines(path, noun: str) -> list[str]:
    tail = "[data] strict = true makes this an error"
    return [f"warning: {path}: skipped 3 {noun} with a 'score' that is not a finite number (detections [1, 2, 3]); "
            f"{tail}",
            f"warning: {path}: skipped 1 {noun} with an 'image_id' that is not an integer (detections [4]); {tail}",
            f"warning: {path}: skipped 2 {noun} with a box too large or not finite for a crop (detections [5, 6]); "
            f"{tail}"]


def test_bad_detection_records_are_skipped_and_counted_per_kind(tiny_coco, tmp_path, caplog):
    ann_file, image_dir = tiny_coco
    coco = PersonInstances(ann_file, image_dir).coco
    dets = tmp_path / "dets.json"
    dets.write_text(json.dumps(BAD_RECORDS))  # NaN and Infinity as Python's json writes them
    caplog.clear()
    kept = DetectedPersons(dets, coco, image_dir)
    assert [(inst.image_id, inst.score) for inst in kept.instances] == [(1, 0.9), (3, 0.8)]
    assert all(np.isfinite(inst.center).all() and np.isfinite(inst.scale).all() for inst in kept.instances)
    assert odkd_log(caplog) == bad_record_lines(dets, "detection(s)")


@pytest.mark.parametrize("first_bad, message", [
    (1, "detection [1] 'score' \"0.9\" is not a finite number"),
    (2, "detection [2] 'score' null is not a finite number"),
    (3, "detection [3] 'score' NaN is not a finite number"),
    (4, "detection [4] 'image_id' [1, 2] is not an integer"),
    (5, "detection [5] 'bbox' [0.0, 0.0, Infinity, 100.0] is too large or not finite for a crop"),
    (6, "detection [6] 'bbox' [0.0, 0.0, 1e+300, 1e+300] is too large or not finite for a crop"),
])
def test_strict_makes_a_bad_detection_record_one_error_line(tiny_coco, tmp_path, caplog, first_bad, message):
    ann_file, image_dir = tiny_coco
    coco = PersonInstances(ann_file, image_dir).coco
    dets = tmp_path / "dets.json"
    dets.write_text(json.dumps(BAD_RECORDS[:1] + BAD_RECORDS[first_bad:]))
    caplog.clear()
    with pytest.raises(OdkdError) as exc:
        DetectedPersons(dets, coco, image_dir, strict=True)
    assert str(exc.value) == f"{dets}: {message.replace(f'[{first_bad}]', '[1]')} ([data] strict = true)"
    assert odkd_log(caplog) == []


def test_bad_unlabelled_boxes_are_skipped_and_counted_per_kind(tiny_coco, tmp_path, caplog):
    """The tiny set's annotation file is an image-info file too (its 'images' list), its images unlabelled."""
    ann_file, image_dir = tiny_coco
    dets = tmp_path / "boxes.json"
    dets.write_text(json.dumps(BAD_RECORDS))
    caplog.clear()
    persons = UnlabeledPersons(ann_file, dets, image_dir, min_score=0.5)
    assert [(p.image_id, p.ann_id, p.score) for p in persons] == [(1, 0, 0.9), (3, 8, 0.8)]
    assert list(persons.skipped) == ["with a 'score' that is not a finite number",
                                     "with an 'image_id' that is not an integer",
                                     "with a box too large or not finite for a crop"]
    assert odkd_log(caplog) == bad_record_lines(dets, "box(es)")
    with pytest.raises(OdkdError) as exc:
        UnlabeledPersons(ann_file, dets, image_dir, strict=True)
    assert str(exc.value) == f"{dets}: detection [1] 'score' \"0.9\" is not a finite number ([data] strict = true)"
    dets.write_text(json.dumps(BAD_RECORDS[:1] + BAD_RECORDS[5:]))
    with pytest.raises(OdkdError) as exc:
        UnlabeledPersons(ann_file, dets, image_dir, strict=True)
    assert str(exc.value) == (f"{dets}: detection [1] (image_id 2) is with a box too large or not finite for a "
                              f"crop ([data] strict = true)")
