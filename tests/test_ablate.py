"""odkd ablate: the variants' stage lists, a real tiny ablation scored on the runs' last weights, reuse
of finished runs, and its one-line refusals."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from conftest import from_zoo_primary, make_tiny_world, odkd_log
from odkd.apps.ablate import check_hypothesis, run_ablation, spread
from odkd.cli import main
from odkd.config import StageConfig, parse_config
from odkd.distill.variants import VARIANTS, variant_student
from odkd.errors import OdkdError
from odkd.eval.evaluate import evaluate_checkpoint
from odkd.models import read_checkpoint
from odkd.teachers import build_cache
from test_student import TWO_STAGES, student_toml, write_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")
ONE_PLUS_ONE = TWO_STAGES.replace("epochs = 2", "epochs = 1")  # one epoch each


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The tiny world and its store, built without soft maps."""
    base = make_tiny_world(tmp_path_factory.mktemp("ablate"), val_images=2)
    build_cache(parse_config(student_toml(base)), "train", scheduler="synchronous", progress=False)
    return base


def test_variants_are_the_intended_stage_lists(tmp_path):
    stages = """
[[student.stages]]
name = "warm"
epochs = 2
teacher = "primary"
gt_weight = 2.0
kd_weight = 0.5
conf_floor = 0.1
[[student.stages]]
name = "refine"
epochs = 3
teacher = "senior"
seg_weight = 0.01
"""
    student = parse_config(student_toml(tmp_path, stages=stages)).student
    pt = StageConfig(name="warm", epochs=2, teacher="primary", gt_weight=2.0, kd_weight=0.5, conf_floor=0.1)
    st = StageConfig(name="refine", epochs=3, teacher="senior", seg_weight=0.01)
    assert {name: build(student) for name, build in VARIANTS.items()} == {
        # the baseline keeps the GT weight only: no teacher key can change the run
        "gt": (StageConfig(name="gt", epochs=5, teacher="none", gt_weight=2.0, kd_weight=0.0),),
        "pt": (dataclasses.replace(pt, name="pt", epochs=5),),
        "st": (dataclasses.replace(st, name="st", epochs=5),),
        "joint": (dataclasses.replace(st, name="joint", epochs=5, teacher="both"),),
        "orderly": (pt, st),
        "reverse": (st, pt),
        **{form: (dataclasses.replace(pt, targets=form), dataclasses.replace(st, targets=form))
           for form in ("disc", "disc_conf", "gaussian", "gaussian_conf", "soft")},
        "no_mask": (pt, dataclasses.replace(st, seg_weight=0.0)),
        "mask_gate": (pt, dataclasses.replace(st, mask_gate=True)),
        "orderly+unlabeled": (pt, st),
        # PT's stage keeps its epochs and keys and learns from ST, without the mask loss
        "st+unlabeled": (dataclasses.replace(pt, teacher="senior"), st),
    }
    # only the +unlabeled variants read the unlabelled store, and they refuse a config without one
    with_store = dataclasses.replace(student, unlabeled_cache="cache/u.zarr")
    assert {name: variant_student(with_store, name).unlabeled_cache
            for name in ("gt", "orderly", "orderly+unlabeled", "st+unlabeled")} \
        == {"gt": "", "orderly": "", "orderly+unlabeled": "cache/u.zarr", "st+unlabeled": "cache/u.zarr"}
    for name in ("orderly+unlabeled", "st+unlabeled"):
        with pytest.raises(OdkdError, match=f"variant '{re.escape(name)}' needs \\[student\\] unlabeled_cache"):
            variant_student(student, name)
    # a config without the method's PT-then-ST stages builds the variants that do not need them only
    st_first = parse_config(student_toml(tmp_path, stages="""
[[student.stages]]
name = "refine"
epochs = 3
teacher = "senior"
[[student.stages]]
name = "warm"
epochs = 2
teacher = "primary"
""")).student
    assert VARIANTS["pt"](st_first)[0].epochs == 5
    with pytest.raises(OdkdError, match="'primary' stage before the 'senior' one"):
        VARIANTS["orderly"](st_first)
    gt_only = parse_config(student_toml(tmp_path, stages='[[student.stages]]\nname = "g"\nepochs = 4\n'
                                                         'teacher = "none"')).student
    with pytest.raises(OdkdError, match="exactly one stage with teacher = 'senior', found 0"):
        VARIANTS["st"](gt_only)


def variant_result(aps):
    return {"AP": spread(aps), "n": len(aps), "runs": [{"seed": seed, "AP": ap} for seed, ap in enumerate(aps)]}


def test_hypotheses_are_judged_against_twice_the_larger_std():
    orderly = variant_result([0.50, 0.52, 0.54])
    assert orderly["AP"] == pytest.approx({"mean": 0.52, "std": 0.02})
    others = {"far below": [0.44, 0.45, 0.46], "near": [0.48, 0.49, 0.50], "far above": [0.57, 0.60, 0.63]}
    checked = {name: check_hypothesis(orderly, variant_result(aps), "AP") for name, aps in others.items()}
    assert {name: h["verdict"].split(":")[0] for name, h in checked.items()} == {
        "far below": "holds", "near": "not shown", "far above": "reversed"}
    assert checked["far below"]["bar"] == pytest.approx(0.04)
    one_seed = check_hypothesis(variant_result([0.5]), variant_result([0.1]), "AP")
    assert one_seed["verdict"].startswith("not tested")
    # beside the verdict: A - B paired by seed
    assert checked["near"]["per_seed"] == pytest.approx({"mean": 0.03, "std": 0.01, "n": 3, "ahead": 3})
    assert checked["far above"]["per_seed"]["ahead"] == 0
    mixed = check_hypothesis(orderly, variant_result([0.51, 0.50, 0.55]), "AP")["per_seed"]
    assert mixed["ahead"] == 1 and mixed["mean"] == pytest.approx(0.0)


def test_tiny_ablation_reports_the_runs_and_reuses_them(world, tmp_path, caplog):
    # students that start from the zoo's primary teacher score above 0, each run its own AP
    cfg = parse_config(from_zoo_primary(student_toml(world, stages=ONE_PLUS_ONE)))
    out = tmp_path / "ablation"
    summary = run_ablation(cfg, seeds=2, variants=["gt", "orderly", "soft"], out=out, max_steps_per_epoch=1)
    err = "\n".join(odkd_log(caplog))
    assert "warning: variant 'soft' skipped" in err and "store_soft = true" in err
    assert "reports on val" in err  # the tiny world has no test split
    saved = json.loads((out / "ablation.json").read_text())
    assert saved["split"] == "val" and saved["stat"] == "AP" and saved["weights"] == "last.pth"
    assert saved["seeds"] == [0, 1]
    assert list(saved["variants"]) == ["gt", "orderly"] and "soft" in saved["skipped"]
    md = (out / "ablation.md").read_text()
    for name in ("gt", "orderly"):
        runs = [out / name / f"seed{seed}" for seed in (0, 1)]
        aps = [evaluate_checkpoint(cfg, str(run / "last.pth")).stats["AP"] for run in runs]
        result = saved["variants"][name]
        assert [row["AP"] for row in result["runs"]] == pytest.approx(aps)
        assert result["AP"]["mean"] == pytest.approx(np.mean(aps))
        assert result["AP"]["std"] == pytest.approx(np.std(aps, ddof=1))
        assert f"| {name} | {np.mean(aps):.4f} ± {np.std(aps, ddof=1):.4f} |" in md
        assert result["n"] == 2 and {row["status"] for row in result["runs"]} == {"trained"}
    # every run scores, each from its own weights: an AP read from another run's file would not match above
    scored = [row["AP"] for name in ("gt", "orderly") for row in saved["variants"][name]["runs"]]
    weights = [read_checkpoint(Path(row["dir"]) / "last.pth").state_dict for name in ("gt", "orderly")
               for row in saved["variants"][name]["runs"]]
    assert min(scored) > 0, scored
    assert all(any(not torch.equal(a[key], b[key]) for key in a)
               for i, a in enumerate(weights) for b in weights[i + 1:])
    # each run trained its variant's stages under its own seed
    stages = {run.parent.name + "/" + run.name: [json.loads(line)["stage"] for line in (run / "log.jsonl").open()]
              for run in out.glob("*/seed*")}
    assert stages == {"gt/seed0": ["gt", "gt"], "gt/seed1": ["gt", "gt"],
                      "orderly/seed0": ["primary", "senior"], "orderly/seed1": ["primary", "senior"]}
    assert json.loads((out / "orderly" / "seed1" / "run.json").read_text())["student"]["train"]["seed"] == 1
    weights = [read_checkpoint(out / "orderly" / f"seed{seed}" / "last.pth").state_dict for seed in (0, 1)]
    assert any(not torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert [h["claim"] for h in saved["hypotheses"]] == ["the teachers beat GT alone"]
    assert "the teachers beat GT alone" in md and "store.zarr" in md
    gt_aps, orderly_aps = ([row["AP"] for row in saved["variants"][name]["runs"]] for name in ("gt", "orderly"))
    assert f"| gt | {gt_aps[0]:.4f} | {gt_aps[1]:.4f} |" in md  # the per-seed table
    paired = saved["hypotheses"][0]["per_seed"]
    assert paired["mean"] == pytest.approx(np.mean(np.subtract(orderly_aps, gt_aps)))
    assert f"{paired['mean']:+.4f} ± {paired['std']:.4f} ({paired['ahead']} of 2)" in md

    mtimes = {p: p.stat().st_mtime_ns for p in out.glob("*/seed*/last.pth")}
    # the config's stages learn from the disc (the default), so the disc variant is orderly's runs, not a copy
    again = run_ablation(cfg, seeds=2, variants=["gt", "orderly", "disc"], out=out, max_steps_per_epoch=1)
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/seed*/last.pth")} == mtimes and len(mtimes) == 4
    assert {row["status"] for name in ("gt", "orderly") for row in again["variants"][name]["runs"]} == {"reused"}
    assert again["variants"]["orderly"]["AP"] == saved["variants"]["orderly"]["AP"]
    assert again["same_as"] == {"disc": "orderly"} and not (out / "disc").exists()
    assert [(row["dir"], row["AP"], row["status"]) for row in again["variants"]["disc"]["runs"]] == [
        (row["dir"], row["AP"], "shared") for row in again["variants"]["orderly"]["runs"]]
    assert "disc trains the same student as orderly" in (out / "ablation.md").read_text()

    # a run made under another configuration is refused, not reused or overwritten
    changed = parse_config(from_zoo_primary(student_toml(world, stages=ONE_PLUS_ONE.replace("0.01", "0.02"))))
    with pytest.raises(OdkdError, match=r"orderly/seed0/run.json: this run was trained under another "
                                        r"configuration \(student.stages "):
        run_ablation(changed, seeds=1, variants=["orderly"], out=out, max_steps_per_epoch=1)
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/seed*/last.pth")} == mtimes


def test_unknown_variant_is_one_line_and_writes_nothing(world, tmp_path):
    config = write_config(tmp_path)
    result = CliRunner().invoke(main, ["ablate", "--config", str(config), "--variants", "orderly,ordrly",
                                       "--out", str(tmp_path / "ablation")])
    assert result.exit_code == 1
    assert result.output.strip() == ("Error: --variants: unknown variant 'ordrly'; the variants are gt, pt, st, "
                                     "joint, orderly, reverse, disc, disc_conf, gaussian, gaussian_conf, soft, no_mask, "
                                     "mask_gate, orderly+unlabeled, st+unlabeled")
    assert not (tmp_path / "ablation").exists()
