"""Who prints: the library logs through `logging` under `odkd`, so an embedding program silences or
redirects it with the standard calls; only the command line prints, as much as -v and -q ask for."""

import ast
import json
import logging
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from conftest import odkd_log
from odkd.cli import main
from odkd.data.instances import PersonInstances
from odkd.models import build_model, save_checkpoint
from odkd.synth import make_synthetic_dataset

PACKAGE = Path(__file__).resolve().parents[1] / "odkd"


def drop_one_box(ann_file: Path) -> None:
    data = json.loads(ann_file.read_text())
    data["annotations"][0]["bbox"][2] = 0.0  # zero width: skipped with a warning
    ann_file.write_text(json.dumps(data))


def test_an_embedding_program_silences_odkd_with_one_level(tiny_coco, caplog):
    ann_file, image_dir = tiny_coco
    drop_one_box(ann_file)
    PersonInstances(ann_file, image_dir)
    (warning,) = odkd_log(caplog)
    assert warning.startswith(f"warning: {ann_file}: skipped 1 labelled person(s)")

    caplog.clear()
    odkd = logging.getLogger("odkd")
    before = odkd.level
    odkd.setLevel(logging.ERROR)
    try:
        assert len(PersonInstances(ann_file, image_dir)) == 4  # still skipped, no longer said
    finally:
        odkd.setLevel(before)
    assert caplog.records == []


def test_only_the_command_line_imports_click():
    importers = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "cli.py" and path.parent == PACKAGE:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
            if any(name == "click" or name.startswith("click.") for name in names):
                importers.append(str(path.relative_to(PACKAGE)))
    assert importers == []


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """A 6-image dataset, a one-epoch tiny primary teacher, and a checkpoint to start it from."""
    root = tmp_path_factory.mktemp("logging")
    make_synthetic_dataset(root / "data", train_images=6, val_images=2, seed=0)
    save_checkpoint(root / "plain.pth", build_model("hrnet_tiny", width=4), model_name="hrnet_tiny",
                    model_args={"width": 4}, seg_head=False)
    cfg = root / "pipe.toml"
    cfg.write_text(f'device = "cpu"\nruns = "{root / "runs"}"\n'
                   f'[data]\nroot = "{root / "data"}"\ninput_size = [96, 128]\nheatmap_size = [24, 32]\n'
                   f'[teachers.primary]\nmodel = "hrnet_tiny"\nmodel_args = {{ width = 4 }}\n'
                   f'[teachers.primary.train]\nepochs = 1\nbatch_size = 8\nworkers = 0\namp = false\n')
    return root


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.mark.usefixtures("one_torch_thread")
def test_quiet_hides_the_info_lines_and_keeps_the_result(pipeline):
    def train(*flags):
        res = run("train-teacher", "--config", pipeline / "pipe.toml", "--role", "primary",
                  "--init", pipeline / "plain.pth", "--out", pipeline / f"run{''.join(flags)}", *flags)
        assert res.exit_code == 0, res.output
        return res

    def info_lines(res):
        return [line for line in res.stderr.splitlines() if line.startswith(("init from ", "epoch=1 "))]

    default, quiet = train(), train("-q")
    assert [line.split()[0] for line in info_lines(default)] == ["init", "epoch=1"]
    assert info_lines(quiet) == []
    assert json.loads(quiet.stdout)["out_dir"] == str(pipeline / "run-q")


def test_verbose_shows_the_debug_lines(pipeline, tmp_path):
    ann_file = pipeline / "data" / "annotations" / "person_keypoints_train.json"
    detail = f"{ann_file}: "
    for flags, shown in [((), False), (("-v",), True), (("--verbose",), True), (("-v", "-q"), False)]:
        res = run("browse", "--config", pipeline / "pipe.toml", "--out", tmp_path / "crops", "-n", 1, *flags)
        assert res.exit_code == 0, res.output
        lines = [line for line in res.stderr.splitlines() if line.startswith(detail)]
        assert bool(lines) == shown, (flags, res.stderr)
    assert lines == [] and res.stdout == f"wrote 1 PNGs to {tmp_path / 'crops'}\n"


def test_every_command_takes_verbose_and_quiet():
    def leaves(group, path):
        for name, command in group.commands.items():
            if isinstance(command, click.Group):
                yield from leaves(command, [*path, name])
            else:
                yield [*path, name], command

    for path, command in leaves(main, []):
        flags = {opt for param in command.params for opt in param.opts}
        assert {"-v", "--verbose", "-q", "--quiet"} <= flags, " ".join(path)


def test_the_command_hands_the_logger_back(pipeline, tmp_path):
    odkd = logging.getLogger("odkd")
    before = odkd.level, odkd.propagate, list(odkd.handlers)
    res = run("browse", "--config", pipeline / "pipe.toml", "--out", tmp_path / "crops", "-n", 1, "-v")
    assert res.exit_code == 0, res.output
    assert (odkd.level, odkd.propagate, list(odkd.handlers)) == before
