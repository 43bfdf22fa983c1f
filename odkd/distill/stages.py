"""The orderly schedule: which stage an epoch belongs to, and what each stage reads from the store."""

from __future__ import annotations

import dataclasses

from odkd.config import StageConfig, StudentConfig
from odkd.distill.targets import TARGET_FORMS

# the store's prefix of each stage teacher
TEACHER_KEYS = {"primary": ("pt",), "senior": ("st",), "both": ("pt", "st"), "none": ()}


def stage_teachers(stage: StageConfig) -> tuple[str, ...]:
    """The store prefixes ("pt", "st") whose heatmaps this stage distils; none when kd_weight is 0."""
    return TEACHER_KEYS[stage.teacher] if stage.kd_weight > 0 else ()


def stage_uses_mask(stage: StageConfig) -> bool:
    return stage.seg_weight > 0 or (stage.mask_gate and "st" in stage_teachers(stage))


def heatmap_array(key: str, targets: str) -> str:
    """The stored array that target form `targets` of teacher `key` reads."""
    return f"{key}/{TARGET_FORMS[targets].array}"


def required_arrays(stage: StageConfig) -> dict[str, str]:
    """Store array -> why this stage needs it."""
    need = {}
    for key in stage_teachers(stage):
        need[heatmap_array(key, stage.targets)] = f"{stage.targets} {key.upper()} heatmaps"
        need[f"{key}/conf"] = f"{key.upper()} peaks for conf_floor"
    if stage_uses_mask(stage):
        need["st/mask"] = "ST's mask for seg_weight > 0" if stage.seg_weight > 0 else "ST's mask for mask_gate"
    if need:
        need["meta/ok"] = "which instances have targets"
    return need


class StagePlan:
    """The stages of a student run laid end to end over its epochs."""

    def __init__(self, student: StudentConfig):
        self.student = student
        self.stages = student.stages
        self.ends = []
        total = 0
        for stage in self.stages:
            total += stage.epochs
            self.ends.append(total)

    @property
    def epochs(self) -> int:
        return self.ends[-1]

    def index_at(self, epoch: int) -> int:
        """The stage that trains epoch `epoch` (0-based); zero-epoch stages are never current."""
        return next(i for i, end in enumerate(self.ends) if epoch < end)

    def start(self, index: int) -> int:
        return self.ends[index] - self.stages[index].epochs

    def milestones(self) -> dict[int, str]:
        """The epoch that ends each stage -> the name of the checkpoint kept there."""
        return {end: f"stage_{stage.name}" for end, stage in zip(self.ends, self.stages) if stage.epochs > 0}

    def schedule(self):
        """[student.train] with epochs = the sum of the stages."""
        return dataclasses.replace(self.student.train, epochs=self.epochs)

    def signature(self) -> list[dict]:
        """The stages as a resumed run must find them."""
        return [dataclasses.asdict(stage) for stage in self.stages]
