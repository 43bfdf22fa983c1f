"""The one training loop, for teachers and students alike.

Adam, a step or cosine schedule with linear warmup (stepped per iteration), AMP and channels-last
on CUDA, a tqdm bar with loss and images/s, a JSONL log, `last.pth` after every epoch (weights plus
optimizer, scheduler, scaler, RNG states, epoch and the run's schedule) and `best.pth` by val AP
(weights and metadata only: it is what every later command reads). Data order and augmentation
are functions of (seed, epoch, index), so `--resume` from `last.pth` continues exactly where an
uninterrupted run would be (bit for bit on CPU; CUDA kernels are not bit-deterministic).

`fit` reads as: build or restore the state, then per epoch: train one epoch, evaluate, save.
What is learned is the objective's business: a callable (model output, batch) -> (loss, parts),
which may also have `begin_epoch(epoch) -> dict` to switch stages and add fields to the log.
Under torchrun the model is wrapped in DistributedDataParallel, each rank takes its share of
every epoch, and only rank 0 evaluates and writes.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from odkd.cache.schema import first_difference
from odkd.data.dataset import EpochSampler, TopDownDataset, make_loader
from odkd.errors import OdkdError
from odkd.models import read_checkpoint, save_checkpoint
from odkd.train.distributed import Ranks, barrier, ranks_in_sync

LossFn = Callable[[tuple, dict], tuple[torch.Tensor, dict[str, float]]]
EvalFn = Callable[[torch.nn.Module], dict[str, float]]
LrFactor = Callable[[int], Callable[[int], float]]  # steps per epoch -> (iteration -> lr factor)
COUNT_PREFIX = "n_"  # parts named n_* are counts: summed over the epoch, not averaged


@dataclass(frozen=True)
class ModelSpec:
    """How to rebuild the model from its checkpoint alone."""

    name: str
    args: dict
    seg_head: bool
    input_size: tuple[int, int] | None = dataclasses.field(default=None, compare=False)  # recorded for export

    def __str__(self) -> str:
        return f"{self.name} {self.args}" + (" + seg head" if self.seg_head else "")


def lr_multiplier(schedule, steps_per_epoch: int) -> Callable[[int], float]:
    """LambdaLR factor per iteration: linear warmup, then HRNet's epoch steps or a cosine decay."""
    warmup = int(round(schedule.warmup_epochs * steps_per_epoch))
    total = max(1, schedule.epochs * steps_per_epoch)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if schedule.schedule == "cosine":
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        epoch = step // steps_per_epoch
        return schedule.lr_factor ** sum(epoch >= s for s in schedule.lr_steps)

    return factor


def schedule_signature(schedule) -> dict:
    """What a resumed run must share with the run it continues, besides the model."""
    return {"epochs": schedule.epochs, "batch_size": schedule.batch_size, "lr": schedule.lr,
            "schedule": schedule.schedule, "lr_steps": list(schedule.lr_steps), "lr_factor": schedule.lr_factor,
            "warmup_epochs": schedule.warmup_epochs, "weight_decay": schedule.weight_decay, "seed": schedule.seed}


def _rng_state() -> dict:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": list(random.getstate()),
    }


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


@dataclass
class TrainState:
    """Everything `last.pth` holds, live."""

    model: torch.nn.Module  # unwrapped: what is saved and evaluated
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    epoch: int = 0  # epochs finished
    best_ap: float = -1.0


def new_state(model: torch.nn.Module, schedule, lr_factor: Callable[[int], float], amp: bool,
              device: torch.device) -> TrainState:
    optimizer = torch.optim.Adam(model.parameters(), lr=schedule.lr, weight_decay=schedule.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    return TrainState(model, optimizer, scheduler, torch.amp.GradScaler(device.type, enabled=amp))


def restore_state(state: TrainState, last_path: Path, spec: ModelSpec, signature: dict) -> None:
    """Continue from `last_path`; a run of another model or another schedule is refused in one line."""
    ckpt = read_checkpoint(last_path)
    trained = ModelSpec(ckpt.meta.get("model"), ckpt.meta.get("model_args", {}), bool(ckpt.meta.get("seg_head")))
    if trained != spec:
        raise OdkdError(f"{last_path}: this run trains {trained} but the config asks for {spec}; "
                        f"resume it with its own config, or start a new run with another --out")
    changed = first_difference(ckpt.extra.get("signature", {}), signature)
    if changed:
        raise OdkdError(f"{last_path}: the schedule changed since this run started ({changed}, run != config); "
                        f"resume it with its own config, or start a new run with another --out")
    state.model.load_state_dict(ckpt.state_dict)
    state.optimizer.load_state_dict(ckpt.extra["optimizer"])
    state.scheduler.load_state_dict(ckpt.extra["scheduler"])
    state.scaler.load_state_dict(ckpt.extra["scaler"])
    _set_rng_state(ckpt.extra["rng"])
    state.epoch, state.best_ap = ckpt.extra["epoch"], ckpt.extra["best_ap"]


def save_weights(path: Path, state: TrainState, spec: ModelSpec, **meta) -> None:
    """The weights and what describes them: what best.pth and the stage checkpoints hold."""
    save_checkpoint(path, state.model, model_name=spec.name, model_args=spec.args, seg_head=spec.seg_head,
                    input_size=spec.input_size, extra={"epoch": state.epoch, "best_ap": state.best_ap, **meta})


def save_last(path: Path, state: TrainState, spec: ModelSpec, signature: dict) -> None:
    """Weights plus everything a resume needs."""
    save_weights(path, state, spec, optimizer=state.optimizer.state_dict(), scheduler=state.scheduler.state_dict(),
                 scaler=state.scaler.state_dict(), rng=_rng_state(), signature=signature)


def train_one_epoch(net: torch.nn.Module, state: TrainState, loader, loss_fn: LossFn, *, steps: int,
                    device: torch.device, amp: bool, desc: str) -> dict[str, float]:
    """One pass over `steps` batches; the mean of every loss part (counts summed) and images/s."""
    net.train()
    on_cuda = device.type == "cuda"
    sums: dict[str, float] = {}
    seen, t0 = 0, time.perf_counter()
    bar = tqdm(loader, total=steps, desc=desc, unit="it", leave=False)
    for it, batch in enumerate(bar):
        if it >= steps:
            break
        batch = _to_device(batch, device)
        images = batch["image"].contiguous(memory_format=torch.channels_last) if on_cuda else batch["image"]
        with torch.autocast(device.type, enabled=amp):
            output = net(images)
        loss, parts = loss_fn(output, batch)
        state.optimizer.zero_grad(set_to_none=True)
        state.scaler.scale(loss).backward()
        state.scaler.step(state.optimizer)
        state.scaler.update()
        state.scheduler.step()
        seen += images.shape[0]
        for k, v in {"loss": loss.item(), **parts}.items():
            sums[k] = sums.get(k, 0.0) + v
        bar.set_postfix(loss=f"{sums['loss'] / (it + 1):.5f}", img_s=f"{seen / (time.perf_counter() - t0):.0f}")
    bar.close()
    means = {k: v if k.startswith(COUNT_PREFIX) else v / max(1, steps) for k, v in sums.items()}
    return {**means, "lr": state.optimizer.param_groups[0]["lr"], "img_per_s": seen / (time.perf_counter() - t0)}


def fit(make_model: Callable[[], torch.nn.Module], train_set: TopDownDataset, *, schedule, spec: ModelSpec,
        out_dir: str | Path, loss_fn: LossFn, device: torch.device, evaluate_fn: EvalFn | None = None,
        resume: bool = False, max_steps_per_epoch: int | None = None, lr_factor: LrFactor | None = None,
        signature: dict | None = None, milestones: dict[int, str] | None = None,
        after_epoch: Callable[[Path], None] | None = None, ranks: Ranks = Ranks()) -> dict:
    """Train the model `make_model()` builds on `train_set` under `schedule` ([... .train] of the
    config); returns a summary.

    The model is built after seeding torch with `schedule.seed` (torch seeds itself randomly per
    process), so the seed fixes the initial weights too. Refuses to start over an existing run
    unless `resume`, and refuses to resume a run of another model or schedule (`signature`, by
    default the schedule's keys). `milestones` maps an epoch to a name: that epoch is evaluated
    and its weights kept as `NAME.pth` (the student's stage ends). `after_epoch(out_dir)` runs on
    rank 0 once an epoch is logged.
    """
    out_dir = Path(out_dir)
    last_path, best_path, log_path = out_dir / "last.pth", out_dir / "best.pth", out_dir / "log.jsonl"
    if last_path.exists() and not resume:
        raise OdkdError(f"{last_path}: a run already exists here; pass --resume to continue it or choose another --out")
    if resume and not last_path.exists():
        raise OdkdError(f"{last_path}: nothing to resume")
    signature = signature or schedule_signature(schedule)
    milestones = milestones or {}

    torch.manual_seed(schedule.seed)
    model = make_model().to(device)
    on_cuda = device.type == "cuda"
    if on_cuda:
        model.to(memory_format=torch.channels_last)
    sampler = EpochSampler(len(train_set), shuffle=True, seed=schedule.seed, rank=ranks.rank,
                           world_size=ranks.world_size)
    drop_last = len(sampler) >= schedule.batch_size
    steps = len(sampler) // schedule.batch_size if drop_last else 1
    if max_steps_per_epoch:
        steps = min(steps, max_steps_per_epoch)
    amp = schedule.amp and on_cuda
    state = new_state(model, schedule, (lr_factor or (lambda n: lr_multiplier(schedule, n)))(steps), amp, device)
    if resume:
        restore_state(state, last_path, spec, signature)
    net = model
    if ranks.distributed:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device] if on_cuda else None,
            # a stage may leave the seg head out of the loss
            find_unused_parameters=True)
    if ranks.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
    loader = make_loader(train_set, schedule.batch_size, schedule.workers, sampler=sampler, drop_last=drop_last)

    for epoch in range(state.epoch, schedule.epochs):
        sampler.set_epoch(epoch)
        begin = getattr(loss_fn, "begin_epoch", None)
        record = {"epoch": epoch + 1, **(begin(epoch) if begin else {})}
        record.update(train_one_epoch(net, state, loader, loss_fn, steps=steps, device=device, amp=amp,
                                      desc=f"epoch {epoch + 1}/{schedule.epochs}"))
        state.epoch = epoch + 1
        if ranks.distributed:
            record["ranks_in_sync"] = ranks_in_sync(model, ranks)
        evaluate_now = (state.epoch % schedule.eval_every == 0 or state.epoch == schedule.epochs
                        or state.epoch in milestones)
        if ranks.is_main:
            if evaluate_fn is not None and evaluate_now:
                stats = evaluate_fn(model)
                record.update(stats)
                if stats["AP"] > state.best_ap:
                    state.best_ap = stats["AP"]
                    save_weights(best_path, state, spec, val=stats)
                if state.epoch in milestones:
                    save_weights(out_dir / f"{milestones[state.epoch]}.pth", state, spec, val=stats)
            elif state.epoch in milestones:
                save_weights(out_dir / f"{milestones[state.epoch]}.pth", state, spec)
            save_last(last_path, state, spec, signature)
            with open(log_path, "a") as f:
                f.write(json.dumps(record) + "\n")
            tqdm.write(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()))
            if after_epoch is not None:
                after_epoch(out_dir)
        barrier(ranks)
    return {"out_dir": str(out_dir), "best_ap": state.best_ap, "last": str(last_path),
            "best": str(best_path) if best_path.exists() else None}
