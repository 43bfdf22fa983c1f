"""`odkd train-student`: the student learns from the teacher store in orderly stages; no teacher is loaded.

Before the first step everything the run depends on is checked, and nothing is written until it
passes: the run folder (no run there, or the run --resume continues), the store opens (path or URL),
was built for this dataset, holds what the stages ask for, and its geometry fits the student; so does
the unlabelled store of `[student] unlabeled_cache`, which must also come from the same teachers and
settings. Under torchrun every rank checks before the process group starts and the ranks agree on the
outcome, so a failure is one line from rank 0 and the same exit code from every rank. Then the local
copies of the stores are made and the one training loop runs the stages in order.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path

import torch

from odkd.config import PipelineConfig, keep_resolved_config, resolve_device
from odkd.data.dataset import LabeledAndUnlabeled, MixedEpochSampler, TopDownDataset, mixed_batch_size
from odkd.data.instances import load_instances
from odkd.data.keypoints import keypoint_set, stored_record, val_stat
from odkd.distill.objective import StudentObjective, stored_arrays
from odkd.distill.stages import StagePlan, required_arrays, stage_teachers, stage_uses_mask
from odkd.errors import OdkdError, not_found
from odkd.eval.curves import plot_training_curves
from odkd.eval.evaluate import ModelEvaluator
from odkd.models import build_model, load_checkpoint
from odkd.store.local import LocalRows
from odkd.store.reader import TeacherTargets
from odkd.train.distributed import agree_on_checks, launched_ranks, rank_device, start_ranks, stop_ranks
from odkd.train.loop import (ModelSpec, check_run_folder, check_schedule, fit, lr_multiplier, refuse_another_run,
                             schedule_signature)

log = logging.getLogger(__name__)


def default_student_dir(cfg: PipelineConfig) -> Path:
    return Path(cfg.runs) / "student"


def open_teacher_store(url: str, dataset_fingerprint: str, cfg: PipelineConfig, split: str = "train") -> TeacherTargets:
    """The store at `url`, validated against the split, the keypoint set and the dataset of `cfg`; any failure
    to reach it is one line."""
    try:
        return TeacherTargets.open(url, dataset_fingerprint=dataset_fingerprint, split=split,
                                   storage_options=cfg.cache.storage_options or None,
                                   keypoints=stored_record(keypoint_set(cfg.data.keypoints)))
    except OdkdError:
        raise
    except Exception as exc:  # fsspec and its transports raise their own kinds (aiohttp, botocore, OSError)
        reason = (str(exc).strip().splitlines() or [""])[0]
        raise OdkdError(f"{url}: cannot open the teacher store ({type(exc).__name__}: {reason})") from None


def check_store_fits(targets: TeacherTargets, cfg: PipelineConfig, plan: StagePlan, num_instances: int,
                     split: str = "train") -> None:
    """The store of `split` (open_teacher_store checked which) holds a row for every instance, the arrays
    every stage reads, and maps made for the student's crop geometry; else one line naming the store, the
    key and both values."""
    url, settings = targets.url, targets.attrs.get("settings", {})
    if len(targets) != num_instances:
        raise OdkdError(f"{url}: holds {len(targets)} instances, the {split} split has {num_instances} "
                        f"(built with --limit?); rebuild it whole")
    for key in ("input_size", "heatmap_size"):
        want = list(getattr(cfg.data, key))
        if list(settings.get(key, [])) != want:
            raise OdkdError(f"{url}: settings.{key} is {settings.get(key)} but [data] {key} is {want}; "
                            f"the store was made for another crop geometry")
    for stage in plan.stages:
        for name, why in required_arrays(stage).items():
            if name not in targets.names:
                hint = "; rebuild it with [cache] store_soft = true" if "soft" in name else ""
                raise OdkdError(f"{url}: stage '{stage.name}' needs {name} ({why}), the store has none{hint}")


# what may differ between the labelled store and the unlabelled one: which instances they hold
PER_SPLIT_SETTINGS = ("split", "dataset_fingerprint")


def check_same_teachers(targets: TeacherTargets, unlabeled: TeacherTargets) -> None:
    """The unlabelled store was made by the labelled one's teachers with its settings, so that one stage
    teaches the same thing on both; else one line naming the first setting that differs."""
    ours, theirs = (store.attrs.get("settings", {}) for store in (targets, unlabeled))
    for key in sorted(set(ours) | set(theirs)):
        if key not in PER_SPLIT_SETTINGS and ours.get(key) != theirs.get(key):
            raise OdkdError(f"{unlabeled.url}: settings.{key} is {theirs.get(key)!r} but {targets.url} has "
                            f"{ours.get(key)!r}; build both stores with the same teachers and [cache] settings")


def check_unlabeled_learns(plan: StagePlan, source: str) -> None:
    """Every stage teaches the unlabelled instances something: they have no GT."""
    for stage in plan.stages:
        if stage.epochs > 0 and not (stage_teachers(stage) or stage_uses_mask(stage)):
            raise OdkdError(f"{source}: student.stages '{stage.name}' learns from no teacher, so the instances of "
                            f"student.unlabeled_cache would teach it nothing; drop the key or give the stage a teacher")


def check_student_fits(cfg: PipelineConfig) -> None:
    """The student's heatmaps have [data] heatmap_size at [data] input_size; else one line naming both."""
    scfg = cfg.student
    model = build_model(scfg.model, keypoint_set(cfg.data.keypoints).num_keypoints,
                        seg_head=scfg.seg_head, **scfg.model_args)
    with torch.inference_mode():
        out_hw = tuple(model(torch.zeros(1, 3, cfg.data.input_size[1], cfg.data.input_size[0]))[0].shape[-2:])
    if out_hw != tuple(cfg.data.heatmap_size[::-1]):
        raise OdkdError(f"student.model: {scfg.model} maps a {cfg.data.input_size[0]}x{cfg.data.input_size[1]}"
                        f" input to {out_hw[1]}x{out_hw[0]} heatmaps, [data] heatmap_size is "
                        f"{cfg.data.heatmap_size[0]}x{cfg.data.heatmap_size[1]}")


def stage_lr_factor(plan: StagePlan) -> Callable[[int], Callable[[int], float]]:
    """Steps per epoch -> LambdaLR factor. lr_span "run": one curve over all the stages' epochs;
    "stage": the schedule (warmup, steps or cosine) starts again at every stage, over its epochs."""
    schedule = plan.schedule()
    if plan.student.lr_span == "run":
        return lambda steps: lr_multiplier(schedule, steps)

    def per_stage(steps: int) -> Callable[[int], float]:
        curves = [lr_multiplier(dataclasses.replace(schedule, epochs=s.epochs), steps) for s in plan.stages]

        def factor(step: int) -> float:
            index = plan.index_at(min(step // steps, plan.epochs - 1))
            return curves[index](step - plan.start(index) * steps)

        return factor

    return per_stage


def train_student(cfg: PipelineConfig, *, cache: str | None = None, out: str | None = None, resume: bool = False,
                  device: str | None = None, max_steps_per_epoch: int | None = None) -> dict:
    """Train the `[student]` of the pipeline config from its teacher store; returns the loop's summary
    (None on the ranks other than 0 under torchrun)."""
    ranks, failure = launched_ranks(), None
    try:  # every check, before the process group and before anything is written
        if "student" not in cfg.raw:
            raise OdkdError(f"{cfg.source}: no [student] section; add one (docs/config.md, [student])")
        scfg = cfg.student
        plan = StagePlan(scfg)
        dev = rank_device(ranks, resolve_device(device or cfg.device))
        instances = load_instances(cfg.data, "train")
        targets = open_teacher_store(cache or scfg.cache, instances.fingerprint, cfg)
        check_store_fits(targets, cfg, plan, len(instances))
        unlabeled = unlabeled_targets = None
        if scfg.unlabeled_cache:
            check_unlabeled_learns(plan, cfg.source)
            unlabeled = load_instances(cfg.data, "unlabeled")
            unlabeled_targets = open_teacher_store(scfg.unlabeled_cache, unlabeled.fingerprint, cfg, split="unlabeled")
            check_store_fits(unlabeled_targets, cfg, plan, len(unlabeled), split="unlabeled")
            check_same_teachers(targets, unlabeled_targets)
        kset = keypoint_set(cfg.data.keypoints)
        spec = ModelSpec(name=scfg.model, args=dict(scfg.model_args), seg_head=scfg.seg_head,
                         input_size=tuple(cfg.data.input_size))
        check_student_fits(cfg)
        if scfg.init and not resume and not Path(scfg.init).is_file():
            raise not_found(scfg.init, "checkpoint file", "student.init")
        schedule = plan.schedule()
        check_schedule(schedule)
        out_dir = Path(out or default_student_dir(cfg))
        check_run_folder(out_dir, resume)
        signature = {**schedule_signature(schedule), "lr_span": scfg.lr_span, "stages": plan.signature()}
        provenance = {"store": targets.identity(), "stages": plan.signature()}
        if unlabeled_targets is not None:
            signature["unlabeled_ratio"] = scfg.unlabeled_ratio
            provenance["unlabeled_store"] = unlabeled_targets.identity()
        if resume:
            refuse_another_run(out_dir / "last.pth", spec, signature, provenance)  # before the copy below
        val = load_instances(cfg.data, "val") if ranks.is_main else None  # only rank 0 evaluates
    except OdkdError as exc:
        failure = exc
    # one process: the failure as it is; torchrun: the first failure of any rank, on every rank
    store = agree_on_checks(ranks, failure)
    ranks, dev = start_ranks(dev, store)
    try:

        def make_model():
            model = build_model(scfg.model, kset.num_keypoints,
                                seg_head=scfg.seg_head, **scfg.model_args)
            if scfg.init and not resume:
                report = load_checkpoint(model, scfg.init, allow_new_seg_head=True)
                if ranks.is_main:
                    log.info(f"init from {report.summary()}")
            return model

        # every rank asks; the first on this machine copies, under a lock, and the others map its files
        train_set = TopDownDataset(instances, cfg.data, train=True, with_mask=False, seed=scfg.train.seed,
                                   stored_rows=LocalRows.fetch(targets, stored_arrays(plan)))
        sampler = None
        if unlabeled_targets is not None:
            train_set = LabeledAndUnlabeled(train_set, TopDownDataset(
                unlabeled, cfg.data, train=True, with_mask=False, seed=scfg.train.seed, stream=1,
                stored_rows=LocalRows.fetch(unlabeled_targets, stored_arrays(plan))))
            sampler = MixedEpochSampler(len(instances), len(unlabeled), scfg.unlabeled_ratio, seed=scfg.train.seed,
                                        rank=ranks.rank, world_size=ranks.world_size)
            # the unlabelled people come on top of each step's labelled ones: a labelled-only epoch's steps
            schedule = dataclasses.replace(schedule, batch_size=mixed_batch_size(schedule.batch_size,
                                                                                 scfg.unlabeled_ratio))
            if ranks.is_main:
                log.info(f"{len(instances)} labelled instances and {sampler.per_epoch} of the {len(unlabeled)} "
                         f"unlabelled ones an epoch, in batches of {schedule.batch_size} "
                         f"(student.unlabeled_ratio {scfg.unlabeled_ratio})")
        objective = StudentObjective(plan, targets, heatmap_size=cfg.data.heatmap_size, sigma=cfg.data.sigma,
                                     seg_loss=scfg.seg_loss, keep_blob_size=scfg.keep_blob_size,
                                     flip_index=kset.flip_index)
        evaluator = None
        if ranks.is_main:
            evaluator = ModelEvaluator(val, cfg.data, cfg.eval, val.coco, device=dev, with_mask=scfg.seg_head,
                                       workers=scfg.train.workers)
        summary = fit(make_model, train_set, schedule=schedule, spec=spec, out_dir=out_dir,
                   loss_fn=objective, device=dev, evaluate_fn=(lambda m: evaluator(m).record()) if evaluator else None,
                   resume=resume, max_steps_per_epoch=max_steps_per_epoch, lr_factor=stage_lr_factor(plan),
                   signature=signature, milestones=plan.milestones(),
                   after_epoch=lambda d: plot_training_curves(d / "log.jsonl", d / "curves.png"),
                   best_from_epoch=plan.start(plan.index_at(plan.epochs - 1)) if scfg.best == "last_stage" else 0,
                   sampler=sampler, provenance=provenance, ranks=ranks,
                   best_by=val_stat(kset),
                   on_start=lambda run_dir: keep_resolved_config(cfg, run_dir))
        return summary if ranks.is_main else None
    finally:
        stop_ranks(ranks)
