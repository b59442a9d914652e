"""Batches from a prepared store: loader workers only slice the memory-mapped arrays.

A batch is a list of manifest rows; :class:`StoreBatches` turns it into one uint8 tensor
``[B, 1, S, S]`` with a single gather per shard, in a DataLoader worker. Everything else
(augmentation, masking, normalisation) happens on the training device, batched.

:class:`EpochBatchSampler` fixes the order of the *global* batches from ``(seed, epoch)`` and
hands each process its contiguous slice, so the data seen is independent of the number of
processes, and a resumed run starts at any step of an epoch.

:class:`DevicePrefetcher` moves each batch to the training device (and optionally prepares it
there) one batch ahead, on a side CUDA stream; :class:`DataWaitMeter` measures how long the
training device waits for its batches.
"""

from __future__ import annotations

import contextlib
import dataclasses
import signal
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from spcxr.data.store import PreparedStore


class StoreBatches(Dataset):
    """Dataset whose items are whole batches: ``dataset[list_of_rows] -> (images, rows)``.

    Args:
        store: the store folder or an open :class:`PreparedStore`.
        with_masks: also return the lung masks.
    """

    def __init__(self, store: str | PreparedStore, *, with_masks: bool = False) -> None:
        self.store_path = store.root if isinstance(store, PreparedStore) else store
        self.with_masks = with_masks
        self._store: PreparedStore | None = store if isinstance(store, PreparedStore) else None

    @property
    def store(self) -> PreparedStore:
        # Opened lazily so each worker process maps the shards itself (no large pickles).
        if self._store is None:
            self._store = PreparedStore(self.store_path)
        return self._store

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_store"] = None
        return state

    def __len__(self) -> int:
        return len(self.store)

    def __getitem__(self, rows: list[int] | np.ndarray) -> dict[str, torch.Tensor]:
        rows = np.asarray(rows, dtype=np.int64)
        batch = {
            "images": torch.from_numpy(self.store.images(rows)).unsqueeze(1),
            "rows": torch.from_numpy(rows),
        }
        if self.with_masks:
            batch["masks"] = torch.from_numpy(self.store.masks(rows)).unsqueeze(1)
        return batch


class EpochBatchSampler(Sampler[list[int]]):
    """Global batches of ``indices`` in a seeded order per epoch; this process's slice of each.

    Args:
        indices: the manifest rows to train on.
        global_batch: images per optimisation step over all processes.
        rank, world_size: this process's slice of every global batch.
        seed: order seed; epoch ``e`` uses the permutation of ``(seed, e)``.
        start_step: first global step to yield (resumption mid-epoch).
        total_steps: stop after this global step (``None``: one pass from ``start_step``'s epoch
            to its end, then continue with the following epochs forever).
        steps_per_epoch: global batches per epoch (default: as many whole batches as fit; a
            caller accumulating gradients passes whole optimisation steps' worth).
    """

    def __init__(
        self,
        indices: np.ndarray,
        global_batch: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        start_step: int = 0,
        total_steps: int | None = None,
        steps_per_epoch: int | None = None,
    ) -> None:
        if global_batch % world_size:
            raise ValueError(
                f"global batch {global_batch} is not divisible by {world_size} processes"
            )
        if len(indices) < global_batch:
            raise ValueError(
                f"{len(indices)} training images are fewer than one global batch ({global_batch})"
            )
        self.indices = np.asarray(indices, dtype=np.int64)
        self.global_batch = global_batch
        self.local_batch = global_batch // world_size
        self.rank = rank
        self.seed = seed
        self.start_step = start_step
        self.total_steps = total_steps
        # Drop the last partial batch.
        self.steps_per_epoch = steps_per_epoch or len(self.indices) // global_batch
        self._order: tuple[int, np.ndarray] | None = None

    def global_rows(self, step: int) -> np.ndarray:
        """The manifest rows of global step ``step`` (all processes)."""
        epoch, within = divmod(step, self.steps_per_epoch)
        if self._order is None or self._order[0] != epoch:
            self._order = (
                epoch,
                np.random.default_rng([self.seed, epoch]).permutation(len(self.indices)),
            )
        order = self._order[1]
        chosen = order[within * self.global_batch : (within + 1) * self.global_batch]
        return self.indices[chosen]

    def __iter__(self) -> Iterator[list[int]]:
        step = self.start_step
        lo = self.rank * self.local_batch
        while self.total_steps is None or step < self.total_steps:
            yield self.global_rows(step)[lo : lo + self.local_batch].tolist()
            step += 1

    def __len__(self) -> int:
        if self.total_steps is None:
            return self.steps_per_epoch
        return max(0, self.total_steps - self.start_step)


def leave_stop_signals_to_the_main_process(worker_id: int) -> None:
    """``worker_init_fn``: the worker ignores SIGINT and SIGTERM.

    Ctrl-C, ``kill -- -PGID`` and cluster schedulers signal the whole process group. The main
    process handles the signal by finishing its step and checkpointing
    (:mod:`spcxr.train.signals`); a worker killed by the same signal would instead make torch abort
    the main process mid-step ("DataLoader worker is killed by signal"). Workers still end when
    the loader is closed, and on their own once the main process is gone (torch's watchdog).
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def make_loader(
    dataset: StoreBatches, sampler: EpochBatchSampler, *, workers: int = 2, pin_memory: bool = False
) -> DataLoader:
    """A DataLoader whose workers each produce whole batches from the store."""
    return DataLoader(
        dataset,
        sampler=sampler,
        batch_size=None,  # the sampler yields whole batches
        num_workers=workers,
        pin_memory=pin_memory,
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None,
        worker_init_fn=leave_stop_signals_to_the_main_process if workers > 0 else None,
    )


def move_to(batch: Any, device: torch.device, *, non_blocking: bool = False) -> Any:
    """``batch`` with every tensor moved to ``device`` (tensors inside dicts, lists, tuples)."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=non_blocking)
    if isinstance(batch, dict):
        return {k: move_to(v, device, non_blocking=non_blocking) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to(v, device, non_blocking=non_blocking) for v in batch)
    return batch


def tensors_in(item: Any) -> Iterator[torch.Tensor]:
    """Every tensor inside ``item`` (a tensor, dataclass, dict, list or tuple, nested)."""
    if isinstance(item, torch.Tensor):
        yield item
    elif dataclasses.is_dataclass(item) and not isinstance(item, type):
        for f in dataclasses.fields(item):
            yield from tensors_in(getattr(item, f.name))
    elif isinstance(item, dict):
        for value in item.values():
            yield from tensors_in(value)
    elif isinstance(item, (list, tuple)):
        for value in item:
            yield from tensors_in(value)


class DevicePrefetcher:
    """Batches on the training device, each copied and prepared while the previous one is used.

    Iterating yields ``prepare(index, batch_on_device)`` (or the moved batch when ``prepare`` is
    ``None``) for every batch of ``batches``, in order. Batch ``i + 1`` is loaded, moved and
    prepared just before batch ``i`` is handed over, so on CUDA its copy and preparation run
    while the caller's stream is still busy with the work queued for batch ``i - 1``.

    On CUDA the copy (``non_blocking``, from the pinned memory of a DataLoader with
    ``pin_memory=True``) and ``prepare`` run on a side stream. Host syncs inside ``prepare``
    (``torch.nonzero``, ``.item()``) then wait for the side stream only, not for the training
    step queued on the caller's stream: with batched augmentation and masking, which need a
    few such syncs per batch, this is what keeps the GPU busy between steps. Hand-over makes the
    caller's stream wait for an event of the side stream (no host sync) and marks every tensor
    of the item as used by the caller's stream (``record_stream``), so the caching allocator
    does not reuse its memory while the caller's queued work still reads it.

    On other devices there are no streams: the same calls in the same order, without overlap.

    Args:
        batches: an iterable of batches (tensors, or dicts / lists / tuples of them), e.g. a
            DataLoader with ``pin_memory=True`` when ``device`` is CUDA.
        device: the training device.
        prepare: optional ``prepare(index, batch) -> item`` run on the device (``index``
            counts batches from 0). It must draw no random numbers from global generators
            whose state the caller also uses: it runs one batch ahead of the caller.
    """

    def __init__(
        self,
        batches: Iterable[Any],
        device: torch.device | str,
        prepare: Callable[[int, Any], Any] | None = None,
    ) -> None:
        self.batches = batches
        self.device = torch.device(device)
        self.prepare = prepare

    def __iter__(self) -> Iterator[Any]:
        # High priority: the few small kernels of a preparation get SMs between the training
        # step's large ones instead of queueing behind them.
        stream = torch.cuda.Stream(self.device, priority=-1) if self.device.type == "cuda" else None
        source = enumerate(self.batches)
        ahead = self._load(source, stream)
        while ahead is not None:
            item, ready = ahead
            if ready is not None:
                consumer = torch.cuda.current_stream(self.device)
                consumer.wait_event(ready)
                for tensor in tensors_in(item):
                    if tensor.is_cuda:
                        tensor.record_stream(consumer)
            ahead = self._load(source, stream)
            yield item

    def _load(
        self, source: Iterator[tuple[int, Any]], stream: torch.cuda.Stream | None
    ) -> tuple[Any, torch.cuda.Event | None] | None:
        """Next batch moved and prepared (on ``stream`` when given), with its ready event."""
        nxt = next(source, None)
        if nxt is None:
            return None
        index, batch = nxt
        context = torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()
        with context:
            batch = move_to(batch, self.device, non_blocking=stream is not None)
            item = batch if self.prepare is None else self.prepare(index, batch)
            ready = None
            if stream is not None:
                ready = torch.cuda.Event()
                ready.record(stream)
        return item, ready


class DataWaitMeter:
    """Share of time the training device waits for its next batch.

    The loop calls :meth:`waiting` just before it fetches a step's batch and :meth:`fetched`
    once it has it (before the step's work is queued); :meth:`fraction` returns the waited
    share of the time since its previous call (the first window starts at the first fetch).

    On CUDA both marks are events on the current stream, so the measure is of the GPU's
    timeline and needs no host sync per step: ``waiting`` completes when the previous step's
    queued work is done, ``fetched`` when the batch is ready on that stream and the host has
    queued past the fetch; the time between them is time the GPU had nothing to do because of
    the data path. Work queued ahead hides a slow fetch, and the meter shows that (a fetch
    that ends before the previous step's work has no cost). :meth:`fraction` synchronises on
    one event: call it where the loop syncs anyway (when logging). On the CPU the marks are
    host wall-clock times: the time spent blocked in the fetch.

    Args:
        device: the training device.
    """

    def __init__(self, device: torch.device | str) -> None:
        self.cuda = torch.device(device).type == "cuda"
        self._gaps: list[tuple[Any, Any]] = []
        self._wait_start: Any = None
        self._window_start: Any = None

    def _mark(self) -> Any:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def _seconds(self, start: Any, end: Any) -> float:
        return start.elapsed_time(end) / 1000.0 if self.cuda else end - start

    def waiting(self) -> None:
        """Mark: the loop starts fetching the next batch."""
        self._wait_start = self._mark()
        if self._window_start is None:
            self._window_start = self._wait_start

    def fetched(self) -> None:
        """Mark: the batch is in hand (after :meth:`waiting`)."""
        if self._wait_start is None:
            raise RuntimeError("DataWaitMeter.fetched() called without waiting() first")
        self._gaps.append((self._wait_start, self._mark()))
        self._wait_start = None

    def fraction(self) -> float | None:
        """Waited share of the window since the previous call; ``None`` if nothing was fetched."""
        if not self._gaps:
            return None
        end = self._mark()
        if self.cuda:
            end.synchronize()  # every earlier event of the stream has completed too
        waited = sum(self._seconds(start, stop) for start, stop in self._gaps)
        total = self._seconds(self._window_start, end)
        self._gaps, self._window_start = [], end
        return min(1.0, waited / total) if total > 0 else 0.0
