"""torchrun's environment -> one process group, and the checks that keep its ranks honest.

`torchrun --nproc_per_node N -m odkd train-student ...` sets RANK, WORLD_SIZE and LOCAL_RANK; a
plain `odkd` run has none of them and trains in one process, with no process group at all.
"""

from __future__ import annotations

import os
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


def start_ranks(device: torch.device) -> tuple[Ranks, torch.device]:
    """The ranks torchrun launched this process into, with the process group started (gloo on CPU,
    nccl on CUDA), and this rank's device: cuda:LOCAL_RANK when training on CUDA."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Ranks(), device
    ranks = Ranks(int(os.environ["RANK"]), world_size, int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda":
        if torch.cuda.device_count() <= ranks.local_rank:
            raise OdkdError(f"rank {ranks.rank} wants cuda:{ranks.local_rank}, but this machine has "
                            f"{torch.cuda.device_count()} GPUs; lower --nproc_per_node")
        device = torch.device("cuda", ranks.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
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


def barrier(ranks: Ranks) -> None:
    if ranks.distributed:
        dist.barrier()
