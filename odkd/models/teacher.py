"""Loading a configured teacher: PT or ST as its [teachers.ROLE] config describes it, an odkd model or an
ONNX or TorchScript file, checked against its pinned fingerprint and the stored crop's geometry.

The one place that turns a config into a teacher: the batch stage (odkd.teachers), `cache verify`,
`release-teacher` and the report call it. The student trainer never imports it.
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch

from odkd.config import TeacherConfig
from odkd.data.keypoints import keypoint_set, val_stat
from odkd.errors import OdkdError, not_found
from odkd.models.checkpoint import (CheckpointFile, apply_checkpoint, check_keypoint_count, checkpoint_num_joints,
                                    model_fingerprint, read_checkpoint)
from odkd.models.external import EXTERNAL_KINDS, ExternalTeacher, file_sha256, load_external_teacher
from odkd.models.registry import build_model

ROLES = {"pt": "primary", "st": "senior"}
# the roles train-teacher trains and release-teacher packs: both teachers and the students' init
TRAINED_ROLES = ("primary", "senior", "init")
# the keys that describe an ONNX or TorchScript file's input and mask (load_external_teacher's keywords)
CONTRACT_KEYS = ("input_mean", "input_std", "input_order", "mask_output")
# two crops, so a file exported with a fixed batch of one fails before the build, not in its first task
PROBE_BATCH = 2


@dataclass(frozen=True)
class TeacherSpec:
    """One teacher as the cache records it; `fingerprint` hashes its loaded tensors, or is the sha256
    of an ONNX or TorchScript file."""

    role: str  # "primary" | "senior"
    model: str  # an odkd model name, or "onnx" | "torchscript"
    model_args: dict
    seg_head: bool
    checkpoint: str
    fingerprint: str
    val_ap: float | None
    contract: dict = field(default_factory=dict)  # an external file's CONTRACT_KEYS; empty for odkd's models

    def settings(self) -> dict:
        return {"role": self.role, "model": self.model, "model_args": self.model_args,
                "seg_head": self.seg_head, "fingerprint": self.fingerprint, **self.contract}


def teacher_checkpoint(cfg, role: str) -> Path:
    """The configured checkpoint of a teacher, or the best.pth of `odkd train-teacher --role ROLE`."""
    tcfg = getattr(cfg.teachers, role)
    path = Path(tcfg.checkpoint) if tcfg.checkpoint else Path(cfg.runs) / f"teacher_{role}" / "best.pth"
    if not path.is_file():
        raise not_found(path, "teacher checkpoint", f"teachers.{role}.checkpoint")
    return Path(os.path.abspath(path))  # workers need not share the driver's working directory


def _build_teacher(model: str, model_args: dict, seg_head: bool, checkpoint: str | CheckpointFile, contract: dict,
                   device: torch.device | str = "cpu") -> torch.nn.Module | ExternalTeacher:
    """An odkd model from its checkpoint (a path, or the file already read), or an ONNX or TorchScript
    file behind the same interface, on `device`."""
    if model in EXTERNAL_KINDS:
        return load_external_teacher(model, checkpoint, device, **contract)
    if not isinstance(checkpoint, CheckpointFile):
        checkpoint = read_checkpoint(checkpoint)
    net = build_model(model, checkpoint_num_joints(checkpoint), seg_head=seg_head, **model_args)
    # a teacher must be whole: no freshly initialised seg head behind a keypoint-only file
    apply_checkpoint(net, checkpoint, allow_new_seg_head=False)
    return net.eval().to(device)


def _fingerprint(model: str, checkpoint: str, net) -> str:
    """The file's sha256 for an external teacher, whose weights odkd cannot read as tensors; else the tensors' hash."""
    return file_sha256(checkpoint) if model in EXTERNAL_KINDS else model_fingerprint(net.state_dict())


def _teacher_contract(tcfg: TeacherConfig, role: str) -> dict:
    """load_external_teacher's keywords from the config of an ONNX or TorchScript teacher; {} for odkd's models."""
    if tcfg.model not in EXTERNAL_KINDS:
        changed = [k for k in CONTRACT_KEYS if getattr(tcfg, k) != getattr(TeacherConfig(), k)]
        if changed:
            raise OdkdError(f"teachers.{role}.{changed[0]}: only for model = \"onnx\" or \"torchscript\"; "
                            f"odkd's models take its ImageNet-normalized RGB crops and give mask logits")
        return {}
    if tcfg.model_args:
        raise OdkdError(f"teachers.{role}.model_args: the {tcfg.model} file fixes its own architecture; remove them")
    if min(tcfg.input_std) <= 0:
        raise OdkdError(f"teachers.{role}.input_std: must be positive, got {list(tcfg.input_std)}")
    return {"input_mean": list(tcfg.input_mean), "input_std": list(tcfg.input_std), "input_order": tcfg.input_order,
            "mask_output": tcfg.mask_output if tcfg.seg_head else None}


def _check_outputs(net, role: str, path: Path, input_size, map_size, with_mask: bool, num_joints: int) -> None:
    """One forward of zeros: the heatmaps (and mask) must have the cache geometry's shapes."""
    batch = torch.zeros(PROBE_BATCH, 3, input_size[1], input_size[0])
    try:
        with torch.inference_mode():
            out = net(batch)
    except OdkdError as exc:
        raise OdkdError(f"teachers.{role}: {exc}") from None
    wanted = {"heatmaps": (PROBE_BATCH, num_joints, map_size[1], map_size[0])}
    got = {"heatmaps": tuple(out.heatmaps.shape)}
    if with_mask:
        wanted["mask"], got["mask"] = (PROBE_BATCH, 1, map_size[1], map_size[0]), tuple(out.mask_logits.shape)
    for name, shape in wanted.items():
        if got[name] != shape:
            raise OdkdError(f"teachers.{role}: {path} gives {name} of shape {got[name]} for input "
                            f"{tuple(batch.shape)}; the cache needs {shape}")


@dataclass(frozen=True)
class ConfiguredTeacher:
    path: Path
    net: torch.nn.Module | ExternalTeacher
    fingerprint: str
    contract: dict
    checkpoint: CheckpointFile | None  # the file as read, with its meta and extra; None for an external teacher


def load_configured_teacher(cfg, role: str) -> ConfiguredTeacher:
    """The [teachers.ROLE] file on the CPU as its config describes it (model, seg head, an external
    file's contract), refused unless it has the [teachers.ROLE] fingerprint when one is set."""
    tcfg = getattr(cfg.teachers, role)
    path = teacher_checkpoint(cfg, role)
    contract = _teacher_contract(tcfg, role)
    checkpoint = None if tcfg.model in EXTERNAL_KINDS else read_checkpoint(path)
    if checkpoint is not None:  # an official or mmpose file records no set: K is its final layer's
        try:
            check_keypoint_count(path, checkpoint_num_joints(checkpoint), keypoint_set(cfg.data.keypoints))
        except OdkdError as exc:
            raise OdkdError(f"teachers.{role}.checkpoint: {exc}") from None
    net = _build_teacher(tcfg.model, dict(tcfg.model_args), tcfg.seg_head, checkpoint or str(path), contract)
    fingerprint = _fingerprint(tcfg.model, str(path), net)
    if tcfg.fingerprint and fingerprint != tcfg.fingerprint:
        raise OdkdError(f"teachers.{role}.fingerprint: {path} has weights {fingerprint}, "
                        f"the config expects {tcfg.fingerprint}")
    return ConfiguredTeacher(path, net, fingerprint, contract, checkpoint)


def resolve_teachers(cfg, input_size, map_size) -> dict[str, TeacherSpec]:
    """Load both teachers once on the CPU, check they fit their models and the cache geometry, and
    describe them. Every problem is an OdkdError raised here, before any work starts."""
    specs = {}
    kset = keypoint_set(cfg.data.keypoints)
    by_ap = val_stat(kset) == "AP"  # a set without OKS sigmas keeps its teachers' best by PCK, which is no val AP
    for key, role in ROLES.items():
        tcfg = getattr(cfg.teachers, role)
        if key == "st" and not tcfg.seg_head:
            raise OdkdError("teachers.senior.seg_head must be true: the cache stores the senior teacher's mask")
        teacher = load_configured_teacher(cfg, role)
        path = teacher.path
        _check_outputs(teacher.net, role, path, input_size, map_size, with_mask=key == "st",
                       num_joints=kset.num_keypoints)
        best_ap = teacher.checkpoint.extra.get("best_ap") if teacher.checkpoint is not None and by_ap else None
        specs[key] = TeacherSpec(
            role=role, model=tcfg.model, model_args=dict(tcfg.model_args), seg_head=tcfg.seg_head,
            checkpoint=str(path), fingerprint=teacher.fingerprint,
            val_ap=float(best_ap) if isinstance(best_ap, (int, float)) and best_ap >= 0 else None,
            contract=teacher.contract,
        )
    return specs


_LOADED: dict[tuple[str, str, str], torch.nn.Module | ExternalTeacher] = {}
_LOADED_LOCK = threading.Lock()


def loaded_teacher(spec: TeacherSpec, device: torch.device) -> torch.nn.Module | ExternalTeacher:
    """The teacher on `device`, loaded once per process (a dask worker keeps it for all its tasks)."""
    # one file may serve as PT and as ST under another contract (with or without its mask)
    key = (spec.fingerprint, json.dumps(spec.contract, sort_keys=True), str(device))
    with _LOADED_LOCK:
        if key not in _LOADED:
            net = _build_teacher(spec.model, spec.model_args, spec.seg_head, spec.checkpoint, spec.contract, device)
            found = _fingerprint(spec.model, spec.checkpoint, net)
            if found != spec.fingerprint:
                raise OdkdError(f"{spec.checkpoint}: changed during the build (fingerprint {found}, "
                                f"expected {spec.fingerprint})")
            _LOADED[key] = net
        return _LOADED[key]
