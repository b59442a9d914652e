"""A graceful stop on SIGTERM / SIGINT for the hours-long loops.

A cluster scheduler that pre-empts a job (SLURM, Kubernetes) sends SIGTERM and waits a grace
period before SIGKILL; a user stops a run with Ctrl-C (SIGINT). Without a handler both kill the
process mid-step and lose everything since the last periodic checkpoint (up to
``checkpoint_every`` steps; about 6 minutes of a ViT-S/16 run on the 2-core CPU). With
:func:`stop_on_signals` the loop finishes the step it is in, checkpoints exactly there and
returns, so the run resumes from the step it stopped at. A second Ctrl-C stops at once (the last
checkpoint stays): a user who insists is not made to wait.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import FrameType

log = logging.getLogger(__name__)

__all__ = ["StopRequest", "stop_exit_status", "stop_on_signals", "stop_reason"]


@dataclass
class StopRequest:
    """Set by the handler: the signal that asked the loop to stop, if any."""

    signum: int | None = None


def stop_reason(stop: str) -> str:
    """A run's early stop (``PretrainResult.budget_stop``) in words: ``"SIGTERM"``, or
    ``"time_budget spent"`` / ``"step_budget spent"``."""
    return stop if stop.startswith("SIG") else f"{stop} spent"


def stop_exit_status(stop: str) -> int:
    """The exit status of a run that stopped early for ``stop``: 0 for a spent budget, 128 + the
    signal's number for a signal (the shell's convention, 130 Ctrl-C, 143 SIGTERM), so that a
    script or scheduler sees that the run did not finish; its checkpoint is saved either way."""
    return 128 + int(signal.Signals[stop]) if stop.startswith("SIG") else 0


@contextmanager
def stop_on_signals(
    signums: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT),
) -> Iterator[StopRequest]:
    """Within the block, SIGTERM / SIGINT set a :class:`StopRequest` instead of killing.

    Python delivers signals to the main thread only, so elsewhere (a loop driven from a worker
    thread) the handlers are not installed and the request never fires. The previous handlers
    are restored on exit.
    """
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        if request.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt("second interrupt: stopped without a final checkpoint")
        request.signum = signum
        log.warning(
            "%s received: finishing this step, then checkpoint and exit (Ctrl-C again to stop "
            "at once, losing the steps since the last checkpoint)",
            signal.Signals(signum).name,
        )

    previous = {s: signal.getsignal(s) for s in signums}
    for s in signums:
        signal.signal(s, handler)
    try:
        yield request
    finally:
        for s, old in previous.items():
            signal.signal(s, old)
