"""The micro-batching queue: grouping by key, the batch bound, admission, failures."""

from __future__ import annotations

import threading

import pytest

from spcxr.serve.batcher import Batcher, QueueFull


def _held_batcher(**kwargs):
    """A batcher whose first call waits for ``gate``, so later items queue up behind it."""
    gate, calls = threading.Event(), []

    def fn(key, values):
        calls.append((key, list(values)))
        gate.wait(30)
        if "boom" in values:
            raise ValueError("boom in batch")
        return [f"{key}:{v}" for v in values]

    return Batcher(fn, **kwargs), gate, calls


def test_items_of_one_key_share_batches_up_to_max_batch() -> None:
    batcher, gate, calls = _held_batcher(max_batch=3, max_wait=0.0, max_queue=100)
    first = batcher.submit("a", 0)
    while not calls:  # the worker holds the first batch
        threading.Event().wait(0.001)
    futures = [batcher.submit("a" if i % 2 else "b", i) for i in range(1, 9)]
    gate.set()
    assert first.result(10) == "a:0"
    assert [f.result(10) for f in futures] == [f"{'a' if i % 2 else 'b'}:{i}" for i in range(1, 9)]
    batcher.close()
    # after the held one: the oldest key first, same-key items together, never over 3
    assert calls[1:] == [("a", [1, 3, 5]), ("b", [2, 4, 6]), ("a", [7]), ("b", [8])]
    assert batcher.stats.batches == 5 and batcher.stats.items == 9 and batcher.stats.largest == 3


def test_a_failing_batch_fails_its_futures_and_the_worker_goes_on() -> None:
    batcher, gate, _ = _held_batcher(max_batch=4, max_wait=0.0)
    gate.set()
    bad = batcher.submit("k", "boom")
    with pytest.raises(ValueError, match="boom in batch"):
        bad.result(10)
    assert batcher.submit("k", "ok").result(10) == "k:ok"
    assert batcher.stats.failed == 1
    batcher.close()


def test_admission_is_bounded_and_released() -> None:
    batcher, gate, _ = _held_batcher(max_queue=3)
    batcher.admit(2)
    with pytest.raises(QueueFull, match="2 images are queued"):
        batcher.admit(2)
    batcher.admit(1)
    batcher.release(3)
    batcher.admit(3)
    assert batcher.admitted == 3 and batcher.stats.refused == 2
    gate.set()
    batcher.close()
    with pytest.raises(QueueFull):
        batcher.admit(1)


def test_close_fails_what_is_still_queued() -> None:
    batcher, gate, calls = _held_batcher(max_batch=1, max_wait=0.0)
    running = batcher.submit("k", 1)
    while not calls:
        threading.Event().wait(0.001)
    queued = batcher.submit("k", 2)
    closer = threading.Thread(target=batcher.close)
    closer.start()
    with pytest.raises(QueueFull, match="shutting down"):
        queued.result(10)
    gate.set()
    closer.join(10)
    assert running.result(10) == "k:1"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_batch": 0}, "max_batch"),
        ({"max_wait": -1}, "max_wait"),
        ({"max_queue": 0}, "max_queue"),
    ],
)
def test_bad_settings_are_refused(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        Batcher(lambda key, values: values, **kwargs)
