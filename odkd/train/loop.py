"""The one training loop, for teachers and students alike.

Adam, a step or cosine schedule with linear warmup (stepped per iteration), AMP and
channels-last on CUDA, a tqdm bar with loss and images/s, a JSONL log, `last.pth` after every
epoch (model, optimizer, scheduler, scaler, RNG states, epoch) and `best.pth` by val AP.
Data order and augmentation are functions of (seed, epoch, index), so `--resume` from
`last.pth` continues exactly where an uninterrupted run would be.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from odkd.data.dataset import TopDownDataset, make_loader
from odkd.errors import OdkdError
from odkd.models import read_checkpoint, save_checkpoint

LossFn = Callable[[tuple, dict], tuple[torch.Tensor, dict[str, float]]]
EvalFn = Callable[[torch.nn.Module], dict[str, float]]


@dataclass(frozen=True)
class ModelSpec:
    """How to rebuild the model from its checkpoint alone."""

    name: str
    args: dict
    seg_head: bool

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


def fit(make_model: Callable[[], torch.nn.Module], train_set: TopDownDataset, *, schedule, spec: ModelSpec,
        out_dir: str | Path, loss_fn: LossFn, device: torch.device, evaluate_fn: EvalFn | None = None,
        resume: bool = False, max_steps_per_epoch: int | None = None) -> dict:
    """Train the model `make_model()` builds on `train_set` under `schedule` ([... .train] of the
    config); returns a summary.

    The model is built after seeding torch with `schedule.seed` (torch seeds itself randomly per
    process), so the seed fixes the initial weights too. Refuses to start over an existing run
    unless `resume`, so finished work is never overwritten.
    """
    out_dir = Path(out_dir)
    last_path, best_path, log_path = out_dir / "last.pth", out_dir / "best.pth", out_dir / "log.jsonl"
    if last_path.exists() and not resume:
        raise OdkdError(f"{last_path}: a run already exists here; pass --resume to continue it or choose another --out")
    if resume and not last_path.exists():
        raise OdkdError(f"{last_path}: nothing to resume")
    out_dir.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(schedule.seed)
    model = make_model()
    on_cuda = device.type == "cuda"
    model.to(device)
    if on_cuda:
        model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=schedule.lr, weight_decay=schedule.weight_decay)
    drop_last = len(train_set) >= schedule.batch_size
    steps = len(train_set) // schedule.batch_size if drop_last else 1
    if max_steps_per_epoch:
        steps = min(steps, max_steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier(schedule, steps))
    amp = schedule.amp and on_cuda
    scaler = torch.amp.GradScaler(device.type, enabled=amp)

    start_epoch, best_ap = 0, -1.0
    if resume:
        ckpt = read_checkpoint(last_path)
        trained = ModelSpec(ckpt.meta.get("model"), ckpt.meta.get("model_args", {}), bool(ckpt.meta.get("seg_head")))
        if trained != spec:
            raise OdkdError(f"{last_path}: this run trains {trained} but the config asks for {spec}; "
                            f"resume it with its own config, or start a new run with another --out")
        model.load_state_dict(ckpt.state_dict)
        optimizer.load_state_dict(ckpt.extra["optimizer"])
        scheduler.load_state_dict(ckpt.extra["scheduler"])
        scaler.load_state_dict(ckpt.extra["scaler"])
        _set_rng_state(ckpt.extra["rng"])
        start_epoch, best_ap = ckpt.extra["epoch"], ckpt.extra["best_ap"]

    def save(path: Path, epoch: int) -> None:
        save_checkpoint(path, model, model_name=spec.name, model_args=spec.args, seg_head=spec.seg_head, extra={
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
            "rng": _rng_state(), "epoch": epoch, "best_ap": best_ap,
        })

    for epoch in range(start_epoch, schedule.epochs):
        train_set.set_epoch(epoch)
        loader = make_loader(train_set, schedule.batch_size, schedule.workers, shuffle=True,
                             seed=schedule.seed * 100_003 + epoch, drop_last=drop_last)
        model.train()
        sums: dict[str, float] = {}
        seen, t0 = 0, time.perf_counter()
        bar = tqdm(loader, total=steps, desc=f"epoch {epoch + 1}/{schedule.epochs}", unit="it", leave=False)
        for it, batch in enumerate(bar):
            if it >= steps:
                break
            batch = _to_device(batch, device)
            images = batch["image"].contiguous(memory_format=torch.channels_last) if on_cuda else batch["image"]
            with torch.autocast(device.type, enabled=amp):
                output = model(images)
            loss, parts = loss_fn(output, batch)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            seen += images.shape[0]
            for k, v in {"loss": loss.item(), **parts}.items():
                sums[k] = sums.get(k, 0.0) + v
            bar.set_postfix(loss=f"{sums['loss'] / (it + 1):.5f}", img_s=f"{seen / (time.perf_counter() - t0):.0f}")
        bar.close()
        record = {"epoch": epoch + 1, **{k: v / max(1, steps) for k, v in sums.items()},
                  "lr": optimizer.param_groups[0]["lr"], "img_per_s": seen / (time.perf_counter() - t0)}
        if evaluate_fn is not None and ((epoch + 1) % schedule.eval_every == 0 or epoch + 1 == schedule.epochs):
            stats = evaluate_fn(model)
            record.update(stats)
            if stats["AP"] > best_ap:
                best_ap = stats["AP"]
                save(best_path, epoch + 1)
        save(last_path, epoch + 1)
        with open(log_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        tqdm.write(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()))
    return {"out_dir": str(out_dir), "best_ap": best_ap, "last": str(last_path),
            "best": str(best_path) if best_path.exists() else None}
