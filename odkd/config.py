"""Pipeline TOML -> frozen dataclasses.

Every section is a dataclass whose fields are the allowed keys, a key with choices a Literal.
Unknown keys, wrong types, values outside the choices and missing files are an OdkdError that names
the file and the key path. A file may `extends` another (relative to itself), and `--set KEY=VALUE`
changes one key; the resolved table is what is checked, kept as `raw` and written into a run's folder.
Relative paths in the keys are resolved against the working directory, the way mmpose and the HRNet
code treat theirs.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import itertools
import re
import sys
import typing
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

from odkd.data.keypoints import keypoint_set
from odkd.errors import OdkdError, not_found
from odkd.tomlwrite import as_toml_value, toml_text

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

DEMO_CONFIG = Path(__file__).resolve().parent / "pipelines" / "demo.toml"

SegLoss = Literal["bce", "bce+dice"]


@dataclass(frozen=True)
class AugmentConfig:
    scale_factor: float = 0.35
    rotation_factor: float = 45.0
    rotation_prob: float = 0.6
    flip_prob: float = 0.5
    half_body_prob: float = 0.3
    half_body_min_joints: int = 8


@dataclass(frozen=True)
class UnlabeledConfig:
    """Images nobody labelled, as person boxes from a detector: what `cache-teachers --split unlabeled` reads.

    Paths are relative to [data] root, like the splits'."""

    images: str = ""  # the images' folder, e.g. images/unlabeled2017
    image_info: str = ""  # COCO image-info JSON: images, no annotations (image_info_unlabeled2017.json)
    boxes: str = ""  # COCO detection results: [{image_id, category_id, bbox, score}]
    # HRNet's val protocol keeps every box (image_thre 0): its AP ranks by score; a pseudo-label store
    # trains on each box, and a false positive teaches "a person here"
    min_score: float = 0.5


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
    # the points the annotations label: a preset (coco, coco_wholebody, crowdpose, ap10k, hand21) or a set file
    keypoints: str = "coco"
    # the annotation categories read, by name; () for every category whose keypoints are the set's
    # (all of AP-10K's species), else those named person
    categories: tuple[str, ...] = ()
    # true: each point's GT target weight is multiplied by the set's joint_weights (mmpose's
    # use_dataset_keypoint_weights, HRNet's USE_DIFFERENT_JOINTS_WEIGHT), for teachers and students alike
    joint_weights: bool = False
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    unlabeled: UnlabeledConfig = field(default_factory=UnlabeledConfig)

    def ann_file(self, split: str) -> Path:
        """The split's COCO file; for "unlabeled", its image-info file."""
        return Path(self.root) / _of_split(split, self.train_ann, self.val_ann, self.test_ann,
                                           self.unlabeled.image_info)

    def image_dir(self, split: str) -> Path:
        return Path(self.root) / _of_split(split, self.train_images, self.val_images, self.test_images,
                                           self.unlabeled.images)


DATA_SPLITS = ("train", "val", "test")  # the labelled ones
CACHE_SPLITS = (*DATA_SPLITS, "unlabeled")


def _of_split(split: str, *per_split: str) -> str:
    """The entry of `split` among one path per CACHE_SPLITS."""
    if split not in CACHE_SPLITS:
        raise OdkdError(f"data split {split!r}: expected one of {', '.join(CACHE_SPLITS)}")
    return per_split[CACHE_SPLITS.index(split)]


@dataclass(frozen=True)
class ScheduleConfig:
    epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.0
    schedule: Literal["step", "cosine"] = "step"
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
    amp_dtype: Literal["fp16", "bf16"] = "fp16"
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
    seg_loss: SegLoss = "bce+dice"  # dice copes with masks that fill a small part of the crop
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
    input_order: Literal["rgb", "bgr"] = "rgb"
    mask_output: Literal["logits", "probabilities"] = "logits"
    train: ScheduleConfig = field(default_factory=ScheduleConfig)


@dataclass(frozen=True)
class TeachersConfig:
    primary: TeacherConfig = field(default_factory=TeacherConfig)
    senior: TeacherConfig = field(
        default_factory=lambda: TeacherConfig(model="hrnet_w48", seg_head=True)
    )
    # not a third teacher: the students' starting point, trained on the teachers' data and released by
    # the same commands (--role init) and checks; a pipeline uses it when it sets its checkpoint
    init: TeacherConfig = field(default_factory=TeacherConfig)

    def released_roles(self) -> tuple[str, ...]:
        """The roles whose files check-teachers checks: both teachers, and the init when it names a file."""
        return ("primary", "senior", "init") if self.init.checkpoint else ("primary", "senior")


@dataclass(frozen=True)
class StageConfig:
    """One stage of the student's schedule: which teacher it learns from, and how much of each loss."""

    name: str = ""
    epochs: int = 0
    teacher: Literal["primary", "senior", "both", "none"] = "primary"
    gt_weight: float = 1.0  # JointsMSE against the Gaussian GT heatmaps
    kd_weight: float = 1.0  # JointsMSE against the warped teacher heatmaps
    seg_weight: float = 0.0  # BCE (+dice) of the aux head against ST's stored mask
    conf_floor: float = 0.0  # a teacher keypoint whose stored peak is below this teaches nothing
    # what the student learns from the stored maps (odkd.distill.targets): "disc", the ODKD paper's warped
    # blob (chosen on val AP for a student with room to grow); "gaussian_conf", a Gaussian of the GT's sigma
    # at each blob's centroid peaked at the teacher's stored peak (does a trained student the least harm);
    # "gaussian", the same at peak 1; "disc_conf", the disc at the stored peak; "soft", the raw maps (needs
    # [cache] store_soft)
    targets: Literal["disc", "disc_conf", "gaussian", "gaussian_conf", "soft"] = "disc"
    # false: a teacher teaches only the joints no label gives (unlabelled images, unlabelled joints); true:
    # every joint, against the label where there is one
    kd_on_labels: bool = True
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
    seg_loss: SegLoss = "bce+dice"
    cache: str = "cache/demo.zarr"  # path or fsspec URL of the teacher store
    init: str = ""
    # "run": one learning-rate curve over all stages, the same curve as the GT-only baseline's;
    # "stage": the schedule restarts (warmup included) at every stage
    lr_span: Literal["run", "stage"] = "run"
    # a warp scales the stored blobs with the zoom; a teacher run on the zoomed crop keeps its trained
    # blob width: true moves the binary edges back to that width (see bench/fidelity.py)
    keep_blob_size: bool = True
    # which model best.pth is: "last_stage", the best by val AP among the last stage's epochs (the
    # product of the whole schedule, which evaluate and export take as the student); "run": of all epochs
    best: Literal["last_stage", "run"] = "last_stage"
    # a store of `cache-teachers --split unlabeled`: its instances train with the teachers' targets alone
    unlabeled_cache: str = ""
    # unlabelled people added to each step per labelled one (FixMatch's mu): a step holds train.batch_size
    # labelled people and round(batch_size * ratio) unlabelled ones on average, so an epoch has the steps
    # and the GT signal of a labelled-only epoch, and the teachers' targets come on top
    unlabeled_ratio: float = 1.0
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
    decode: Literal["argmax", "centroid", "dark"] = "dark"  # heatmap -> keypoint, see odkd/data/decode.py


@dataclass(frozen=True)
class CacheConfig:
    store: str = "cache/demo.zarr"
    unlabeled_store: str = "cache/unlabeled.zarr"  # where cache-teachers --split unlabeled writes
    threshold: float = 0.5
    threshold_mode: Literal["absolute", "relative"] = "absolute"
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
    precision: Literal["fp32", "tf32", "bf16"] = "tf32"
    decode_threads: int = 0  # JPEG decode + crop threads per worker; 0: 4 on a GPU worker, 1 on a CPU one
    # fsspec options of every store a URL names (s3fs: endpoint_url, client_kwargs, anon, ...); never
    # credentials: the pipeline is recorded in every store and run, so they come from AWS_* or a profile
    storage_options: dict = field(default_factory=dict)


@dataclass(frozen=True)
class PipelineConfig:
    data: DataConfig = field(default_factory=DataConfig)
    teachers: TeachersConfig = field(default_factory=TeachersConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    device: str = "auto"  # "auto" | "cpu" | "cuda" | "cuda:N" | "mps" (DEVICES)
    runs: str = "runs"
    # set by the loader, not keys of the file: the file this config was read from, the --set KEY=VALUE
    # applied to it, and its TOML resolved (extends merged, --set applied), recorded as provenance
    source: str = field(default="", metadata={"set_by_loader": True})
    overrides: tuple[str, ...] = field(default=(), metadata={"set_by_loader": True})
    raw: dict = field(default_factory=dict, metadata={"set_by_loader": True})


def teacher_data(cfg: PipelineConfig, role: str) -> DataConfig:
    """The [data] section the role's teacher is trained and released on."""
    root = getattr(cfg.teachers, role).data_root
    return replace(cfg.data, root=root) if root else cfg.data


# Why Literal-typed dataclasses and one generic checker, not pydantic v2 or msgspec: the frozen
# dataclasses stay the objects every module uses, and TOML already gives typed values. msgspec ignores
# unknown keys of a dataclass (forbid_unknown_fields is for its own Structs, which would replace the
# dataclasses); pydantic's strict mode refuses a TOML table for a dataclass and a TOML array for a
# tuple, and its lax mode takes "3" as an integer. Either way the messages would be rebuilt here to
# keep them one line with the key path, so a dependency would save nothing.
_SCALARS = {bool: (bool, "true or false"), int: (int, "an integer"), float: ((int, float), "a number"),
            str: (str, "a string")}


def choices(cls, key: str) -> tuple[str, ...]:
    """The values a key with choices takes, e.g. choices(EvalConfig, "decode")."""
    return typing.get_args(typing.get_type_hints(cls)[key])


def _keys(cls) -> list[str]:
    """The keys a section accepts: its fields, less those the loader sets."""
    return [f.name for f in dataclasses.fields(cls) if not f.metadata.get("set_by_loader")]


class _KeyProblem(OdkdError):
    """A config error about one key path (`key`), so that the loader can say where its value came from."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key


def _unknown_key(cls, dotted: str) -> OdkdError:
    return _KeyProblem(dotted, f"unknown key '{dotted}' (allowed: {', '.join(sorted(_keys(cls)))})")


def _dotted(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _expect(value, kind: type, what: str, where: str):
    if not isinstance(value, kind):
        raise _KeyProblem(where, f"{where}: expected {what}, got {type(value).__name__}")
    return value


def _checked(value, tp, where: str):
    """A TOML value as the field annotation `tp` types it, or a one-line error naming the key path."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return _section(tp, _expect(value, dict, "a table", where), where)
    if origin is Literal:
        if not isinstance(value, str) or value not in args:
            raise _KeyProblem(where, f"{where}: {value!r} is not one of {', '.join(args)}")
        return value
    if origin is tuple:
        items = _expect(value, list, "an array", where)
        types = (args[0],) * len(items) if args[-1] is Ellipsis else args
        if len(items) != len(types):
            raise _KeyProblem(where, f"{where}: expected {len(types)} values, got {len(items)}")
        return tuple(_checked(item, t, f"{where}[{i}]") for i, (item, t) in enumerate(zip(items, types)))
    if tp is dict:
        return dict(_expect(value, dict, "a table", where))
    accepted, what = _SCALARS[tp]
    if isinstance(value, bool) is not (tp is bool) or not isinstance(value, accepted):
        raise _KeyProblem(where, f"{where}: expected {what}, got {value!r}")
    return tp(value)


def _section(cls, table: dict, where: str):
    hints, keys = typing.get_type_hints(cls), _keys(cls)
    for key in table:
        if key not in keys:
            raise _unknown_key(cls, _dotted(where, key))
    return cls(**{key: _checked(value, hints[key], _dotted(where, key)) for key, value in table.items()})


def _toml(text: str, source: str) -> dict:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise OdkdError(f"{source}: not valid TOML: {exc}") from None


def _merged(base: dict, child: dict) -> dict:
    """`child` over `base`: tables merge key by key, anything else (arrays of tables too) is replaced whole."""
    merged = dict(base)
    for key, value in child.items():
        both_tables = isinstance(value, dict) and isinstance(base.get(key), dict)
        merged[key] = _merged(base[key], value) if both_tables else value
    return merged


def _extended(table: dict, chain: tuple[str, ...]) -> dict:
    """The table with its `extends` base (a path relative to the file that names it) merged under it.

    `chain` holds the files read so far, the one that holds `table` last."""
    if "extends" not in table:
        return table
    source, name = chain[-1], table["extends"]
    if not isinstance(name, str):
        raise OdkdError(f"{source}: extends: expected a path relative to this file, got {name!r}")
    base = Path(source).parent / name
    if base.resolve() in [Path(read).resolve() for read in chain]:
        raise OdkdError(f"{source}: extends {name!r} closes a cycle: {' -> '.join([*chain, str(base)])}")
    if not base.is_file():
        raise OdkdError(f"{source}: extends {name!r}, but there is no file {base.absolute()} (extends is relative "
                        f"to the file that names it, unlike every other path, which is relative to the working "
                        f"directory)")
    own = {key: value for key, value in table.items() if key != "extends"}
    return _merged(_extended(_toml(base.read_text(), str(base)), (*chain, str(base))), own)


_KEY_SEGMENT = re.compile(r"([A-Za-z0-9_-]+)((?:\[\d+\])*)")


def _key_parts(key: str) -> list[str | int]:
    """'student.stages[1].teacher' -> ['student', 'stages', 1, 'teacher']."""
    parts: list[str | int] = []
    for segment in key.split("."):
        match = _KEY_SEGMENT.fullmatch(segment)
        if not match:
            raise OdkdError(f"{key!r} is not a key path like student.train.lr or student.stages[1].seg_weight")
        parts += [match[1], *(int(index) for index in re.findall(r"\d+", match[2]))]
    return parts


def _toml_value(text: str):
    """VALUE of --set KEY=VALUE read as a TOML value; what is not one is a bare string."""
    try:
        parsed = tomllib.loads(f"value = {text}")
    except tomllib.TOMLDecodeError:
        return text
    return parsed["value"] if list(parsed) == ["value"] else text


def _field_type(tp, part: str | int, parent: str, where: str):
    """The annotation of key path `where`, one step inside `parent` whose annotation is `tp`; None inside
    a free-form table such as model_args, where any key and value go."""
    if tp is None or tp is dict:
        return None
    if isinstance(part, int):
        if typing.get_origin(tp) is not tuple:
            raise OdkdError(f"'{parent}' is not an array")
        args = typing.get_args(tp)
        return args[0] if args[-1] is Ellipsis else args[min(part, len(args) - 1)]
    if not dataclasses.is_dataclass(tp):
        raise OdkdError(f"'{parent}' is not a table")
    if part not in _keys(tp):
        raise _unknown_key(tp, where)
    return typing.get_type_hints(tp)[part]


def _set(table: dict, item: str) -> None:
    """Apply one KEY=VALUE to the TOML table in place, KEY checked against the dataclasses on the way."""
    key, equals, text = item.partition("=")
    if not equals:
        raise OdkdError("expected KEY=VALUE, e.g. --set student.train.lr=1e-3")
    parts = _key_parts(key.strip())
    node, tp, where = table, PipelineConfig, ""
    for i, part in enumerate(parts):
        parent, where = where, f"{where}[{part}]" if isinstance(part, int) else _dotted(where, part)
        tp = _field_type(tp, part, parent, where)
        if isinstance(part, int) and not (isinstance(node, list) and part < len(node)):
            raise OdkdError(f"the config has no {where}; set the whole array, e.g. --set '{parent}=[...]'")
        if isinstance(part, str) and not isinstance(node, dict):
            raise OdkdError(f"'{parent}' is not a table in the config")
        if i == len(parts) - 1:
            node[part] = _toml_value(text.strip())
        else:
            node = node.setdefault(part, {}) if isinstance(part, str) else node[part]


def _override_key(item: str) -> str:
    """The key path of one --set KEY=VALUE, written as errors write it: 'student.stages[1].teacher'."""
    key = item.partition("=")[0].strip()
    try:
        parts = _key_parts(key)
    except OdkdError:
        return key
    return "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in parts).lstrip(".")


def _related(a: str, b: str) -> bool:
    """Whether key paths `a` and `b` are one key, or one holds the other ('student' holds 'student.model')."""
    short, long = sorted((a, b), key=len)
    return long == short or long.startswith((f"{short}.", f"{short}["))


def key_origin(source: str, overrides: typing.Sequence[str], *keys: str) -> str:
    """Where the value of key path `keys` (any of them) came from, for an error's prefix: '--set KEY=VALUE'
    for the last --set that sets one of them, a table above or a key inside it; else the config file."""
    for item in reversed(overrides):
        if any(_related(_override_key(item), key) for key in keys):
            return f"--set {item}"
    return source


def with_overrides(table: dict, overrides: typing.Sequence[str]) -> dict:
    """The TOML table with every --set KEY=VALUE applied in order; `table` itself is left as it was."""
    table = copy.deepcopy(table)
    for item in overrides:
        try:
            _set(table, item)
        except OdkdError as exc:
            raise OdkdError(f"--set {item}: {exc}") from None
    return table


def _check_sizes(cfg: PipelineConfig, origin) -> None:
    for key, size in (("input_size", cfg.data.input_size), ("heatmap_size", cfg.data.heatmap_size)):
        if min(size) <= 0:
            raise OdkdError(f"{origin(f'data.{key}')}: data.{key} must be positive, got {list(size)}")
    iw, ih = cfg.data.input_size
    if iw % 32 or ih % 32:
        raise OdkdError(f"{origin('data.input_size')}: data.input_size {list(cfg.data.input_size)} must be "
                        f"multiples of 32 (the networks go down to stride 32 and back)")
    hw, hh = cfg.data.heatmap_size
    if iw * hh != ih * hw:
        raise OdkdError(f"{origin('data.heatmap_size', 'data.input_size')}: data.heatmap_size "
                        f"{list(cfg.data.heatmap_size)} must have the aspect of data.input_size "
                        f"{list(cfg.data.input_size)}")


DEVICES = "auto, cpu, cuda, cuda:N, mps"
_DEVICE = re.compile(r"auto|cpu|mps|cuda(:[0-9]+)?")


def check_device(name: str) -> str:
    """`name` when it names a device odkd takes (DEVICES), else a one-line OdkdError saying what is accepted.
    The spelling alone: whether this machine has it is resolve_device's check."""
    if not isinstance(name, str) or not _DEVICE.fullmatch(name):
        raise OdkdError(f"device {name!r} is not one of {DEVICES}")
    return name


# key names that hold credentials in fsspec's filesystems (s3fs, gcsfs, adlfs) and in botocore's client
SECRET_KEYS = ("key", "secret", "token", "password", "username", "credentials", "connection_string")
SECRET_PARTS = ("secret", "token", "password", "access_key", "account_key", "credential")


def _check_no_secrets(options: dict, origin, where: str = "cache.storage_options") -> None:
    for key, value in options.items():
        name = str(key).lower()
        if name in SECRET_KEYS or any(part in name for part in SECRET_PARTS):
            raise OdkdError(f"{origin(f'{where}.{key}')}: {where}.{key}: credentials never go in a pipeline file "
                            f"(stores and runs record it); set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or AWS_PROFILE "
                            f"instead")
        if isinstance(value, dict):
            _check_no_secrets(value, origin, f"{where}.{key}")


def _check_student(cfg: PipelineConfig, origin) -> None:
    student = cfg.student
    if not student.stages:
        raise OdkdError(f"{origin('student.stages')}: student.stages: give at least one [[student.stages]]")
    names = [stage.name for stage in student.stages]
    for i, stage in enumerate(student.stages):
        where = f"student.stages[{i}]"
        if not stage.name:
            raise OdkdError(f"{origin(f'{where}.name')}: {where}.name: every stage needs a name")
        if names.count(stage.name) > 1:
            raise OdkdError(f"{origin(f'{where}.name')}: {where}.name: {stage.name!r} names two stages")
        if stage.epochs < 0:
            raise OdkdError(f"{origin(f'{where}.epochs')}: {where}.epochs must be >= 0, got {stage.epochs}")
        for key in ("gt_weight", "kd_weight", "seg_weight"):
            if getattr(stage, key) < 0:
                raise OdkdError(f"{origin(f'{where}.{key}')}: {where}.{key} must be >= 0, got {getattr(stage, key)}")
        if stage.seg_weight > 0 and not student.seg_head:
            raise OdkdError(f"{origin(f'{where}.seg_weight', 'student.seg_head')}: {where}.seg_weight is "
                            f"{stage.seg_weight} but student.seg_head is false")
    if student.unlabeled_cache and not student.unlabeled_ratio > 0.0:
        raise OdkdError(f"{origin('student.unlabeled_ratio', 'student.unlabeled_cache')}: "
                        f"student.unlabeled_ratio must be above 0, got {student.unlabeled_ratio}")
    if student.epochs <= 0:
        raise OdkdError(f"{origin('student.stages')}: student.stages: the stages' epochs sum to {student.epochs}; "
                        f"the run needs a positive number of epochs")
    given = cfg.raw.get("student", {}).get("train", {}).get("epochs")
    if given is not None and given != student.epochs:
        raise OdkdError(f"{origin('student.train.epochs', 'student.stages')}: student.train.epochs is {given} but "
                        f"the stages' epochs sum to {student.epochs}; drop the key or make them agree")


def parse_config(text: str, source: str = "<string>", overrides: typing.Sequence[str] = ()) -> PipelineConfig:
    """A pipeline from TOML text: its `extends` base merged under it (relative to `source`'s folder),
    then `overrides` ("KEY=VALUE", as --set takes them) applied, then every key checked."""
    table = with_overrides(_extended(_toml(text, source), (source,)), overrides)
    origin = functools.partial(key_origin, source, overrides)  # an error names --set KEY=VALUE, or the file
    try:
        cfg = _section(PipelineConfig, table, "")
    except _KeyProblem as exc:
        raise OdkdError(f"{origin(exc.key)}: {exc}") from None
    except OdkdError as exc:
        raise OdkdError(f"{source}: {exc}") from None
    cfg = dataclasses.replace(cfg, source=source, overrides=tuple(overrides), raw=table)
    if not _DEVICE.fullmatch(cfg.device):
        raise OdkdError(f"{origin('device')}: device: {cfg.device!r} is not one of {DEVICES}")
    _check_sizes(cfg, origin)
    try:
        keypoint_set(cfg.data.keypoints)
    except OdkdError as exc:
        raise OdkdError(f"{origin('data.keypoints')}: {exc}") from None
    _check_no_secrets(cfg.cache.storage_options, origin)
    if "student" in table:
        _check_student(cfg, origin)
    return cfg


def load_config(path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> PipelineConfig:
    """Read a pipeline TOML; with no path, the embedded demo pipeline."""
    path = Path(path) if path is not None else DEMO_CONFIG
    if not path.is_file():
        raise not_found(path, "pipeline config")
    return parse_config(path.read_text(), str(path), overrides)


def _overlaid(table: dict, now: dict, as_read: dict) -> dict:
    """`table` with every value of `now` that differs from `as_read`, the values `table` itself gives."""
    out = dict(table)
    for key, value in now.items():
        if value == as_read[key]:
            continue
        # a section the table leaves out is written whole: a written [teachers.senior] has other defaults
        both_tables = isinstance(value, dict) and isinstance(table.get(key), dict)
        out[key] = _overlaid(table[key], value, as_read[key]) if both_tables else as_toml_value(value)
    return out


def resolved_table(cfg: PipelineConfig) -> dict:
    """The config as one TOML table that loads back as `cfg`: its file's keys with extends and --set
    resolved (`raw`), and over them any value a command changed since (the stages of train-student
    --variant, an ablation run's seed)."""
    def values(config: PipelineConfig) -> dict:
        return {key: value for key, value in dataclasses.asdict(config).items() if key in _keys(PipelineConfig)}

    return _overlaid(cfg.raw, values(cfg), values(_section(PipelineConfig, cfg.raw, "")))


def keep_resolved_config(cfg: PipelineConfig, run_dir: str | Path) -> Path:
    """Write the config a run resolved into its folder as config.toml (resolved_table).

    A resume under another config keeps the earlier file and writes config.1.toml, config.2.toml, ...
    so that nothing already written is lost."""
    # a value may hold a line break, which must not end the comment
    given = " ".join([cfg.source, *(f"--set {item}" for item in cfg.overrides)]).replace("\n", "\\n")
    text = (f"# the pipeline config of this run: {given}, with its extends and the command's own changes\n"
            f"# resolved; odkd COMMAND --config THIS_FILE runs with it again\n\n{toml_text(resolved_table(cfg))}")
    names = itertools.chain(["config.toml"], (f"config.{n}.toml" for n in itertools.count(1)))
    path = next(path for path in (Path(run_dir) / name for name in names)
                if not path.exists() or path.read_text() == text)
    path.write_text(text)
    return path


def resolve_device(name: str):
    """The torch device `name` (DEVICES) names on this machine; one-line OdkdErrors for any other name and for
    a CUDA or MPS device this machine lacks."""
    import torch

    check_device(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise OdkdError(f"device '{name}' requested but CUDA is not available")
    if name.startswith("cuda:") and int(name[5:]) >= torch.cuda.device_count():
        raise OdkdError(f"device '{name}' requested but this machine has {torch.cuda.device_count()} CUDA "
                        f"device(s), cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    if name == "mps" and not torch.backends.mps.is_available():
        raise OdkdError("device 'mps' requested but MPS (Apple's GPU) is not available")
    return torch.device(name)


__all__ = [
    "AugmentConfig", "CACHE_SPLITS", "CacheConfig", "DataConfig", "UnlabeledConfig", "EvalConfig", "PipelineConfig",
    "ScheduleConfig", "StageConfig", "StudentConfig", "TeacherConfig", "TeachersConfig",
    "DEVICES", "check_device", "choices", "key_origin", "keep_resolved_config", "load_config", "parse_config",
    "resolve_device", "resolved_table", "toml_text", "with_overrides",
]
