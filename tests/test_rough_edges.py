"""What a first user of the COCO recipe meets on the command line (issue 21): detections on images the
annotations lack, errors that name where a relative path was looked for, and output that says what it did."""

import json

import numpy as np
import pytest
from click.testing import CliRunner

from odkd.cli import main
from odkd.synth import make_synthetic_dataset
from odkd.models import build_model, save_checkpoint

PIPELINE = 'device = "cpu"\n[data]\nroot = "{root}"\ninput_size = [96, 128]\nheatmap_size = [24, 32]\nstrict = {strict}\n'


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A synthetic dataset, a tiny model's checkpoint, and the pipeline TOML, lenient and strict."""
    base = tmp_path_factory.mktemp("rough")
    make_synthetic_dataset(base / "data", train_images=1, val_images=2, seed=3)
    save_checkpoint(base / "model.pth", build_model("hrnet_tiny", width=4), model_name="hrnet_tiny",
                    model_args={"width": 4}, seg_head=False)
    for strict in ("false", "true"):
        (base / f"strict_{strict}.toml").write_text(PIPELINE.format(root=base / "data", strict=strict))
    return base


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def evaluate(world, *args, strict="false"):
    return run("evaluate", "--config", world / f"strict_{strict}.toml", "--checkpoint", world / "model.pth", *args)


def val_image_ids(world) -> list[int]:
    ann = json.loads((world / "data" / "annotations" / "person_keypoints_val.json").read_text())
    return [img["id"] for img in ann["images"]]


def test_detections_on_unannotated_images_are_skipped_by_evaluate_unless_strict(world, tmp_path):
    dets, known = tmp_path / "dets.json", val_image_ids(world)
    dets.write_text(json.dumps([{"image_id": i, "category_id": 1, "bbox": [10.0, 10.0, 40.0, 80.0], "score": 0.9}
                                for i in [*known, 999999]]))
    res = evaluate(world, "--boxes", dets)
    assert res.exit_code == 0, res.output
    assert (f"warning: {dets}: skipped 1 detection(s) on 1 image(s) not in the annotations (image ids 999999); "
            f"[data] strict = true makes this an error") in res.stderr.splitlines()
    assert "| AP " in res.stdout
    strict = evaluate(world, "--boxes", dets, strict="true")
    assert strict.exit_code == 1
    assert strict.output.strip().splitlines() == [
        f"Error: {dets}: detection [{len(known)}] image_id 999999 is not in the annotations ([data] strict = true)"]


def test_a_relative_path_not_found_names_where_it_was_looked_for(world, tmp_path, monkeypatch):
    """The COCO recipe run from another folder: the error names the absolute path searched and what it is
    relative to."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "coco.toml").write_text(PIPELINE.format(root="data/coco", strict="false"))
    res = run("browse", "--config", "coco.toml", "--out", tmp_path / "crops")
    assert res.exit_code == 1
    assert res.output.strip().splitlines() == [
        f"Error: data/coco/images/train: image folder not found (looked for {tmp_path}/data/coco/images/train, "
        f"relative to the working directory)"]
    missing = run("evaluate", "--config", world / "strict_false.toml", "--checkpoint", "checkpoints/w32.pth")
    assert missing.output.strip().splitlines() == [
        f"Error: checkpoints/w32.pth: checkpoint file not found (looked for {tmp_path}/checkpoints/w32.pth, "
        f"relative to the working directory)"]


def test_evaluate_says_what_it_wrote_and_starts_the_table_on_its_own_line(world, tmp_path):
    """Off a terminal (CliRunner's streams are not one) there is no progress bar, so in a log of both streams
    the AP table's header starts the first line; a bar wiped for a terminal left it on the bar's line."""
    out = tmp_path / "results.json"
    res = evaluate(world, "--out", out)
    assert res.exit_code == 0, res.output
    results = json.loads(out.read_text())
    assert len(results) > 0
    assert res.output.startswith("| AP ") and "eval" not in res.stderr
    assert f"wrote {len(results)} results to {out}" in res.stdout.splitlines()


def test_curves_draw_a_loss_seen_in_one_epoch(tmp_path):
    """A one-epoch stage's loss is a single point: it must leave pixels of its colour where it is plotted (left
    of the stage's end, at epoch 1), not only in the legend (upper right)."""
    import cv2

    from odkd.eval.curves import plot_training_curves

    (tmp_path / "log.jsonl").write_text(json.dumps({"epoch": 1, "stage": "primary", "loss": 0.5}) + "\n")
    png = cv2.imread(str(plot_training_curves(tmp_path / "log.jsonl", tmp_path / "curves.png")))
    left = png[:, :png.shape[1] // 2].astype(int)
    first_colour = np.array([180, 119, 31])  # matplotlib's C0, #1f77b4, as BGR
    assert (np.abs(left - first_colour).sum(axis=-1) < 30).sum() >= 4
