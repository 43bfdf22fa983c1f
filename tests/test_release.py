"""Released teachers: odkd release-teacher packs float16 weights with the train data and the packed
weights' own val stats; check-teachers and cache-teachers hold a teacher to [teachers.ROLE] fingerprint
and to the data it was trained on; train-student --variant trains one ablation variant."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from odkd.config import parse_config
from odkd.data.instances import load_instances
from odkd.distill.variants import UNLABELED_VARIANTS, VARIANTS
from odkd.errors import OdkdError
from odkd.eval.evaluate import evaluate_checkpoint
from odkd.models import build_from_checkpoint, model_fingerprint, read_checkpoint, save_checkpoint
from odkd.store import TeacherTargets
from odkd.synth import make_synthetic_dataset
from odkd.teachers import build_cache
from odkd.train.release import check_teacher, release_teacher
from test_student import TWO_STAGES, copy_world, read_log, run_cli, student_toml, world  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_torch_thread")
ROLES = ("primary", "senior")
# one epoch of PT, none of ST: every variant is one epoch (16 instances, batch 4: four steps)
ONE_EPOCH = TWO_STAGES.replace("epochs = 2", "epochs = 0")


def release_toml(base: Path, data: Path | None = None, stages: str = TWO_STAGES, **lines: str) -> str:
    """student_toml(base) with extra lines in [teachers.primary] / [teachers.senior] (keyword = role),
    and optionally another data root."""
    toml = student_toml(base, stages=stages)
    for role, extra in lines.items():
        toml = toml.replace(f"[teachers.{role}]\n", f"[teachers.{role}]\n{extra}\n", 1)
    if data is not None:
        toml = toml.replace(f'root = "{base}/data"', f'root = "{data}"', 1)
    return toml


def keys(checkpoint: str = "", fingerprint: str = "") -> str:
    return "\n".join(line for line in (f'checkpoint = "{checkpoint}"' if checkpoint else "",
                                       f'fingerprint = "{fingerprint}"' if fingerprint else "") if line)


def source(base: Path, role: str) -> Path:
    return base / "runs" / f"teacher_{role}" / "best.pth"


@pytest.fixture(scope="module")
def released(world, tmp_path_factory):
    """Both tiny teachers released (as the API does) into a folder of their own: (folder, role -> meta,
    role -> source). The senior's source says "person" over most of the crop, so its val mask IoU is
    not 0 (the tiny teachers' AP is)."""
    out = tmp_path_factory.mktemp("released")
    senior, _ = build_from_checkpoint(source(world, "senior"), "cpu")
    with torch.no_grad():
        senior.seg_head[-1].bias.add_(5.0)
    sources = {"primary": source(world, "primary"), "senior": out / "senior_source.pth"}
    save_checkpoint(sources["senior"], senior, model_name="hrnet_tiny", model_args={"width": 8}, seg_head=True)
    cfg = parse_config(release_toml(world, **{role: keys(out / f"{role}.pth") for role in ROLES}))
    metas = {role: release_teacher(cfg, role, str(sources[role])) for role in ROLES}
    return out, metas, sources


def checked_toml(world, released, data: Path | None = None, **fingerprints: str) -> str:
    """The released files named with their own fingerprints, unless `fingerprints` says otherwise."""
    out, metas, _ = released
    return release_toml(world, data=data, **{
        role: keys(out / f"{role}.pth", fingerprints.get(role, metas[role]["fingerprint"])) for role in ROLES})


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize("role", ROLES)
def test_release_packs_float16_weights_with_the_train_data_and_their_own_val_stats(world, released, role):
    out, metas, sources = released
    packed, src = out / f"{role}.pth", sources[role]
    cfg = parse_config(release_toml(world))
    raw = torch.load(packed, map_location="cpu", weights_only=True)
    before = torch.load(src, map_location="cpu", weights_only=True)["model"]
    assert set(raw) == {"format", "model", "meta", "best_ap"}  # weights and meta only
    assert raw["model"].keys() == before.keys()
    for key, value in raw["model"].items():
        if before[key].is_floating_point():
            assert value.dtype == torch.float16, key
            assert torch.equal(value, before[key].half()), key
        else:  # BatchNorm's num_batches_tracked stays an integer
            assert value.dtype == before[key].dtype and torch.equal(value, before[key]), key
    assert packed.stat().st_size < 0.6 * src.stat().st_size

    meta = raw["meta"]
    assert meta == metas[role]
    src_meta = read_checkpoint(src).meta
    assert {k: meta[k] for k in ("model", "model_args", "seg_head", "num_joints")} == \
        {k: src_meta[k] for k in ("model", "model_args", "seg_head", "num_joints")}
    release = meta["release"]
    assert release["source"] == str(src) and release["source_fingerprint"] == src_meta["fingerprint"]
    train = load_instances(cfg.data, "train")
    assert release["train_data"]["dataset_fingerprint"] == train.fingerprint
    assert release["train_data"]["instances"] == len(train.instances) == 16
    assert release["train_data"]["annotations"] == str(cfg.data.ann_file("train"))
    assert release["eval"] == {"flip_test": cfg.eval.flip_test, "decode": cfg.eval.decode, "boxes": "gt"}

    # the stats are those of the packed file as `odkd evaluate` scores it, not the source's
    report = evaluate_checkpoint(cfg, str(packed))
    assert release["val_stats"] == pytest.approx(report.record())
    assert raw["best_ap"] == pytest.approx(report.stats["AP"]) == pytest.approx(release["val_stats"]["AP"])
    assert ("mask_iou" in release["val_stats"]) == (role == "senior")
    if role == "senior":
        assert release["val_stats"]["mask_iou"] > 0.1  # a real evaluation of this data, not a default

    # the fingerprint is that of the weights as loaded: float32 values of the float16 weights
    net, _ = build_from_checkpoint(packed, "cpu")
    assert all(v.dtype != torch.float16 for v in net.state_dict().values())
    assert meta["fingerprint"] == model_fingerprint(net.state_dict())
    rounded = {k: v.half().float() if v.is_floating_point() else v for k, v in before.items()}
    assert meta["fingerprint"] == model_fingerprint(rounded) != src_meta["fingerprint"]

    # the packed teacher sees what the source saw, up to float16 rounding
    src_net, _ = build_from_checkpoint(src, "cpu")
    x = torch.randn(2, 3, 128, 96, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        a, b = src_net(x), net(x)
    scale = a.heatmaps.abs().max()
    diff = (a.heatmaps - b.heatmaps).abs().max()
    assert 0 < diff <= 0.02 * scale, (diff, scale)
    if role == "senior":
        assert (a.mask_logits - b.mask_logits).abs().max() <= 0.02 * a.mask_logits.abs().max()


def test_the_released_fingerprint_is_the_one_a_store_records(world, released, tmp_path):
    out, metas, _ = released
    cfg = parse_config(checked_toml(world, released))
    url = build_cache(cfg, "train", str(tmp_path / "store.zarr"), scheduler="synchronous", progress=False,
                      limit=4)
    teachers = TeacherTargets.open(url).attrs["teachers"]
    assert teachers["pt"]["fingerprint"] == metas["primary"]["fingerprint"]
    assert teachers["st"]["fingerprint"] == metas["senior"]["fingerprint"]
    assert teachers["st"]["checkpoint"] == str(out / "senior.pth")
    assert teachers["st"]["val_ap"] == pytest.approx(metas["senior"]["release"]["val_stats"]["AP"])


def printed(output: str) -> list[str]:
    """The lines a command printed, without the progress bars that share its terminal."""
    return [line.split("\r")[-1].strip() for line in output.split("\n") if line.split("\r")[-1].strip()]


def test_release_teacher_cli_prints_the_fingerprint_to_configure(world, tmp_path):
    dst = tmp_path / "shared" / "senior.pth"  # the folder does not exist yet
    config = write(tmp_path / "p.toml", release_toml(world, senior=keys(dst)))
    code, out = run_cli("release-teacher", "--config", str(config), "--role", "senior")  # --from: RUNS/teacher_senior/best.pth
    assert code == 0, out
    meta = read_checkpoint(dst).meta
    assert meta["release"]["source"] == str(source(world, "senior"))
    assert printed(out) == [
        f"{dst}: {dst.stat().st_size / 1e6:.2f} MB, val AP {meta['release']['val_stats']['AP']:.3f}, "
        f"trained on {meta['release']['train_data']['dataset_fingerprint']}",
        f'[teachers.senior] fingerprint = "{meta["fingerprint"]}"',
    ]
    assert [p.name for p in dst.parent.iterdir()] == ["senior.pth"]  # no temporary file left

    # the printed line, pasted into the config, is what check-teachers then holds the file to
    config.write_text(release_toml(world, senior=f"{keys(dst)}\n{printed(out)[1].split('] ', 1)[1]}"))
    code, text = run_cli("check-teachers", "--config", str(config))
    assert code == 0 and f"senior: {dst} (hrnet_tiny), fingerprint {meta['fingerprint']}, " in text, text

    # released again from another train-teacher file: a new fingerprint, which the config now refuses
    other = tmp_path / "other.pth"
    net, _ = build_from_checkpoint(source(world, "senior"), "cpu")
    with torch.no_grad():
        net.final_layer.bias.add_(0.5)
    save_checkpoint(other, net, model_name="hrnet_tiny", model_args={"width": 8}, seg_head=True)
    code, out = run_cli("release-teacher", "--config", str(config), "--role", "senior", "--from", str(other))
    assert code == 0, out
    assert read_checkpoint(dst).meta["release"]["source"] == str(other)
    code, text = run_cli("check-teachers", "--config", str(config))
    assert code == 1 and printed(text)[-1].startswith("Error: teachers.senior.fingerprint: "), text


def test_release_refuses_a_source_that_does_not_fit_the_role(world, tmp_path):
    dst = tmp_path / "senior.pth"
    config = write(tmp_path / "p.toml", release_toml(world, senior=keys(dst)))
    code, out = run_cli("release-teacher", "--config", str(config), "--role", "senior",
                        "--from", str(source(world, "primary")))  # no seg head; [teachers.senior] has one
    assert code == 1 and len(printed(out)) == 1, out
    assert not dst.exists()


def test_check_teachers_passes_for_the_released_files(world, released, tmp_path):
    out, metas, _ = released
    config = write(tmp_path / "p.toml", checked_toml(world, released))
    code, text = run_cli("check-teachers", "--config", str(config))
    assert code == 0, text
    lines = text.strip().splitlines()
    assert len(lines) == 2
    for line, role in zip(lines, ROLES):
        meta = metas[role]
        assert line == (f"{role}: {out / f'{role}.pth'} (hrnet_tiny), fingerprint {meta['fingerprint']}, "
                        f"trained on {meta['release']['train_data']['dataset_fingerprint']}, "
                        f"val AP {meta['release']['val_stats']['AP']:.3f}")


def test_check_teacher_takes_any_file_without_a_fingerprint_and_a_train_teacher_file(world):
    cfg = parse_config(release_toml(world))  # no checkpoint key: RUNS/teacher_ROLE/best.pth, no fingerprint
    check = check_teacher(cfg, "primary")
    assert check.path == str(source(world, "primary")) and check.model == "hrnet_tiny"
    assert check.fingerprint == read_checkpoint(source(world, "primary")).meta["fingerprint"]
    assert check.data_fingerprint is None and check.val_ap is None
    assert check.line().endswith("trained on not recorded, val AP unknown")
    # a train-teacher file held to its fingerprint passes too
    pinned = parse_config(release_toml(world, primary=keys(fingerprint=check.fingerprint)))
    assert check_teacher(pinned, "primary") == check


@pytest.mark.parametrize("role", ROLES)
def test_check_teachers_refuses_a_file_with_other_weights(world, released, tmp_path, role):
    out, metas, _ = released
    config = write(tmp_path / "p.toml", checked_toml(world, released, **{role: "0123456789abcdef"}))
    code, text = run_cli("check-teachers", "--config", str(config))
    lines = text.strip().splitlines()
    assert code == 1
    # the primary is checked first: a bad senior comes after the primary's line
    assert len(lines) == (1 if role == "primary" else 2), text
    assert lines[-1] == (f"Error: teachers.{role}.fingerprint: {out / f'{role}.pth'} has weights "
                         f"{metas[role]['fingerprint']}, the config expects 0123456789abcdef")


def edit_one_keypoint(data: Path) -> None:
    ann = data / "annotations" / "person_keypoints_train.json"
    coco = json.loads(ann.read_text())
    coco["annotations"][0]["keypoints"][0] += 1.0
    ann.write_text(json.dumps(coco))


def regenerate_with_another_seed(data: Path) -> None:
    shutil.rmtree(data)
    make_synthetic_dataset(data, train_images=6, val_images=2, seed=1)


@pytest.mark.parametrize("change", [edit_one_keypoint, regenerate_with_another_seed])
def test_check_teachers_refuses_teachers_trained_on_other_data(world, released, tmp_path, change):
    out, metas, _ = released
    data = tmp_path / "data"
    shutil.copytree(world / "data", data)
    change(data)
    config = write(tmp_path / "p.toml", checked_toml(world, released, data=data))
    here = load_instances(parse_config(config.read_text()).data, "train").fingerprint
    trained_on = metas["primary"]["release"]["train_data"]["dataset_fingerprint"]
    assert here != trained_on
    code, text = run_cli("check-teachers", "--config", str(config))
    assert code == 1 and len(text.strip().splitlines()) == 1, text
    assert text.strip() == (f"Error: {data / 'annotations' / 'person_keypoints_train.json'}: dataset fingerprint "
                            f"{here}, but teachers.primary ({out / 'primary.pth'}) was trained on {trained_on}; "
                            f"regenerate the data it names")


@pytest.mark.parametrize("role", ROLES)
def test_cache_teachers_refuses_a_teacher_with_other_weights_and_writes_no_store(world, tmp_path, role):
    base = tmp_path
    shutil.copytree(world / "data", base / "data")
    shutil.copytree(world / "runs", base / "runs")  # the train-teacher files, no store
    real = read_checkpoint(source(base, role)).meta["fingerprint"]
    config = write(base / "p.toml", release_toml(base, **{role: keys(fingerprint="feedfacefeedface")}))
    code, text = run_cli("cache-teachers", "--config", str(config))
    assert code == 1 and len(text.strip().splitlines()) == 1, text
    assert text.strip() == (f"Error: teachers.{role}.fingerprint: {source(base, role)} has weights {real}, "
                            f"the config expects feedfacefeedface")
    assert not (base / "store.zarr").exists()


def test_release_refuses_its_own_source_a_missing_checkpoint_key_and_an_unknown_role(world, tmp_path):
    src = source(world, "primary")
    before = src.read_bytes()
    # the same file under another spelling of its path
    same = world / "runs" / ".." / "runs" / "teacher_primary" / "best.pth"
    config = write(tmp_path / "own.toml", release_toml(world, primary=keys(same)))
    code, out = run_cli("release-teacher", "--config", str(config), "--role", "primary")
    assert code == 1 and out.strip() == f"Error: {same}: the release would overwrite its own source", out
    assert src.read_bytes() == before and not list(src.parent.glob("*.tmp"))

    config = write(tmp_path / "none.toml", release_toml(world))
    code, out = run_cli("release-teacher", "--config", str(config), "--role", "primary")
    assert code == 1 and out.strip() == "Error: teachers.primary.checkpoint: say where the released file goes", out

    with pytest.raises(OdkdError, match=r"--role must be one of primary, senior, init, got 'tertiary'"):
        release_teacher(parse_config(config.read_text()), "tertiary", str(src))


def test_release_refuses_missing_and_foreign_sources(world, tmp_path):
    dst = tmp_path / "out" / "primary.pth"
    cfg = parse_config(release_toml(world, primary=keys(dst)))
    with pytest.raises(OdkdError, match="checkpoint file not found"):
        release_teacher(cfg, "primary", str(tmp_path / "nope.pth"))
    official = tmp_path / "official.pth"
    torch.save({"state_dict": read_checkpoint(source(world, "primary")).state_dict}, official)
    with pytest.raises(OdkdError, match=r"official.pth: a checkpoint in the official format; release packs odkd's own"):
        release_teacher(cfg, "primary", str(official))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("variant, out, losses", [
    ("gt", None, {"gt_loss"}),
    ("pt", "elsewhere", {"gt_loss", "kd_pt_loss"}),
])
def test_train_student_variant_trains_only_the_variants_stage(world, tmp_path, variant, out, losses):
    base = copy_world(world, tmp_path)
    config = write(base / "p.toml", release_toml(base, stages=ONE_EPOCH))
    args = ["train-student", "--config", str(config), "--variant", variant]
    if out:
        args += ["--out", str(base / out)]
    code, text = run_cli(*args)
    assert code == 0, text
    run = base / out if out else base / "runs" / f"student_{variant}"
    assert sorted(p.name for p in base.glob("runs/*")) == ([] if out else [f"student_{variant}"])
    log = read_log(run)
    assert [r["stage"] for r in log] == [variant]
    assert {k for k in log[0] if k.endswith("_loss")} == losses
    assert ("n_no_target" in log[0]) == (variant != "gt")
    last = read_checkpoint(run / "last.pth")
    assert [s["name"] for s in last.extra["signature"]["stages"]] == [variant]
    summary = json.loads(text[text.index("{\n"):text.rindex("}") + 1])
    assert summary["best"] == str(run / "best.pth")


def test_train_student_variant_refusals_are_one_line(world, tmp_path):
    base = copy_world(world, tmp_path)
    config = write(base / "p.toml", release_toml(base, stages=ONE_EPOCH))
    code, out = run_cli("train-student", "--config", str(config), "--variant", "bogus")
    assert code == 1 and out.strip() == f"Error: unknown variant 'bogus'; the variants are {', '.join(VARIANTS)}", out
    gt_only = '\n[[student.stages]]\nname = "gt"\nepochs = 1\nteacher = "none"\n'
    config = write(base / "gt.toml", release_toml(base, stages=gt_only))
    code, out = run_cli("train-student", "--config", str(config), "--variant", "st")
    assert code == 1 and len(out.strip().splitlines()) == 1, out
    assert "needs exactly one stage with teacher = 'senior', found 0" in out
    assert not (base / "runs").exists()


def test_check_teachers_checks_a_torchscript_teacher_by_its_sha256(world, tmp_path):
    from test_external_teachers import Exported

    net, _ = build_from_checkpoint(source(world, "primary"), "cpu")
    path = tmp_path / "pt.pt"
    torch.jit.trace(Exported(net).eval(), torch.zeros(2, 3, 128, 96)).save(str(path))
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    toml = release_toml(world).replace('[teachers.primary]\nmodel = "hrnet_tiny"\nmodel_args = { width = 8 }\n',
                                       f'[teachers.primary]\nmodel = "torchscript"\n{keys(path, sha)}\n', 1)
    assert 'model = "torchscript"' in toml
    code, out = run_cli("check-teachers", "--config", str(write(tmp_path / "p.toml", toml)))
    assert code == 0, out
    assert printed(out)[0].startswith(f"primary: {path} (torchscript), fingerprint {sha}, trained on not recorded")


def with_data_root(toml: str, root: Path) -> str:
    for role in ROLES:
        toml = toml.replace(f"[teachers.{role}]\n", f'[teachers.{role}]\ndata_root = "{root}"\n', 1)
    return toml


def test_teachers_released_on_their_own_data_are_checked_against_their_data_root(world, released, tmp_path):
    """The demo's arrangement: [data] is the student's dataset (other images, and images nobody
    labelled); the teachers were trained on another, which data_root names."""
    out, metas, _ = released
    student_data = tmp_path / "student"
    make_synthetic_dataset(student_data, train_images=6, val_images=2, seed=1, unlabeled_images=3)
    plain = checked_toml(world, released, data=student_data)
    code, text = run_cli("check-teachers", "--config", str(write(tmp_path / "plain.toml", plain)))
    assert code == 1 and text.startswith(f"Error: {student_data / 'annotations' / 'person_keypoints_train.json'}: "
                                         "dataset fingerprint "), text

    config = write(tmp_path / "p.toml", with_data_root(plain, world / "data"))
    code, text = run_cli("check-teachers", "--config", str(config))
    assert code == 0, text
    trained_on = metas["primary"]["release"]["train_data"]["dataset_fingerprint"]
    assert [line.split(", trained on ")[1].split(",")[0] for line in text.strip().splitlines()] == [trained_on] * 2

    # a release under this config records and scores the data_root, not [data]
    cfg = parse_config(config.read_text().replace(str(out / "primary.pth"), str(tmp_path / "again.pth")))
    meta = release_teacher(cfg, "primary", str(source(world, "primary")))
    assert meta["release"]["train_data"]["dataset_fingerprint"] == trained_on
    assert meta["release"]["train_data"]["annotations"] == str(world / "data" / "annotations" /
                                                               "person_keypoints_train.json")
    assert meta["release"]["val_stats"] == pytest.approx(metas["primary"]["release"]["val_stats"])


def test_the_students_init_is_trained_released_checked_and_reported_like_a_teacher(world, released, tmp_path):
    """[teachers.init]: train-teacher and release-teacher --role init, check-teachers holds it to its
    fingerprint, and report shows it as a row when the students start from it."""
    from odkd.apps.report import report_rows
    from odkd.distill.variants import variant_student

    dst = tmp_path / "init.pth"
    init = (f'[teachers.init]\nmodel = "mobilenetv2_tiny"\ncheckpoint = "{dst}"\n'
            f"[teachers.init.train]\nepochs = 1\nbatch_size = 4\nworkers = 0\namp = false\n")
    toml = checked_toml(world, released) + init
    config = write(tmp_path / "p.toml", toml)
    code, out = run_cli("train-teacher", "--config", str(config), "--role", "init", "--out", str(tmp_path / "run"))
    assert code == 0, out
    code, out = run_cli("release-teacher", "--config", str(config), "--role", "init", "--from",
                        str(tmp_path / "run" / "best.pth"))
    assert code == 0, out
    pinned = printed(out)[1]
    assert pinned.startswith('[teachers.init] fingerprint = "')
    config.write_text(toml.replace(f'checkpoint = "{dst}"\n', f'checkpoint = "{dst}"\n{pinned.split("] ", 1)[1]}\n'))
    code, text = run_cli("check-teachers", "--config", str(config))
    assert code == 0 and [line.split(":")[0] for line in printed(text)] == ["primary", "senior", "init"], text
    assert f"init: {dst} (mobilenetv2_tiny), fingerprint {read_checkpoint(dst).meta['fingerprint']}" in text

    # other weights in its place are refused, naming the key
    net, _ = build_from_checkpoint(dst, "cpu")
    with torch.no_grad():
        next(net.parameters()).add_(0.5)
    save_checkpoint(dst, net, model_name="mobilenetv2_tiny", model_args={}, seg_head=False)
    code, text = run_cli("check-teachers", "--config", str(config))
    assert code == 1 and printed(text)[-1].startswith("Error: teachers.init.fingerprint: "), text

    # the report rows it only where the students start from it, and every variant starts from it
    cfg = parse_config(toml)
    assert "init" not in [row.name for row in report_rows(cfg, {})[0]]
    cfg = parse_config(toml.replace("[student]\n", f'[student]\ninit = "{dst}"\n', 1))
    assert [row.name for row in report_rows(cfg, {})[0]][:3] == ["PT", "ST", "init"]
    assert {variant_student(cfg.student, name).init for name in VARIANTS if name not in UNLABELED_VARIANTS} == {str(dst)}
