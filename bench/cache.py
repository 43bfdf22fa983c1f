"""Benchmark of the teacher-target cache, every number a ratio measured in this one run.

    .venv/bin/python bench/cache.py [--config pipeline/demo.toml] [--instances 384] [--record]

1. storage: bytes per instance on binarized Gaussians (demo and COCO geometry) against float32
   and float16 maps, and the writer's throughput;
2. reader: random batches of 64 through TeacherTargets, through zarr's z.oindex, and through a
   plain numpy gather from RAM, each including the unpack to bool maps;
3. build: the real pipeline (read, crop, both teachers with flip test, binarize, pack, write)
   against the teachers' raw forward on the same batches, and LocalCluster with 1 and 2 workers;
4. margin: how much of what a teacher responds to, in the configured training augmentation,
   falls outside a cached crop of margin m, and what the margin costs in bytes and compute.

    .venv/bin/python bench/cache.py --precision [--device cuda] [--config pipeline/coco_hrnet.toml]

5. decode: images decoded, cropped and normalized per second by the producer's crop threads;
6. precision: for fp32, tf32 and bf16 on --device, the build's rate against the teachers' raw
   forward, and each precision's agreement with fp32 (bits of the stored maps, argmax of the maps).

The teachers are the config's when their checkpoints exist, else untrained ones of the same
architecture (throughput is the same; their bytes per instance and their agreement are then not
representative). When the config's data is absent, a synthetic dataset at COCO's image size stands in.
--record writes the tables into bench/RESULTS.md under "## Teacher-target cache".
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys
import tempfile
import time
from pathlib import Path

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import zarr

from odkd.config import load_config, resolve_device
from odkd.data.augment import random_frame
from odkd.data.image import read_image
from odkd.data.instances import load_instances
from odkd.data.targets import gaussian_heatmaps
from odkd.data.transforms import CropFrame, affine_transform, crop_image, invert_affine, normalize_image
from odkd.errors import OdkdError
from odkd.models import build_model, load_checkpoint, save_checkpoint
from odkd.models.teacher import teacher_checkpoint
from odkd.store import StoreLayout, TeacherTargets, bitpack_maps, build_store, unpack_maps
from odkd.store.geometry import cache_geometry, stored_frame_scale
from odkd.store.reader import MAP_ARRAYS
from odkd.store.store import read_markers, store_fs
from odkd.store.synthetic import SyntheticTargets
from odkd.store.writer import ShardTargets
from odkd.synth import make_synthetic_dataset
from odkd.teachers import build_cache
from odkd.teachers.producer import InstanceRecords, TeacherProducer, set_precision_layout, teacher_forward
from odkd.teachers.verify import REPLAYED_MAPS, differing_bits

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
SECTION = "## Teacher-target cache"
READ_BATCH = 64
MARGINS = (1.0, 1.1, 1.25, 1.5)
FRAMES_PER_INSTANCE = 8
PRECISIONS = ("fp32", "tf32", "bf16")
SYNTHETIC_IMAGE = (640, 427)  # COCO's usual image size: decoding costs what it costs there


class Precomputed:
    """A producer that hands out rows made beforehand, so that timing it times the writer alone."""

    def __init__(self, arrays: dict[str, np.ndarray]):
        self.arrays = arrays

    def __call__(self, start: int, stop: int) -> ShardTargets:
        return ShardTargets({name: values[start:stop] for name, values in self.arrays.items()})


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def map_bytes(url: str, layout: StoreLayout) -> float:
    """Stored bytes per instance of the three map arrays, from the writers' markers."""
    fs, root = store_fs(url)
    markers = read_markers(fs, root, layout.num_shards)
    return sum(m["bytes"][name] for m in markers.values() for name in MAP_ARRAYS) / layout.num_instances


def float_map_bytes(layout: StoreLayout, itemsize: int) -> int:
    w, h = layout.map_size
    return (2 * layout.num_joints + 1) * w * h * itemsize


def storage_section(cfg, tmp: Path, n: int) -> tuple[str, str]:
    rows, reader_url = [], None
    w, h = cfg.data.heatmap_size
    geometries = ((f"config {w}x{h}, sigma {cfg.data.sigma:g}", (w, h), cfg.data.sigma),
                  ("COCO 48x64, sigma 2", (48, 64), 2.0))
    for label, size, sigma in geometries:
        layout = StoreLayout(n, 17, size, chunk_instances=64, shard_instances=1024)
        produce = SyntheticTargets(layout, sigma=sigma)
        parts = [produce(*layout.shard_range(s)).arrays for s in range(layout.num_shards)]
        arrays = {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}
        url = str(tmp / f"synthetic_{size[0]}x{size[1]}.zarr")
        t0 = time.perf_counter()
        build_store(url, layout, {"synthetic": label}, Precomputed(arrays), scheduler="synchronous", progress=False)
        rate = n / (time.perf_counter() - t0)
        stored = map_bytes(url, layout)
        rows.append([label, f"{stored:.0f}", f"{stored / 2:.0f}", f"{float_map_bytes(layout, 4) / stored:.0f}x",
                     f"{float_map_bytes(layout, 2) / stored:.0f}x", f"{rate:,.0f}"])
        reader_url = url
    text = table(["synthetic maps", "B/instance (PT+ST+mask)", "~ per teacher", "vs float32", "vs float16",
                  "write instances/s"], rows)
    return text, reader_url


def _rate(fn, batches) -> float:
    t0 = time.perf_counter()
    for idx in batches:
        fn(idx)
    return len(batches) * READ_BATCH / (time.perf_counter() - t0)


def reader_section(url: str, rounds: int = 3) -> str:
    targets = TeacherTargets.open(url)
    n, width = len(targets), targets.layout.map_size[0]
    rng = np.random.default_rng(0)
    group = zarr.open_group(url, mode="r")
    ram = {name: group[name][:n] for name in MAP_ARRAYS}
    targets.load()
    stages = {"PT stage: pt/heatmaps": ["pt/heatmaps"], "ST stage: st/heatmaps + st/mask": ["st/heatmaps", "st/mask"]}
    rows = []
    for label, names in stages.items():
        def via_targets(idx, names=names):
            targets.get_maps(idx, names)

        def via_numpy(idx, names=names):
            for name in names:
                unpack_maps(ram[name][idx], width)

        def via_oindex(idx, names=names):
            for name in names:
                unpack_maps(group[name].oindex[np.sort(idx)], width)

        # interleaved rounds, best of each, so that a busy machine slows every case alike
        rates = {"targets": 0.0, "numpy": 0.0, "oindex": 0.0}
        for _ in range(rounds):
            for case, fn in (("targets", via_targets), ("numpy", via_numpy), ("oindex", via_oindex)):
                batches = [rng.integers(0, n, READ_BATCH) for _ in range(5 if case == "oindex" else 200)]
                rates[case] = max(rates[case], _rate(fn, batches))
        rows.append([label, f"{rates['targets']:,.0f}", f"{rates['numpy']:,.0f}", f"{rates['oindex']:,.0f}",
                     f"{rates['targets'] / rates['numpy']:.2f}", f"{rates['targets'] / rates['oindex']:.0f}x"])
    return table(["random batches of 64, incl. unpack to bool", "TeacherTargets inst/s", "numpy gather inst/s",
                  "z.oindex inst/s", "TeacherTargets / numpy", "TeacherTargets / oindex"], rows)


def prepare_world(cfg, tmp: Path, images: int):
    """The config with a dataset and two teacher checkpoints that exist; and whether the teachers are trained."""
    data = cfg.data
    if not data.ann_file("train").is_file():
        root = tmp / "data"
        make_synthetic_dataset(root, train_images=images, val_images=0, seed=0, image_size=SYNTHETIC_IMAGE)
        data = dataclasses.replace(data, root=str(root), train_ann="annotations/person_keypoints_train.json",
                                   train_images="images/train")
    teachers, trained = cfg.teachers, True
    for role in ("primary", "senior"):
        try:
            teacher_checkpoint(cfg, role)
        except OdkdError:
            trained = False
    if not trained:
        torch.manual_seed(0)
        for role in ("primary", "senior"):
            t = getattr(cfg.teachers, role)
            model = build_model(t.model, seg_head=t.seg_head, **t.model_args)
            with torch.no_grad():  # structured, not near-zero, outputs
                for p in model.parameters():
                    p.add_(torch.randn_like(p) * 0.05)
            path = tmp / f"untrained_{role}.pth"
            save_checkpoint(path, model, model_name=t.model, model_args=dict(t.model_args), seg_head=t.seg_head)
            teachers = dataclasses.replace(teachers, **{role: dataclasses.replace(t, checkpoint=str(path))})
    return dataclasses.replace(cfg, data=data, teachers=teachers), trained


def canonical_batches(cfg, n: int, batch_size: int, device: torch.device) -> list[torch.Tensor]:
    """The build's crops of the first n instances, in batches on `device`."""
    instances = load_instances(cfg.data, "train")
    map_size, input_size = cache_geometry(cfg.data.heatmap_size, cfg.data.input_size, cfg.cache.margin)
    crops = []
    for inst in instances.instances[:n]:
        frame = CropFrame(center=tuple(map(float, inst.center)),
                          scale=tuple(map(float, stored_frame_scale(inst.scale, cfg.data.heatmap_size, map_size))))
        crops.append(normalize_image(crop_image(read_image(instances.image_path(inst)), frame, input_size)))
    return [torch.from_numpy(np.stack(crops[a:a + batch_size])).to(device) for a in range(0, len(crops), batch_size)]


def teacher_nets(cfg, device: torch.device) -> list[torch.nn.Module]:
    nets = []
    for role in ("primary", "senior"):
        t = getattr(cfg.teachers, role)
        net = build_model(t.model, seg_head=t.seg_head, **t.model_args)
        load_checkpoint(net, teacher_checkpoint(cfg, role), allow_new_seg_head=False)
        nets.append(net.eval().to(device))
    return nets


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def raw_forward(cfg, nets, batches, precision: str) -> tuple[float, float, list[torch.Tensor]]:
    """(wall, CPU) seconds of both teachers with flip test at `precision` on crops already on their
    device, and each teacher's argmax per keypoint (n, K)."""
    device = batches[0].device
    for net in nets:
        set_precision_layout(net, precision)
        # torch's first call at a batch shape sets up its kernels: a cost the build's marginal rate leaves out too
        teacher_forward(net, batches[0], precision, flip_test=cfg.cache.flip_test, shift_heatmap=cfg.eval.shift_heatmap)
    synchronize(device)
    peaks = [[] for _ in nets]
    wall, cpu = time.perf_counter(), time.process_time()
    for images in batches:
        for net, found in zip(nets, peaks):
            heatmaps, _ = teacher_forward(net, images, precision, flip_test=cfg.cache.flip_test,
                                          shift_heatmap=cfg.eval.shift_heatmap)
            found.append(heatmaps.flatten(2).argmax(-1))
    synchronize(device)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return wall, cpu, [torch.cat(found).cpu() for found in peaks]


def task_times(url: str) -> tuple[float, float]:
    """(instances/s, CPU seconds per instance) of the shard tasks in steady state, from the writers'
    markers: each writer's first task, which loads the teachers and sets up torch's kernels, is
    left out, and the writers' rates add up as they ran side by side."""
    layout = TeacherTargets.open(url).layout
    fs, root = store_fs(url)
    by_writer: dict[str, list[dict]] = {}
    for marker in read_markers(fs, root, layout.num_shards).values():
        by_writer.setdefault(marker["writer"], []).append(marker)
    rate, rows, cpu = 0.0, 0, 0.0
    for markers in by_writer.values():
        steady = sorted(markers, key=lambda m: m["started_at"])[1:]
        count = sum(m["stop"] - m["start"] for m in steady)
        rate += count / max(sum(m["seconds"] for m in steady), 1e-9)
        rows, cpu = rows + count, cpu + sum(m["cpu_seconds"] for m in steady)
    return rate, cpu / max(rows, 1)


def build_section(cfg, tmp: Path, n: int, repeats: int, shard: int = 64, device: str = "cpu") -> tuple[str, dict]:
    """Build rates against the raw forward on the same crops.

    "tasks" runs from the first shard task's start to the last one's end: it leaves out what a run
    pays once before its tasks (cluster start, loading the instance list, checking the teachers),
    which a long build amortizes. CPU seconds per instance (all threads of a task, the prefetch
    thread included) are what other load on a shared machine hardly moves; wall-clock rates and
    the worker scaling are only as good as the machine was quiet. Every process runs one torch
    thread: on a busy machine two OpenMP threads spin at each barrier while a third process holds
    a core. The cases run interleaved `repeats` times and each keeps its best.
    """
    n = min(n, len(load_instances(cfg.data, "train")))
    batch = min(cfg.cache.batch_size, shard)  # a task never batches across its shard
    # small shards give several tasks even for a small demo, so two workers have work to share
    cfg = dataclasses.replace(cfg, cache=dataclasses.replace(cfg.cache, chunk_instances=min(64, shard),
                                                             shard_instances=shard, batch_size=batch))
    margin = cfg.cache.margin
    cases = {"in-process (scheduler='synchronous')": {"scheduler": "synchronous"},
             "LocalCluster, 1 worker": {"workers": 1}, "LocalCluster, 2 workers": {"workers": 2}}
    torch.set_num_threads(1)
    dev = resolve_device(device)
    batches, nets = canonical_batches(cfg, n, batch, dev), teacher_nets(cfg, dev)
    best = {label: [0.0, 0.0, float("inf")] for label in cases}  # whole-call rate, task rate, task CPU/instance
    raw_wall, raw_cpu, url = float("inf"), float("inf"), None
    for _ in range(repeats):
        wall, cpu, _ = raw_forward(cfg, nets, batches, cfg.cache.precision)
        raw_wall, raw_cpu = min(raw_wall, wall), min(raw_cpu, cpu)
        for label, kwargs in cases.items():
            url = str(tmp / f"build_{kwargs.get('workers', 0)}.zarr")
            t0 = time.perf_counter()
            build_cache(cfg, "train", url, limit=n, progress=False, overwrite=True, torch_threads=1, device=device,
                        **kwargs)
            call, (rate, cpu) = n / (time.perf_counter() - t0), task_times(url)
            best[label] = [max(best[label][0], call), max(best[label][1], rate), min(best[label][2], cpu)]
    raw_cpu /= n
    one = best["LocalCluster, 1 worker"][1]
    rows = [[label, f"{call:.1f}", f"{rate:.1f}", f"{1000 * cpu:.2f}", f"{raw_cpu / cpu:.2f}",
             f"{rate / one:.2f}" if "LocalCluster" in label else "-"] for label, (call, rate, cpu) in best.items()]
    text = (f"{n} instances, batch {batch}, shards of {shard}, margin {margin}, teacher input "
            f"{'x'.join(map(str, cache_geometry(cfg.data.heatmap_size, cfg.data.input_size, margin)[1]))}, "
            f"{cfg.cache.precision}, device {device}, one torch thread per process, best of {repeats}. Teachers' raw "
            f"forward (both, flip test, crops in memory): **{n / raw_wall:.1f} instances/s, {1000 * raw_cpu:.2f} CPU "
            f"ms/instance**\n\n")
    text += table(["build", "instances/s, whole call", "instances/s, steady tasks", "CPU ms/instance, steady tasks",
                   "raw forward / build, CPU", "vs 1 worker, steady tasks"], rows)
    return text, {"cfg": cfg, "n": n, "stores": {margin: url}}


def _inside(points: np.ndarray, frame: CropFrame, size) -> np.ndarray:
    xy = affine_transform(points, frame.matrix(size))
    return (xy[:, 0] >= -0.5) & (xy[:, 0] <= size[0] - 0.5) & (xy[:, 1] >= -0.5) & (xy[:, 1] <= size[1] - 0.5)


def _positives(frame: CropFrame, joints: np.ndarray, cfg) -> np.ndarray:
    """Image coordinates of the heatmap pixels a perfect teacher fires on (map >= 0.5) in `frame`."""
    d = cfg.data
    xy = affine_transform(joints[:, :2], frame.matrix(d.input_size))
    maps, _ = gaussian_heatmaps(xy, joints[:, 2] > 0, d.input_size, d.heatmap_size, d.sigma)
    _, ys, xs = np.nonzero(maps >= cfg.cache.threshold)
    return affine_transform(np.stack([xs, ys], axis=1).astype(np.float64), invert_affine(frame.matrix(d.heatmap_size)))


def padded_synthetic_bytes(tmp: Path, heatmap_size, map_size, sigma: float, n: int = 1024) -> float:
    """Bytes per instance of synthetic student-size maps centered in the wider crop's map."""
    student = StoreLayout(n, 17, tuple(heatmap_size), chunk_instances=64, shard_instances=1024)
    pt, st, mask, peaks = SyntheticTargets(student, sigma=sigma).binary_maps(0, n)
    wider = StoreLayout(n, 17, tuple(map_size), chunk_instances=64, shard_instances=1024)
    dx, dy = (map_size[0] - heatmap_size[0]) // 2, (map_size[1] - heatmap_size[1]) // 2
    pad = ((0, 0), (0, 0), (dy, map_size[1] - heatmap_size[1] - dy), (dx, map_size[0] - heatmap_size[0] - dx))
    arrays = wider.allocate(n)
    for name, binary in (("pt/heatmaps", pt), ("st/heatmaps", st), ("st/mask", mask)):
        arrays[name][:] = bitpack_maps(np.pad(binary, pad))
    arrays["pt/conf"][:], arrays["st/conf"][:] = peaks[:, 0], peaks[:, 1]
    url = str(tmp / f"padded_{map_size[0]}x{map_size[1]}.zarr")
    build_store(url, wider, {"padded": list(map_size)}, Precomputed(arrays), scheduler="synchronous",
                progress=False, overwrite=True)
    return map_bytes(url, wider)


def thread_counts(limit: int) -> list[int]:
    """1, 2, 4, ... up to `limit`, and `limit` itself."""
    counts = [1 << i for i in range(limit.bit_length()) if 1 << i <= limit]
    return counts if counts[-1] == limit else counts + [limit]


def decode_section(cfg, n: int, batch_size: int) -> tuple[str, dict[int, float]]:
    """Instances per second of the producer's crop jobs (decode, crop, normalize) on 1, 2, 4, ... threads."""
    instances = load_instances(cfg.data, "train")
    n = min(n, len(instances))
    map_size, teacher_input = cache_geometry(cfg.data.heatmap_size, cfg.data.input_size, cfg.cache.margin)
    producer = TeacherProducer(
        layout=StoreLayout(n, 17, map_size), teachers={},
        records=InstanceRecords.from_instances(instances, n, cfg.data.heatmap_size, map_size),
        settings={"teacher_input_size": list(teacher_input)}, batch_size=batch_size)
    batches = [np.arange(a, min(a + batch_size, n)) for a in range(0, n, batch_size)]
    rates = {}
    for threads in thread_counts(os.cpu_count() or 1):
        with ThreadPoolExecutor(threads) as pool:
            producer.queue_crops(pool, batches[0])()  # the first images from disk, not from the page cache
            t0 = time.perf_counter()
            for wait in [producer.queue_crops(pool, batch) for batch in batches]:
                wait()
            rates[threads] = n / (time.perf_counter() - t0)
    paths = set(producer.records.image_paths)
    sizes = [read_image(path).shape[:2] for path in sorted(paths)[:20]]
    text = (f"{n} instances from {len(paths)} images ({n / len(paths):.1f} people per image, images about "
            f"{np.mean([s[1] for s in sizes]):.0f}x{np.mean([s[0] for s in sizes]):.0f}), crops "
            f"{teacher_input[0]}x{teacher_input[1]}, batches of {batch_size}\n\n")
    rows = [[t, f"{r:,.0f}", f"{r / t:,.0f}", f"{r / rates[1]:.2f}"] for t, r in rates.items()]
    return text + table(["crop threads", "instances/s", "per thread", "vs 1 thread"], rows), rates


def precision_section(cfg, tmp: Path, n: int, batch_size: int, shard: int, device: str,
                      repeats: int) -> tuple[str, dict[str, float]]:
    """Per precision: the build's rate against the teachers' raw forward, and its agreement with fp32; and
    bf16 once more with a single crop thread, to show what the crop threads buy."""
    n = min(n, len(load_instances(cfg.data, "train")))
    shard = min(shard, n)
    dev = resolve_device(device)
    batches, nets = canonical_batches(cfg, n, batch_size, dev), teacher_nets(cfg, dev)
    cases = {precision: (precision, None) for precision in PRECISIONS} | {"bf16, 1 crop thread": ("bf16", 1)}
    raw = {precision: [0.0, float("inf")] for precision in PRECISIONS}  # best inst/s, CPU s/inst
    build = {label: [0.0, 0.0, float("inf")] for label in cases}  # best inst/s (call, steady tasks), CPU s/inst
    peaks, stores = {}, {}
    for _ in range(repeats):  # interleaved, so that a busy machine slows every case alike
        for precision in PRECISIONS:
            wall, cpu, peaks[precision] = raw_forward(cfg, nets, batches, precision)
            raw[precision] = [max(raw[precision][0], n / wall), min(raw[precision][1], cpu / n)]
        for label, (precision, decode_threads) in cases.items():
            cache = dataclasses.replace(cfg.cache, precision=precision, batch_size=batch_size, shard_instances=shard,
                                        chunk_instances=min(64, shard))
            stores[label] = str(tmp / f"precision_{len(stores)}.zarr")
            t0 = time.perf_counter()
            build_cache(dataclasses.replace(cfg, cache=cache), "train", stores[label], limit=n, scheduler="synchronous",
                        device=device, progress=False, overwrite=True, decode_threads=decode_threads)
            call, (steady, cpu) = n / (time.perf_counter() - t0), task_times(stores[label])
            b = build[label]
            build[label] = [max(b[0], call), max(b[1], steady), min(b[2], cpu)]
    reference = TeacherTargets.open(stores["fp32"]).get_batch(np.arange(n), REPLAYED_MAPS)
    w = cache_geometry(cfg.data.heatmap_size, cfg.data.input_size, cfg.cache.margin)[0][0]
    rows = []
    for label, (precision, _) in cases.items():
        maps = TeacherTargets.open(stores[label]).get_batch(np.arange(n), REPLAYED_MAPS)
        bits = [differing_bits(maps[name], reference[name]) / (8 * maps[name].size) for name in REPLAYED_MAPS]
        moved = []
        for found, ref in zip(peaks[precision], peaks["fp32"]):
            step = torch.maximum((found % w - ref % w).abs(), (found // w - ref // w).abs())
            moved.append(f"{(step > 0).float().mean():.2%} / {(step > 1).float().mean():.2%}")
        (rate, raw_cpu), (call, steady, build_cpu) = raw[precision], build[label]
        rows.append([label, f"{rate:,.1f}", f"{1000 * raw_cpu:.2f}", f"{call:,.1f}", f"{steady:,.1f}",
                     f"{1000 * build_cpu:.2f}", f"{steady / rate:.2f}", f"{raw_cpu / build_cpu:.2f}",
                     f"{rate / raw['fp32'][0]:.2f}", f"{raw['fp32'][1] / raw_cpu:.2f}",
                     " / ".join(f"{b:.1e}" for b in bits), *moved])
    density = " / ".join(f"{np.unpackbits(reference[name]).mean():.3f}" for name in REPLAYED_MAPS)
    where = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"{torch.get_num_threads()} torch threads"
    text = (f"{n} instances, batch {batch_size}, shards of {shard}, device {device} ({where}), flip test, "
            f"in-process build with its default crop threads unless stated, best of {repeats}. Share of set bits in "
            f"the fp32 maps (PT / ST / mask): {density}\n\n")
    return text + table(["case", "raw forward inst/s (PT+ST)", "raw CPU ms/inst", "build inst/s, whole call",
                         "build inst/s, steady tasks", "build CPU ms/inst", "build / raw", "build / raw, CPU",
                         "raw speed vs fp32", "raw speed vs fp32, CPU", "bits differing from fp32 (PT / ST / mask)",
                         "PT argmax moved (any / > 1 px)", "ST argmax moved (any / > 1 px)"],
                        rows), {precision: r[0] for precision, r in raw.items()}


def margin_section(cfg, tmp: Path, n: int, stores: dict, trained: bool) -> str:
    """Responses in augmented training frames that a cached crop of margin m does not hold."""
    instances = load_instances(cfg.data, "train")
    by_image: dict[int, list] = {}
    for inst in instances.instances:
        by_image.setdefault(inst.image_id, []).append(inst)
    rng = np.random.default_rng(0)
    aspect = cfg.data.input_size[0] / cfg.data.input_size[1]
    hm = cfg.data.heatmap_size
    lost = {m: {"own": 0, "all": 0, "area": 0} for m in MARGINS}
    total = {"own": 0, "all": 0, "area": 0}
    grid = np.stack(np.meshgrid(np.arange(hm[0]), np.arange(hm[1])), -1).reshape(-1, 2).astype(np.float64)
    for inst in instances.instances[:n]:
        others = np.concatenate([o.joints for o in by_image[inst.image_id]])
        for _ in range(FRAMES_PER_INSTANCE):
            frame = random_frame(inst, cfg.data.augment, rng, aspect)
            area = affine_transform(grid, invert_affine(frame.matrix(hm)))
            points = {"own": _positives(frame, inst.joints, cfg), "all": _positives(frame, others, cfg), "area": area}
            for key, pts in points.items():
                total[key] += len(pts)
                for m in MARGINS:
                    map_size, _ = cache_geometry(hm, cfg.data.input_size, m)
                    stored = CropFrame(center=tuple(map(float, inst.center)),
                                       scale=tuple(map(float, stored_frame_scale(inst.scale, hm, map_size))))
                    lost[m][key] += int((~_inside(pts, stored, map_size)).sum())

    rows = []
    for m in MARGINS:
        map_size, input_size = cache_geometry(hm, cfg.data.input_size, m)
        stored = "n/a (untrained teachers)"
        if trained:
            url = stores.get(m)
            if url is None:
                url = str(tmp / f"margin_{m}.zarr")
                c = dataclasses.replace(cfg, cache=dataclasses.replace(cfg.cache, margin=m))
                build_cache(c, "train", url, limit=n, scheduler="synchronous", progress=False, overwrite=True)
            stored = f"{map_bytes(url, TeacherTargets.open(url).layout):.0f}"
        compute = input_size[0] * input_size[1] / (cfg.data.input_size[0] * cfg.data.input_size[1])
        rows.append([f"{m:g}", f"{map_size[0]}x{map_size[1]} ({map_size[0] / hm[0]:.2f}, {map_size[1] / hm[1]:.2f})",
                     f"{compute:.2f}x",
                     f"{100 * lost[m]['own'] / max(total['own'], 1):.2f}%",
                     f"{100 * lost[m]['all'] / max(total['all'], 1):.2f}%",
                     f"{100 * lost[m]['area'] / total['area']:.1f}%",
                     f"{padded_synthetic_bytes(tmp, hm, map_size, cfg.data.sigma):.0f}", stored])
    a = cfg.data.augment
    head = (f"{n} instances x {FRAMES_PER_INSTANCE} augmented frames (scale {a.scale_factor}, rotation "
            f"{a.rotation_factor} p {a.rotation_prob}, half-body {a.half_body_prob}); responses of a perfect "
            f"teacher (Gaussians, sigma {cfg.data.sigma}, >= {cfg.cache.threshold}) on the instance's own "
            f"joints and on every labelled person in its image\n\n")
    return head + table(["margin", "stored map (growth w, h)", "teacher compute", "own responses lost",
                         "all-person responses lost", "frame area outside", "synthetic B/instance",
                         "teachers' B/instance"], rows)


def record(text: str, section: str = SECTION) -> None:
    body = f"{section}\n\n{text}\n"
    old = RESULTS.read_text() if RESULTS.exists() else "# Benchmarks\n\n"
    pattern = re.compile(rf"^{re.escape(section)}\n.*?(?=^## |\Z)", re.S | re.M)
    new = pattern.sub(lambda _: body + "\n", old) if pattern.search(old) else old.rstrip("\n") + "\n\n" + body
    RESULTS.write_text(new.rstrip("\n") + "\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="pipeline/demo.toml")
    parser.add_argument("--instances", type=int, default=384, help="instances through the teachers")
    parser.add_argument("--images", type=int, default=160,
                        help="synthetic train images when the config's data is absent")
    parser.add_argument("--synthetic", type=int, default=4096,
                        help="instances of synthetic maps for storage and reader")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved rounds of the build cases, best kept")
    parser.add_argument("--shard", type=int, default=64, help="shard size of the build cases")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N: where the teachers run")
    parser.add_argument("--batch-size", type=int, default=None, help="teacher batch (default: [cache] batch_size)")
    parser.add_argument("--torch-threads", type=int, default=None,
                        help="intra-op threads of the precision tables (default: torch's); 1 on a shared machine")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--build-only", action="store_true",
                      help="only the build table (e.g. real-size teachers, where the other tables add nothing)")
    mode.add_argument("--precision", action="store_true",
                      help="only the decode and precision tables: fp32, tf32 and bf16 on --device")
    parser.add_argument("--record", action="store_true", help=f"write the tables into {RESULTS.name}")
    args = parser.parse_args(argv)
    cfg = load_config(args.config)
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    if args.batch_size:
        cfg = dataclasses.replace(cfg, cache=dataclasses.replace(cfg.cache, batch_size=args.batch_size))
    with tempfile.TemporaryDirectory(prefix="odkd-bench-cache-") as tmp:
        tmp = Path(tmp)
        started, load = time.perf_counter(), os.getloadavg()[0]
        if not (args.build_only or args.precision):
            storage, reader_url = storage_section(cfg, tmp, args.synthetic)
            print(storage, "\n", flush=True)
            reader = reader_section(reader_url)
            print(reader, "\n", flush=True)
        world, trained = prepare_world(cfg, tmp, args.images)
        if args.precision:
            decode, decode_rates = decode_section(world, args.instances, world.cache.batch_size)
            print(decode, "\n", flush=True)
            precision, raw = precision_section(world, tmp, args.instances, world.cache.batch_size, args.shard,
                                               args.device, args.repeats)
            print(precision, "\n", flush=True)
        else:
            build, state = build_section(world, tmp, args.instances, args.repeats, args.shard, args.device)
            print(build, "\n", flush=True)
        if not (args.build_only or args.precision):
            margin = margin_section(state["cfg"], tmp, state["n"], state["stores"], trained)
            print(margin, "\n", flush=True)
        elapsed = time.perf_counter() - started
    t = world.teachers
    teachers = (f"PT {t.primary.model} {t.primary.model_args}, ST {t.senior.model} {t.senior.model_args} + seg head, "
                + ("trained checkpoints" if trained
                   else "UNTRAINED weights (their bytes/instance and agreement are not representative)"))
    command = "`" + " ".join([".venv/bin/python bench/cache.py", *(sys.argv[1:] if argv is None else argv)]) + "`"
    machine = (f"{os.cpu_count()} CPU cores (load average {load:.1f} at the start, {os.getloadavg()[0]:.1f} at the "
               f"end: other work shares them), torch {torch.__version__}, zarr {zarr.__version__}; {elapsed:.0f} s "
               f"in all. Teachers: {teachers}.")
    if args.precision:
        per_thread = decode_rates[1]
        feed = (f"One crop thread makes {per_thread:,.0f} instances/s; bf16's raw forward takes "
                f"{raw['bf16']:,.0f}/s, so {int(np.ceil(raw['bf16'] / per_thread))} crop thread(s) keep up "
                f"with it, if the threads scale as the decode table shows.")
        text = "\n\n".join([command, machine, "**Decode** (the producer's crop jobs: read, decode, crop; the "
                             "normalizing runs on the teachers' device)",
                             decode, "**Precision** (build: read, crop, PT and ST with flip test, binarize, pack, "
                             "write; argmax moved: share of keypoints whose heatmap maximum is elsewhere than in fp32, "
                             "and more than one heatmap pixel away)", precision, feed])
        print(feed)
        section = (f"{SECTION}: precision on {args.device} ({Path(args.config).name}: {t.primary.model}, "
                   f"{t.senior.model})")
    elif args.build_only:
        text = "\n\n".join([command, machine, "**Build** (read, crop, PT and ST with flip test, binarize, pack, "
                                                 "write)", build])
        section = f"{SECTION}: build at the teachers' size ({t.primary.model}, {t.senior.model})"
    else:
        text = "\n\n".join([
            command, machine,
            "**Storage** (zstd level 3 + crc32c, chunks of 64, shards of 1024; the three map arrays; float baselines "
            "are the same maps unpacked)", storage,
            f"**Reader** ({args.synthetic} COCO-geometry instances in the store)", reader,
            "**Build** (read, crop, PT and ST with flip test, binarize, pack, write)", build,
            "**Margin**", margin,
        ])
        section = SECTION
    if args.record:
        record(text, section)
        print(f"recorded in {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
