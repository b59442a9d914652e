"""Batches from a prepared store: loader workers only slice the memory-mapped arrays.

A batch is a list of manifest rows; :class:`StoreBatches` turns it into one uint8 tensor
``[B, 1, S, S]`` with a single gather per shard, in a DataLoader worker. Everything else
(augmentation, masking, normalisation) happens on the training device, batched.

:class:`EpochBatchSampler` fixes the order of the *global* batches from ``(seed, epoch)`` and
hands each process its contiguous slice, so the data seen is independent of the number of
processes, and a resumed run starts at any step of an epoch.
"""

from __future__ import annotations

from collections.abc import Iterator

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
    )
