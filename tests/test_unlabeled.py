"""Unlabelled images (issue 20): a detector's boxes as instances, their teacher store, the student that
mixes them into each epoch and learns no GT from them, and the commands around them."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch.utils.data import default_collate

from conftest import ZOO, make_tiny_world, odkd_log
from odkd.apps.ablate import run_ablation
from odkd.cli import main
from odkd.config import parse_config
from odkd.data.dataset import LabeledAndUnlabeled, MixedEpochSampler, TopDownDataset, mixed_batch_size
from odkd.data.instances import UnlabeledPersons, load_instances
from odkd.data.transforms import box_to_center_scale
from odkd.distill.objective import StudentObjective, stored_arrays
from odkd.distill.stages import StagePlan
from odkd.errors import OdkdError
from odkd.models import read_checkpoint
from odkd.models.losses import joints_mse_loss
from odkd.store.local import LocalRows
from odkd.store.reader import TeacherTargets
from odkd.synth.dataset import UNLABELED_DETECTIONS, UNLABELED_IMAGE_INFO, UNLABELED_TRUE_ANNOTATIONS
from odkd.teachers import build_cache
from test_ablate import ONE_PLUS_ONE
from test_student import read_log, student_toml, torchrun

pytestmark = pytest.mark.usefixtures("one_torch_thread")
UNLABELED_IMAGES = 4  # 6 boxes scored 0.5 or more at seed 0
# below 1/2, so an epoch takes fewer unlabelled instances than there are and the passes run across epochs
RATIO = 0.25
UNLABELED_DATA = f"""
[data.unlabeled]
images = "images/unlabeled"
image_info = "{UNLABELED_IMAGE_INFO}"
boxes = "{UNLABELED_DETECTIONS}"
"""


def unlabeled_toml(base: Path, stages: str = ONE_PLUS_ONE, unlabeled_cache: str | None = None) -> str:
    """test_student's pipeline with [data.unlabeled] on the synth split, [cache] unlabeled_store and
    [student] unlabeled_cache (default: that store)."""
    own = f"{base}/unlabeled.zarr"
    return student_toml(base, stages=stages + UNLABELED_DATA, cache=f'unlabeled_store = "{own}"',
                        student=f'unlabeled_cache = "{unlabeled_cache or own}"\nunlabeled_ratio = {RATIO}')


def run_cli(*args) -> tuple[int, str]:
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.output


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The tiny world, its unlabelled images written by `odkd synth`, and both stores built by
    `odkd cache-teachers`, the unlabelled one on a LocalCluster of two workers. Returns the base folder
    and what the commands printed."""
    base = make_tiny_world(tmp_path_factory.mktemp("unlabeled"), val_images=2)
    train_ann = (base / "data" / "annotations" / "person_keypoints_train.json").read_bytes()
    outputs = {"synth": run_cli("synth", base / "data", "--train-images", 6, "--val-images", 2,
                                "--unlabeled-images", UNLABELED_IMAGES, "--seed", 0, "--force")}
    # the tiny world's labelled splits stay its bytes, so its teachers and store fingerprint still hold
    assert (base / "data" / "annotations" / "person_keypoints_train.json").read_bytes() == train_ann
    config = base / "unlabeled.toml"
    config.write_text(unlabeled_toml(base))
    outputs["train"] = run_cli("cache-teachers", "--config", config, "--scheduler", "synchronous")
    # shards of 4 rows: each worker writes one of the 6 boxes' two shards
    outputs["unlabeled"] = run_cli("cache-teachers", "--config", config, "--split", "unlabeled", "--workers", 2,
                                   "--set", "cache.shard_instances=4")
    return base, outputs


def test_end_to_end_from_synth_to_a_student_that_learned_from_both_stores(world, tmp_path):
    base, outputs = world
    for name, (code, out) in outputs.items():
        assert code == 0, (name, out)
    assert json.loads(outputs["synth"][1][outputs["synth"][1].index("{"):])["unlabeled"]["images"] == UNLABELED_IMAGES
    store = base / "unlabeled.zarr"
    assert f"teacher targets in {store}" in outputs["unlabeled"][1]  # [cache] unlabeled_store by default
    cfg = parse_config(unlabeled_toml(base))
    unlabeled = load_instances(cfg.data, "unlabeled")
    assert len(unlabeled) == len(TeacherTargets.open(str(store))) == 6
    assert TeacherTargets.open(str(store)).layout.num_shards == 2

    code, info = run_cli("cache", "info", store)
    assert code == 0 and f"dataset      split unlabeled, fingerprint {unlabeled.fingerprint}" in info, info
    code, verified = run_cli("cache", "verify", store, "--config", base / "unlabeled.toml")
    assert code == 0 and verified.strip().endswith("verified") and "NOT verified" not in verified, verified
    assert f"dataset fingerprint {unlabeled.fingerprint} matches" in verified

    run = tmp_path / "student"
    code, out = run_cli("train-student", "--config", base / "unlabeled.toml", "--out", run)
    assert code == 0, out
    # every labelled instance once an epoch and round(16 * ratio) unlabelled ones, in batches of 4 labelled
    # and 1 unlabelled on average: what the loop's sampler gives, epoch by epoch, at a labelled-only epoch's steps
    labeled = len(load_instances(cfg.data, "train"))
    sampler = MixedEpochSampler(labeled, len(unlabeled), RATIO, seed=cfg.student.train.seed)
    batch = mixed_batch_size(cfg.student.train.batch_size, RATIO)
    assert sampler.per_epoch == 4 < len(unlabeled) and batch == 5
    expected = []
    for epoch in range(cfg.student.epochs):
        sampler.set_epoch(epoch)
        taken = [i for _, i in sampler][: len(sampler) // batch * batch]
        expected.append((sum(i < labeled for i in taken), sum(i >= labeled for i in taken)))
    log = read_log(run)
    assert [(r["n_labeled"], r["n_unlabeled"]) for r in log] == expected
    assert [r["stage"] for r in log] == ["primary", "senior"] and sum(expected[0]) == 20  # 4 steps, as 16 labelled
    identity = TeacherTargets.open(str(store)).identity()
    for name in ("last.pth", "best.pth"):
        provenance = read_checkpoint(run / name).extra["provenance"]
        assert provenance["unlabeled_store"] == identity
        assert provenance["store"]["url"] == cfg.student.cache
    assert f"identity     content {identity['content_digest']}, settings {identity['settings_digest']}" in info
    assert read_checkpoint(run / "last.pth").extra["signature"]["unlabeled_ratio"] == RATIO

    code, out = run_cli("report", "--config", base / "unlabeled.toml", "--runs", f"mixed={run}",
                        "--out", tmp_path / "report", "--device", "cpu")
    assert code == 0, out
    text = (tmp_path / "report" / "report.md").read_text()
    learned = [row for row in text[text.index("## Where the students learned"):].splitlines() if row.startswith("| mixed ")]
    assert len(learned) == 1 and f"`{cfg.student.cache}`, unlabelled `{store}` (content `{identity['content_digest']}`)" \
        in learned[0], learned


def write_json(path: Path, content) -> Path:
    path.write_text(json.dumps(content))
    return path


@pytest.fixture
def boxes_on_world(world, tmp_path):
    """An image-info file of the world's unlabelled images plus one whose file is missing, and a
    detections file with one good box after another, the bad kinds between them."""
    base, _ = world
    info = json.loads((base / "data" / UNLABELED_IMAGE_INFO).read_text())
    images = {img["id"]: img for img in info["images"]}
    first, second = sorted(images)[:2]
    width = images[second]["width"]
    info["images"].append({**images[first], "id": 77, "file_name": "000000000077.jpg"})
    detections = [
        {"image_id": second, "category_id": 1, "bbox": [10.0, 12.0, 40.0, 80.0], "score": 0.9},
        {"image_id": first, "category_id": 1, "bbox": [20.0, 20.0, 30.0, 60.0], "score": 0.5},
        {"image_id": first, "category_id": 1, "bbox": [20.0, 20.0, 30.0, 60.0], "score": 0.4999},
        {"image_id": 999, "category_id": 1, "bbox": [5.0, 5.0, 30.0, 60.0], "score": 0.9},
        {"image_id": second, "category_id": 1, "bbox": [width + 5.0, 10.0, 20.0, 40.0], "score": 0.8},
        {"image_id": second, "category_id": 1, "bbox": [10.0, 10.0, 0.0, 40.0], "score": 0.8},
        {"image_id": 77, "category_id": 1, "bbox": [10.0, 10.0, 30.0, 60.0], "score": 0.95},
        {"image_id": first, "category_id": 2, "bbox": [10.0, 10.0, 30.0, 60.0], "score": 0.95},
    ]
    return (write_json(tmp_path / "info.json", info), write_json(tmp_path / "dets.json", detections),
            base / "data" / "images" / "unlabeled", (first, second))


def test_unlabeled_persons_keep_good_boxes_and_count_each_bad_kind_in_one_line(boxes_on_world, caplog):
    info, dets, images, (first, second) = boxes_on_world
    caplog.clear()
    persons = UnlabeledPersons(info, dets, images, aspect_ratio=0.75, min_score=0.5)
    # image id, then position in the file; the score filter keeps a box scored exactly min_score
    assert [(p.image_id, p.ann_id, p.score) for p in persons] == [(first, 1, 0.5), (second, 0, 0.9)]
    assert [p.index for p in persons] == [0, 1]
    kept = persons[1]
    center, scale = box_to_center_scale((10.0, 12.0, 40.0, 80.0), 0.75)
    assert kept.bbox == (10.0, 12.0, 40.0, 80.0) and np.allclose(kept.center, center) and np.allclose(kept.scale, scale)
    assert not kept.joints.any() and persons.image_path(kept) == images / kept.file_name
    assert odkd_log(caplog) == [
        f"warning: {dets}: skipped 1 box(es) not in the image-info file (detections [3]); "
        f"[data] strict = true makes this an error",
        f"warning: {dets}: skipped 2 box(es) with no area or outside the image (detections [4, 5]); "
        f"[data] strict = true makes this an error",
        f"warning: {dets}: skipped 1 box(es) on a missing image file (detections [6]); "
        f"[data] strict = true makes this an error",
    ]
    with pytest.raises(OdkdError) as error:
        UnlabeledPersons(info, dets, images, min_score=0.5, strict=True)
    assert str(error.value) == (f"{dets}: detection [3] (image_id 999) is not in the image-info file "
                                f"([data] strict = true)")


def test_a_box_wholly_left_of_its_image_is_skipped(boxes_on_world):
    info, dets, images, (first, _) = boxes_on_world
    left = [{"image_id": first, "category_id": 1, "bbox": [-80.0, 10.0, 30.0, 60.0], "score": 0.9}]
    persons = UnlabeledPersons(info, write_json(dets.with_name("left.json"), left), images)
    assert len(persons) == 0 and list(persons.skipped) == ["with no area or outside the image"]


def test_unlabeled_fingerprint_follows_the_boxes_and_scores(boxes_on_world):
    info, dets, images, _ = boxes_on_world
    records = json.loads(dets.read_text())
    before = UnlabeledPersons(info, dets, images).fingerprint
    assert UnlabeledPersons(info, write_json(dets.with_name("same.json"), records), images).fingerprint == before
    moved = [dict(r) for r in records]
    moved[0]["bbox"] = [11.0, 12.0, 40.0, 80.0]
    rescored = [dict(r) for r in records]
    rescored[0]["score"] = 0.8
    assert UnlabeledPersons(info, write_json(dets.with_name("moved.json"), moved), images).fingerprint != before
    assert UnlabeledPersons(info, write_json(dets.with_name("rescored.json"), rescored), images).fingerprint != before


def test_mixed_sampler_walks_every_unlabelled_instance_before_repeating_one():
    labeled, unlabeled, epochs = 10, 7, 7
    sampler = MixedEpochSampler(labeled, unlabeled, 0.4, seed=5)
    assert sampler.per_epoch == 4 and len(sampler) == 14  # round(10 * 0.4)
    drawn = np.zeros(unlabeled, int)
    epoch_sets = []
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        order = [i for e, i in sampler]
        assert {e for e, _ in sampler} == {epoch}
        assert sorted(i for i in order if i < labeled) == list(range(labeled))
        taken = [i - labeled for i in order if i >= labeled]
        assert len(taken) == 4
        np.add.at(drawn, taken, 1)
        # none comes a second time before every one has come once, however the passes cut the epochs
        assert drawn.max() - drawn.min() <= 1, (epoch, drawn)
        epoch_sets.append(frozenset(taken))
    assert drawn.sum() == 4 * epochs and len(set(epoch_sets)) > 2  # seeded passes, not one fixed cycle

    again = MixedEpochSampler(labeled, unlabeled, 0.4, seed=5)
    other = MixedEpochSampler(labeled, unlabeled, 0.4, seed=6)
    for s in (sampler, again, other):
        s.set_epoch(3)
    assert list(again) == list(sampler) and list(other) != list(sampler)
    ranks = [MixedEpochSampler(labeled, unlabeled, 0.4, seed=5, rank=r, world_size=3) for r in range(3)]
    for r in ranks:
        r.set_epoch(3)
    seen = [i for r in ranks for _, i in r]
    assert all(len(list(r)) == 5 for r in ranks) and len(seen) == 15  # 14 padded to 3 x 5
    assert set(seen) == {i for _, i in sampler}
    # more than there are unlabelled instances walks on into the next pass; none gives a labelled epoch
    more = MixedEpochSampler(labeled, unlabeled, 1.0, seed=5)
    more.set_epoch(0)
    assert more.per_epoch == 10 and sorted(more.unlabeled_indices()[:unlabeled]) == list(range(unlabeled))
    assert MixedEpochSampler(labeled, 0, 1.0).per_epoch == 0


def test_gt_loss_of_a_mixed_batch_is_the_labelled_samples_loss(world):
    base, _ = world
    cfg = parse_config(unlabeled_toml(base))
    plan = StagePlan(cfg.student)
    arrays = stored_arrays(plan)
    labeled, unlabeled = load_instances(cfg.data, "train"), load_instances(cfg.data, "unlabeled")
    targets = TeacherTargets.open(cfg.student.cache)
    both = LabeledAndUnlabeled(
        TopDownDataset(labeled, cfg.data, train=True, stored_rows=LocalRows.fetch(targets, arrays)),
        TopDownDataset(unlabeled, cfg.data, train=True, stream=1,
                       stored_rows=LocalRows.fetch(TeacherTargets.open(cfg.student.unlabeled_cache), arrays)))
    n = len(labeled)
    batch = default_collate([both[1, i] for i in (0, n, 1, n + 1, n + 2)])
    is_labeled = torch.tensor([True, False, True, False, False])
    assert torch.equal(batch["labeled"], is_labeled)
    assert not batch["target_weight"][~is_labeled].any() and batch["target_weight"][is_labeled].any()
    objective = StudentObjective(plan, targets, heatmap_size=cfg.data.heatmap_size, sigma=cfg.data.sigma, seg_loss=cfg.student.seg_loss)
    objective.begin_epoch(0)
    heatmaps = torch.rand(5, 17, 32, 24, generator=torch.Generator().manual_seed(0))
    _, parts = objective((heatmaps, None), batch)
    alone = joints_mse_loss(heatmaps[is_labeled], batch["heatmaps"][is_labeled], batch["target_weight"][is_labeled])
    assert parts["gt_loss"].item() == pytest.approx(alone.item(), rel=1e-6)
    assert (parts["n_labeled"].item(), parts["n_unlabeled"].item()) == (2, 3)
    # a batch of unlabelled samples alone learns from the teacher and has a GT term of 0, not 0 / 0
    _, parts = objective((heatmaps[~is_labeled], None), {k: v[~is_labeled] for k, v in batch.items()})
    assert parts["gt_loss"].item() == 0.0 and parts["kd_pt_loss"].item() > 0

    # kd_on_labels = false: a teacher teaches no joint that a label gives, so the student's maps there
    # do not move its term; with true they do
    labelled_joints = batch["target_weight"][..., 0] > 0
    moved = torch.where(labelled_joints[..., None, None], heatmaps + 0.5, heatmaps)
    kd = {}
    for on_labels in (True, False):
        stages = tuple(dataclasses.replace(stage, kd_on_labels=on_labels) for stage in cfg.student.stages)
        off = StudentObjective(StagePlan(dataclasses.replace(cfg.student, stages=stages)), targets,
                               heatmap_size=cfg.data.heatmap_size, sigma=cfg.data.sigma, seg_loss=cfg.student.seg_loss)
        off.begin_epoch(0)
        kd[on_labels] = [off((maps, None), batch)[1]["kd_pt_loss"].item() for maps in (heatmaps, moved)]
    assert kd[False][0] == kd[False][1] and kd[False][0] > 0
    assert kd[True][0] != kd[True][1]


@pytest.fixture(scope="module")
def other_threshold_store(world, tmp_path_factory):
    """The unlabelled boxes' store, built at [cache] threshold 0.6 where the labelled one has 0.5."""
    base, _ = world
    url = str(tmp_path_factory.mktemp("other") / "unlabeled_t06.zarr")
    cfg = parse_config(unlabeled_toml(base).replace("threshold = 0.5", "threshold = 0.6"))
    return build_cache(cfg, "unlabeled", url, scheduler="synchronous", progress=False)


NO_TEACHER_FIRST = ONE_PLUS_ONE.replace('teacher = "primary"', 'teacher = "none"')


@pytest.mark.parametrize("given, stages, message", [
    ("other", ONE_PLUS_ONE, "{other}: settings.threshold is 0.6 but {labeled} has 0.5"),
    ("labeled", ONE_PLUS_ONE,
     "{labeled}: settings.split is 'train', but it is read here as the 'unlabeled' split's store; is it the other "
     "store of the config?"),
    ("own", NO_TEACHER_FIRST, "{config}: student.stages 'primary' learns from no teacher"),
], ids=["other settings", "a labelled store", "a stage without a teacher"])
def test_train_student_refuses_an_unlabelled_store_that_cannot_serve_in_one_line(world, other_threshold_store,
                                                                                 tmp_path, given, stages, message):
    base, _ = world
    stores = {"other": other_threshold_store, "labeled": f"{base}/store.zarr", "own": f"{base}/unlabeled.zarr"}
    config = tmp_path / "p.toml"
    config.write_text(unlabeled_toml(base, stages=stages, unlabeled_cache=stores[given]))
    out = tmp_path / "run"
    code, printed = run_cli("train-student", "--config", config, "--out", out)
    assert code == 1 and len(printed.strip().splitlines()) == 1, printed
    assert message.format(config=config, **stores) in printed, printed
    assert not out.exists()


def test_evaluate_scores_a_teacher_on_the_unlabelled_boxes_against_their_true_labels(world, tmp_path):
    base, _ = world
    config = base / "unlabeled.toml"
    truth = base / "data" / UNLABELED_TRUE_ANNOTATIONS
    results, stats = tmp_path / "results.json", tmp_path / "stats.json"
    code, out = run_cli("evaluate", "--config", config, "--checkpoint", ZOO / "demo_primary.pth", "--split",
                        "unlabeled", "--ann", truth, "--out", results, "--stats-json", stats)
    assert code == 0, out
    kept = load_instances(parse_config(config.read_text()).data, "unlabeled")
    assert f"wrote {len(kept)} results to {results}" in out
    assert sorted(r["image_id"] for r in json.loads(results.read_text())) == sorted(p.image_id for p in kept)
    assert json.loads(stats.read_text())["AP"] > 0  # the demo teacher finds the synthetic people's joints
    code, out = run_cli("evaluate", "--config", config, "--checkpoint", ZOO / "demo_primary.pth",
                        "--split", "unlabeled")
    assert code == 1 and len(out.strip().splitlines()) == 1 and "--split unlabeled" in out and "--ann" in out, out


def test_ablation_runs_the_unlabeled_variants_beside_gt(world, tmp_path):
    base, _ = world
    cfg = parse_config(unlabeled_toml(base))
    out = tmp_path / "ablation"
    store = f"{base}/unlabeled.zarr"
    names = ["gt", "orderly+unlabeled", "st+unlabeled"]
    summary = run_ablation(cfg, seeds=1, variants=names, out=out, max_steps_per_epoch=1)
    assert list(summary["variants"]) == names and summary["unlabeled_store"] == store
    md = (out / "ablation.md").read_text()
    assert "| orderly+unlabeled |" in md and "| st+unlabeled |" in md
    assert [h["claim"] for h in summary["hypotheses"]] == [
        "the teachers and the unlabelled images beat GT alone",
        "with the unlabelled images, PT's stage before ST's beats ST's targets alone"]
    assert f"; unlabelled store (the +unlabeled variants): `{store}`" in md
    records = {name: json.loads((out / name / "seed0" / "run.json").read_text())["student"] for name in names}
    assert {name: record["unlabeled_cache"] for name, record in records.items()} \
        == {"gt": "", "orderly+unlabeled": store, "st+unlabeled": store}
    assert {name: [stage["teacher"] for stage in records[name]["stages"]] for name in names[1:]} \
        == {"orderly+unlabeled": ["primary", "senior"], "st+unlabeled": ["senior", "senior"]}
    provenance = {name: read_checkpoint(out / name / "seed0" / "last.pth").extra["provenance"] for name in records}
    assert "unlabeled_store" not in provenance["gt"]
    assert provenance["orderly+unlabeled"]["unlabeled_store"]["url"] == store
    assert provenance["st+unlabeled"]["unlabeled_store"]["url"] == store
    for name in names[1:]:
        assert [json.loads(line)["stage"] for line in (out / name / "seed0" / "log.jsonl").open()] \
            == ["primary", "senior"]
    # the two +unlabeled runs share the seed, the data order and the labelled people: only PT's targets differ
    weights = {name: read_checkpoint(out / name / "seed0" / "last.pth").state_dict for name in names[1:]}
    assert any(not torch.equal(a, b) for a, b in zip(weights["orderly+unlabeled"].values(),
                                                      weights["st+unlabeled"].values()))


def test_under_torchrun_the_epoch_counts_are_the_whole_runs_summed_over_the_ranks(world, tmp_path):
    """Real gloo, 2 processes: n_labeled and n_unlabeled of each epoch line were rank 0's share alone, half of
    what the start line counts; they are every rank's whole batches, summed."""
    base, _ = world
    run = tmp_path / "ddp"
    proc = torchrun("-m", "odkd", "train-student", "--config", base / "unlabeled.toml", "--out", run)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cfg = parse_config(unlabeled_toml(base))
    labeled, unlabeled = len(load_instances(cfg.data, "train")), len(load_instances(cfg.data, "unlabeled"))
    batch = mixed_batch_size(cfg.student.train.batch_size, RATIO)
    expected = []
    for epoch in range(cfg.student.epochs):
        counts = [0, 0]
        for rank in range(2):
            sampler = MixedEpochSampler(labeled, unlabeled, RATIO, seed=cfg.student.train.seed, rank=rank,
                                        world_size=2)
            sampler.set_epoch(epoch)
            taken = [i for _, i in sampler][: len(sampler) // batch * batch]  # each rank's whole batches
            counts[0] += sum(i < labeled for i in taken)
            counts[1] += sum(i >= labeled for i in taken)
        expected.append(tuple(counts))
    log = read_log(run)
    assert [(r["n_labeled"], r["n_unlabeled"]) for r in log] == expected
    assert all(r["ranks_in_sync"] for r in log)
    assert sum(expected[0]) == 20  # 20 samples an epoch: 10 a rank, two batches of 5 each
    started = f"{labeled} labelled instances and 4 of the {unlabeled} unlabelled ones an epoch, in batches of 5"
    assert started in proc.stderr
