"""The loop's [*.train] keys (clip_grad, accumulate, amp_dtype, ema), which epochs become best.pth,
provenance, and DDP's unused-parameter search only where a stage leaves modules idle."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from conftest import make_tiny_world
from odkd.cli import main
from odkd.config import DataConfig, ScheduleConfig, parse_config
from odkd.data.dataset import EpochSampler, TopDownDataset, make_loader
from odkd.data.instances import load_instances
from odkd.errors import OdkdError
from odkd.models import build_model, read_checkpoint
from odkd.models.losses import joints_mse_loss
from odkd.synth import make_synthetic_dataset
from odkd.teachers import build_cache
from odkd.train.loop import ModelSpec, WeightEMA, fit, new_state, train_one_epoch
from odkd.train.teacher import teacher_loss
from test_student import TWO_STAGES, student_toml

pytestmark = pytest.mark.usefixtures("one_torch_thread")
CPU = torch.device("cpu")
NO_AUGMENT = {"scale_factor": 0.0, "rotation_prob": 0.0, "half_body_prob": 0.0, "flip_prob": 0.0}
TINY = ModelSpec("hrnet_tiny", {"width": 4}, False)


@pytest.fixture(scope="module")
def data_cfg(tmp_path_factory) -> DataConfig:
    root = tmp_path_factory.mktemp("keys")
    make_synthetic_dataset(root, train_images=8, val_images=2, seed=3)
    return parse_config(f'[data]\nroot = "{root}"\ninput_size = [96, 128]\nheatmap_size = [24, 32]\n').data


@pytest.fixture(scope="module")
def train_set(data_cfg) -> TopDownDataset:
    return TopDownDataset(load_instances(data_cfg, "train"), data_cfg, train=True, seed=0)


def schedule(**keys) -> ScheduleConfig:
    return ScheduleConfig(**{"epochs": 3, "batch_size": 4, "lr": 2e-3, "workers": 0, "amp": False, **keys})


def tiny_fit(train_set, out, sched, *, evaluate_fn=None, resume=False, **kw) -> dict:
    return fit(lambda: build_model("hrnet_tiny", width=4), train_set, schedule=sched, spec=TINY, out_dir=out,
               loss_fn=teacher_loss(1.0, "bce"), device=CPU, evaluate_fn=evaluate_fn, resume=resume,
               max_steps_per_epoch=2, **kw)


def grad_norm(model: torch.nn.Module) -> float:
    return math.sqrt(sum(float(p.grad.double().pow(2).sum()) for p in model.parameters() if p.grad is not None))


def test_clip_grad_bounds_the_gradient_norm_the_optimizer_steps_with(train_set):
    torch.manual_seed(0)
    model = build_model("hrnet_tiny", width=4)
    state = new_state(model, schedule(clip_grad=0.01), lambda step: 1.0, False, CPU)
    stepped = []
    state.optimizer.register_step_pre_hook(lambda optimizer, args, kwargs: stepped.append(grad_norm(model)))
    loader = make_loader(train_set, 4, 0, sampler=EpochSampler(len(train_set), shuffle=False), drop_last=True)
    record = train_one_epoch(model, state, loader, teacher_loss(1.0, "bce"), steps=3, device=CPU, amp=False,
                             desc="clip")
    assert len(stepped) == 3 and max(stepped) <= 0.01 * (1 + 1e-6)
    assert record["grad_norm"] > 0.01  # logged before clipping: the clip acted


class NoBatchNorm(torch.nn.Module):
    """Heatmaps from two convolutions: no statistics over the batch, so a batch split in two gives the
    same gradient as the whole."""

    has_seg_head, num_joints = False, 17

    def __init__(self):
        super().__init__()
        self.features = torch.nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.heatmaps = torch.nn.Conv2d(8, 17, 3, stride=2, padding=1)

    def forward(self, x):
        return self.heatmaps(torch.relu(self.features(x))), None


def heatmap_loss(output, batch):
    loss = joints_mse_loss(output[0], batch["heatmaps"], batch["target_weight"])
    return loss, {"kpt_loss": loss.detach(), "n_people": float(len(batch["image"]))}


def test_accumulating_k_batches_of_b_is_one_step_of_k_times_b(data_cfg):
    """Adam sees the same gradient either way (the loss is a mean over the batch, each micro-batch's
    divided by k); three steps, so its moments carry the values and not only their signs."""
    plain = TopDownDataset(load_instances(data_cfg, "train"), dataclasses.replace(
        data_cfg, augment=dataclasses.replace(data_cfg.augment, **NO_AUGMENT)), train=True, seed=0)

    def three_steps(batch_size: int, accumulate: int, steps: int = 3):
        torch.manual_seed(0)
        model = NoBatchNorm()
        state = new_state(model, schedule(accumulate=accumulate), lambda step: 1.0, False, CPU)
        loader = make_loader(plain, batch_size, 0, sampler=EpochSampler(len(plain), shuffle=False), drop_last=True)
        record = train_one_epoch(model, state, loader, heatmap_loss, steps=steps, device=CPU, amp=False, desc="acc")
        return model.state_dict(), record, state

    assert len(plain) >= 12
    one, one_record, _ = three_steps(4, 1)
    split, split_record, split_state = three_steps(2, 2)
    micro, _, _ = three_steps(2, 1)
    assert split_state.scheduler.last_epoch == 3  # the lr schedule counts optimizer steps
    for key in one:
        assert torch.allclose(one[key], split[key], rtol=0, atol=1e-7), key
    assert max(float((one[k] - micro[k]).abs().max()) for k in one) > 1e-4  # a batch of 2 per step is not it
    assert split_record["loss"] == pytest.approx(one_record["loss"], rel=1e-6)
    assert split_record["kpt_loss"] == pytest.approx(one_record["loss"], rel=1e-6)
    assert split_record["n_people"] == one_record["n_people"] == 12  # counts summed, not averaged


def test_ema_follows_mmdets_exp_momentum_and_copies_buffers():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    ema = WeightEMA(model, momentum=0.0002)
    before = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        model[0].weight.add_(1.0)
        model[1].running_mean.add_(3.0)
    ema.update(model)  # the first update takes the weights as they are
    assert torch.equal(ema.module[0].weight, model[0].weight)
    with torch.no_grad():
        model[0].weight.add_(1.0)
        model[1].running_mean.add_(3.0)
    ema.update(model)
    m = (1 - 0.0002) * math.exp(-2 / 2000) + 0.0002
    assert torch.allclose(ema.module[0].weight, (before[0] + 1) * (1 - m) + (before[0] + 2) * m, atol=1e-6)
    assert torch.equal(ema.module[1].running_mean, model[1].running_mean)  # copied, not averaged
    assert ema.steps == 2 and not any(p.requires_grad for p in ema.module.parameters())


def test_ema_weights_are_evaluated_and_kept_as_best(train_set, tmp_path):
    evaluated = []

    def evaluate(model):
        evaluated.append({k: v.clone() for k, v in model.state_dict().items()})
        return {"AP": float(len(evaluated))}

    summary = tiny_fit(train_set, tmp_path / "run", schedule(epochs=2, ema=True), evaluate_fn=evaluate)
    best, last = read_checkpoint(summary["best"]), read_checkpoint(summary["last"])
    assert summary["best_epoch"] == 2 and best.extra["epoch"] == 2
    ema = last.extra["ema"]["weights"]
    for key in ema:
        assert torch.equal(best.state_dict[key], ema[key]) and torch.equal(evaluated[-1][key], ema[key]), key
    weights = [k for k in ema if k.endswith("weight")]
    assert any(not torch.equal(ema[k], last.state_dict[k]) for k in weights)  # the raw weights moved on
    assert last.extra["ema"]["steps"] == 4


def test_resume_with_clip_accumulate_and_ema_matches_an_uninterrupted_run(train_set, tmp_path):
    sched = schedule(clip_grad=0.05, accumulate=2, ema=True)
    calls = []

    def interrupting(model):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return {"AP": 0.1 * len(calls)}

    tiny_fit(train_set, tmp_path / "straight", sched, evaluate_fn=lambda m: {"AP": 0.1})
    with pytest.raises(KeyboardInterrupt):
        tiny_fit(train_set, tmp_path / "broken", sched, evaluate_fn=interrupting)
    assert read_checkpoint(tmp_path / "broken" / "last.pth").extra["epoch"] == 1
    with pytest.raises(OdkdError, match=r"schedule changed since this run started \(clip_grad 0.05 != 0.1"):
        tiny_fit(train_set, tmp_path / "broken", dataclasses.replace(sched, clip_grad=0.1), resume=True)
    tiny_fit(train_set, tmp_path / "broken", sched, evaluate_fn=lambda m: {"AP": 0.1}, resume=True)
    a, b = read_checkpoint(tmp_path / "straight" / "last.pth"), read_checkpoint(tmp_path / "broken" / "last.pth")
    assert a.extra["epoch"] == b.extra["epoch"] == 3
    for key in a.state_dict:
        assert torch.equal(a.state_dict[key], b.state_dict[key]), key
        assert torch.equal(a.extra["ema"]["weights"][key], b.extra["ema"]["weights"][key]), key
    assert a.extra["scheduler"]["last_epoch"] == 3 * 2  # 2 optimizer steps an epoch, of 2 batches each
    log = [json.loads(line) for line in (tmp_path / "broken" / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2, 3] and all(r["grad_norm"] > 0 for r in log)


def test_a_run_from_before_the_new_keys_resumes_under_their_defaults(train_set, tmp_path):
    """Its last.pth has none of the new keys in its signature, and no best_epoch: its best.pth is
    replaced only by a better epoch, as before."""
    tiny_fit(train_set, tmp_path / "run", schedule(epochs=2), evaluate_fn=lambda m: {"AP": 0.1})
    last = tmp_path / "run" / "last.pth"
    saved = torch.load(last, weights_only=False)
    new_keys = ("clip_grad", "accumulate", "amp_dtype", "ema", "ema_momentum", "compile")
    saved["signature"] = {k: v for k, v in saved["signature"].items() if k not in new_keys}
    saved = {k: v for k, v in saved.items() if k not in ("best_epoch", "best_stage", "provenance", "ema")}
    saved["epoch"] = 1
    torch.save(saved, last)
    summary = tiny_fit(train_set, tmp_path / "run", schedule(epochs=2), evaluate_fn=lambda m: {"AP": 0.05},
                       resume=True)
    assert read_checkpoint(summary["last"]).extra["epoch"] == 2
    assert read_checkpoint(summary["best"]).extra["epoch"] == 1 and summary["best_ap"] == 0.1
    with pytest.raises(OdkdError, match=r"\(accumulate 1 != 2, run != config\)"):
        tiny_fit(train_set, tmp_path / "run", schedule(epochs=2, accumulate=2), resume=True)


class Stages:
    """A teacher's loss under stage names: "early" for the first epoch, "late" after it."""

    def __init__(self):
        self.loss = teacher_loss(1.0, "bce")

    def begin_epoch(self, epoch: int) -> dict:
        return {"stage": "early" if epoch == 0 else "late"}

    def __call__(self, output, batch):
        return self.loss(output, batch)


@pytest.mark.parametrize("best_from_epoch, epoch, stage", [(0, 1, "early"), (1, 3, "late")])
def test_best_from_epoch_and_what_best_pth_says_it_is(train_set, tmp_path, best_from_epoch, epoch, stage):
    aps = iter([0.5, 0.2, 0.3])  # epoch 1 is the best of the run, epoch 3 of the epochs after it
    summary = fit(lambda: build_model("hrnet_tiny", width=4), train_set, schedule=schedule(), spec=TINY,
                  out_dir=tmp_path, loss_fn=Stages(), device=CPU, evaluate_fn=lambda m: {"AP": next(aps)},
                  max_steps_per_epoch=1, best_from_epoch=best_from_epoch)
    best = read_checkpoint(summary["best"])
    assert (summary["best_epoch"], summary["best_stage"]) == (best.extra["epoch"], best.extra["stage"]) == (epoch,
                                                                                                          stage)
    assert summary["best_ap"] == best.extra["val"]["AP"] == best.extra["best_ap"]


def test_a_best_from_before_the_window_gives_way_when_a_resume_moves_it(train_set, tmp_path):
    """A run kept epoch 1 as best.pth, then resumed with best_from_epoch 1 ([student] best changed to
    last_stage): a later epoch replaces it although its AP is lower."""
    aps = [0.5, 0.2, 0.3]

    def run(best_from_epoch, evaluate, resume=False):
        return fit(lambda: build_model("hrnet_tiny", width=4), train_set, schedule=schedule(), spec=TINY,
                   out_dir=tmp_path, loss_fn=Stages(), device=CPU, evaluate_fn=evaluate, resume=resume,
                   max_steps_per_epoch=1, best_from_epoch=best_from_epoch)

    def interrupting(model):
        if len(aps) == 2:
            raise KeyboardInterrupt
        return {"AP": aps.pop(0)}

    with pytest.raises(KeyboardInterrupt):
        run(0, interrupting)
    assert read_checkpoint(tmp_path / "best.pth").extra["epoch"] == 1
    summary = run(1, lambda m: {"AP": aps.pop(0)}, resume=True)
    assert (summary["best_epoch"], summary["best_stage"], summary["best_ap"]) == (3, "late", 0.3)


def test_a_resume_whose_teacher_store_changed_is_refused(train_set, tmp_path):
    store = {"url": "cache/a.zarr", "settings_digest": "0123", "teachers": {"pt": "aaaa", "st": "bbbb"}}
    summary = tiny_fit(train_set, tmp_path, schedule(epochs=1), evaluate_fn=lambda m: {"AP": 0.1},
                       provenance=store, milestones={1: "stage_one"})
    for name in ("last.pth", "best.pth", "stage_one.pth"):
        assert read_checkpoint(tmp_path / name).extra["provenance"] == store, name
    rebuilt = {**store, "teachers": {"pt": "cccc", "st": "bbbb"}}
    with pytest.raises(OdkdError, match=r"last\.pth: the teacher store changed since this run started "
                                        r"\(teachers\.pt 'aaaa' != 'cccc', run != now\)"):
        tiny_fit(train_set, tmp_path, schedule(epochs=1), resume=True, provenance=rebuilt)
    again = tiny_fit(train_set, tmp_path, schedule(epochs=1), resume=True, provenance=store)
    assert again["best_epoch"] == summary["best_epoch"] == 1


@pytest.mark.parametrize("toml, message", [
    ('[teachers.primary.train]\namp_dtype = "fp32"', r"teachers\.primary\.train\.amp_dtype: 'fp32' is not one of "
                                                   r"fp16, bf16"),
    ("[student.train]\naccumulate = 1.5", r"student\.train\.accumulate: expected an integer"),
    ('[student]\nbest = "first"', r"student\.best: 'first' is not one of last_stage, run"),
])
def test_bad_train_keys_are_one_line(toml, message):
    with pytest.raises(OdkdError, match=message):
        parse_config(toml)


def test_values_the_loop_refuses_and_bf16_without_a_scaler(train_set, tmp_path):
    for keys, message in (({"accumulate": 0}, r"train\.accumulate must be >= 1, got 0"),
                          ({"accumulate": 5}, r"train\.accumulate is 5 batches per step, but an epoch has 4 batch"),
                          ({"clip_grad": -1.0}, r"train\.clip_grad must be >= 0"),
                          ({"ema_momentum": 1.5}, r"train\.ema_momentum must be between 0 and 1")):
        with pytest.raises(OdkdError, match=message):
            tiny_fit(train_set, tmp_path / "run", schedule(**keys))
        assert not (tmp_path / "run").exists()
    model = build_model("hrnet_tiny", width=4)
    for amp_dtype, scaled in (("fp16", True), ("bf16", False)):
        state = new_state(model, schedule(amp_dtype=amp_dtype), lambda step: 1.0, True, CPU)
        assert state.scaler.is_enabled() == scaled, amp_dtype




DDP_PROBE = """
import sys
import torch
from odkd.config import ScheduleConfig, load_config
from odkd.data.dataset import TopDownDataset
from odkd.data.instances import load_instances
from odkd.models import build_model
from odkd.models.losses import joints_mse_loss, mask_loss
from odkd.train.distributed import start_ranks, stop_ranks
from odkd.train.loop import ModelSpec, fit

class KeypointsThenMask:
    # epoch 1 learns keypoints alone, so the seg head sits idle; epoch 2 adds the mask
    def begin_epoch(self, epoch):
        self.with_mask = epoch > 0
        return {"stage": "mask" if self.with_mask else "keypoints"}
    def idle_modules(self, model):
        return [] if self.with_mask else [model.seg_head]
    def __call__(self, output, batch):
        heatmaps, mask_logits = output
        kpt = joints_mse_loss(heatmaps, batch["heatmaps"], batch["target_weight"])
        if not self.with_mask:
            return kpt, {"kpt_loss": kpt.detach()}
        seg = mask_loss(mask_logits, batch["mask"], "bce")
        return kpt + 0.01 * seg, {"kpt_loss": kpt.detach(), "seg_loss": seg.detach()}

cfg = load_config(sys.argv[1])
ranks, device = start_ranks(torch.device("cpu"))
train_set = TopDownDataset(load_instances(cfg.data, "train"), cfg.data, train=True, with_mask=True)
fit(lambda: build_model("hrnet_tiny", seg_head=True, width=4), train_set,
    schedule=ScheduleConfig(epochs=2, batch_size=2, workers=0, amp=False, accumulate=2),
    spec=ModelSpec("hrnet_tiny", {"width": 4}, True), out_dir=sys.argv[2], loss_fn=KeypointsThenMask(),
    device=device, max_steps_per_epoch=2, milestones={1: "keypoints", 2: "mask"}, ranks=ranks)
stop_ranks(ranks)
"""


def test_ddp_freezes_what_a_stage_leaves_idle_and_searches_for_no_unused_parameters(data_cfg, tmp_path):
    """Real gloo, 2 processes, 2 batches a step: the seg head frozen in the keypoint stage and trained
    in the mask stage, no torch warning about find_unused_parameters, the ranks in sync after both."""
    config = tmp_path / "p.toml"
    config.write_text(f'[data]\nroot = "{data_cfg.root}"\ninput_size = [96, 128]\nheatmap_size = [24, 32]\n')
    probe = tmp_path / "probe.py"
    probe.write_text(DDP_PROBE)
    torchrun = Path(sys.executable).with_name("torchrun")
    proc = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", "2", str(probe), str(config),
                           str(tmp_path / "ddp")], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "find_unused_parameters" not in proc.stderr, proc.stderr[-3000:]
    log = [json.loads(line) for line in (tmp_path / "ddp" / "log.jsonl").read_text().splitlines()]
    assert [(r["stage"], r["ranks_in_sync"]) for r in log] == [("keypoints", True), ("mask", True)]
    assert "seg_loss" in log[1] and "seg_loss" not in log[0]
    torch.manual_seed(0)  # the loop's seed: the initial weights
    initial = dict(build_model("hrnet_tiny", seg_head=True, width=4).named_parameters())
    seg = [k for k in initial if k.startswith("seg_head.")]
    after = {stage: read_checkpoint(tmp_path / "ddp" / f"{stage}.pth").state_dict for stage in ("keypoints", "mask")}
    assert seg and all(torch.equal(after["keypoints"][k], initial[k]) for k in seg)
    assert not any(torch.equal(after["keypoints"][k], initial[k]) for k in initial if not k.startswith("seg_head."))
    assert any(not torch.equal(after["mask"][k], initial[k]) for k in seg)


@pytest.fixture(scope="module")
def student_world(tmp_path_factory) -> Path:
    """test_student's world: 16 train instances, two tiny teachers and their store."""
    base = make_tiny_world(tmp_path_factory.mktemp("best"), val_images=2)
    build_cache(parse_config(student_toml(base)), "train", scheduler="synchronous", progress=False)
    return base


@pytest.mark.parametrize("best, epoch, stage", [("last_stage", 2, "senior"), ("run", 1, "primary")])
def test_train_student_says_which_stage_and_epoch_best_pth_is(student_world, tmp_path, best, epoch, stage):
    """The tiny students score AP 0 at every epoch: the first epoch [student] best allows is best.pth."""
    config = tmp_path / "p.toml"
    config.write_text(student_toml(student_world, stages=TWO_STAGES.replace("epochs = 2", "epochs = 1"),
                                   student=f'best = "{best}"'))
    result = CliRunner().invoke(main, ["train-student", "--config", str(config), "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout[result.stdout.index("{\n"):])
    assert (summary["best_epoch"], summary["best_stage"]) == (epoch, stage)
    meta = read_checkpoint(summary["best"]).extra
    assert (meta["epoch"], meta["stage"]) == (epoch, stage)
