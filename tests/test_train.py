"""The training loop, teachers, model evaluation and predict, on a small synthetic set with tiny models."""

import json
import logging

import numpy as np
import pytest
import torch

from odkd.config import ScheduleConfig, parse_config
from odkd.data.dataset import TopDownDataset
from odkd.data.instances import load_instances
from odkd.synth import make_synthetic_dataset
from odkd.errors import OdkdError
from odkd.models import build_from_checkpoint, build_model, read_checkpoint
from odkd.eval.evaluate import evaluate_checkpoint, evaluate_model
from odkd.train.loop import ModelSpec, fit, lr_multiplier
from odkd.eval.predict import predict_to_png
from odkd.train.teacher import teacher_loss, train_teacher

from conftest import odkd_log


def pipeline_toml(root, runs, epochs=2, *, val_split="val", sigma=1.0, augment=True) -> str:
    no_aug = "" if augment else "[data.augment]\nscale_factor = 0.0\nrotation_prob = 0.0\nhalf_body_prob = 0.0\n"
    return f"""
device = "cpu"
runs = "{runs}"
[data]
root = "{root}"
val_ann = "annotations/person_keypoints_{val_split}.json"
val_images = "images/{val_split}"
input_size = [96, 128]
heatmap_size = [24, 32]
sigma = {sigma}
{no_aug}
[teachers.primary]
model = "hrnet_tiny"
model_args = {{ width = 4 }}
[teachers.primary.train]
epochs = {epochs}
batch_size = 8
lr = 2e-3
workers = 0
amp = false
[teachers.senior]
model = "hrnet_tiny"
model_args = {{ width = 8 }}
seg_head = true
[teachers.senior.train]
epochs = {epochs}
batch_size = 16
lr = 5e-3
schedule = "cosine"
warmup_epochs = 1.0
eval_every = 100
workers = 0
amp = false
"""


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    make_synthetic_dataset(root, train_images=40, val_images=12, seed=5)
    return root


def test_lr_schedules():
    cfg = parse_config(pipeline_toml("x", "y")).teachers.senior.train
    f = lr_multiplier(cfg, steps_per_epoch=10)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)  # warmup over 10 steps
    assert f(10) == pytest.approx(1.0) and f(20) == pytest.approx(0.0, abs=1e-9)
    g = lr_multiplier(ScheduleConfig(epochs=10, lr_steps=(3, 6), lr_factor=0.1), steps_per_epoch=4)
    assert [round(g(s), 6) for s in (0, 11, 12, 23, 24)] == [1.0, 1.0, 0.1, 0.1, 0.01]


def test_resume_after_interruption_matches_uninterrupted_run(synth_root, tmp_path):
    """Interrupted after epoch 1 (during evaluation), then --resume: the same weights as one straight run."""
    cfg = parse_config(pipeline_toml(synth_root, tmp_path / "runs", epochs=3))
    tcfg = cfg.teachers.primary
    spec = ModelSpec(tcfg.model, dict(tcfg.model_args), False)
    train_set = TopDownDataset(load_instances(cfg.data, "train"), cfg.data, train=True, seed=0)
    loss = teacher_loss(1.0, "bce")

    def run(out, evaluate_fn, resume=False):
        return fit(lambda: build_model(tcfg.model, **tcfg.model_args), train_set, schedule=tcfg.train, spec=spec, out_dir=out, loss_fn=loss,
                   device=torch.device("cpu"), evaluate_fn=evaluate_fn, resume=resume, max_steps_per_epoch=3)

    calls = []

    def fake_ap(model):
        return {"AP": 0.1 * len(calls)}

    def interrupting(model):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return {"AP": 0.1 * len(calls)}

    run(tmp_path / "straight", fake_ap)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "broken", interrupting)
    assert read_checkpoint(tmp_path / "broken" / "last.pth").extra["epoch"] == 1
    with pytest.raises(OdkdError, match="a run already exists here"):
        run(tmp_path / "broken", fake_ap)
    run(tmp_path / "broken", fake_ap, resume=True)

    a = read_checkpoint(tmp_path / "straight" / "last.pth")
    b = read_checkpoint(tmp_path / "broken" / "last.pth")
    assert a.extra["epoch"] == b.extra["epoch"] == 3
    for key in a.state_dict:
        assert torch.equal(a.state_dict[key], b.state_dict[key]), key
    log = [json.loads(line) for line in (tmp_path / "broken" / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2, 3]


def test_senior_teacher_learns_keypoints_and_mask(tmp_path):
    """A tiny HRNet with a seg head, ~300 steps on 20 synthetic images, scored on those same images.

    This is the memorization check of the whole chain (crops, targets, loop, flip test, decoding,
    OKS evaluation): if any link were wrong AP would stay at 0. Measured here: AP 0.11 (AP .5
    0.46) and mask IoU 0.66 after training, against AP 0.0 and IoU 0.16 untrained (the untrained
    head says 0.5 everywhere, so its IoU is the mask's share of the crop).
    """
    root = tmp_path / "data"
    make_synthetic_dataset(root, train_images=20, val_images=4, seed=5)
    cfg = parse_config(pipeline_toml(root, tmp_path / "runs", epochs=150, val_split="train", sigma=2.0,
                                     augment=False))
    val = load_instances(cfg.data, "val")
    assert len(val) == len(load_instances(cfg.data, "train"))
    torch.manual_seed(0)
    untrained = build_model("hrnet_tiny", seg_head=True, width=8)
    before = evaluate_model(untrained, val, cfg.data, cfg.eval, val.coco, device=torch.device("cpu"))

    summary = train_teacher(cfg, "senior")
    assert summary["best"] is not None
    log = [json.loads(line) for line in (tmp_path / "runs" / "teacher_senior" / "log.jsonl").read_text().splitlines()]
    assert len(log) == 150 and log[-1]["kpt_loss"] < 0.8 * log[0]["kpt_loss"]

    after = evaluate_checkpoint(cfg, summary["best"], split="val")
    assert after.stats["AP"] >= 0.05 > before.stats["AP"]  # half the measured value: other inits gave 0.23
    assert after.stats["AP .5"] >= 0.25
    assert after.mask_iou >= before.mask_iou + 0.3
    assert after.stats["AP"] == pytest.approx(log[-1]["AP"], abs=1e-9)

    # detections of every (cleaned) GT box with score 1 make the same crops, so the same AP; the
    # raw COCO boxes would not, as the official detection path skips box cleaning
    dets = [{"image_id": i.image_id, "category_id": 1, "bbox": list(i.bbox), "score": 1.0} for i in val.instances]
    det_file = tmp_path / "dets.json"
    det_file.write_text(json.dumps(dets))
    from_dets = evaluate_checkpoint(cfg, summary["best"], split="val", boxes=str(det_file))
    assert from_dets.stats["AP"] == pytest.approx(after.stats["AP"], abs=1e-9)
    assert from_dets.mask_iou is None

    # predict draws every box of an image to a PNG and returns image-space keypoints near the GT
    model, _ = build_from_checkpoint(summary["best"], "cpu")
    inst = val[0]
    boxes = [list(i.bbox) for i in val.instances if i.image_id == inst.image_id]
    kpts = predict_to_png(model, val.image_path(inst), boxes, cfg.data.input_size, tmp_path / "p.png",
                          device=torch.device("cpu"))
    assert kpts.shape == (len(boxes), 17, 3) and (tmp_path / "p.png").stat().st_size > 1000
    assert np.all((kpts[..., 0] > -inst.image_width) & (kpts[..., 0] < 2 * inst.image_width))


def test_same_seed_same_teacher(synth_root, tmp_path):
    """`seed` fixes the run, model init included: torch's own seed differs per process and call."""
    cfg = parse_config(pipeline_toml(synth_root, tmp_path / "runs", epochs=1))
    weights = []
    for out in ("a", "b"):
        torch.manual_seed(len(weights))  # whatever ran before must not matter
        summary = train_teacher(cfg, "primary", out=str(tmp_path / out), max_steps_per_epoch=2)
        weights.append(read_checkpoint(summary["last"]).state_dict)
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_resume_under_another_architecture_names_both(synth_root, tmp_path):
    """A config edited after a run started (here: PT's width) is refused in one line, not a torch traceback."""
    runs = tmp_path / "runs"
    train_teacher(parse_config(pipeline_toml(synth_root, runs, epochs=2)), "primary", max_steps_per_epoch=1)
    wider = parse_config(pipeline_toml(synth_root, runs, epochs=2).replace("width = 4", "width = 6"))
    with pytest.raises(OdkdError, match=r"last\.pth: this run trains hrnet_tiny \{'width': 4\} but the config "
                                        r"asks for hrnet_tiny \{'width': 6\}"):
        train_teacher(wider, "primary", resume=True)
    assert read_checkpoint(runs / "teacher_primary" / "last.pth").meta["model_args"] == {"width": 4}
    # so is one whose schedule changed: the run's lr curve and data order would no longer be its own
    longer = parse_config(pipeline_toml(synth_root, runs, epochs=3))
    with pytest.raises(OdkdError, match=r"last\.pth: the schedule changed since this run started \(epochs 2 != 3"):
        train_teacher(longer, "primary", resume=True)


def test_init_checkpoint_without_seg_head_reports_new_head(synth_root, tmp_path, caplog):
    cfg = parse_config(pipeline_toml(synth_root, tmp_path / "runs", epochs=1))
    plain = build_model("hrnet_tiny", width=8)
    from odkd.models import save_checkpoint

    save_checkpoint(tmp_path / "plain.pth", plain, model_name="hrnet_tiny", model_args={"width": 8}, seg_head=False)
    caplog.set_level(logging.INFO, logger="odkd")
    train_teacher(cfg, "senior", init=str(tmp_path / "plain.pth"), max_steps_per_epoch=1)
    (init,) = [line for line in odkd_log(caplog, logging.INFO) if line.startswith("init from")]
    assert "newly initialized: seg_head" in init


def test_a_teacher_trains_and_is_scored_on_its_data_root_not_on_data(synth_root, tmp_path):
    """[teachers.ROLE] data_root: the teacher's own dataset, as released weights come from theirs."""
    toml = pipeline_toml(tmp_path / "nowhere", tmp_path / "runs", epochs=1)
    with pytest.raises(OdkdError, match="nowhere"):
        train_teacher(parse_config(toml), "primary", max_steps_per_epoch=1)
    cfg = parse_config(toml.replace("[teachers.primary]\n", f'[teachers.primary]\ndata_root = "{synth_root}"\n'))
    summary = train_teacher(cfg, "primary", max_steps_per_epoch=1)
    log = [json.loads(line) for line in (tmp_path / "runs" / "teacher_primary" / "log.jsonl").read_text().splitlines()]
    assert len(log) == 1 and log[0]["AP"] == pytest.approx(summary["best_ap"])
    on_root = parse_config(pipeline_toml(synth_root, tmp_path / "runs", epochs=1))
    assert evaluate_checkpoint(on_root, summary["last"], split="val").stats["AP"] == pytest.approx(log[0]["AP"])
