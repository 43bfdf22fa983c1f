"""The student's loss, stage by stage: GT heatmaps, the warped teacher heatmaps, and ST's mask.

Per batch the stored rows of the batch's instances are gathered from host memory (still packed),
sent to the device, unpacked, warped into each sample's augmented crop and binarized again. An instance the store marks failed (meta/ok = 0) learns from its GT alone; the log counts
them as n_no_target.
"""

from __future__ import annotations

import numpy as np
import torch

from odkd.cache.binarize import gate_by_mask
from odkd.cache.reader import TeacherTargets
from odkd.config import StageConfig
from odkd.data.dataset import StoredFrames
from odkd.distill.stages import StagePlan, heatmap_array, required_arrays, stage_teachers, stage_uses_mask
from odkd.distill.warp import flip_keypoint_values, warp_batch, warp_binary_batch
from odkd.train.losses import joints_mse_loss, mask_loss


def teacher_blob_radius(settings: dict) -> float:
    """Radius in heatmap pixels of a binarized unit-peak Gaussian of the store's sigma at its threshold:
    the size a teacher's binary response has whatever the zoom of its crop."""
    threshold = float(settings.get("threshold", 0.5))
    if not 0.0 < threshold < 1.0:
        return 0.0
    return float(settings.get("sigma", 2.0)) * float(np.sqrt(2.0 * np.log(1.0 / threshold)))


def stored_frames(targets: TeacherTargets) -> StoredFrames:
    """Where the store's maps sit: every instance's stored crop, from meta/center and meta/scale."""
    meta = targets.get_batch(np.arange(len(targets)), ["meta/center", "meta/scale"])
    return StoredFrames(meta["meta/center"], meta["meta/scale"], tuple(targets.layout.map_size))


class StoredRows:
    """The store arrays a run needs, held in host memory once (the reader's), gathered per batch by
    instance index and sent to the device: a batch's packed rows are a few hundred KB, while the
    whole packed store (13.5 KB an instance at COCO's 48x64) would take GBs of a modest GPU."""

    def __init__(self, targets: TeacherTargets, names, device: torch.device):
        self.targets, self.device = targets, device
        self.map_width = targets.layout.map_size[0]
        if names:
            targets.load(sorted(names))

    def gather(self, name: str, index: torch.Tensor) -> torch.Tensor:
        rows = self.targets.get_batch(index.cpu().numpy(), [name])[name]
        return torch.from_numpy(rows).to(self.device, non_blocking=True)


class StudentObjective:
    """(student output, batch) -> (loss, logged parts) under the current stage of `plan`."""

    def __init__(self, plan: StagePlan, targets: TeacherTargets, *, heatmap_size, seg_loss: str,
                 device: torch.device, keep_blob_size: bool = True):
        self.plan = plan
        self.blob_radius = teacher_blob_radius(targets.attrs.get("settings", {})) if keep_blob_size else 0.0
        self.heatmap_size = tuple(heatmap_size)
        self.seg_loss = seg_loss
        names = set()
        for stage in plan.stages:
            names |= set(required_arrays(stage))
        self.rows = StoredRows(targets, names, device)
        self.stage: StageConfig = plan.stages[0]

    def begin_epoch(self, epoch: int) -> dict:
        self.stage = self.plan.stages[self.plan.index_at(epoch)]
        return {"stage": self.stage.name}

    def teacher_maps(self, key: str, batch: dict) -> torch.Tensor:
        stage, index = self.stage, batch["index"]
        stored = self.rows.gather(heatmap_array(key, stage.targets), index)
        if stage.targets == "binary":
            return warp_binary_batch(stored, self.rows.map_width, batch["teacher_theta"], self.heatmap_size,
                                     batch["flip"], keypoint_channels=True, blob_radius=self.blob_radius,
                                     zoom=batch["teacher_zoom"])
        return warp_batch(stored, batch["teacher_theta"], self.heatmap_size, batch["flip"], keypoint_channels=True)

    def __call__(self, output, batch: dict):
        stage = self.stage
        heatmaps, mask_logits = output
        terms: dict[str, tuple[float, torch.Tensor]] = {}
        counts: dict[str, float] = {}
        if stage.gt_weight > 0:
            terms["gt_loss"] = (stage.gt_weight,
                                joints_mse_loss(heatmaps, batch["heatmaps"], batch["target_weight"]))
        teachers = stage_teachers(stage)
        if teachers or stage_uses_mask(stage):
            ok = self.rows.gather("meta/ok", batch["index"]).bool()
            counts["n_no_target"] = float((~ok).sum())
        mask = None
        if stage_uses_mask(stage):
            mask = warp_binary_batch(self.rows.gather("st/mask", batch["index"]), self.rows.map_width,
                                     batch["teacher_theta"], self.heatmap_size, batch["flip"], keypoint_channels=False)
        for key in teachers:
            target = self.teacher_maps(key, batch)
            if stage.mask_gate and key == "st":
                target = gate_by_mask(target > 0, mask > 0, stage.mask_gate_dilation) * target
            conf = flip_keypoint_values(self.rows.gather(f"{key}/conf", batch["index"]).float(), batch["flip"])
            weight = (ok[:, None] & (conf >= stage.conf_floor)).float().unsqueeze(-1)
            # both teachers at once share the KD weight, so "both" distils as much as one teacher
            terms[f"kd_{key}_loss"] = (stage.kd_weight / len(teachers), joints_mse_loss(heatmaps, target, weight))
        if stage.seg_weight > 0:
            seg = mask_loss(mask_logits[ok], mask[ok], self.seg_loss) if ok.any() else mask_logits.sum() * 0.0
            terms["seg_loss"] = (stage.seg_weight, seg)
        loss = sum(weight * value for weight, value in terms.values())
        return loss, {**{name: value.item() for name, (_, value) in terms.items()}, **counts}
