"""Data-parallel training under `torchrun`: process group, rank roles, and the few collectives we use.

`torchrun --nproc_per_node N -m harness run FILE` (or `harness run FILE --nproc N`) starts N processes;
each trains every run's model wrapped in DistributedDataParallel on its shard of the batches. Rank 0
alone talks to MLflow and writes checkpoints; metrics are computed from every rank's predictions.
CPU uses the gloo backend, CUDA uses NCCL with one GPU per local rank.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


SINGLE = DistContext()


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_env(device_type: str) -> DistContext:
    """Join the process group torchrun describes in the environment (a no-op for one process)."""
    if not launched_by_torchrun():
        return SINGLE
    context = DistContext(
        rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
    )
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        if device_type == "cuda":
            torch.cuda.set_device(context.local_rank)
        dist.init_process_group(backend=backend)
    return context


def shutdown(context: DistContext) -> None:
    """Leave the process group once every rank is done. A rank that exits first closes its connections
    under the others, and gloo then aborts them ("terminate called without an active exception")."""
    if context.enabled and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def barrier(context: DistContext) -> None:
    if context.enabled:
        dist.barrier()


def broadcast(value: Any, context: DistContext) -> Any:
    """Rank 0's value on every rank (any picklable object)."""
    if not context.enabled:
        return value
    box = [value if context.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_cat(tensor: torch.Tensor, context: DistContext) -> torch.Tensor:
    """Concatenate every rank's tensor (rank order) on every rank; shapes may differ along dim 0."""
    if not context.enabled:
        return tensor
    parts: list[Any] = [None] * context.world_size
    dist.all_gather_object(parts, tensor.cpu())
    return torch.cat(parts)


def mean_over_ranks(value: float, weight: float, context: DistContext) -> float:
    """Weighted mean of a per-rank scalar."""
    if not context.enabled:
        return value
    packed = torch.tensor([value * weight, weight], dtype=torch.float64)
    dist.all_reduce(packed)
    return float(packed[0] / packed[1]) if packed[1] > 0 else 0.0
