"""Warp fidelity: cached teacher targets warped into augmented crops, against the same teachers run on those crops.

    .venv/bin/python bench/fidelity.py --build [--margins 1.0 1.25] [--config pipeline/demo.toml] [--device cuda]
    .venv/bin/python bench/fidelity.py --store cache/demo.zarr [--config pipeline/demo.toml]
    .venv/bin/python bench/fidelity.py --tiny [--record]

Samples are TopDownDataset(train=True, stored_rows=...) draws, (epoch, index) for --epochs epochs of the
first instances, --samples in all; every store sees the same draws. Per sample and map:

- warped: the store's rows through odkd.distill.warp.warp_binary_batch with the sample's teacher_theta, as the
  student trainer warps them;
- online: the store's producer rule (TeacherProducer: the teachers with the store's flip test, shift and
  precision, binarize at its threshold and mode, mask >= mask_threshold, its mask gate) on the augmented crop,
  i.e. what the store would hold had it cached that crop;
- IoU of the two binary maps; a map empty on both sides is skipped, one empty on one side only counts IoU 0
  ("1-sided": their share of the maps counted);
- px: the distance between the centroids of the two binary maps in heatmap pixels, over maps non-empty on both
  sides. A map holding several persons' responses has its centroid between them, so a response that one side
  lacks (outside a margin-1 store's crop) moves it.
- ideal: an exactly equivariant teacher, what a trained one approximates: unit Gaussians (sigma of [data]) at
  every labelled person's joints, placed at input / stride as the GT targets are, with the store's flip test
  through odkd's flip_back; and the instance's own mask (mask_target, no flip test). Rendered in the stored crop,
  packed and warped like a row of the store, against rendered in the augmented crop. It isolates geometry,
  margin and re-binarization from the teachers' own (non-)equivariance. Its blobs keep their size in every
  crop, as a trained teacher's do, while warped blobs scale by 1 / (scale ratio): IoU falls with the ratio.

Buckets: |rotation|; scale ratio = augmented scale / canonical scale (half-body crops included); flip; half-body.
The goal: IoU >= 0.8 and px <= 1 for |rot| <= 45 and scale ratio 0.65-1.35.
--tiny makes its own world (synthetic data and seeded, untrained teachers of the config's architectures,
threshold relative): untrained teachers are not equivariant, so only trained-teacher numbers count.
--record writes the tables into bench/RESULTS.md under "## Warp fidelity (bench/fidelity.py)".
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from cache import prepare_world, record, table  # bench/cache.py, beside this script
from odkd.config import load_config, resolve_device
from odkd.data.dataset import TopDownDataset, frame_from_batch
from odkd.data.instances import PersonInstances, load_instances
from odkd.data.keypoints import FLIP_INDEX, NUM_JOINTS
from odkd.data.targets import mask_target
from odkd.data.transforms import CropFrame, affine_transform
from odkd.distill.objective import teacher_blob_radius
from odkd.distill.warp import warp_binary_batch
from odkd.errors import OdkdError
from odkd.models.inference import flip_back
from odkd.models.teacher import loaded_teacher, resolve_teachers
from odkd.store.binarize import binarize
from odkd.store.bitpack import bitpack_maps, unpack_maps
from odkd.store.reader import MAP_ARRAYS, TeacherTargets
from odkd.store.schema import StoreLayout
from odkd.teachers import build_cache
from odkd.teachers.producer import TeacherProducer, set_precision_layout

SECTION = "## Warp fidelity (bench/fidelity.py)"
TEACHER_MAPS = {"PT": "pt/heatmaps", "ST": "st/heatmaps", "mask": "st/mask"}
IDEAL_MAPS = ("ideal keypoints", "ideal mask")
TARGETS = (*TEACHER_MAPS, *IDEAL_MAPS)
MASKS = ("mask", "ideal mask")
GOAL = {"iou": 0.8, "px": 1.0}
GOAL_BUCKET = "goal: abs(rot) <= 45, scale 0.65-1.35"
ROTATION_EDGES = (0, 15, 30, 45)


def frame_buckets(rotation: np.ndarray, ratio: np.ndarray, flip: np.ndarray, half_body: np.ndarray):
    """(label, samples) of every bucket. The augmentation clips the scale at 1 -+ 0.35, so many ratios are exactly
    0.65 or 1.35: both ends belong to the goal's range."""
    rot, ratio = np.abs(rotation), np.round(ratio, 4)
    rows = [("all", np.ones_like(flip)), (GOAL_BUCKET, (rot <= 45) & (ratio >= 0.65) & (ratio <= 1.35)),
            ("abs(rot) 0", rot == 0)]
    rows += [(f"abs(rot) ({a}, {b}]", (rot > a) & (rot <= b)) for a, b in zip(ROTATION_EDGES, ROTATION_EDGES[1:])]
    rows += [(f"abs(rot) > {ROTATION_EDGES[-1]}", rot > ROTATION_EDGES[-1]), ("scale < 0.65", ratio < 0.65),
             ("scale [0.65, 0.85)", (ratio >= 0.65) & (ratio < 0.85)),
             ("scale [0.85, 1.15]", (ratio >= 0.85) & (ratio <= 1.15)),
             ("scale (1.15, 1.35]", (ratio > 1.15) & (ratio <= 1.35)), ("scale > 1.35", ratio > 1.35),
             ("flip no", ~flip), ("flip yes", flip), ("half-body no", ~half_body), ("half-body yes", half_body)]
    return rows


def compare(warped: torch.Tensor, online: torch.Tensor) -> dict[str, np.ndarray]:
    """Per map (B, C): IoU (nan where both sides are empty), whether exactly one side is empty, and the centroid
    offset warped - online (dx, dy) in heatmap pixels (nan unless both sides have pixels)."""
    w, o = warped.bool(), online.bool()
    count_w, count_o = w.sum((-2, -1)), o.sum((-2, -1))
    union = (w | o).sum((-2, -1))
    nan = torch.tensor(float("nan"), device=w.device)
    iou = torch.where(union > 0, (w & o).sum((-2, -1)) / union.clamp(min=1), nan)
    both = (count_w > 0) & (count_o > 0)
    ys = torch.arange(w.shape[-2], device=w.device, dtype=torch.float32).view(-1, 1)
    xs = torch.arange(w.shape[-1], device=w.device, dtype=torch.float32).view(1, -1)
    offset = {}
    for axis, grid in (("dx", xs), ("dy", ys)):
        gap = (w * grid).sum((-2, -1)) / count_w.clamp(min=1) - (o * grid).sum((-2, -1)) / count_o.clamp(min=1)
        offset[axis] = torch.where(both, gap, nan)
    found = {"iou": iou, "one_sided": (count_w > 0) != (count_o > 0), **offset}
    return {name: value.cpu().numpy() for name, value in found.items()}


@dataclasses.dataclass
class Found:
    """Per-map comparisons of one target over all samples, (S, C) each."""

    iou: list = dataclasses.field(default_factory=list)
    one_sided: list = dataclasses.field(default_factory=list)
    dx: list = dataclasses.field(default_factory=list)
    dy: list = dataclasses.field(default_factory=list)

    def add(self, found: dict[str, np.ndarray], ok: np.ndarray) -> None:
        """One batch's comparisons; the rows not `ok` count as maps empty on both sides."""
        for name, value in found.items():
            getattr(self, name).append(np.where(ok[:, None], value, np.nan if value.dtype.kind == "f" else False))

    def summary(self, samples: np.ndarray) -> dict[str, float]:
        """Mean IoU, 1-sided share and mean centroid distance over the maps of `samples`, the signed mean offsets,
        and how many maps counted and were skipped; nan where there is nothing to average."""
        iou, one_sided, dx, dy = (np.concatenate(getattr(self, n))[samples] for n in ("iou", "one_sided", "dx", "dy"))
        counted, placed = ~np.isnan(iou), ~np.isnan(dx)

        def mean(values: np.ndarray) -> float:
            return float(values.mean()) if values.size else np.nan

        return {"iou": mean(iou[counted]), "one_sided": mean(one_sided[counted]),
                "px": mean(np.hypot(dx, dy)[placed]), "dx": mean(dx[placed]), "dy": mean(dy[placed]),
                "maps": int(counted.sum()), "skipped": int((~counted).sum())}


@dataclasses.dataclass
class IdealTeacher:
    """An exactly equivariant teacher: unit Gaussians at every labelled person's joints, placed at input / stride
    as the GT targets are, with the store's flip test through odkd's flip_back; and the instance's own mask
    (mask_target, no flip test); both binarized as the store binarizes."""

    instances: PersonInstances
    persons: dict  # image id -> (P, K, 3) joints of its labelled persons
    stride: np.ndarray  # input pixels per heatmap pixel, (x, y)
    sigma: float
    settings: dict  # the store's

    def keypoints(self, persons: np.ndarray, frame: CropFrame, map_size) -> torch.Tensor:
        """(K, h, w) soft maps on the crop `frame` whose maps are map_size, averaged with the flipped-back maps
        of the mirrored crop."""
        input_size = (map_size[0] * self.stride[0], map_size[1] * self.stride[1])
        xy = affine_transform(persons[..., :2], frame.matrix(input_size))
        seen = persons[..., 2] > 0
        if frame.flip:  # the mirrored person's left joints look like right ones, as the GT's channels say
            xy, seen = xy[:, FLIP_INDEX], seen[:, FLIP_INDEX]
        maps = self.gaussians(xy, seen, map_size)
        if self.settings["flip_test"]:
            mirrored = np.stack([input_size[0] - 1 - xy[..., 0], xy[..., 1]], -1)
            flipped = self.gaussians(mirrored[:, FLIP_INDEX], seen[:, FLIP_INDEX], map_size)
            maps = (maps + flip_back(flipped[None], shift=self.settings["shift_heatmap"])[0]) * 0.5
        return maps

    def gaussians(self, xy: np.ndarray, seen: np.ndarray, map_size) -> torch.Tensor:
        """(K, h, w): the largest of the persons' unit Gaussians at xy / stride (xy in input pixels, (P, K, 2))."""
        ys, xs = np.mgrid[0:map_size[1], 0:map_size[0]]
        cx, cy = xy[..., 0] / self.stride[0], xy[..., 1] / self.stride[1]
        d2 = (xs - cx[..., None, None]) ** 2 + (ys - cy[..., None, None]) ** 2
        return torch.from_numpy((np.exp(-d2 / (2 * self.sigma ** 2)) * seen[..., None, None]).max(0).astype(np.float32))

    def targets(self, indices: list[int], frames: list[CropFrame], map_size) -> dict[str, torch.Tensor]:
        """Binary keypoint maps (B, K, h, w) and masks (B, 1, h, w) of the instances `indices` in `frames`."""
        s, keypoints, masks = self.settings, [], []
        for index, frame in zip(indices, frames):
            inst = self.instances[index]
            keypoints.append(self.keypoints(self.persons[inst.image_id], frame, map_size))
            masks.append(torch.from_numpy(mask_target(self.instances.mask(inst), frame, map_size)))
        return {"ideal keypoints": binarize(torch.stack(keypoints), s["threshold"], s["threshold_mode"]),
                "ideal mask": torch.stack(masks) >= s["mask_threshold"]}


@dataclasses.dataclass(frozen=True)
class StoredFrames:
    """The stored crop of each of a store's first rows, as the dataset's stored_rows (only the crop travels:
    this bench takes the maps from its own rows on the device)."""

    centers: np.ndarray
    scales: np.ndarray
    map_size: tuple[int, int]

    def frame(self, index: int) -> CropFrame:
        return CropFrame(center=tuple(map(float, self.centers[index])), scale=tuple(map(float, self.scales[index])))

    def row(self, index: int) -> dict[str, np.ndarray]:
        return {"meta/center": self.centers[index], "meta/scale": self.scales[index]}


@dataclasses.dataclass
class StoreUnderTest:
    """One store, its rows on the device, and the comparisons found so far."""

    label: str
    targets: TeacherTargets
    rows: dict[str, torch.Tensor]
    frames: StoredFrames
    settings: dict
    found: dict[str, Found]


def open_store(url: str, instances, cfg, specs, count: int, device: torch.device) -> StoreUnderTest:
    """The store at `url`, checked against the config's data and teachers, with its first `count` rows on `device`."""
    targets = TeacherTargets.open(url, dataset_fingerprint=instances.fingerprint)
    settings = targets.attrs["settings"]
    if list(settings["heatmap_size"]) != list(cfg.data.heatmap_size) or \
            list(settings["input_size"]) != list(cfg.data.input_size):
        raise OdkdError(f"{url}: built for input {settings['input_size']} / heatmap {settings['heatmap_size']}, the "
                        f"config's [data] is {list(cfg.data.input_size)} / {list(cfg.data.heatmap_size)}")
    for key, spec in specs.items():
        if spec.fingerprint != settings["teachers"][key]["fingerprint"]:
            raise OdkdError(f"{url}: built by other teachers than teachers.{spec.role}.checkpoint ({spec.checkpoint})")
    meta = targets.get_batch(np.arange(min(count, len(targets))), ["meta/center", "meta/scale", "meta/ok", *MAP_ARRAYS])
    frames = StoredFrames(meta["meta/center"], meta["meta/scale"], tuple(targets.layout.map_size))
    rows = {name: torch.from_numpy(meta[name]).to(device) for name in (*MAP_ARRAYS, "meta/ok")}
    return StoreUnderTest(f"margin {settings['margin']:g}", targets, rows, frames, settings,
                          {name: Found() for name in TARGETS})


def loader(store: StoreUnderTest, instances, cfg, keys: list, batch_size: int, workers: int) -> DataLoader:
    dataset = TopDownDataset(instances, cfg.data, train=True, stored_rows=store.frames)
    return DataLoader(dataset, batch_size=batch_size, sampler=keys, num_workers=workers)


def online_targets(producer: TeacherProducer, nets: dict, images: torch.Tensor, heatmap_size) -> dict:
    """The producer's own binary rows for these crops, unpacked: what the store would hold had it cached them."""
    out = StoreLayout(len(images), NUM_JOINTS, tuple(heatmap_size)).allocate(len(images))
    producer._fill(out, np.arange(len(images)), images, nets)
    return {name: torch.from_numpy(unpack_maps(out[array], heatmap_size[0])) for name, array in TEACHER_MAPS.items()}


def measure(store: StoreUnderTest, batch: dict, online: dict, ideal: IdealTeacher, heatmap_size,
            device: torch.device, keep_blob_size: bool) -> None:
    """Adds the store's comparisons of one batch: its rows and the ideal teacher's stored maps, warped."""
    map_size, indices = store.frames.map_size, batch["index"].tolist()
    index, flip, theta = batch["index"].to(device), batch["flip"].to(device), batch["teacher_theta"].to(device)
    stored = {name: store.rows[array][index] for name, array in TEACHER_MAPS.items()}
    ideal_maps = ideal.targets(indices, [store.frames.frame(i) for i in indices], map_size)
    stored.update({name: torch.from_numpy(bitpack_maps(maps.numpy())).to(device) for name, maps in ideal_maps.items()})
    ok = store.rows["meta/ok"][index].bool().cpu().numpy()  # the trainer gives failed rows no teacher target
    # as the trainer does with [student] keep_blob_size: keypoint blobs keep the teacher's size under zoom
    radius = teacher_blob_radius(store.settings) if keep_blob_size else 0.0
    for name in TARGETS:
        keypoints = name not in MASKS
        warped = warp_binary_batch(stored[name], map_size[0], theta, heatmap_size, flip, keypoint_channels=keypoints,
                                   blob_radius=radius if keypoints else 0.0, zoom=batch["teacher_zoom"].to(device))
        store.found[name].add(compare(warped, online[name].to(device)), ok)


def sample_frames(batches: list[dict], instances) -> dict[str, np.ndarray]:
    """Rotation, scale ratio, flip and half-body of every sample (a half-body crop moves the center)."""
    index = np.concatenate([b["index"].numpy() for b in batches])
    canonical_scale = np.array([instances[i].scale[0] for i in index], np.float64)
    canonical_center = np.stack([instances[i].center for i in index]).astype(np.float64)
    return {"rotation": np.concatenate([b["rotation"].numpy() for b in batches]),
            "ratio": np.concatenate([b["scale"][:, 0].numpy() for b in batches]) / canonical_scale,
            "flip": np.concatenate([b["flip"].numpy() for b in batches]).astype(bool),
            "half_body": np.abs(np.concatenate([b["center"].numpy() for b in batches])
                                - canonical_center).max(1) > 1e-3}


def fmt(value: float, spec: str) -> str:
    return "-" if np.isnan(value) else format(value, spec)


def percent(share: float) -> str:
    return fmt(100 * share, ".1f") + ("" if np.isnan(share) else "%")


def store_table(store: StoreUnderTest, names, buckets) -> str:
    header = ["bucket", "samples"] + [f"{n} {c}" for n in names for c in ("IoU", "px", "1-sided")]
    rows = []
    for label, chosen in buckets:
        row = [label, int(chosen.sum())]
        for name in names:
            got = store.found[name].summary(chosen)
            row += [fmt(got["iou"], ".2f"), fmt(got["px"], ".2f"), percent(got["one_sided"])]
        rows.append(row)
    return table(header, rows)


def goal_table(stores: list[StoreUnderTest], buckets, flip: np.ndarray) -> str:
    goal = dict(buckets)[GOAL_BUCKET]
    rows = []
    for store in stores:
        for name in TARGETS:
            got = store.found[name].summary(goal)
            sides = [store.found[name].summary(goal & f) for f in (~flip, flip)]
            meets = got["iou"] >= GOAL["iou"] and got["px"] <= GOAL["px"]
            rows.append([store.label, name, got["maps"], got["skipped"], fmt(got["iou"], ".3f"),
                         fmt(got["px"], ".2f"), percent(got["one_sided"]),
                         "-" if got["maps"] == 0 else "yes" if meets else "NO",
                         *(f"{fmt(s['dx'], '+.2f')}, {fmt(s['dy'], '+.2f')}" for s in sides)])
    header = ["store", "target", "maps counted", "maps empty on both sides (skipped)", "IoU", "px", "1-sided",
              f"IoU >= {GOAL['iou']} and px <= {GOAL['px']:g}", "offset dx, dy: flip no", "offset dx, dy: flip yes"]
    return table(header, rows)


def tiny_config(cfg, tmp: Path, images: int):
    """prepare_world stands in synthetic data and seeded teachers for what is absent: make all of it absent."""
    absent = tmp / "absent"
    teachers = {role: dataclasses.replace(getattr(cfg.teachers, role), checkpoint=str(absent / f"{role}.pth"))
                for role in ("primary", "senior")}
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, root=str(absent)),
                              teachers=dataclasses.replace(cfg.teachers, **teachers),
                              # untrained teachers' maps peak far below the trained ones' 0.5
                              cache=dataclasses.replace(cfg.cache, threshold_mode="relative"))
    world, _ = prepare_world(cfg, tmp, images)
    return world


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="pipeline/demo.toml")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--store", help="an existing store of the config's dataset and teachers")
    where.add_argument("--build", action="store_true", help="build temporary stores at --margins")
    where.add_argument("--tiny", action="store_true",
                       help="synthetic data and seeded untrained teachers, stores built at --margins")
    parser.add_argument("--margins", type=float, nargs="+", default=[1.0, 1.25])
    parser.add_argument("--samples", type=int, default=512, help="augmented samples in all")
    parser.add_argument("--epochs", type=int, default=4, help="draws per instance: samples / epochs instances")
    parser.add_argument("--images", type=int, default=64, help="synthetic train images of --tiny")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers cropping the samples")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N: where the teachers and the warp run")
    parser.add_argument("--warp-only", action="store_true",
                        help="warp without moving the blob edges back ([student] keep_blob_size = false)")
    parser.add_argument("--record", action="store_true", help="write the tables into bench/RESULTS.md")
    args = parser.parse_args(argv)
    try:
        with tempfile.TemporaryDirectory(prefix="odkd-bench-fidelity-") as tmp:
            text = run(args, Path(tmp), sys.argv[1:] if argv is None else argv)
    except OdkdError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.record:
        record(text, SECTION)
        print(f"recorded in {Path(__file__).resolve().parent / 'RESULTS.md'}")
    return 0


def run(args, tmp: Path, argv: list[str]) -> str:
    started, load = time.perf_counter(), os.getloadavg()[0]
    cfg = load_config(args.config)
    if args.tiny:
        cfg = tiny_config(cfg, tmp, args.images)
    device = resolve_device(args.device)
    specs = resolve_teachers(cfg, cfg.data.input_size, cfg.data.heatmap_size)
    instances = load_instances(cfg.data, "train")
    count = min(len(instances), -(-args.samples // args.epochs))
    if args.store:
        urls = [args.store]
    else:
        urls = []
        for margin in args.margins:
            urls.append(str(tmp / f"margin_{margin:g}.zarr"))
            build_cache(dataclasses.replace(cfg, cache=dataclasses.replace(cfg.cache, margin=margin)), "train",
                        urls[-1], limit=count, scheduler="synchronous", progress=False, device=args.device)
    stores = [open_store(url, instances, cfg, specs, count, device) for url in urls]
    count = min(count, *(len(s.frames.centers) for s in stores))
    keys = [(epoch, i) for epoch in range(args.epochs) for i in range(count)][:args.samples]
    # the online side is the store's rule; the stores differ in margin only, so the first's settings hold for all
    settings = stores[0].settings
    producer = TeacherProducer(layout=stores[0].targets.layout, teachers=specs,
                               records=None, settings=settings)  # records: the crops are ours
    nets = {key: loaded_teacher(spec, device) for key, spec in specs.items()}
    for net in nets.values():
        set_precision_layout(net, producer.precision)
    persons = {}
    for inst in instances.instances:
        persons.setdefault(inst.image_id, []).append(inst.joints)
    ideal = IdealTeacher(instances, {image_id: np.stack(joints) for image_id, joints in persons.items()},
                         np.array(cfg.data.input_size) / np.array(cfg.data.heatmap_size), cfg.data.sigma, settings)
    seen = []
    # one loader a store, for its teacher_theta; the same keys and seed give every store the same draws
    loaders = [loader(s, instances, cfg, keys, args.batch_size, args.workers) for s in stores]
    for batches in zip(*loaders):
        first = batches[0]
        frames = [frame_from_batch(first, i) for i in range(len(first["index"]))]
        online = {**online_targets(producer, nets, first["image"].to(device), cfg.data.heatmap_size),
                  **ideal.targets(first["index"].tolist(), frames, cfg.data.heatmap_size)}
        for store, batch in zip(stores, batches):
            measure(store, batch, online, ideal, cfg.data.heatmap_size, device, not args.warp_only)
        seen.append(first)
    frames = sample_frames(seen, instances)
    buckets = frame_buckets(**frames)
    elapsed = time.perf_counter() - started

    teachers = "; ".join(f"{key.upper()} {spec.model} {spec.model_args}{' + seg head' if spec.seg_head else ''}"
                         + ("" if args.tiny else f" from {spec.checkpoint} (val AP "
                                                 f"{'-' if spec.val_ap is None else format(spec.val_ap, '.3f')})")
                         for key, spec in specs.items())
    if args.tiny:
        teachers += ("; UNTRAINED seeded weights: not equivariant, so their rows are no verdict on the warp; the "
                     "ideal teacher's are")
    s = settings
    command = "`" + " ".join([".venv/bin/python bench/fidelity.py", *argv]) + "`"
    machine = (f"{os.cpu_count()} CPU cores (load average {load:.1f} at the start, {os.getloadavg()[0]:.1f} at the "
               f"end), device {device}{' ' + torch.cuda.get_device_name(device) if device.type == 'cuda' else ''}, "
               f"torch {torch.__version__}; {elapsed:.0f} s in all. Teachers: {teachers}.")
    a = cfg.data.augment
    setup = (f"{len(keys)} samples ({args.epochs} epochs of {count} instances, augmentation scale {a.scale_factor}, "
             f"rotation {a.rotation_factor} p {a.rotation_prob}, flip {a.flip_prob}, half-body {a.half_body_prob}); "
             f"heatmap {cfg.data.heatmap_size[0]}x{cfg.data.heatmap_size[1]}, sigma {cfg.data.sigma:g}; store: "
             f"threshold {s['threshold']} {s['threshold_mode']}, mask {s['mask_threshold']}, mask gate "
             f"{s['mask_gate']}, flip test {s['flip_test']}, shift {s['shift_heatmap']}, precision "
             f"{producer.precision}. IoU: mean per map, maps empty on both sides skipped, one side empty counts 0 "
             f"(1-sided: their share). px: distance of the binary maps' centroids, maps non-empty on both sides. "
             f"Offsets: warped - online centroid, signed, heatmap pixels.")
    if s["threshold_mode"] == "relative":
        setup += (" With the relative threshold a map whose only response is the tail of a joint outside the crop "
                  "is binarized against that tail's own peak, while the wider stored crop holds the joint's full "
                  "peak and no blob there: such maps are 1-sided, more of them at a larger margin.")
    parts = [command, machine, setup, "**Goal** (abs(rot) <= 45, scale ratio 0.65-1.35)", goal_table(stores, buckets,
                                                                                                       frames["flip"])]
    for store in stores:
        parts += [f"**{store.label}, teachers** (stored map {store.frames.map_size[0]}x{store.frames.map_size[1]})",
                  store_table(store, TEACHER_MAPS, buckets),
                  f"**{store.label}, ideal teacher**", store_table(store, IDEAL_MAPS, buckets)]
    if args.tiny:
        parts.append("The table with trained teachers (`--build` on the demo pipeline's checkpoints) is still to be "
                     "recorded.")
    text = "\n\n".join(parts)
    print(text, flush=True)
    return text


if __name__ == "__main__":
    sys.exit(main())
