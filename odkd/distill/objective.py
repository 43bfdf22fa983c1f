"""The student's loss, stage by stage: GT heatmaps, the warped teacher heatmaps, and ST's mask.

Each sample's stored rows arrive with its image (odkd.data.dataset: the loader worker reads them from the
store's local copy), collated and still packed; here the batch is unpacked on the device, warped into each
sample's augmented crop and binarized again. An instance the store marks failed (meta/ok = 0) learns
from its GT alone; the log counts them as n_no_target. Loss parts stay on the device as 0-dim tensors:
the loop reads them back once in a while, not every step.
"""

from __future__ import annotations

import numpy as np
import torch

from odkd.config import StageConfig
from odkd.data.keypoints import FLIP_INDEX
from odkd.distill.stages import StagePlan, heatmap_array, required_arrays, stage_teachers, stage_uses_mask
from odkd.distill.targets import TARGET_FORMS, WarpInputs
from odkd.distill.warp import flip_keypoint_values, warp_binary_batch
from odkd.models.losses import joints_mse_loss, mask_loss
from odkd.store.binarize import gate_by_mask
from odkd.store.reader import TeacherTargets


def teacher_blob_radius(settings: dict) -> float:
    """Radius in heatmap pixels of a binarized unit-peak Gaussian of the store's sigma at its threshold:
    the size a teacher's binary response has whatever the zoom of its crop."""
    threshold = float(settings.get("threshold", 0.5))
    if not 0.0 < threshold < 1.0:
        return 0.0
    return float(settings.get("sigma", 2.0)) * float(np.sqrt(2.0 * np.log(1.0 / threshold)))


def stored_arrays(plan: StagePlan) -> list[str]:
    """The store arrays every sample of a run carries: what any stage reads, and the stored crop."""
    names = {"meta/center", "meta/scale"}
    for stage in plan.stages:
        names |= set(required_arrays(stage))
    return sorted(names)


class StudentObjective:
    """(student output, batch) -> (loss, logged parts) under the current stage of `plan`."""

    def __init__(self, plan: StagePlan, targets: TeacherTargets, *, heatmap_size, sigma: float, seg_loss: str,
                 keep_blob_size: bool = True, flip_index: np.ndarray = FLIP_INDEX):
        self.plan = plan
        self.flip_index = flip_index  # the keypoint set's, which mirrored samples' channels follow
        self.blob_radius = teacher_blob_radius(targets.attrs.get("settings", {}))
        self.keep_blob_size = keep_blob_size
        self.sigma = float(sigma)
        self.map_width = targets.layout.map_size[0]
        self.heatmap_size = tuple(heatmap_size)
        self.seg_loss = seg_loss
        self.stage: StageConfig = plan.stages[0]

    def begin_epoch(self, epoch: int) -> dict:
        self.stage = self.plan.stages[self.plan.index_at(epoch)]
        return {"stage": self.stage.name}

    def idle_modules(self, model: torch.nn.Module) -> list[torch.nn.Module]:
        """The modules the current stage leaves out of the loss: the seg head when it learns no mask."""
        seg_head = getattr(model, "seg_head", None)
        return [seg_head] if seg_head is not None and self.stage.seg_weight == 0 else []

    def teacher_maps(self, key: str, batch: dict, conf: torch.Tensor) -> torch.Tensor:
        """The current stage's target form of teacher `key`'s stored maps, in each sample's crop."""
        warp = WarpInputs(theta=batch["teacher_theta"], zoom=batch["teacher_zoom"], flip=batch["flip"],
                          out_size=self.heatmap_size, stored_width=self.map_width, blob_radius=self.blob_radius,
                          keep_blob_size=self.keep_blob_size, sigma=self.sigma, flip_index=self.flip_index)
        return TARGET_FORMS[self.stage.targets].make(batch[heatmap_array(key, self.stage.targets)], conf, warp)

    def __call__(self, output, batch: dict):
        stage = self.stage
        heatmaps, mask_logits = output
        terms: dict[str, tuple[float, torch.Tensor]] = {}
        counts: dict[str, torch.Tensor] = {}
        if "labeled" in batch:
            labeled = batch["labeled"]
            counts["n_labeled"], counts["n_unlabeled"] = labeled.sum(), (~labeled).sum()
        if stage.gt_weight > 0:
            gt_loss = joints_mse_loss(heatmaps, batch["heatmaps"], batch["target_weight"])
            if "labeled" in batch:
                # the mean over the labelled instances: unlabelled ones in the batch do not thin the GT signal
                gt_loss = gt_loss * labeled.numel() / labeled.sum().clamp(min=1)
            terms["gt_loss"] = (stage.gt_weight, gt_loss)
        teachers = stage_teachers(stage)
        if teachers or stage_uses_mask(stage):
            ok = batch["meta/ok"].bool()
            counts["n_no_target"] = (~ok).sum()
        mask = None
        if stage_uses_mask(stage):
            mask = warp_binary_batch(batch["st/mask"], self.map_width, batch["teacher_theta"], self.heatmap_size,
                                     batch["flip"], keypoint_channels=False)
        for key in teachers:
            conf = flip_keypoint_values(batch[f"{key}/conf"].float(), batch["flip"], self.flip_index)
            target = self.teacher_maps(key, batch, conf)
            if stage.mask_gate and key == "st":
                target = gate_by_mask(target > 0, mask > 0, stage.mask_gate_dilation) * target
            weight = ok[:, None] & (conf >= stage.conf_floor)
            if not stage.kd_on_labels:
                weight &= batch["target_weight"][..., 0] == 0
            weight = weight.float().unsqueeze(-1)
            # both teachers at once share the KD weight, so "both" distils as much as one teacher
            terms[f"kd_{key}_loss"] = (stage.kd_weight / len(teachers), joints_mse_loss(heatmaps, target, weight))
        if stage.seg_weight > 0:
            terms["seg_loss"] = (stage.seg_weight, mask_loss(mask_logits, mask, self.seg_loss, weight=ok))
        loss = sum(weight * value for weight, value in terms.values())
        return loss, {**{name: value.detach() for name, (_, value) in terms.items()}, **counts}
