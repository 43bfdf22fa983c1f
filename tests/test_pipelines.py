"""The shipped pipelines: every key of every pipeline/*.toml parses and names real models, the COCO
recipe's student takes the ImageNet file it names, and the OCHuman recipe evaluates val and test."""

import dataclasses
import json
import re
import shlex
import shutil
import tomllib
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from conftest import make_tiny_coco
from odkd.apps.report import same_file
from odkd.cli import main
from odkd.config import load_config, parse_config
from odkd.data.dataset import MixedEpochSampler, mixed_batch_size
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
        # a student that starts from PT's own weights learns from ST alone: PT would teach it its own predictions
        from_pt = same_file(student.init, cfg.teachers.primary.checkpoint) if "teachers" in cfg.raw else False
        order = ["senior", "senior"] if from_pt else ["primary", "senior"]
        assert [s.teacher for s in student.stages if s.teacher != "none"][:2] == order
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


def test_no_shipped_pipeline_extends_a_file_that_extends_another():
    """A reader of a shipped pipeline finds every key in it or in the one file it extends."""
    for path in sorted((ROOT / "pipeline").glob("*.toml")):
        table = tomllib.loads(path.read_text())
        if "extends" in table:
            base = tomllib.loads((path.parent / table["extends"]).read_text())
            assert "extends" not in base, f"{path.name} extends {table['extends']}, which extends {base['extends']}"


def test_the_demo_gt_only_student_trains_as_many_steps_as_the_odkd_one():
    """The Makefile runs both demo students at demo.toml's epochs; an ODKD epoch, its unlabelled people on
    top of each labelled batch, has as many steps as a labelled-only one for any number of labelled people."""
    make = (ROOT / "Makefile").read_text()
    gt_rule = make[make.index("demo-student-gt:"):make.index("demo-student:")]
    assert "epochs" not in gt_rule and "--variant gt" in gt_rule
    student = load_config(ROOT / "pipeline" / "demo.toml").student
    batch = student.train.batch_size
    assert variant_student(student, "gt").epochs == student.epochs
    for labeled in (batch, 271, 1000, 149_813):
        sampler = MixedEpochSampler(labeled, 2_633, student.unlabeled_ratio)
        assert len(sampler) // mixed_batch_size(batch, student.unlabeled_ratio) == labeled // batch


def test_both_demo_students_start_from_the_released_init():
    """The GT-only and the ODKD demo students start from the same weights, the released init that
    check-teachers pins, and neither Makefile rule swaps it for another."""
    cfg = load_config(ROOT / "pipeline" / "demo.toml")
    assert cfg.student.init == cfg.teachers.init.checkpoint == "zoo/demo_student_init.pth"
    assert "init" in cfg.teachers.released_roles() and cfg.teachers.init.fingerprint
    assert variant_student(cfg.student, "gt").init == cfg.student.init
    make = (ROOT / "Makefile").read_text()
    for rule in ("demo-student-gt:", "demo-student:"):
        body = make[make.index(rule):].split("\n\n", 1)[0]
        assert "init" not in body, body


def test_the_trained_student_recipe_starts_both_students_from_pt_and_teaches_st_alone():
    """make demo-trained-student: the recipe and GT fine-tuning from PT's released weights, the same steps,
    into their own runs folder, where odkd report finds both and shows PT as the students' start."""
    cfg = load_config(ROOT / "pipeline" / "demo_trained_student.toml")
    demo = load_config(ROOT / "pipeline" / "demo.toml")
    student, gt = cfg.student, variant_student(cfg.student, "gt")
    assert student.init == gt.init == cfg.teachers.primary.checkpoint == "zoo/demo_primary.pth"
    assert gt.epochs == student.epochs == 20 and student.train.lr == 2e-4
    assert [(s.teacher, s.targets, s.kd_weight, s.conf_floor) for s in student.stages] == [
        ("senior", "gaussian_conf", 0.5, 0.7)] * 2
    assert [s.seg_weight for s in student.stages] == [0.0, 0.002]
    assert (cfg.data, cfg.teachers, student.cache, student.unlabeled_cache) == (
        demo.data, demo.teachers, demo.student.cache, demo.student.unlabeled_cache), "make demo's data and stores"
    assert Path(cfg.runs) != Path(demo.runs)
    make = (ROOT / "Makefile").read_text()
    rule = make[make.index("demo-trained-student:"):].split("\n\n", 1)[0]
    assert "TRAINED := --config pipeline/demo_trained_student.toml" in make
    assert rule.count("train-student $(TRAINED)") == 2 and "--variant gt" in rule and "report $(TRAINED)" in rule
    assert "init" not in rule and "--set" not in rule, "the recipe is the config's, not the rule's"


def readme_first_run() -> list[list[str]]:
    """The odkd commands of the README's first run, as a user pastes them (continuations joined, comments cut)."""
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = text[text.index("## A first run in two minutes"):]
    block = section.split("```sh\n")[2].split("```")[0]
    commands = []
    for line in block.replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        if words:
            assert words[0] == "odkd", line
            commands.append(words[1:])
    return commands


def test_the_readme_first_run_runs_as_written(tmp_path, monkeypatch):
    """From a folder laid out as the repository root: synth, cache-teachers, train-student, evaluate,
    predict and export, each exactly as the README gives it."""
    root = Path(__file__).resolve().parents[1]
    for name in ("pipeline", "zoo"):
        (tmp_path / name).symlink_to(root / name)
    monkeypatch.chdir(tmp_path)
    commands = readme_first_run()
    assert [c[0] for c in commands] == ["synth", "cache-teachers", "train-student", "evaluate", "predict", "export"]
    for args in commands:
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 0, (args, result.output)
    assert (tmp_path / "first.png").stat().st_size > 0 and (tmp_path / "student.onnx").stat().st_size > 0
    log = [json.loads(line) for line in (tmp_path / "runs/first/student/log.jsonl").read_text().splitlines()]
    assert [entry["stage"] for entry in log] == ["primary", "senior"]


def test_the_unlabeled_coco_pipeline_resolves_where_the_doc_saves_it_and_trains_into_its_own_runs(tmp_path):
    """docs/unlabeled.md's COCO pipeline extended coco_hrnet_w16.toml without saying where to put it, and
    inherited runs = "runs/coco": its train-student met the labelled student's runs/coco/student."""
    section = (ROOT / "docs" / "unlabeled.md").read_text().split("## COCO: `unlabeled2017`")[1]
    pipeline = section.split("```toml\n")[1].split("```")[0]
    where = re.search(r"Save this pipeline as `(pipeline/[\w.]+\.toml)`", section).group(1)
    commands = section.split("```sh\n")[1].split("```")[0]
    assert commands.startswith(f"P={where}\n") and commands.count("--config $P") == 4
    shutil.copytree(ROOT / "pipeline", tmp_path / "pipeline")
    (tmp_path / where).write_text(pipeline)
    cfg, labelled = load_config(tmp_path / where), load_config(ROOT / "pipeline" / "coco_hrnet_w16.toml")
    assert Path(cfg.runs) / "student" != Path(labelled.runs) / "student"
    assert "runs/coco_unlabeled/student/best.pth" in commands
    assert cfg.student.unlabeled_cache == cfg.cache.unlabeled_store != cfg.cache.store
    # the teachers stay the labelled recipe's files, so both stores come from the same teachers
    assert cfg.teachers == labelled.teachers and cfg.student.cache == labelled.student.cache


def test_the_coco_toml_header_points_at_the_readme_block_instead_of_a_command_list_of_its_own():
    header = [line for line in (ROOT / "pipeline" / "coco_hrnet_w16.toml").read_text().splitlines()
              if line.startswith("#")]
    assert not [line for line in header if re.match(r"#\s+(odkd|torchrun)\s", line)], "a second list to keep in step"
    assert any('README.md, section "Your own data: COCO"' in line for line in header)
    readme = (ROOT / "README.md").read_text()
    block = readme.split("\n## Your own data: COCO")[1].split("```sh\n")[1].split("```")[0]
    assert "P=pipeline/coco_hrnet_w16.toml" in block and "torchrun --standalone" in block
