"""Running PT and ST on canonical crops: the producer that fills a store's shards.

The cached crop is the student's canonical crop widened by `margin` at the same pixel scale:
same center, the same image pixels per heatmap pixel, and a proportionally larger map (each
side rounded up to a multiple of 8, so the teacher's input stays a multiple of 32 as HRNet
needs). The stored center and scale are those of that wider crop, so a map cell sits exactly
where the student's heatmap cell at the same image point sits, and the trainer can warp the
stored maps into any augmented frame with `odkd.data.transforms.warp_maps`.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from odkd.cache.bitpack import bitpack_maps
from odkd.cache.schema import StoreLayout
from odkd.cache.writer import ShardTargets
from odkd.config import resolve_device
from odkd.data.image import read_image
from odkd.data.transforms import CropFrame, crop_image, normalize_image
from odkd.errors import OdkdError
from odkd.models import build_model, load_checkpoint, model_fingerprint, read_checkpoint
from odkd.models.inference import predict_batch

ROLES = {"pt": "primary", "st": "senior"}
MAP_MULTIPLE = 8


def cache_geometry(heatmap_size, input_size, margin: float) -> tuple[tuple[int, int], tuple[int, int]]:
    """(stored map size, teacher input size), both (w, h), for the student's sizes and a margin >= 1."""
    if margin < 1.0:
        raise OdkdError(f"cache.margin must be >= 1.0 (1.0 caches exactly the student's crop), got {margin}")
    if margin == 1.0:
        return tuple(heatmap_size), tuple(input_size)
    map_size = tuple(int(np.ceil(s * margin / MAP_MULTIPLE - 1e-9)) * MAP_MULTIPLE for s in heatmap_size)
    stride = (input_size[0] // heatmap_size[0], input_size[1] // heatmap_size[1])
    return map_size, (map_size[0] * stride[0], map_size[1] * stride[1])


def stored_frame_scale(scale: np.ndarray, heatmap_size, map_size) -> np.ndarray:
    """The scale of the widened crop: the student's scale times the map's growth on each side."""
    grow = np.array([map_size[0] / heatmap_size[0], map_size[1] / heatmap_size[1]], np.float32)
    return (np.asarray(scale, np.float32) * grow).astype(np.float32)


@dataclass(frozen=True)
class TeacherSpec:
    """One teacher as the cache records it; `fingerprint` hashes its loaded tensors."""

    role: str  # "primary" | "senior"
    model: str
    model_args: dict
    seg_head: bool
    checkpoint: str
    fingerprint: str
    val_ap: float | None

    def settings(self) -> dict:
        return {"role": self.role, "model": self.model, "model_args": self.model_args,
                "seg_head": self.seg_head, "fingerprint": self.fingerprint}


def teacher_checkpoint(cfg, role: str) -> Path:
    """The configured checkpoint of a teacher, or the best.pth of `odkd train-teacher --role ROLE`."""
    tcfg = getattr(cfg.teachers, role)
    path = Path(tcfg.checkpoint) if tcfg.checkpoint else Path(cfg.runs) / f"teacher_{role}" / "best.pth"
    if not path.is_file():
        raise OdkdError(f"{path}: teacher checkpoint not found (teachers.{role}.checkpoint)")
    return Path(os.path.abspath(path))  # workers need not share the driver's working directory


def _build_teacher(model: str, model_args: dict, seg_head: bool, checkpoint: str) -> torch.nn.Module:
    net = build_model(model, seg_head=seg_head, **model_args)
    # a teacher must be whole: no freshly initialised seg head behind a keypoint-only file
    load_checkpoint(net, checkpoint, allow_new_seg_head=False)
    return net.eval()


def resolve_teachers(cfg, input_size, map_size) -> dict[str, TeacherSpec]:
    """Load both teachers once on the CPU, check they fit their models and the cache geometry, and
    describe them. Every problem is an OdkdError raised here, before any work starts."""
    specs = {}
    for key, role in ROLES.items():
        tcfg = getattr(cfg.teachers, role)
        if key == "st" and not tcfg.seg_head:
            raise OdkdError("teachers.senior.seg_head must be true: the cache stores the senior teacher's mask")
        path = teacher_checkpoint(cfg, role)
        net = _build_teacher(tcfg.model, dict(tcfg.model_args), tcfg.seg_head, str(path))
        with torch.inference_mode():
            out = net(torch.zeros(1, 3, input_size[1], input_size[0]))
        want = (map_size[1], map_size[0])
        if tuple(out.heatmaps.shape[-2:]) != want or (key == "st" and tuple(out.mask_logits.shape[-2:]) != want):
            raise OdkdError(f"teachers.{role}: {tcfg.model} maps a {input_size[0]}x{input_size[1]} input to "
                            f"{out.heatmaps.shape[-1]}x{out.heatmaps.shape[-2]} heatmaps, the cache needs "
                            f"{map_size[0]}x{map_size[1]}")
        best_ap = read_checkpoint(path).extra.get("best_ap")
        specs[key] = TeacherSpec(
            role=role, model=tcfg.model, model_args=dict(tcfg.model_args), seg_head=tcfg.seg_head,
            checkpoint=str(path), fingerprint=model_fingerprint(net.state_dict()),
            val_ap=float(best_ap) if isinstance(best_ap, (int, float)) and best_ap >= 0 else None,
        )
    return specs


_LOADED: dict[tuple[str, str], torch.nn.Module] = {}
_LOADED_LOCK = threading.Lock()


def loaded_teacher(spec: TeacherSpec, device: torch.device) -> torch.nn.Module:
    """The teacher on `device`, loaded once per process (a dask worker keeps it for all its tasks)."""
    key = (spec.fingerprint, str(device))
    with _LOADED_LOCK:
        if key not in _LOADED:
            net = _build_teacher(spec.model, spec.model_args, spec.seg_head, spec.checkpoint)
            found = model_fingerprint(net.state_dict())
            if found != spec.fingerprint:
                raise OdkdError(f"{spec.checkpoint}: changed during the build (fingerprint {found}, "
                                f"expected {spec.fingerprint})")
            _LOADED[key] = net.to(device)
        return _LOADED[key]


@dataclass(frozen=True)
class InstanceRecords:
    """What the producer needs of each instance: its image and the stored crop's frame."""

    image_paths: tuple[str, ...]
    image_ids: np.ndarray  # (N,) int64
    ann_ids: np.ndarray  # (N,) int64
    centers: np.ndarray  # (N, 2) float32, the stored crop's
    scales: np.ndarray  # (N, 2) float32, the stored crop's

    @classmethod
    def from_instances(cls, instances, count: int, heatmap_size, map_size) -> "InstanceRecords":
        chosen = instances.instances[:count]
        return cls(
            image_paths=tuple(os.path.abspath(instances.image_path(inst)) for inst in chosen),
            image_ids=np.array([inst.image_id for inst in chosen], np.int64),
            ann_ids=np.array([inst.ann_id for inst in chosen], np.int64),
            centers=np.stack([inst.center for inst in chosen]).astype(np.float32),
            scales=np.stack([stored_frame_scale(inst.scale, heatmap_size, map_size) for inst in chosen]),
        )


def binarize(heatmaps: torch.Tensor, threshold: float, mode: str) -> torch.Tensor:
    """`map >= threshold`, absolute or relative to each map's peak (a map without a positive peak is empty)."""
    if mode == "absolute":
        return heatmaps >= threshold
    peak = heatmaps.amax(dim=(-2, -1), keepdim=True)
    return (heatmaps >= threshold * peak) & (peak > 0)


def gate_by_mask(binary: torch.Tensor, mask: torch.Tensor, dilation: int) -> torch.Tensor:
    """Keep keypoint responses inside the person mask grown by `dilation` pixels."""
    if dilation > 0:
        mask = F.max_pool2d(mask.float(), 2 * dilation + 1, stride=1, padding=dilation) > 0
    return binary & mask


@dataclass
class TeacherProducer:
    """Rows [start, stop) of a store: both teachers, with flip test, on each instance's stored crop."""

    layout: StoreLayout
    teachers: dict[str, TeacherSpec]
    records: InstanceRecords
    settings: dict  # the store's settings: sizes, thresholds, flip test
    batch_size: int = 64
    device: str = "cpu"  # resolved by each worker: "auto" means its own GPU when it has one
    torch_threads: int | None = None

    def __call__(self, start: int, stop: int) -> ShardTargets:
        return self.targets_for(np.arange(start, stop))

    def targets_for(self, indices: np.ndarray) -> ShardTargets:
        """All store arrays for the instances `indices`; an unreadable image leaves its row zero, ok = 0."""
        before = torch.get_num_threads()
        torch.set_num_threads(self.torch_threads or before)
        try:
            return self._targets(indices)
        finally:  # in-process builds hand the caller's torch back as it was
            torch.set_num_threads(before)

    def _targets(self, indices: np.ndarray) -> ShardTargets:
        device = resolve_device(self.device)
        out = self.layout.allocate(len(indices))
        out["meta/index"][:] = indices
        out["meta/image_id"][:] = self.records.image_ids[indices]
        out["meta/ann_id"][:] = self.records.ann_ids[indices]
        out["meta/center"][:] = self.records.centers[indices]
        out["meta/scale"][:] = self.records.scales[indices]
        nets = {key: loaded_teacher(spec, device) for key, spec in self.teachers.items()}
        failed: list[dict] = []
        rows = [np.arange(a, min(a + self.batch_size, len(indices))) for a in range(0, len(indices), self.batch_size)]
        # the next batch is read and cropped while the teachers run on this one
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(self._crops, indices[rows[0]]) if rows else None
            for i, batch_rows in enumerate(rows):
                images, ok, batch_failed = pending.result()
                if i + 1 < len(rows):
                    pending = pool.submit(self._crops, indices[rows[i + 1]])
                failed += batch_failed
                if ok.any():
                    self._fill(out, batch_rows[ok], torch.from_numpy(images[ok]).to(device), nets)
        return ShardTargets(out, failed)

    def _crops(self, indices: np.ndarray):
        size = tuple(self.settings["teacher_input_size"])
        images = np.zeros((len(indices), 3, size[1], size[0]), np.float32)
        ok = np.zeros(len(indices), bool)
        failed = []
        cached_path, cached, error = None, None, ""
        for j, idx in enumerate(indices):
            path = self.records.image_paths[idx]
            if path != cached_path:
                cached_path = path
                try:
                    cached, error = read_image(path), ""
                except OdkdError as exc:
                    cached, error = None, str(exc)
            if cached is None:
                failed.append({"index": int(idx), "image_id": int(self.records.image_ids[idx]),
                               "ann_id": int(self.records.ann_ids[idx]), "file": path, "reason": error})
                continue
            frame = CropFrame(center=tuple(map(float, self.records.centers[idx])),
                              scale=tuple(map(float, self.records.scales[idx])))
            images[j] = normalize_image(crop_image(cached, frame, size))
            ok[j] = True
        return images, ok, failed

    def _fill(self, out: dict, rows: np.ndarray, images: torch.Tensor, nets: dict) -> None:
        s = self.settings
        binary = {}
        for key, net in nets.items():
            heatmaps, mask = predict_batch(net, images, flip_test=s["flip_test"], shift_heatmap=s["shift_heatmap"])
            out[f"{key}/conf"][rows] = heatmaps.amax(dim=(-2, -1)).to(torch.float16).cpu().numpy()
            binary[key] = binarize(heatmaps, s["threshold"], s["threshold_mode"])
            if key == "st":
                binary["mask"] = mask >= s["mask_threshold"]
        if s["mask_gate"]:
            binary["st"] = gate_by_mask(binary["st"], binary["mask"], s["mask_gate_dilation"])
        out["pt/heatmaps"][rows] = bitpack_maps(binary["pt"].cpu().numpy())
        out["st/heatmaps"][rows] = bitpack_maps(binary["st"].cpu().numpy())
        out["st/mask"][rows] = bitpack_maps(binary["mask"].cpu().numpy())
        out["meta/ok"][rows] = 1


def default_torch_threads(workers: int) -> int:
    """Intra-op threads per local worker process, so that the workers together fill the cores once."""
    return max(1, (os.cpu_count() or 1) // max(1, workers))
