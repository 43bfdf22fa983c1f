"""The command line as a user meets it: help, one-line errors, and the issue-2 commands end to end."""

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import make_tiny_world
from odkd.cli import main
from odkd.synth import make_synthetic_dataset


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    make_synthetic_dataset(root / "data", train_images=6, val_images=4, seed=2)
    cfg = root / "pipe.toml"
    cfg.write_text(f'[data]\nroot = "{root / "data"}"\ninput_size = [96, 128]\nheatmap_size = [24, 32]\n')
    return root


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_help_lists_every_command():
    out = run("--help").output
    for cmd in ("synth", "evaluate", "browse", "models", "train-teacher", "predict"):
        assert cmd in out


def test_synth_writes_coco_layout(tmp_path):
    res = run("synth", tmp_path / "s", "--train-images", 2, "--val-images", 1, "--seed", 1)
    assert res.exit_code == 0, res.output
    assert json.loads(res.output[res.output.index("{"):])["train"]["images"] == 2
    assert len(list((tmp_path / "s" / "images" / "train").glob("*.jpg"))) == 2
    assert (tmp_path / "s" / "annotations" / "person_keypoints_val.json").is_file()


def test_evaluate_gt_as_results_is_perfect(dataset, tmp_path):
    ann = dataset / "data" / "annotations" / "person_keypoints_val.json"
    res = run("evaluate", "--ann", ann, "--gt-as-results", "--stats-json", tmp_path / "s.json")
    assert res.exit_code == 0, res.output
    assert "| AP " in res.output and "1.000" in res.output
    assert json.loads((tmp_path / "s.json").read_text())["AP"] == 1.0


def test_evaluate_results_file_round_trip(dataset, tmp_path):
    ann = dataset / "data" / "annotations" / "person_keypoints_val.json"
    gt = json.loads(ann.read_text())
    results = [{"image_id": a["image_id"], "category_id": 1, "keypoints": a["keypoints"], "score": 0.9}
               for a in gt["annotations"] if not a["iscrowd"] and a["num_keypoints"] > 0]
    (tmp_path / "r.json").write_text(json.dumps(results))
    res = run("evaluate", "--ann", ann, "--results", tmp_path / "r.json")
    assert res.exit_code == 0 and "1.000" in res.output


def one_line_error(res) -> str:
    assert res.exit_code != 0
    lines = [line for line in res.output.strip().splitlines() if line]
    assert len(lines) == 1 and lines[0].startswith("Error: "), res.output
    assert "Traceback" not in res.output
    return lines[0]


def test_bad_config_key_is_one_line(tmp_path):
    cfg = tmp_path / "bad.toml"
    cfg.write_text("[data]\nroot = 'x'\nsigmaa = 2\n")
    line = one_line_error(run("browse", "--config", cfg, "--out", tmp_path / "o"))
    assert "bad.toml" in line and "unknown key 'data.sigmaa'" in line


def test_wrong_type_and_bad_size_name_the_key(tmp_path):
    cfg = tmp_path / "bad.toml"
    cfg.write_text("[data]\nsigma = 'wide'\n")
    assert "data.sigma: expected a number" in one_line_error(run("models", "--config", cfg))
    cfg.write_text("[data]\ninput_size = [100, 128]\n")
    assert "data.input_size" in one_line_error(run("models", "--config", cfg))


def test_broken_annotation_file_is_one_line(tmp_path):
    ann = tmp_path / "broken.json"
    ann.write_text("{ not json")
    assert "broken.json: ground truth is not valid JSON" in one_line_error(run("evaluate", "--ann", ann, "--gt-as-results"))


def test_missing_image_folder_is_one_line(dataset, tmp_path):
    cfg = tmp_path / "p.toml"
    cfg.write_text(f'[data]\nroot = "{dataset / "data"}"\ntrain_images = "nope"\n'
                   'input_size = [96, 128]\nheatmap_size = [24, 32]\n')
    assert "nope: image folder not found" in one_line_error(run("browse", "--config", cfg, "--out", tmp_path / "o"))


def test_browse_writes_pngs(dataset, tmp_path):
    res = run("browse", "--config", dataset / "pipe.toml", "--split", "val", "--out", tmp_path / "b", "--augment",
              "-n", 3)
    assert res.exit_code == 0, res.output
    pngs = sorted((tmp_path / "b").glob("val_*.png"))
    assert len(pngs) == 3 and all(p.stat().st_size > 1000 for p in pngs)


def models_tables(res) -> tuple[dict, dict]:
    """`odkd models`' two tables: {model: [params, GFLOPs]} of the registry, {role: [model, params, GFLOPs,
    model_args...]} of the config."""
    assert res.exit_code == 0, res.output
    registry, configured = res.output.split("\n\n")
    rows = {line.split()[0]: line.split()[1:] for line in registry.splitlines()[1:]}
    return rows, {line.split()[0]: line.split()[1:] for line in configured.splitlines()[2:]}


def test_models_lists_with_complexity(dataset):
    rows, configured = models_tables(run("models", "--config", dataset / "pipe.toml"))
    assert {"hrnet_w32", "hrnet_w48", "hrnet_w16", "mobilenetv2", "hrnet_tiny"} <= rows.keys()
    assert float(rows["hrnet_w32"][0]) == pytest.approx(28.5, abs=0.1)
    assert configured["primary"] == ["hrnet_w32", *rows["hrnet_w32"], "-"]


def test_models_lists_the_configured_student_with_its_model_args(dataset, tmp_path):
    """The COCO recipe's student: hrnet_w16 made small by model_args, not the registry's hrnet_w16."""
    cfg = tmp_path / "w16.toml"
    cfg.write_text((dataset / "pipe.toml").read_text() + '[student]\nmodel = "hrnet_w16"\n'
                   "model_args = { num_modules = [1, 1, 1], num_blocks = 2, layer1_blocks = 1, layer1_planes = 32 }\n")
    rows, configured = models_tables(run("models", "--config", cfg))
    name, params, gflops, *args = configured["student"]
    assert name == "hrnet_w16"
    assert " ".join(args) == "num_modules=[1, 1, 1], num_blocks=2, layer1_blocks=1, layer1_planes=32"
    assert float(params) == pytest.approx(1.29, abs=0.01) and float(params) < float(rows["hrnet_w16"][0]) / 5
    assert float(gflops) < float(rows["hrnet_w16"][1]) / 4


def test_wrong_checkpoint_is_one_line(dataset, tmp_path):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"definitely not a checkpoint")
    line = one_line_error(run("evaluate", "--config", dataset / "pipe.toml", "--checkpoint", bad))
    assert "bad.pth" in line


def test_cache_commands_end_to_end(dataset, tmp_path):
    """cache-teachers -> cache info -> cache verify through the CLI, with two tiny teachers."""
    from odkd.models import build_model, save_checkpoint

    ckpts = {}
    for role, seg in (("primary", False), ("senior", True)):
        ckpts[role] = tmp_path / f"{role}.pth"
        save_checkpoint(ckpts[role], build_model("hrnet_tiny", seg_head=seg, width=4), model_name="hrnet_tiny",
                        model_args={"width": 4}, seg_head=seg)
    cfg = tmp_path / "cache.toml"
    cfg.write_text((dataset / "pipe.toml").read_text() + f"""
[teachers.primary]
model = "hrnet_tiny"
model_args = {{ width = 4 }}
checkpoint = "{ckpts['primary']}"
[teachers.senior]
model = "hrnet_tiny"
model_args = {{ width = 4 }}
seg_head = true
checkpoint = "{ckpts['senior']}"
[cache]
store = "{tmp_path / 'store.zarr'}"
chunk_instances = 4
shard_instances = 8
""")
    res = run("cache-teachers", "--config", cfg, "--split", "val", "--scheduler", "synchronous", "--device", "cpu")
    assert res.exit_code == 0, res.output
    ran = "tf32 requested; ran fp32 on cpu"  # the default precision, on a CPU, which has no TF32
    assert f"precision: {ran}" in res.output and "already complete" not in res.output
    again = run("cache-teachers", "--config", cfg, "--split", "val", "--scheduler", "synchronous", "--device", "cpu")
    assert again.exit_code == 0, again.output
    assert f"{tmp_path / 'store.zarr'}: already complete (2 shards checked), nothing built" in again.output
    info = run("cache", "info", tmp_path / "store.zarr")
    assert info.exit_code == 0 and "bytes" in info.output.lower() and f"precision    {ran}" in info.output
    ok = run("cache", "verify", tmp_path / "store.zarr", "--config", cfg, "--sample", 4)
    assert ok.exit_code == 0 and ok.output.strip().endswith("verified"), ok.output
    assert "re-run at fp32" in ok.output and "tf32" not in ok.output
    # another dataset: the fingerprint check fails verify with exit 1
    other = tmp_path / "other.toml"
    other.write_text(cfg.read_text().replace('input_size = [96, 128]', 'input_size = [96, 128]\nval_ann = '
                                             '"annotations/person_keypoints_train.json"\nval_images = "images/train"'))
    bad = run("cache", "verify", tmp_path / "store.zarr", "--config", other)
    assert bad.exit_code == 1 and "fingerprint" in bad.output
    # teacher files that cannot be found: not verified, unless only the shards and the dataset were asked for
    ckpts["primary"].rename(tmp_path / "elsewhere.pth")
    blind = run("cache", "verify", tmp_path / "store.zarr", "--config", cfg)
    assert blind.exit_code == 1 and blind.output.strip().endswith("NOT verified"), blind.output
    assert "FAIL  teachers not re-run: " in blind.output and "primary.pth" in blind.output
    decode_only = run("cache", "verify", tmp_path / "store.zarr", "--config", cfg, "--no-replay")
    assert decode_only.exit_code == 0 and decode_only.output.strip().endswith("verified"), decode_only.output
    assert "skip  teachers not re-run (--no-replay)" in decode_only.output
    ckpts["primary"] = (tmp_path / "elsewhere.pth").rename(ckpts["primary"])
    # a second build with other settings is refused without --overwrite, and the store survives
    changed = tmp_path / "changed.toml"
    changed.write_text(cfg.read_text().replace("shard_instances = 8", "shard_instances = 8\nthreshold = 0.3"))
    line = one_line_error(run("cache-teachers", "--config", changed, "--split", "val", "--scheduler", "synchronous",
                              "--device", "cpu"))
    assert "store.zarr" in line
    assert run("cache", "verify", tmp_path / "store.zarr").exit_code == 0


def test_corrupt_image_in_a_loader_worker_is_one_line(tmp_path):
    """A bad JPEG met by a DataLoader worker process still reaches the user as the file's one line."""
    root = tmp_path / "data"
    make_synthetic_dataset(root, train_images=2, val_images=1, seed=4)
    victim = sorted((root / "images" / "train").glob("*.jpg"))[0]
    victim.write_bytes(b"not a jpeg")
    cfg = tmp_path / "p.toml"
    cfg.write_text(f'device = "cpu"\nruns = "{tmp_path / "runs"}"\n[data]\nroot = "{root}"\n'
                   'input_size = [96, 128]\nheatmap_size = [24, 32]\n[teachers.primary]\nmodel = "hrnet_tiny"\n'
                   '[teachers.primary.train]\nepochs = 1\nbatch_size = 2\nworkers = 1\n')
    res = run("train-teacher", "--config", cfg, "--role", "primary")
    assert res.exit_code == 1 and "Traceback" not in res.output
    errors = [line for line in res.output.splitlines() if line.startswith("Error")]
    assert errors == [f"Error: {victim}: cannot decode image (corrupt or not an image)"]


def test_predict_takes_flip_test_from_the_config_unless_told(tmp_path):
    world = make_tiny_world(tmp_path)
    image = next((world / "data" / "images" / "val").glob("*.jpg"))
    ann = world / "data" / "annotations" / "person_keypoints_val.json"
    ckpt = Path(__file__).resolve().parents[1] / "zoo" / "demo_senior.pth"  # trained: confident keypoints
    cfg = tmp_path / "p.toml"
    cfg.write_text(f'[data]\nroot = "{world / "data"}"\ninput_size = [96, 128]\nheatmap_size = [24, 32]\n'
                   '[eval]\nflip_test = false\n')

    def picture(*flags):
        out = tmp_path / f"pred{len(list(tmp_path.glob('pred*.png')))}.png"
        res = run("predict", image, "--checkpoint", ckpt, "--ann", ann, "--config", cfg, "--out", out, *flags)
        assert res.exit_code == 0, res.output
        return out.read_bytes()

    from_config, without, with_flip = picture(), picture("--no-flip-test"), picture("--flip-test")
    assert from_config == without
    assert from_config != with_flip


DEVICE_ERROR = "'gpu' is not one of auto, cpu, cuda, cuda:N, mps"
# every command that runs a model, with what it needs besides --device to get that far (the demo pipeline,
# the default config, has the [student] that train-student and ablate need)
DEVICE_COMMANDS = {
    "evaluate": ["evaluate", "--checkpoint", "nowhere.pth"],
    "predict": ["predict", "nowhere.jpg", "--checkpoint", "nowhere.pth", "--boxes", "nowhere.json", "--out", "o.png"],
    "train-student": ["train-student"],
    "train-teacher": ["train-teacher", "--role", "primary"],
    "cache-teachers": ["cache-teachers", "--scheduler", "tcp://127.0.0.1:1"],
    "report": ["report"],
    "ablate": ["ablate"],
}


@pytest.mark.parametrize("command", sorted(DEVICE_COMMANDS))
def test_an_unknown_device_is_one_line_listing_the_devices(command, tmp_path):
    """Once a torch RuntimeError traceback; a report also left its empty --out folder behind."""
    out = tmp_path / "report"
    args = [*DEVICE_COMMANDS[command], *(["--out", out] if command == "report" else [])]
    assert one_line_error(run(*args, "--device", "gpu")) == f"Error: device {DEVICE_ERROR}"
    assert one_line_error(run(*args, "--set", "device=gpu")) == f"Error: --set device=gpu: device: {DEVICE_ERROR}"
    assert not out.exists()


def test_a_config_file_with_an_unknown_device_is_named(tmp_path):
    cfg = tmp_path / "p.toml"
    cfg.write_text('device = "gpu"\n')
    assert one_line_error(run("report", "--config", cfg, "--out", tmp_path / "r")) == (
        f"Error: {cfg}: device: {DEVICE_ERROR}")
    assert not (tmp_path / "r").exists()


def test_models_checks_everything_before_it_prints_a_line(dataset, tmp_path):
    """An unknown model named neither key nor file; a model_args value the model cannot take came after half the
    table, or as a torch traceback."""
    line = one_line_error(run("models", "--config", dataset / "pipe.toml", "--set", "student.model=resnet50"))
    assert line == ("Error: --set student.model=resnet50: student.model: unknown model 'resnet50'; known models: "
                    "hrnet_w48, hrnet_w32, hrnet_w18, hrnet_w16, hrnet_tiny, mobilenetv2, mobilenetv2_tiny")
    cfg = tmp_path / "p.toml"
    cfg.write_text((dataset / "pipe.toml").read_text()
                   + '[student]\nmodel = "hrnet_tiny"\nmodel_args = { width = -3 }\n')
    line = one_line_error(run("models", "--config", cfg))
    assert line.startswith(f"Error: {cfg}: student.model_args: model 'hrnet_tiny' with model_args {{'width': -3}}: ")
    line = one_line_error(run("models", "--config", dataset / "pipe.toml", "--set",
                              "student.model_args={num_modules = [1]}", "--set", "student.model=hrnet_tiny"))
    assert line == ("Error: --set student.model=hrnet_tiny: student.model_args: model 'hrnet_tiny' with model_args "
                    "{'num_modules': [1]}: num_modules needs 3 entries (stage2, stage3, stage4), got [1]")


def test_predict_counts_people_in_words_and_writes_the_format_its_name_gives(tmp_path):
    """'1 people drawn' once; --out x.jpg wrote a JPEG under a help that said PNG, and a name OpenCV has no
    writer for was a cv2 traceback after the model had run."""
    world = make_tiny_world(tmp_path)
    image = next((world / "data" / "images" / "val").glob("*.jpg"))
    ckpt = Path(__file__).resolve().parents[1] / "zoo" / "demo_senior.pth"
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    one.write_text("[[10, 10, 40, 80]]")
    two.write_text("[[10, 10, 40, 80], [60, 10, 40, 80]]")
    res = run("predict", image, "--checkpoint", ckpt, "--boxes", one, "--out", tmp_path / "one.png")
    assert res.exit_code == 0 and res.output.strip() == f"1 person drawn to {tmp_path / 'one.png'}", res.output
    assert (tmp_path / "one.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    res = run("predict", image, "--checkpoint", ckpt, "--boxes", two, "--out", tmp_path / "two.jpg")
    assert res.exit_code == 0 and res.output.strip() == f"2 people drawn to {tmp_path / 'two.jpg'}", res.output
    assert (tmp_path / "two.jpg").read_bytes()[:3] == b"\xff\xd8\xff"  # a JPEG, as the name says
    for name, shown in (("x.xyz", "'.xyz'"), ("noextension", "'(no extension)'")):
        line = one_line_error(run("predict", image, "--checkpoint", ckpt, "--boxes", one, "--out", tmp_path / name))
        assert line == (f"Error: {tmp_path / name}: OpenCV writes no image format named {shown}; name the picture "
                        ".png (lossless) or .jpg, or another extension OpenCV writes (.bmp, .tif, .webp)")
        assert not (tmp_path / name).exists()
    assert "Output picture, in the format of its extension: .png (lossless), .jpg" in " ".join(
        run("predict", "--help").output.split())


def test_report_help_names_the_split_it_draws_crops_from():
    """`report --help` said 'val crops' beside `--split [val|test]`."""
    help_text = " ".join(run("report", "--help").output.split())
    assert "val crops" not in help_text
    assert "predictions on crops of that split" in help_text
    assert "The split every model is scored on and the grid's crops are drawn from." in help_text
