"""`odkd report`: one markdown page for a run folder. Every model's COCO AP (PCK, AUC and EPE for a
keypoint set without OKS sigmas), size and CPU speed in one table, the students' training curves, and
their keypoints next to the teachers' on crops of the split it scores (val or test)."""

from __future__ import annotations

import os
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import default_collate
from tqdm import tqdm

from odkd.config import DEMO_CONFIG, resolve_device
from odkd.data.dataset import TopDownDataset, frame_from_batch
from odkd.data.instances import load_instances
from odkd.data.transforms import affine_transform
from odkd.data.keypoints import COCO_SET, KeypointSet, keypoint_set, val_stat
from odkd.data.visualize import denormalize_image, draw_pose
from odkd.errors import OdkdError
from odkd.eval.curves import plot_runs_side_by_side
from odkd.eval.evaluate import evaluate_checkpoint, predict_instances
from odkd.models import build_from_checkpoint, model_complexity, read_checkpoint
from odkd.models.inference import predict_batch
from odkd.models.registry import EXTERNAL_KINDS
from odkd.models.teacher import teacher_checkpoint

# the rows a run folder has by default: row name -> [teachers.ROLE], and row name -> run subfolder
# the released files' rows; the students' init where [student] init is [teachers.init]'s file
TEACHER_ROWS = {"primary": "PT", "senior": "ST", "init": "init"}
STUDENT_ROWS = {"GT-only": "student_gt", "ODKD": "student"}
# the table's stat columns and what they are, by the stat the set is scored by (val_stat)
STAT_COLUMNS = {"AP": ("AP", "AP .5", "AP .75", "AP (M)", "AP (L)", "AR"), "PCK": ("PCK", "AUC", "EPE")}
STAT_MEANINGS = {"AP": "AP and AR: COCOeval (OKS)",
                 "PCK": "PCK@0.2 of the GT box's longer side, AUC (0 to 30 px) and EPE (px): mmpose's hand metrics"}
CROP_ROWS = 4
MIN_LABELLED_JOINTS = 8  # a crop with fewer labelled joints shows little to compare
MIN_TIMED_BATCHES = 3


@dataclass(frozen=True)
class ReportRow:
    name: str
    checkpoint: Path
    log: Path | None  # the run's log.jsonl, plotted as training curves; None for a teacher
    model: str | None = None  # the architecture of an official or mmpose file, which does not record it
    model_args: dict = field(default_factory=dict)


@dataclass(frozen=True)
class ModelResult:
    row: ReportRow
    architecture: str
    stats: dict[str, float]
    params: int
    gflops: float
    images_per_s: float
    crop_keypoints: np.ndarray  # (crops, K, 3): x, y in crop pixels, confidence


def parse_runs(items) -> dict[str, str]:
    """`--runs NAME=DIR` options as {NAME: DIR}."""
    runs = {}
    for item in items:
        name, sep, folder = item.partition("=")
        if not sep or not name or not folder:
            raise OdkdError(f"--runs {item!r}: expected NAME=DIR, e.g. ODKD=runs/demo/student")
        runs[name] = folder
    return runs


def _run_row(name: str, folder: Path) -> ReportRow:
    return ReportRow(name, folder / "best.pth", folder / "log.jsonl")


def same_file(a: str, b: str) -> bool:
    return bool(a) and bool(b) and Path(a).resolve() == Path(b).resolve()


def report_rows(cfg, runs: dict[str, str]) -> tuple[list[ReportRow], list[str]]:
    """The rows to measure, in table order, and a note for each default row that has no checkpoint.
    `runs` replaces default rows of the same name and adds the others; its folders must hold best.pth."""
    rows, notes = [], []
    for name, folder in runs.items():
        if not (Path(folder) / "best.pth").is_file():
            raise OdkdError(f"{Path(folder) / 'best.pth'}: not found (--runs {name}={folder})")
    for role in cfg.teachers.released_roles():
        if role == "init" and not same_file(cfg.student.init, cfg.teachers.init.checkpoint):
            continue  # the students did not start from it: it has no gain to show
        name = TEACHER_ROWS[role]
        tcfg = getattr(cfg.teachers, role)
        if name in runs:
            rows.append(_run_row(name, Path(runs[name])))
        elif tcfg.model in EXTERNAL_KINDS:
            notes.append(f"{name}: skipped, teachers.{role} is an {tcfg.model} file ({tcfg.checkpoint}), "
                         "not a PyTorch model")
        else:
            try:
                rows.append(ReportRow(name, teacher_checkpoint(cfg, role), None, tcfg.model, tcfg.model_args))
            except OdkdError as exc:
                notes.append(f"{name}: skipped, {exc}")
    for name, sub in STUDENT_ROWS.items():
        folder = Path(runs.get(name, Path(cfg.runs) / sub))
        if (folder / "best.pth").is_file():
            rows.append(_run_row(name, folder))
        else:
            notes.append(f"{name}: skipped, {folder / 'best.pth'} not found")
    rows += [_run_row(name, Path(folder)) for name, folder in runs.items()
             if name not in TEACHER_ROWS.values() and name not in STUDENT_ROWS]
    return rows, notes


def pick_instances(instances, count: int) -> list[int]:
    """`count` instance indices spread evenly over those with enough labelled joints (all, if none has)."""
    labelled = [i for i, inst in enumerate(instances.instances)
                if (inst.joints[:, 2] > 0).sum() >= MIN_LABELLED_JOINTS] or list(range(len(instances)))
    spread = np.unique(np.linspace(0, len(labelled) - 1, num=min(count, len(labelled))).round().astype(int))
    return [labelled[i] for i in spread]


@torch.inference_mode()
def cpu_images_per_second(net, eval_cfg, input_size, seconds: float, kset: KeypointSet = COCO_SET) -> float:
    """Images/s of the network's forward passes (and their flipped twins under flip test) on this
    CPU, batches of [eval] batch_size: one warm-up batch, then at least MIN_TIMED_BATCHES timed and
    at least `seconds` long. No decoding and no data loading: the networks are what differs."""
    width, height = input_size
    images = torch.randn(eval_cfg.batch_size, 3, height, width, generator=torch.Generator().manual_seed(0))

    def one_batch():
        predict_batch(net, images, flip_test=eval_cfg.flip_test and kset.mirrored, shift_heatmap=eval_cfg.shift_heatmap,
                      flip_index=kset.flip_index)

    one_batch()  # first-call allocations and kernel choices are not the model's speed
    batches, start = 0, time.perf_counter()
    while batches < MIN_TIMED_BATCHES or time.perf_counter() - start < seconds:
        one_batch()
        batches += 1
    return batches * len(images) / (time.perf_counter() - start)


def crop_keypoints(net, batch: dict, cfg) -> np.ndarray:
    """The model's keypoints on the batch's crops, decoded as [eval] decodes them, in crop pixels."""
    kset = keypoint_set(cfg.data.keypoints)
    keypoints, _ = predict_instances(net, [batch], device=torch.device("cpu"), flip_test=cfg.eval.flip_test and kset.mirrored,
                                     shift_heatmap=cfg.eval.shift_heatmap, decode=cfg.eval.decode,
                                     sigma=cfg.data.sigma, desc="crops", flip_index=kset.flip_index)
    for j, person in enumerate(keypoints):
        person[:, :2] = affine_transform(person[:, :2], frame_from_batch(batch, j).matrix(cfg.data.input_size))
    return keypoints


def measure(row: ReportRow, cfg, split: str, device: str | None, crop_batch: dict,
            speed_seconds: float) -> ModelResult:
    """One table row: the stats on `split`, size, CPU speed, and keypoints on the grid's crops."""
    stats = evaluate_checkpoint(cfg, str(row.checkpoint), split=split, device=device, model=row.model).stats
    net, meta = build_from_checkpoint(row.checkpoint, "cpu", model=row.model, model_args=row.model_args)
    args = ", ".join(f"{k}={v}" for k, v in meta["model_args"].items())
    params, gflops = model_complexity(net, cfg.data.input_size)
    return ModelResult(row=row, architecture=f"{meta['model']}({args})" if args else meta["model"], stats=stats,
                       params=params, gflops=gflops,
                       images_per_s=cpu_images_per_second(net, cfg.eval, cfg.data.input_size, speed_seconds,
                                                          keypoint_set(cfg.data.keypoints)),
                       crop_keypoints=crop_keypoints(net, crop_batch, cfg))


def crop_grid(crops: list[np.ndarray], columns: list[tuple[str, np.ndarray, float]],
              kset: KeypointSet = COCO_SET) -> np.ndarray:
    """One row per crop, one column per (name, keypoints (crops, K, 3), min_score), names on top."""
    def tile(image):
        return cv2.copyMakeBorder(image, 1, 1, 1, 1, cv2.BORDER_CONSTANT, value=(255, 255, 255))

    w = crops[0].shape[1]
    header = []
    for name, _, _ in columns:
        strip = np.zeros((18, w, 3), np.uint8)
        cv2.putText(strip, name, (3, 13), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (255, 255, 255), 1, cv2.LINE_AA)
        header.append(tile(strip))
    rows = [np.concatenate(header, axis=1)]
    for j, crop in enumerate(crops):
        rows.append(np.concatenate([tile(draw_pose(crop, kpts[j], min_score=floor, kset=kset))
                                    for _, kpts, floor in columns], axis=1))
    return np.concatenate(rows, axis=0)


def report_command(cfg, out_dir, runs: dict[str, str], split: str, device: str | None) -> str:
    """The `odkd report` line that makes this report."""
    args = ["odkd", "report"]
    # no --config for the embedded demo pipeline, nor for a config made in Python (no file to name)
    args += ["--config", cfg.source] if Path(cfg.source).is_file() and Path(cfg.source) != DEMO_CONFIG else []
    args += [arg for item in cfg.overrides for arg in ("--set", item)]
    args += ["--out", str(out_dir)] if out_dir else []
    args += ["--split", split] if split != "val" else []
    args += ["--device", device] if device else []
    for name, folder in runs.items():
        args += ["--runs", f"{name}={folder}"]
    return shlex.join(args)


def _table(results: list[ModelResult], out: Path, stat_columns: tuple[str, ...]) -> list[str]:
    head = ["model", "checkpoint", "architecture", *stat_columns, "params (M)", "GFLOPs", "CPU images/s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * 3 + "---:|" * (len(head) - 3)]
    for r in results:
        cells = [r.row.name, f"`{os.path.relpath(r.row.checkpoint, out)}`", r.architecture,
                 *(f"{r.stats[k]:.3f}" for k in stat_columns), f"{r.params / 1e6:.2f}", f"{r.gflops:.3f}",
                 f"{r.images_per_s:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def provenance_lines(results: list[ModelResult]) -> list[str]:
    """Where each student's knowledge came from, as its checkpoint records it: the store and the stages."""
    rows = []
    for r in results:
        extra = read_checkpoint(r.row.checkpoint).extra
        provenance = extra.get("provenance") or {}
        store = provenance.get("store")
        if not store:
            continue
        teachers = ", ".join(f"{key} `{fp}`" for key, fp in store["teachers"].items()) or "none recorded"
        stages = " -> ".join(f"{s['name']} ({s['teacher']}, {s['epochs']})" for s in provenance.get("stages", []))
        chosen = f"epoch {extra['epoch']}" + (f", {extra['stage']}" if extra.get("stage") else "")
        unlabeled = provenance.get("unlabeled_store")
        stores = f"`{store['url']}`" + (f", unlabelled `{unlabeled['url']}` (content `{unlabeled['content_digest']}`)"
                                        if unlabeled else "")
        rows.append([r.row.name, chosen, stores, f"`{store['dataset_fingerprint']}`", teachers,
                     f"`{store['content_digest']}` / `{store['settings_digest']}`", stages])
    if not rows:
        return []
    head = ["model", "checkpoint holds", "store", "dataset", "teachers", "content / settings", "stages (teacher, epochs)"]
    return ["## Where the students learned", "",
            "As each checkpoint records it; `odkd cache info STORE` prints the same digests.", "",
            "| " + " | ".join(head) + " |", "|" + "---|" * len(head),
            *("| " + " | ".join(row) + " |" for row in rows), ""]


def write_report(cfg, out_dir: str | Path | None = None, runs: dict[str, str] | None = None, split: str = "val",
                 device: str | None = None, *, speed_seconds: float = 1.0) -> tuple[Path, list[str]]:
    """Write OUT/report.md (OUT: the config's runs folder by default) with curves.png and crops.png
    next to it; return the report's path and its table of models (markdown lines). A default row
    without a checkpoint becomes a note line."""
    resolve_device(device or cfg.device)  # an unknown device or a missing GPU before anything is written
    runs = dict(runs or {})
    out = Path(out_dir or cfg.runs)
    rows, notes = report_rows(cfg, runs)
    if not rows:
        raise OdkdError(f"{cfg.runs}: no model to report ({'; '.join(notes)})")
    out.mkdir(parents=True, exist_ok=True)
    instances = load_instances(cfg.data, split)
    dataset = TopDownDataset(instances, cfg.data, train=False)
    crop_batch = default_collate([dataset[i] for i in pick_instances(instances, CROP_ROWS)])
    results = [measure(row, cfg, split, device, crop_batch, speed_seconds)
               for row in tqdm(rows, desc="report", unit="model")]
    kset = keypoint_set(cfg.data.keypoints)
    stat = val_stat(kset)
    table = _table(results, out, STAT_COLUMNS[stat])
    logs = {r.name: r.log for r in rows if r.log is not None and r.log.is_file()}
    notes += [f"{r.name}: no training curves, {r.log} not found" for r in rows
              if r.log is not None and not r.log.is_file()]

    w, h = cfg.data.input_size
    flip = "on" if cfg.eval.flip_test else "off"
    lines = [f"# odkd report: {cfg.runs}", "", "```sh", report_command(cfg, out_dir, runs, split, device), "```", "",
             f"Split `{split}` ({len(instances)} person instances, ground-truth boxes), flip test {flip}, "
             f"decode `{cfg.eval.decode}`, input {w}x{h}.", "", "## Models", "", *table, "",
             f"{STAT_MEANINGS[stat]} as `odkd evaluate --checkpoint` gives them. Params and GFLOPs at "
             f"{w}x{h}, a seg head included (`odkd export` drops it). CPU images/s: this machine, "
             f"{torch.get_num_threads()} torch threads, batches of {cfg.eval.batch_size} ([eval] batch_size), "
             f"flip test {flip}, forward passes only, after a warm-up batch; every model measured the same way "
             "in one process.", "", *(f"- {note}" for note in notes), "", *provenance_lines(results)]
    if logs:
        plot_runs_side_by_side(logs, out / "curves.png")
        lines += ["## Training curves", "", f"Losses and val {stat} per epoch; a dashed line ends each stage.", "",
                  "![training curves](curves.png)", ""]
    images = [denormalize_image(chw) for chw in crop_batch["image"].numpy()]
    columns = [("GT", crop_batch["joints"].numpy(), 0.0)]
    columns += [(r.row.name, r.crop_keypoints, cfg.eval.in_vis_thr) for r in results]
    cv2.imwrite(str(out / "crops.png"), crop_grid(images, columns, kset))
    lines += [f"## Predictions on {split} crops", "",
              f"Rows: {len(images)} {split} instances spread over the split; columns: the ground truth, then each "
              f"model's keypoints (confidence above {cfg.eval.in_vis_thr}, decoded as `{cfg.eval.decode}`)."
              # a set without mirror pairs draws every point in one colour
              + (" Left limbs orange, right limbs blue." if kset.flip_pairs else ""),
              "", "![predictions](crops.png)", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path, table
