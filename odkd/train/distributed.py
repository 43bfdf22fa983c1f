"""torchrun's environment -> one process group, and the checks that keep its ranks honest.

`torchrun --nproc_per_node N -m odkd train-student ...` sets RANK, WORLD_SIZE and LOCAL_RANK; a
plain `odkd` run has none of them and trains in one process, with no process group at all.

A run's checks come before its process group: each rank makes them, then the ranks agree on the outcome
through torchrun's rendezvous store (`agree_on_checks`), and only when every rank passed does the group
start. A failure on any rank stops every rank with the same error, which rank 0 alone prints, and the
same exit code.
"""

from __future__ import annotations

import itertools
import os
import signal
import threading
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from odkd.errors import OdkdError


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def launched_ranks() -> Ranks:
    """The ranks torchrun launched this process into, from its environment alone: no process group."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Ranks()
    return Ranks(int(os.environ["RANK"]), world_size, int(os.environ.get("LOCAL_RANK", "0")))


def rank_device(ranks: Ranks, device: torch.device) -> torch.device:
    """This rank's device: cuda:LOCAL_RANK when training on CUDA under torchrun, else `device`."""
    if not ranks.distributed or device.type != "cuda":
        return device
    if torch.cuda.device_count() <= ranks.local_rank:
        raise OdkdError(f"rank {ranks.rank} wants cuda:{ranks.local_rank}, but this machine has "
                        f"{torch.cuda.device_count()} GPUs; lower --nproc_per_node")
    return torch.device("cuda", ranks.local_rank)


class FailedOnARank(OdkdError):
    """What every rank raises when a check before training failed on any rank: the first failure in
    rank order. `shown_here`: whether this rank prints it (rank 0); the others exit in silence with
    the same code, so the user reads the line once."""

    def __init__(self, message: str, shown_here: bool):
        super().__init__(message)
        self.shown_here = shown_here


_PASSED = "passed"
_FAILED = "failed: "
_ROUNDS = itertools.count()  # every rank agrees as often as the others, in the same order (ablate: once a run)


def agree_on_checks(ranks: Ranks, failure: OdkdError | None):
    """Every rank calls this once a run, after its checks and before the process group starts, with the
    error its checks raised (or None). In one process the error is raised as it is. Under torchrun
    the ranks exchange their outcomes through the launcher's rendezvous store: if any rank failed,
    every rank raises FailedOnARank with the first failure in rank order (another rank's named as
    such), which only rank 0 prints, and from then on ignores SIGTERM, which torchrun sends to the
    ranks still running once the first one exits, so that every rank exits with odkd's code, none
    by a signal. Returns the store (for start_ranks) when every rank passed; None in one process.
    """
    if not ranks.distributed:
        if failure is not None:
            raise failure
        return None
    store, _, _ = next(dist.rendezvous("env://", ranks.rank, ranks.world_size))
    # a torchrun restart meets the same store, and so does a second run in this process: other keys
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    checks = dist.PrefixStore(f"odkd/checks/{restart}/{next(_ROUNDS)}", store)
    checks.set(str(ranks.rank), _PASSED if failure is None else _FAILED + str(failure))
    keys = [str(rank) for rank in range(ranks.world_size)]
    checks.wait(keys)
    outcomes = [checks.get(key).decode() for key in keys]
    failed = [(rank, outcome.removeprefix(_FAILED)) for rank, outcome in enumerate(outcomes) if outcome != _PASSED]
    if not failed:
        return store
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # where rank 0 serves the store itself (a launcher without torchrun's agent), it stays until all have read
    checks.add("read", 1)
    while ranks.is_main and checks.add("read", 0) < ranks.world_size:
        time.sleep(0.01)
    rank, message = failed[0]
    if rank != 0 and not message.startswith(f"rank {rank} "):
        message = f"rank {rank}: {message}"
    raise FailedOnARank(message, shown_here=ranks.is_main)


def start_ranks(device: torch.device, store=None) -> tuple[Ranks, torch.device]:
    """The ranks torchrun launched this process into, with the process group started (gloo on CPU,
    nccl on CUDA) on `store` (agree_on_checks's) or torchrun's environment, and this rank's device:
    cuda:LOCAL_RANK when training on CUDA."""
    ranks = launched_ranks()
    if not ranks.distributed:
        return ranks, device
    device = rank_device(ranks, device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if store is None:
            dist.init_process_group(backend)
        else:  # what init_process_group does with torchrun's environment, on the store already reached
            dist.init_process_group(backend, store=dist.PrefixStore("default_pg", store), rank=ranks.rank,
                                    world_size=ranks.world_size)
    return ranks, device


def stop_ranks(ranks: Ranks) -> None:
    if ranks.distributed and dist.is_initialized():
        dist.destroy_process_group()


def ranks_in_sync(model: torch.nn.Module, ranks: Ranks) -> bool:
    """Whether every rank holds bit-identical weights (a sum and a position-weighted sum of every
    parameter, gathered from every rank); always True in one process. BatchNorm's running stats are
    left out: each rank updates its own until DDP broadcasts rank 0's at the next forward."""
    if not ranks.distributed:
        return True
    total = torch.zeros(2, dtype=torch.float64)
    for i, tensor in enumerate(model.parameters()):
        values = tensor.detach().double().flatten().cpu()
        total[0] += values.sum()
        total[1] += (values * (i + 1)).sum()
    device = next(model.parameters()).device
    gathered = [torch.zeros(2, dtype=torch.float64, device=device) for _ in range(ranks.world_size)]
    dist.all_gather(gathered, total.to(device))
    return all(torch.equal(g, gathered[0]) for g in gathered)


def sum_over_ranks(values: dict[str, float], ranks: Ranks) -> dict[str, float]:
    """Each value summed over every rank (counts of what each rank's share held); as it is in one process."""
    if not ranks.distributed:
        return values
    gathered: list[dict | None] = [None] * ranks.world_size
    dist.all_gather_object(gathered, values)
    return {key: sum(g.get(key, 0) for g in gathered) for key in values}


def barrier(ranks: Ranks) -> None:
    if ranks.distributed:
        dist.barrier()
