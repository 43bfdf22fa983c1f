"""Reading and writing model checkpoints: official HRNet .pth, mmpose and odkd files.

Every file is read with ``torch.load(weights_only=True)``: nothing is ever unpickled beyond tensors,
containers and plain numbers. The three formats:

official  a flat state_dict (``conv1.weight`` ...), possibly with DataParallel's ``module.`` prefix or
          wrapped as ``{"state_dict": ...}`` (the official code's checkpoint.pth)
mmpose    ``{"state_dict": {"backbone.conv1.weight", ..., "head.final_layer.weight"}, "meta": ...}``;
          mmpose's HRNet names its layers as the official code does (mmcv names BN layers ``bn1``...),
          so dropping ``backbone.`` and ``head.`` (0.x: ``keypoint_head.``) gives the official keys
odkd      ``{"format": "odkd", "model": state_dict, "meta": {"model", "model_args", "num_joints",
          "seg_head", "fingerprint", ...}, ...training state}``, enough to rebuild the model

and, to initialise a model before training only, the ImageNet classification files of
odkd.models.pretrained (``torchvision-imagenet``, ``timm-imagenet``): backbone keys, no pose head.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from odkd import __version__
from odkd.data.keypoints import KeypointSet
from odkd.errors import OdkdError, not_found
from odkd.models.pretrained import IMAGENET_FORMATS, POSE_HEAD_PREFIXES, read_imagenet
from odkd.models.registry import build_model

ODKD_FORMAT = "odkd"
_ODKD_RESERVED = ("format", "model", "meta")
_MMPOSE_PREFIXES = ("backbone.", "head.", "keypoint_head.")
_NEW_HEAD_PREFIX = "seg_head."

# mmengine stores the dataset metainfo (numpy arrays and scalars) in a checkpoint's meta. These
# globals rebuild plain numeric arrays only. numpy 2 moved them from numpy.core to numpy._core;
# files name whichever wrote them, so both names are allowed.
_np_reconstruct = np.zeros(1).__reduce__()[0]
_np_scalar = np.float64(0).__reduce__()[0]
_NUMPY_SAFE_GLOBALS = [
    np.ndarray,
    np.dtype,
    *(type(np.dtype(code)) for code in "?bBhHiIlLqQefdgFDGSU"),
    *(
        (fn, f"{package}.multiarray.{fn.__name__}")
        for fn in (_np_reconstruct, _np_scalar)
        for package in ("numpy.core", "numpy._core")
    ),
]


@dataclass(frozen=True)
class CheckpointFile:
    """A checkpoint as read: its format, the state_dict under odkd/official key names, and the rest."""

    path: str
    format: str  # "official" | "mmpose" | "odkd" | a name of pretrained.IMAGENET_FORMATS
    state_dict: dict[str, torch.Tensor]
    meta: dict = field(default_factory=dict)  # odkd meta; empty for the other formats
    extra: dict = field(default_factory=dict)  # everything else at the top level of an odkd file
    dropped_keys: list[str] = field(default_factory=list)  # an ImageNet file's classification-only keys


def checkpoint_num_joints(ckpt: CheckpointFile) -> int:
    """The keypoints a checkpoint's model outputs: what an odkd file records, else the output channels of its
    final layer (official HRNet and mmpose files record no keypoint set), else COCO's 17."""
    if "num_joints" in ckpt.meta:
        return int(ckpt.meta["num_joints"])
    weight = ckpt.state_dict.get("final_layer.weight")
    return int(weight.shape[0]) if weight is not None else 17


def check_keypoint_count(path: str | os.PathLike, num_joints: int, keypoints: KeypointSet) -> None:
    """A model of another keypoint set than the pipeline's is one line naming its file, before any work."""
    if num_joints != keypoints.num_keypoints:
        raise OdkdError(f"{path}: its final layer outputs {num_joints} keypoints, but [data] keypoints "
                        f"{keypoints.name!r} has {keypoints.num_keypoints}")


@dataclass(frozen=True)
class LoadReport:
    """What load_checkpoint did: the file's format, the model keys it filled, those it left freshly
    initialised, and the file keys it did not use."""

    path: str
    format: str
    new_keys: list[str]
    meta: dict = field(default_factory=dict)
    loaded_keys: list[str] = field(default_factory=list)
    dropped_keys: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """One line for a trainer's log, e.g. ``hrnet_w18.bin (timm-imagenet checkpoint): 1,752 keys loaded
        into conv1, ..., stage4; 204 classification-only keys dropped; newly initialized: final_layer``."""
        line = f"{self.path} ({self.format} checkpoint): {len(self.loaded_keys):,} keys loaded into " \
               f"{_top_level_names(self.loaded_keys)}"
        if self.dropped_keys:
            line += f"; {len(self.dropped_keys):,} classification-only keys dropped"
        if self.new_keys:
            line += f"; newly initialized: {_top_level_names(self.new_keys)}"
        return line


def _top_level_names(keys: list[str]) -> str:
    return ", ".join(dict.fromkeys(k.split(".")[0] for k in keys))


TORCHSCRIPT_TEACHER_HINT = 'it runs as a teacher: [teachers.ROLE] model = "torchscript", checkpoint = that file'
ONNX_TEACHER_HINT = 'it runs as a teacher: [teachers.ROLE] model = "onnx", checkpoint = that file'


def _is_torchscript_archive(path: Path) -> bool:
    """A torch.jit.save file: a zip whose one top folder holds constants.pkl (torch's own test)."""
    if not zipfile.is_zipfile(path):
        return False
    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.count("/") == 1 and name.endswith("/constants.pkl") for name in archive.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def _refuse_exported_model(path: Path) -> None:
    """A TorchScript or ONNX file (what `odkd export` writes) holds a program, not weights to load into a
    model: one line saying what it is and which key takes it, before torch.load warns and advises
    weights_only=False."""
    if _is_torchscript_archive(path):
        raise OdkdError(f"{path}: a TorchScript archive (e.g. from odkd export), not a checkpoint of weights; "
                        f"{TORCHSCRIPT_TEACHER_HINT} (docs/commands.md, Teachers from other frameworks)")
    if path.suffix.lower() == ".onnx":
        raise OdkdError(f"{path}: an ONNX file (e.g. from odkd export), not a checkpoint of weights; "
                        f"{ONNX_TEACHER_HINT} (docs/commands.md, Teachers from other frameworks)")


def _torch_load(path: Path):
    if not path.is_file():
        raise not_found(path, "checkpoint file")
    _refuse_exported_model(path)
    try:
        with torch.serialization.safe_globals(_NUMPY_SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        reason = str(e).split("WeightsUnpickler error:")[-1].strip().splitlines()[0].split(". Please")[0]
        if "global" in reason.lower() or "can only build" in reason.lower():
            raise OdkdError(f"{path}: not a weights-only checkpoint, refusing to unpickle it ({reason})") from None
        raise OdkdError(f"{path}: cannot read checkpoint: not a torch.save file or corrupt ({reason})") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise OdkdError(f"{path}: cannot read checkpoint: {first_line}") from None


def _strip_prefix(state_dict: dict, prefix: str) -> dict:
    if state_dict and all(k.startswith(prefix) for k in state_dict):
        return {k[len(prefix) :]: v for k, v in state_dict.items()}
    return state_dict


def _from_mmpose(state_dict: dict) -> dict:
    return {key.split(".", 1)[1]: value for key, value in state_dict.items()}


def read_checkpoint(path: str | os.PathLike) -> CheckpointFile:
    """Read any supported checkpoint and bring its keys to the odkd/official names."""
    path = Path(path)
    obj = _torch_load(path)
    if not isinstance(obj, dict):
        raise OdkdError(f"{path}: not a checkpoint: holds a {type(obj).__name__}, not a dict of tensors")
    meta: dict = {}
    extra: dict = {}
    dropped: list[str] = []
    if obj.get("format") == ODKD_FORMAT:
        fmt, state_dict = ODKD_FORMAT, obj.get("model")
        meta = obj.get("meta", {})
        extra = {k: v for k, v in obj.items() if k not in _ODKD_RESERVED}
    else:
        state_dict = obj["state_dict"] if isinstance(obj.get("state_dict"), dict) else obj
        state_dict = _strip_prefix(state_dict, "module.")
        # a plain state_dict may have its own "backbone." (our students do); mmpose puts everything
        # under backbone/head
        mmpose = any(k.startswith("backbone.") for k in state_dict) and all(
            k.startswith(_MMPOSE_PREFIXES) for k in state_dict
        )
        fmt = "mmpose" if mmpose else "official"
        if mmpose:
            state_dict = _from_mmpose(state_dict)
        elif imagenet := read_imagenet(state_dict):
            fmt, backbone = imagenet
            state_dict, dropped = backbone.state_dict, backbone.dropped_keys
    if not isinstance(state_dict, dict) or not state_dict:
        raise OdkdError(f"{path}: no state_dict found ({fmt} checkpoint without model weights)")
    for key, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            raise OdkdError(f"{path}: not a state_dict: key {key!r} holds a {type(value).__name__}, not a tensor")
    return CheckpointFile(str(path), fmt, state_dict, meta, extra, dropped)


def _list_keys(keys: list[str], limit: int = 5) -> str:
    shown = ", ".join(keys[:limit])
    return f"{shown}, ... ({len(keys)} in all)" if len(keys) > limit else shown


def apply_checkpoint(model: nn.Module, ckpt: CheckpointFile, *, allow_new_seg_head: bool = True) -> LoadReport:
    """Copy a read checkpoint into model after checking that every key and shape fits."""
    expected = model.state_dict()
    given = ckpt.state_dict
    new_keys = []
    if ckpt.format in IMAGENET_FORMATS:
        if not allow_new_seg_head:
            raise OdkdError(f"{ckpt.path}: a {ckpt.format} checkpoint is an ImageNet backbone without a pose "
                            "head; it can only initialise a model for training (init, --init)")
        new_keys = [k for k in expected if k.startswith(POSE_HEAD_PREFIXES) and k not in given]
    elif allow_new_seg_head:
        new_keys = [k for k in expected if k.startswith(_NEW_HEAD_PREFIX) and k not in given]
    # BatchNorm's counter is absent from files written before torch 0.4.1 and never read in eval.
    missing = [
        k for k in expected if k not in given and k not in new_keys and not k.endswith(".num_batches_tracked")
    ]
    unexpected = [k for k in given if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys: {_list_keys(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_list_keys(unexpected)}")
        raise OdkdError(f"{ckpt.path}: {ckpt.format} checkpoint does not fit the model; {'; '.join(parts)}")
    for key, value in given.items():
        if value.shape == expected[key].shape:
            continue
        if key.startswith("final_layer.") and value.shape[1:] == expected[key].shape[1:]:
            raise OdkdError(f"{ckpt.path}: its final layer outputs {value.shape[0]} keypoints, the model "
                            f"{expected[key].shape[0]} (a file of another keypoint set than [data] keypoints?)")
        raise OdkdError(
            f"{ckpt.path}: key {key!r} has shape {tuple(value.shape)} in the checkpoint "
            f"but {tuple(expected[key].shape)} in the model (another architecture or width?)"
        )
    model.load_state_dict(given, strict=False)
    return LoadReport(ckpt.path, ckpt.format, new_keys, ckpt.meta, list(given), ckpt.dropped_keys)


def load_checkpoint(model: nn.Module, path: str | os.PathLike, *, allow_new_seg_head: bool = True) -> LoadReport:
    """Load an official, mmpose or odkd checkpoint into model, or, to initialise it for training, an
    ImageNet backbone file.

    Keys and shapes must match exactly. allow_new_seg_head says the model is about to be trained:
    then a seg head the file lacks stays initialised, and an ImageNet file fills the backbone while
    the whole pose head stays initialised; those keys are listed in ``LoadReport.new_keys``.
    """
    return apply_checkpoint(model, read_checkpoint(path), allow_new_seg_head=allow_new_seg_head)


def model_fingerprint(state_dict: dict[str, torch.Tensor]) -> str:
    """sha256 (first 16 hex digits) over the sorted key names, dtypes, shapes and tensor bytes."""
    digest = hashlib.sha256()
    for key in sorted(state_dict):
        tensor = state_dict[key].detach().cpu().contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def save_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    *,
    model_name: str,
    model_args: dict,
    seg_head: bool,
    extra: dict | None = None,
    input_size: tuple[int, int] | None = None,
) -> None:
    """Write an odkd checkpoint that build_from_checkpoint can rebuild the model from.

    `input_size` (width, height) is the crop the model was trained on, recorded for export.
    extra (e.g. optimizer state, epoch) is stored at the top level. The file is written to a
    temporary name and renamed, so an interrupted save never leaves a truncated checkpoint.
    """
    if seg_head != model.has_seg_head:
        raise ValueError(f"seg_head={seg_head} but the model has_seg_head={model.has_seg_head}")
    clashes = [k for k in (extra or {}) if k in _ODKD_RESERVED]
    if clashes:
        raise ValueError(f"extra may not use the reserved keys {clashes}")
    state_dict = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    meta = {
        "model": model_name,
        "model_args": dict(model_args),
        "num_joints": model.num_joints,
        "seg_head": seg_head,
        "fingerprint": model_fingerprint(state_dict),
        "odkd_version": __version__,
        **({"input_size": [int(v) for v in input_size]} if input_size else {}),
    }
    payload = {"format": ODKD_FORMAT, "model": state_dict, "meta": meta, **(extra or {})}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def build_from_checkpoint(path: str | os.PathLike, device: str | torch.device, model: str | None = None,
                          model_args: dict | None = None) -> tuple[nn.Module, dict]:
    """Rebuild the model a checkpoint holds, load its weights, move it to device in eval mode.

    odkd files record their model. Official HRNet and mmpose files do not: name it with `model`
    (and `model_args`), e.g. model="hrnet_w32" for pose_hrnet_w32_256x192.pth.
    """
    ckpt = read_checkpoint(path)
    if ckpt.format != ODKD_FORMAT:
        if model is None:
            raise OdkdError(
                f"{ckpt.path}: the {ckpt.format} format does not record its model; name it with --model "
                "(e.g. --model hrnet_w32)"
            )
        meta = {"model": model, "model_args": dict(model_args or {}), "num_joints": checkpoint_num_joints(ckpt),
                "seg_head": False}
    else:
        meta = ckpt.meta
        for key in ("model", "model_args", "num_joints", "seg_head"):
            if key not in meta:
                raise OdkdError(f"{ckpt.path}: odkd checkpoint meta lacks {key!r}")
    try:
        net = build_model(meta["model"], meta["num_joints"], meta["seg_head"], **meta["model_args"])
    except OdkdError as e:
        raise OdkdError(f"{ckpt.path}: {e}") from None
    apply_checkpoint(net, ckpt, allow_new_seg_head=False)
    return net.to(device).eval(), meta
