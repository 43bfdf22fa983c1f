"""`odkd ablate`: every variant of the student from one teacher store, with the same seeds and the same
total epochs, each trained by train_student; the last weights of every run scored on one split, and
mean ± std over the seeds.

The variants are odkd.distill.variants'. Each run lives in OUT/VARIANT/seedS next to run.json, the configuration it
was trained under: a finished run is reused, an unfinished one resumed, and one trained under
another configuration is refused, so an interrupted ablation picks up where it stopped.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from odkd.config import PipelineConfig, StudentConfig, resolve_device
from odkd.data.instances import load_instances
from odkd.data.keypoints import keypoint_set, val_stat
from odkd.dicts import first_difference
from odkd.distill.stages import StagePlan, required_arrays
from odkd.distill.variants import UNLABELED_VARIANTS, VARIANTS, variant_student
from odkd.errors import OdkdError
from odkd.eval.evaluate import ModelEvaluator
from odkd.models import build_from_checkpoint, read_checkpoint
from odkd.train.student import check_same_teachers, check_store_fits, open_teacher_store, train_student

# the stats reported of every run, by the stat the variants are compared by (val_stat: AP, or PCK for a set
# without OKS sigmas), which comes first and is higher for the better model
REPORTED = {"AP": ("AP", "AP .5", "AR"), "PCK": ("PCK", "AUC", "EPE")}
# best.pth is chosen by val AP (PCK); scoring it would select on the reported split whenever that is val
SCORED_WEIGHTS = "last.pth"

log = logging.getLogger(__name__)


# (A, B, the claim that A's compared stat is above B's)
HYPOTHESES = (
    ("orderly", "joint", "orderly stages beat one joint stage"),
    ("orderly", "pt", "orderly beats PT alone"),
    ("orderly", "st", "orderly beats ST alone"),
    ("orderly", "reverse", "PT then ST beats ST then PT"),
    ("orderly", "gt", "the teachers beat GT alone"),
    ("orderly", "soft", "binarized targets beat soft ones"),
    ("gaussian", "disc", "a Gaussian at the blob's centroid beats the paper's disc"),
    ("gaussian_conf", "disc", "that Gaussian at the teacher's peak beats the paper's disc"),
    ("disc_conf", "disc", "the disc at the teacher's peak beats the paper's disc"),
    ("orderly", "no_mask", "the mask loss helps"),
    ("mask_gate", "orderly", "mask gating helps"),
    ("orderly+unlabeled", "orderly", "the unlabelled images help"),
    ("orderly+unlabeled", "gt", "the teachers and the unlabelled images beat GT alone"),
    ("orderly+unlabeled", "st+unlabeled", "with the unlabelled images, PT's stage before ST's beats ST's targets alone"),
)


def variant_config(cfg: PipelineConfig, student: StudentConfig, seed: int) -> PipelineConfig:
    train = dataclasses.replace(student.train, seed=seed)
    return dataclasses.replace(cfg, student=dataclasses.replace(student, train=train))


def run_record(cfg: PipelineConfig) -> dict:
    """What a run was trained under, as run.json holds it."""
    return json.loads(json.dumps({"student": dataclasses.asdict(cfg.student), "data": dataclasses.asdict(cfg.data)}))


def train_or_reuse(cfg: PipelineConfig, run_dir: Path, *, device: str | None,
                   max_steps_per_epoch: int | None) -> str:
    """Make sure `run_dir` holds the finished run of `cfg`: 'reused', 'resumed' or 'trained'."""
    record_path, last = run_dir / "run.json", run_dir / SCORED_WEIGHTS
    record = run_record(cfg)
    if record_path.exists():
        changed = first_difference(json.loads(record_path.read_text()), record)
        if changed:
            raise OdkdError(f"{record_path}: this run was trained under another configuration ({changed}, "
                            f"run != config); choose another --out")
    elif last.exists():
        raise OdkdError(f"{last}: not a run of odkd ablate (no run.json beside it); choose another --out")
    resume = last.exists()
    if resume and read_checkpoint(last).extra.get("epoch") == cfg.student.epochs:
        return "reused"
    run_dir.mkdir(parents=True, exist_ok=True)
    record_path.write_text(json.dumps(record, indent=2))
    train_student(cfg, out=str(run_dir), resume=resume, device=device, max_steps_per_epoch=max_steps_per_epoch)
    return "resumed" if resume else "trained"


def spread(values: Sequence[float]) -> dict:
    """Mean and sample std (0 for one value) over the seeds."""
    return {"mean": float(np.mean(values)), "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0}


def check_hypothesis(a: dict, b: dict, stat: str) -> dict:
    """Whether A's mean `stat` exceeds B's by more than twice the larger of their stds."""
    diff = a[stat]["mean"] - b[stat]["mean"]
    bar = 2 * max(a[stat]["std"], b[stat]["std"])
    if min(a["n"], b["n"]) < 2:
        verdict = "not tested: one seed gives no spread"
    elif diff > bar:
        verdict = "holds: the difference exceeds 2x the larger std"
    elif diff < -bar:
        verdict = "reversed: B beats A by more than 2x the larger std"
    else:
        verdict = "not shown: the difference is within 2x the larger std"
    return {"difference": diff, "bar": bar, "verdict": verdict, "per_seed": per_seed_difference(a, b, stat)}


def per_seed_difference(a: dict, b: dict, stat: str) -> dict:
    """A - B seed by seed. A seed fixes the initial weights and the data order for every variant, so
    this pairs runs that differ only in the variant; it sits beside the verdict, which stays the
    unpaired rule above."""
    diffs = [ra[stat] - rb[stat] for ra, rb in zip(a["runs"], b["runs"], strict=True)]
    return {**spread(diffs), "n": len(diffs), "ahead": sum(d > 0 for d in diffs)}


def default_split(cfg: PipelineConfig) -> str:
    test_ann = cfg.data.ann_file("test")
    if test_ann.is_file():
        return "test"
    log.warning(f"warning: {test_ann} not found: the ablation reports on val, the split hyper-parameters are "
                f"chosen on; report a held-out test split")
    return "val"


def run_ablation(cfg: PipelineConfig, *, seeds: int = 3, variants: Sequence[str] | None = None,
                 split: str | None = None, out: str | Path | None = None, device: str | None = None,
                 command: str = "run_ablation() from Python", max_steps_per_epoch: int | None = None) -> dict:
    """Train (or reuse) every variant x seed from the config's teacher store, score each run's last
    weights on `split`, and write OUT/ablation.md and OUT/ablation.json; returns what the JSON holds."""
    started = time.perf_counter()
    if "student" not in cfg.raw:
        raise OdkdError(f"{cfg.source}: no [student] section; the ablation varies its stages")
    if seeds < 1:
        raise OdkdError(f"--seeds: at least one seed, got {seeds}")
    dev = resolve_device(device or cfg.device)  # an unknown device or a missing GPU, before a store is opened
    names = list(dict.fromkeys(variants or VARIANTS))
    for name in names:
        if name not in VARIANTS:
            raise OdkdError(f"--variants: unknown variant {name!r}; the variants are {', '.join(VARIANTS)}")
    skipped = {}
    if not cfg.student.unlabeled_cache:
        for name in (name for name in UNLABELED_VARIANTS if name in names):
            skipped[name] = "the config sets no [student] unlabeled_cache"
            log.warning(f"warning: variant {name!r} skipped: {skipped[name]}")
    try:
        students = {name: variant_student(cfg.student, name) for name in names if name not in skipped}
    except OdkdError as exc:
        raise OdkdError(f"{cfg.source}: {exc}") from None
    split = split or default_split(cfg)
    if split not in ("val", "test"):
        raise OdkdError(f"--split: the ablation reports on val or test, got {split!r}")
    out = Path(out or Path(cfg.runs) / "ablation")
    stat = val_stat(keypoint_set(cfg.data.keypoints))
    seed_list = [cfg.student.train.seed + i for i in range(seeds)]

    # everything every run needs is checked before the first one starts
    instances = load_instances(cfg.data, "train")
    targets = open_teacher_store(cfg.student.cache, instances.fingerprint, cfg)
    unlabeled = unlabeled_targets = None
    if cfg.student.unlabeled_cache and any(name in UNLABELED_VARIANTS for name in students):
        unlabeled = load_instances(cfg.data, "unlabeled")
        unlabeled_targets = open_teacher_store(cfg.student.unlabeled_cache, unlabeled.fingerprint, cfg,
                                               split="unlabeled")
        check_same_teachers(targets, unlabeled_targets)
    for name, student in students.items():
        missing = sorted({array for stage in student.stages for array in required_arrays(stage)
                          if array.endswith("soft_heatmaps")} - set(targets.names))
        if name == "soft" and missing:
            skipped[name] = (f"{targets.url} has no {', '.join(missing)}; build the store with "
                             f"[cache] store_soft = true")
            log.warning(f"warning: variant 'soft' skipped: {skipped[name]}")
            continue
        plan = StagePlan(student)
        run_cfg = variant_config(cfg, student, seed_list[0])
        check_store_fits(targets, run_cfg, plan, len(instances))
        if student.unlabeled_cache:
            check_store_fits(unlabeled_targets, run_cfg, plan, len(unlabeled), split="unlabeled")
    evaluated = load_instances(cfg.data, split)
    evaluator = ModelEvaluator(evaluated, cfg.data, cfg.eval, evaluated.coco, device=dev, with_mask=False,
                               workers=cfg.student.train.workers)

    runs: dict[str, list[dict]] = {name: [] for name in students if name not in skipped}
    # a variant whose student is an earlier one's (`disc` where the config's own stages learn from the disc)
    # is that run, scored once
    first: dict[str, str] = {}
    same_as: dict[str, str] = {}
    for name in runs:
        other = first.setdefault(json.dumps(dataclasses.asdict(students[name]), sort_keys=True), name)
        if other != name:
            same_as[name] = other
    for seed in seed_list:  # seeds outermost: an interrupted ablation has every variant at the first seeds
        for name in runs:
            if name in same_as:
                runs[name].append({**runs[same_as[name]][-1], "status": "shared"})
                continue
            run_dir = out / name / f"seed{seed}"
            status = train_or_reuse(variant_config(cfg, students[name], seed), run_dir, device=device,
                                    max_steps_per_epoch=max_steps_per_epoch)
            net, _ = build_from_checkpoint(run_dir / SCORED_WEIGHTS, dev)
            stats = evaluator(net).stats
            runs[name].append({"seed": seed, "dir": str(run_dir), "status": status,
                               **{key: stats[key] for key in REPORTED[stat]}})
            log.info(f"ablate: {name} seed {seed}: {status}; {split} {stat} {stats[stat]:.4f}")

    results = {name: {"stages": [dataclasses.asdict(stage) for stage in students[name].stages], "n": len(rows),
                      **{key: spread([row[key] for row in rows]) for key in REPORTED[stat]}, "runs": rows}
               for name, rows in runs.items()}
    summary = {
        "command": command, "store": targets.url,
        "unlabeled_store": unlabeled_targets.url if unlabeled_targets is not None else None, "split": split,
        "stat": stat, "weights": SCORED_WEIGHTS,
        "epochs": cfg.student.epochs, "seeds": seed_list, "out": str(out),
        "variants": results, "skipped": skipped, "same_as": same_as,
        "hypotheses": [{"a": a, "b": b, "claim": claim, **check_hypothesis(results[a], results[b], stat)}
                       for a, b, claim in HYPOTHESES if a in results and b in results],
        "wall_s": time.perf_counter() - started,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "ablation.json").write_text(json.dumps(summary, indent=2))
    (out / "ablation.md").write_text(ablation_markdown(summary))
    return summary


def mean_std(value: dict) -> str:
    return f"{value['mean']:.4f} ± {value['std']:.4f}"


def ablation_table(summary: dict) -> str:
    """variant | the reported stats (AP | AP .5 | AR, or PCK | AUC | EPE) | n seeds, as a markdown table."""
    compared, *others = reported = REPORTED[summary["stat"]]
    lines = [f"| variant | {compared} (mean ± std) | " + " | ".join(others) + " | n seeds |",
             "|---" * (len(reported) + 2) + "|"]
    for name, result in summary["variants"].items():
        lines.append(f"| {name} | " + " | ".join(mean_std(result[key]) for key in reported) + f" | {result['n']} |")
    return "\n".join(lines)


def ablation_markdown(summary: dict) -> str:
    counts = [row["status"] for result in summary["variants"].values() for row in result["runs"]]
    lines = [
        "# Ablation",
        "",
        f"- command: `{summary['command']}`",
        f"- store: `{summary['store']}`"
        + (f"; unlabelled store (the +unlabeled variants): `{summary['unlabeled_store']}`"
           if summary.get("unlabeled_store") else ""),
        f"- scored: every run's {summary['weights']} on {summary['split']} "
        f"(not best.pth, which is chosen by val {summary['stat']})",
        f"- {summary['epochs']} epochs per run; seeds {', '.join(map(str, summary['seeds']))}",
        f"- wall time: {summary['wall_s'] / 60:.1f} min ("
        + ", ".join(f"{counts.count(s)} {s}" for s in ("trained", "resumed", "reused")) + ")",
        "",
        ablation_table(summary),
        "",
    ]
    for name, other in summary["same_as"].items():
        lines += [f"{name} trains the same student as {other}, so its rows are {other}'s runs.", ""]
    for name, reason in summary["skipped"].items():
        lines += [f"Skipped {name}: {reason}.", ""]
    if summary["hypotheses"]:
        lines += [f"## Hypotheses ({summary['stat']})", "",
                  "| claim | A | B | A - B | 2x larger std | verdict | A - B per seed (A ahead) |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {h['claim']} | {h['a']} | {h['b']} | {h['difference']:+.4f} | {h['bar']:.4f} | {h['verdict']} | "
                  f"{paired_cell(h['per_seed'])} |" for h in summary["hypotheses"]]
        lines += ["", "A claim holds when A's mean exceeds B's by more than twice the larger of their stds. The last "
                  "column pairs the runs of each seed (the same initial weights and data order): mean ± std of "
                  "A - B, and at how many seeds A is ahead.", ""]
    lines += [f"## Per seed ({summary['stat']})", "", per_seed_table(summary), ""]
    return "\n".join(lines)


def paired_cell(per_seed: dict) -> str:
    return f"{per_seed['mean']:+.4f} ± {per_seed['std']:.4f} ({per_seed['ahead']} of {per_seed['n']})"


def per_seed_table(summary: dict) -> str:
    """variant | the compared stat at each seed."""
    lines = ["| variant | " + " | ".join(f"seed {seed}" for seed in summary["seeds"]) + " |",
             "|---" * (len(summary["seeds"]) + 1) + "|"]
    for name, result in summary["variants"].items():
        lines.append(f"| {name} | " + " | ".join(f"{row[summary['stat']]:.4f}" for row in result["runs"]) + " |")
    return "\n".join(lines)
