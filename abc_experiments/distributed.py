"""Multi-process training with DistributedDataParallel, when started by ``torchrun``.

Without torchrun's environment (``WORLD_SIZE`` unset or 1) every method is a no-op and the run is a
plain single-process one. Under torchrun, rank 0 alone writes logs, TensorBoard events, checkpoints
and the pretrain cache; every rank trains on its shard of the data.
"""

from __future__ import annotations

import datetime
import os
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class DistributedContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device | None = None  # set under torchrun; None: the runner picks one

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def wrap(self, model: nn.Module) -> nn.Module | None:
        """The DDP-wrapped model for training steps, or None when not distributed."""
        if not self.active:
            return None
        ids = [self.local_rank] if self.device is not None and self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)

    def lock_on_main(self, lock_factory):
        """``lock_factory()`` on rank 0 only (the other ranks follow rank 0's decisions)."""
        return lock_factory() if self.is_main else nullcontext()

    def agree(self, flag: bool) -> bool:
        """Rank 0's value of ``flag`` on every rank."""
        if not self.active:
            return flag
        value = torch.tensor([int(flag)], device=self.device)
        dist.broadcast(value, src=0)
        return bool(value.item())

    def any(self, flag: bool) -> bool:
        """True on every rank if ``flag`` is true on any rank."""
        if not self.active:
            return flag
        value = torch.tensor([int(flag)], device=self.device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """``values`` summed over ranks (returned on the CPU)."""
        if not self.active:
            return values
        reduced = values.to(self.device)
        dist.all_reduce(reduced)
        return reduced.cpu()

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def close(self) -> None:
        if self.active and dist.is_initialized():
            dist.destroy_process_group()


def context(device_name: str) -> DistributedContext:
    """The context of this process: torchrun's rank and world size, with the process group set up."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistributedContext()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device_name in ("auto", "cuda") and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        # Rank 0 may wait on the pretrain cache lock while another sweep job trains: allow hours.
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", timeout=datetime.timedelta(hours=12))
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    return DistributedContext(rank=rank, world_size=world_size, local_rank=local_rank, device=device)

