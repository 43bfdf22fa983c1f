"""The synthetic dataset is valid COCO person_keypoints, deterministic, and its labels match its pixels."""

import hashlib
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from click.testing import CliRunner

from odkd.cli import main
from odkd.config import DataConfig, parse_config
from odkd.data.keypoints import COCO_SIGMAS, KEYPOINT_NAMES
from odkd.errors import OdkdError
from odkd.synth import make_synthetic_dataset
from odkd.synth.annotation import mask_polygons, person_annotation, uncompressed_rle_counts
from odkd.synth.appearance import render_person
from odkd.synth.body import Pose, View, sample_body
from odkd.synth.dataset import PERSON_CATEGORY
from odkd.synth.detections import detection_hardness, imitate_person_detector
from odkd.synth.scene import EASY, HARD, MEDIUM, scene_for

SPLITS = ("train", "val")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """16 train + 4 val images; seed 0 gives crowds in both RLE formats at this size."""
    root = tmp_path_factory.mktemp("synth")
    summary = make_synthetic_dataset(root, train_images=16, val_images=4, seed=0)
    cocos = {split: COCO(str(root / "annotations" / f"person_keypoints_{split}.json")) for split in SPLITS}
    return root, summary, cocos


def _persons(cocos):
    return [(coco, a) for coco in cocos.values() for a in coco.dataset["annotations"] if not a["iscrowd"]]


def _tree_digest(root: Path) -> dict[str, str]:
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def test_layout_images_and_categories_are_coco(dataset):
    root, summary, cocos = dataset
    ids = []
    for split, coco in cocos.items():
        data = coco.dataset
        assert set(data) == {"info", "licenses", "images", "annotations", "categories"}
        assert data["categories"] == [PERSON_CATEGORY]
        assert data["categories"][0]["keypoints"][5] == "left_shoulder"
        assert [16, 14] in data["categories"][0]["skeleton"] and len(data["categories"][0]["skeleton"]) == 19
        assert summary[split]["images"] == len(data["images"]) == (16 if split == "train" else 4)
        assert summary[split]["annotations"] == len(data["annotations"])
        for info in data["images"]:
            assert info["file_name"] == f"{info['id']:012d}.jpg"
            pixels = cv2.imread(str(root / "images" / split / info["file_name"]))
            assert pixels.shape == (info["height"], info["width"], 3)
            ids.append(info["id"])
        for ann in data["annotations"]:
            assert ann["category_id"] == 1 and ann["image_id"] in coco.imgs
            assert len(ann["keypoints"]) == 51
    assert ids == list(range(1, 21))  # unique across splits, as in COCO; val follows train
    ann_ids = [a["id"] for c in cocos.values() for a in c.dataset["annotations"]]
    assert len(set(ann_ids)) == len(ann_ids)
    sizes = {(i["width"], i["height"]) for c in cocos.values() for i in c.dataset["images"]}
    assert len(sizes) > 5
    assert all(0.79 * 320 <= w <= 1.21 * 320 and 0.79 * 256 <= h <= 1.21 * 256 for w, h in sizes)


def test_boxes_keypoints_and_flags_are_consistent(dataset):
    _, _, cocos = dataset
    for coco, ann in _persons(cocos):
        img = coco.imgs[ann["image_id"]]
        x, y, w, h = ann["bbox"]
        assert w > 0 and h > 0 and x >= 0 and y >= 0
        assert x + w <= img["width"] and y + h <= img["height"]
        kps = np.array(ann["keypoints"]).reshape(17, 3)
        assert set(kps[:, 2]) <= {0, 1, 2}
        assert ann["num_keypoints"] == int((kps[:, 2] > 0).sum())
        assert (kps[kps[:, 2] == 0] == 0).all()  # unlabelled points are exactly (0, 0, 0)
        labelled = kps[kps[:, 2] > 0]
        assert ((labelled[:, 0] >= 0) & (labelled[:, 0] < img["width"])).all()
        assert ((labelled[:, 1] >= 0) & (labelled[:, 1] < img["height"])).all()


def test_polygons_decode_to_their_area(dataset):
    _, _, cocos = dataset
    persons = _persons(cocos)
    assert persons
    for coco, ann in persons:
        assert isinstance(ann["segmentation"], list) and all(len(p) >= 6 for p in ann["segmentation"])
        mask = coco.annToMask(ann)
        assert abs(int(mask.sum()) - ann["area"]) <= 0.01 * ann["area"] + 1
        ys, xs = np.nonzero(mask)
        assert ann["bbox"] == [xs.min(), ys.min(), xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()]


def test_crowds_are_rle_in_both_formats(dataset):
    _, summary, cocos = dataset
    crowds = [(coco, a) for coco in cocos.values() for a in coco.dataset["annotations"] if a["iscrowd"]]
    assert len(crowds) == sum(s["crowd_annotations"] for s in summary.values())
    kinds = {type(a["segmentation"]["counts"]) for _, a in crowds}
    assert kinds == {str, list}
    for coco, ann in crowds:
        img = coco.imgs[ann["image_id"]]
        assert ann["segmentation"]["size"] == [img["height"], img["width"]]
        assert ann["num_keypoints"] == 0 and ann["keypoints"] == [0] * 51
        mask = coco.annToMask(ann)
        assert int(mask.sum()) == ann["area"] > 0


def test_visible_keypoints_lie_on_their_own_mask(dataset):
    _, _, cocos = dataset
    distances = []
    for coco, ann in _persons(cocos):
        outside = cv2.distanceTransform(1 - coco.annToMask(ann), cv2.DIST_L2, 3)
        kps = np.array(ann["keypoints"]).reshape(17, 3)
        distances += [outside[y, x] for x, y, v in kps if v == 2]
    distances = np.array(distances)
    assert len(distances) > 100
    assert (distances == 0).mean() > 0.98
    assert distances.max() <= 3


def test_scenes_have_crowding_occlusion_and_hard_people(dataset):
    _, _, cocos = dataset
    persons = _persons(cocos)
    per_image = np.bincount([a["image_id"] for _, a in persons])
    assert per_image.max() >= 3
    flags = np.array([a["keypoints"][2::3] for _, a in persons])
    assert (flags == 1).sum() > 20 and (flags == 2).sum() > 100
    assert min(a["num_keypoints"] for _, a in persons) <= 3
    areas = np.array([a["area"] for _, a in persons])
    assert areas.max() > 20 * areas.min()


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    a, b, c = (tmp_path / n for n in "abc")
    make_synthetic_dataset(a, train_images=3, val_images=2, seed=7)
    make_synthetic_dataset(b, train_images=3, val_images=2, seed=7)
    make_synthetic_dataset(c, train_images=3, val_images=2, seed=8)
    digest_a = _tree_digest(a)
    assert len(digest_a) == 7
    assert digest_a == _tree_digest(b)
    digest_c = _tree_digest(c)
    assert digest_c.keys() == digest_a.keys()
    assert all(digest_c[name] != digest_a[name] for name in digest_a)


def _single_person(yaw: float) -> dict:
    """A large upright person with arms held out, seen from one side, on an empty canvas."""
    rng = np.random.default_rng(0)
    width, height = 240, 320
    image = np.zeros((height, width, 3), np.uint8)
    owner = np.full((height, width), -1, np.int16)
    part_map = np.zeros((height, width), np.uint8)
    pose = Pose(
        trunk=np.zeros(5),
        arms=np.array([[10.0, 60.0, 0.0, 10.0]] * 2),
        legs=np.array([[0.0, 8.0, 0.0, 5.0]] * 2),
    )
    view = View(yaw=yaw, elevation=0.0, roll=0.0, scale=280.0, cx=120.0, cy=165.0)
    person = render_person(rng, image, owner, part_map, 0, sample_body(rng), pose, view)
    ann = person_annotation(owner, part_map, person)
    return {name: tuple(ann["keypoints"][3 * k : 3 * k + 3]) for k, name in enumerate(KEYPOINT_NAMES)}


def test_front_back_and_profile_views_respect_left_and_right():
    front, back, facing_right = _single_person(0.0), _single_person(180.0), _single_person(90.0)
    # facing the camera the person's left is on the image's right; from behind it is on the left
    for side in ("shoulder", "wrist", "hip", "ankle"):
        assert front[f"left_{side}"][0] > front[f"right_{side}"][0]
        assert back[f"left_{side}"][0] < back[f"right_{side}"][0]
    assert all(front[name][2] == 2 for name in KEYPOINT_NAMES)
    assert back["nose"] == back["left_eye"] == back["right_eye"] == (0, 0, 0)
    assert back["left_ear"][2] > 0 and back["right_ear"][2] > 0
    # in profile the far (left) side is behind the body; the far ear is not labelled at all
    assert facing_right["right_shoulder"][2] == 2 and facing_right["left_shoulder"][2] == 1
    assert facing_right["right_hip"][2] == 2 and facing_right["left_hip"][2] == 1
    assert facing_right["left_ear"] == (0, 0, 0) and facing_right["nose"][2] == 2
    assert facing_right["nose"][0] > facing_right["right_ear"][0]


def test_mask_polygons_and_uncompressed_rle_round_trip():
    rng = np.random.default_rng(1)
    mask = np.zeros((60, 80), np.uint8)
    cv2.ellipse(mask, (30, 30), (20, 9), 30, 0, 360, 1, -1)
    mask[5:8, 50:78] = 1
    mask[0, 0] = 1  # a single pixel: too small for a polygon
    polygons = mask_polygons(mask)
    decoded = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(polygons, 60, 80)))
    expected = mask.copy()
    expected[0, 0] = 0
    assert np.array_equal(decoded, expected)
    for starts_with_one in (False, True):
        blob = (rng.random((23, 17)) < 0.4).astype(np.uint8)
        blob[0, 0] = starts_with_one
        counts = uncompressed_rle_counts(blob)
        assert sum(counts) == blob.size and (counts[0] == 0) == starts_with_one
        rle = mask_utils.frPyObjects({"counts": counts, "size": [23, 17]}, 23, 17)
        assert np.array_equal(mask_utils.decode(rle), blob)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"train_images": -1}, "synth.train_images"),
        ({"seed": 1.5}, "synth.seed"),
        ({"image_size": (10, 256)}, "image_size"),
        ({"test_images": -2}, "synth.test_images"),
        ({"unlabeled_images": -1}, "synth.unlabeled_images"),
        ({"difficulty": "extreme"}, "synth.difficulty"),
        ({"difficulty": 1.5}, "synth.difficulty"),
        ({"difficulty": True}, "synth.difficulty"),
    ],
)
def test_bad_arguments_are_one_line_errors(tmp_path, kwargs, field):
    with pytest.raises(OdkdError, match=field) as err:
        make_synthetic_dataset(tmp_path / "out", **kwargs)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()



def test_test_split_is_held_out_and_leaves_train_and_val_bytes_alone(tmp_path):
    without, with_test = tmp_path / "without", tmp_path / "with"
    make_synthetic_dataset(without, train_images=3, val_images=2, seed=3)
    summary = make_synthetic_dataset(with_test, train_images=3, val_images=2, seed=3, test_images=3)
    digest = _tree_digest(with_test)
    assert {k: v for k, v in digest.items() if "test" not in k} == _tree_digest(without)
    assert not (without / "images" / "test").exists()

    data = {split: json.loads((with_test / "annotations" / f"person_keypoints_{split}.json").read_text())
            for split in ("train", "val", "test")}
    test = data["test"]
    assert summary["test"]["images"] == len(test["images"]) == 3
    assert summary["test"]["annotations"] == len(test["annotations"]) > 0
    names = sorted(p.name for p in (with_test / "images" / "test").iterdir())
    assert names == sorted(i["file_name"] for i in test["images"])
    assert [i["id"] for i in test["images"]] == [6, 7, 8]  # ids run on after val, as they do after train
    for split in ("train", "val"):
        assert not {i["file_name"] for i in data[split]["images"]} & set(names)
        assert not {a["id"] for a in data[split]["annotations"]} & {a["id"] for a in test["annotations"]}
    assert all(a["image_id"] in {6, 7, 8} for a in test["annotations"])
    assert COCO(str(with_test / "annotations" / "person_keypoints_test.json")).getAnnIds()


def test_medium_is_the_default_generator_and_is_not_recorded(tmp_path):
    assert scene_for(0.5) == MEDIUM
    assert scene_for(0.0) == EASY and scene_for(1.0) == HARD
    default, medium, half = (tmp_path / n for n in ("default", "medium", "half"))
    make_synthetic_dataset(default, train_images=2, val_images=1, seed=5)
    make_synthetic_dataset(medium, train_images=2, val_images=1, seed=5, difficulty="medium")
    make_synthetic_dataset(half, train_images=2, val_images=1, seed=5, difficulty="0.5")
    assert _tree_digest(default) == _tree_digest(medium) == _tree_digest(half)
    info = json.loads((default / "annotations" / "person_keypoints_train.json").read_text())["info"]
    assert "difficulty" not in info


def test_scene_parameters_move_one_way_with_difficulty():
    scenes = [scene_for(d) for d in (0.0, 0.25, 0.5, 0.75, 1.0)]
    mean_people = [np.dot(s.people_probs, [1, 2, 3, 4, 5]) for s in scenes]
    for key in (lambda s: s.crowd_prob, lambda s: s.occluder_prob, lambda s: s.clutter_shapes[1],
                lambda s: s.distractors[1], lambda s: s.occluders[1]):
        values = [key(s) for s in scenes]
        assert values == sorted(values) and values[0] < values[-1]
    assert mean_people == sorted(mean_people)
    assert [s.height_range[0] for s in scenes] == sorted((s.height_range[0] for s in scenes), reverse=True)
    for scene in scenes:
        assert abs(sum(scene.people_probs) - 1) < 1e-9
        assert all(low < high for low, high in (scene.occluders, scene.clutter_shapes, scene.distractors))


def _scene_statistics(root: Path) -> dict:
    data = json.loads((root / "annotations" / "person_keypoints_val.json").read_text())
    persons = [a for a in data["annotations"] if not a["iscrowd"]]
    flags = np.array([a["keypoints"][2::3] for a in persons])
    return {
        "people": len(persons) / len(data["images"]),
        "height": np.mean([a["bbox"][3] for a in persons]),
        "occluded": (flags == 1).sum() / (flags > 0).sum(),
        "crowds": len(data["annotations"]) - len(persons),
        "info": data["info"],
    }


def test_harder_scenes_are_more_crowded_occluded_and_smaller(tmp_path):
    stats = {}
    for level in ("easy", "medium", "hard"):
        make_synthetic_dataset(tmp_path / level, train_images=0, val_images=12, seed=0, difficulty=level)
        stats[level] = _scene_statistics(tmp_path / level)
    easy, medium, hard = stats["easy"], stats["medium"], stats["hard"]
    assert easy["people"] < medium["people"] < hard["people"]
    assert easy["occluded"] < medium["occluded"] < hard["occluded"]
    assert easy["height"] > medium["height"] and easy["height"] > 1.4 * hard["height"]
    assert easy["crowds"] == 0 < hard["crowds"]
    assert easy["info"]["difficulty"] == 0.0 and hard["info"]["difficulty"] == 1.0
    assert "difficulty" not in medium["info"]


def test_config_keeps_train_val_and_test_apart():
    data = DataConfig(root="r")
    assert data.ann_file("train") == Path("r/annotations/person_keypoints_train.json")
    assert data.ann_file("val") == Path("r/annotations/person_keypoints_val.json")
    assert data.ann_file("test") == Path("r/annotations/person_keypoints_test.json")
    assert data.image_dir("test") == Path("r/images/test") != data.image_dir("val")
    for bad in ("valid", "", "TEST"):
        with pytest.raises(OdkdError, match="data split") as err:
            data.ann_file(bad)
        assert "\n" not in str(err.value)
        with pytest.raises(OdkdError, match="data split"):
            data.image_dir(bad)
    cfg = parse_config('[data]\nroot = "d"\ntest_ann = "a/held_out.json"\ntest_images = "held_out"\n')
    assert cfg.data.ann_file("test") == Path("d/a/held_out.json")
    assert cfg.data.image_dir("test") == Path("d/held_out")


def test_synth_command_writes_the_test_split_and_rejects_a_bad_difficulty(tmp_path):
    runner = CliRunner()
    res = runner.invoke(main, ["synth", str(tmp_path / "d"), "--train-images", "1", "--val-images", "1",
                               "--test-images", "2", "--difficulty", "0.8"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.output[res.output.index("{"):])
    assert summary["test"]["images"] == 2
    test = json.loads((tmp_path / "d" / "annotations" / "person_keypoints_test.json").read_text())
    assert test["info"]["difficulty"] == 0.8
    res = runner.invoke(main, ["synth", str(tmp_path / "e"), "--difficulty", "brutal"])
    assert res.exit_code == 1
    assert res.output.strip().splitlines() == [
        "Error: synth.difficulty: expected easy, medium, hard or a number in [0, 1], got 'brutal'"]


def train_labels_beside_exact(tmp_path, **label_change) -> tuple[dict, dict]:
    """The train annotations of one small easy dataset made as is and with `label_change`, after
    checking that the change touched that file only (images, val and test untouched)."""
    exact, changed = tmp_path / "exact", tmp_path / "changed"
    args = dict(train_images=24, val_images=2, test_images=2, seed=4, difficulty="easy")
    make_synthetic_dataset(exact, **args)
    make_synthetic_dataset(changed, **label_change, **args)
    a, b = _tree_digest(exact), _tree_digest(changed)
    assert sorted(k for k in a if a[k] != b[k]) == ["annotations/person_keypoints_train.json"]
    load = lambda root: json.loads((root / "annotations" / "person_keypoints_train.json").read_text())
    return load(exact), load(changed)


def test_label_noise_moves_train_keypoints_as_cocos_annotators_and_nothing_else(tmp_path):
    truth, labels = train_labels_beside_exact(tmp_path, label_noise=1.0)
    assert labels["info"]["label_noise"] == 1.0 and "label_noise" not in truth["info"]
    normalized = []
    for t, n in zip(truth["annotations"], labels["annotations"]):
        assert {k: v for k, v in t.items() if k != "keypoints"} == {k: v for k, v in n.items() if k != "keypoints"}
        kt, kn = np.array(t["keypoints"]).reshape(-1, 3), np.array(n["keypoints"]).reshape(-1, 3)
        assert (kt[:, 2] == kn[:, 2]).all()  # the flags are the annotators' too
        if t["iscrowd"]:
            assert (kt == kn).all()
            continue
        image = next(i for i in truth["images"] if i["id"] == t["image_id"])
        assert (kn[:, 0] < image["width"]).all() and (kn[:, 1] < image["height"]).all() and (kn >= 0).all()
        labelled = kt[:, 2] > 0
        assert (kn[~labelled] == 0).all()
        d2 = ((kn[:, :2] - kt[:, :2]) ** 2).sum(axis=1)
        normalized += list(d2[labelled] / (COCO_SIGMAS[labelled] ** 2 * t["area"]))
    # COCO's sigmas: E[d^2 / (sigma^2 area)] = 1 at scale 1; rounding to pixels adds a little
    assert len(normalized) > 400
    assert 0.8 < np.mean(normalized) < 1.4
    assert np.mean(np.array(normalized) > 0) > 0.8


def test_label_noise_is_checked_and_reaches_the_command(tmp_path):
    with pytest.raises(OdkdError, match="synth.label_noise"):
        make_synthetic_dataset(tmp_path / "x", train_images=1, val_images=1, label_noise=-0.5)
    res = CliRunner().invoke(main, ["synth", str(tmp_path / "d"), "--train-images", "2", "--val-images", "1",
                                    "--label-noise", "0.5"])
    assert res.exit_code == 0, res.output
    train = json.loads((tmp_path / "d" / "annotations" / "person_keypoints_train.json").read_text())
    val = json.loads((tmp_path / "d" / "annotations" / "person_keypoints_val.json").read_text())
    assert train["info"]["label_noise"] == 0.5 and "label_noise" not in val["info"]


def test_missing_labels_unlabels_a_share_of_train_keypoints_as_coco_stores_them(tmp_path):
    truth, labels = train_labels_beside_exact(tmp_path, missing_labels=0.5)
    assert labels["info"]["missing_labels"] == 0.5 and "missing_labels" not in truth["info"]
    kept = dropped = 0
    for t, s in zip(truth["annotations"], labels["annotations"]):
        same = ("keypoints", "num_keypoints")
        assert {k: v for k, v in t.items() if k not in same} == {k: v for k, v in s.items() if k not in same}
        kt, ks = np.array(t["keypoints"]).reshape(-1, 3), np.array(s["keypoints"]).reshape(-1, 3)
        if t["iscrowd"]:
            assert (kt == ks).all()
            continue
        labelled, still = kt[:, 2] > 0, ks[:, 2] > 0
        assert not (still & ~labelled).any()
        assert (ks[still] == kt[still]).all()  # a kept label is the exact one, flag included
        assert (ks[labelled & ~still] == 0).all()  # a dropped one is stored as COCO's (0, 0, 0)
        assert s["num_keypoints"] == still.sum()
        kept, dropped = kept + still.sum(), dropped + (labelled & ~still).sum()
    assert kept + dropped > 400
    assert 0.4 < dropped / (kept + dropped) < 0.6


def test_missing_labels_is_checked_and_reaches_the_command(tmp_path):
    for bad in (1.0, -0.1, True):
        with pytest.raises(OdkdError, match=r"synth.missing_labels: expected a share in \[0, 1\)"):
            make_synthetic_dataset(tmp_path / "x", train_images=1, val_images=1, missing_labels=bad)
    res = CliRunner().invoke(main, ["synth", str(tmp_path / "d"), "--train-images", "2", "--val-images", "1",
                                    "--missing-labels", "0.25"])
    assert res.exit_code == 0, res.output
    train = json.loads((tmp_path / "d" / "annotations" / "person_keypoints_train.json").read_text())
    val = json.loads((tmp_path / "d" / "annotations" / "person_keypoints_val.json").read_text())
    assert train["info"]["missing_labels"] == 0.25 and "missing_labels" not in val["info"]


UNLABELED_FILES = ["annotations/image_info_unlabeled.json", "annotations/person_keypoints_unlabeled_true.json",
                   "person_detections_unlabeled.json"]


def test_unlabeled_images_leave_train_val_and_test_bytes_alone_and_repeat_with_the_seed(tmp_path):
    args = dict(train_images=2, val_images=1, test_images=1, seed=2, image_size=(128, 96))
    make_synthetic_dataset(tmp_path / "none", **args)
    make_synthetic_dataset(tmp_path / "five", unlabeled_images=5, **args)
    make_synthetic_dataset(tmp_path / "again", unlabeled_images=5, missing_labels=0.5, **args)
    without, five = _tree_digest(tmp_path / "none"), _tree_digest(tmp_path / "five")
    added = sorted(k for k in five if k not in without)
    assert added == sorted(UNLABELED_FILES + [f"images/unlabeled/{i:012d}.jpg" for i in range(5, 10)])
    assert {k: v for k, v in five.items() if k not in added} == without
    # the same seed gives the same unlabelled files, whose labels stay complete when train's are not
    again = _tree_digest(tmp_path / "again")
    assert sorted(k for k in five if again[k] != five[k]) == ["annotations/person_keypoints_train.json"]


def _greedy_matches(people: list[dict], detections: list[dict]) -> list[tuple[dict, dict]]:
    """(person, detection) pairs at IoU > 0.5, highest score first, as COCOeval matches one image's boxes."""
    pairs, free = [], list(people)
    for det in sorted(detections, key=lambda d: -d["score"]):
        if not free:
            break
        ious = mask_utils.iou([det["bbox"]], [p["bbox"] for p in free], [0] * len(free))[0]
        if ious.max() > 0.5:
            pairs.append((free.pop(int(ious.argmax())), det))
    return pairs


@pytest.fixture(scope="module")
def unlabeled(tmp_path_factory):
    """One train, val and test image and eight unlabelled ones, made by the command."""
    root = tmp_path_factory.mktemp("unlabeled")
    res = CliRunner().invoke(main, ["synth", str(root), "--train-images", "1", "--val-images", "1",
                                    "--test-images", "1", "--unlabeled-images", "8", "--seed", "3"])
    assert res.exit_code == 0, res.output
    return root, json.loads(res.output[res.output.index("{"):])


def test_unlabeled_images_come_with_coco_image_info_and_a_record_of_their_files(unlabeled):
    root, summary = unlabeled
    image_info = json.loads((root / "annotations" / "image_info_unlabeled.json").read_text())
    assert set(image_info) == {"info", "licenses", "images", "categories"}  # as COCO's image_info_unlabeled2017
    assert image_info["categories"] == [PERSON_CATEGORY]
    assert [i["id"] for i in image_info["images"]] == list(range(4, 12))  # after train, val and test
    for entry in image_info["images"]:
        pixels = cv2.imread(str(root / "images" / "unlabeled" / entry["file_name"]))
        assert pixels.shape == (entry["height"], entry["width"], 3) and entry["license"] == 1
    assert summary["unlabeled"]["images"] == image_info["info"]["unlabeled_images"] == 8
    assert {image_info["info"][k] for k in ("image_info", "true_annotations", "detections")} == set(UNLABELED_FILES)
    truth = COCO(str(root / "annotations" / "person_keypoints_unlabeled_true.json"))
    assert truth.dataset["images"] == image_info["images"] and truth.dataset["info"] == image_info["info"]
    assert len(truth.getAnnIds()) == summary["unlabeled"]["annotations"]
    test_ann_ids = {a["id"] for a in json.loads((root / "annotations" / "person_keypoints_test.json").read_text())
                    ["annotations"]}
    assert min(truth.getAnnIds()) > max(test_ann_ids)


def test_unlabeled_true_labels_are_what_evaluate_scores_pseudo_labels_against(unlabeled, tmp_path):
    root, _ = unlabeled
    true_file = root / "annotations" / "person_keypoints_unlabeled_true.json"
    res = CliRunner().invoke(main, ["evaluate", "--ann", str(true_file), "--gt-as-results",
                                    "--stats-json", str(tmp_path / "stats.json")])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "stats.json").read_text())["AP"] == 1.0


def test_unlabeled_detections_are_coco_results_around_the_true_people(unlabeled):
    root, summary = unlabeled
    detections = json.loads((root / "person_detections_unlabeled.json").read_text())
    truth = COCO(str(root / "annotations" / "person_keypoints_unlabeled_true.json"))
    assert isinstance(detections, list) and len(detections) == summary["unlabeled"]["detections"]
    for det in detections:
        assert set(det) == {"image_id", "category_id", "bbox", "score"} and det["category_id"] == 1
        image = truth.imgs[det["image_id"]]
        x, y, w, h = det["bbox"]
        assert x >= 0 and y >= 0 and w > 0 and h > 0
        assert x + w <= image["width"] + 1e-9 and y + h <= image["height"] + 1e-9
        assert 0 < det["score"] <= 1
    truth.loadRes(detections)  # pycocotools takes them as bbox results
    people = [a for a in truth.dataset["annotations"] if not a["iscrowd"]]
    matched = sum(len(_greedy_matches([p for p in people if p["image_id"] == i],
                                      [d for d in detections if d["image_id"] == i])) for i in truth.imgs)
    assert matched >= 0.6 * len(people)
    missed, false_positives = len(people) - matched, len(detections) - matched
    assert missed + false_positives > 0


def _person(height: float, seen: int) -> dict:
    """A non-crowd annotation of a person `height` px tall whose first `seen` keypoints are visible."""
    return {"iscrowd": 0, "bbox": [40.0, 20.0, height / 2.5, height],
            "keypoints": [60, 60, 2] * seen + [0, 0, 0] * (17 - seen)}


def test_the_imitated_detector_misses_loosens_and_doubts_small_occluded_people_more():
    image = {"id": 7, "width": 320, "height": 256}
    easy, hard = _person(150.0, 17), _person(24.0, 3)
    easy["bbox"][0] = 180.0
    assert detection_hardness(easy) == 0.0 and detection_hardness(hard) == 1.0
    rng = np.random.default_rng(0)
    found = {"easy": [], "hard": []}
    background = []
    runs = 2000
    for _ in range(runs):
        detections = imitate_person_detector(rng, image, [easy, hard])
        assert [d["score"] for d in detections] == sorted((d["score"] for d in detections), reverse=True)
        for det in detections:
            x, y, w, h = det["bbox"]
            assert det["image_id"] == 7 and x >= 0 and y >= 0 and x + w <= 320 + 1e-9 and y + h <= 256 + 1e-9
        pairs = _greedy_matches([easy, hard], detections)
        for person, det in pairs:
            iou = mask_utils.iou([det["bbox"]], [person["bbox"]], [0])[0, 0]
            found["easy" if person is easy else "hard"].append((iou, det["score"]))
        background += [d["score"] for d in detections if all(d is not det for _, det in pairs)]
    easy_found, hard_found = np.array(found["easy"]), np.array(found["hard"])
    assert 0.015 < 1 - len(easy_found) / runs < 0.05  # EASY_MISS 0.03
    assert 0.3 < 1 - len(hard_found) / runs < 0.45  # HARD_MISS 0.35, and a loose box now and then
    assert np.median(easy_found[:, 0]) > 0.85 > np.median(hard_found[:, 0])
    assert np.median(easy_found[:, 1]) > 0.9 and 0.35 < np.median(hard_found[:, 1]) < 0.65
    assert 0.8 < len(background) / runs < 1.1  # FALSE_POSITIVES_PER_IMAGE 1
    background = np.array(background)
    assert np.median(background) < 0.3 and 0.01 < (background >= 0.5).mean() < 0.15


def synth_files(root) -> dict[str, bytes]:
    return {path.relative_to(root).as_posix(): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


def test_synth_refuses_a_folder_with_a_dataset_and_force_replaces_it_whole(tmp_path):
    """A second synth into a folder once wrote part of it again and left the rest: another seed's test and
    unlabelled files, images of the larger split. Now it is refused, and --force clears synth's files first."""
    out = tmp_path / "d"
    first = ["synth", str(out), "--train-images", "3", "--val-images", "1", "--test-images", "1",
             "--unlabeled-images", "2", "--seed", "4"]
    assert CliRunner().invoke(main, first).exit_code == 0
    (out / "NOTES.md").write_text("mine")  # a file of the user's, beside the dataset
    before = synth_files(out)

    second = ["synth", str(out), "--train-images", "1", "--val-images", "1", "--seed", "5"]
    res = CliRunner().invoke(main, second)
    assert res.exit_code == 1
    assert res.output.strip().splitlines() == [
        f"Error: {out}: already holds a dataset (images/, annotations/, person_detections_unlabeled.json); "
        f"odkd synth --force replaces it, or give an empty folder"]
    assert synth_files(out) == before, "a refused synth writes nothing"

    res = CliRunner().invoke(main, [*second, "--force"])
    assert res.exit_code == 0, res.output
    fresh = tmp_path / "fresh"
    make_synthetic_dataset(fresh, train_images=1, val_images=1, seed=5)
    assert synth_files(out) == {**synth_files(fresh), "NOTES.md": b"mine"}, "the new dataset, and the user's file"


@pytest.mark.parametrize("stranger, named", [
    ("images/val2017/000000000139.jpg", "images/val2017"),
    ("images/train/notes.txt", "images/train/notes.txt"),
    ("annotations/instances_val.json", "annotations/instances_val.json"),
    ("annotations/person_keypoints_val.json", "annotations/person_keypoints_val.json"),  # COCO's, by its header
])
def test_force_replaces_only_what_synth_wrote(tmp_path, stranger, named):
    """Real COCO files in synth's layout, or anything else in images/ and annotations/, are never removed."""
    out = tmp_path / "d"
    make_synthetic_dataset(out, train_images=1, val_images=1, seed=0)
    (out / stranger).parent.mkdir(parents=True, exist_ok=True)
    (out / stranger).write_text('{"info": {"description": "COCO 2017 Dataset"}}')
    before = synth_files(out)
    res = CliRunner().invoke(main, ["synth", str(out), "--train-images", "1", "--val-images", "1", "--force"])
    assert res.exit_code == 1
    assert res.output.strip().splitlines() == [
        f"Error: {out / named}: not written by odkd synth; --force replaces only a dataset that odkd synth wrote, "
        f"so move it away or give another folder"]
    assert synth_files(out) == before


def test_synth_into_an_empty_or_unrelated_folder_needs_no_force(tmp_path):
    (tmp_path / "empty" / "images").mkdir(parents=True)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "README").write_text("x")
    for out in (tmp_path / "empty", tmp_path / "other"):
        res = CliRunner().invoke(main, ["synth", str(out), "--train-images", "1", "--val-images", "1"])
        assert res.exit_code == 0, res.output
