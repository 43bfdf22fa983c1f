"""Pipeline TOML -> frozen dataclasses.

Every section is a dataclass whose fields are the allowed keys. Unknown keys, wrong types and
missing files are an OdkdError that names the file and the dotted key. Relative paths are
resolved against the working directory, the way mmpose and the HRNet code treat theirs.
"""

from __future__ import annotations

import dataclasses
import sys
import typing
from dataclasses import dataclass, field, replace
from pathlib import Path

from odkd.errors import OdkdError, not_found

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

DEMO_CONFIG = Path(__file__).resolve().parent / "pipelines" / "demo.toml"


@dataclass(frozen=True)
class AugmentConfig:
    scale_factor: float = 0.35
    rotation_factor: float = 45.0
    rotation_prob: float = 0.6
    flip_prob: float = 0.5
    half_body_prob: float = 0.3
    half_body_min_joints: int = 8


@dataclass(frozen=True)
class DataConfig:
    root: str = "data/demo"
    train_ann: str = "annotations/person_keypoints_train.json"
    val_ann: str = "annotations/person_keypoints_val.json"
    test_ann: str = "annotations/person_keypoints_test.json"
    train_images: str = "images/train"
    val_images: str = "images/val"
    test_images: str = "images/test"
    # (width, height), the order of HRNet's IMAGE_SIZE and mmpose's input_size
    input_size: tuple[int, int] = (192, 256)
    heatmap_size: tuple[int, int] = (48, 64)
    sigma: float = 2.0
    strict: bool = False
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def ann_file(self, split: str) -> Path:
        return Path(self.root) / _of_split(split, self.train_ann, self.val_ann, self.test_ann)

    def image_dir(self, split: str) -> Path:
        return Path(self.root) / _of_split(split, self.train_images, self.val_images, self.test_images)


DATA_SPLITS = ("train", "val", "test")


def _of_split(split: str, *per_split: str) -> str:
    """The entry of `split` among one path per DATA_SPLITS."""
    if split not in DATA_SPLITS:
        raise OdkdError(f"data split {split!r}: expected one of {', '.join(DATA_SPLITS)}")
    return per_split[DATA_SPLITS.index(split)]


@dataclass(frozen=True)
class ScheduleConfig:
    epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.0
    schedule: str = "step"  # "step" | "cosine"
    lr_steps: tuple[int, ...] = (170, 200)
    lr_factor: float = 0.1
    warmup_epochs: float = 0.0
    eval_every: int = 1
    workers: int = 2
    seed: int = 0
    amp: bool = True
    clip_grad: float = 0.0  # max L2 norm of all gradients together (mmpose's clip_grad max_norm); 0: off
    accumulate: int = 1  # batches per optimizer step; the lr schedule counts optimizer steps
    # autocast's type under amp on CUDA; fp16 by default, as a T4 or V100 has no bf16
    amp_dtype: str = "fp16"  # "fp16" | "bf16"
    ema: bool = False  # evaluate and keep as best.pth an EMA of the weights (mmdet's ExpMomentumEMA, as RTMPose)
    ema_momentum: float = 0.0002
    compile: bool = False  # torch.compile the model for training


@dataclass(frozen=True)
class TeacherConfig:
    model: str = "hrnet_w32"
    model_args: dict = field(default_factory=dict)
    init: str = ""
    seg_head: bool = False
    # JointsMSELoss is ~1e-3, BCE + dice ~0.5: 0.002 keeps the mask term at the keypoints' scale
    seg_weight: float = 0.002
    seg_loss: str = "bce+dice"  # "bce" | "bce+dice"; dice copes with masks that fill a small part of the crop
    checkpoint: str = ""
    # The dataset this teacher is trained on, laid out as [data] says; empty: [data].root. Another
    # root is how released teachers work: trained on one dataset, cached over the student's.
    data_root: str = ""
    # The weights' fingerprint (an ONNX/TorchScript file's sha256): commands that load this teacher
    # refuse any other file. Empty: any file.
    fingerprint: str = ""
    # For model = "onnx" | "torchscript" (checkpoint names the file): the normalization the file
    # expects, RGB order and 0..1 units (ImageNet's, like odkd's crops, by default), the channel
    # order it takes, and what its second output (the mask) holds. odkd's own models take the defaults.
    input_mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    input_std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    input_order: str = "rgb"  # "rgb" | "bgr"
    mask_output: str = "logits"  # "logits" | "probabilities"
    train: ScheduleConfig = field(default_factory=ScheduleConfig)


@dataclass(frozen=True)
class TeachersConfig:
    primary: TeacherConfig = field(default_factory=TeacherConfig)
    senior: TeacherConfig = field(
        default_factory=lambda: TeacherConfig(model="hrnet_w48", seg_head=True)
    )


@dataclass(frozen=True)
class StageConfig:
    """One stage of the student's schedule: which teacher it learns from, and how much of each loss."""

    name: str = ""
    epochs: int = 0
    teacher: str = "primary"  # "primary" | "senior" | "both" | "none"
    gt_weight: float = 1.0  # JointsMSE against the Gaussian GT heatmaps
    kd_weight: float = 1.0  # JointsMSE against the warped teacher heatmaps
    seg_weight: float = 0.0  # BCE (+dice) of the aux head against ST's stored mask
    conf_floor: float = 0.0  # a teacher keypoint whose stored peak is below this teaches nothing
    targets: str = "binary"  # "binary": the stored 0/1 maps; "soft": the raw maps (needs [cache] store_soft)
    mask_gate: bool = False  # keep ST's keypoint responses inside its mask grown by mask_gate_dilation
    mask_gate_dilation: int = 3


def _method_stages() -> tuple[StageConfig, ...]:
    return (StageConfig(name="primary", epochs=20, teacher="primary"),
            StageConfig(name="senior", epochs=20, teacher="senior", seg_weight=0.002))


@dataclass(frozen=True)
class StudentConfig:
    model: str = "mobilenetv2_tiny"
    model_args: dict = field(default_factory=dict)
    seg_head: bool = True  # auxiliary head that learns ST's mask; dropped at export
    seg_loss: str = "bce+dice"
    cache: str = "cache/demo.zarr"  # path or fsspec URL of the teacher store
    init: str = ""
    # "run": one learning-rate curve over all stages, the same curve as the GT-only baseline's;
    # "stage": the schedule restarts (warmup included) at every stage
    lr_span: str = "run"
    # a warp scales the stored blobs with the zoom; a teacher run on the zoomed crop keeps its trained
    # blob width: true moves the binary edges back to that width (see bench/fidelity.py)
    keep_blob_size: bool = True
    # which model best.pth is: "last_stage", the best by val AP among the last stage's epochs (the
    # product of the whole schedule, which evaluate and export take as the student); "run": of all epochs
    best: str = "last_stage"
    train: ScheduleConfig = field(default_factory=ScheduleConfig)
    stages: tuple[StageConfig, ...] = field(default_factory=_method_stages)

    @property
    def epochs(self) -> int:
        return sum(stage.epochs for stage in self.stages)


@dataclass(frozen=True)
class EvalConfig:
    flip_test: bool = True
    shift_heatmap: bool = True
    oks_nms_thr: float = 0.9
    det_score_thr: float = 0.0
    in_vis_thr: float = 0.2
    batch_size: int = 64
    decode: str = "dark"  # "dark" | "argmax" | "centroid": heatmap -> keypoint, see odkd/data/decode.py


@dataclass(frozen=True)
class CacheConfig:
    store: str = "cache/demo.zarr"
    threshold: float = 0.5
    threshold_mode: str = "absolute"  # "absolute" | "relative"
    mask_threshold: float = 0.5
    mask_gate: bool = False
    mask_gate_dilation: int = 3
    margin: float = 1.0
    store_soft: bool = False  # also keep the raw maps (float16) for soft-target ablations
    flip_test: bool = True
    chunk_instances: int = 64
    shard_instances: int = 1024
    batch_size: int = 64
    workers: int = 1
    # the teachers' arithmetic, recorded in the store: tf32 is fp32 on a CPU and 2.5x fp32 on a GPU, bf16 another
    # 1.6x but it moves more bits and argmaxes (README, "Precision")
    precision: str = "tf32"  # "fp32" | "tf32" | "bf16"
    decode_threads: int = 0  # JPEG decode + crop threads per worker; 0: 4 on a GPU worker, 1 on a CPU one


@dataclass(frozen=True)
class PipelineConfig:
    data: DataConfig = field(default_factory=DataConfig)
    teachers: TeachersConfig = field(default_factory=TeachersConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    device: str = "auto"  # "auto" | "cpu" | "cuda" | "cuda:N"
    runs: str = "runs"
    source: str = ""  # the file this config was read from; set by load_config
    raw: dict = field(default_factory=dict)  # the TOML as read, recorded as provenance


def teacher_data(cfg: PipelineConfig, role: str) -> DataConfig:
    """The [data] section the role's teacher is trained and released on."""
    root = getattr(cfg.teachers, role).data_root
    return replace(cfg.data, root=root) if root else cfg.data


_CHOICES = {
    "schedule": ("step", "cosine"),
    "seg_loss": ("bce", "bce+dice"),
    "threshold_mode": ("absolute", "relative"),
    "precision": ("fp32", "tf32", "bf16"),
    "teacher": ("primary", "senior", "both", "none"),
    "targets": ("binary", "soft"),
    "lr_span": ("run", "stage"),
    "decode": ("argmax", "centroid", "dark"),
    "input_order": ("rgb", "bgr"),
    "mask_output": ("logits", "probabilities"),
    "amp_dtype": ("fp16", "bf16"),
    "best": ("last_stage", "run"),
}


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value, tp, where: str):
    """Check one TOML value against a field's annotation; return it in the field's type."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise OdkdError(f"{where}: expected a table, got {type(value).__name__}")
        return _build(tp, value, where)
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, list):
            raise OdkdError(f"{where}: expected an array, got {type(value).__name__}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise OdkdError(f"{where}: expected {len(args)} values, got {len(value)}")
        return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise OdkdError(f"{where}: expected a table, got {type(value).__name__}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise OdkdError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise OdkdError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise OdkdError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise OdkdError(f"{where}: expected a string, got {value!r}")
        return value
    raise OdkdError(f"{where}: unsupported type {_type_name(tp)}")  # pragma: no cover


def _build(cls, table: dict, where: str):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.name not in ("source", "raw")}
    kwargs = {}
    for key, value in table.items():
        dotted = f"{where}.{key}" if where else key
        if key not in names:
            raise OdkdError(f"unknown key '{dotted}' (allowed: {', '.join(sorted(names))})")
        value = _coerce(value, hints[key], dotted)
        if key in _CHOICES and value not in _CHOICES[key]:
            raise OdkdError(f"{dotted}: must be one of {', '.join(_CHOICES[key])}, got {value!r}")
        kwargs[key] = value
    return cls(**kwargs)


def _check_sizes(cfg: PipelineConfig, path: str) -> None:
    for key, size in (("input_size", cfg.data.input_size), ("heatmap_size", cfg.data.heatmap_size)):
        if min(size) <= 0:
            raise OdkdError(f"{path}: data.{key} must be positive, got {list(size)}")
    iw, ih = cfg.data.input_size
    if iw % 32 or ih % 32:
        raise OdkdError(f"{path}: data.input_size {list(cfg.data.input_size)} must be multiples of 32 "
                        f"(the networks go down to stride 32 and back)")
    hw, hh = cfg.data.heatmap_size
    if iw * hh != ih * hw:
        raise OdkdError(f"{path}: data.heatmap_size {list(cfg.data.heatmap_size)} must have the "
                        f"aspect of data.input_size {list(cfg.data.input_size)}")


def _check_student(cfg: PipelineConfig, path: str) -> None:
    student = cfg.student
    if not student.stages:
        raise OdkdError(f"{path}: student.stages: give at least one [[student.stages]]")
    names = [stage.name for stage in student.stages]
    for i, stage in enumerate(student.stages):
        where = f"student.stages[{i}]"
        if not stage.name:
            raise OdkdError(f"{path}: {where}.name: every stage needs a name")
        if names.count(stage.name) > 1:
            raise OdkdError(f"{path}: {where}.name: {stage.name!r} names two stages")
        if stage.epochs < 0:
            raise OdkdError(f"{path}: {where}.epochs must be >= 0, got {stage.epochs}")
        for key in ("gt_weight", "kd_weight", "seg_weight"):
            if getattr(stage, key) < 0:
                raise OdkdError(f"{path}: {where}.{key} must be >= 0, got {getattr(stage, key)}")
        if stage.seg_weight > 0 and not student.seg_head:
            raise OdkdError(f"{path}: {where}.seg_weight is {stage.seg_weight} but student.seg_head is false")
    if student.epochs <= 0:
        raise OdkdError(f"{path}: student.stages: the stages' epochs sum to {student.epochs}; "
                        f"the run needs a positive number of epochs")
    given = cfg.raw.get("student", {}).get("train", {}).get("epochs")
    if given is not None and given != student.epochs:
        raise OdkdError(f"{path}: student.train.epochs is {given} but the stages' epochs sum to "
                        f"{student.epochs}; drop the key or make them agree")


def parse_config(text: str, source: str = "<string>") -> PipelineConfig:
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise OdkdError(f"{source}: not valid TOML: {exc}") from None
    try:
        cfg = _build(PipelineConfig, raw, "")
    except OdkdError as exc:
        raise OdkdError(f"{source}: {exc}") from None
    cfg = dataclasses.replace(cfg, source=source, raw=raw)
    _check_sizes(cfg, source)
    if "student" in raw:
        _check_student(cfg, source)
    return cfg


def load_config(path: str | Path | None = None) -> PipelineConfig:
    """Read a pipeline TOML; with no path, the embedded demo pipeline."""
    path = Path(path) if path is not None else DEMO_CONFIG
    if not path.is_file():
        raise not_found(path, "pipeline config")
    return parse_config(path.read_text(), str(path))


def resolve_device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise OdkdError(f"device '{name}' requested but CUDA is not available")
    return torch.device(name)


__all__ = [
    "AugmentConfig", "CacheConfig", "DataConfig", "EvalConfig", "PipelineConfig",
    "ScheduleConfig", "StageConfig", "StudentConfig", "TeacherConfig", "TeachersConfig",
    "load_config", "parse_config", "resolve_device",
]
