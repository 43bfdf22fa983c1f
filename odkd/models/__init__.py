"""Pose networks (HRNet family, light students), their heads, checkpoints and complexity."""

from odkd.models.checkpoint import (
    CheckpointFile,
    LoadReport,
    apply_checkpoint,
    build_from_checkpoint,
    check_keypoint_count,
    load_checkpoint,
    model_fingerprint,
    read_checkpoint,
    save_checkpoint,
)
from odkd.models.complexity import list_models, model_complexity
from odkd.models.heads import PoseOutput
from odkd.models.registry import MODELS, build_model

__all__ = [
    "MODELS",
    "CheckpointFile",
    "LoadReport",
    "PoseOutput",
    "apply_checkpoint",
    "build_from_checkpoint",
    "build_model",
    "check_keypoint_count",
    "list_models",
    "load_checkpoint",
    "model_complexity",
    "model_fingerprint",
    "read_checkpoint",
    "save_checkpoint",
]
