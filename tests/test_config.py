"""The pipeline config: choices per field, one-line errors with key paths, extends, --set, and the
resolved config a training run keeps in its folder."""

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import cv2
import pytest
from click.testing import CliRunner

import odkd.config as config
from odkd.cli import main
from odkd.config import (PipelineConfig, keep_resolved_config, load_config, parse_config, resolved_table, toml_text,
                         with_overrides)
from odkd.distill.variants import with_variant
from odkd.errors import OdkdError
from odkd.models.registry import check_configured_models
from odkd.synth import make_synthetic_dataset

ROOT = Path(__file__).resolve().parents[1]
PIPELINES = ROOT / "pipeline"


def error(text: str, source: str = "p.toml", overrides=()) -> str:
    """The one line a pipeline's error is, as the CLI loads it: its keys, then the models it names."""
    with pytest.raises(OdkdError) as exc:
        check_configured_models(parse_config(text, source, overrides))
    message = str(exc.value)
    assert "\n" not in message
    return message


# --- choices and types, per field ---

@dataclass(frozen=True)
class Lesson:
    teacher: str = ""  # a free string: the name of a field elsewhere with choices gives it none


@dataclass(frozen=True)
class School:
    teacher: Literal["primary", "senior"] = "primary"
    lesson: Lesson = field(default_factory=Lesson)


def test_choices_belong_to_the_field_not_to_its_name():
    school = config._section(School, {"teacher": "senior", "lesson": {"teacher": "Ms Smith"}}, "")
    assert school == School(teacher="senior", lesson=Lesson(teacher="Ms Smith"))
    with pytest.raises(OdkdError, match=r"^teacher: 'Ms Smith' is not one of primary, senior$"):
        config._section(School, {"teacher": "Ms Smith"}, "")


def test_every_key_with_choices_is_a_literal_and_the_cli_takes_the_same_decoders():
    assert config.choices(config.EvalConfig, "decode") == ("argmax", "centroid", "dark")
    assert config.choices(config.StageConfig, "teacher") == ("primary", "senior", "both", "none")
    help_text = CliRunner().invoke(main, ["evaluate", "--help"]).output
    assert "[argmax|centroid|dark]" in help_text


@pytest.mark.parametrize("text, message", [
    ('[[student.stages]]\nname = "a"\nepochs = 1\n[[student.stages]]\nname = "b"\nepochs = 1\nteacher = "seniour"\n',
     "p.toml: student.stages[1].teacher: 'seniour' is not one of primary, senior, both, none"),
    ("[student]\ntrian = {lr = 1}\n", "p.toml: unknown key 'student.trian' (allowed: best, cache, init, keep_blob_size, "
                                      "lr_span, model, model_args, seg_head, seg_loss, stages, train, unlabeled_cache, "
                                      "unlabeled_ratio)"),
    ("extend = 'x.toml'\n", "p.toml: unknown key 'extend' (allowed: cache, data, device, eval, runs, student, teachers)"),
    ("[data]\ninput_size = [192, 'wide']\n", "p.toml: data.input_size[1]: expected an integer, got 'wide'"),
    ("[data]\ninput_size = [192, 256, 3]\n", "p.toml: data.input_size: expected 2 values, got 3"),
    ("[data]\naugment = 3\n", "p.toml: data.augment: expected a table, got int"),
    ("[student.train]\nlr_steps = 170\n", "p.toml: student.train.lr_steps: expected an array, got int"),
    ("[student.train]\nepochs = true\n", "p.toml: student.train.epochs: expected an integer, got True"),
    ("[eval]\nflip_test = 1\n", "p.toml: eval.flip_test: expected true or false, got 1"),
    ("[eval]\ndecode = 1\n", "p.toml: eval.decode: 1 is not one of argmax, centroid, dark"),
    ("device = 0\n", "p.toml: device: expected a string, got 0"),
    ("[data\n", "p.toml: not valid TOML: "),
])
def test_errors_are_one_line_naming_the_file_and_the_key_path(text, message):
    assert error(text).startswith(message)


def test_values_come_back_in_the_fields_types():
    cfg = parse_config("[data]\nsigma = 3\ninput_size = [256, 320]\nheatmap_size = [64, 80]\n")
    assert cfg.data.sigma == 3.0 and isinstance(cfg.data.sigma, float)
    assert cfg.data.input_size == (256, 320) and cfg.data.heatmap_size == (64, 80)
    assert cfg.teachers.senior.model == "hrnet_w48", "a section left out keeps its own default"


# --- extends ---

def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


BASE = """
runs = "runs/base"
[data]
root = "data/base"
sigma = 3.0
[data.augment]
flip_prob = 0.25
rotation_prob = 0.1
[student]
model = "hrnet_tiny"
model_args = { width = 8, num_blocks = 2 }
[student.train]
lr = 0.01
lr_steps = [5, 8]
[[student.stages]]
name = "primary"
epochs = 5
[[student.stages]]
name = "senior"
epochs = 5
teacher = "senior"
"""


def test_extends_merges_tables_key_by_key_and_the_child_wins(tmp_path):
    write(tmp_path / "recipes" / "base.toml", BASE)
    child = write(tmp_path / "recipes" / "child.toml", """
extends = "base.toml"
runs = "runs/child"
[data.augment]
flip_prob = 0.75
[student]
model_args = { num_blocks = 3 }
[student.train]
lr_steps = [7]
""")
    cfg = load_config(child)
    assert cfg.runs == "runs/child" and cfg.data.root == "data/base" and cfg.data.sigma == 3.0
    assert (cfg.data.augment.flip_prob, cfg.data.augment.rotation_prob) == (0.75, 0.1)
    assert cfg.student.model_args == {"width": 8, "num_blocks": 3}, "an inline table is a table: merged"
    assert (cfg.student.train.lr, cfg.student.train.lr_steps) == (0.01, (7,)), "an array is replaced whole"
    assert [s.name for s in cfg.student.stages] == ["primary", "senior"]
    assert "extends" not in cfg.raw and cfg.raw["data"]["augment"] == {"flip_prob": 0.75, "rotation_prob": 0.1}


def test_extends_replaces_an_array_of_tables_whole(tmp_path):
    write(tmp_path / "base.toml", BASE)
    child = write(tmp_path / "child.toml", 'extends = "base.toml"\n[[student.stages]]\nname = "gt"\nepochs = 3\n'
                                           'teacher = "none"\n')
    stages = load_config(child).student.stages
    assert [(s.name, s.epochs, s.teacher) for s in stages] == [("gt", 3, "none")]


def test_extends_is_relative_to_the_file_that_names_it_and_may_chain(tmp_path, monkeypatch):
    write(tmp_path / "shared" / "base.toml", BASE)
    write(tmp_path / "shared" / "middle.toml", 'extends = "base.toml"\n[data]\nsigma = 1.5\n')
    child = write(tmp_path / "mine" / "child.toml", 'extends = "../shared/middle.toml"\n[data]\nroot = "data/mine"\n')
    monkeypatch.chdir(tmp_path / "shared")  # not where child.toml is
    cfg = load_config(child)
    assert (cfg.data.root, cfg.data.sigma, cfg.runs) == ("data/mine", 1.5, "runs/base")


def test_an_extends_cycle_and_a_missing_base_are_one_line(tmp_path):
    a = write(tmp_path / "a.toml", 'extends = "b.toml"\n')
    write(tmp_path / "b.toml", 'extends = "a.toml"\n')
    with pytest.raises(OdkdError, match=r"b\.toml: extends 'a\.toml' closes a cycle: .*a\.toml -> .*b\.toml -> "
                                        r".*a\.toml$"):
        load_config(a)
    itself = write(tmp_path / "self.toml", 'extends = "self.toml"\n')
    with pytest.raises(OdkdError, match="closes a cycle"):
        load_config(itself)
    orphan = write(tmp_path / "orphan.toml", 'extends = "coco.toml"\n')
    with pytest.raises(OdkdError) as exc:
        load_config(orphan)
    assert str(exc.value) == (f"{orphan}: extends 'coco.toml', but there is no file {tmp_path / 'coco.toml'} "
                              f"(extends is relative to the file that names it, unlike every other path, which is "
                              f"relative to the working directory)")
    assert "extends: expected a path relative to this file, got 3" in error("extends = 3\n")


def test_the_w16_recipe_is_coco_hrnet_and_what_it_changes():
    """coco_hrnet_w16.toml says only what differs from coco_hrnet.toml, and resolves to the config it
    held as one flat file (compared field by field when it was split; the student is pinned in
    test_pipelines.py)."""
    base, w16 = load_config(PIPELINES / "coco_hrnet.toml"), load_config(PIPELINES / "coco_hrnet_w16.toml")
    assert tomllib.loads((PIPELINES / "coco_hrnet_w16.toml").read_text())["extends"] == "coco_hrnet.toml"
    assert (w16.data, w16.eval, w16.teachers.primary, w16.device) == (base.data, base.eval, base.teachers.primary,
                                                                      base.device)
    assert w16.runs == "runs/coco"
    assert w16.teachers.senior == dataclasses.replace(base.teachers.senior,
                                                      checkpoint="runs/coco/teacher_senior/best.pth")
    assert w16.cache == dataclasses.replace(base.cache, store="cache/coco_train_m125.zarr", margin=1.25,
                                            shard_instances=2048, batch_size=256, decode_threads=4)
    assert w16.student.cache == w16.cache.store and "student" not in base.raw


def test_the_package_pipelines_are_the_repository_pipelines():
    """The embedded copies (the demo config is the default of every command) are pipeline/ itself."""
    package = ROOT / "odkd" / "pipelines"
    assert {p.name: p.read_bytes() for p in package.glob("*.toml")} == {
        p.name: p.read_bytes() for p in PIPELINES.glob("*.toml")}
    assert config.DEMO_CONFIG.resolve() == (PIPELINES / "demo.toml").resolve()


# --- --set ---

def test_set_reads_toml_values_and_falls_back_to_a_bare_string():
    table = with_overrides({"student": {"train": {"lr": 0.1}}}, [
        "student.train.lr=1e-3", "student.train.epochs = 4", "student.train.amp=false", "data.root=data/my coco",
        "data.input_size=[256, 320]", 'runs="2024-01-01"', "teachers.primary.init=", "device=cuda:1",
        "student.model_args={width = 8}"])
    assert table == {"student": {"train": {"lr": 1e-3, "epochs": 4, "amp": False}, "model_args": {"width": 8}},
                     "data": {"root": "data/my coco", "input_size": [256, 320]}, "runs": "2024-01-01",
                     "teachers": {"primary": {"init": ""}}, "device": "cuda:1"}


def test_set_takes_an_index_into_an_array_of_tables_and_keys_of_a_free_form_table():
    text = BASE + '[teachers.primary]\nmodel_args = { width = 4 }\n'
    cfg = parse_config(text, "p.toml", ["student.stages[1].seg_weight=0.01", "student.stages[1].teacher=both",
                                        "student.train.lr_steps=[6]", "teachers.primary.model_args.width=6",
                                        "teachers.primary.model_args.num_blocks=[1, 2]"])
    assert (cfg.student.stages[1].seg_weight, cfg.student.stages[1].teacher) == (0.01, "both")
    assert cfg.student.stages[0].seg_weight == 0.0 and cfg.student.train.lr_steps == (6,)
    assert cfg.teachers.primary.model_args == {"width": 6, "num_blocks": [1, 2]}
    assert cfg.overrides[0] == "student.stages[1].seg_weight=0.01"
    assert cfg.raw["student"]["stages"][1]["seg_weight"] == 0.01


def test_set_applies_after_extends(tmp_path):
    write(tmp_path / "base.toml", BASE)
    child = write(tmp_path / "child.toml", 'extends = "base.toml"\n[data]\nsigma = 2.5\n')
    cfg = load_config(child, ["data.sigma=1.25", "student.stages[0].epochs=7"])
    assert (cfg.data.sigma, cfg.student.stages[0].epochs, cfg.data.root) == (1.25, 7, "data/base")


@pytest.mark.parametrize("item, message", [
    ("student.trian.lr=1e-3", "--set student.trian.lr=1e-3: unknown key 'student.trian' (allowed: best, cache, "),
    ("data.sigma.x=1", "--set data.sigma.x=1: 'data.sigma' is not a table"),
    ("data.root[0]=x", "--set data.root[0]=x: 'data.root' is not an array"),
    ("student.stages[2].epochs=3", "--set student.stages[2].epochs=3: the config has no student.stages[2]; set the "
                                   "whole array, e.g. --set 'student.stages=[...]'"),
    ("student.stages[0].epoch=3", "--set student.stages[0].epoch=3: unknown key 'student.stages[0].epoch' (allowed: "
                                  "conf_floor, epochs, "),
    ("data.sigma", "--set data.sigma: expected KEY=VALUE, e.g. --set student.train.lr=1e-3"),
    ("data..sigma=1", "--set data..sigma=1: 'data..sigma' is not a key path like "),
])
def test_a_bad_set_is_one_line_naming_it(item, message):
    assert error(BASE, overrides=[item]).startswith(message)


def test_a_set_value_is_checked_like_the_file_and_the_error_names_the_key_and_the_set():
    assert error(BASE, overrides=["student.stages[1].teacher=seniour"]) == (
        "--set student.stages[1].teacher=seniour: student.stages[1].teacher: 'seniour' is not one of primary, "
        "senior, both, none")
    assert error(BASE, overrides=["data.sigma=wide"]) == (
        "--set data.sigma=wide: data.sigma: expected a number, got 'wide'")
    # a whole table set at once is blamed for a bad key inside it; the file keeps the blame for its own keys
    assert error(BASE, overrides=["data.augment={flip_prob = 'often'}"]) == (
        "--set data.augment={flip_prob = 'often'}: data.augment.flip_prob: expected a number, got 'often'")
    assert error(BASE + "[eval]\ndecode = 'best'\n", overrides=["data.sigma=2"]) == (
        "p.toml: eval.decode: 'best' is not one of argmax, centroid, dark")
    # the checks after the types too
    assert error(BASE, overrides=["data.input_size=[100, 128]"]).startswith(
        "--set data.input_size=[100, 128]: data.input_size [100, 128] must be multiples of 32")
    assert error(BASE, overrides=["student.stages[0].epochs=-1"]) == (
        "--set student.stages[0].epochs=-1: student.stages[0].epochs must be >= 0, got -1")


KNOWN_MODELS = ("hrnet_w48, hrnet_w32, hrnet_w18, hrnet_w16, hrnet_tiny, mobilenetv2, mobilenetv2_tiny")


def test_an_unknown_model_names_the_key_where_it_came_from_and_the_known_models(tmp_path):
    assert error(BASE, overrides=["student.model=resnet50"]) == (
        f"--set student.model=resnet50: student.model: unknown model 'resnet50'; known models: {KNOWN_MODELS}")
    assert error(BASE, overrides=["teachers.senior.model=hrnet_w64"]) == (
        f"--set teachers.senior.model=hrnet_w64: teachers.senior.model: unknown model 'hrnet_w64'; known models: "
        f"{KNOWN_MODELS}, onnx, torchscript")
    pipeline = write(tmp_path / "p.toml", '[teachers.primary]\nmodel = "hrnet-w32"\n')
    with pytest.raises(OdkdError) as exc:
        check_configured_models(load_config(pipeline))
    assert str(exc.value) == (f"{pipeline}: teachers.primary.model: unknown model 'hrnet-w32'; known models: "
                              f"{KNOWN_MODELS}, onnx, torchscript")


def test_a_model_args_typo_names_the_key_where_it_came_from_and_the_arguments():
    hrnet_args = "width, num_modules, num_blocks, layer1_blocks, layer1_planes, stem_channels"
    assert error(BASE, overrides=["student.model_args.widht=4"]) == (
        f"--set student.model_args.widht=4: student.model_args.widht: model 'hrnet_tiny' has no argument 'widht'; "
        f"its model_args are: {hrnet_args}")
    assert error(BASE + "[teachers.primary]\nmodel_args = { num_block = 1 }\n") == (
        f"p.toml: teachers.primary.model_args.num_block: model 'hrnet_w32' has no argument 'num_block'; its "
        f"model_args are: {hrnet_args}")
    # a file's model_args that the model --set names does not take: the --set made them wrong
    assert error(BASE, overrides=["student.model=mobilenetv2"]) == (
        "--set student.model=mobilenetv2: student.model_args.width: model 'mobilenetv2' has no argument 'width'; "
        "its model_args are: width_mult, last_channels, deconv_channels")


def test_set_on_the_command_line(tmp_path):
    make_synthetic_dataset(tmp_path / "data", train_images=1, val_images=1, seed=0)
    pipeline = write(tmp_path / "p.toml", '[data]\nroot = "nowhere"\n')
    runner = CliRunner()
    res = runner.invoke(main, ["browse", "--config", str(pipeline), "--set", f"data.root={tmp_path / 'data'}",
                               "--set", "data.input_size=[64, 64]", "--set", "data.heatmap_size=[16, 16]",
                               "-n", "1", "--out", str(tmp_path / "crops")])
    assert res.exit_code == 0, res.output
    assert cv2.imread(str(next((tmp_path / "crops").glob("*.png")))) is not None
    res = runner.invoke(main, ["browse", "--config", str(pipeline), "--out", str(tmp_path / "o"),
                               "--set", "data.sigmaa=1"])
    assert res.exit_code == 1 and res.output.strip().splitlines() == [
        "Error: --set data.sigmaa=1: unknown key 'data.sigmaa' (allowed: augment, categories, heatmap_size, "
        "input_size, joint_weights, keypoints, root, sigma, strict, test_ann, test_images, train_ann, train_images, unlabeled, "
        "val_ann, val_images)"]
    res = runner.invoke(main, ["cache", "verify", str(tmp_path / "s.zarr"), "--set", "data.sigma=1"])
    assert res.exit_code == 2 and "--set changes keys of --config; give --config too" in res.output


def commands_with(option: str) -> list[list[str]]:
    from test_docs import cli_commands

    paths = []
    for path in cli_commands():
        command = main
        for name in path:
            command = command.commands[name]
        if any(option in param.opts for param in command.params):
            paths.append(list(path))
    return paths


def test_every_command_that_takes_config_takes_set():
    with_config = commands_with("--config")
    assert len(with_config) >= 13 and ["cache", "verify"] in with_config
    assert with_config == commands_with("--set")
    for path in with_config:
        assert "--set KEY=VALUE" in CliRunner().invoke(main, [*path, "--help"]).output, path


# --- the resolved config in a run's folder ---

def test_the_toml_writer_reads_back_as_what_it_wrote():
    table = {"device": "cpu", "text": 'quote " back \\ tab \t del \x7f é', "x": [1.5, 1e-5, float("inf")],
             "empty": {}, "data": {"augment": {"flip_prob": 0.5}}, "odd key": True,
             "student": {"model_args": {"num_modules": [1, 1]}, "stages": [{"name": "a", "sub": {"k": []}}, {}]}}
    assert tomllib.loads(toml_text(table)) == table
    for path in sorted(PIPELINES.glob("*.toml")):
        raw = load_config(path).raw
        assert tomllib.loads(toml_text(raw)) == raw, path.name


def test_the_resolved_table_loads_back_as_the_config_with_what_a_command_changed():
    cfg = load_config(PIPELINES / "coco_hrnet_w16.toml", ["student.train.lr=2e-3"])
    gt = with_variant(cfg, "gt")
    seeded = dataclasses.replace(gt, student=dataclasses.replace(
        gt.student, train=dataclasses.replace(gt.student.train, seed=7)))
    for changed in (cfg, gt, seeded):
        back = parse_config(toml_text(resolved_table(changed)))
        assert dataclasses.replace(back, source=changed.source, overrides=changed.overrides, raw=changed.raw) == changed
    assert resolved_table(cfg) == cfg.raw, "nothing changed: the resolved file as it is"
    # a section the file leaves out is written whole, so it keeps the values a left-out section has
    demo = parse_config("")
    senior = dataclasses.replace(demo, teachers=dataclasses.replace(
        demo.teachers, senior=dataclasses.replace(demo.teachers.senior, init="w48.pth")))
    assert parse_config(toml_text(resolved_table(senior))).teachers.senior == senior.teachers.senior


def test_a_resume_under_another_config_keeps_the_earlier_file(tmp_path):
    first = parse_config("[data]\nsigma = 2.0\n", "p.toml")
    assert keep_resolved_config(first, tmp_path) == tmp_path / "config.toml"
    assert keep_resolved_config(first, tmp_path) == tmp_path / "config.toml"  # the same config: the same file
    other = parse_config("[data]\nsigma = 2.0\n", "p.toml", ["data.sigma=3"])
    assert keep_resolved_config(other, tmp_path) == tmp_path / "config.1.toml"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.1.toml", "config.toml"]
    assert load_config(tmp_path / "config.toml").data.sigma == 2.0
    assert load_config(tmp_path / "config.1.toml").data.sigma == 3.0
    assert (tmp_path / "config.1.toml").read_text().startswith(
        "# the pipeline config of this run: p.toml --set data.sigma=3,")
    broken = parse_config("", "p.toml", ["runs=a\nsigma = 1"])  # the header comment stays one comment
    (tmp_path / "b").mkdir()
    assert load_config(keep_resolved_config(broken, tmp_path / "b")).runs == "a\nsigma = 1"


def test_train_teacher_keeps_its_resolved_config_in_the_run_folder(tmp_path):
    make_synthetic_dataset(tmp_path / "data", train_images=2, val_images=1, seed=3)
    write(tmp_path / "base.toml", f'device = "cpu"\nruns = "{tmp_path / "runs"}"\n[data]\nroot = "{tmp_path / "data"}"\n'
                                  'input_size = [64, 64]\nheatmap_size = [16, 16]\n'
                                  '[teachers.primary]\nmodel = "hrnet_tiny"\nmodel_args = { width = 4 }\n'
                                  '[teachers.primary.train]\nepochs = 3\nbatch_size = 2\nworkers = 0\namp = false\n')
    child = write(tmp_path / "recipes" / "p.toml", 'extends = "../base.toml"\n[teachers.primary.train]\nlr = 1e-4\n')
    res = CliRunner().invoke(main, ["train-teacher", "--config", str(child), "--role", "primary",
                                    "--set", "teachers.primary.train.epochs=1"])
    assert res.exit_code == 0, res.output
    kept = tmp_path / "runs" / "teacher_primary" / "config.toml"
    assert sorted(p.name for p in kept.parent.glob("config*")) == ["config.toml"]
    cfg = load_config(kept)
    assert (cfg.teachers.primary.train.epochs, cfg.teachers.primary.train.lr) == (1, 1e-4)
    assert "extends" not in tomllib.loads(kept.read_text())
    assert cfg.teachers == load_config(child, ["teachers.primary.train.epochs=1"]).teachers


def test_train_student_keeps_the_variant_it_trained_in_its_resolved_config(tmp_path):
    from test_student import copy_world, make_tiny_world, student_toml, write_config
    from odkd.teachers import build_cache

    world = make_tiny_world(tmp_path / "world", val_images=1)
    build_cache(parse_config(student_toml(world)), "train", scheduler="synchronous", progress=False)
    base = copy_world(world, tmp_path / "mine")
    pipeline = write_config(base)
    sets = ["student.stages[0].epochs=1", "student.stages[1].epochs=0", "student.train.seed=3"]
    res = CliRunner().invoke(main, ["train-student", "--config", str(pipeline), "--variant", "gt",
                                    *[arg for item in sets for arg in ("--set", item)]])
    assert res.exit_code == 0, res.output
    kept = load_config(base / "runs" / "student_gt" / "config.toml")
    assert [(s.name, s.epochs, s.teacher) for s in kept.student.stages] == [("gt", 1, "none")]
    assert kept.student.train.seed == 3
    trained = with_variant(load_config(pipeline, sets), "gt")
    assert dataclasses.replace(kept, source=trained.source, overrides=trained.overrides, raw=trained.raw) == trained
