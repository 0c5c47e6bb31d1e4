"""Process-group setup from the torchrun environment: the only module that reads RANK / WORLD_SIZE or calls
`init_process_group`. NCCL with CUDA, gloo on CPU; a single process needs no launcher."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup_distributed() -> DistInfo:
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    if world_size > 1 and not torch_dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        # The rendezvous itself is torchrun's; env:// reads MASTER_ADDR/PORT that torchrun exports.
        kwargs = dict(device_id=device) if device.type == "cuda" else {}
        torch_dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30), **kwargs)
    return DistInfo(rank, local_rank, world_size, device)


def barrier(dist: DistInfo) -> None:
    if dist.distributed:
        torch_dist.barrier()


def all_reduce_sum(tensor: torch.Tensor, dist: DistInfo) -> torch.Tensor:
    """Sum across ranks (counts, never per-rank means), on the tensor's own device."""
    if dist.distributed:
        torch_dist.all_reduce(tensor, op=torch_dist.ReduceOp.SUM)
    return tensor


def broadcast_object(value, dist: DistInfo):
    if not dist.distributed:
        return value
    holder = [value]
    torch_dist.broadcast_object_list(holder, src=0)
    return holder[0]


def cleanup(dist: DistInfo) -> None:
    if dist.distributed and torch_dist.is_initialized():
        torch_dist.destroy_process_group()
