"""odkd report: one table row per model with evaluate's AP of that row's own checkpoint, the curves and
crop grid as real PNGs, missing runs as notes, and --runs rows from the command line."""

from __future__ import annotations

import shutil
from pathlib import Path

import cv2
import pytest
import numpy as np
import torch
from click.testing import CliRunner
from torch.utils.data import default_collate

from odkd.apps.report import CROP_ROWS, crop_keypoints, pick_instances, write_report
from odkd.cli import main
from odkd.config import parse_config
from odkd.data.dataset import TopDownDataset
from odkd.data.instances import load_instances
from odkd.data.transforms import affine_transform, invert_affine
from odkd.errors import OdkdError
from odkd.eval.evaluate import evaluate_checkpoint
from odkd.eval.evaluate import predict_instances
from odkd.models import build_from_checkpoint, read_checkpoint
from odkd.synth import make_synthetic_dataset
from odkd.teachers import build_cache
from odkd.train.student import train_student
from conftest import TINY_TEACHERS_TOML, ZOO, from_zoo_primary, hrnet_tiny_teachers_toml
from test_student import TWO_STAGES, student_toml

pytestmark = pytest.mark.usefixtures("one_torch_thread")
GT_ONLY = """
[[student.stages]]
name = "gt"
epochs = 1
teacher = "none"
"""
ODKD = TWO_STAGES.replace("epochs = 2", "epochs = 1")  # one epoch each
ZOO_TEACHERS_TOML = hrnet_tiny_teachers_toml(12, 32)  # pipeline/demo.toml's released pair


def report_toml(base: Path, stages: str = TWO_STAGES) -> str:
    """The zoo's demo teachers at RUNS/teacher_ROLE, as train-teacher leaves them, and students that start
    from the primary: every row scores above 0, so a row that showed another checkpoint's AP would differ."""
    return from_zoo_primary(student_toml(base, stages=stages)).replace(TINY_TEACHERS_TOML, ZOO_TEACHERS_TOML)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The demo teachers at RUNS/teacher_*, their store, and a GT-only and an ODKD student of one step per epoch."""
    base = tmp_path_factory.mktemp("report")
    make_synthetic_dataset(base / "data", train_images=6, val_images=2, seed=0)
    for role in ("primary", "senior"):
        (base / "runs" / f"teacher_{role}").mkdir(parents=True)
        shutil.copyfile(ZOO / f"demo_{role}.pth", base / "runs" / f"teacher_{role}" / "best.pth")
    build_cache(parse_config(report_toml(base)), "train", scheduler="synchronous", progress=False)
    for sub, stages in (("student_gt", GT_ONLY), ("student", ODKD)):
        train_student(parse_config(report_toml(base, stages=stages)), out=str(base / "runs" / sub),
                      max_steps_per_epoch=1)
    return base


def table_rows(report: str) -> dict[str, list[str]]:
    """The Models table: first cell -> all cells."""
    models = report[report.index("## Models"):].split("\n## ")[0]
    lines = [line for line in models.splitlines() if line.startswith("| ")][1:]
    return {cells[0]: cells for cells in ([c.strip() for c in line.strip("|").split("|")] for line in lines)}


def assert_image(path: Path, min_width: int, min_height: int):
    image = cv2.imread(str(path))
    assert image is not None, path
    assert image.shape[1] >= min_width and image.shape[0] >= min_height, image.shape


def test_report_has_every_model_with_evaluates_ap_and_its_pictures(world):
    cfg = parse_config(report_toml(world))
    path, table = write_report(cfg, device="cpu", speed_seconds=0.0)
    assert path == world / "runs" / "report.md"
    text = path.read_text()
    assert text.splitlines()[2:4] == ["```sh", "odkd report --device cpu"]
    rows = table_rows(text)
    assert "\n".join(table) in text
    checkpoints = {"PT": "teacher_primary", "ST": "teacher_senior", "GT-only": "student_gt", "ODKD": "student"}
    assert list(rows) == list(checkpoints)
    for name, sub in checkpoints.items():
        cells = rows[name]
        assert cells[1] == f"`{sub}/best.pth`"
        stats = evaluate_checkpoint(cfg, str(world / "runs" / sub / "best.pth"), device="cpu").stats
        assert cells[3:9] == [f"{stats[k]:.3f}" for k in ("AP", "AP .5", "AP .75", "AP (M)", "AP (L)", "AR")]
        params, gflops, speed = map(float, cells[9:12])
        assert params > 0 and gflops > 0 and speed > 0
    # every row scores, and no two alike: a row measured on another row's checkpoint would not match above
    aps = [float(cells[3]) for cells in rows.values()]
    assert min(aps) > 0 and len(set(aps)) == len(aps), aps
    assert [cells[2] for cells in rows.values()] == ["hrnet_tiny(width=12)", "hrnet_tiny(width=32)",
                                                     "hrnet_tiny(width=12)", "hrnet_tiny(width=12)"]
    assert "![training curves](curves.png)" in text and "![predictions](crops.png)" in text
    assert "skipped" not in text
    # two panels of 6x4.5 inches at 100 dpi; a header strip and CROP_ROWS rows of 96x128 crops, 5 columns
    assert_image(world / "runs" / "curves.png", 1200, 450)
    assert_image(world / "runs" / "crops.png", 5 * 96, 18 + 2 * 128)
    assert cv2.imread(str(world / "runs" / "crops.png")).shape[0] <= 20 + CROP_ROWS * 130


def test_cli_notes_missing_runs_and_takes_rows_from_runs_options(world, tmp_path):
    runs = tmp_path / "runs"
    for sub in ("teacher_primary", "student"):
        shutil.copytree(world / "runs" / sub, runs / sub)
    config = tmp_path / "p.toml"
    config.write_text(report_toml(world).replace(f'runs = "{world}/runs"', f'runs = "{runs}"'))
    gt_only = world / "runs" / "student_gt"
    result = CliRunner().invoke(main, ["report", "--config", str(config), "--out", str(tmp_path / "out"),
                                       "--runs", f"GT-only={gt_only}", "--runs", f"again={runs / 'student'}"])
    assert result.exit_code == 0, result.output
    text = (tmp_path / "out" / "report.md").read_text()
    assert f"odkd report --config {config} --out {tmp_path / 'out'} --runs GT-only={gt_only}" in text
    assert list(table_rows(text)) == ["PT", "GT-only", "ODKD", "again"]
    notes = [line for line in text.splitlines() if line.startswith("- ")]
    assert notes == [f"- ST: skipped, {runs / 'teacher_senior' / 'best.pth'}: teacher checkpoint not found "
                     "(teachers.senior.checkpoint)"]
    assert cv2.imread(str(tmp_path / "out" / "crops.png")) is not None
    assert_image(tmp_path / "out" / "curves.png", 1800, 450)  # GT-only, ODKD and again
    learned = text[text.index("## Where the students learned"):].split("\n\n")[2].splitlines()[2:]
    content = read_checkpoint(runs / "student" / "best.pth").extra["provenance"]["store"]["content_digest"]
    assert [row.split(" | ")[0] for row in learned] == ["| GT-only", "| ODKD", "| again"]
    assert all(f"`{content}`" in row for row in learned[1:])


def test_a_runs_folder_without_best_pth_is_one_line(world, tmp_path):
    cfg = parse_config(report_toml(world))
    with pytest.raises(OdkdError, match=r"^\S*nowhere/best.pth: not found \(--runs X=\S*nowhere\)$"):
        write_report(cfg, tmp_path, {"X": str(tmp_path / "nowhere")}, "val", "cpu")
    result = CliRunner().invoke(main, ["report", "--runs", "no-equals-sign"])
    assert result.exit_code == 1 and "--runs 'no-equals-sign': expected NAME=DIR" in result.output


def test_grid_keypoints_are_the_evaluated_keypoints_in_crop_pixels(world):
    """The picked crops' keypoints, mapped back through each crop's frame, are the ones evaluation decodes
    in the image."""
    cfg = parse_config(report_toml(world))
    instances = load_instances(cfg.data, "val")
    picks = pick_instances(instances, CROP_ROWS)
    assert picks == pick_instances(instances, CROP_ROWS) and len(picks) == min(CROP_ROWS, len(instances))
    assert all((instances[i].joints[:, 2] > 0).sum() >= 8 for i in picks)
    dataset = TopDownDataset(instances, cfg.data, train=False)
    batch = default_collate([dataset[i] for i in picks])
    net, _ = build_from_checkpoint(world / "runs" / "student" / "best.pth", "cpu")
    in_crop = crop_keypoints(net, batch, cfg)
    w, h = cfg.data.input_size
    assert (in_crop[..., 0] >= -0.5).all() and (in_crop[..., 0] < w).all() and (in_crop[..., 1] < h).all()
    every, _ = predict_instances(net, [default_collate([dataset[i] for i in range(len(dataset))])],
                                 device=torch.device("cpu"), decode=cfg.eval.decode, sigma=cfg.data.sigma)
    for j, i in enumerate(picks):
        back = affine_transform(in_crop[j, :, :2], invert_affine(dataset.frame(i).matrix(cfg.data.input_size)))
        np.testing.assert_allclose(back, every[i, :, :2], atol=1e-3)
        np.testing.assert_array_equal(in_crop[j, :, 2], every[i, :, 2])
