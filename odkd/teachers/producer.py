"""Running PT and ST on the stored crops (odkd.store.geometry): the producer that fills a store's shards."""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from odkd.config import resolve_device
from odkd.data.image import read_image
from odkd.data.keypoints import FLIP_INDEX
from odkd.data.transforms import CropFrame, crop_image, normalize_image
from odkd.errors import OdkdError
from odkd.models.inference import cuda_tf32, predict_batch
from odkd.models.teacher import TeacherSpec, loaded_teacher
from odkd.store.binarize import binarize, gate_by_mask
from odkd.store.bitpack import bitpack_maps
from odkd.store.geometry import stored_frame_scale
from odkd.store.schema import StoreLayout
from odkd.store.writer import ShardTargets

PREFETCH_BATCHES = 2  # batches cropped ahead of the teachers
GPU_DECODE_THREADS = 4


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


def ran_precision(precision: str, device: torch.device) -> str:
    """The arithmetic that `precision` gets on `device`: a CPU has no TF32, so tf32 runs there as fp32."""
    return "fp32" if precision == "tf32" and device.type != "cuda" else precision


def set_precision_layout(net, precision: str) -> None:
    """Channels-last weights for bf16 (tensor cores and oneDNN's bf16 kernels want NHWC), the default
    layout otherwise, so that an fp32 build stays bit-identical. In place: a process loads each
    teacher once, and a task sets the layout of its store's precision before it runs."""
    if isinstance(net, torch.nn.Module):
        net.to(memory_format=torch.channels_last if precision == "bf16" else torch.contiguous_format)


def teacher_forward(net, images: torch.Tensor, precision: str, *, flip_test: bool, shift_heatmap: bool,
                    flip_index: np.ndarray = FLIP_INDEX):
    """predict_batch at `precision` ("fp32" | "tf32" | "bf16") on a net laid out by set_precision_layout.

    bf16 is autocast to bfloat16 on channels-last crops; an ONNX or TorchScript file runs at the
    precision it was exported in.
    """
    bf16 = precision == "bf16" and isinstance(net, torch.nn.Module)
    if bf16:
        images = images.contiguous(memory_format=torch.channels_last)
    with cuda_tf32(precision != "fp32"):
        return predict_batch(net, images, flip_test=flip_test, shift_heatmap=shift_heatmap,
                             autocast_dtype=torch.bfloat16 if bf16 else None, flip_index=flip_index)


def normalization_table() -> np.ndarray:
    """normalize_image of every byte value, (3, 256) float32: RGB channel by BGR byte. A lookup in it gives
    normalize_image's very bits on any device, so crop threads hand over bytes (a quarter of the float
    crop to move to the GPU) and leave the normalizing, 40% of their work, to the device."""
    byte = np.arange(256, dtype=np.uint8)
    return normalize_image(np.repeat(byte[:, None, None], 3, axis=2))[:, :, 0]


def normalize_on_device(crops: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """BGR byte crops (N, H, W, 3) -> normalize_image's float32 (N, 3, H, W), by lookup in `table` on their device."""
    return torch.stack([table[c][crops[..., 2 - c].long()] for c in range(3)], dim=1)


@dataclass
class TeacherProducer:
    """Rows [start, stop) of a store: both teachers, with flip test, on each instance's stored crop."""

    layout: StoreLayout
    teachers: dict[str, TeacherSpec]
    records: InstanceRecords
    settings: dict  # the store's settings: sizes, thresholds, flip test, precision
    batch_size: int = 64
    device: str = "cpu"  # resolved by each worker: "auto" means its own GPU when it has one
    torch_threads: int | None = None
    decode_threads: int = 0  # 0: decode_threads_for the worker's device
    flip_index: tuple[int, ...] = tuple(FLIP_INDEX.tolist())  # the keypoint set's mirror, for the flip test

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
        for net in nets.values():
            set_precision_layout(net, self.precision)
        table = torch.from_numpy(normalization_table()).to(device)
        failed: list[dict] = []
        starts = range(0, len(indices), self.batch_size)
        batches = [indices[a:a + self.batch_size] for a in starts]
        with ThreadPoolExecutor(self.decode_threads or decode_threads_for(device)) as pool:
            # the crops of the next PREFETCH_BATCHES batches are made while the teachers run on this one
            queued = deque(self.queue_crops(pool, batch) for batch in batches[:PREFETCH_BATCHES])
            for i, a in enumerate(starts):
                crops, ok, batch_failed = queued.popleft()()
                if i + PREFETCH_BATCHES < len(batches):
                    queued.append(self.queue_crops(pool, batches[i + PREFETCH_BATCHES]))
                failed += batch_failed
                if ok.any():
                    rows = np.arange(a, a + len(ok))[ok]
                    sent = torch.from_numpy(crops if ok.all() else crops[ok]).to(device)
                    self._fill(out, rows, normalize_on_device(sent, table), nets)
        return ShardTargets(out, failed,
                            ran={"precision": ran_precision(self.precision, device), "device": device.type})

    @property
    def precision(self) -> str:
        return self.settings.get("precision", "fp32")  # stores from before the setting ran in fp32

    def queue_crops(self, pool: ThreadPoolExecutor, indices: np.ndarray) -> Callable[[], tuple]:
        """Queue the crops of one batch on `pool`, one job per run of instances from the same image (each
        image is decoded once); returns the call that waits for them: (BGR byte crops, ok, failed)."""
        size = tuple(self.settings["teacher_input_size"])
        crops = np.zeros((len(indices), size[1], size[0], 3), np.uint8)
        ok = np.zeros(len(indices), bool)
        paths = [self.records.image_paths[i] for i in indices]
        firsts = [j for j in range(len(paths)) if j == 0 or paths[j] != paths[j - 1]]
        jobs = [pool.submit(self._crop_image, paths[j], indices[j:k], crops[j:k], ok[j:k], size)
                for j, k in zip(firsts, firsts[1:] + [len(paths)])]

        def wait() -> tuple[np.ndarray, np.ndarray, list[dict]]:
            return crops, ok, [f for job in jobs for f in job.result()]

        return wait

    def _crop_image(self, path: str, indices: np.ndarray, crops: np.ndarray, ok: np.ndarray, size) -> list[dict]:
        """Decode one image and write its instances' crops into the views `crops` and `ok`; returns
        the failed instances. Runs on a crop thread: cv2 releases the GIL."""
        try:
            image = read_image(path)
        except OdkdError as exc:
            return [{"index": int(idx), "image_id": int(self.records.image_ids[idx]),
                     "ann_id": int(self.records.ann_ids[idx]), "file": path, "reason": str(exc)} for idx in indices]
        for j, idx in enumerate(indices):
            frame = CropFrame(center=tuple(map(float, self.records.centers[idx])),
                              scale=tuple(map(float, self.records.scales[idx])))
            crops[j] = crop_image(image, frame, size)
            ok[j] = True
        return []

    def _fill(self, out: dict, rows: np.ndarray, images: torch.Tensor, nets: dict) -> None:
        s = self.settings
        binary = {}
        for key, net in nets.items():
            heatmaps, mask = teacher_forward(net, images, self.precision, flip_test=s["flip_test"],
                                             shift_heatmap=s["shift_heatmap"], flip_index=np.array(self.flip_index))
            out[f"{key}/conf"][rows] = heatmaps.amax(dim=(-2, -1)).to(torch.float16).cpu().numpy()
            if self.layout.soft:
                out[f"{key}/soft_heatmaps"][rows] = heatmaps.to(torch.float16).cpu().numpy()
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


def decode_threads_for(device: torch.device) -> int:
    """Crop threads per worker: a GPU outruns one core's JPEG decoding several times over (bench/cache.py),
    while on a CPU the teachers take the cores and one thread keeps ahead of them."""
    return GPU_DECODE_THREADS if device.type == "cuda" else 1
