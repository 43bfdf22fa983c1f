"""`odkd cache score`: what a store teaches, scored against labels of the same people.

Each teacher's stored maps are read as the student's Gaussian targets read them (each blob's centroid,
odkd.distill.targets.blob_centroids), moved into the image through the stored crop, and scored two ways:

- as predictions: OKS AP with pycocotools, each person scored by the mean stored peak of the joints it
  teaches, the keypoint set's sigmas;
- as labels, at each conf_floor: of the labelled joints, the share a stage would teach (stored peak at
  or above the floor) and the share it teaches right (within OKS 0.5 of the label, as COCO's per-joint
  similarity), and of what it teaches, the share that is right. That is what conf_floor trades.

Stored instances (GT people or a detector's boxes) are matched to labelled people of their image by OKS,
best pairs first, each at most once; a stored instance of nobody (OKS below MATCH_OKS with every
person) teaches joints that count as taught and wrong.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import torch

from odkd.data.instances import fill_box_areas
from odkd.data.keypoints import KeypointSet, oks_sigmas, stored_record
from odkd.data.transforms import affine_transform, get_affine_transform
from odkd.distill.objective import teacher_blob_radius
from odkd.distill.targets import blob_centroids
from odkd.distill.warp import unpack_bits
from odkd.errors import OdkdError
from odkd.eval.metrics import coco_keypoint_eval, joint_similarity, load_gt, oks_iou
from odkd.store.reader import TeacherTargets

MATCH_OKS = 0.1  # below it a stored instance and a labelled person are not the same person
RIGHT_OKS = 0.5  # a taught joint within this per-joint OKS of its label is right
DEFAULT_FLOORS = (0.5, 0.6, 0.7, 0.8, 0.9)
ROWS_AT_ONCE = 2048
TEACHERS = {"pt": "PT", "st": "ST"}


@dataclass(frozen=True)
class FloorCounts:
    floor: float
    labelled: int  # labelled joints of every person in the store's images, taught or missed
    taught: int  # joints taught at this floor, on any stored instance
    right: int  # taught, on a labelled joint, within RIGHT_OKS of it

    @property
    def coverage(self) -> float:
        return self.right / max(self.labelled, 1)

    @property
    def precision(self) -> float:
        return self.right / max(self.taught, 1)


@dataclass(frozen=True)
class TeacherScore:
    teacher: str
    stats: dict[str, float]  # coco_keypoint_eval's
    floors: tuple[FloorCounts, ...]


def stored_keypoints(targets: TeacherTargets, key: str, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Teacher `key`'s stored joints of `rows` in image pixels (N, K, 2) and their stored peaks (N, K), 0 where
    its map holds no blob or the row failed (meta/ok 0)."""
    radius = teacher_blob_radius(targets.attrs.get("settings", {}))
    map_size = targets.layout.map_size
    points, peaks = [], []
    for start in range(0, len(rows), ROWS_AT_ONCE):  # unpacked, COCO's 150k people would take 30 GB
        batch = targets.get_batch(rows[start:start + ROWS_AT_ONCE],
                                  [f"{key}/heatmaps", f"{key}/conf", "meta/center", "meta/scale", "meta/ok"])
        bits = unpack_bits(torch.from_numpy(batch[f"{key}/heatmaps"]), map_size[0]).float()
        centroids, count = blob_centroids(bits, window=int(radius) + 2)
        points += [affine_transform(c, get_affine_transform(center, scale, 0, map_size, inv=True))
                   for c, center, scale in zip(centroids.numpy(), batch["meta/center"], batch["meta/scale"])]
        present = (count.numpy() > 0) & batch["meta/ok"].astype(bool)[:, None]
        peaks.append(np.where(present, batch[f"{key}/conf"].astype(np.float64), 0.0))
    return np.stack(points), np.concatenate(peaks)


def match_people(gt, image_ids: np.ndarray, poses: np.ndarray, sigmas: np.ndarray) -> dict[int, dict]:
    """Stored instance -> its labelled person: per image, the pairs by OKS (over the joints both have),
    best first, each side at most once, none below MATCH_OKS."""
    by_image = defaultdict(list)
    for index, image_id in enumerate(image_ids):
        by_image[int(image_id)].append(index)
    matched = {}
    for image_id, indices in by_image.items():
        people = [a for a in gt.imgToAnns.get(image_id, []) if not a.get("iscrowd", 0)]
        pairs = []
        for p, person in enumerate(people):
            area = float(person["area"])
            oks = oks_iou(np.asarray(person["keypoints"], np.float64), poses[indices], area, np.full(len(indices), area),
                          sigmas, in_vis_thr=0.0)
            pairs += [(value, p, i) for value, i in zip(oks, indices) if value >= MATCH_OKS]
        taken_people, taken = set(), set()
        for _, p, i in sorted(pairs, reverse=True):
            if p not in taken_people and i not in taken:
                matched[i] = people[p]
                taken_people.add(p)
                taken.add(i)
    return matched


def floor_counts(points: np.ndarray, conf: np.ndarray, matched: dict[int, dict], sigmas: np.ndarray,
                 labelled_joints: int, floors) -> tuple[FloorCounts, ...]:
    labels = np.zeros(conf.shape + (3,))
    areas = np.ones(len(conf))
    for i, person in matched.items():
        labels[i] = np.asarray(person["keypoints"], np.float64).reshape(-1, 3)
        areas[i] = person["area"]
    labelled = labels[..., 2] > 0
    sq_dist = ((points - labels[..., :2]) ** 2).sum(-1)
    close = labelled & (joint_similarity(sq_dist, areas, sigmas) >= RIGHT_OKS)
    return tuple(FloorCounts(floor=float(f), labelled=labelled_joints, taught=int((conf >= f).sum()),
                             right=int((close & (conf >= f)).sum())) for f in floors)


@dataclass(frozen=True)
class StoreScore:
    rows: int  # stored people scored: those of the images both the store and the labels hold
    images: int
    teachers: tuple[TeacherScore, ...]


def score_store(url: str, ann_file: str, kset: KeypointSet, *, floors=DEFAULT_FLOORS,
                storage_options: dict | None = None) -> StoreScore:
    """Each teacher's stored joints in the store at `url` against the people of `ann_file` (COCO keypoints),
    over the images both hold: a team may label a subset of the images its store covers."""
    sigmas = oks_sigmas(kset)
    if sigmas is None:
        raise OdkdError(f"keypoint set {kset.name!r} has no OKS sigmas; cache score needs them to match and score joints")
    targets = TeacherTargets.open(url, storage_options=storage_options, keypoints=stored_record(kset))
    gt = load_gt(ann_file, kset.num_keypoints)
    fill_box_areas(gt.dataset)  # CrowdPose gives no 'area': the box's, as COCOeval scores it
    all_ids = targets.get_batch(np.arange(len(targets)), ["meta/image_id"])["meta/image_id"]
    images = sorted(set(map(int, all_ids)) & set(gt.getImgIds()))
    if not images:
        raise OdkdError(f"{ann_file}: labels none of the images of {url}; give labels of the store's own images")
    rows = np.nonzero(np.isin(all_ids, images))[0]
    image_ids = all_ids[rows]
    labelled_joints = sum(int((np.asarray(person["keypoints"])[2::3] > 0).sum())
                          for image_id in images for person in gt.imgToAnns.get(image_id, [])
                          if not person.get("iscrowd", 0))
    first_category = min(gt.getCatIds())
    scores = []
    for key, name in TEACHERS.items():
        points, conf = stored_keypoints(targets, key, rows)
        taught = conf > 0
        poses = np.concatenate([points, conf[..., None]], -1)
        matched = match_people(gt, image_ids, poses, sigmas)
        # the store keeps no category: a row takes its person's (AP-10K's species), else the file's first
        results = [{"image_id": int(image_ids[i]), "category_id": matched[i]["category_id"] if i in matched else
                    first_category, "keypoints": poses[i].ravel().tolist(), "score": float(conf[i][taught[i]].mean())}
                   for i in np.nonzero(taught.any(1))[0]]
        if not results:
            raise OdkdError(f"{url}: {name} teaches no joint on the {len(images)} labelled images")
        stats = coco_keypoint_eval(gt, results, sigmas=sigmas, image_ids=images)
        scores.append(TeacherScore(name, stats, floor_counts(points, conf, matched, sigmas, labelled_joints, floors)))
    return StoreScore(rows=len(rows), images=len(images), teachers=tuple(scores))


def format_store_score(score: StoreScore, url: str, ann_file: str) -> str:
    lines = [f"{url}: {score.rows} stored people on the {score.images} images {ann_file} labels", "",
             "| teacher | OKS AP | AP .5 | conf_floor | labelled joints taught right | taught joints right | joints taught |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for teacher in score.teachers:
        for n, counts in enumerate(teacher.floors):
            ap = f"{teacher.stats['AP']:.3f} | {teacher.stats['AP .5']:.3f}" if n == 0 else " | "
            lines.append(f"| {teacher.teacher if n == 0 else ''} | {ap} | {counts.floor:g} | {counts.coverage:.2f} | "
                         f"{counts.precision:.2f} | {counts.taught} |")
    return "\n".join(lines)
