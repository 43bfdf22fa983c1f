"""The `odkd` command line: parse, load the pipeline config, call one function per command.

User errors (OdkdError) print as one line ("Error: ...") and exit 1; usage errors exit 2.
Results go to stdout. The library logs under `odkd`; this is the one module that prints that log:
bare lines on stderr, INFO and up unless a command's -v/-q say otherwise.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import shlex
import sys
import time
from pathlib import Path

import click
from tqdm import tqdm

from odkd import __version__
from odkd import config
from odkd.config import CACHE_SPLITS, EvalConfig, check_device, choices
from odkd.errors import OdkdError

CONFIG_HELP = "Pipeline TOML (default: the embedded demo pipeline, pipeline/demo.toml)."
SET_HELP = ("Change one key of the config after its extends, before it is checked: VALUE is read as TOML, "
            "a bare word as a string; arrays of tables take an index from 0. E.g. --set student.train.lr=1e-3 "
            "--set 'student.stages[1].seg_weight=0.01'. Repeatable.")


def one_line(message: str) -> str:
    """The user's line of an error; a DataLoader worker re-raises it under its own traceback text."""
    lines = message.strip().splitlines()
    if len(lines) > 1 and "Original Traceback" in message:
        return lines[-1].removeprefix(f"{OdkdError.__module__}.{OdkdError.__name__}: ")
    return lines[0]


def _tell_torchrun(line: str) -> None:
    """Under torchrun, the error line is also what torchrun's failure summary shows for this rank: its
    TORCHELASTIC_ERROR_FILE (torch's own layout, the line where it puts a traceback), read in place of
    'To enable traceback see: ...'."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if path:
        record = {"message": f"Error: {line}",
                  "extraInfo": {"py_callstack": f"Error: {line}", "timestamp": str(int(time.time()))}}
        try:
            Path(path).write_text(json.dumps({"message": record}))
        except OSError:
            pass


def load_config(path, overrides=()):
    """The pipeline of --config and --set, with every model it names and their model_args checked too."""
    from odkd.models.registry import check_configured_models

    cfg = config.load_config(path, overrides)
    check_configured_models(cfg)
    return cfg


def user_errors(fn):
    """Turn an OdkdError into click's one-line usage failure instead of a traceback. Under torchrun an
    error that every rank raises together (FailedOnARank) is printed by rank 0 alone; the others exit
    with the same code in silence."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except OdkdError as exc:
            if not getattr(exc, "shown_here", True):
                raise click.exceptions.Exit(1) from None
            line = one_line(str(exc))
            _tell_torchrun(line)
            raise click.ClickException(line) from None

    return wrapper


def set_option(fn):
    return click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=SET_HELP)(fn)


def config_option(fn):
    """--config and --set, which every command that reads the pipeline config takes."""
    return click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
                        help=CONFIG_HELP)(set_option(fn))


class _StderrLines(logging.Handler):
    """Prints each log record as its bare message on stderr, above the tqdm bars rather than through them."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:
            self.handleError(record)


_STDERR_LINES = _StderrLines()


def log_level(verbose: int, quiet: int) -> int:
    """INFO by default; each -v one step towards DEBUG, each -q one towards ERROR."""
    return min(logging.ERROR, max(logging.DEBUG, logging.INFO + 10 * (quiet - verbose)))


def _set_verbosity(ctx: click.Context, param: click.Parameter, count: int) -> None:
    """The one place that sets up the `odkd` logger, for the run of one command; -v and -q each call it."""
    counts = ctx.meta.setdefault("odkd.verbosity", {"verbose": 0, "quiet": 0})
    counts[param.name] = count
    logger = logging.getLogger("odkd")
    if _STDERR_LINES not in logger.handlers:
        before = logger.level, logger.propagate

        def restore():
            logger.removeHandler(_STDERR_LINES)
            logger.setLevel(before[0])
            logger.propagate = before[1]

        logger.addHandler(_STDERR_LINES)
        # a root handler (one that a dependency set up) would print every line a second time, with its own format
        logger.propagate = False
        # a caller that runs commands in-process (tests, scripts) gets the logger back as it found it
        ctx.call_on_close(restore)
    logger.setLevel(log_level(**counts))


class _Command(click.Command):
    """An odkd command: it also takes -v/--verbose and -q/--quiet, which set how much of the log it prints."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.params += [
            click.Option(["-v", "--verbose"], count=True, expose_value=False, callback=_set_verbosity,
                         help="Print the details too (the debug log)."),
            click.Option(["-q", "--quiet"], count=True, expose_value=False, callback=_set_verbosity,
                         help="Print warnings and errors only; -qq errors only."),
        ]


class _Group(click.Group):
    """The odkd command groups: their commands are _Commands, their groups are _Groups."""

    command_class = _Command
    group_class = type


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="odkd")
def main():
    """odkd: orderly dual-teacher knowledge distillation for lightweight human-pose networks.

    \b
    A typical run (make demo, with the released demo teachers in zoo/):
      odkd synth --force data/demo-teachers --train-images 1000 --val-images 100 --difficulty easy --seed 0
      odkd synth --force data/demo --train-images 200 --val-images 100 --test-images 200 --unlabeled-images 2000
          --difficulty easy --seed 1             # the student's data: 200 labelled images, 2,000 unlabelled
      odkd check-teachers                        # the pinned teacher files, trained on data/demo-teachers
      odkd cache-teachers                        # both teachers once over the labelled people: cache/demo.zarr
      odkd cache-teachers --split unlabeled      # and over the detector's boxes: cache/demo_unlabeled.zarr
      odkd train-student --variant gt            # the baseline: ground truth alone
      odkd train-student                         # orderly PT -> ST from both stores, no teacher loaded
      odkd report --split test                   # runs/demo/report.md: every model's AP, size, speed
      odkd export --checkpoint runs/demo/student/best.pth --out student.onnx

    Your own teachers: odkd train-teacher --role primary|senior, then odkd release-teacher
    (--role init: a students' starting point trained on the teachers' data, [teachers.init]).
    """


@main.command()
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--train-images", default=200, show_default=True, help="Images in the train split.")
@click.option("--val-images", default=50, show_default=True, help="Images in the val split.")
@click.option("--test-images", default=0, show_default=True,
              help="Images in a held-out test split (none: no test files); train and val do not change with it.")
@click.option("--difficulty", default="medium", show_default=True,
              help="easy, medium, hard or a number in [0, 1] (easy 0, medium 0.5, hard 1): crowding, "
                   "occlusion, clutter and how small people are.")
@click.option("--label-noise", default=0.0, show_default=True, type=float,
              help="Annotator noise on the train split's keypoints, in COCO's per-keypoint sigmas (1: as far "
                   "apart as COCO's annotators); val and test stay exact, the images do not change.")
@click.option("--missing-labels", default=0.0, show_default=True, type=float,
              help="Share of the train split's keypoints left unlabelled (v=0, as COCO stores a skipped joint); "
                   "val and test stay complete, the images do not change.")
@click.option("--unlabeled-images", default=0, show_default=True,
              help="Images nobody labelled, as COCO's unlabeled2017 (none: no such files): images/unlabeled/*.jpg, "
                   "annotations/image_info_unlabeled.json (image info, no annotations), "
                   "person_detections_unlabeled.json (an imitated person detector's boxes and scores) and "
                   "annotations/person_keypoints_unlabeled_true.json (their true labels, to score pseudo-labels "
                   "with odkd evaluate); train, val and test do not change with it.")
@click.option("--seed", default=0, show_default=True, help="Same seed, same bytes.")
@click.option("--keypoints", type=click.Choice(["coco", "crowdpose", "coco_wholebody", "ap10k", "hand21"]),
              default="coco", show_default=True,
              help="The labels' keypoint set and format: COCO's 17, CrowdPose's 14 (head and neck added, no "
                   "'area'), COCO-WholeBody's own format (feet labelled, face and hands not), AP-10K's 17 (the "
                   "body's points re-labelled as an animal's, species dog and cat) or hand21 (one hand an image, "
                   "21 points laid over the painted hand); the images do not change. Read it with [data] "
                   "keypoints = the same name.")
@click.option("--force", is_flag=True,
              help="Replace the dataset OUT_DIR already holds: remove what odkd synth wrote there (images/, "
                   "annotations/, the detections file) first. Without it such a folder is refused.")
@user_errors
def synth(out_dir, train_images, val_images, test_images, difficulty, label_noise, missing_labels, unlabeled_images,
          seed, keypoints, force):
    """Write a synthetic COCO-format person-keypoints dataset to OUT_DIR.

    OUT_DIR/images/{train,val,test}/*.jpg and OUT_DIR/annotations/person_keypoints_{train,val,test}.json,
    in exactly COCO 2017's format (test only with --test-images; unlabelled images with --unlabeled-images).
    A folder that already holds a dataset is refused unless --force.
    """
    from odkd.synth import make_synthetic_dataset

    summary = make_synthetic_dataset(out_dir, train_images=train_images, val_images=val_images, seed=seed,
                                     progress=True, test_images=test_images, difficulty=difficulty,
                                     label_noise=label_noise, missing_labels=missing_labels,
                                     unlabeled_images=unlabeled_images, existing="replace" if force else "refuse",
                                     keypoints=keypoints)
    click.echo(json.dumps(summary, indent=2))


@main.command()
@click.option("--ann", type=click.Path(dir_okay=False), help="COCO-format ground truth (person_keypoints_*.json).")
@click.option("--results", type=click.Path(dir_okay=False), help="COCO keypoint results JSON to score.")
@click.option("--gt-as-results", is_flag=True, help="Score the ground truth against itself (must give AP 1.000).")
@config_option
@click.option("--checkpoint", type=click.Path(dir_okay=False), help="Model to evaluate on the config's data.")
@click.option("--model", "model_name", default=None,
              help="Architecture of an official HRNet or mmpose checkpoint (e.g. hrnet_w32); odkd files record it.")
@click.option("--split", type=click.Choice(CACHE_SPLITS), default="val", show_default=True,
              help="'unlabeled': the crops of [data.unlabeled] boxes (what a pseudo-label store holds), "
                   "scored against --ann, those images' true labels.")
@click.option("--boxes", default="gt", show_default=True,
              help="'gt' for ground-truth boxes, or a COCO detections JSON (bbox + score per person).")
@click.option("--flip-test/--no-flip-test", default=None, help="Average with the mirrored input (default: [eval]).")
@click.option("--decode", type=click.Choice(choices(EvalConfig, "decode")), default=None,
              help="Heatmap decoder (default: [eval] decode).")
@click.option("--out", type=click.Path(dir_okay=False), help="Write the keypoint results JSON here.")
@click.option("--stats-json", type=click.Path(dir_okay=False),
              help="Write the stats as JSON here: COCO's 10, or PCK, AUC and EPE for a set without OKS sigmas.")
@click.option("--device", default=None, help="auto, cpu, cuda, cuda:N or mps (default: the config's).")
@user_errors
def evaluate(ann, results, gt_as_results, config_path, overrides, checkpoint, model_name, split, boxes, flip_test,
             decode, out, stats_json, device):
    """COCO OKS AP with pycocotools COCOeval (iouType 'keypoints'); for a keypoint set without OKS sigmas
    (hands), PCK@0.2 of the box, AUC (0 to 30 px) and EPE (px), as mmpose scores hands.

    \b
    Score a results file:   odkd evaluate --ann GT.json --results RESULTS.json
    Evaluate a model:       odkd evaluate --config PIPELINE.toml --checkpoint CKPT [--boxes DETS.json]
    Score pseudo-labels:    odkd evaluate --checkpoint TEACHER --split unlabeled --ann TRUE.json
    """
    from odkd.eval import metrics

    if checkpoint:
        if results or gt_as_results or ann and split != "unlabeled":
            raise click.UsageError("--checkpoint evaluates on the config's data; drop --ann/--results "
                                   "(--ann goes with --split unlabeled)")
        from odkd.eval.evaluate import evaluate_checkpoint

        cfg = load_config(config_path, overrides)
        if decode:
            cfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, decode=decode))
        report = evaluate_checkpoint(cfg, checkpoint, split=split, boxes=boxes, flip_test=flip_test,
                                     results_out=out, device=device, model=model_name, ann=ann)
        stats = report.stats
        click.echo(metrics.format_stats_table(stats))
        for part, part_stats in report.parts.items():
            click.echo(f"\n{part} (its points alone, its sigmas)\n{metrics.format_stats_table(part_stats)}")
        for group, group_stats in report.crowd.items():
            low, high = metrics.CROWD_GROUPS[group]
            click.echo(f"\n{group}: images of crowd index {low:g} to {high:g}\n{metrics.format_stats_table(group_stats)}")
        if report.mask_iou is not None:
            click.echo(f"mean mask IoU: {report.mask_iou:.3f}")
        if out:
            click.echo(f"wrote {len(report.results)} results to {out}")
    else:
        if not ann or not (results or gt_as_results):
            raise click.UsageError("give --ann GT.json with --results RESULTS.json (or --gt-as-results), "
                                   "or --checkpoint CKPT")
        from odkd.data.keypoints import keypoint_set, oks_sigmas

        # with --config, the files are scored as its [data] keypoints set: its K and sigmas (PCK without any)
        kset = keypoint_set(load_config(config_path, overrides).data.keypoints if config_path else "coco")
        sigmas = oks_sigmas(kset)
        gt = metrics.load_gt(ann, kset.num_keypoints)
        dets = metrics.gt_as_results(gt) if gt_as_results else metrics.load_results(results, kset.num_keypoints)
        stats = (metrics.coco_keypoint_eval(gt, dets, sigmas=sigmas) if sigmas is not None
                 else metrics.pck_keypoint_eval(gt, dets, results or "results"))
        click.echo(metrics.format_stats_table(stats))
    if stats_json:
        metrics.write_stats_json(stats, stats_json)


@main.command()
@config_option
@click.option("--split", type=click.Choice(["train", "val", "test"]), default="train", show_default=True)
@click.option("--out", "out_dir", type=click.Path(file_okay=False), required=True, help="Folder for the PNGs.")
@click.option("--augment", is_flag=True, help="Apply the training augmentation of [data.augment].")
@click.option("-n", "count", default=16, show_default=True, help="How many instances (spread over the split).")
@click.option("--seed", default=0, show_default=True)
@user_errors
def browse(config_path, overrides, split, out_dir, augment, count, seed):
    """Write instance crops with keypoints, skeleton, mask and targets drawn, to check the data by eye."""
    from odkd.data.browse import browse_dataset

    cfg = load_config(config_path, overrides)
    paths = browse_dataset(cfg.data, split, out_dir, augment=augment, count=count, seed=seed)
    click.echo(f"wrote {len(paths)} PNGs to {out_dir}")


@main.command()
@config_option
@user_errors
def models(config_path, overrides):
    """List every model with its parameters and GFLOPs at the configured input size, then the config's
    teachers and student as configured (model_args and seg heads included)."""
    from odkd.models.complexity import configured_models, list_models

    cfg = load_config(config_path, overrides)
    registered, configured = list_models(cfg.data.input_size), configured_models(cfg)  # every check, then print
    w, h = cfg.data.input_size
    flops = f"GFLOPs @{w}x{h}"
    click.echo(f"{'model':<18} {'params (M)':>11} {flops:>16}")
    for row in registered:
        click.echo(f"{row['name']:<18} {row['params'] / 1e6:>11.2f} {row['gflops']:>16.3f}")
    click.echo(f"\nconfigured in {cfg.source} (seg heads included; export drops them)")
    click.echo(f"{'role':<8} {'model':<18} {'params (M)':>11} {flops:>16}  model_args")
    for row in configured:
        args = ", ".join(f"{k}={v}" for k, v in row["model_args"].items()) or "-"
        size = (f"{'(its file)':>11} {'':>16}" if row["params"] is None
                else f"{row['params'] / 1e6:>11.2f} {row['gflops']:>16.3f}")
        click.echo(f"{row['role']:<8} {row['name']:<18} {size}  {args}")


@main.command("train-teacher")
@config_option
@click.option("--role", type=click.Choice(["primary", "senior", "init"]), required=True,
              help="primary: keypoints only; senior: keypoints + person mask; init: the students' starting point "
                   "([teachers.ROLE]).")
@click.option("--out", type=click.Path(file_okay=False), help="Run folder (default: RUNS/teacher_ROLE).")
@click.option("--resume", is_flag=True, help="Continue exactly from OUT/last.pth.")
@click.option("--init", type=click.Path(dir_okay=False), default=None,
              help="Start from these weights (official HRNet, mmpose or odkd file); overrides [teachers.ROLE].init.")
@click.option("--device", default=None, help="auto, cpu, cuda, cuda:N or mps (default: the config's).")
@user_errors
def train_teacher_cmd(config_path, overrides, role, out, resume, init, device):
    """Train the primary or the senior teacher, or the students' init; writes last.pth, best.pth and log.jsonl."""
    from odkd.train.teacher import train_teacher

    cfg = load_config(config_path, overrides)
    summary = train_teacher(cfg, role, out=out, resume=resume, init=init, device=device)
    click.echo(json.dumps(summary, indent=2))


@main.command("release-teacher")
@config_option
@click.option("--role", type=click.Choice(["primary", "senior", "init"]), required=True)
@click.option("--from", "source", type=click.Path(dir_okay=False), default=None,
              help="The trained file (default: RUNS/teacher_ROLE/best.pth).")
@click.option("--device", default=None, help="Evaluation device (default: the config's).")
@user_errors
def release_teacher_cmd(config_path, overrides, role, source, device):
    """Pack a trained teacher (or the students' init) as float16 weights into [teachers.ROLE] checkpoint.

    The file records the train split's dataset fingerprint and the val stats of the packed weights
    (GT boxes, [eval] flip_test and decode). Prints the fingerprint to put in [teachers.ROLE] fingerprint.
    """
    from odkd.train.release import release_teacher
    from odkd.train.teacher import default_teacher_dir

    cfg = load_config(config_path, overrides)
    source = source or str(default_teacher_dir(cfg, role) / "best.pth")
    meta = release_teacher(cfg, role, source, device=device)
    release = meta["release"]
    size = Path(getattr(cfg.teachers, role).checkpoint).stat().st_size
    click.echo(f"{getattr(cfg.teachers, role).checkpoint}: {size / 1e6:.2f} MB, val AP {release['val_stats']['AP']:.3f}, "
               f"trained on {release['train_data']['dataset_fingerprint']}")
    click.echo(f'[teachers.{role}] fingerprint = "{meta["fingerprint"]}"')


@main.command("check-teachers")
@config_option
@user_errors
def check_teachers_cmd(config_path, overrides):
    """Check both teacher files (and the students' init, where [teachers.init] names one) before use: each
    has the [teachers.ROLE] fingerprint, and a released file was trained on the dataset that [data] names
    now (same dataset fingerprint)."""
    from odkd.train.release import check_teacher

    cfg = load_config(config_path, overrides)
    for role in cfg.teachers.released_roles():
        click.echo(check_teacher(cfg, role).line())


@main.command("train-student")
@config_option
@click.option("--cache", "cache_url", default=None,
              help="Teacher store: a path or an fsspec URL (http, s3, gs); default: [student] cache.")
@click.option("--variant", default=None, metavar="NAME",
              help="Train an ablation variant (gt, pt, st, joint, orderly, reverse, disc, disc_conf, gaussian, "
                   "gaussian_conf, soft, no_mask, mask_gate, orderly+unlabeled, st+unlabeled) made from "
                   "[[student.stages]] instead of the stages as written; gt is the GT-only baseline. Only the "
                   "+unlabeled ones read [student] unlabeled_cache.")
@click.option("--out", type=click.Path(file_okay=False),
              help="Run folder (default: RUNS/student, or RUNS/student_VARIANT).")
@click.option("--resume", is_flag=True, help="Continue exactly from OUT/last.pth, mid-stage too.")
@click.option("--device", default=None, help="auto, cpu, cuda, cuda:N or mps (default: the config's).")
@user_errors
def train_student_cmd(config_path, overrides, cache_url, variant, out, resume, device):
    """Train the [student] from the teacher store, stage by stage ([[student.stages]]).

    No teacher is loaded: the targets come from the store that cache-teachers wrote, warped into
    each augmented crop. Writes last.pth, best.pth, stage_NAME.pth, log.jsonl and curves.png.
    Several processes: torchrun --standalone --nproc_per_node N -m odkd train-student ...
    """
    from odkd.train.distributed import agree_on_checks, launched_ranks
    from odkd.train.student import train_student

    try:
        cfg = load_config(config_path, overrides)
        if variant:
            from odkd.distill.variants import with_variant

            cfg = with_variant(cfg, variant)
            out = out or str(Path(cfg.runs) / f"student_{variant}")
    except OdkdError as exc:  # under torchrun the other ranks learn of it where train_student's checks end
        agree_on_checks(launched_ranks(), exc)
    summary = train_student(cfg, cache=cache_url, out=out, resume=resume, device=device)
    if summary is not None:
        click.echo(json.dumps(summary, indent=2))


@main.command("report")
@config_option
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Folder for report.md and its PNGs (default: RUNS).")
@click.option("--split", type=click.Choice(["val", "test"]), default="val", show_default=True,
              help="The split every model is scored on and the grid's crops are drawn from.")
@click.option("--runs", "extra_runs", multiple=True, metavar="NAME=DIR",
              help="A row from a run folder (best.pth, log.jsonl); replaces PT, ST, GT-only or ODKD by name, "
                   "adds any other name. Repeatable.")
@click.option("--device", default=None, help="Evaluation device (default: the config's); speed is always CPU.")
@user_errors
def report_cmd(config_path, overrides, out_dir, split, extra_runs, device):
    """Write RUNS/report.md: AP (PCK, AUC and EPE for a keypoint set without OKS sigmas), size and CPU
    speed of PT, ST, the GT-only student (RUNS/student_gt) and the ODKD student (RUNS/student) on
    --split, their training curves and predictions on crops of that split. A model without a checkpoint
    is a note in the report."""
    from odkd.apps.report import parse_runs, write_report

    cfg = load_config(config_path, overrides)
    path, table = write_report(cfg, out_dir, parse_runs(extra_runs), split, device)
    click.echo("\n".join(table))
    click.echo(f"report in {path}")


@main.command()
@config_option
@click.option("--seeds", default=3, show_default=True,
              help="Runs per variant: seeds S, S+1, ... from [student.train] seed.")
@click.option("--variants", default=None,
              help="Comma-separated: gt, pt, st, joint, orderly, reverse, disc, disc_conf, gaussian, gaussian_conf, "
                   "soft, no_mask, mask_gate, orderly+unlabeled, st+unlabeled (default: all; the +unlabeled ones "
                   "when [student] unlabeled_cache is set).")
@click.option("--split", type=click.Choice(["val", "test"]), default=None,
              help="Where the runs' last.pth are scored (default: test if [data] test_ann exists, else val).")
@click.option("--out", type=click.Path(file_okay=False), help="Runs and report (default: RUNS/ablation).")
@click.option("--device", default=None, help="auto, cpu, cuda, cuda:N or mps (default: the config's).")
@user_errors
def ablate(config_path, overrides, seeds, variants, split, out, device):
    """Train every variant of the student from the same teacher store, seeds and total epochs.

    Writes OUT/VARIANT/seedS (finished runs are reused, unfinished ones resumed), then
    OUT/ablation.md and OUT/ablation.json: AP, AP .5 and AR (PCK, AUC and EPE for a keypoint set
    without OKS sigmas) as mean +- std over the seeds of each run's last.pth, the method's hypotheses
    checked against that spread with the runs also paired by seed, and AP (PCK) per seed.
    """
    from odkd.apps.ablate import ablation_table, run_ablation

    cfg = load_config(config_path, overrides)
    names = [name.strip() for name in variants.split(",") if name.strip()] if variants else None
    summary = run_ablation(cfg, seeds=seeds, variants=names, split=split, out=out, device=device,
                           command=shlex.join(["odkd", *sys.argv[1:]]))
    click.echo(ablation_table(summary))
    click.echo(f"ablation in {summary['out']}/ablation.md and ablation.json")


@main.command()
@click.argument("image", type=click.Path(dir_okay=False))
@click.option("--checkpoint", type=click.Path(dir_okay=False), required=True, help="An odkd, official or mmpose checkpoint.")
@click.option("--model", "model_name", default=None, help="Architecture of an official or mmpose checkpoint.")
@click.option("--boxes", type=click.Path(dir_okay=False), help="JSON list of [x, y, w, h] boxes or detections.")
@click.option("--ann", type=click.Path(dir_okay=False), help="Take the person boxes of IMAGE from this COCO file.")
@click.option("--out", type=click.Path(dir_okay=False), required=True,
              help="Output picture, in the format of its extension: .png (lossless), .jpg, or another that OpenCV "
                   "writes (.bmp, .tif, .webp).")
@config_option
@click.option("--flip-test/--no-flip-test", default=None, help="Average with the mirrored input (default: [eval]).")
@click.option("--device", default=None, help="auto, cpu, cuda, cuda:N or mps (default: the config's).")
@user_errors
def predict(image, checkpoint, model_name, boxes, ann, out, config_path, overrides, flip_test, device):
    """Draw the predicted skeletons (and the person mask of a seg-head model) over IMAGE."""
    from odkd.config import resolve_device
    from odkd.data.keypoints import keypoint_set
    from odkd.models import build_from_checkpoint
    from odkd.eval.predict import boxes_from_annotations, boxes_from_file, check_picture_name, predict_to_png

    if bool(boxes) == bool(ann):
        raise click.UsageError("give exactly one of --boxes BOXES.json or --ann GT.json")
    check_picture_name(out)
    cfg = load_config(config_path, overrides)
    dev = resolve_device(device or cfg.device)
    model, _ = build_from_checkpoint(checkpoint, dev, model=model_name)
    person_boxes = boxes_from_file(boxes) if boxes else boxes_from_annotations(ann, image)
    flip_test = cfg.eval.flip_test if flip_test is None else flip_test
    keypoints = predict_to_png(model, image, person_boxes, cfg.data.input_size, out, device=dev, flip_test=flip_test,
                               decode=cfg.eval.decode, sigma=cfg.data.sigma, kset=keypoint_set(cfg.data.keypoints))
    click.echo(f"{len(keypoints)} {'person' if len(keypoints) == 1 else 'people'} drawn to {out}")


@main.command("export")
@click.option("--checkpoint", type=click.Path(dir_okay=False), required=True,
              help="An odkd, official or mmpose checkpoint.")
@click.option("--out", type=click.Path(dir_okay=False), required=True,
              help="student.onnx for ONNX, student.pt for TorchScript.")
@click.option("--input-size", type=(int, int), default=None, metavar="W H",
              help="Input width and height (default: the checkpoint's, else the config's [data] input_size).")
@click.option("--model", "model_name", default=None, help="Architecture of an official or mmpose checkpoint.")
@config_option
@click.option("--device", default="cpu", show_default=True,
              help="cpu, cuda, cuda:N: where the model is traced and PyTorch's heatmaps are computed for the check "
                   "(a TorchScript file traced on CUDA holds CUDA tensors; onnxruntime checks on the CPU).")
@user_errors
def export_cmd(checkpoint, out, input_size, model_name, config_path, overrides, device):
    """Write the model as ONNX or TorchScript, heatmaps only, and check it against PyTorch.

    The seg head is dropped: the file maps `image` (N, 3, H, W) to `heatmaps` (N, K, H/4, W/4),
    with a dynamic batch axis. ONNX needs the export extra: pip install 'odkd[export]'.
    """
    from odkd.config import resolve_device
    from odkd.models.export import export_model

    cfg = load_config(config_path, overrides)
    report = export_model(checkpoint, out, input_size=input_size, config_input_size=cfg.data.input_size,
                          model=model_name, device=resolve_device(device))
    click.echo(report.summary())


@main.command("cache-teachers")
@config_option
@click.option("--split", type=click.Choice(CACHE_SPLITS), default="train", show_default=True,
              help="'unlabeled': the detector's boxes on the images of [data.unlabeled].")
@click.option("--out", default=None,
              help="Store path or fsspec URL, e.g. s3://bucket/coco.zarr with odkd[s3] and AWS_* set (default: "
                   "[cache] store; for --split unlabeled, [cache] unlabeled_store).")
@click.option("--workers", type=int, default=None,
              help="LocalCluster worker processes (default: [cache] workers); with --device cuda, each gets one GPU.")
@click.option("--scheduler", default=None, help="Address of an existing dask scheduler, e.g. tcp://host:8786.")
@click.option("--decode-threads", type=int, default=None,
              help="Image decode and crop threads per worker (default: [cache] decode_threads).")
@click.option("--batch-size", type=int, default=None, help="Teacher batch size (default: [cache] batch_size).")
@click.option("--device", default=None, help="auto, cpu, cuda, cuda:N or mps (default: the config's).")
@click.option("--overwrite", is_flag=True, help="Rebuild from scratch. Without it a store with the same settings resumes and one with other settings is refused.")
@click.option("--limit", type=int, default=None, help="Cache only the first N instances (a quick trial).")
@user_errors
def cache_teachers(config_path, overrides, split, out, workers, scheduler, decode_threads, batch_size, device,
                   overwrite, limit):
    """Run PT and ST once over every person instance of SPLIT into a sharded Zarr store.

    With --split unlabeled the instances are the boxes of [data.unlabeled]: a pseudo-label store for
    [student] unlabeled_cache. Binarized, bit-packed heatmaps of both teachers and ST's mask, with provenance. Interrupted
    builds resume: finished shards are kept and skipped.
    """
    from odkd.teachers.build import build_teacher_store
    from odkd.store.info import store_precision_line

    cfg = load_config(config_path, overrides)
    if device:  # a scheduler's workers resolve it on their own machines: its spelling is checked here
        check_device(device)
    summary = build_teacher_store(cfg, split, out, workers=workers, scheduler=scheduler, batch_size=batch_size,
                                  device=device or cfg.device, overwrite=overwrite, limit=limit,
                                  decode_threads=decode_threads)
    if not summary.written:
        click.echo(f"{summary.url}: already complete ({summary.skipped} shard{'s' * (summary.skipped > 1)} "
                   f"checked), nothing built; --overwrite rebuilds it")
    click.echo(f"teacher targets in {summary.url}")
    click.echo(f"precision: {store_precision_line(summary.url, cfg.cache.storage_options or None)}")


@main.group()
def cache():
    """Inspect and check teacher-target stores."""


@cache.command("info")
@click.argument("store")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
              help="Pipeline TOML whose [cache] storage_options reach STORE (an s3:// endpoint, say); "
                   "without it, the AWS_* environment alone.")
@set_option
@user_errors
def cache_info_cmd(store, config_path, overrides):
    """Counts, sizes, bytes per instance, compression, provenance and build progress of STORE."""
    from odkd.store import cache_info

    if overrides and not config_path:
        raise click.UsageError("--set changes keys of --config; give --config too")
    options = load_config(config_path, overrides).cache.storage_options if config_path else None
    click.echo(cache_info(store, options or None))


@cache.command("verify")
@click.argument("store")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
              help="Pipeline TOML of the store's dataset and teachers; without it only the shards are checked.")
@set_option
@click.option("--sample", default=16, show_default=True, help="Instances to re-run through the teachers.")
@click.option("--no-replay", is_flag=True,
              help="With --config: check the shards and the dataset fingerprint, not the teachers (without it, "
                   "teacher files that cannot be loaded fail the check).")
@click.option("--device", default="cpu", show_default=True)
@user_errors
def cache_verify_cmd(store, config_path, overrides, sample, no_replay, device):
    """Check that every shard is complete and decodes; with --config, the dataset fingerprint and a
    re-run of a sample through the teachers. Exits 1 when anything fails."""
    from odkd.teachers import verify_cache

    if overrides and not config_path:
        raise click.UsageError("--set changes keys of --config; give --config too")
    cfg = load_config(config_path, overrides) if config_path else None
    if no_replay and not config_path:
        raise click.UsageError("--no-replay limits what --config checks; give --config too")
    report = verify_cache(store, cfg, sample=sample, device=device, replay=not no_replay,
                          storage_options=(cfg.cache.storage_options or None) if cfg else None)
    click.echo(str(report))
    if not report.ok:
        raise SystemExit(1)


@cache.command("score")
@click.argument("store")
@click.option("--ann", "ann_file", required=True, type=click.Path(dir_okay=False),
              help="COCO keypoint labels of the store's images: its split's file, or labels of some of the "
                   "unlabelled images (a synthetic dataset writes person_keypoints_unlabeled_true.json).")
@config_option
@click.option("--floors", default=None, help="The conf_floor values to count at, comma-separated "
                                              "(default: 0.5, 0.6, 0.7, 0.8 and 0.9).")
@user_errors
def cache_score_cmd(store, ann_file, config_path, overrides, floors):
    """How good each teacher's stored joints are, against labels of the same people: OKS AP as predictions,
    and at each conf_floor the share of the labelled joints a stage would teach right, the share of what
    it teaches that is right, and how many joints it teaches. The keypoint set and [cache]
    storage_options come from --config."""
    from odkd.apps.pseudo_labels import DEFAULT_FLOORS, format_store_score, score_store
    from odkd.data.keypoints import keypoint_set

    try:
        levels = DEFAULT_FLOORS if floors is None else tuple(float(f) for f in floors.split(","))
    except ValueError:
        raise click.BadParameter(f"{floors!r}: give numbers, comma-separated", param_hint="--floors") from None
    cfg = load_config(config_path, overrides)
    score = score_store(store, ann_file, keypoint_set(cfg.data.keypoints), floors=levels,
                        storage_options=cfg.cache.storage_options or None)
    click.echo(format_store_score(score, store, ann_file))


@cache.command("copies")
@click.option("--prune", is_flag=True, help="Remove the copies that no running process holds.")
@click.option("--older-than", "older_than", type=click.FloatRange(min=0), default=None, metavar="DAYS",
              help="With --prune: only those no run has used for DAYS days.")
@click.option("--verify", is_flag=True, help="Check every file of every copy against its manifest (sizes, SHA-256).")
@user_errors
def cache_copies_cmd(prune, older_than, verify):
    """The local copies of stores on this machine ($ODKD_LOCAL_COPIES, else ~/.cache/odkd/local-copies):
    the store each holds, its size, when a run last used it, which running processes hold it. A run checks
    its copy before it starts and makes a damaged one again; --verify checks them all now. Exits 1 when a
    copy is damaged."""
    from odkd.store.copies import copies_table, list_copies, prune_copies, verify_copy
    from odkd.store.local import local_copies_root

    if older_than is not None and not prune:
        raise click.UsageError("--older-than chooses what --prune removes; give --prune too")
    root = local_copies_root()
    if prune:
        removed = prune_copies(root, None if older_than is None else older_than * 86400)
        freed = sum(copy.bytes for copy in removed)
        click.echo(f"removed {len(removed)} local cop{'y' if len(removed) == 1 else 'ies'} "
                   f"({freed / 1e6:.1f} MB): " + (", ".join(c.folder.name for c in removed) or "none"))
    copies = list_copies(root)
    click.echo(copies_table(copies, root))
    if verify:
        damaged = 0
        for copy in copies:
            for name, problem in verify_copy(copy).items():
                damaged += problem is not None
                click.echo(f"{'FAIL' if problem else 'ok  '} {copy.folder.name}/{name}" + (f": {problem}" if problem else ""))
        if damaged:
            click.echo(f"{damaged} damaged array cop{'y' if damaged == 1 else 'ies'}: the next run that uses each "
                       f"makes it again from its store (or --prune removes the copies no run holds)")
            raise SystemExit(1)


if __name__ == "__main__":  # pragma: no cover
    main()
