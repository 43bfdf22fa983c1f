"""The shipped pipelines: every key of every pipeline/*.toml parses and names real models, the COCO
recipe's student takes the ImageNet file it names, and the OCHuman recipe evaluates val and test."""

import dataclasses
import json
import shlex
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from conftest import make_tiny_coco
from odkd.cli import main
from odkd.config import load_config, parse_config
from odkd.distill.variants import variant_student
from odkd.models import MODELS, build_model, load_checkpoint, save_checkpoint
from odkd.models.registry import override_keys
from odkd.train.release import check_teacher
from test_pretrained import TIMM_HRNETS, timm_hrnet_state_dict

PIPELINES = sorted((Path(__file__).resolve().parents[1] / "pipeline").glob("*.toml"))
EXTERNAL_TEACHERS = ("onnx", "torchscript")


def test_the_recipes_are_shipped():
    assert {"demo", "coco_hrnet", "coco_hrnet_w16", "ochuman"} <= {p.stem for p in PIPELINES}


@pytest.mark.parametrize("path", PIPELINES, ids=lambda p: p.stem)
def test_pipeline_parses_and_names_real_models(path):
    cfg = load_config(path)
    (iw, ih), (hw, hh) = cfg.data.input_size, cfg.data.heatmap_size
    assert (iw, ih) == (4 * hw, 4 * hh), "every model here outputs heatmaps at stride 4"
    networks = []
    if "teachers" in cfg.raw:
        teachers = cfg.teachers
        assert not teachers.primary.seg_head and teachers.senior.seg_head, "ST teaches the mask, PT does not"
        networks += [t for t in (teachers.primary, teachers.senior) if t.model not in EXTERNAL_TEACHERS]
    if "student" in cfg.raw:
        student = cfg.student
        networks.append(student)
        assert student.cache == cfg.cache.store, "the student reads the store the [cache] section builds"
        assert [s.teacher for s in student.stages if s.teacher != "none"][:2] == ["primary", "senior"]
        if student.train.schedule == "step":
            assert all(0 < step < student.epochs for step in student.train.lr_steps), "every lr step fires"
    if "cache" in cfg.raw:
        assert cfg.cache.shard_instances % cfg.cache.chunk_instances == 0
    for net in networks:
        assert net.model in MODELS
        assert set(net.model_args) <= set(override_keys(net.model))


def test_coco_recipe_is_the_official_setup():
    cfg = load_config(next(p for p in PIPELINES if p.stem == "coco_hrnet_w16"))
    pt, st, student = cfg.teachers.primary, cfg.teachers.senior, cfg.student
    assert (pt.model, pt.checkpoint) == ("hrnet_w32", "checkpoints/pose_hrnet_w32_256x192.pth")
    assert (st.model, st.seg_head, st.init) == ("hrnet_w48", True, "checkpoints/pose_hrnet_w48_256x192.pth")
    assert st.checkpoint == f"{cfg.runs}/teacher_senior/best.pth", "ST's fine-tune writes what the cache reads"
    assert (cfg.data.input_size, cfg.data.heatmap_size) == ((192, 256), (48, 64))
    assert cfg.cache.margin == 1.25 and cfg.cache.batch_size == 256
    train = student.train
    assert (train.batch_size, train.lr, train.lr_steps, student.epochs, student.lr_span) == (
        32, 1e-3, (170, 200), 210, "run")
    assert [(s.teacher, s.epochs, s.seg_weight) for s in student.stages] == [("primary", 105, 0.0),
                                                                             ("senior", 105, 0.002)]


def test_coco_student_takes_the_imagenet_file_it_names(tmp_path):
    """The student's model_args are the README's hrnet_w18_small row, so timm's file fills its backbone
    and only the pose and seg heads start new, as train-student loads it."""
    student = load_config(next(p for p in PIPELINES if p.stem == "coco_hrnet_w16")).student
    name, model_args, _ = TIMM_HRNETS["hrnet_w18_small"]
    assert (student.model, student.model_args) == (name, model_args)
    assert Path(student.init).name == "hrnet_w18_small.bin"
    init = tmp_path / "hrnet_w18_small.bin"
    torch.save(timm_hrnet_state_dict(name, **model_args), init)
    model = build_model(student.model, seg_head=student.seg_head, **student.model_args)
    report = load_checkpoint(model, init, allow_new_seg_head=True)
    assert report.format == "timm-imagenet"
    assert {k.split(".")[0] for k in report.new_keys} == {"final_layer", "seg_head"}
    with torch.inference_mode():
        heatmaps = model(torch.zeros(1, 3, 256, 192))[0]
    assert tuple(heatmaps.shape[-2:]) == (64, 48)


@pytest.fixture
def ochuman(tmp_path):
    """A tiny dataset in OCHuman's layout (RLE and polygon masks, one shared images/ folder): val holds
    images 1-3, test image 3 only; plus the recipe pointed at it and a seg-head checkpoint."""
    root = tmp_path / "ochuman"
    full = json.loads(make_tiny_coco(root).read_text())
    val = root / "annotations" / "ochuman_coco_format_val_range_0.00_1.00.json"
    shutil.move(root / "annotations" / "person_keypoints_val.json", val)
    test = {**full, "images": [i for i in full["images"] if i["id"] == 3],
            "annotations": [a for a in full["annotations"] if a["image_id"] == 3]}
    (root / "annotations" / "ochuman_coco_format_test_range_0.00_1.00.json").write_text(json.dumps(test))
    recipe = next(p for p in PIPELINES if p.stem == "ochuman").read_text()
    assert 'root = "data/ochuman"' in recipe
    config = tmp_path / "ochuman.toml"
    config.write_text(recipe.replace('root = "data/ochuman"', f'root = "{root}"'))
    parse_config(config.read_text())
    torch.manual_seed(0)
    checkpoint = tmp_path / "student.pth"
    save_checkpoint(checkpoint, build_model("hrnet_tiny", seg_head=True), model_name="hrnet_tiny", model_args={},
                    seg_head=True)
    return config, checkpoint, tmp_path


@pytest.mark.parametrize(("split", "image_ids"), [("val", {1, 2, 3}), ("test", {3})])
def test_ochuman_recipe_evaluates_val_and_test(ochuman, split, image_ids):
    config, checkpoint, tmp_path = ochuman
    out = tmp_path / f"{split}.json"
    res = CliRunner().invoke(main, ["evaluate", "--config", str(config), "--checkpoint", str(checkpoint),
                                    "--split", split, "--out", str(out), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert "| AP " in res.output and "mean mask IoU: " in res.output
    assert {r["image_id"] for r in json.loads(out.read_text())} == image_ids


def test_ochuman_recipe_has_no_train_split(ochuman):
    config, _, _ = ochuman
    res = CliRunner().invoke(main, ["train-teacher", "--config", str(config), "--role", "primary"])
    assert res.exit_code != 0
    assert res.output.strip().splitlines() == [f"Error: {config.parent / 'ochuman' / 'images' / 'train'}: "
                                               "image folder not found"]


ROOT = Path(__file__).resolve().parents[1]
RELEASE_LIMIT_BYTES = 10_000_000


def makefile_synth_options(name: str) -> list[str]:
    """The synth options `make demo` regenerates one of its datasets with (TEACHER_DATA, DEMO_DATA)."""
    lines = [line for line in (ROOT / "Makefile").read_text().splitlines() if line.startswith(f"{name} :=")]
    assert len(lines) == 1, f"the Makefile defines {name} once"
    return lines[0].split(":=", 1)[1].split()


def test_the_released_demo_teachers_are_the_ones_the_teacher_data_regenerates_for(tmp_path, monkeypatch):
    out = tmp_path / "demo-teachers"
    result = CliRunner().invoke(main, ["synth", str(out), *makefile_synth_options("TEACHER_DATA")])
    assert result.exit_code == 0, result.output
    monkeypatch.chdir(ROOT)  # the pipeline's zoo/ paths are relative to the repository
    cfg = load_config(ROOT / "pipeline" / "demo.toml")
    checks, total = {}, 0
    for role in ("primary", "senior"):
        assert getattr(cfg.teachers, role).data_root == "data/demo-teachers"
        cfg = dataclasses.replace(cfg, teachers=dataclasses.replace(
            cfg.teachers, **{role: dataclasses.replace(getattr(cfg.teachers, role), data_root=str(out))}))
        tcfg = getattr(cfg.teachers, role)
        assert tcfg.checkpoint.startswith("zoo/") and tcfg.fingerprint, "the demo uses released, pinned weights"
        checks[role] = check_teacher(cfg, role)  # raises unless fingerprint and dataset fingerprint match
        ckpt = torch.load(ROOT / tcfg.checkpoint, map_location="cpu", weights_only=True)
        assert set(ckpt) == {"format", "model", "meta", "best_ap"}, "weights and metadata only"
        assert all(t.dtype == torch.float16 for t in ckpt["model"].values() if t.is_floating_point())
        assert ckpt["meta"]["release"]["val_stats"]["AP"] == checks[role].val_ap == ckpt["best_ap"]
        total += (ROOT / tcfg.checkpoint).stat().st_size
    assert total <= RELEASE_LIMIT_BYTES
    assert checks["senior"].val_ap >= 0.30, "the demo's goal for ST on val"
    assert checks["senior"].val_ap >= checks["primary"].val_ap + 0.05, "ST is clearly the stronger teacher"


def test_the_demo_gt_only_student_trains_as_many_steps_as_the_odkd_one():
    """The Makefile's GT_SAME_STEPS restates demo.toml's schedule: an ODKD epoch holds 1 / (1 - share)
    labelled epochs' samples, so the GT-only student's epochs must be that many times the stages'."""
    line = [line for line in (ROOT / "Makefile").read_text().splitlines() if line.startswith("GT_SAME_STEPS :=")]
    assert len(line) == 1, "the Makefile defines GT_SAME_STEPS once"
    sets = [word for word in shlex.split(line[0].split(":=", 1)[1]) if word != "--set"]
    odkd = load_config(ROOT / "pipeline" / "demo.toml").student
    gt = variant_student(load_config(ROOT / "pipeline" / "demo.toml", sets).student, "gt")
    assert gt.epochs == round(odkd.epochs / (1 - odkd.unlabeled_share))
