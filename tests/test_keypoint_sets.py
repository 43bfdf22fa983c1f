"""Keypoint sets: the presets and set files, their errors, and a CrowdPose-format dataset (14 points, no
'area') through the teachers' store, the student and OKS AP with the set's sigmas."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from odkd.cli import main
from odkd.config import parse_config
from odkd.data.instances import PersonInstances, load_instances
from odkd.data.keypoints import COCO_SET, FLIP_INDEX, KEYPOINT_NAMES, SKELETON, keypoint_set, presets
from odkd.errors import OdkdError
from odkd.models import build_model, read_checkpoint, save_checkpoint
from odkd.store.reader import TeacherTargets
from odkd.synth import make_synthetic_dataset
from odkd.teachers import build_cache
from test_student import read_log, student_toml

COUNTS = {"coco": 17, "coco_wholebody": 133, "crowdpose": 14, "ap10k": 17, "hand21": 21}


def test_the_presets_load_with_mmpose_counts_and_coco_is_the_legacy_set():
    assert presets() == sorted(COUNTS)
    for name, k in COUNTS.items():
        kset = keypoint_set(name)
        assert kset.num_keypoints == k and len(kset.joint_weights) == k and len(kset.sigmas) in (0, k), name
        assert sorted(kset.flip_index) == list(range(k)) and (kset.flip_index[kset.flip_index] == np.arange(k)).all()
    assert COCO_SET.names == KEYPOINT_NAMES and np.array_equal(COCO_SET.flip_index, FLIP_INDEX)
    assert tuple((a + 1, b + 1) for a, b in COCO_SET.skeleton) == SKELETON
    np.testing.assert_allclose(COCO_SET.sigmas, [.026, .025, .025, .035, .035, .079, .079, .072, .072, .062, .062,
                                                 .107, .107, .087, .087, .089, .089])
    wholebody = keypoint_set("coco_wholebody")
    assert wholebody.parts == {"body": (0, 17), "foot": (17, 23), "face": (23, 91), "left_hand": (91, 112),
                               "right_hand": (112, 133)}
    assert wholebody.names[:17] == COCO_SET.names
    assert keypoint_set("hand21").sigmas == () and keypoint_set("hand21").upper_body == ()


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


OWN = """name = "arm"
keypoints = ["l_shoulder", "r_shoulder", "l_elbow", "r_elbow", "chest"]
flip_pairs = [["l_shoulder", "r_shoulder"], ["l_elbow", "r_elbow"]]
skeleton = [["l_shoulder", "l_elbow"], ["r_shoulder", "r_elbow"], [0, 4], [1, 4]]
upper_body = ["l_shoulder", "r_shoulder", "chest"]
lower_body = ["l_elbow", "r_elbow"]
sigmas = [0.079, 0.079, 0.072, 0.072, 0.05]
"""


def test_a_set_file_of_ones_own_by_names_or_indices(tmp_path):
    kset = keypoint_set(str(write(tmp_path / "arm.toml", OWN)))
    assert (kset.name, kset.num_keypoints) == ("arm", 5)
    assert kset.flip_index.tolist() == [1, 0, 3, 2, 4]
    assert kset.skeleton == ((0, 2), (1, 3), (0, 4), (1, 4)) and kset.upper_body == (0, 1, 4)
    assert kset.joint_weights == () and kset.mirrored
    unmirrored = keypoint_set(str(write(tmp_path / "plain.toml", 'keypoints = ["a", "b"]\n')))
    assert not unmirrored.mirrored and unmirrored.flip_index.tolist() == [0, 1] and unmirrored.name == "plain"


@pytest.mark.parametrize("change, message", [
    (('"l_elbow", "r_elbow"]]', '"l_elbow", "r_wrist"]]'), "flip_pairs: 'r_wrist' is not one of the set's keypoints"),
    (("[0, 4], [1, 4]", "[0, 4], [1, 5]"), "skeleton: point 5 is out of range for 5 keypoints (0-based)"),
    (("0.072, 0.05]", "0.072]"), "sigmas: 4 values for 5 keypoints"),
    (('"r_elbow", "chest"]', '"r_elbow", "r_elbow"]'), "keypoints: 'r_elbow' is named twice"),
    (('name = "arm"', 'name = "arm"\nflip = 1'), "unknown key 'flip'"),
    (('[["l_shoulder", "r_shoulder"],', '[["l_shoulder", "l_shoulder"],'), "flip_pairs: a point is in two pairs"),
])
def test_a_set_file_that_does_not_hold_together_is_one_line_naming_file_and_key(tmp_path, change, message):
    path = write(tmp_path / "arm.toml", OWN.replace(*change))
    with pytest.raises(OdkdError) as err:
        keypoint_set(str(path))
    assert str(err.value) == f"{path}: {message}" or str(err.value).startswith(f"{path}: {message}"), str(err.value)


def test_the_config_names_the_set_and_a_wrong_one_is_one_line():
    assert parse_config('[data]\nkeypoints = "crowdpose"\n').data.keypoints == "crowdpose"
    with pytest.raises(OdkdError, match=r"^p.toml: data.keypoints: 'crowd' is neither a preset \(ap10k, coco, "):
        parse_config('[data]\nkeypoints = "crowd"\n', "p.toml")
    with pytest.raises(OdkdError, match=r"^--set data.keypoints=no/such.toml: no/such.toml: keypoint set file not found"):
        parse_config("", "p.toml", ["data.keypoints=no/such.toml"])


@pytest.fixture(scope="module")
def crowd_world(tmp_path_factory):
    """6 synthetic images as a CrowdPose-format dataset, two tiny 14-point teachers and their store."""
    base = tmp_path_factory.mktemp("crowd")
    make_synthetic_dataset(base / "data", train_images=6, val_images=2, seed=0, keypoints="crowdpose")
    torch.manual_seed(0)
    for role, seg in (("primary", False), ("senior", True)):
        net = build_model("hrnet_tiny", 14, seg_head=seg, width=8)
        save_checkpoint(base / "runs" / f"teacher_{role}" / "best.pth", net, model_name="hrnet_tiny",
                        model_args={"width": 8}, seg_head=seg)
    toml = student_toml(base).replace("sigma = 2.0", 'sigma = 2.0\nkeypoints = "crowdpose"')
    (base / "p.toml").write_text(toml)
    build_cache(parse_config(toml), "train", scheduler="synchronous", progress=False)
    return base


def test_a_crowdpose_dataset_is_read_with_its_14_points_and_box_areas(crowd_world):
    cfg = parse_config((crowd_world / "p.toml").read_text())
    instances = load_instances(cfg.data, "train")
    assert len(instances) > 0 and instances[0].joints.shape == (14, 3)
    ann = crowd_world / "data" / "annotations" / "person_keypoints_train.json"
    raw = {a["id"]: a for a in json.loads(ann.read_text())["annotations"]}[instances[0].ann_id]
    assert "area" not in raw and instances[0].area == raw["bbox"][2] * raw["bbox"][3]
    with pytest.raises(OdkdError) as err:
        PersonInstances(ann, crowd_world / "data" / "images" / "train")  # read as COCO's 17
    assert "holds 42 numbers, but the set 'coco' ([data] keypoints) has 17 points: 51 numbers" in str(err.value)
    assert str(err.value).startswith(f"{ann}: ")


def test_the_store_and_the_student_follow_the_set(crowd_world, tmp_path, monkeypatch):
    targets = TeacherTargets.open(str(crowd_world / "store.zarr"))
    assert targets.layout.num_joints == 14
    assert targets.attrs["settings"]["keypoints"] == keypoint_set("crowdpose").record()
    info = CliRunner().invoke(main, ["cache", "info", str(crowd_world / "store.zarr")])
    assert info.exit_code == 0
    assert f"keypoints    crowdpose, 14 points, digest {keypoint_set('crowdpose').digest()}" in info.output
    config = crowd_world / "p.toml"
    res = CliRunner().invoke(main, ["train-student", "--config", str(config), "--out", str(tmp_path / "student"),
                                    "--set", "student.stages[1].epochs=1"])
    assert res.exit_code == 0, res.output
    ckpt = read_checkpoint(tmp_path / "student" / "last.pth")
    assert ckpt.meta["num_joints"] == 14
    log = read_log(tmp_path / "student")
    assert [entry["stage"] for entry in log] == ["primary", "senior"] and "AP" in log[-1]
    res = CliRunner().invoke(main, ["evaluate", "--config", str(config), "--checkpoint",
                                    str(tmp_path / "student" / "last.pth")])
    assert res.exit_code == 0 and "| AP " in res.output, res.output
    assert "images of crowd index" in res.output  # the synthetic CrowdPose images carry a crowdIndex
    # the same pipeline read as COCO's 17 points: the store is refused before anything is written
    coco = tmp_path / "coco.toml"
    coco.write_text(config.read_text().replace('keypoints = "crowdpose"', 'keypoints = "coco"')
                    .replace(f'root = "{crowd_world}/data"', f'root = "{tmp_path}/coco-data"'))
    make_synthetic_dataset(tmp_path / "coco-data", train_images=6, val_images=2, seed=0)
    res = CliRunner().invoke(main, ["train-student", "--config", str(coco), "--out", str(tmp_path / "coco-student")])
    assert res.exit_code == 1 and len(res.output.strip().splitlines()) == 1, res.output
    assert "built for the keypoint set 'crowdpose' (14 points" in res.output
    assert "but [data] keypoints is 'coco' (17 points); rebuild it for this set" in res.output
    assert not (tmp_path / "coco-student").exists()


def test_coco_wholebody_files_load_as_133_points_and_score_by_part(tmp_path):
    from odkd.eval import metrics

    make_synthetic_dataset(tmp_path / "coco", train_images=0, val_images=3, seed=0)
    coco_ann = tmp_path / "coco" / "annotations" / "person_keypoints_val.json"
    body = {a["id"]: a["keypoints"] for a in json.loads(coco_ann.read_text())["annotations"]}
    code = CliRunner().invoke(main, ["synth", str(tmp_path / "data"), "--train-images", "0", "--val-images", "3",
                                     "--keypoints", "coco_wholebody"])
    assert code.exit_code == 0, code.output
    ann = tmp_path / "data" / "annotations" / "person_keypoints_val.json"
    raw = json.loads(ann.read_text())
    assert raw["info"]["keypoints"] == "coco_wholebody" and len(raw["annotations"][0]["keypoints"]) == 51
    assert len(raw["annotations"][0]["foot_kpts"]) == 18 and raw["annotations"][0]["face_valid"] is False
    wholebody = keypoint_set("coco_wholebody")
    persons = PersonInstances(ann, tmp_path / "data" / "images" / "val", keypoints=wholebody)
    first = persons[0]
    assert first.joints.shape == (133, 3)
    np.testing.assert_allclose(first.joints[:17].reshape(-1), body[first.ann_id], atol=1e-4)
    assert (first.joints[17:23, 2] > 0).any() and not first.joints[23:, 2].any()
    joined = persons.coco.anns[first.ann_id]
    assert len(joined["keypoints"]) == 399 and joined["num_keypoints"] == int((first.joints[:, 2] > 0).sum())

    results = metrics.gt_as_results(persons.coco)
    sigmas = np.array(wholebody.sigmas)
    assert metrics.coco_keypoint_eval(persons.coco, results, sigmas=sigmas)["AP"] == pytest.approx(1.0)
    parts = metrics.part_keypoint_eval(persons.coco, results, sigmas, wholebody.parts)
    assert list(parts) == ["body", "foot", "face", "left_hand", "right_hand"]
    assert parts["body"]["AP"] == pytest.approx(1.0) and parts["foot"]["AP"] == pytest.approx(1.0)
    assert parts["face"]["AP"] == parts["left_hand"]["AP"] == -1.0  # nobody labelled them
    moved = [{**r, "keypoints": [v + 6.0 if i % 3 == 0 and 51 <= i < 69 else v for i, v in enumerate(r["keypoints"])]}
             for r in results]  # the feet 6 px to the right, the body untouched
    parts = metrics.part_keypoint_eval(persons.coco, moved, sigmas, wholebody.parts)
    assert parts["body"]["AP"] == pytest.approx(1.0) and parts["foot"]["AP"] < 1.0


@pytest.mark.parametrize("change, message", [
    (lambda ann: ann.pop("face_kpts"), "'face_kpts' is missing"),
    (lambda ann: ann.update(lefthand_kpts=ann["lefthand_kpts"][:-3]), "'lefthand_kpts' holds 60 numbers"),
])
def test_a_whole_body_file_with_a_part_missing_is_one_line_naming_file_annotation_and_field(tmp_path, change,
                                                                                            message):
    make_synthetic_dataset(tmp_path / "data", train_images=2, val_images=1, seed=0, keypoints="coco_wholebody")
    ann = tmp_path / "data" / "annotations" / "person_keypoints_val.json"
    raw = json.loads(ann.read_text())
    change(raw["annotations"][0])
    ann.write_text(json.dumps(raw))
    with pytest.raises(OdkdError) as err:
        PersonInstances(ann, tmp_path / "data" / "images" / "val", keypoints=keypoint_set("coco_wholebody"))
    assert str(err.value).startswith(f"{ann}: annotation {raw['annotations'][0]['id']}: {message}; ")
    assert "\n" not in str(err.value)


def test_crowd_index_and_crowdpose_ap_easy_medium_hard(tmp_path):
    from odkd.eval import metrics
    from odkd.synth.keypoint_formats import crowd_index

    alone = {"bbox": [0, 0, 10, 10], "keypoints": [5, 5, 2, 6, 6, 2, 0, 0, 0]}
    near = {"bbox": [4, 4, 10, 10], "keypoints": [20, 20, 2, 9, 9, 2, 0, 0, 0]}
    # alone's box holds one of near's points (9, 9) against its own 2; near's holds both of alone's against 2
    assert crowd_index([alone, near]) == pytest.approx((1 / 2 + 2 / 2) / 2)
    assert crowd_index([alone]) == 0.0

    make_synthetic_dataset(tmp_path / "data", train_images=0, val_images=8, seed=3, difficulty="hard",
                           keypoints="crowdpose")
    ann = tmp_path / "data" / "annotations" / "person_keypoints_val.json"
    persons = PersonInstances(ann, tmp_path / "data" / "images" / "val", keypoints=keypoint_set("crowdpose"))
    indices = {img["id"]: img["crowdIndex"] for img in persons.coco.imgs.values()}
    assert len(indices) == 8 and all(value >= 0 for value in indices.values())
    results = metrics.gt_as_results(persons.coco)
    sigmas = np.array(keypoint_set("crowdpose").sigmas)
    groups = metrics.crowd_keypoint_eval(persons.coco, results, sigmas)
    expected = {name for name, (low, high) in metrics.CROWD_GROUPS.items()
                if any(low <= value < high for value in indices.values())}
    assert set(groups) == expected and expected
    for stats in groups.values():
        assert stats["AP"] == pytest.approx(1.0)
    easy_ids = [i for i, value in indices.items() if value < 0.1]
    if easy_ids:  # results moved on the other images do not touch the easy group
        moved = [{**r, "keypoints": [v + 9.0 if k % 3 == 0 else v for k, v in enumerate(r["keypoints"])]}
                 if r["image_id"] not in easy_ids else r for r in results]
        assert metrics.crowd_keypoint_eval(persons.coco, moved, sigmas)["easy"]["AP"] == pytest.approx(1.0)
    bare = metrics.load_gt(tmp_path / "data" / "annotations" / "person_keypoints_val.json", 14)
    for img in bare.dataset["images"]:
        img.pop("crowdIndex")
    assert metrics.crowd_keypoint_eval(bare, results, sigmas) == {}


def test_every_species_of_a_set_is_read_with_its_category_and_scored_in_it(tmp_path):
    """AP-10K's files hold one category per species, each with the set's 17 points: all are read by default,
    [data] categories chooses among them, and each result is scored in its instance's category."""
    from odkd.eval import metrics

    make_synthetic_dataset(tmp_path / "data", train_images=0, val_images=4, seed=0)
    ann = tmp_path / "data" / "annotations" / "person_keypoints_val.json"
    data = json.loads(ann.read_text())
    names = list(keypoint_set("ap10k").names)
    data["categories"] = [{"id": 1, "name": "cat", "supercategory": "animal", "keypoints": names},
                          {"id": 2, "name": "dog", "supercategory": "animal", "keypoints": names}]
    for a in data["annotations"]:
        a["category_id"] = 1 + a["image_id"] % 2
    ann.write_text(json.dumps(data))
    images = tmp_path / "data" / "images" / "val"
    ap10k = keypoint_set("ap10k")
    both = PersonInstances(ann, images, keypoints=ap10k)
    assert {i.category_id for i in both.instances} == {1, 2}
    dogs = PersonInstances(ann, images, keypoints=ap10k, categories=("dog",))
    assert {i.category_id for i in dogs.instances} == {2} and 0 < len(dogs) < len(both)
    with pytest.raises(OdkdError, match=r"no category 'horse' \(\[data\] categories\); it has cat, dog"):
        PersonInstances(ann, images, keypoints=ap10k, categories=("horse",))

    sigmas = np.array(ap10k.sigmas)
    joints = np.stack([i.joints for i in both.instances])
    joints[:, :, 2] = 1.0
    image_ids, scores = [i.image_id for i in both.instances], np.ones(len(both))
    own = metrics.keypoint_results(image_ids, joints, scores, [i.category_id for i in both.instances])
    assert metrics.coco_keypoint_eval(both.coco, own, sigmas=sigmas)["AP"] == pytest.approx(1.0)
    as_one = metrics.keypoint_results(image_ids, joints, scores)  # every result in category 1: the dogs unmatched
    assert metrics.coco_keypoint_eval(both.coco, as_one, sigmas=sigmas)["AP"] < 0.9
    assert parse_config('[data]\nkeypoints = "ap10k"\ncategories = ["dog"]\n').data.categories == ("dog",)


def test_evaluate_scores_files_as_the_configs_set(crowd_world):
    """`odkd evaluate --ann --results` (here --gt-as-results) with --config: the set's K and sigmas."""
    ann = crowd_world / "data" / "annotations" / "person_keypoints_val.json"
    res = CliRunner().invoke(main, ["evaluate", "--ann", str(ann), "--gt-as-results", "--config",
                                    str(crowd_world / "p.toml")])
    assert res.exit_code == 0 and "| 1.000 |" in res.output, res.output
    res = CliRunner().invoke(main, ["evaluate", "--ann", str(ann), "--gt-as-results"])  # read as COCO's 17
    assert res.exit_code == 1 and len(res.output.strip().splitlines()) == 1
    assert "keypoint values, expected 51" in res.output
