"""`odkd cache score`: a store's joints against labels, on a real store whose every blob is placed by hand."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from odkd.apps.pseudo_labels import score_store
from odkd.cli import main
from odkd.data.keypoints import keypoint_set
from odkd.errors import OdkdError
from odkd.store import StoreLayout, build_store
from odkd.store.bitpack import bitpack_maps

K = 17
MAP = (24, 32)
# one stored frame for every row: center (48, 64), 96 px wide for a 24-px map, so image pixel = 4 x map pixel
CENTER, SCALE = (48.0, 64.0), (0.48, 0.64)
LAYOUT = StoreLayout(num_instances=4, num_joints=K, map_size=MAP, chunk_instances=4, shard_instances=4)
SETTINGS = {"dataset_fingerprint": "sha256:score", "threshold": 0.5, "sigma": 2.0}


def person_joints(x0: int) -> np.ndarray:
    """17 joints in map pixels, two columns from x0, one joint every 3 rows."""
    return np.array([(x0 + 3 * (j % 2), 2 + (j // 2) * 3) for j in range(K)], np.float64)


A, B, C = person_joints(2), person_joints(9), person_joints(16)
NOBODY = np.full((K, 2), (21.0, 30.0))  # a detector's box of no one, far from every person
C_UNLABELLED = [0, 1, 2, 3, 4]  # joints person C has no label for
B_WRONG = [12, 13, 14, 15, 16]  # joints ST puts 10 map pixels off person B


def discs(points: np.ndarray, present: np.ndarray) -> np.ndarray:
    """(K, H, W) bool: a disc of radius 1.5 around each present joint, its centroid the joint exactly."""
    ys, xs = np.mgrid[0:MAP[1], 0:MAP[0]]
    maps = ((xs - points[:, 0, None, None]) ** 2 + (ys - points[:, 1, None, None]) ** 2) <= 1.5 ** 2
    return maps & present[:, None, None]


def rows():
    """(PT joints, PT peaks, ST joints, ST peaks) per stored row. PT: every joint of A, B and C exact, nothing
    on the fourth row. ST: A exact; B with five joints far off at a low peak; C exact; a confident nobody."""
    b_wrong = B.copy()
    b_wrong[B_WRONG, 0] = np.clip(b_wrong[B_WRONG, 0] - 10, 0, MAP[0] - 1)
    b_peaks = np.full(K, 0.9)
    b_peaks[B_WRONG] = 0.6
    pt = [(A, np.full(K, 0.9)), (B, np.full(K, 0.9)), (C, np.full(K, 0.9)), (NOBODY, np.full(K, 0.3))]
    st = [(A, np.full(K, 0.9)), (b_wrong, b_peaks), (C, np.full(K, 0.75)), (NOBODY, np.full(K, 0.95))]
    return pt, st


def produce(start, stop):
    from odkd.store.writer import ShardTargets

    out = LAYOUT.allocate(stop - start)
    pt, st = rows()
    for i in range(start, stop):
        for key, (points, peaks) in (("pt", pt[i]), ("st", st[i])):
            out[f"{key}/heatmaps"][i] = bitpack_maps(discs(points, peaks >= 0.5)[None])[0]
            out[f"{key}/conf"][i] = peaks
    out["st/mask"][:] = 0
    out["meta/index"][:] = np.arange(start, stop)
    out["meta/image_id"][:] = [1, 1, 2, 2][start:stop]
    out["meta/ann_id"][:] = np.arange(start, stop) + 1
    out["meta/center"][:] = CENTER
    out["meta/scale"][:] = SCALE
    out["meta/ok"][:] = 1
    return ShardTargets(out)


def person(ann_id: int, image_id: int, joints: np.ndarray, unlabelled=()) -> dict:
    keypoints = np.concatenate([joints * 4.0, np.full((K, 1), 2.0)], 1)
    keypoints[list(unlabelled)] = 0.0
    x, y = keypoints[keypoints[:, 2] > 0, :2].min(0)
    return {"id": ann_id, "image_id": image_id, "category_id": 1, "iscrowd": 0, "area": 2000.0,
            "bbox": [float(x), float(y), 30.0, 100.0], "keypoints": keypoints.ravel().tolist(),
            "num_keypoints": int((keypoints[:, 2] > 0).sum())}


@pytest.fixture(scope="module")
def scored_store(tmp_path_factory):
    root = tmp_path_factory.mktemp("score")
    url = str(root / "s.zarr")
    build_store(url, LAYOUT, SETTINGS, produce, scheduler="synchronous", progress=False)
    ann = root / "labels.json"
    ann.write_text(json.dumps({
        "images": [{"id": i, "file_name": f"{i}.jpg", "width": 96, "height": 128} for i in (1, 2)],
        "annotations": [person(1, 1, A), person(2, 1, B), person(3, 2, C, C_UNLABELLED)],
        "categories": [{"id": 1, "name": "person", "keypoints": [str(k) for k in range(K)], "skeleton": []}]}))
    return url, str(ann)


def test_counts_what_each_floor_teaches_right_and_wrong(scored_store):
    url, ann = scored_store
    score = score_store(url, ann, keypoint_set("coco"), floors=(0.5, 0.7, 0.8))
    assert (score.rows, score.images) == (4, 2)
    pt, st = score.teachers
    labelled = 17 + 17 + 12
    assert pt.teacher == "PT" and st.teacher == "ST"
    # PT: every labelled joint right; C's five unlabelled joints are taught too; the empty row teaches nothing
    assert [(c.labelled, c.taught, c.right) for c in pt.floors] == [(labelled, 51, 46), (labelled, 51, 46),
                                                                    (labelled, 51, 46)]
    assert pt.stats["AP"] == pytest.approx(1.0)
    # ST at 0.5: all 68 joints taught, B's five far ones and the nobody's 17 wrong, C's unlabelled five not right
    # at 0.7: B's far ones (peak 0.6) drop out; at 0.8 so does all of C (peak 0.75)
    assert [(c.taught, c.right) for c in st.floors] == [(68, 41), (63, 41), (46, 29)]
    assert st.floors[0].coverage == pytest.approx(41 / labelled)
    assert st.floors[2].precision == pytest.approx(29 / 46)
    assert 0.0 < st.stats["AP"] < 1.0, "the confident nobody ranks first and is wrong"


def labels_of(ann: str, image_ids, path) -> str:
    labels = json.loads(open(ann).read())
    labels["images"] = [im for im in labels["images"] if im["id"] in image_ids]
    labels["annotations"] = [a for a in labels["annotations"] if a["image_id"] in image_ids]
    path.write_text(json.dumps(labels))
    return str(path)


def test_labels_of_some_images_score_those_images_alone(scored_store, tmp_path):
    url, ann = scored_store
    score = score_store(url, labels_of(ann, {1}, tmp_path / "first.json"), keypoint_set("coco"), floors=(0.5,))
    assert (score.rows, score.images) == (2, 1)
    pt, st = score.teachers
    assert (pt.floors[0].labelled, pt.floors[0].taught, pt.floors[0].right) == (34, 34, 34)
    assert (st.floors[0].taught, st.floors[0].right) == (34, 29)
    with pytest.raises(OdkdError, match=r"none\.json: labels none of the images of .*s\.zarr"):
        score_store(url, labels_of(ann, {7}, tmp_path / "none.json"), keypoint_set("coco"))


def test_a_second_category_is_scored_with_its_own_people(scored_store, tmp_path):
    """The store keeps no category (AP-10K has one per species): each row takes its matched person's."""
    url, ann = scored_store
    labels = json.loads(open(ann).read())
    labels["categories"].append({**labels["categories"][0], "id": 2, "name": "other"})
    labels["annotations"][2]["category_id"] = 2
    path = tmp_path / "two.json"
    path.write_text(json.dumps(labels))
    pt, st = score_store(url, str(path), keypoint_set("coco"), floors=(0.5,)).teachers
    assert pt.stats["AP"] == pytest.approx(1.0)
    assert (st.floors[0].taught, st.floors[0].right) == (68, 41)


def test_the_command_prints_both_teachers_at_each_floor(scored_store):
    url, ann = scored_store
    result = CliRunner().invoke(main, ["cache", "score", url, "--ann", ann, "--floors", "0.5,0.8"])
    assert result.exit_code == 0, result.output
    every_floor = CliRunner().invoke(main, ["cache", "score", url, "--ann", ann])
    assert [line.split("|")[4].strip() for line in every_floor.output.splitlines()[4:]] == ["0.5", "0.6", "0.7",
                                                                                            "0.8", "0.9"] * 2
    lines = result.output.strip().splitlines()
    assert lines[0] == f"{url}: 4 stored people on the 2 images {ann} labels"
    assert lines[4].startswith("| PT | 1.000 |") and lines[6].startswith("| ST |")
    assert lines[7] == "|  |  |  | 0.8 | 0.63 | 0.63 | 46 |"
    bad = CliRunner().invoke(main, ["cache", "score", url, "--ann", ann, "--floors", "high"])
    assert bad.exit_code == 2 and "--floors" in bad.output and "Traceback" not in bad.output
