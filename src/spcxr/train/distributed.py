"""Multi-GPU / multi-node through ``torchrun`` and DistributedDataParallel.

spcxr does no process management of its own: launch with ``torchrun --nproc-per-node N
-m spcxr pretrain ...`` (add ``--nnodes``/``--rdzv-endpoint`` for several nodes). torchrun sets
``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``; :func:`setup` reads them, picks NCCL on CUDA and
gloo on the CPU, and binds each process to its GPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

_CPU = torch.device("cpu")


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = _CPU

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(name: str, flag: str = "--device") -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; otherwise the named device.

    Raises:
        UsageError: ``name`` is not a device, or names a GPU this machine does not have (the
            message names ``flag``, the setting as the user spells it).
    """
    from spcxr.errors import UsageError

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        raise UsageError(f"{flag} {name}: not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(
                f"{flag} {name}: no CUDA GPU is usable on this machine (torch "
                f"{torch.__version__}); use {flag} cpu or {flag} auto"
            )
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise UsageError(f"{flag} {name}: this machine has {count} CUDA GPU(s)")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"{flag} {name}: MPS is not available; use {flag} cpu or {flag} auto")
    return device


def setup(device: str = "auto", flag: str = "--device") -> DistInfo:
    """Initialise the process group when launched by torchrun; a no-op for one process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    base = resolve_device(device, flag)
    if world_size == 1:
        return DistInfo(device=base)
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if base.type == "cuda":
        torch.cuda.set_device(local_rank)
        base = torch.device("cuda", local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if base.type == "cuda" else "gloo")
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=base)


def all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over all processes (identity for one process)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
