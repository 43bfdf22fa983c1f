"""`odkd cache-teachers`: every instance of a split through PT and ST once, into a store with its provenance."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from odkd import __version__
from odkd.config import PipelineConfig, resolve_device
from odkd.data.instances import load_instances
from odkd.data.keypoints import keypoint_set, stored_record
from odkd.errors import OdkdError
from odkd.models.teacher import resolve_teachers
from odkd.store.geometry import cache_geometry
from odkd.store.schema import StoreLayout
from odkd.store.writer import BuildSummary, build_store, utc_now
from odkd.teachers.producer import InstanceRecords, TeacherProducer, default_torch_threads

FRAME_NOTE = ("meta/center and meta/scale are the stored crop's (the student's canonical crop widened by "
              "the margin, same pixel scale); warp the maps from that frame at map_size into the "
              "augmented frame with odkd.data.transforms.warp_maps")


def cache_settings(cfg: PipelineConfig, split: str, dataset_fingerprint: str, map_size, teacher_input_size,
                   teachers: dict) -> dict:
    """Everything that decides a store's contents; a store is only resumed under identical settings."""
    c = cfg.cache
    kset = keypoint_set(cfg.data.keypoints)
    recorded = stored_record(kset)
    return {
        **({"keypoints": recorded} if recorded else {}),
        "dataset_fingerprint": dataset_fingerprint, "split": split,
        "input_size": list(cfg.data.input_size), "heatmap_size": list(cfg.data.heatmap_size),
        "sigma": cfg.data.sigma, "margin": c.margin, "map_size": list(map_size), "store_soft": c.store_soft,
        "teacher_input_size": list(teacher_input_size),
        "threshold": c.threshold, "threshold_mode": c.threshold_mode, "mask_threshold": c.mask_threshold,
        "mask_gate": c.mask_gate, "mask_gate_dilation": c.mask_gate_dilation,
        "flip_test": c.flip_test and kset.mirrored, "shift_heatmap": cfg.eval.shift_heatmap, "precision": c.precision,
        "teachers": {key: spec.settings() for key, spec in teachers.items()},
    }


def visible_gpus() -> list[str]:
    """The GPUs this process may use, as CUDA_VISIBLE_DEVICES names them (indices or UUIDs)."""
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    names = [g.strip() for g in visible.split(",") if g.strip()] if visible is not None else map(str, range(count))
    return list(names)[:count]


def gpu_worker_envs(workers: int, gpus: list[str]) -> list[dict]:
    """Each local worker's CUDA_VISIBLE_DEVICES, round-robin over `gpus`: one worker per GPU when
    `workers` is their number, and its GPU is then its cuda:0."""
    return [{"CUDA_VISIBLE_DEVICES": gpus[i % len(gpus)]} for i in range(workers)]


def build_cache(cfg: PipelineConfig, split: str = "train", out: str | None = None, **options) -> str:
    """build_teacher_store with the same arguments; returns the store's URL."""
    return build_teacher_store(cfg, split, out, **options).url


def build_teacher_store(cfg: PipelineConfig, split: str = "train", out: str | None = None, *,
                        workers: int | None = None, scheduler: str | None = None, batch_size: int | None = None,
                        device: str = "cpu", overwrite: bool = False, progress: bool = True, limit: int | None = None,
                        torch_threads: int | None = None, decode_threads: int | None = None) -> BuildSummary:
    """Run both teachers over `split` into the store at `out` (default `[cache] store`, or
    `[cache] unlabeled_store` for the unlabeled split); returns what the
    run did (shards written and skipped, the store's URL).

    `scheduler` is a dask scheduler address (each of its workers loads the teachers once, on
    `device`), "synchronous" to run in this process, or None for a LocalCluster of `workers`
    processes; with `device` "cuda" or "auto" on a machine with GPUs, each of those processes sees one
    GPU (round-robin), so `workers` = the number of GPUs runs one worker per GPU. An interrupted
    build resumes where it stopped when run again. `torch_threads` is each worker's intra-op threads
    for CPU teachers; by default the cores split among the local workers, and torch's own default on
    a scheduler's workers. `decode_threads` (default `[cache] decode_threads`) decode and crop the
    images of each worker.
    """
    url = str(out or (cfg.cache.unlabeled_store if split == "unlabeled" else cfg.cache.store))
    workers = workers or cfg.cache.workers
    batch_size = batch_size or cfg.cache.batch_size
    decode_threads = cfg.cache.decode_threads if decode_threads is None else decode_threads
    if workers < 1 or batch_size < 1:
        raise OdkdError(f"workers ({workers}) and batch size ({batch_size}) must be at least 1")
    if decode_threads < 0:
        raise OdkdError(f"cache.decode_threads must be 0 (by device) or more, got {decode_threads}")
    if scheduler in (None, "synchronous"):
        resolve_device(device)  # no CUDA here is one error now; a scheduler's workers resolve their own
    instances = load_instances(cfg.data, split)
    count = len(instances) if limit is None else min(limit, len(instances))
    if count == 0:
        source = Path(cfg.data.root) / cfg.data.unlabeled.boxes if split == "unlabeled" else cfg.data.ann_file(split)
        raise OdkdError(f"{source}: no person instances to cache")
    map_size, teacher_input = cache_geometry(cfg.data.heatmap_size, cfg.data.input_size, cfg.cache.margin)
    teachers = resolve_teachers(cfg, teacher_input, map_size)
    kset = keypoint_set(cfg.data.keypoints)
    layout = StoreLayout(count, kset.num_keypoints, map_size, cfg.cache.chunk_instances, cfg.cache.shard_instances,
                         soft=cfg.cache.store_soft)
    settings = cache_settings(cfg, split, instances.fingerprint, map_size, teacher_input, teachers)
    attrs = {
        "odkd_version": __version__, "created_at": utc_now(), "split": split,
        "limit": limit, "frame": FRAME_NOTE,
        "teachers": {key: {"role": s.role, "model": s.model, "checkpoint": s.checkpoint,
                           "fingerprint": s.fingerprint, "val_ap": s.val_ap} for key, s in teachers.items()},
        "pipeline": {k: v for k, v in dataclasses.asdict(cfg).items() if k != "raw"},
        "pipeline_toml": cfg.raw,
    }
    producer = TeacherProducer(
        layout=layout, teachers=teachers,
        records=InstanceRecords.from_instances(instances, count, cfg.data.heatmap_size, map_size),
        settings=settings, batch_size=batch_size, device=device, decode_threads=decode_threads,
        torch_threads=torch_threads or (default_torch_threads(workers) if scheduler is None else None),
        flip_index=tuple(kset.flip_index.tolist()),
    )
    gpus = visible_gpus() if scheduler is None and device in ("cuda", "auto") else []
    return build_store(url, layout, settings, producer, attrs=attrs, scheduler=scheduler, workers=workers,
                       worker_envs=gpu_worker_envs(workers, gpus) if gpus else None,
                       overwrite=overwrite, storage_options=cfg.cache.storage_options or None, progress=progress,
                       desc=f"caching {split}")
