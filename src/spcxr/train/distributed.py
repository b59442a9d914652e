"""Multi-GPU / multi-node through ``torchrun`` and DistributedDataParallel.

spcxr does no process management of its own: launch with ``torchrun --nproc-per-node N
-m spcxr pretrain ...`` (add ``--nnodes``/``--rdzv-endpoint`` for several nodes). torchrun sets
``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``; :func:`setup` reads them, picks NCCL on CUDA and
gloo on the CPU, and binds each process to its GPU.
"""

from __future__ import annotations

import contextlib
import functools
import os
from dataclasses import dataclass
from pathlib import Path

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


PRECISIONS = ("auto", "fp32", "bf16")
"""Values of every command's ``precision`` setting."""

_CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")


@functools.cache
def cpu_bf16_support() -> str | None:
    """The CPU's native bf16 matmul instructions (``"amx_bf16"`` / ``"avx512_bf16"``), or None.

    Read from ``/proc/cpuinfo`` (Linux). oneDNN runs bf16 on older AVX-512 CPUs too, but by
    emulation, slower than float32: autocast pays only with AMX (Sapphire Rapids on) or
    AVX512-BF16 (Cooper Lake, Zen 4 on), where bf16 matmuls run several times faster.
    """
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    flags: set[str] = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[-1].split())
            break
    return next((f for f in _CPU_BF16_FLAGS if f in flags), None)


def resolve_precision(name: str, device: torch.device, *, flag: str = "--precision") -> str:
    """``"bf16"`` or ``"fp32"``: the compute precision of a run on ``device``.

    ``auto`` is bf16 autocast on CUDA and on CPUs with native bf16 (:func:`cpu_bf16_support`),
    else float32. ``bf16`` on a CPU without it is a usage error (``flag`` names the setting).
    """
    if name not in PRECISIONS:
        raise ValueError(f"{flag} must be one of {', '.join(PRECISIONS)}, not {name!r}")
    native = device.type == "cuda" or (device.type == "cpu" and cpu_bf16_support() is not None)
    if name == "auto":
        return "bf16" if native else "fp32"
    if name == "bf16" and not native:
        raise ValueError(
            f"{flag} bf16: this {device.type.upper()} has no native bf16 (AMX or AVX512-BF16); "
            f"use {flag} fp32 or auto"
        )
    return name


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast on ``device`` when ``precision`` (resolved) is ``"bf16"``, else a no-op.

    Autocast keeps reductions, norms and losses in float32 (torch's CPU and CUDA op lists).
    """
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


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
