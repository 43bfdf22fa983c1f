"""Loader throughput: workers started once for a run (odkd's loop) against workers started again every
epoch and every evaluation (the loop before), over the same epochs of the same dataset.

    .venv/bin/python bench/loader.py [--config pipeline/demo.toml] [--epochs 4] [--workers 1 2] [--rounds 2] [--record]

Each epoch is a pass over the train split's augmented samples plus one pass over val, as a run
that evaluates every epoch makes. Prints samples/s and the ratio; --record writes bench/RESULTS.md's
loader table.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cache import record, table  # noqa: E402  (bench/cache.py: RESULTS.md helpers)

from odkd.config import load_config  # noqa: E402

LOADER_SECTION = "## Loader workers: persistent against restarted (bench/loader.py)"
from odkd.data.dataset import EpochSampler, TopDownDataset, _seed_worker, make_loader  # noqa: E402
from odkd.data.instances import load_instances  # noqa: E402


def drain(loader) -> int:
    return sum(len(batch["index"]) for batch in loader)


def restarted_workers(train: TopDownDataset, val: TopDownDataset, batch: int, workers: int, epochs: int) -> float:
    """A new DataLoader (and new workers) for every epoch and every evaluation."""
    seen, t0 = 0, time.perf_counter()
    for epoch in range(epochs):
        sampler = EpochSampler(len(train), shuffle=True, seed=0)
        sampler.set_epoch(epoch)
        seen += drain(DataLoader(train, batch_size=batch, sampler=sampler, num_workers=workers,
                                 worker_init_fn=_seed_worker, persistent_workers=False))
        seen += drain(DataLoader(val, batch_size=batch, num_workers=workers, worker_init_fn=_seed_worker,
                                 persistent_workers=False))
    return seen / (time.perf_counter() - t0)


def persistent_workers(train: TopDownDataset, val: TopDownDataset, batch: int, workers: int, epochs: int) -> float:
    """One loader per split for the whole run, as odkd's loop and ModelEvaluator keep them."""
    seen, t0 = 0, time.perf_counter()
    sampler = EpochSampler(len(train), shuffle=True, seed=0)
    train_loader = make_loader(train, batch, workers, sampler=sampler)
    val_loader = make_loader(val, batch, workers)
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        seen += drain(train_loader) + drain(val_loader)
    return seen / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=None)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--record", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cfg = load_config(args.config)
    train = TopDownDataset(load_instances(cfg.data, "train"), cfg.data, train=True, with_mask=True)
    val = TopDownDataset(load_instances(cfg.data, "val"), cfg.data, train=False)
    rows = []
    for workers in args.workers:
        # alternating rounds, best of each kept: other load on a shared machine comes and goes
        old, new = 0.0, 0.0
        for _ in range(args.rounds):
            old = max(old, restarted_workers(train, val, args.batch, workers, args.epochs))
            new = max(new, persistent_workers(train, val, args.batch, workers, args.epochs))
        rows.append([str(workers), f"{old:,.0f}", f"{new:,.0f}", f"{new / old:.2f}x"])
    text = table(["workers", "restarted per epoch + eval: samples/s", "persistent: samples/s", "persistent / restarted"],
                 rows)
    print(f"{len(train)} train + {len(val)} val samples an epoch, {args.epochs} epochs, batch {args.batch}")
    print(text)
    if args.record:
        command = " ".join([".venv/bin/python bench/loader.py", *sys.argv[1:]])
        record(f"`{command}` (2 shared CPU cores)\n\n{text}", LOADER_SECTION)


if __name__ == "__main__":
    main()
