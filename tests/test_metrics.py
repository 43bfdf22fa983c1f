import json
import math

import numpy as np
import pytest

from odkd.errors import OdkdError
from odkd.eval.metrics import (
    COCO_SIGMAS,
    STATS_NAMES,
    coco_keypoint_eval,
    format_stats_table,
    gt_as_results,
    keypoint_results,
    load_gt,
    load_results,
    nms_per_image,
    oks_iou,
    oks_nms,
    rescore_instances,
    write_stats_json,
)

K = 17
LARGE_AREA = 20000.0  # above 96**2: counts as (L)
MEDIUM_AREA = 3000.0  # between 32**2 and 96**2: counts as (M)


def _pose(rng, box, labelled=K):
    """Keypoints inside box [x, y, w, h], the first `labelled` visible, the rest unlabelled (0, 0, 0)."""
    x, y, w, h = box
    kpts = np.zeros((K, 3))
    kpts[:labelled, 0] = rng.uniform(x, x + w, labelled)
    kpts[:labelled, 1] = rng.uniform(y, y + h, labelled)
    kpts[:labelled, 2] = 2
    return kpts


def _person(ann_id, image_id, kpts, box, area):
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": 1,
        "iscrowd": 0,
        "area": area,
        "bbox": list(box),
        "keypoints": kpts.reshape(-1).tolist(),
        "num_keypoints": int((kpts[:, 2] > 0).sum()),
        "segmentation": [],
    }


def _gt_dict(annotations, image_ids=(1, 2, 3)):
    return {
        "images": [{"id": i, "file_name": f"{i:012d}.jpg", "width": 640, "height": 480} for i in image_ids],
        "annotations": annotations,
        "categories": [{"id": 1, "name": "person", "keypoints": [f"k{i}" for i in range(K)], "skeleton": []}],
    }


def _write(path, obj):
    path.write_text(json.dumps(obj))
    return path


@pytest.fixture
def gt_path(tmp_path):
    """Three images: large and medium persons (one partly unlabelled) and a crowd region with RLE."""
    rng = np.random.default_rng(0)
    boxes = {1: (100, 50, 100, 200), 2: (300, 100, 40, 75), 3: (50, 60, 90, 170), 5: (200, 200, 45, 66)}
    anns = [
        _person(1, 1, _pose(rng, boxes[1]), boxes[1], LARGE_AREA),
        _person(2, 1, _pose(rng, boxes[2], labelled=13), boxes[2], MEDIUM_AREA),
        _person(3, 2, _pose(rng, boxes[3]), boxes[3], 15000.0),
        {
            "id": 4,
            "image_id": 2,
            "category_id": 1,
            "iscrowd": 1,
            "area": 5000.0,
            "bbox": [400, 200, 100, 50],
            "keypoints": [0] * (3 * K),
            "num_keypoints": 0,
            "segmentation": {"counts": [96000, 5000, 206200], "size": [480, 640]},
        },
        _person(5, 3, _pose(rng, boxes[5]), boxes[5], MEDIUM_AREA),
    ]
    return _write(tmp_path / "gt.json", _gt_dict(anns))


def _one_person_gt(tmp_path):
    rng = np.random.default_rng(1)
    box = (100, 50, 100, 200)
    kpts = _pose(rng, box)
    return _write(tmp_path / "gt1.json", _gt_dict([_person(1, 1, kpts, box, LARGE_AREA)], image_ids=(1,))), kpts


def test_gt_as_results_scores_perfect(gt_path):
    coco = load_gt(gt_path)
    results = gt_as_results(coco)
    assert sorted(r["image_id"] for r in results) == [1, 1, 2, 3]  # crowd left out
    stats = coco_keypoint_eval(coco, results)
    assert list(stats) == list(STATS_NAMES)
    for name in STATS_NAMES:
        assert stats[name] == pytest.approx(1.0), name


def test_eval_from_files_matches_in_memory_and_leaves_results_untouched(gt_path, tmp_path):
    results = gt_as_results(load_gt(gt_path))
    res_path = _write(tmp_path / "res.json", results)
    assert coco_keypoint_eval(gt_path, res_path) == coco_keypoint_eval(load_gt(gt_path), results)
    assert all(set(r) == {"image_id", "category_id", "keypoints", "score"} for r in results)


def test_perturbed_keypoints_lower_ap(gt_path):
    results = gt_as_results(load_gt(gt_path))
    shifted = np.array(results[0]["keypoints"]).reshape(K, 3)
    shifted[:, :2] += 30.0
    results[0]["keypoints"] = shifted.reshape(-1).tolist()
    stats = coco_keypoint_eval(gt_path, results)
    assert stats["AP"] < 1.0
    assert stats["AP (L)"] < 1.0
    assert stats["AP (M)"] == pytest.approx(1.0)  # the medium persons were not touched


def test_oks_iou_matches_hand_computation():
    g = np.tile([100.0, 100.0, 2.0], K)
    d = g.copy()
    d[0] += 3.0  # nose 3 px off in x
    # exp(-9 / (2 * 20000 * (2 * 0.026)^2)) = exp(-9 / 108.16) = 0.920158; OKS = (16 + 0.920158) / 17
    assert oks_iou(g, d[None], LARGE_AREA, np.array([LARGE_AREA]))[0] == pytest.approx(0.995303, abs=1e-6)
    # the scale is the mean of both areas: (20000 + 10000) / 2 -> exp(-9 / 81.12) = 0.894986
    assert oks_iou(g, d[None], LARGE_AREA, np.array([10000.0]))[0] == pytest.approx((16 + 0.894986) / 17, abs=1e-6)
    # a low-confidence nose drops out of the mean when in_vis_thr is given
    d_unsure = d.copy()
    d_unsure[2] = 0.1
    both = oks_iou(g, np.stack([d, d_unsure]), LARGE_AREA, np.full(2, LARGE_AREA), in_vis_thr=0.2)
    assert both == pytest.approx([0.995303, 1.0], abs=1e-6)
    nothing_confident = oks_iou(g, np.tile([0.0, 0.0, 0.1], K)[None], LARGE_AREA, np.array([1.0]), in_vis_thr=0.2)
    assert nothing_confident[0] == 0.0


def test_known_oks_gives_known_ap(tmp_path):
    gt, kpts = _one_person_gt(tmp_path)
    target = 0.82  # above the 0.50..0.80 thresholds, below 0.85..0.95
    shift = np.sqrt(-math.log(target) * 2 * LARGE_AREA * (2 * COCO_SIGMAS) ** 2)
    moved = kpts.copy()
    moved[:, 0] += shift
    assert oks_iou(kpts.reshape(-1), moved.reshape(1, -1), LARGE_AREA, np.array([LARGE_AREA]))[0] == pytest.approx(
        target
    )
    stats = coco_keypoint_eval(gt, keypoint_results([1], moved[None], [0.9]))
    assert stats["AP"] == pytest.approx(0.7)  # 7 of the 10 OKS thresholds match
    assert stats["AP .5"] == pytest.approx(1.0)
    assert stats["AP .75"] == pytest.approx(1.0)
    assert stats["AR"] == pytest.approx(0.7)
    assert stats["AP (M)"] == -1.0  # no medium person in this ground truth


def test_oks_nms_suppresses_duplicates_keeps_distinct_person():
    rng = np.random.default_rng(2)
    a = _pose(rng, (100, 50, 100, 200))
    b = _pose(rng, (400, 50, 100, 200))
    near_a = a + [0.5, -0.5, 0.0]
    db = [
        {"keypoints": a, "score": 0.9, "area": LARGE_AREA},
        {"keypoints": near_a, "score": 0.95, "area": LARGE_AREA},
        {"keypoints": b, "score": 0.5, "area": LARGE_AREA},
        {"keypoints": a - [0.3, 0.0, 0.0], "score": 0.3, "area": LARGE_AREA},
    ]
    assert oks_nms(db, 0.9) == [1, 2]
    assert oks_nms(db, 1.0) == [1, 0, 2, 3]  # nothing overlaps above 1: all kept, best first
    assert oks_nms([], 0.9) == []


def test_rescore_matches_official_rule():
    kpts = np.zeros((2, 4, 3))
    kpts[0, :, 2] = [0.9, 0.1, 0.5, 0.2]  # 0.2 is not above 0.2: mean of 0.9 and 0.5 is 0.7
    kpts[1, :, 2] = [0.1, 0.2, 0.0, 0.15]  # nothing confident: score 0
    assert rescore_instances(kpts, np.array([0.8, 1.0]), in_vis_thr=0.2) == pytest.approx([0.56, 0.0])


def test_nms_per_image_rescores_then_suppresses_within_each_image():
    rng = np.random.default_rng(3)
    a = _pose(rng, (100, 50, 100, 200))
    a[:, 2] = 0.8
    dup = a + [1.0, 0.0, 0.0]
    dup[:, 2] = 0.5
    results = keypoint_results([7, 7, 8], np.stack([a, dup, a]), [0.9, 1.0, 0.4])
    kept = nms_per_image(results, np.full(3, LARGE_AREA), thresh=0.9, in_vis_thr=0.2)
    # 0.9 * 0.8 = 0.72 beats 1.0 * 0.5; the same pose in image 8 is not a duplicate
    assert [(r["image_id"], r["score"]) for r in kept] == [(7, pytest.approx(0.72)), (8, pytest.approx(0.32))]
    assert results[0]["score"] == 0.9  # inputs untouched
    unscored = nms_per_image(results, np.full(3, LARGE_AREA), in_vis_thr=None)
    assert [(r["image_id"], r["score"]) for r in unscored] == [(7, 1.0), (8, 0.4)]


def test_keypoint_results_format():
    kpts = np.arange(2 * K * 3, dtype=np.float32).reshape(2, K, 3)
    results = keypoint_results(np.array([5, 6]), kpts, np.array([0.5, 0.25]))
    assert results[1] == {"image_id": 6, "category_id": 1, "keypoints": kpts[1].reshape(-1).tolist(), "score": 0.25}
    json.dumps(results)  # plain Python types only
    with pytest.raises(ValueError):
        keypoint_results([1], kpts, [0.5, 0.5])


def _assert_one_line_naming(excinfo, path):
    message = str(excinfo.value)
    assert str(path) in message
    assert "\n" not in message


def test_load_results_rejects_bad_files(tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text('[{"image_id": 1, "category_id": 1,')
    with pytest.raises(OdkdError, match="not valid JSON") as e:
        load_results(broken)
    _assert_one_line_naming(e, broken)

    short = _write(tmp_path / "short.json", [{"image_id": 1, "category_id": 1, "keypoints": [0.0] * 50, "score": 1}])
    with pytest.raises(OdkdError, match="length 50, expected 51") as e:
        load_results(short)
    _assert_one_line_naming(e, short)

    for name, content, reason in [
        ("empty.json", [], "empty"),
        ("dict.json", {"image_id": 1}, "list"),
        ("noscore.json", [{"image_id": 1, "category_id": 1, "keypoints": [0.0] * 51}], "'score'"),
        ("text.json", [{"image_id": 1, "category_id": 1, "keypoints": ["a"] * 51, "score": 1}], "non-numeric"),
    ]:
        path = _write(tmp_path / name, content)
        with pytest.raises(OdkdError, match=reason) as e:
            load_results(path)
        _assert_one_line_naming(e, path)

    with pytest.raises(OdkdError, match="cannot read") as e:
        load_results(tmp_path / "missing.json")
    _assert_one_line_naming(e, tmp_path / "missing.json")


def test_eval_rejects_unknown_image_id_and_bad_gt(gt_path, tmp_path):
    results = gt_as_results(load_gt(gt_path))
    results[-1]["image_id"] = 999
    res_path = _write(tmp_path / "res.json", results)
    with pytest.raises(OdkdError, match="image_id 999") as e:
        coco_keypoint_eval(gt_path, res_path)
    _assert_one_line_naming(e, res_path)

    bad_gt = tmp_path / "bad_gt.json"
    bad_gt.write_text("{ not json")
    with pytest.raises(OdkdError, match="not valid JSON") as e:
        coco_keypoint_eval(bad_gt, res_path)
    _assert_one_line_naming(e, bad_gt)

    gt = json.loads(gt_path.read_text())
    del gt["annotations"][1]["num_keypoints"]
    no_count = _write(tmp_path / "no_count.json", gt)
    with pytest.raises(OdkdError, match="annotation 2 lacks 'num_keypoints'") as e:
        load_gt(no_count)
    _assert_one_line_naming(e, no_count)


def test_eval_is_quiet_unless_verbose(gt_path, capsys):
    results = gt_as_results(load_gt(gt_path))
    coco_keypoint_eval(gt_path, results)
    assert capsys.readouterr().out == ""
    coco_keypoint_eval(gt_path, results, verbose=True)
    assert "Average Precision" in capsys.readouterr().out


def test_format_stats_table_and_json(tmp_path):
    stats = dict(zip(STATS_NAMES, [0.12345, 0.5, 0.75, -1.0, 0.9876, 0.2, 0.3, 0.4, 0.0, 1.0]))
    table = format_stats_table(stats)
    lines = table.splitlines()
    assert len(lines) == 3 and len({len(line) for line in lines}) == 1  # aligned columns
    for name in STATS_NAMES:
        assert name in lines[0]
    assert [cell.strip() for cell in lines[2].strip("|").split("|")] == [
        "0.123", "0.500", "0.750", "-1.000", "0.988", "0.200", "0.300", "0.400", "0.000", "1.000"
    ]
    out = tmp_path / "sub" / "stats.json"
    write_stats_json(stats, out)
    assert json.loads(out.read_text()) == stats


def _hand_gt() -> dict:
    """Two instances of three points on 200x200 images: A's box [0, 0, 100, 50] (PCK normaliser 100), B's
    [150, 150, 80, 40], which the image clips to 49 x 40 (normaliser 49); A's third point unlabelled."""
    def ann(ann_id, image_id, box, points):
        return {"id": ann_id, "image_id": image_id, "category_id": 1, "iscrowd": 0, "bbox": box,
                "keypoints": [v for p in points for v in p], "num_keypoints": sum(p[2] > 0 for p in points)}

    return {"images": [{"id": i, "file_name": f"{i}.jpg", "width": 200, "height": 200} for i in (1, 2)],
            "annotations": [ann(1, 1, [0, 0, 100, 50], [(10, 10, 2), (20, 20, 2), (30, 30, 0)]),
                            ann(2, 2, [150, 150, 80, 40], [(160, 160, 1), (170, 170, 2), (180, 180, 2)])],
            "categories": [{"id": 1, "name": "hand", "keypoints": ["a", "b", "c"], "skeleton": []}]}


# A: 0 px and 15 px off (0.15 of 100: in); B: 5 px (0.10 of 49: in), 30 px and 12 px (0.61 and 0.24: out)
HAND_PRED = {1: [(10, 10), (35, 20), (99, 99)], 2: [(163, 164), (200, 170), (180, 192)]}


def test_pck_auc_and_epe_are_mmpose_s_on_hand_made_points(tmp_path):
    """PCK: per point the share of its labelled instances within 0.2 of the box's longer side, then the mean
    over points: (2/2 + 1/2 + 0/1) / 3. AUC: the mean PCK at 0, 1/20 .. 19/20 of 30 px: of the distances
    0, 15, 5, 30, 12 px the points pass 35/2, 9/2 and 11 of the 20 thresholds, 33 / 3 / 20. EPE: 62 px / 5."""
    from odkd.eval.metrics import (gt_points, keypoint_auc, keypoint_epe, pck_box_size, pck_keypoint_eval,
                                   pck_stats)

    gt = load_gt(_write(tmp_path / "hands.json", _hand_gt()), num_keypoints=3)
    anns = [gt.anns[1], gt.anns[2]]
    points, visible, sizes = gt_points(gt, anns)
    assert sizes.tolist() == [100.0, 49.0] and pck_box_size([-5, 10, 20, 30], 100, 100) == 30.0
    pred = np.array([HAND_PRED[1], HAND_PRED[2]], float)
    assert pck_stats(pred, points, visible, sizes) == {"PCK": 0.5, "AUC": pytest.approx(0.55), "EPE": 12.4}
    assert keypoint_auc(points, points, visible) == pytest.approx(19 / 20)  # threshold 0 counts nothing
    assert keypoint_epe(pred, points, np.zeros_like(visible)) == 0.0

    # a results file: each annotation takes the nearest result of its image, a stray one and the order aside
    results = [{"image_id": image_id, "category_id": 1, "score": 1.0,
                "keypoints": [v for x, y in HAND_PRED[image_id] for v in (x, y, 0.9)]} for image_id in (2, 1)]
    stray = {**results[0], "keypoints": [v + 60.0 if i % 3 < 2 else v for i, v in enumerate(results[0]["keypoints"])]}
    assert pck_keypoint_eval(gt, [stray, *results]) == {"PCK": 0.5, "AUC": pytest.approx(0.55), "EPE": 12.4}
    assert pck_keypoint_eval(gt, gt_as_results(gt)) == {"PCK": 1.0, "AUC": pytest.approx(0.95), "EPE": 0.0}
    with pytest.raises(OdkdError, match=r"^r.json: no result for annotation 1 \(image 1, category 1\)"):
        pck_keypoint_eval(gt, results[:1], "r.json")


def test_format_stats_table_of_hand_stats():
    lines = format_stats_table({"PCK": 0.5, "AUC": 0.55, "EPE": 12.4}).splitlines()
    assert [cell.strip() for cell in lines[0].strip("|").split("|")] == ["PCK", "AUC", "EPE"]
    assert [cell.strip() for cell in lines[2].strip("|").split("|")] == ["0.500", "0.550", "12.400"]
