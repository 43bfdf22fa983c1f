"""Every keypoint set other than COCO's end to end through the command line, as a user runs it: `odkd synth
--keypoints`, both teachers trained, their store built and described, the student trained from it, evaluated
and drawn, for COCO-WholeBody's 133 points, CrowdPose's 14, AP-10K's animals and a 21-point hand (reported and
ablated by PCK, AUC and EPE too); what the synthetic animals and hands are; and COCO-WholeBody's 133 maps
through OpenCV, which takes 128 channels at a time."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from odkd.apps.ablate import mean_std
from odkd.cli import main
from odkd.data.decode import gaussian_modulate
from odkd.data.keypoints import KEYPOINT_NAMES, PRESETS_DIR, keypoint_set
from odkd.data.transforms import CropFrame, warp_maps
from odkd.models import read_checkpoint
from odkd.store.reader import TeacherTargets
from test_report import table_rows
from test_student import read_log, student_toml

pytestmark = pytest.mark.usefixtures("one_torch_thread")
# "own": CrowdPose's data under a set file of one's own, named by its path
SETS = {"coco_wholebody": 133, "crowdpose": 14, "ap10k": 17, "hand21": 21, "own": 14}
HAND_STATS = ("PCK", "AUC", "EPE")  # a set without OKS sigmas is scored by these, in this order
# the tiny teachers of student_toml, one epoch each
TEACHERS_TRAIN = "".join(f"""
[teachers.{role}.train]
epochs = 1
batch_size = 4
workers = 0
amp = false
""" for role in ("primary", "senior"))


def run(*args) -> str:
    """What the command prints on stdout; it must succeed."""
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, (args, result.output)
    return result.stdout


def summary(stdout: str) -> dict:
    return json.loads(stdout[stdout.index("{"):])


def final_layer_k(checkpoint: str) -> int:
    """The channels of a checkpoint's final layer, and the K it records: one number when they agree."""
    ckpt = read_checkpoint(checkpoint)
    channels = ckpt.state_dict["final_layer.weight"].shape[0]
    assert ckpt.meta["num_joints"] == channels
    return channels


def stats_tables(stdout: str) -> dict[str, dict[str, float]]:
    """`odkd evaluate`'s tables: the first as "all", each other under the first word of the line above it
    (a part's name, a crowd group's)."""
    lines, tables, title = stdout.splitlines(), {}, ""
    for i, line in enumerate(lines):
        if line.startswith("| ") and i + 2 < len(lines) and lines[i + 1].startswith("|-"):
            names = [cell.strip() for cell in line.strip("|").split("|")]
            values = [float(cell) for cell in lines[i + 2].strip("|").split("|")]
            tables[title.split(" ")[0].rstrip(":") if tables else "all"] = dict(zip(names, values))
        elif line and not line.startswith("|"):
            title = line
    return tables


def in_range(ap: float) -> bool:
    """An AP as COCOeval gives it: in [0, 1], or -1 where no person is labelled."""
    return 0.0 <= ap <= 1.0 or ap == -1.0


def check_wholebody(tables: dict, base: Path, config: Path, trained: dict) -> None:
    assert list(tables) == ["all", "body", "foot", "face", "left_hand", "right_hand"]
    assert all(0.0 <= tables[part]["AP"] <= 1.0 for part in ("all", "body", "foot"))
    # the synthetic people's face and hands are not labelled: COCOeval has nothing to score
    assert tables["face"]["AP"] == tables["left_hand"]["AP"] == tables["right_hand"]["AP"] == -1.0


def check_crowdpose(tables: dict, base: Path, config: Path, trained: dict) -> None:
    assert 0.0 <= tables["all"]["AP"] <= 1.0
    groups = set(tables) - {"all"}
    assert groups and groups <= {"easy", "medium", "hard"}, tables
    assert all(in_range(tables[group]["AP"]) for group in groups)


def check_ap10k(tables: dict, base: Path, config: Path, trained: dict) -> None:
    assert list(tables) == ["all"] and 0.0 <= tables["all"]["AP"] <= 1.0
    # each result is scored in its instance's species, and [data] categories keeps one of them
    assert {r["category_id"] for r in json.loads((base / "results.json").read_text())} == {1, 2}
    cats = base / "cats.json"
    run("evaluate", "--config", config, "--set", 'data.categories=["cat"]', "--checkpoint",
        trained["best"], "--out", cats)
    assert {r["category_id"] for r in json.loads(cats.read_text())} == {2}


def check_hand21(tables: dict, base: Path, config: Path, trained: dict) -> None:
    stats = json.loads((base / "stats.json").read_text())
    assert tables == {"all": pytest.approx(stats, abs=5e-4)} and tuple(stats) == HAND_STATS
    assert hand_stats_in_range(stats)
    # best.pth was kept by PCK, logged each epoch and drawn on the curves
    assert "best_ap" not in trained and trained["best_pck"] == read_log(base / "runs" / "student")[
        trained["best_epoch"] - 1]["PCK"]
    assert (base / "runs" / "student" / "curves.png").stat().st_size > 0
    # the --out results scored as a file give the same table: each hand is paired with its own prediction
    ann = base / "data" / "annotations" / "person_keypoints_val.json"
    again = run("evaluate", "--config", config, "--ann", ann, "--results", base / "results.json")
    assert stats_tables(again) == tables
    assert stats_tables(run("evaluate", "--config", config, "--ann", ann, "--gt-as-results"))["all"] == {
        "PCK": 1.0, "AUC": 0.95, "EPE": 0.0}
    check_hand_report(base, config, stats)
    check_hand_ablation(base, config)


def hand_stats_in_range(stats: dict) -> bool:
    return 0.0 <= stats["PCK"] <= 1.0 and 0.0 <= stats["AUC"] <= 0.95 and stats["EPE"] >= 0.0


def check_hand_report(base: Path, config: Path, student_stats: dict) -> None:
    """`odkd report` on hands: PCK, AUC and EPE columns, the student's row as `odkd evaluate` scored its best.pth."""
    run("report", "--config", config, "--out", base / "report")
    text = (base / "report" / "report.md").read_text()
    header = next(line for line in text.splitlines() if line.startswith("| model |"))
    assert header == "| model | checkpoint | architecture | PCK | AUC | EPE | params (M) | GFLOPs | CPU images/s |"
    rows = table_rows(text)
    assert list(rows) == ["PT", "ST", "ODKD"]
    assert rows["ODKD"][3:6] == [f"{student_stats[k]:.3f}" for k in HAND_STATS]
    assert all(hand_stats_in_range(dict(zip(HAND_STATS, map(float, cells[3:6])))) for cells in rows.values())
    assert "PCK@0.2 of the GT box's longer side, AUC (0 to 30 px) and EPE (px)" in text and "COCOeval" not in text
    assert "Losses and val PCK per epoch" in text


def check_hand_ablation(base: Path, config: Path) -> None:
    """`odkd ablate` on hands compares PCK: each variant's mean is that of its runs' PCK as `odkd evaluate`
    scores their last.pth."""
    out = base / "ablation"
    printed = run("ablate", "--config", config, "--variants", "gt,orderly", "--seeds", 2, "--out", out,
                  "--set", "student.stages[0].epochs=1", "--set", "student.stages[1].epochs=1")
    assert printed.startswith("| variant | PCK (mean ± std) | AUC | EPE | n seeds |\n|---|---|---|---|---|\n")
    saved = json.loads((out / "ablation.json").read_text())
    assert saved["stat"] == "PCK" and list(saved["variants"]) == ["gt", "orderly"]
    md = (out / "ablation.md").read_text()
    pcks, scored = {}, set()
    for name, result in saved["variants"].items():
        evaluated = []
        for seed in (0, 1):
            stats_json = out / f"{name}{seed}.json"
            run("evaluate", "--config", config, "--checkpoint", out / name / f"seed{seed}" / "last.pth",
                "--stats-json", stats_json)
            evaluated.append(json.loads(stats_json.read_text()))
        assert all(hand_stats_in_range(stats) for stats in evaluated)
        for row, stats in zip(result["runs"], evaluated, strict=True):
            assert {k: row[k] for k in stats} == pytest.approx(stats)
            scored.add(tuple(stats.values()))
        pcks[name] = [stats["PCK"] for stats in evaluated]
        assert result["PCK"] == pytest.approx({"mean": np.mean(pcks[name]), "std": np.std(pcks[name], ddof=1)})
        assert f"| {name} | " + " | ".join(mean_std(result[k]) for k in HAND_STATS) + " | 2 |" in md
        assert f"| {name} | {pcks[name][0]:.4f} | {pcks[name][1]:.4f} |" in md  # the per-seed table
    assert len(scored) == 4  # no two runs alike: a row scored from another run's weights would not match above
    [teachers_vs_gt] = saved["hypotheses"]
    assert teachers_vs_gt["difference"] == pytest.approx(np.mean(pcks["orderly"]) - np.mean(pcks["gt"]))
    assert teachers_vs_gt["per_seed"]["mean"] == pytest.approx(np.mean(np.subtract(pcks["orderly"], pcks["gt"])))
    assert "## Hypotheses (PCK)" in md and "## Per seed (PCK)" in md and "chosen by val PCK" in md


CHECKS = {"coco_wholebody": check_wholebody, "crowdpose": check_crowdpose, "ap10k": check_ap10k,
          "hand21": check_hand21, "own": check_crowdpose}


@pytest.mark.parametrize("keypoints", list(SETS))
def test_a_keypoint_set_runs_from_synth_to_predict(tmp_path, keypoints):
    k, spec, data_format = SETS[keypoints], keypoints, keypoints
    if keypoints == "own":
        spec, data_format = str(tmp_path / "my_set.toml"), "crowdpose"
        Path(spec).write_text((PRESETS_DIR / "crowdpose.toml").read_text().replace('name = "crowdpose"', 'name = "my_crowd"'))
    kset = keypoint_set(spec)
    run("synth", tmp_path / "data", "--train-images", 6, "--val-images", 2, "--keypoints", data_format)
    config = tmp_path / "p.toml"
    config.write_text(student_toml(tmp_path).replace("sigma = 2.0", f'sigma = 2.0\nkeypoints = "{spec}"')
                      + TEACHERS_TRAIN)
    for role in ("primary", "senior"):
        assert final_layer_k(summary(run("train-teacher", "--config", config, "--role", role))["best"]) == k

    run("cache-teachers", "--config", config, "--scheduler", "synchronous")
    assert TeacherTargets.open(str(tmp_path / "store.zarr")).layout.num_joints == k
    info = run("cache", "info", tmp_path / "store.zarr")
    assert f"keypoints    {kset.name}, {k} points, digest {kset.digest()}" in info

    trained = summary(run("train-student", "--config", config))
    best = trained["best"]
    assert final_layer_k(best) == k
    out = run("evaluate", "--config", config, "--checkpoint", best, "--stats-json", tmp_path / "stats.json",
              "--out", tmp_path / "results.json")
    assert all(len(r["keypoints"]) == 3 * k for r in json.loads((tmp_path / "results.json").read_text()))
    CHECKS[keypoints](stats_tables(out), tmp_path, config, trained)

    ann = tmp_path / "data" / "annotations" / "person_keypoints_val.json"
    labelled = json.loads(ann.read_text())
    image_id = labelled["annotations"][0]["image_id"]
    image = next(img["file_name"] for img in labelled["images"] if img["id"] == image_id)
    people = sum(a["image_id"] == image_id and not a["iscrowd"] for a in labelled["annotations"])
    picture = tmp_path / "predicted.png"
    drawn = run("predict", tmp_path / "data" / "images" / "val" / image, "--checkpoint", best, "--config", config,
                "--ann", ann, "--out", picture)
    assert drawn.startswith(f"{people} {'person' if people == 1 else 'people'} drawn to ")
    assert picture.stat().st_size > 0


def test_more_maps_than_opencv_takes_at_once_warp_and_blur_as_fewer_do():
    wholebody = keypoint_set("coco_wholebody")
    maps = np.random.default_rng(0).random((133, 32, 24)).astype(np.float32)
    src = CropFrame(center=(100.0, 120.0), scale=(1.0, 1.3), image_width=200)
    dst = CropFrame(center=(104.0, 116.0), scale=(1.1, 1.4), rotation=20.0, flip=True, image_width=200)
    warped = warp_maps(maps, src, (24, 32), dst, (24, 32), flip_index=wholebody.flip_index)
    # 19 maps at a time: OpenCV interpolates 1 to 4 channels its own ways, 5 and more alike
    by_19 = np.concatenate([warp_maps(maps[i:i + 19], src, (24, 32), dst, (24, 32), keypoint_channels=False)
                            for i in range(0, 133, 19)])
    np.testing.assert_array_equal(warped, by_19[wholebody.flip_index])
    blurred = gaussian_modulate(maps[None], 2.0)[0]
    np.testing.assert_array_equal(blurred, np.concatenate([gaussian_modulate(m[None, None], 2.0)[0] for m in maps]))


def test_the_synthetic_animals_are_the_people_relabelled_and_the_hands_lie_past_their_wrists(tmp_path):
    counts = {name: summary(run("synth", tmp_path / name, "--train-images", 0, "--val-images", 4,
                                "--keypoints", name)) for name in ("coco", "ap10k", "hand21")}
    files = {name: json.loads((tmp_path / name / "annotations" / "person_keypoints_val.json").read_text())
             for name in counts}
    people = {a["id"]: np.array(a["keypoints"], float).reshape(17, 3) for a in files["coco"]["annotations"]}
    ap10k = keypoint_set("ap10k")
    assert [(c["id"], c["name"], len(c["keypoints"])) for c in files["ap10k"]["categories"]] == [
        (1, "dog", 17), (2, "cat", 17)]
    for ann in files["ap10k"]["annotations"]:
        body, animal = people[ann["id"]], np.array(ann["keypoints"], float).reshape(17, 3)
        # left stays left, so AP-10K's flip pairs swap what COCO's would
        for animal_point, body_point in (("L_Eye", "left_eye"), ("R_F_Paw", "right_wrist"), ("L_B_Paw", "left_ankle")):
            assert animal[ap10k.names.index(animal_point)].tolist() == body[KEYPOINT_NAMES.index(body_point)].tolist()
        assert ann["category_id"] == 1 + ann["image_id"] % 2
    hands = files["hand21"]["annotations"]
    assert counts["hand21"]["val"]["annotations"] == len(hands) == len({a["image_id"] for a in hands}) > 0
    for hand in hands:
        body, points = people[hand["id"]], np.array(hand["keypoints"], float).reshape(21, 3)
        elbow, wrist = next((body[e, :2], body[w, :2]) for e, w in ((7, 9), (8, 10))
                            if body[w, 2] > 0 and np.allclose(body[w, :2], points[0, :2]))
        middle_tip = points[keypoint_set("hand21").names.index("middle_finger4"), :2]
        assert np.dot(middle_tip - wrist, wrist - elbow) > 0  # past the wrist, away from the elbow
        x, y, w, h = hand["bbox"]
        labelled = points[points[:, 2] > 0]
        assert ((labelled[:, 0] >= x) & (labelled[:, 0] <= x + w) & (labelled[:, 1] >= y)
                & (labelled[:, 1] <= y + h)).all()
    # the imitated detector boxes people: no unlabelled split for hands or animals
    refused = CliRunner().invoke(main, ["synth", str(tmp_path / "u"), "--unlabeled-images", "1",
                                        "--keypoints", "hand21"])
    assert refused.exit_code == 1 and refused.output.strip().splitlines() == [
        "Error: synth.unlabeled_images: the unlabelled split's detections box people, whom --keypoints hand21 does "
        "not label; give it with coco, crowdpose, coco_wholebody"]
