"""Run logs: one JSON line per logged step (``log.jsonl``) and TensorBoard scalars.

A run that restarts from its checkpoint at step ``s`` redoes the steps after ``s``, so the log
is cut back to step ``s`` first (``log.jsonl`` rewritten atomically, TensorBoard's
``purge_step``): a reader sees one curve, the one the finished run's weights come from.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


class RunLogger:
    """Append-only JSONL log plus TensorBoard event files, written by the main process only.

    Args:
        run_dir: the run folder (``log.jsonl`` and ``tb/`` are created inside).
        enabled: False on non-main processes (every call becomes a no-op).
        tensorboard: also write TensorBoard scalars.
        start_step: the step the run starts from (its checkpoint's, 0 for a new run): records
            of later steps, left by an interrupted run, are dropped.
    """

    def __init__(
        self,
        run_dir: str | Path,
        *,
        enabled: bool = True,
        tensorboard: bool = True,
        start_step: int = 0,
    ) -> None:
        self.enabled = enabled
        self.path = Path(run_dir) / "log.jsonl"
        self._tb = None
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            truncate_log(self.path, start_step)
            self._file = self.path.open("a", buffering=1)
            if tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                tb = Path(run_dir) / "tb"
                # Events of steps > start_step in earlier files are hidden by TensorBoard.
                purge = start_step + 1 if any(tb.glob("events.out.tfevents.*")) else None
                self._tb = SummaryWriter(log_dir=str(tb), purge_step=purge)

    def log(self, step: int, values: dict[str, Any], *, prefix: str = "train") -> None:
        """Write ``values`` (numbers, strings) for ``step``."""
        if not self.enabled:
            return
        record = {"step": step, **{k: _plain(v) for k, v in values.items()}}
        self._file.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for key, value in values.items():
                if (
                    isinstance(value, (int, float))
                    and not isinstance(value, bool)
                    and math.isfinite(value)
                ):
                    self._tb.add_scalar(f"{prefix}/{key}", value, step)

    def close(self) -> None:
        if self.enabled:
            self._file.close()
            if self._tb is not None:
                self._tb.close()


def truncate_log(path: str | Path, last_step: int) -> int:
    """Keep only the records of ``path`` (a ``log.jsonl``) up to ``last_step``; rewrites the file
    atomically when anything is dropped. A line torn by a kill is dropped too. Returns the
    number of lines dropped."""
    from spcxr.atomic import atomic_write_text

    path = Path(path)
    if not path.is_file():
        return 0
    lines = path.read_text().splitlines()
    kept = []
    for line in lines:
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        step = record.get("step") if isinstance(record, dict) else None
        if isinstance(step, (int, float)) and step > last_step:
            continue
        kept.append(line)
    dropped = len(lines) - len(kept)
    if dropped:
        atomic_write_text(path, "".join(f"{line}\n" for line in kept))
    return dropped


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def read_log(run_dir: str | Path) -> list[dict[str, Any]]:
    """All records of a run's ``log.jsonl``."""
    path = Path(run_dir) / "log.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
