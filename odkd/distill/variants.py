"""The student's variants: stage lists made from the config's own [[student.stages]], for
`odkd ablate` and `odkd train-student --variant`.

Every key the user set (the loss weights, conf_floor, the ST stage's seg_weight) carries into every
variant, and only what the variant is about changes; all keep the config's total epochs. The GT-only
baseline is the exception: it keeps only the first stage's gt_weight, so that tuning a teacher key
(kd_weight, conf_floor, targets) leaves it the same run, which odkd ablate then reuses; it is the one
variant that any stage list has, the method's or not. Only the
"+unlabeled" variants read [student] unlabeled_cache: the others are the labelled images' runs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from functools import partial

from odkd.config import PipelineConfig, StageConfig, StudentConfig
from odkd.distill.targets import TARGET_FORMS
from odkd.errors import OdkdError


def only_stage(student: StudentConfig, teacher: str) -> StageConfig:
    found = [stage for stage in student.stages if stage.teacher == teacher]
    if len(found) != 1:
        raise OdkdError(f"student.stages: the ablation needs exactly one stage with teacher = {teacher!r}, "
                        f"found {len(found)}")
    return found[0]


def orderly(student: StudentConfig) -> tuple[StageConfig, ...]:
    """The config's own stages, which must be the method's: its PT stage before its ST stage."""
    pt, st = only_stage(student, "primary"), only_stage(student, "senior")
    if student.stages.index(pt) > student.stages.index(st):
        raise OdkdError("student.stages: the ablation needs the method's order in the config, the 'primary' "
                        "stage before the 'senior' one")
    return student.stages


def gt_only(student: StudentConfig) -> tuple[StageConfig, ...]:
    gt_weight = student.stages[0].gt_weight
    return (StageConfig(name="gt", epochs=student.epochs, teacher="none", gt_weight=gt_weight, kd_weight=0.0),)


def single_stage(student: StudentConfig, like: str, name: str, **changes) -> tuple[StageConfig, ...]:
    """One stage over all the config's epochs, made from its stage with teacher `like`."""
    return (dataclasses.replace(only_stage(student, like), name=name, epochs=student.epochs, **changes),)


def with_targets(student: StudentConfig, form: str) -> tuple[StageConfig, ...]:
    return tuple(dataclasses.replace(stage, targets=form) for stage in orderly(student))


def stage_changed(student: StudentConfig, of_teacher: str, **changes) -> tuple[StageConfig, ...]:
    """The orderly stages with the one that learns from `of_teacher` changed."""
    changed = only_stage(student, of_teacher)
    return tuple(dataclasses.replace(stage, **changes) if stage == changed else stage for stage in orderly(student))


VARIANTS: dict[str, Callable[[StudentConfig], tuple[StageConfig, ...]]] = {
    "gt": gt_only,
    "pt": lambda student: single_stage(student, "primary", "pt"),
    "st": lambda student: single_stage(student, "senior", "st"),
    "joint": lambda student: single_stage(student, "senior", "joint", teacher="both"),
    "orderly": orderly,
    "reverse": lambda student: orderly(student)[::-1],
    # one variant per target form: the orderly stages learning from it (odkd.distill.targets)
    **{form: partial(with_targets, form=form) for form in TARGET_FORMS},
    "no_mask": lambda student: stage_changed(student, "senior", seg_weight=0.0),
    "mask_gate": lambda student: stage_changed(student, "senior", mask_gate=True),
    "orderly+unlabeled": orderly,
    # ST's targets in PT's stage too: with the unlabelled images PT's stage did not help (docs/results.md)
    "st+unlabeled": lambda student: stage_changed(student, "primary", teacher="senior"),
}
# the variants that also learn from [student] unlabeled_cache; every other one trains on the labelled store alone
UNLABELED_VARIANTS = ("orderly+unlabeled", "st+unlabeled")


def variant_student(student: StudentConfig, name: str) -> StudentConfig:
    """The student of variant `name`: its stages, and the unlabelled store only where the variant is about it."""
    if name not in VARIANTS:
        raise OdkdError(f"unknown variant {name!r}; the variants are {', '.join(VARIANTS)}")
    unlabeled = name in UNLABELED_VARIANTS
    if unlabeled and not student.unlabeled_cache:
        raise OdkdError(f"variant {name!r} needs [student] unlabeled_cache, a store of cache-teachers --split unlabeled")
    return dataclasses.replace(student, stages=VARIANTS[name](student),
                               unlabeled_cache=student.unlabeled_cache if unlabeled else "")


def with_variant(cfg: PipelineConfig, name: str) -> PipelineConfig:
    """The config with its student replaced by variant `name`'s (variant_student)."""
    return dataclasses.replace(cfg, student=variant_student(cfg.student, name))
