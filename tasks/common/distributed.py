"""torch.distributed set-up for jobs launched by ``torchrun`` (or as one plain process).

``torchrun`` exports ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``; without them the job runs as a single
process and every helper here degrades to a no-op. The backend follows the device: NCCL on CUDA, gloo on CPU.

Example::

    ctx = init_distributed("auto")      # DistContext(rank=0, world_size=1, device=cpu, ...)
    total = all_reduce_sum(torch.tensor([correct, count], dtype=torch.float64), ctx)
    if ctx.is_main:
        write_files()
    close_distributed(ctx)
"""
from __future__ import annotations

import contextlib
import enum
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["DevicePreference", "DistContext", "env_rank", "init_distributed", "close_distributed", "distributed_job",
           "all_reduce_sum",
           "all_gather_objects", "barrier", "resolve_device"]


class DevicePreference(str, enum.Enum):
    """Where a job runs: ``auto`` picks CUDA when available."""

    AUTO = "auto"
    CPU = "cpu"
    CUDA = "cuda"


@dataclass(frozen=True)
class DistContext:
    """This process's place in the job."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Only the main process writes files and prints summaries."""
        return self.rank == 0


def resolve_device(preference: DevicePreference | str, local_rank: int = 0) -> torch.device:
    """The torch device for a preference; asking for CUDA without it raises ``ValueError``."""
    preference = DevicePreference(preference)
    if preference is DevicePreference.CUDA and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but torch.cuda.is_available() is False")
    if preference is DevicePreference.CPU or (preference is DevicePreference.AUTO and not torch.cuda.is_available()):
        return torch.device("cpu")
    return torch.device("cuda", local_rank % max(torch.cuda.device_count(), 1))


def env_rank() -> int:
    """This process's rank as torchrun announced it (0 when not launched by torchrun)."""
    return int(os.environ.get("RANK", "0"))


def init_distributed(preference: DevicePreference | str = DevicePreference.AUTO) -> DistContext:
    """Join the process group described by torchrun's environment variables, if any.

    Returns the context for this process (rank 0 of 1 when not launched by torchrun).
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = env_rank()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(preference, local_rank)
    if world_size > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def close_distributed(ctx: DistContext) -> None:
    """Leave the process group (safe to call when none was joined)."""
    if ctx.distributed and dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def distributed_job(preference: DevicePreference | str = DevicePreference.AUTO,
                    threads: int | None = None) -> Iterator[DistContext]:
    """``with distributed_job("auto", threads=1) as ctx:`` — join the process group (if launched by torchrun),
    optionally set torch's intra-op thread count, and undo both on exit (also on error)."""
    previous_threads = torch.get_num_threads()
    ctx = init_distributed(preference)
    try:
        if threads:
            torch.set_num_threads(threads)
        yield ctx
    finally:
        torch.set_num_threads(previous_threads)
        close_distributed(ctx)


def all_reduce_sum(tensor: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Sum ``tensor`` over all processes; returned on the input's device, the input left untouched.

    The reduction itself runs on ``ctx.device`` because NCCL only reduces CUDA tensors.
    """
    if not ctx.distributed:
        return tensor.detach().clone()
    out = tensor.detach().to(ctx.device, copy=True)
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out.to(tensor.device)


def all_gather_objects(obj: Any, ctx: DistContext) -> list[Any]:
    """Every process's ``obj`` (picklable), indexed by rank."""
    if not ctx.distributed:
        return [obj]
    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(ctx: DistContext) -> None:
    """Wait for every process (no-op when alone)."""
    if ctx.distributed:
        dist.barrier()
