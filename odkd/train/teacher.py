"""`odkd train-teacher`: the primary teacher (keypoints) or the senior teacher (keypoints + person mask)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from odkd.config import keep_resolved_config, resolve_device, teacher_data
from odkd.data.dataset import TopDownDataset
from odkd.data.instances import load_instances
from odkd.data.keypoints import keypoint_set, val_stat
from odkd.errors import OdkdError
from odkd.eval.evaluate import ModelEvaluator
from odkd.models import build_model, load_checkpoint
from odkd.models.losses import joints_mse_loss, mask_loss
from odkd.models.teacher import TRAINED_ROLES
from odkd.train.loop import ModelSpec, fit

log = logging.getLogger(__name__)


def teacher_loss(seg_weight: float, seg_loss: str):
    """Heatmap MSE, plus the weighted mask loss when the model has a seg head."""

    def loss_fn(output, batch):
        heatmaps, mask_logits = output
        kpt = joints_mse_loss(heatmaps, batch["heatmaps"], batch["target_weight"])
        if mask_logits is None:
            return kpt, {"kpt_loss": kpt.item()}
        seg = mask_loss(mask_logits, batch["mask"], seg_loss)
        return kpt + seg_weight * seg, {"kpt_loss": kpt.item(), "seg_loss": seg.item()}

    return loss_fn


def default_teacher_dir(cfg, role: str) -> Path:
    return Path(cfg.runs) / f"teacher_{role}"


def new_teacher(cfg, role: str, init: str = "") -> torch.nn.Module:
    """The `role` teacher as training starts: a model with the set's K outputs, filled from `init` when it
    names a file (an official, mmpose or odkd file of the set, or an ImageNet backbone); a head the file
    lacks (the seg head, an ImageNet file's pose head) stays initialised."""
    tcfg = getattr(cfg.teachers, role)
    model = build_model(tcfg.model, keypoint_set(cfg.data.keypoints).num_keypoints, seg_head=tcfg.seg_head,
                        **tcfg.model_args)
    if init:
        report = load_checkpoint(model, init, allow_new_seg_head=True)
        log.info(f"init from {report.summary()}")
    return model


def train_teacher(cfg, role: str, *, out: str | None = None, resume: bool = False, init: str | None = None,
                  device: str | None = None, max_steps_per_epoch: int | None = None) -> dict:
    """Train the `role` teacher of the pipeline config; returns the loop's summary."""
    if role not in TRAINED_ROLES:
        raise OdkdError(f"--role must be one of {', '.join(TRAINED_ROLES)}, got {role!r}")
    tcfg = getattr(cfg.teachers, role)
    dev = resolve_device(device or cfg.device)
    init = init if init is not None else tcfg.init

    def make_model():
        return new_teacher(cfg, role, "" if resume else init)

    data = teacher_data(cfg, role)
    train_set = TopDownDataset(load_instances(data, "train"), data, train=True, with_mask=tcfg.seg_head,
                               seed=tcfg.train.seed)
    val = load_instances(data, "val")

    evaluator = ModelEvaluator(val, data, cfg.eval, val.coco, device=dev, with_mask=tcfg.seg_head,
                               workers=tcfg.train.workers)

    spec = ModelSpec(name=tcfg.model, args=dict(tcfg.model_args), seg_head=tcfg.seg_head,
                     input_size=tuple(cfg.data.input_size))
    return fit(make_model, train_set, schedule=tcfg.train, spec=spec, out_dir=out or default_teacher_dir(cfg, role),
               loss_fn=teacher_loss(tcfg.seg_weight, tcfg.seg_loss), device=dev,
               evaluate_fn=lambda m: evaluator(m).record(), best_by=val_stat(keypoint_set(cfg.data.keypoints)),
               resume=resume, max_steps_per_epoch=max_steps_per_epoch,
               on_start=lambda run_dir: keep_resolved_config(cfg, run_dir))
