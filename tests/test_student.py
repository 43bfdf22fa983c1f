"""odkd train-student: stages, warped targets, resume, refusals, remote stores, DDP, and no teacher ever."""

from __future__ import annotations

import http.server
import json
import os
import re
import shutil
import subprocess
import sys
import threading
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from odkd.cli import main
from odkd.config import parse_config
from odkd.data.dataset import EpochSampler, TopDownDataset
from odkd.data.instances import load_instances
from odkd.data.keypoints import FLIP_INDEX
from odkd.data.transforms import CropFrame, affine_transform, grid_sample_theta, warp_maps
from odkd.distill.warp import warp_batch, warp_binary_batch
from odkd.errors import OdkdError
from odkd.eval.evaluate import evaluate_checkpoint
from odkd.models import read_checkpoint, save_checkpoint
from odkd.store import cache_info
from odkd.store.bitpack import bitpack_maps
from odkd.store.local import LocalRows
from odkd.store.reader import TeacherTargets
from odkd.teachers import build_cache
from conftest import TINY_TEACHERS_TOML, make_tiny_world, tiny_teacher
import odkd.train.student as student_module
from odkd.train.student import train_student

pytestmark = pytest.mark.usefixtures("one_torch_thread")
TWO_STAGES = """
[[student.stages]]
name = "primary"
epochs = 1
teacher = "primary"
[[student.stages]]
name = "senior"
epochs = 2
teacher = "senior"
seg_weight = 0.01
"""


def student_toml(base: Path, stages: str = TWO_STAGES, student: str = "", store: str | None = None,
                 cache: str = "") -> str:
    return f"""
runs = "{base}/runs"
device = "cpu"
[data]
root = "{base}/data"
input_size = [96, 128]
heatmap_size = [24, 32]
sigma = 2.0
{TINY_TEACHERS_TOML}
[cache]
store = "{base}/store.zarr"
threshold = 0.5
threshold_mode = "relative"
margin = 1.25
chunk_instances = 4
shard_instances = 8
{cache}
[student]
model = "mobilenetv2_tiny"
cache = "{store or base / 'store.zarr'}"
{student}
[student.train]
batch_size = 4
workers = 0
amp = false
{stages}
"""


def write_config(base: Path, name: str = "p.toml", **kw) -> Path:
    path = base / name
    path.write_text(student_toml(base, **kw))
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """6 synthetic images (16 train instances), two tiny teachers, and their store built once."""
    base = make_tiny_world(tmp_path_factory.mktemp("student"), val_images=2)
    build_cache(parse_config(student_toml(base)), "train", scheduler="synchronous", progress=False)
    return base


def copy_world(world: Path, dst: Path) -> Path:
    """The data and the store (not the teachers) in a folder of the test's own."""
    shutil.copytree(world / "data", dst / "data")
    shutil.copytree(world / "store.zarr", dst / "store.zarr")
    return dst


def read_log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def test_stages_switch_with_exactly_their_losses(world, tmp_path):
    cfg = parse_config(student_toml(world))
    train_student(cfg, out=str(tmp_path / "run"), max_steps_per_epoch=2)
    log = read_log(tmp_path / "run")
    assert [r["stage"] for r in log] == ["primary", "senior", "senior"]
    losses = [{k for k in r if k.endswith("_loss")} for r in log]
    assert losses == [{"gt_loss", "kd_pt_loss"}, {"gt_loss", "kd_st_loss", "seg_loss"},
                      {"gt_loss", "kd_st_loss", "seg_loss"}]
    assert all(r["n_no_target"] == 0 and "AP" in r for r in log)
    run = tmp_path / "run"
    assert {p.name for p in run.iterdir()} >= {"last.pth", "best.pth", "stage_primary.pth", "stage_senior.pth",
                                               "log.jsonl", "curves.png"}
    assert read_checkpoint(run / "stage_primary.pth").extra["epoch"] == 1
    best = read_checkpoint(run / "best.pth")
    assert "optimizer" not in best.extra and "rng" not in best.extra and "AP" in best.extra["val"]
    last = read_checkpoint(run / "last.pth")
    assert {"optimizer", "scheduler", "rng", "signature"} <= set(last.extra)
    assert last.extra["signature"]["stages"][1]["seg_weight"] == 0.01
    assert best.meta["input_size"] == [96, 128]
    # a student checkpoint evaluates like a teacher's, mask IoU included
    report = evaluate_checkpoint(cfg, str(run / "best.pth"))
    assert report.stats["AP"] == pytest.approx(best.extra["val"]["AP"]) and report.mask_iou is not None


def test_soft_targets_from_a_store_with_raw_maps(world, tmp_path):
    stages = TWO_STAGES.replace('teacher = "senior"', 'teacher = "senior"\ntargets = "soft"')
    cfg = parse_config(student_toml(world, stages=stages, store=str(tmp_path / "soft.zarr"), cache="store_soft = true"))
    build_cache(cfg, "train", out=str(tmp_path / "soft.zarr"), scheduler="synchronous", progress=False)
    info = cache_info(str(tmp_path / "soft.zarr"))
    assert "st/soft_heatmaps" in info and "soft maps" in info
    soft = TeacherTargets.open(str(tmp_path / "soft.zarr")).get_batch(np.arange(3), ["st/soft_heatmaps", "st/conf"])
    assert soft["st/soft_heatmaps"].dtype == np.float16
    assert np.allclose(soft["st/soft_heatmaps"].max(axis=(-2, -1)), soft["st/conf"], atol=1e-3)
    train_student(cfg, out=str(tmp_path / "run"), max_steps_per_epoch=1)
    log = read_log(tmp_path / "run")
    assert [r["stage"] for r in log] == ["primary", "senior", "senior"] and all(r["kd_st_loss"] > 0 for r in log[1:])


def test_gt_only_and_joint_stages(world, tmp_path):
    stages = """
[[student.stages]]
name = "gt"
epochs = 1
teacher = "none"
[[student.stages]]
name = "joint"
epochs = 1
teacher = "both"
mask_gate = true
conf_floor = 0.2
"""
    cfg = parse_config(student_toml(world, stages=stages, student="seg_head = false"))
    train_student(cfg, out=str(tmp_path / "run"), max_steps_per_epoch=1)
    log = read_log(tmp_path / "run")
    assert [{k for k in r if k.endswith("_loss")} for r in log] == [{"gt_loss"}, {"gt_loss", "kd_pt_loss", "kd_st_loss"}]
    assert "n_no_target" not in log[0]


def test_a_failed_instance_learns_from_gt_alone_and_is_counted(world, tmp_path):
    base = copy_world(world, tmp_path)
    import zarr

    from odkd.store.store import array_digest, read_markers, store_fs, write_marker

    url = str(base / "store.zarr")
    ok = zarr.open_array(f"{url}/meta/ok", mode="r+")
    ok[:3] = 0
    # as a writer that failed those instances would record it, so the store's checks still hold
    layout = TeacherTargets.open(url).layout
    fs, root = store_fs(url)
    marker = read_markers(fs, root, layout.num_shards)[0]
    marker["digests"]["meta/ok"] = array_digest(ok[layout.shard_rows(0)])
    write_marker(fs, root, 0, marker)
    cfg = parse_config(student_toml(base, stages=TWO_STAGES.replace("epochs = 2", "epochs = 0")))
    train_student(cfg, out=str(tmp_path / "run"), max_steps_per_epoch=100)
    assert read_log(tmp_path / "run")[0]["n_no_target"] == 3  # every instance once per epoch


def test_warped_cached_target_equals_the_target_cached_under_that_transform(world):
    """A store holding binarized Gaussians at each instance's stored crop, warped into augmented crops on
    the device, matches the same Gaussians binarized directly in those crops (what a teacher whose output
    follows the person would have given if cached under that transform)."""
    cfg = parse_config(student_toml(world))
    instances = load_instances(cfg.data, "train")
    targets = TeacherTargets.open(str(world / "store.zarr"))
    rows = LocalRows.fetch(targets, ["meta/center", "meta/scale"])
    hm, map_size = cfg.data.heatmap_size, rows.map_size
    data = TopDownDataset(instances, cfg.data, train=True, seed=3, stored_rows=rows)

    def stored_frame(i: int) -> CropFrame:
        row = rows.row(i)
        return CropFrame(center=tuple(map(float, row["meta/center"])), scale=tuple(map(float, row["meta/scale"])))

    def binary_gaussians(inst, frame, size):
        """Unit Gaussians (sigma 2 map pixels) at the labelled joints, binarized at 0.5, in `frame` at `size`."""
        xy = affine_transform(inst.joints[:, :2], frame.matrix(size))
        visible = inst.joints[:, 2] > 0
        if frame.flip:
            xy, visible = xy[FLIP_INDEX], visible[FLIP_INDEX]
        ys, xs = np.mgrid[0:size[1], 0:size[0]]
        d2 = (xs[None] - xy[:, 0, None, None]) ** 2 + (ys[None] - xy[:, 1, None, None]) ** 2
        return (np.exp(-d2 / 8.0) >= 0.5) & visible[:, None, None]

    radius = 2.0 * np.sqrt(2 * np.log(2.0))
    ious, plain_ious, dists, checked, lost = [], [], [], 0, 0
    for epoch in range(6):
        for i in range(len(data)):
            sample = data[(epoch, i)]
            frame = data.frame(i, epoch)
            if not (abs(frame.rotation) <= 45 and 0.65 <= frame.scale[0] / instances[i].scale[0] <= 1.35):
                continue
            inst = instances[i]
            stored = binary_gaussians(inst, stored_frame(i), map_size)
            expected = binary_gaussians(inst, frame, hm)
            packed, flip = torch.from_numpy(bitpack_maps(stored))[None], torch.tensor([frame.flip])
            plain = warp_binary_batch(packed, map_size[0], sample["teacher_theta"][None], hm, flip, True)[0].bool()
            warped = warp_binary_batch(packed, map_size[0], sample["teacher_theta"][None], hm, flip, True,
                                       blob_radius=radius, zoom=torch.tensor([sample["teacher_zoom"]]))[0].bool()
            # the cv2 reference warp (warp_maps) agrees with the device warp
            reference = warp_maps(stored.astype(np.float32), stored_frame(i), map_size, frame, hm) >= 0.5
            assert (reference != plain.numpy()).mean() < 0.002
            for k in range(17):
                e, w = torch.from_numpy(expected[k]), warped[k]
                if e.sum() < 3:  # a joint outside the crop, or unlabelled
                    continue
                ious.append(float((e & w).sum() / (e | w).sum()))
                plain_ious.append(float((e & plain[k]).sum() / (e | plain[k]).sum()))
                if not w.any():  # the joint lay outside the stored crop: what a wider margin buys
                    lost += 1
                    continue
                ye, xe = np.argwhere(e.numpy()).mean(0)
                yw, xw = np.argwhere(w.numpy()).mean(0)
                dists.append(float(np.hypot(ye - yw, xe - xw)))
            checked += 1
    assert checked > 30
    assert lost / len(ious) < 0.02 and np.mean(dists) <= 0.5, (lost, len(ious), np.mean(dists))
    # a warp alone scales the blobs with the zoom; moving their edges back keeps the teacher's size
    assert np.mean(ious) >= 0.8 and np.mean(ious) > np.mean(plain_ious) + 0.05, (np.mean(ious), np.mean(plain_ious))


def test_device_warp_equals_cv2_warp_for_soft_maps():
    rng = np.random.default_rng(0)
    maps = rng.random((17, 40, 32)).astype(np.float32)
    src = CropFrame(center=(100.0, 120.0), scale=(1.0, 1.3333))
    dst = CropFrame(center=(104.0, 118.0), scale=(0.9, 1.2), rotation=30.0, flip=True, image_width=320)
    theta = torch.from_numpy(grid_sample_theta(src, (32, 40), dst, (24, 32)))[None]
    out = warp_batch(torch.from_numpy(maps)[None], theta, (24, 32), torch.tensor([True]), True)[0].numpy()
    ref = warp_maps(maps, src, (32, 40), dst, (24, 32))
    inner = np.s_[:, 2:-2, 2:-2]  # cv2 and grid_sample differ in how they treat the border pixels
    # cv2 rounds bilinear weights to 1/32 (INTER_BITS = 5): values in [0, 1] may differ by that much
    diff = np.abs(out[inner] - ref[inner])
    assert diff.max() <= 1 / 32 and diff.mean() < 0.005


def test_epoch_sampler_keeps_the_dataloader_order_and_splits_ranks():
    sampler = EpochSampler(10, shuffle=True, seed=3)
    sampler.set_epoch(2)
    generator = torch.Generator()
    generator.manual_seed(3 * 100_003 + 2)
    loader = torch.utils.data.DataLoader(list(range(10)), batch_size=10, shuffle=True, generator=generator)
    assert [i for _, i in sampler] == next(iter(loader)).tolist()
    assert {e for e, _ in sampler} == {2}
    ranks = [EpochSampler(10, shuffle=True, seed=3, rank=r, world_size=3) for r in range(3)]
    for r in ranks:
        r.set_epoch(2)
    seen = [i for r in ranks for _, i in r]
    assert len(seen) == 12 and set(seen) == set(range(10)) and all(len(list(r)) == 4 for r in ranks)


def test_resume_mid_stage_reproduces_an_uninterrupted_run(world, tmp_path, monkeypatch):
    cfg = parse_config(student_toml(world))
    train_student(cfg, out=str(tmp_path / "straight"), max_steps_per_epoch=2)
    broken = tmp_path / "broken"
    plot = student_module.plot_training_curves

    def plot_then_interrupt_after_epoch_2(log, png):
        # Ctrl-C right after epoch 2 is saved, where the trainer's last per-epoch work runs; a watcher
        # thread polling the log loses that race on a loaded machine
        plot(log, png)
        if log.read_text().count("\n") == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(student_module, "plot_training_curves", plot_then_interrupt_after_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        train_student(cfg, out=str(broken), max_steps_per_epoch=2)
    monkeypatch.setattr(student_module, "plot_training_curves", plot)
    assert read_checkpoint(broken / "last.pth").extra["epoch"] == 2  # inside the 2-epoch senior stage
    with pytest.raises(OdkdError, match="a run already exists here"):
        train_student(cfg, out=str(broken), max_steps_per_epoch=2)
    train_student(cfg, out=str(broken), resume=True, max_steps_per_epoch=2)
    a, b = read_checkpoint(tmp_path / "straight" / "last.pth"), read_checkpoint(broken / "last.pth")
    assert a.extra["epoch"] == b.extra["epoch"] == 3
    for key in a.state_dict:
        assert torch.equal(a.state_dict[key], b.state_dict[key]), key
    assert [r["stage"] for r in read_log(broken)] == ["primary", "senior", "senior"]

    changed = parse_config(student_toml(world, stages=TWO_STAGES.replace("seg_weight = 0.01", "seg_weight = 0.02")))
    with pytest.raises(OdkdError, match=r"schedule changed .*stages.*seg_weight"):
        train_student(changed, out=str(broken), resume=True)


def run_cli(*args) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.output


def test_store_for_another_dataset_is_refused_in_one_line(world, tmp_path):
    base = copy_world(world, tmp_path)
    ann = base / "data" / "annotations" / "person_keypoints_train.json"
    data = json.loads(ann.read_text())
    data["annotations"][0]["keypoints"][0] += 1.0
    ann.write_text(json.dumps(data))
    code, out = run_cli("train-student", "--config", str(write_config(base)))
    assert code == 1 and len(out.strip().splitlines()) == 1
    assert "store.zarr: built for dataset fingerprint" in out and "rebuild the cache" in out
    assert not (base / "runs").exists()


@pytest.mark.parametrize("stages, student, message", [
    (TWO_STAGES.replace('teacher = "senior"', 'teacher = "tertiary"'), "",
     "student.stages[1].teacher: 'tertiary' is not one of primary, senior, both, none"),
    (TWO_STAGES.replace("epochs = 1", "epochs = 0").replace("epochs = 2", "epochs = 0"), "",
     "the stages' epochs sum to 0"),
    (TWO_STAGES, "seg_head = false", "student.stages[1].seg_weight is 0.01 but student.seg_head is false"),
    (TWO_STAGES.replace('teacher = "senior"', 'teacher = "senior"\ntargets = "soft"'), "",
     "stage 'senior' needs st/soft_heatmaps (soft ST heatmaps), the store has none; rebuild it with "
     "[cache] store_soft = true"),
])
def test_bad_student_config_is_one_line(world, tmp_path, stages, student, message):
    base = copy_world(world, tmp_path)
    code, out = run_cli("train-student", "--config", str(write_config(base, stages=stages, student=student)))
    assert code == 1 and len(out.strip().splitlines()) == 1 and message in out, out
    assert not (base / "runs").exists()


def test_missing_student_section_and_unreachable_store_are_one_line(world, tmp_path):
    base = copy_world(world, tmp_path)
    toml = student_toml(base)
    (base / "no_student.toml").write_text(toml[: toml.index("[student]")])
    code, out = run_cli("train-student", "--config", str(base / "no_student.toml"))
    assert code == 1 and "no [student] section" in out and len(out.strip().splitlines()) == 1
    code, out = run_cli("train-student", "--config", str(write_config(base)), "--cache", "http://127.0.0.1:9/store.zarr")
    assert code == 1 and len(out.strip().splitlines()) == 1 and "http://127.0.0.1:9/store.zarr: " in out, out
    assert not (base / "runs").exists()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_trains_from_a_store_served_over_http(world, tmp_path):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(_QuietHandler, directory=str(world)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/store.zarr"
        cfg = parse_config(student_toml(world, store=url))
        train_student(cfg, out=str(tmp_path / "run"), max_steps_per_epoch=1)
    finally:
        server.shutdown()
    local = parse_config(student_toml(world))
    train_student(local, out=str(tmp_path / "local"), max_steps_per_epoch=1)
    a, b = read_checkpoint(tmp_path / "run" / "last.pth"), read_checkpoint(tmp_path / "local" / "last.pth")
    assert all(torch.equal(a.state_dict[k], b.state_dict[k]) for k in a.state_dict)


NO_TEACHER_PROBE = """
import json, sys, threading
from pathlib import Path
opened, built = [], []
def audit(event, args):
    if event == "open" and isinstance(args[0], str) and (args[0].endswith(".pth") or "/teacher_" in args[0]):
        opened.append(args[0])
def profile(frame, event, arg):
    code = frame.f_code
    if event == "call" and code.co_name == "__init__" and code.co_filename.endswith(("hrnet.py", "mobilenetv2.py")):
        built.append(type(frame.f_locals.get("self")).__name__)
sys.addaudithook(audit)
sys.setprofile(profile)
threading.setprofile(profile)
from odkd.config import load_config
from odkd.train.student import train_student
train_student(load_config(sys.argv[1]), out=sys.argv[2], max_steps_per_epoch=1)
sys.setprofile(None)
teacher_side = [m for m in sys.modules if m == "odkd.teachers" or m.startswith("odkd.teachers.") or m in (
    "odkd.models.teacher", "odkd.models.external", "odkd.train.teacher", "dask", "distributed")]
print(json.dumps({"opened": opened, "built": sorted(set(built)), "teacher_side": teacher_side}))
"""


def test_no_teacher_is_built_or_read_with_the_teacher_files_deleted(world, tmp_path):
    base = copy_world(world, tmp_path)  # no runs/teacher_*: the teacher checkpoints do not exist here
    config = write_config(base)
    out = base / "runs" / "student"
    proc = subprocess.run([sys.executable, "-c", NO_TEACHER_PROBE, str(config), str(out)], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    probe = json.loads(proc.stdout.strip().splitlines()[-1])
    assert probe["teacher_side"] == []
    assert all(Path(p).parent == out for p in probe["opened"]), probe["opened"]  # only the run's own files
    hrnet = {"PoseHighResolutionNet", "HighResolutionModule", "BasicBlock", "Bottleneck"}
    assert "PoseMobileNetV2" in probe["built"] and not hrnet & set(probe["built"])  # the student, no HRNet
    assert not list(base.glob("runs/teacher_*"))


def test_two_process_ddp_keeps_the_ranks_in_sync(world, tmp_path):
    base = copy_world(world, tmp_path)
    config = write_config(base)
    torchrun = Path(sys.executable).with_name("torchrun")
    proc = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "odkd", "train-student",
                           "--config", str(config), "--out", str(base / "ddp")], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = read_log(base / "ddp")
    assert [r["ranks_in_sync"] for r in log] == [True, True, True]
    # 16 instances, 2 ranks of 8, batch 4: two steps a rank, and every instance seen once an epoch
    assert read_checkpoint(base / "ddp" / "last.pth").extra["epoch"] == 3


def torchrun(*args, nproc: int = 2) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node NPROC ARGS...`: real processes, gloo, one torch thread each."""
    command = [str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc_per_node", str(nproc),
               *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.parametrize("how", ["store", "config"])
def test_under_torchrun_an_error_is_one_line_from_rank_0_and_every_rank_exits_with_its_code(world, tmp_path, how):
    """A check that fails on every rank (a store that is not there; a --set key that does not exist, which
    the CLI meets before train_student does) is printed once, by rank 0, every rank exits 1 (none killed
    by torchrun's SIGTERM), and torchrun's own failure summary names the line as the root cause."""
    config = tmp_path / "p.toml"
    config.write_text(student_toml(world))
    missing = tmp_path / "nowhere.zarr"
    args, expected = {
        "store": (["--cache", missing], f"Error: {missing}: no teacher-target store there"),
        "config": (["--set", "data.sigmaa=2"], "Error: --set data.sigmaa=2: unknown key 'data.sigmaa'"),
    }[how]
    proc = torchrun("-m", "odkd", "train-student", "--config", config, "--out", tmp_path / "run", *args)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 1, output[-3000:]
    errors = [line for line in output.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1 and errors[0].startswith(expected), output[-3000:]
    assert sorted(re.findall(r"^\s+exitcode\s+: (-?\d+)", output, flags=re.M)) == ["1", "1"], output[-3000:]
    assert re.search(rf"^\s+traceback\s+: {re.escape(errors[0])}$", output, flags=re.M), output[-3000:]
    assert not (tmp_path / "run").exists()


AGREE_PROBE = """
import json
import sys
import torch
from odkd.errors import OdkdError
from odkd.train.distributed import agree_on_checks, launched_ranks, start_ranks, stop_ranks, sum_over_ranks
ranks = launched_ranks()
# a first run whose checks pass on every rank: the group starts on the agreed store and counts add up
ranks, _ = start_ranks(torch.device("cpu"), agree_on_checks(ranks, None))
summed = sum_over_ranks({"n_labeled": 6.0 + ranks.rank, "n_unlabeled": 2.0}, ranks)
stop_ranks(ranks)
# a second run in the same processes whose checks fail on rank 1 alone
try:
    agree_on_checks(ranks, OdkdError("nowhere.zarr: no teacher-target store there") if ranks.rank == 1 else None)
    raised = None
except OdkdError as exc:
    raised = {"type": type(exc).__name__, "message": str(exc), "shown_here": exc.shown_here}
# a file per rank: two ranks printing at once can interleave their lines on the shared stdout
with open(f"{sys.argv[1]}/rank{ranks.rank}.json", "w") as out:
    json.dump({"rank": ranks.rank, "summed": summed, "raised": raised}, out)
"""


def test_a_check_failed_on_one_rank_stops_every_rank_with_its_line_shown_by_rank_0(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text(AGREE_PROBE)
    proc = torchrun(probe, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert [r["summed"] for r in results] == [{"n_labeled": 13.0, "n_unlabeled": 4.0}] * 2
    message = "rank 1: nowhere.zarr: no teacher-target store there"
    assert [r["raised"] for r in results] == [
        {"type": "FailedOnARank", "message": message, "shown_here": True},
        {"type": "FailedOnARank", "message": message, "shown_here": False},
    ]


def test_an_existing_run_is_refused_before_the_local_copy_is_made(world, tmp_path, monkeypatch):
    """docs/unlabeled.md: every check comes before anything is written; the run folder is one of them."""
    copies = tmp_path / "copies"
    monkeypatch.setenv("ODKD_LOCAL_COPIES", str(copies))
    config = tmp_path / "p.toml"
    config.write_text(student_toml(world))
    run = tmp_path / "run"
    run.mkdir()
    (run / "last.pth").write_bytes(b"an earlier run")
    code, out = run_cli("train-student", "--config", str(config), "--out", str(run))
    assert code == 1 and out.strip() == (f"Error: {run / 'last.pth'}: a run already exists here; "
                                         "pass --resume to continue it or choose another --out"), out
    assert not copies.exists()
    code, out = run_cli("train-student", "--config", str(config), "--out", str(tmp_path / "new"), "--resume")
    assert code == 1 and out.strip() == f"Error: {tmp_path / 'new' / 'last.pth'}: nothing to resume", out
    assert not copies.exists()


def test_every_checkpoint_records_the_store_it_learned_from_as_cache_info_shows_it(world, tmp_path):
    cfg = parse_config(student_toml(world))
    train_student(cfg, out=str(tmp_path / "run"), max_steps_per_epoch=1)
    info = cache_info(str(world / "store.zarr"))
    targets = TeacherTargets.open(str(world / "store.zarr"))
    for name in ("best.pth", "last.pth", "stage_primary.pth", "stage_senior.pth"):
        provenance = read_checkpoint(tmp_path / "run" / name).extra["provenance"]
        store = provenance["store"]
        assert store["url"] == str(world / "store.zarr")
        assert store["dataset_fingerprint"] == targets.attrs["settings"]["dataset_fingerprint"]
        assert store["teachers"] == {k: t["fingerprint"] for k, t in targets.attrs["teachers"].items()}
        assert f"identity     content {store['content_digest']}, settings {store['settings_digest']}" in info
        assert [s["name"] for s in provenance["stages"]] == ["primary", "senior"]


def test_resume_after_the_store_was_rebuilt_with_another_teacher_is_refused_in_one_line(world, tmp_path):
    base = copy_world(world, tmp_path)
    shutil.copytree(world / "runs", base / "runs")
    config = write_config(base)
    cfg = parse_config(config.read_text())
    train_student(cfg, out=str(base / "student"), max_steps_per_epoch=1)
    torch.manual_seed(1)  # another senior teacher, the same architecture
    save_checkpoint(base / "runs" / "teacher_senior" / "best.pth", tiny_teacher(True, width=8),
                    model_name="hrnet_tiny", model_args={"width": 8}, seg_head=True)
    build_cache(cfg, "train", scheduler="synchronous", progress=False, overwrite=True)
    code, out = run_cli("train-student", "--config", str(config), "--out", str(base / "student"), "--resume")
    assert code == 1 and len(out.strip().splitlines()) == 1, out
    assert "the teacher store changed since this run started (store.content_digest" in out \
        or "the teacher store changed since this run started (store.teachers.st" in out, out


@pytest.mark.parametrize("how", ["flip", "truncate"])
def test_a_damaged_shard_stops_train_student_in_one_line_before_writing(world, tmp_path, monkeypatch, how):
    base = copy_world(world, tmp_path)
    monkeypatch.setenv("ODKD_LOCAL_COPIES", str(tmp_path / "copies"))  # not the session's copy of the sound store
    targets = TeacherTargets.open(str(base / "store.zarr"))
    import zarr
    from odkd.store.store import shard_paths, store_fs

    _, root = store_fs(str(base / "store.zarr"))
    shard = Path(shard_paths(root, zarr.open_group(str(base / "store.zarr"), mode="r"), targets.layout, 1)["st/heatmaps"])
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2] if how == "truncate"
                      else data[:40] + bytes([data[40] ^ 0xFF]) + data[41:])
    code, out = run_cli("train-student", "--config", str(write_config(base)))
    # the local copy's progress bar runs until the damaged shard; the error itself is its one line
    error = out.strip().splitlines()[-1]
    assert code == 1 and error.startswith("Error: ") and "Traceback" not in out, out
    assert f"st/heatmaps shard 1 ({shard})" in error and f"odkd cache verify {base / 'store.zarr'}" in error
    assert not (base / "runs").exists()
