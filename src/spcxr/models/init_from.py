"""Where a downstream model's encoder comes from: random weights or a pretrained source.

``load_init(init, ...)`` turns the ``--init`` setting of ``spcxr finetune`` / ``spcxr segment``
into a timm ViT encoder plus a record of its origin:

* ``"scratch"``: a randomly initialised encoder (the paper's "supervised transformer" baseline);
  the draw follows the caller's torch seed.
* a GMML pretraining run folder (``run.json`` + ``encoder/`` or ``checkpoint.pt``): its exported
  ``encoder/`` when present, else the ``encoder.*`` tensors of ``checkpoint.pt`` (read with
  ``weights_only=True``, so an interrupted run can be used as well).
* an exported encoder (a folder or ``.safetensors`` file written by ``save_encoder``).
* a fine-tuned model folder (``model.json`` + ``model.safetensors``, written by
  ``save_classifier`` / ``save_segmenter``), or a run folder holding one as ``model/``: its
  encoder, e.g. to segment with an encoder that was fine-tuned for classification.

A pretraining run's ``checkpoint.pt`` may also be named directly; it is then used even when the
run has an exported ``encoder/``.

The whole encoder comes along, including the CLS token and the position embedding. Both are
learned inputs of the pretrained blocks: the CLS token takes part in every attention layer (in
GMML its output is not reconstructed, but the patch tokens attend to it, so the blocks were
trained with exactly this token present), and the position embedding is what tells the blocks
where each patch lies; re-initialising either would hand the pretrained attention inputs it has
never seen. When the image size differs from the source, the position embedding is resampled
bicubically over the patch grid (timm's ``resample_abs_pos_embed``, the rule of DeiT / timm for
fine-tuning at another resolution) instead of being re-initialised.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from timm.layers import to_2tuple
from timm.models.vision_transformer import VisionTransformer

from spcxr.models.folder import MODEL_META, MODEL_WEIGHTS, file_sha256, load_exact, read_model_dir
from spcxr.models.vit import (
    create_encoder,
    fit_encoder_state,
    load_encoder,
    read_encoder_config,
)
from spcxr.train.checkpoint import load_checkpoint

log = logging.getLogger(__name__)

__all__ = ["encoder_shape", "export_is_current", "load_init"]

_PRETRAIN_FORMAT = "spcxr-pretrain-checkpoint"
_ENCODER_PREFIX = "encoder."


def encoder_shape(encoder: VisionTransformer) -> dict[str, int]:
    """What must agree between a source encoder and the requested one (img size may differ)."""
    return {
        "embed_dim": int(encoder.embed_dim),
        "depth": len(encoder.blocks),
        "num_heads": int(encoder.blocks[0].attn.num_heads),
        "patch_size": int(encoder.patch_embed.patch_size[0]),
    }


def _check_shape(found: VisionTransformer, wanted: VisionTransformer, source: Path, arch: str):
    have, want = encoder_shape(found), encoder_shape(wanted)
    if have != want:
        diff = {k: (have[k], want[k]) for k in have if have[k] != want[k]}
        raise ValueError(
            f"{source}: the encoder there does not fit the requested arch {arch!r} / patch size "
            f"{want['patch_size']} (source value, requested value): {diff}; "
            f"source encoder: {have}"
        )


def _encoder_from_state(
    state: Mapping[str, torch.Tensor],
    source: Mapping[str, Any],
    target_args: Mapping[str, Any],
    path: Path,
) -> VisionTransformer:
    """The requested encoder holding the ``encoder.*`` tensors of a model state (checked, strict)."""
    encoder_state = {
        k[len(_ENCODER_PREFIX) :]: v for k, v in state.items() if k.startswith(_ENCODER_PREFIX)
    }
    if not encoder_state:
        raise ValueError(f"{path}: holds no 'encoder.*' tensors")
    source_img = to_2tuple(source["img_size"])
    # Both architectures are built on the meta device (no memory, no random init): the source to
    # compare shapes, the target to receive the loaded tensors (``assign=True``).
    shell = create_encoder(
        source["arch"],
        img_size=source_img,
        patch_size=int(source["patch_size"]),
        in_chans=int(source.get("in_chans", 1)),
        device="meta",
    )
    target = create_encoder(**target_args, device="meta")
    _check_shape(shell, target, path, str(target_args["arch"]))
    load_exact(target, fit_encoder_state(encoder_state, target, source_img), path)
    return target


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not readable JSON ({err})") from err


def _pretrain_record(run: Path) -> dict[str, Any]:
    """What a GMML run's run.json says about the images and schedule pretraining used."""
    info = _read_json(run / "run.json")
    data = info.get("data", {})
    steps, per_epoch = info.get("steps"), info.get("steps_per_epoch")
    record = {
        "run": str(run.resolve()),
        "steps": steps,
        "steps_per_epoch": per_epoch,
        "epochs": round(steps / per_epoch, 3) if steps and per_epoch else None,
        "seed": info.get("seed"),
        "started": info.get("started"),
        "store": data.get("store"),
        "store_fingerprint": data.get("store_fingerprint"),
        "splits": data.get("splits"),
        "sources": data.get("sources"),
        "images": data.get("images"),
        "patients": data.get("patients"),
    }
    return record


def _load_gmml(
    run: Path, target_args: dict[str, Any], from_checkpoint: bool = False
) -> tuple[VisionTransformer, dict]:
    """Encoder of a GMML run folder: ``encoder/`` if exported, else ``checkpoint.pt``."""
    exported = run / "encoder" / "model.safetensors"
    if exported.is_file() and not from_checkpoint:
        encoder = _load_exported(exported, target_args)
        record = _export_record(exported)
        if _export_behind(record):
            # A finished run continued to more epochs keeps its last export until it finishes
            # again: that export is used (it is a finished product), but never silently.
            log.warning(
                "%s: exported at step %d, but the run now goes to step %d (it is being "
                "continued): fine-tuning from that export; name %s for its latest state",
                exported.parent,
                record["steps_done"],
                record["steps"],
                run / "checkpoint.pt",
            )
        return encoder, {"path": str(exported), "source_run": record}
    ckpt = run / "checkpoint.pt"
    if not ckpt.is_file():
        raise FileNotFoundError(
            f"{run}: a pretraining run folder without encoder/ or checkpoint.pt"
        )
    state = load_checkpoint(ckpt)  # weights_only=True: no arbitrary unpickling
    if not isinstance(state, dict) or state.get("format") != _PRETRAIN_FORMAT:
        raise ValueError(
            f"{ckpt}: not a GMML pretraining checkpoint (format != {_PRETRAIN_FORMAT})"
        )
    source = state["config"]["model"]
    encoder = _encoder_from_state(state["model"], source, target_args, ckpt)
    record = _pretrain_record(run)
    record["steps_done"] = int(state["step"])
    if record["steps"] and record["steps_done"] < record["steps"]:
        # allowed (e.g. to look at an early encoder), but never silently: run.json records it
        log.warning(
            "%s: this pretraining has not finished (step %d of %d): fine-tuning from its "
            "checkpoint, not from the encoder it will export",
            ckpt,
            record["steps_done"],
            record["steps"],
        )
    return encoder, {"path": str(ckpt), "source_run": record}


def export_is_current(run: str | Path) -> bool:
    """True when a GMML run folder's ``encoder/`` holds the run's last step: the pretraining has
    finished. False before the first export, and while a finished run is being continued
    (``--epochs N --resume``): its ``encoder/`` is then the old one until it finishes again."""
    exported = Path(run) / "encoder" / "model.safetensors"
    return exported.is_file() and not _export_behind(_export_record(exported))


def _export_behind(record: dict[str, Any] | None) -> bool:
    """True when an export's record (:func:`_export_record`) says it holds an earlier step than
    its run is now scheduled to reach."""
    done, planned = (record or {}).get("steps_done"), (record or {}).get("steps")
    return isinstance(done, int) and isinstance(planned, int) and done < planned


def _export_record(weights: Path) -> dict[str, Any] | None:
    """What is known about an exported encoder's training.

    An ``encoder/`` folder inside a GMML run: the run's record (``steps_done`` from the export).
    Elsewhere: the ``extra_config`` stored in the file's header, if any.
    """
    extra = read_encoder_config(weights)["spcxr"].get("extra", {})
    run = weights.parent.parent
    if weights.name == "model.safetensors" and (run / "run.json").is_file():
        record = _pretrain_record(run)
        record["steps_done"] = extra.get("spcxr", {}).get("step")
        return record
    return extra or None


def _load_exported(path: Path, target_args: dict[str, Any]) -> VisionTransformer:
    """An encoder written by ``save_encoder``, resampled to the requested size and checked."""
    encoder = load_encoder(
        path,
        in_chans=target_args["in_chans"],
        img_size=target_args["img_size"],
        drop_path_rate=target_args["drop_path_rate"],
    )
    _check_shape(
        encoder, create_encoder(**target_args, device="meta"), path, arch=target_args["arch"]
    )
    return encoder


def _load_finetuned(folder: Path, target_args: dict[str, Any]) -> tuple[VisionTransformer, dict]:
    state, meta = read_model_dir(folder)
    config = meta.get("config", {})
    missing = [k for k in ("arch", "img_size", "patch_size") if k not in config]
    if missing:
        raise ValueError(f"{folder / MODEL_META}: config lacks {missing}")
    encoder = _encoder_from_state(state, config, target_args, folder / MODEL_WEIGHTS)
    record = {
        "task": meta.get("task"),
        "config": config,
        "extra": meta.get("extra", {}),
    }
    return encoder, {"path": str(folder / MODEL_WEIGHTS), "source_run": record}


def load_init(
    init: str,
    *,
    arch: str,
    img_size: int,
    patch_size: int,
    in_chans: int = 1,
    drop_path_rate: float = 0.1,
) -> tuple[VisionTransformer, dict[str, Any]]:
    """An encoder for fine-tuning: random (``"scratch"``) or from a pretrained source.

    See the module docstring for the sources that are recognised and why the CLS token and the
    position embedding are carried over.

    Args:
        init: ``"scratch"``, a GMML run folder (or its ``checkpoint.pt``), an exported encoder
            (folder or ``.safetensors``) or a fine-tuned model folder (``model.json`` +
            ``model.safetensors``, or a run folder with one in ``model/``).
        arch: the requested architecture (``"vit_small"`` ...); the source must have the same
            width, depth, heads and patch size.
        img_size: input side of the returned encoder; the position embedding is resampled when
            the source was trained at another size.
        patch_size: patch side; must equal the source's.
        in_chans: input channels (a source with another count is adapted as timm does).
        drop_path_rate: stochastic depth of the returned encoder.

    Returns:
        ``(encoder, info)`` with ``info = {"init": "scratch" | "gmml" | "encoder" | "finetuned",
        "path", "weights_sha256" (first 16 hex digits of the weights file's SHA-256), "source_run"}``.
        ``source_run`` holds what the source records about its training: for a GMML run, its
        store, store fingerprint, splits, sources, image and patient counts, planned ``steps``,
        ``epochs`` and ``steps_done``. For ``"scratch"``, ``path`` / ``weights_sha256`` /
        ``source_run`` are ``None``.

    Raises:
        FileNotFoundError: ``init`` is not ``"scratch"`` and no such path exists.
        ValueError: an unrecognised folder or file, or a source whose architecture or patch size
            differs from the requested one (the message names the file and both values).
    """
    target_args = dict(
        arch=arch,
        img_size=img_size,
        patch_size=patch_size,
        in_chans=in_chans,
        drop_path_rate=drop_path_rate,
    )
    if init == "scratch":
        info = {"init": "scratch", "path": None, "weights_sha256": None, "source_run": None}
        return create_encoder(**target_args), info
    path = Path(init)
    if not path.exists():
        raise FileNotFoundError(
            f"{path}: no such file or folder (--init takes 'scratch' or a path)"
        )
    if path.is_file() and path.suffix == ".safetensors" and (path.parent / MODEL_META).is_file():
        path = path.parent  # model.safetensors of a fine-tuned model folder
    if path.is_dir() and (path / "model" / MODEL_META).is_file():
        path = path / "model"  # a fine-tuning run folder: its best model
    if path.is_dir() and (path / MODEL_META).is_file():
        kind = "finetuned"
        encoder, found = _load_finetuned(path, target_args)
    elif path.is_dir() and (path / "run.json").is_file():
        kind = "gmml"
        encoder, found = _load_gmml(path, target_args)
    elif path.name == "checkpoint.pt" and (path.parent / "run.json").is_file():
        kind = "gmml"  # named explicitly: the checkpoint even when encoder/ exists
        encoder, found = _load_gmml(path.parent, target_args, from_checkpoint=True)
    elif (
        path.is_dir() and (path / "model.safetensors").is_file()
    ) or path.suffix == ".safetensors":
        kind = "encoder"
        weights = path / "model.safetensors" if path.is_dir() else path
        encoder = _load_exported(weights, target_args)
        found = {"path": str(weights), "source_run": _export_record(weights)}
    else:
        raise ValueError(
            f"{path}: not an init source: expected a GMML run folder (run.json + encoder/ or "
            f"checkpoint.pt), an exported encoder (.safetensors or a folder with "
            f"model.safetensors) or a fine-tuned model folder ({MODEL_META} + {MODEL_WEIGHTS})"
        )
    info = {
        "init": kind,
        "path": str(Path(found["path"]).resolve()),
        "weights_sha256": file_sha256(found["path"]),
        "source_run": found["source_run"],
    }
    return encoder, info
