"""Checkpoints: written atomically, read without unpickling arbitrary objects.

A checkpoint is one ``torch.save`` file holding only tensors, numbers, strings, lists and dicts
(model and optimizer state dicts, the step, the config as plain data, RNG state), so
``torch.load(weights_only=True)`` reads it and a malicious file cannot run code. It is written
to a temporary file, fsynced and renamed over the previous one, so a process killed at any
moment (even by SIGKILL) leaves either the old or the new checkpoint, never a torn one.
"""

from __future__ import annotations

import errno
import pickle
import re
from pathlib import Path
from typing import Any

import torch

from spcxr.atomic import atomic_path, disk_full


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """Atomically write ``state`` to ``path`` (temporary file in the same folder + rename).

    Raises:
        OSError: the write failed; ``ENOSPC`` on a full disk (torch reports it only as
            "enforce fail at inline_container.cc"), otherwise ``EIO`` with torch's message.
            The previous checkpoint is left as it was.
    """
    with atomic_path(path) as tmp:
        try:
            torch.save(state, tmp)
        except RuntimeError as e:  # atomic_path turns it into ENOSPC when the disk is full
            if disk_full(Path(path).parent):
                raise
            reason = " ".join(str(e).split())
            raise OSError(errno.EIO, f"could not write the checkpoint ({reason})", str(path)) from e


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint safely (``weights_only=True``: no arbitrary unpickling)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no checkpoint here")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's message suggests weights_only=False, i.e. running the file's code: never.
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        what = f" ({found.group(1)})" if found else ""
        raise ValueError(
            f"{path}: refused: the checkpoint holds a pickled Python object{what} that is not "
            "plain tensors, numbers or strings. spcxr reads checkpoints with weights_only=True "
            "and never runs code from a file; for inference use RUN/model/model.safetensors."
        ) from None
    except Exception as e:
        raise ValueError(
            f"{path}: not a readable spcxr checkpoint ({type(e).__name__}: {e})"
        ) from e
