"""Micro-batching: requests that arrive together share one model batch.

Each request's images are queued with a key (the model, and whether heatmaps were asked for);
one worker thread takes the oldest key's items, waits at most ``max_wait`` seconds for more of
the same key (up to ``max_batch``), and runs them as one batch, so the model runs off the event
loop and a burst of single-image requests is predicted at the throughput of batched inference
(the dynamic batching of inference servers, e.g. Triton's ``max_queue_delay``).

The queue is bounded by admission: a request reserves a slot per image before it decodes
anything (:meth:`Batcher.admit`); when the slots are taken it is refused at once (the caller
answers 503 with Retry-After) instead of waiting without bound.
"""

from __future__ import annotations

import concurrent.futures as cf
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["BatchStats", "Batcher", "QueueFull"]


class QueueFull(RuntimeError):
    """The batcher holds ``max_queue`` images already; retry later."""


@dataclass
class BatchStats:
    """What the worker did (read by ``/healthz``, the tests and the load benchmark).

    Attributes:
        batches: model batches run.
        items: images in them.
        largest: the largest batch.
        sizes: batch size -> how many batches had it.
        refused: images refused because the queue was full.
        failed: batches whose function raised (their requests got the error).
    """

    batches: int = 0
    items: int = 0
    largest: int = 0
    sizes: Counter[int] = field(default_factory=Counter)
    refused: int = 0
    failed: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "batches": self.batches,
            "items": self.items,
            "largest": self.largest,
            "mean_batch": self.items / self.batches if self.batches else 0.0,
            "refused": self.refused,
            "failed": self.failed,
        }


@dataclass
class _Item:
    key: Hashable
    value: Any
    future: cf.Future[Any]
    arrived: float


class Batcher:
    """A bounded queue and one worker thread that runs ``fn(key, values)`` on batches.

    Args:
        fn: ``fn(key, values) -> results`` (one result per value, in order); runs in the worker
            thread. If it raises, every future of the batch gets the exception and the worker
            goes on with the next batch.
        max_batch: most values per call.
        max_wait: seconds the oldest queued value may wait for others to join its batch.
        max_queue: most values admitted (queued, being batched or being answered) at a time.
    """

    def __init__(
        self,
        fn: Callable[[Hashable, list[Any]], Sequence[Any]],
        *,
        max_batch: int = 32,
        max_wait: float = 0.01,
        max_queue: int = 256,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if max_wait < 0:
            raise ValueError(f"max_wait must be >= 0, got {max_wait}")
        if max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {max_queue}")
        self.fn = fn
        self.max_batch = max_batch
        self.max_wait = max_wait
        self.max_queue = max_queue
        self.stats = BatchStats()
        self._queue: deque[_Item] = deque()
        self._admitted = 0
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._work, name="spcxr-batcher", daemon=True)
        self._thread.start()

    @property
    def admitted(self) -> int:
        """Values admitted and not yet released."""
        return self._admitted

    def admit(self, n: int) -> None:
        """Reserves ``n`` slots (released with :meth:`release` once the request is answered).

        Raises:
            QueueFull: fewer than ``n`` slots are free.
        """
        with self._cond:
            if self._closed:
                raise QueueFull("the server is shutting down")
            if self._admitted + n > self.max_queue:
                self.stats.refused += n
                raise QueueFull(
                    f"{self._admitted} images are queued (limit {self.max_queue}); retry shortly"
                )
            self._admitted += n

    def release(self, n: int) -> None:
        with self._cond:
            self._admitted = max(0, self._admitted - n)

    def submit(self, key: Hashable, value: Any) -> cf.Future[Any]:
        """Queues one value of an admitted request; the future holds its result."""
        future: cf.Future[Any] = cf.Future()
        with self._cond:
            if self._closed:
                raise QueueFull("the server is shutting down")
            self._queue.append(_Item(key, value, future, time.monotonic()))
            self._cond.notify()
        return future

    def close(self, timeout: float | None = 5.0) -> None:
        """Stops the worker after the current batch; queued values get an error."""
        with self._cond:
            self._closed = True
            pending = list(self._queue)
            self._queue.clear()
            self._cond.notify_all()
        for item in pending:
            item.future.set_exception(QueueFull("the server is shutting down"))
        self._thread.join(timeout)

    def _take(self) -> tuple[Hashable, list[_Item]] | None:
        """The next batch: the oldest item's key, after at most ``max_wait`` for company."""
        with self._cond:
            while not self._queue and not self._closed:
                self._cond.wait()
            if self._closed:
                return None
            key = self._queue[0].key
            deadline = self._queue[0].arrived + self.max_wait
            while not self._closed:
                same = sum(item.key == key for item in self._queue)
                left = deadline - time.monotonic()
                if same >= self.max_batch or left <= 0:
                    break
                self._cond.wait(left)
            batch: list[_Item] = []
            rest: deque[_Item] = deque()
            for item in self._queue:
                if item.key == key and len(batch) < self.max_batch:
                    batch.append(item)
                else:
                    rest.append(item)
            self._queue = rest
            return key, batch

    def _work(self) -> None:
        while True:
            taken = self._take()
            if taken is None:
                return
            key, batch = taken
            live = [item for item in batch if item.future.set_running_or_notify_cancel()]
            if not live:
                continue
            try:
                results = list(self.fn(key, [item.value for item in live]))
                if len(results) != len(live):
                    raise RuntimeError(f"batch of {len(live)} gave {len(results)} results")
            except Exception as err:  # a failed batch fails its requests, not the worker
                self.stats.failed += 1
                for item in live:
                    item.future.set_exception(err)
                continue
            finally:
                self.stats.batches += 1
                self.stats.items += len(live)
                self.stats.largest = max(self.stats.largest, len(live))
                self.stats.sizes[len(live)] += 1
            for item, result in zip(live, results, strict=True):
                item.future.set_result(result)
