"""The one training loop, for teachers and students alike.

Adam, a step or cosine schedule with linear warmup (stepped per optimizer step), AMP (fp16 or
bf16) and channels-last on CUDA, optional gradient clipping, gradient accumulation, EMA weights
and torch.compile, a tqdm bar with loss and images/s, a JSONL log, `last.pth` after every epoch
(weights, EMA weights, optimizer, scheduler, scaler, RNG states, epoch and the run's schedule) and
`best.pth` by val AP, or PCK for a keypoint set without OKS sigmas (weights and metadata only: it is
what every later command reads). Data order and augmentation are functions of (seed, epoch, index),
so `--resume` from `last.pth` continues exactly where an uninterrupted run would be (bit for bit on
CPU; CUDA kernels are not bit-deterministic).

`fit` reads as: build or restore the state, then per epoch: train one epoch, evaluate, save.
What is learned is the objective's business: a callable (model output, batch) -> (loss, parts),
the parts floats or 0-dim tensors, which may also have `begin_epoch(epoch) -> dict` to switch
stages and add fields to the log, and `idle_modules(model)` to name the modules the current
stage leaves out of the loss. Under torchrun the model is wrapped in DistributedDataParallel,
each rank takes its share of every epoch, and only rank 0 evaluates and writes; the counts of its
log line (n_*) are summed over the ranks, the rest is rank 0's.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import random
import time
from collections.abc import Callable
from contextlib import nullcontext
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from odkd.config import ScheduleConfig
from odkd.data.dataset import EpochSampler, LabeledAndUnlabeled, TopDownDataset, make_loader
from odkd.dicts import first_difference
from odkd.errors import OdkdError
from odkd.models import CheckpointFile, read_checkpoint, save_checkpoint
from odkd.train.distributed import Ranks, barrier, ranks_in_sync, sum_over_ranks

LossFn = Callable[[tuple, dict], tuple[torch.Tensor, dict[str, float | torch.Tensor]]]
EvalFn = Callable[[torch.nn.Module], dict[str, float]]
LrFactor = Callable[[int], Callable[[int], float]]  # steps per epoch -> (iteration -> lr factor)
COUNT_PREFIX = "n_"  # parts named n_* are counts: summed over the epoch, not averaged
AMP_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
EMA_GAMMA = 2000  # mmdet's ExpMomentumEMA default, as RTMPose trains
POSTFIX_EVERY = 10  # steps between tqdm postfix updates: reading the loss back waits for the device

log = logging.getLogger(__name__)


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
            "warmup_epochs": schedule.warmup_epochs, "weight_decay": schedule.weight_decay, "seed": schedule.seed,
            "clip_grad": schedule.clip_grad, "accumulate": schedule.accumulate, "amp_dtype": schedule.amp_dtype,
            "ema": schedule.ema, "ema_momentum": schedule.ema_momentum, "compile": schedule.compile}


def check_schedule(schedule) -> None:
    """The [... .train] values no type check rules out, refused in one line."""
    if schedule.accumulate < 1:
        raise OdkdError(f"train.accumulate must be >= 1, got {schedule.accumulate}")
    if schedule.clip_grad < 0:
        raise OdkdError(f"train.clip_grad must be >= 0 (0: off), got {schedule.clip_grad}")
    if not 0 < schedule.ema_momentum < 1:
        raise OdkdError(f"train.ema_momentum must be between 0 and 1, got {schedule.ema_momentum}")


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


class WeightEMA:
    """mmdet's ExpMomentumEMA, as RTMPose trains: after every optimizer step the averaged weights move
    towards the model's by (1 - m) * exp(-(1 + step) / gamma) + m, a momentum that anneals from ~1 to
    m over a few gamma steps; buffers (BatchNorm's running statistics) are copied, not averaged."""

    def __init__(self, model: torch.nn.Module, momentum: float, gamma: int = EMA_GAMMA):
        self.module = copy.deepcopy(model).requires_grad_(False)
        self.momentum, self.gamma, self.steps = momentum, gamma, 0

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        m = 1.0 if self.steps == 0 else (
            (1 - self.momentum) * math.exp(-(1 + self.steps) / self.gamma) + self.momentum)
        averaged = list(self.module.parameters())
        torch._foreach_mul_(averaged, 1 - m)
        torch._foreach_add_(averaged, list(model.parameters()), alpha=m)
        buffers = list(self.module.buffers())
        if buffers:  # the foreach kernels refuse an empty list
            torch._foreach_copy_(buffers, list(model.buffers()))
        self.steps += 1

    def state_dict(self) -> dict:
        return {"weights": self.module.state_dict(), "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["weights"])
        self.steps = state["steps"]


@dataclass
class TrainState:
    """Everything `last.pth` holds, live."""

    model: torch.nn.Module  # unwrapped: what is trained, saved and evaluated
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    schedule: ScheduleConfig
    ema: WeightEMA | None = None
    provenance: dict | None = None  # where the run's targets came from; a resume must find the same
    epoch: int = 0  # epochs finished
    best_ap: float = -1.0  # the best val stat best.pth is kept by: AP, or PCK (fit's best_by); best_ap in files
    best_epoch: int | None = None  # the epoch best.pth holds; None before there is one (or in a run from before)
    best_stage: str | None = None

    @property
    def product(self) -> torch.nn.Module:
        """The weights that are evaluated and kept as best.pth and the stage checkpoints."""
        return self.ema.module if self.ema else self.model


def new_state(model: torch.nn.Module, schedule, lr_factor: Callable[[int], float], amp: bool,
              device: torch.device, provenance: dict | None = None) -> TrainState:
    optimizer = torch.optim.Adam(model.parameters(), lr=schedule.lr, weight_decay=schedule.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    # bf16 keeps fp32's exponent range: its gradients need no scaling
    scaler = torch.amp.GradScaler(device.type, enabled=amp and schedule.amp_dtype == "fp16")
    ema = WeightEMA(model, schedule.ema_momentum) if schedule.ema else None
    return TrainState(model, optimizer, scheduler, scaler, schedule, ema, provenance)


def check_run_folder(out_dir: Path, resume: bool) -> None:
    """A new run needs a folder without a run in it; a resumed one needs its last.pth. Callable before a
    run prepares anything, so that a refusal comes before anything is written."""
    last_path = Path(out_dir) / "last.pth"
    if last_path.exists() and not resume:
        raise OdkdError(f"{last_path}: a run already exists here; pass --resume to continue it or choose another --out")
    if resume and not last_path.exists():
        raise OdkdError(f"{last_path}: nothing to resume")


def refuse_another_run(last_path: Path, spec: ModelSpec, signature: dict, provenance: dict | None) -> CheckpointFile:
    """`last_path`'s checkpoint, if a resume may continue it: a run of another model, another schedule
    or other targets is refused in one line. Callable before a run prepares anything it would waste."""
    ckpt = read_checkpoint(last_path)
    trained = ModelSpec(ckpt.meta.get("model"), ckpt.meta.get("model_args", {}), bool(ckpt.meta.get("seg_head")))
    if trained != spec:
        raise OdkdError(f"{last_path}: this run trains {trained} but the config asks for {spec}; "
                        f"resume it with its own config, or start a new run with another --out")
    # a run started before a [... .train] key existed ran with its default
    run_signature = {**schedule_signature(ScheduleConfig()), **ckpt.extra.get("signature", {})}
    changed = first_difference(run_signature, signature)
    if changed:
        raise OdkdError(f"{last_path}: the schedule changed since this run started ({changed}, run != config); "
                        f"resume it with its own config, or start a new run with another --out")
    run_provenance = ckpt.extra.get("provenance")
    changed = run_provenance is not None and first_difference(run_provenance, provenance or {})
    if changed:
        raise OdkdError(f"{last_path}: the teacher store changed since this run started ({changed}, run != now); "
                        f"resume it with the store it started from, or start a new run with another --out")
    return ckpt


def restore_state(state: TrainState, last_path: Path, spec: ModelSpec, signature: dict) -> None:
    """Continue from `last_path`, refused in one line when it is another run (refuse_another_run)."""
    ckpt = refuse_another_run(last_path, spec, signature, state.provenance)
    state.model.load_state_dict(ckpt.state_dict)
    state.optimizer.load_state_dict(ckpt.extra["optimizer"])
    state.scheduler.load_state_dict(ckpt.extra["scheduler"])
    state.scaler.load_state_dict(ckpt.extra["scaler"])
    if state.ema:
        state.ema.load_state_dict(ckpt.extra["ema"])
    _set_rng_state(ckpt.extra["rng"])
    state.epoch, state.best_ap = ckpt.extra["epoch"], ckpt.extra["best_ap"]
    state.best_epoch, state.best_stage = ckpt.extra.get("best_epoch"), ckpt.extra.get("best_stage")


def save_weights(path: Path, weights: torch.nn.Module, state: TrainState, spec: ModelSpec, **meta) -> None:
    """`weights` and what describes them: what best.pth and the stage checkpoints hold."""
    save_checkpoint(path, weights, model_name=spec.name, model_args=spec.args, seg_head=spec.seg_head,
                    input_size=spec.input_size,
                    extra={"epoch": state.epoch, "best_ap": state.best_ap, "provenance": state.provenance, **meta})


def save_last(path: Path, state: TrainState, spec: ModelSpec, signature: dict) -> None:
    """The trained weights plus everything a resume needs."""
    save_weights(path, state.model, state, spec, optimizer=state.optimizer.state_dict(),
                 scheduler=state.scheduler.state_dict(), scaler=state.scaler.state_dict(),
                 ema=state.ema.state_dict() if state.ema else None, rng=_rng_state(), signature=signature,
                 best_epoch=state.best_epoch, best_stage=state.best_stage)


def data_parallel(model: torch.nn.Module, idle: list[torch.nn.Module] | None,
                  device: torch.device) -> torch.nn.parallel.DistributedDataParallel:
    """The model in DDP. Modules the objective names idle are frozen, so every rank's graph reaches
    every parameter DDP waits for; without a list, DDP looks for unused parameters every step."""
    if idle is not None:
        frozen = {id(p) for module in idle for p in module.parameters()}
        for p in model.parameters():
            p.requires_grad_(id(p) not in frozen)
    return torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device] if device.type == "cuda" else None, find_unused_parameters=idle is None)


def forward_net(model: torch.nn.Module, idle: list[torch.nn.Module] | None, schedule, device: torch.device,
                ranks: Ranks) -> torch.nn.Module:
    """What the batches go through: the model, in DDP under torchrun, compiled if the schedule says so.
    In one process idle modules simply get no gradient."""
    net = data_parallel(model, idle, device) if ranks.distributed else model
    return torch.compile(net) if schedule.compile else net


def train_one_epoch(net: torch.nn.Module, state: TrainState, loader, loss_fn: LossFn, *, steps: int,
                    device: torch.device, amp: bool, desc: str) -> dict[str, float]:
    """`steps` optimizer steps of `accumulate` batches each; the mean of every loss part per batch
    (counts summed), the mean gradient norm before clipping (when clipping) and images/s."""
    net.train()
    schedule, model = state.schedule, state.model
    on_cuda = device.type == "cuda"
    batches = steps * schedule.accumulate
    sums: dict[str, torch.Tensor] = {}

    def add(name: str, value) -> None:
        sums.setdefault(name, torch.zeros((), dtype=torch.float64, device=device)).add_(value)

    seen, t0 = 0, time.perf_counter()
    bar = tqdm(loader, total=batches, desc=desc, unit="it", leave=False)
    for it, batch in enumerate(bar):
        if it >= batches:
            break
        batch = _to_device(batch, device)
        images = batch["image"].contiguous(memory_format=torch.channels_last) if on_cuda else batch["image"]
        step_ends = (it + 1) % schedule.accumulate == 0
        # DDP averages the gradients once per optimizer step, not after every micro-batch
        with nullcontext() if step_ends or not hasattr(net, "no_sync") else net.no_sync():
            with torch.autocast(device.type, dtype=AMP_DTYPES[schedule.amp_dtype], enabled=amp):
                output = net(images)
            loss, parts = loss_fn(output, batch)
            state.scaler.scale(loss / schedule.accumulate).backward()
        if step_ends:
            if schedule.clip_grad > 0:
                state.scaler.unscale_(state.optimizer)
                norm = torch.nn.utils.clip_grad_norm_(model.parameters(), schedule.clip_grad)
                add("grad_norm", torch.where(norm.isfinite(), norm, 0.0))  # fp16's skipped steps left out
                add("grad_steps", norm.isfinite())
            state.scaler.step(state.optimizer)
            state.scaler.update()
            state.optimizer.zero_grad(set_to_none=True)
            state.scheduler.step()
            if state.ema:
                state.ema.update(model)
        seen += images.shape[0]
        for k, v in {"loss": loss.detach(), **parts}.items():
            add(k, v)
        if it % POSTFIX_EVERY == 0:
            bar.set_postfix(loss=f"{sums['loss'].item() / (it + 1):.5f}",
                            img_s=f"{seen / (time.perf_counter() - t0):.0f}")
    bar.close()
    totals = {k: v.item() for k, v in sums.items()}
    grad_steps = totals.pop("grad_steps", 0)
    means = {k: v if k.startswith(COUNT_PREFIX) else v / max(1, batches) for k, v in totals.items()}
    if "grad_norm" in totals:
        means["grad_norm"] = totals["grad_norm"] / max(1, grad_steps)
    return {**means, "lr": state.optimizer.param_groups[0]["lr"], "img_per_s": seen / (time.perf_counter() - t0)}


def fit(make_model: Callable[[], torch.nn.Module], train_set: TopDownDataset | LabeledAndUnlabeled, *, schedule,
        spec: ModelSpec, out_dir: str | Path, loss_fn: LossFn, device: torch.device, evaluate_fn: EvalFn | None = None,
        resume: bool = False, max_steps_per_epoch: int | None = None, lr_factor: LrFactor | None = None,
        signature: dict | None = None, milestones: dict[int, str] | None = None,
        after_epoch: Callable[[Path], None] | None = None, on_start: Callable[[Path], None] | None = None,
        best_from_epoch: int = 0, sampler: EpochSampler | None = None,
        provenance: dict | None = None, ranks: Ranks = Ranks(), best_by: str = "AP") -> dict:
    """Train the model `make_model()` builds on `train_set` under `schedule` ([... .train] of the
    config); returns a summary.

    The model is built after seeding torch with `schedule.seed` (torch seeds itself randomly per
    process), so the seed fixes the initial weights too. Refuses to start over an existing run
    unless `resume`, and refuses to resume a run of another model or schedule (`signature`, by
    default the schedule's keys) or of another `provenance` (recorded in every checkpoint).
    `milestones` maps an epoch to a name: that epoch is evaluated and its weights kept as
    `NAME.pth` (the student's stage ends). best.pth is the best by the val stat `best_by` (AP; PCK for a
    set without OKS sigmas) of the epochs from `best_from_epoch` (0-based) on. `after_epoch(out_dir)`
    runs on rank 0 once an epoch is logged, `on_start(out_dir)` once the run's checks pass and its
    folder exists. `sampler` orders each epoch (default: every sample of `train_set` once, shuffled,
    split over the ranks).
    """
    out_dir = Path(out_dir)
    last_path, best_path, log_path = out_dir / "last.pth", out_dir / "best.pth", out_dir / "log.jsonl"
    check_run_folder(out_dir, resume)
    check_schedule(schedule)
    signature = signature or schedule_signature(schedule)
    milestones = milestones or {}

    torch.manual_seed(schedule.seed)
    model = make_model().to(device)
    on_cuda = device.type == "cuda"
    if on_cuda:
        model.to(memory_format=torch.channels_last)
    sampler = sampler or EpochSampler(len(train_set), shuffle=True, seed=schedule.seed, rank=ranks.rank,
                                      world_size=ranks.world_size)
    drop_last = len(sampler) >= schedule.batch_size
    batches = len(sampler) // schedule.batch_size if drop_last else 1
    steps = batches // schedule.accumulate
    if steps == 0:
        raise OdkdError(f"train.accumulate is {schedule.accumulate} batches per step, but an epoch has "
                        f"{batches} batch(es) of {schedule.batch_size} per process; lower it")
    if max_steps_per_epoch:
        steps = min(steps, max_steps_per_epoch)
    amp = schedule.amp and on_cuda
    state = new_state(model, schedule, (lr_factor or (lambda n: lr_multiplier(schedule, n)))(steps), amp, device,
                      provenance)
    if resume:
        restore_state(state, last_path, spec, signature)
    idle_modules = getattr(loss_fn, "idle_modules", None)
    net, idle = None, None
    if ranks.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        if on_start:
            on_start(out_dir)
    loader = make_loader(train_set, schedule.batch_size, schedule.workers, sampler=sampler, drop_last=drop_last)

    for epoch in range(state.epoch, schedule.epochs):
        sampler.set_epoch(epoch)
        begin = getattr(loss_fn, "begin_epoch", None)
        record = {"epoch": epoch + 1, **(begin(epoch) if begin else {})}
        now_idle = idle_modules(model) if idle_modules else None
        if net is None or ranks.distributed and now_idle != idle:
            net, idle = forward_net(model, now_idle, schedule, device, ranks), now_idle
        parts = train_one_epoch(net, state, loader, loss_fn, steps=steps, device=device, amp=amp,
                                desc=f"epoch {epoch + 1}/{schedule.epochs}")
        # counts (n_*) are the whole run's, every rank's share summed; the rest is rank 0's
        parts.update(sum_over_ranks({k: v for k, v in parts.items() if k.startswith(COUNT_PREFIX)}, ranks))
        record.update(parts)
        state.epoch = epoch + 1
        if ranks.distributed:
            record["ranks_in_sync"] = ranks_in_sync(model, ranks)
        evaluate_now = (state.epoch % schedule.eval_every == 0 or state.epoch == schedule.epochs
                        or state.epoch in milestones)
        if ranks.is_main:
            stats = evaluate_fn(state.product) if evaluate_fn is not None and evaluate_now else None
            if stats is not None:
                record.update(stats)
                # a best kept before best_from_epoch (by a run resumed with another) gives way to any epoch after
                stale = state.best_epoch is not None and state.best_epoch <= best_from_epoch
                if state.epoch > best_from_epoch and (stats[best_by] > state.best_ap or stale):
                    state.best_ap, state.best_epoch, state.best_stage = stats[best_by], state.epoch, record.get("stage")
                    save_weights(best_path, state.product, state, spec, val=stats, stage=state.best_stage)
            if state.epoch in milestones:
                save_weights(out_dir / f"{milestones[state.epoch]}.pth", state.product, state, spec,
                             **({"val": stats} if stats is not None else {}))
            save_last(last_path, state, spec, signature)
            with open(log_path, "a") as f:
                f.write(json.dumps(record) + "\n")
            log.info(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()))
            if after_epoch is not None:
                after_epoch(out_dir)
        barrier(ranks)
    # best_ap, or best_pck for a run kept by PCK
    return {"out_dir": str(out_dir), f"best_{best_by.lower()}": state.best_ap, "best_epoch": state.best_epoch,
            "best_stage": state.best_stage, "last": str(last_path),
            "best": str(best_path) if best_path.exists() else None}
