"""Released teachers: a trained teacher packed as float16 weights with what it was trained on and
scores, and the check that a released file is the expected one, trained on the data at hand.

A released file is an ordinary odkd checkpoint (weights and meta only), so every command loads it
like any other. Its meta adds ``release``: the train split's dataset fingerprint and description,
and the val stats of the packed weights themselves. Its ``fingerprint`` is that of the weights as
loaded (float32), the one a teacher store records.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from odkd.config import resolve_device, teacher_data
from odkd.data.instances import load_instances
from odkd.data.keypoints import keypoint_set, val_stat
from odkd.errors import OdkdError
from odkd.eval.evaluate import evaluate_model
from odkd.models import build_model
from odkd.models.checkpoint import ODKD_FORMAT, apply_checkpoint, model_fingerprint, read_checkpoint
from odkd.models.registry import EXTERNAL_KINDS
from odkd.models.teacher import TRAINED_ROLES, load_configured_teacher


@dataclass(frozen=True)
class TeacherCheck:
    role: str
    path: str
    model: str
    fingerprint: str
    data_fingerprint: str | None  # the train split the file says it was trained on; None: not recorded
    val_ap: float | None

    def line(self) -> str:
        trained_on = self.data_fingerprint or "not recorded"
        ap = "unknown" if self.val_ap is None else f"{self.val_ap:.3f}"
        return (f"{self.role}: {self.path} ({self.model}), fingerprint {self.fingerprint}, "
                f"trained on {trained_on}, val AP {ap}")


def _half_weights(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.half() if v.is_floating_point() else v for k, v in state_dict.items()}


def _loaded_fingerprint(net: torch.nn.Module) -> str:
    # the weights as a model holds them after loading (float32), which is what a teacher store records
    return model_fingerprint({k: v.detach().cpu() for k, v in net.state_dict().items()})


def release_teacher(cfg, role: str, source: str | os.PathLike, *, device: str | None = None) -> dict:
    """Pack `source` (a train-teacher checkpoint) as float16 weights into the role's configured
    checkpoint path, score the packed weights on val, and record the train data; returns the file's
    meta. Nothing is left behind if any step fails."""
    if role not in TRAINED_ROLES:
        raise OdkdError(f"--role must be one of {', '.join(TRAINED_ROLES)}, got {role!r}")
    tcfg = getattr(cfg.teachers, role)
    if not tcfg.checkpoint:
        raise OdkdError(f"teachers.{role}.checkpoint: say where the released file goes")
    if tcfg.model in EXTERNAL_KINDS:
        raise OdkdError(f"teachers.{role}.model is {tcfg.model!r}: release packs odkd's own models")
    src = read_checkpoint(source)
    if src.format != ODKD_FORMAT:
        raise OdkdError(f"{source}: a checkpoint in the {src.format} format; release packs odkd's own "
                        f"train-teacher files")
    dst = Path(tcfg.checkpoint)
    if dst.resolve() == Path(source).resolve():
        raise OdkdError(f"{dst}: the release would overwrite its own source")

    # the packed weights, loaded into the model the config describes (any other odkd model is refused
    # here), are exactly what the released file will load as: score them before anything is written
    half = _half_weights(src.state_dict)
    net = build_model(tcfg.model, keypoint_set(cfg.data.keypoints).num_keypoints,
                      seg_head=tcfg.seg_head, **tcfg.model_args)
    apply_checkpoint(net, replace(src, state_dict=half), allow_new_seg_head=False)
    dev = resolve_device(device or cfg.device)
    data = teacher_data(cfg, role)
    train, val = load_instances(data, "train"), load_instances(data, "val")
    report = evaluate_model(net.to(dev).eval(), val, data, cfg.eval, val.coco, device=dev)
    # best_ap holds the stat train-teacher keeps best.pth by: AP, or PCK for a set without OKS sigmas
    best = report.stats[val_stat(keypoint_set(cfg.data.keypoints))]
    payload = {"format": ODKD_FORMAT, "model": half, "best_ap": best,
               "meta": {**src.meta, "fingerprint": _loaded_fingerprint(net),
                        "release": _release_record(cfg, data, source, src.meta, train, report)}}
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".tmp")
    try:
        torch.save(payload, tmp)
        os.replace(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return payload["meta"]


def _release_record(cfg, data, source, source_meta: dict, train, report) -> dict:
    return {
        "source": str(source),
        "source_fingerprint": source_meta.get("fingerprint"),
        "train_data": {
            "dataset_fingerprint": train.fingerprint,
            "annotations": str(data.ann_file("train")),
            "description": train.coco.dataset.get("info", {}),
            "instances": len(train.instances),
        },
        "val_stats": report.record(),
        "eval": {"flip_test": cfg.eval.flip_test, "decode": cfg.eval.decode, "boxes": "gt"},
    }


def check_teacher(cfg, role: str) -> TeacherCheck:
    """The role's teacher file against the config's expected fingerprint and, when the file records the
    data it was trained on, against the dataset fingerprint of the train split it names (teacher_data)."""
    teacher = load_configured_teacher(cfg, role)
    path, fingerprint = teacher.path, teacher.fingerprint
    meta = {} if teacher.checkpoint is None else teacher.checkpoint.meta
    release = meta.get("release", {})
    trained_on = release.get("train_data", {}).get("dataset_fingerprint")
    if trained_on:
        data = teacher_data(cfg, role)
        here = load_instances(data, "train").fingerprint
        if here != trained_on:
            raise OdkdError(f"{data.ann_file('train')}: dataset fingerprint {here}, but teachers.{role} "
                            f"({path}) was trained on {trained_on}; regenerate the data it names")
    val_ap = release.get("val_stats", {}).get("AP")
    return TeacherCheck(role=role, path=str(path), model=getattr(cfg.teachers, role).model,
                        fingerprint=fingerprint, data_fingerprint=trained_on, val_ap=val_ap)
