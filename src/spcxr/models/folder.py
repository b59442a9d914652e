"""The fine-tuned model folder: ``model.safetensors`` (the full model state) + ``model.json``
(format, config, class names, normalisation, weights hash), shared by the classifier and the
segmenter. Safetensors + JSON, so loading one unpickles nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch
from torch import nn

from spcxr.atomic import atomic_path, atomic_write_text

__all__ = [
    "MODEL_FORMAT",
    "MODEL_META",
    "MODEL_WEIGHTS",
    "file_sha256",
    "load_exact",
    "read_model_dir",
    "read_task_model",
    "write_model_dir",
]

MODEL_WEIGHTS = "model.safetensors"
MODEL_META = "model.json"
MODEL_FORMAT = "spcxr-model"


def file_sha256(path: str | os.PathLike[str], n_hex: int = 16) -> str:
    """The first ``n_hex`` hex digits of the SHA-256 of a file (read in 1 MiB chunks)."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()[:n_hex]


def write_model_dir(
    model: nn.Module, folder: str | os.PathLike[str], meta: Mapping[str, Any]
) -> Path:
    """Writes ``folder/model.safetensors`` (the full state dict) and ``folder/model.json``.

    Both files are written atomically; ``model.json`` gets ``format``, ``format_version`` and the
    weights' ``weights_sha256`` on top of ``meta``.

    Args:
        model: the module whose ``state_dict()`` is saved (tensors copied to the CPU).
        folder: the output folder (created).
        meta: JSON-serialisable description (config, class names, normalisation, ...).

    Returns:
        The folder.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    with atomic_path(folder / MODEL_WEIGHTS) as tmp:
        safetensors.torch.save_file(state, tmp, {"format": "pt"})
    record = {"format": MODEL_FORMAT, "format_version": 1, **meta}
    record["weights_sha256"] = file_sha256(folder / MODEL_WEIGHTS)
    try:
        text = json.dumps(record, indent=2)
    except TypeError as err:
        raise ValueError(
            f"{folder / MODEL_META}: metadata is not JSON serialisable ({err})"
        ) from err
    atomic_write_text(folder / MODEL_META, text)
    return folder


def read_model_dir(folder: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict]:
    """Reads a folder written by :func:`write_model_dir` (safetensors + JSON: nothing unpickled).

    Returns:
        ``(state dict on the CPU, model.json contents)``.

    Raises:
        FileNotFoundError: a file is missing. ValueError: unreadable or not an spcxr model folder.
    """
    folder = Path(folder)
    meta_path, weights_path = folder / MODEL_META, folder / MODEL_WEIGHTS
    for path in (meta_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such file (not a fine-tuned spcxr model folder)")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{meta_path}: not valid JSON ({err})") from err
    if not isinstance(meta, dict) or meta.get("format") != MODEL_FORMAT:
        raise ValueError(f"{meta_path}: not an spcxr model description (format != {MODEL_FORMAT})")
    try:
        state = safetensors.torch.load_file(str(weights_path), device="cpu")
    except (safetensors.SafetensorError, OSError) as err:
        raise ValueError(f"{weights_path}: not a readable safetensors file ({err})") from err
    return state, meta


def read_task_model(folder: str | os.PathLike[str], task: str, noun: str, config_cls: type):
    """A ``write_model_dir`` folder of ``task``: ``(state, meta, config, encoder)``, the encoder
    built on the meta device from the config (no random init: every tensor comes from the file).
    """
    from spcxr.config import from_dict
    from spcxr.models.vit import create_encoder

    folder = Path(folder)
    state, meta = read_model_dir(folder)
    if meta.get("task") != task:
        raise ValueError(f"{folder}: holds a {meta.get('task')!r} model, not a {noun}")
    cfg = from_dict(config_cls, meta["config"])
    encoder = create_encoder(
        cfg.arch,
        img_size=cfg.img_size,
        patch_size=cfg.patch_size,
        in_chans=cfg.in_chans,
        drop_path_rate=cfg.drop_path_rate,
        device="meta",
    )
    return state, meta, cfg, encoder


def load_exact(model: nn.Module, state: Mapping[str, torch.Tensor], path: Path) -> nn.Module:
    """Loads ``state`` strictly into ``model`` built (at least partly) on the meta device.

    ``assign=True`` makes the loaded tensors the model's parameters and buffers, so an encoder
    built with ``device="meta"`` costs no random initialisation.

    Raises:
        ValueError: missing, unexpected or misshapen tensors, or a tensor left on the meta device.
    """
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as err:
        raise ValueError(f"{path}: weights do not fit the recorded config: {err}") from err
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise ValueError(f"{path}: no tensors for {left}")
    return model
