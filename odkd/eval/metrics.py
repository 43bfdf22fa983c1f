"""COCO keypoint evaluation: results format, rescoring, OKS-NMS and COCOeval, as official HRNet does; and
PCK, AUC and EPE, as mmpose scores hands, for a keypoint set without OKS sigmas."""

from __future__ import annotations

import contextlib
import io
import json
import numbers
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from odkd.data.instances import fill_box_areas
from odkd.data.keypoints import COCO_SIGMAS
from odkd.errors import OdkdError

STATS_NAMES = ("AP", "AP .5", "AP .75", "AP (M)", "AP (L)", "AR", "AR .5", "AR .75", "AR (M)", "AR (L)")

RESULT_KEYS = ("image_id", "category_id", "keypoints", "score")
_GT_LISTS = ("images", "annotations", "categories")
# Every field (besides the id) that COCOeval reads from a keypoint ground-truth annotation.
# no 'area': CrowdPose and AIC give none, and their evaluators take the box's (coco_keypoint_eval does too)
_GT_ANN_KEYS = ("image_id", "category_id", "iscrowd", "bbox", "keypoints", "num_keypoints")


def joint_similarity(sq_dist: np.ndarray, area: np.ndarray, sigmas: np.ndarray) -> np.ndarray:
    """COCOeval's per-keypoint similarity of squared pixel distances (N, K) at each pose's area (N,)."""
    return np.exp(-sq_dist / ((2 * sigmas) ** 2) / area[:, None] / 2)


def oks_iou(
    g: np.ndarray,
    d: np.ndarray,
    a_g: float,
    a_d: np.ndarray,
    sigmas: np.ndarray | None = None,
    in_vis_thr: float | None = None,
) -> np.ndarray:
    """OKS of one pose `g` (K*3,) against each of `d` (N, K*3); the scale is the mean of the two areas.

    Without `in_vis_thr` the mean runs over all K keypoints (as HRNet's NMS does); with it, only
    over keypoints whose confidence exceeds it in both poses, and a pair with none scores 0.
    """
    sigmas = COCO_SIGMAS if sigmas is None else np.asarray(sigmas, dtype=np.float64)
    g = np.asarray(g, dtype=np.float64).reshape(-1, 3)
    d = np.asarray(d, dtype=np.float64).reshape(-1, g.shape[0], 3)
    scale = (a_g + np.asarray(a_d, dtype=np.float64)) / 2 + np.spacing(1)
    sq_dist = (d[..., 0] - g[:, 0]) ** 2 + (d[..., 1] - g[:, 1]) ** 2
    similarity = joint_similarity(sq_dist, scale, sigmas)
    if in_vis_thr is None:
        return similarity.mean(axis=1)
    confident = (g[:, 2] > in_vis_thr) & (d[..., 2] > in_vis_thr)
    count = confident.sum(axis=1)
    return np.where(count > 0, (similarity * confident).sum(axis=1) / np.maximum(count, 1), 0.0)


def oks_nms(
    kpts_db: list[dict], thresh: float, sigmas: np.ndarray | None = None, in_vis_thr: float | None = None
) -> list[int]:
    """Greedy OKS-NMS over dicts with 'keypoints' (K, 3), 'score' and 'area'.

    Returns the kept indices, highest score first; a pose is dropped when its OKS with a kept,
    better-scored pose exceeds `thresh`. Equal scores keep their input order.
    """
    if not kpts_db:
        return []
    poses = np.stack([np.asarray(k["keypoints"], dtype=np.float64).reshape(-1) for k in kpts_db])
    scores = np.array([k["score"] for k in kpts_db], dtype=np.float64)
    areas = np.array([k["area"] for k in kpts_db], dtype=np.float64)
    order = np.argsort(-scores, kind="stable")
    keep = []
    while order.size:
        best, rest = order[0], order[1:]
        keep.append(int(best))
        overlap = oks_iou(poses[best], poses[rest], areas[best], areas[rest], sigmas, in_vis_thr)
        order = rest[overlap <= thresh]
    return keep


def rescore_instances(keypoints: np.ndarray, box_scores: np.ndarray, in_vis_thr: float = 0.2) -> np.ndarray:
    """Instance scores the HRNet way: box score times the mean confidence of keypoints above `in_vis_thr`.

    An instance with no keypoint above the threshold scores 0. `keypoints` is (N, K, 3).
    """
    confidence = np.asarray(keypoints, dtype=np.float64)[..., 2]
    confident = confidence > in_vis_thr
    count = confident.sum(axis=1)
    mean_conf = np.where(count > 0, (confidence * confident).sum(axis=1) / np.maximum(count, 1), 0.0)
    return np.asarray(box_scores, dtype=np.float64) * mean_conf


def keypoint_results(
    image_ids: Sequence[int], keypoints: np.ndarray, scores: np.ndarray, category_id: int | Sequence[int] = 1
) -> list[dict]:
    """COCO keypoint results from per-instance image ids, (N, K, 3) [x, y, conf] in image pixels and scores;
    `category_id` one for all, or each instance's (AP-10K's species)."""
    keypoints = np.asarray(keypoints, dtype=np.float64)
    categories = [category_id] * len(image_ids) if isinstance(category_id, int) else list(category_id)
    scores = np.asarray(scores, dtype=np.float64)
    if not len(image_ids) == len(keypoints) == len(scores):
        raise ValueError(
            f"keypoint_results: {len(image_ids)} image ids, {len(keypoints)} poses and {len(scores)} scores differ"
        )
    return [
        {
            "image_id": int(image_id),
            "category_id": int(category),
            "keypoints": pose.reshape(-1).tolist(),
            "score": float(score),
        }
        for image_id, pose, score, category in zip(image_ids, keypoints, scores, categories)
    ]


def nms_per_image(
    results: list[dict], areas: np.ndarray, thresh: float = 0.9, in_vis_thr: float | None = 0.2,
    sigmas: np.ndarray | None = None,
) -> list[dict]:
    """Rescoring then OKS-NMS within each image, as HRNet's `evaluate` does.

    `results` carry the detector's box score in 'score'; `areas` (one per result) are the crop
    box areas, (scale * 200) w * h in HRNet. With `in_vis_thr` the scores are first rescored
    by `rescore_instances`; pass None when they already are. Returns new result dicts with the
    final score, grouped by image in first-seen order, highest score first within an image.
    """
    if len(areas) != len(results):
        raise ValueError(f"nms_per_image: {len(results)} results but {len(areas)} areas")
    if not results:
        return []
    poses = np.array([r["keypoints"] for r in results], dtype=np.float64).reshape(len(results), -1, 3)
    scores = np.array([r["score"] for r in results], dtype=np.float64)
    if in_vis_thr is not None:
        scores = rescore_instances(poses, scores, in_vis_thr)
    by_image = defaultdict(list)
    for index, result in enumerate(results):
        by_image[result["image_id"]].append(index)
    kept = []
    for indices in by_image.values():
        db = [{"keypoints": poses[i], "score": scores[i], "area": areas[i]} for i in indices]
        kept.extend({**results[indices[j]], "score": float(scores[indices[j]])} for j in oks_nms(db, thresh, sigmas))
    return kept


def _read_json(path: str | Path, what: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except OSError as e:
        raise OdkdError(f"{path}: cannot read {what} JSON ({e.strerror or e})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise OdkdError(f"{path}: {what} is not valid JSON ({e})") from None


def _check_gt(data, label: str, num_keypoints: int) -> None:
    if not isinstance(data, dict):
        raise OdkdError(f"{label}: ground truth must be a COCO JSON object, got {type(data).__name__}")
    for key in _GT_LISTS:
        if not isinstance(data.get(key), list):
            raise OdkdError(f"{label}: ground truth has no '{key}' list")
        for i, entry in enumerate(data[key]):
            if not isinstance(entry, dict) or "id" not in entry:
                raise OdkdError(f"{label}: {key} [{i}] is not an object with an 'id'")
    for ann in data["annotations"]:
        missing = [k for k in _GT_ANN_KEYS if k not in ann]
        if missing:
            raise OdkdError(f"{label}: annotation {ann['id']} lacks '{missing[0]}'")
        if len(ann["keypoints"]) != 3 * num_keypoints:
            raise OdkdError(
                f"{label}: annotation {ann['id']} has {len(ann['keypoints'])} keypoint values, "
                f"expected {3 * num_keypoints}"
            )


def load_gt(path: str | Path, num_keypoints: int = len(COCO_SIGMAS)) -> COCO:
    """A COCO keypoint ground truth from `path`, checked for every field COCOeval reads."""
    data = _read_json(path, "ground truth")
    _check_gt(data, str(path), num_keypoints)
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def _check_results(results, label: str, num_keypoints: int) -> None:
    if not isinstance(results, list):
        raise OdkdError(f"{label}: results must be a JSON list of objects, got {type(results).__name__}")
    if not results:
        raise OdkdError(f"{label}: results list is empty")
    for i, result in enumerate(results):
        if not isinstance(result, dict):
            raise OdkdError(f"{label}: result [{i}] is a {type(result).__name__}, not an object")
        missing = [k for k in RESULT_KEYS if k not in result]
        if missing:
            raise OdkdError(f"{label}: result [{i}] lacks '{missing[0]}'")
        kpts = result["keypoints"]
        if not isinstance(kpts, (list, np.ndarray)) or len(kpts) != 3 * num_keypoints:
            size = len(kpts) if isinstance(kpts, (list, np.ndarray)) else type(kpts).__name__
            raise OdkdError(
                f"{label}: result [{i}] has keypoints of length {size}, expected {3 * num_keypoints} "
                f"({num_keypoints} x [x, y, score])"
            )
        if not all(_is_number(v) for v in kpts):
            raise OdkdError(f"{label}: result [{i}] has non-numeric keypoints")
        if not _is_number(result["score"]):
            raise OdkdError(f"{label}: result [{i}] has a non-numeric score {result['score']!r}")


def load_results(path: str | Path, num_keypoints: int = len(COCO_SIGMAS)) -> list[dict]:
    """COCO keypoint results from a JSON file, checked for the fields and keypoint length COCOeval needs."""
    results = _read_json(path, "results")
    _check_results(results, str(path), num_keypoints)
    return results


def gt_as_results(coco: COCO) -> list[dict]:
    """Every non-crowd annotation with labelled keypoints as a result of score 1 (AP must come out 1)."""
    return [
        {
            "image_id": ann["image_id"],
            "category_id": ann["category_id"],
            "keypoints": [float(v) for v in ann["keypoints"]],
            "score": 1.0,
        }
        for ann in coco.dataset["annotations"]
        if not ann.get("iscrowd", 0) and ann.get("num_keypoints", 0) > 0
    ]


def coco_keypoint_eval(
    gt: COCO | str | Path, results: list[dict] | str | Path, verbose: bool = False, sigmas: np.ndarray | None = None,
    image_ids: list[int] | None = None,
) -> dict[str, float]:
    """OKS AP/AR of `results` against `gt` via COCOeval(iouType='keypoints'), named as STATS_NAMES, with the
    keypoint set's `sigmas` (COCO's 17 when None). A ground truth without 'area' (CrowdPose, AIC) is scored
    with each box's area, as their evaluators do. pycocotools' own printout is swallowed unless `verbose`.
    """
    num_keypoints = len(COCO_SIGMAS) if sigmas is None else len(sigmas)
    if isinstance(gt, COCO):
        gt_label = "ground truth"
        _check_gt(gt.dataset, gt_label, num_keypoints)
        coco_gt = gt
    else:
        gt_label = str(gt)
        coco_gt = load_gt(gt, num_keypoints)
    if isinstance(results, (str, Path)):
        res_label = str(results)
        dets = load_results(results, num_keypoints)
    else:
        res_label = "results"
        _check_results(results, res_label, num_keypoints)
        dets = results

    gt_image_ids, cat_ids = set(coco_gt.getImgIds()), set(coco_gt.getCatIds())
    for i, det in enumerate(dets):
        if det["image_id"] not in gt_image_ids:
            raise OdkdError(f"{res_label}: result [{i}] image_id {det['image_id']!r} is not in {gt_label}")
        if det["category_id"] not in cat_ids:
            raise OdkdError(f"{res_label}: result [{i}] category_id {det['category_id']!r} is not in {gt_label}")

    # Fresh dicts: loadRes writes area/bbox/id into them and would take its bbox branch if one were present.
    clean = [
        {
            "image_id": d["image_id"],
            "category_id": d["category_id"],
            "keypoints": np.asarray(d["keypoints"], dtype=np.float64).tolist(),
            "score": float(d["score"]),
        }
        for d in dets
    ]
    fill_box_areas(coco_gt.dataset)
    quiet = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())
    with quiet:
        coco_dt = coco_gt.loadRes(clean)
        coco_eval = COCOeval(coco_gt, coco_dt, iouType="keypoints")
        coco_eval.params.useSegm = None
        if sigmas is not None:
            coco_eval.params.kpt_oks_sigmas = np.asarray(sigmas, dtype=np.float64)
        if image_ids is not None:  # the other images' people and results are left out, as COCOeval's imgIds do
            coco_eval.params.imgIds = sorted(image_ids)
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    return {name: float(value) for name, value in zip(STATS_NAMES, coco_eval.stats)}


def part_keypoint_eval(gt: COCO, results: list[dict], sigmas: np.ndarray, parts: dict[str, tuple[int, int]]
                       ) -> dict[str, dict[str, float]]:
    """OKS AP/AR of each part of a keypoint set alone (COCO-WholeBody's body, foot, face and hands), as
    mmpose's whole-body metric reports them: ground truth and results cut to the part's points, scored
    with the part's sigmas; a part no person has labelled scores -1, as COCOeval says "no ground truth"."""
    out = {}
    for name, (start, stop) in parts.items():
        dataset = {**gt.dataset, "annotations": [
            {**ann, "keypoints": ann["keypoints"][3 * start:3 * stop],
             "num_keypoints": sum(1 for v in ann["keypoints"][3 * start + 2:3 * stop:3] if v > 0)}
            for ann in gt.dataset["annotations"]]}
        part_gt = COCO()
        part_gt.dataset = dataset
        with contextlib.redirect_stdout(io.StringIO()):
            part_gt.createIndex()
        part_results = [{**r, "keypoints": list(r["keypoints"][3 * start:3 * stop])} for r in results]
        out[name] = coco_keypoint_eval(part_gt, part_results, sigmas=np.asarray(sigmas)[start:stop])
    return out


# CrowdPose's crowd-index groups (its crowdposetools): an image's people overlap little, some, or much
CROWD_GROUPS = {"easy": (0.0, 0.1), "medium": (0.1, 0.8), "hard": (0.8, float("inf"))}


def crowd_keypoint_eval(gt: COCO, results: list[dict], sigmas: np.ndarray | None) -> dict[str, dict[str, float]]:
    """CrowdPose's AP easy, medium and hard: the images of each crowd-index group scored alone; empty when
    the images carry no crowdIndex, and a group with no image is left out."""
    indices = {img_id: img.get("crowdIndex") for img_id, img in gt.imgs.items()}
    if not indices or any(index is None for index in indices.values()):
        return {}
    out = {}
    for name, (low, high) in CROWD_GROUPS.items():
        chosen = [img_id for img_id, index in indices.items() if low <= index < high]
        if chosen:
            out[name] = coco_keypoint_eval(gt, results, sigmas=sigmas, image_ids=chosen)
    return out


# Sets without OKS sigmas (hands) are scored as mmpose scores them: PCKAccuracy(thr=0.2, norm_item='bbox'),
# AUC(norm_factor=30, num_thrs=20) and EPE, over one prediction per labelled instance
PCK_STATS_NAMES = ("PCK", "AUC", "EPE")
PCK_THRESHOLD = 0.2  # of the GT box's longer side
AUC_NORM_PX = 30.0
AUC_THRESHOLDS = 20


def keypoint_distances(pred: np.ndarray, gt: np.ndarray, visible: np.ndarray, norm: np.ndarray) -> np.ndarray:
    """(N, K) distances from each predicted point to its GT point, divided by the instance's `norm` (N,);
    NaN where the GT point is unlabelled (visibility 0) or the instance has no positive norm."""
    pred, gt = np.asarray(pred, np.float64)[..., :2], np.asarray(gt, np.float64)[..., :2]
    norm = np.asarray(norm, np.float64)
    counted = (np.asarray(visible) > 0) & (norm > 0)[:, None]
    distances = np.linalg.norm(pred - gt, axis=-1) / np.where(norm > 0, norm, 1.0)[:, None]
    return np.where(counted, distances, np.nan)


def keypoint_pck(distances: np.ndarray, threshold: float) -> float:
    """mmpose's PCK: per point, the share of its counted distances below `threshold`; then the mean over
    the points that have any (0 when none has)."""
    counted = ~np.isnan(distances)
    per_point = [(column[ok] < threshold).mean() for column, ok in zip(distances.T, counted.T) if ok.any()]
    return float(np.mean(per_point)) if per_point else 0.0


def keypoint_auc(pred: np.ndarray, gt: np.ndarray, visible: np.ndarray, norm_px: float = AUC_NORM_PX,
                 thresholds: int = AUC_THRESHOLDS) -> float:
    """mmpose's AUC: the mean PCK at thresholds i / `thresholds` (i = 0 .. thresholds - 1) of `norm_px`
    pixels; threshold 0 counts nothing, so perfect points score (thresholds - 1) / thresholds."""
    distances = keypoint_distances(pred, gt, visible, np.full(len(gt), norm_px))
    return float(np.mean([keypoint_pck(distances, i / thresholds) for i in range(thresholds)]))


def keypoint_epe(pred: np.ndarray, gt: np.ndarray, visible: np.ndarray) -> float:
    """The mean end-point error in pixels over every labelled point (0 when none is)."""
    distances = keypoint_distances(pred, gt, visible, np.ones(len(gt)))
    counted = distances[~np.isnan(distances)]
    return float(counted.mean()) if counted.size else 0.0


def pck_box_size(bbox, width: int, height: int) -> float:
    """The PCK normaliser of a GT box [x, y, w, h]: its longer side once clipped to the image, as mmpose
    clips it (to width - 1 and height - 1)."""
    x, y, w, h = (float(v) for v in bbox)
    x1, x2 = np.clip([x, x + w], 0, width - 1)
    y1, y2 = np.clip([y, y + h], 0, height - 1)
    return float(max(x2 - x1, y2 - y1))


def pck_stats(pred: np.ndarray, gt: np.ndarray, visible: np.ndarray, box_sizes: np.ndarray) -> dict[str, float]:
    """PCK@0.2 of the box size, AUC and EPE, named as PCK_STATS_NAMES, of predictions (N, K, 2+) against GT
    points (N, K, 2+) with their visibility (N, K) and their boxes' pck_box_size (N,)."""
    pck = keypoint_pck(keypoint_distances(pred, gt, visible, box_sizes), PCK_THRESHOLD)
    values = (pck, keypoint_auc(pred, gt, visible), keypoint_epe(pred, gt, visible))
    return dict(zip(PCK_STATS_NAMES, values))


def _annotation_box_size(gt: COCO, ann: dict) -> float:
    image = gt.imgs[ann["image_id"]]
    return pck_box_size(ann["bbox"], image["width"], image["height"])


def labelled_instances(gt: COCO) -> list[dict]:
    """The annotations PCK scores: not crowd, a labelled point, a box with a side inside the image."""
    return [ann for ann in gt.dataset["annotations"]
            if not ann.get("iscrowd", 0) and any(v > 0 for v in ann["keypoints"][2::3])
            and _annotation_box_size(gt, ann) > 0]


def gt_points(gt: COCO, anns: list[dict]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The GT points (N, K, 2), their visibility (N, K) and pck_box_size (N,) of annotations of `gt`."""
    points = np.array([ann["keypoints"] for ann in anns], np.float64).reshape(len(anns), -1, 3)
    sizes = np.array([_annotation_box_size(gt, ann) for ann in anns])
    return points[..., :2], points[..., 2], sizes


def pair_results(gt: COCO, results: list[dict], label: str = "results") -> tuple[list[dict], np.ndarray]:
    """Each labelled annotation with the result of its image and category nearest to it (mean distance over
    its labelled points), a result paired at most once, nearest pairs first: the annotations and their
    predicted points (N, K, 2). An annotation left without a result is one error naming it."""
    anns = labelled_instances(gt)
    if not anns:
        raise OdkdError("ground truth: no labelled instance to score by PCK, AUC and EPE")
    by_group = defaultdict(list)
    for index, result in enumerate(results):
        by_group[(result["image_id"], result["category_id"])].append(index)
    poses = np.array([r["keypoints"] for r in results], np.float64).reshape(len(results), -1, 3)[..., :2]
    candidates = []
    for a, ann in enumerate(anns):
        points = np.asarray(ann["keypoints"], np.float64).reshape(-1, 3)
        labelled = points[:, 2] > 0
        for r in by_group.get((ann["image_id"], ann["category_id"]), []):
            distance = np.linalg.norm(poses[r][labelled] - points[labelled, :2], axis=1).mean()
            candidates.append((distance, a, r))
    paired: dict[int, int] = {}
    used = set()
    for _, a, r in sorted(candidates):
        if a not in paired and r not in used:
            paired[a] = r
            used.add(r)
    for a, ann in enumerate(anns):
        if a not in paired:
            raise OdkdError(f"{label}: no result for annotation {ann['id']} (image {ann['image_id']}, category "
                            f"{ann['category_id']}); PCK, AUC and EPE score one prediction per labelled instance")
    return anns, poses[[paired[a] for a in range(len(anns))]]


def pck_keypoint_eval(gt: COCO, results: list[dict], label: str = "results") -> dict[str, float]:
    """PCK, AUC and EPE (pck_stats) of a results file against `gt`, each labelled annotation scored by the
    result pair_results gives it."""
    anns, pred = pair_results(gt, results, label)
    points, visible, sizes = gt_points(gt, anns)
    return pck_stats(pred, points, visible, sizes)


def format_stats_table(stats: dict[str, float]) -> str:
    """The stats (COCO's 10, or PCK, AUC and EPE) as a two-row markdown table in their order, columns
    aligned, values to 3 decimals."""
    names = list(stats)
    values = [f"{stats[name]:.3f}" for name in names]
    widths = [max(len(name), len(value)) for name, value in zip(names, values)]
    header = "| " + " | ".join(name.ljust(w) for name, w in zip(names, widths)) + " |"
    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    row = "| " + " | ".join(value.rjust(w) for value, w in zip(values, widths)) + " |"
    return "\n".join((header, rule, row))


def write_stats_json(stats: dict[str, float], path: str | Path) -> None:
    """Write the stats as a JSON object {name: value}, creating the parent folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({name: float(value) for name, value in stats.items()}, indent=2) + "\n")
