"""``spcxr export``: portable weights of a trained model, with its config and model card.

``DIR/`` receives:

* ``model.safetensors`` + ``model.json``: the full model (encoder and head / decoder), loadable
  with :func:`spcxr.models.classifier.load_classifier` / :func:`~spcxr.models.segmentation.
  load_segmenter`, with ``spcxr predict --run DIR``, or as ``--init DIR`` of a new fine-tuning;
* ``encoder/``: the ViT alone in timm's local layout (``model.safetensors`` + ``config.json``,
  :func:`spcxr.models.vit.save_encoder`): ``timm.create_model("local-dir:DIR/encoder",
  pretrained=True)`` rebuilds it without spcxr;
* ``model.onnx`` (``--onnx``): the full model for ONNX Runtime, input ``image`` ``[N, C, H, W]``
  (normalised), output ``logits`` ``[N, classes]`` or ``mask_logits`` ``[N, 1, H, W]``, dynamic
  batch axis. After writing it is run with ONNX Runtime (when installed) on a random batch
  and compared with PyTorch: the export fails unless the largest absolute difference is within
  ``ONNX_ATOL + ONNX_RTOL * max|output|`` (1e-4 + 1e-4 x the largest output, fp32);
* ``preprocessing.json``: what a user of the ONNX or timm files must do to an image
  (architecture, input size, channels, normalisation, class names, the preprocessing steps);
* ``MODEL_CARD.md`` (:mod:`spcxr.modelcard`) and ``training/`` (the run's ``run.json`` and
  ``config.yaml``, so the card can be rebuilt from the export alone; the list of training
  images is not copied).

Nothing is unpickled: the model is read from its safetensors file, never from ``checkpoint.pt``.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import logging
import shutil
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from spcxr.atomic import atomic_path, atomic_write_text
from spcxr.checks import writable_folder
from spcxr.config import from_dict
from spcxr.inference.predict import LoadedModel, load_model
from spcxr.modelcard import model_card, run_record_dir, write_model_card
from spcxr.models.vit import save_encoder

log = logging.getLogger(__name__)

__all__ = ["ONNX_ATOL", "ONNX_RTOL", "ExportConfig", "check_onnx", "export", "export_onnx"]

ONNX_ATOL = 1e-4
ONNX_RTOL = 1e-4


@dataclass
class ExportConfig:
    """Settings of ``spcxr export`` (every field is a CLI flag and a YAML key).

    Attributes:
        run: a fine-tuning or segmentation run folder (its ``model/`` is exported), or a model
            folder.
        out: the export folder.
        onnx: also write ``model.onnx`` and check it against PyTorch with ONNX Runtime.
        opset: ONNX opset version.
        report: an ``spcxr evaluate`` report (folder, or a folder of reports, or a
            ``metrics.json``); the newest one that evaluated this run goes into the model card
            (empty: the card says "not evaluated").
    """

    run: str = ""
    out: str = "export"
    onnx: bool = True
    opset: int = 17
    report: str = ""


def export_onnx(
    model: nn.Module,
    path: str | Path,
    input_shape: tuple[int, int, int],
    *,
    output_name: str,
    opset: int = 17,
) -> Path:
    """Writes ``model`` (CPU, eval) as ONNX with a dynamic batch axis.

    The TorchScript-based exporter (``dynamo=False``) is tried first: it needs nothing beyond
    torch and ``onnx``; the ``torch.export``-based one (``dynamo=True``, the default since
    torch 2.9) also needs ``onnxscript`` and is the fallback.

    Args:
        model: the model; traced with a batch of 2 random images.
        path: the ``.onnx`` file.
        input_shape: ``(C, H, W)``.
        output_name: name of the output (``logits``, ``mask_logits``).
        opset: ONNX opset version.
    """
    path = Path(path)
    model = model.eval()
    dummy = torch.randn(2, *input_shape, generator=torch.Generator().manual_seed(0))
    kwargs: dict[str, Any] = dict(
        input_names=["image"], output_names=[output_name], opset_version=opset
    )
    has_dynamo_flag = "dynamo" in inspect.signature(torch.onnx.export).parameters
    with atomic_path(path) as tmp, warnings.catch_warnings():
        # The legacy exporter warns that it is legacy, and the tracer about Python-level
        # shape checks in timm (constant for a fixed input size, which ViTs have).
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        try:
            legacy = {"dynamo": False} if has_dynamo_flag else {}
            torch.onnx.export(
                model, (dummy,), str(tmp),
                dynamic_axes={"image": {0: "batch"}, output_name: {0: "batch"}},
                **legacy, **kwargs,
            )  # fmt: skip
        except Exception as legacy_error:
            if not has_dynamo_flag:
                raise RuntimeError(f"{path}: ONNX export failed: {legacy_error}") from legacy_error
            try:
                batch = torch.export.Dim("batch", min=1)
                torch.onnx.export(
                    model, (dummy,), str(tmp), dynamo=True,
                    dynamic_shapes=({0: batch},), **kwargs,
                )  # fmt: skip
            except Exception as err:
                raise RuntimeError(
                    f"{path}: ONNX export failed: TorchScript exporter: {legacy_error}; "
                    f"torch.export exporter (needs onnxscript): {err}"
                ) from err
    return path


def check_onnx(path: str | Path, model: nn.Module, x: torch.Tensor) -> dict[str, Any]:
    """Runs ``model.onnx`` with ONNX Runtime (CPU) and PyTorch on ``x``; compares the outputs.

    Returns:
        ``{"max_abs_diff", "max_abs_output", "tolerance", "batch", "onnxruntime", "ok"}``.

    Raises:
        ImportError: onnxruntime is not installed.
    """
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        want = model.eval()(x).numpy()
    if got.shape != want.shape:
        raise ValueError(f"{path}: ONNX output shape {got.shape} != PyTorch {want.shape}")
    diff = float(np.abs(got - want).max())
    scale = float(np.abs(want).max())
    tolerance = ONNX_ATOL + ONNX_RTOL * scale
    return {
        "max_abs_diff": diff,
        "max_abs_output": scale,
        "tolerance": tolerance,
        "batch": int(x.shape[0]),
        "onnxruntime": onnxruntime.__version__,
        "ok": diff <= tolerance,
    }


def _save_full_model(loaded: LoadedModel, out: Path, source: dict[str, Any]) -> None:
    """``out/model.safetensors`` + ``model.json`` with the same layout as the run's model."""
    meta = loaded.meta
    extra = {**meta.get("extra", {}), "export": source}
    if loaded.task == "classification":
        from spcxr.models.classifier import ClassifierConfig, save_classifier

        cfg = from_dict(ClassifierConfig, meta["config"])
        save_classifier(
            loaded.model, cfg, loaded.class_names, out, extra, mean=meta["mean"], std=meta["std"]
        )
    else:
        from spcxr.models.segmentation import save_segmenter

        save_segmenter(loaded.model, out, extra, mean=meta["mean"], std=meta["std"])


def _preprocessing_json(loaded: LoadedModel, encoder_arch: str, onnx: dict | None) -> dict:
    meta, prep = loaded.meta, loaded.meta["extra"]["preprocessing"]
    cfg = meta["config"]
    c, h, w = meta["input_size"]
    classification = loaded.task == "classification"
    activation = "sigmoid" if loaded.multilabel or not classification else "softmax"
    return {
        "format": "spcxr-preprocessing",
        "format_version": 1,
        "task": loaded.task,
        "architecture": {
            "spcxr": cfg,
            "timm_encoder": encoder_arch,
        },
        "input": {"name": "image", "shape": ["N", c, h, w], "dtype": "float32", "layout": "NCHW"},
        "output": {
            "name": "logits" if classification else "mask_logits",
            "shape": ["N", len(loaded.class_names)] if classification else ["N", 1, h, w],
            "activation": activation,
        },
        "class_names": loaded.class_names,
        "channels": c,
        "normalisation": {
            "mean": meta["mean"],
            "std": meta["std"],
            "formula": "x_model = (x - mean) / std, x = intensity in [0, 1]",
        },
        "preprocessing": prep,
        "steps": [
            "Read the image as grayscale intensities in [0, 1], higher = more attenuation (bones "
            "bright). DICOM: Modality LUT, then the VOI window "
            f"({prep['dicom_windowing']!r}: the header's window, else the "
            f"{prep['dicom_percentiles']} percentiles of the pixel values), MONOCHROME1 "
            "inverted, padding pixels set to 0. PNG/JPEG/TIFF: value / (2**bits - 1), colour "
            "images by BT.601 luma.",
            f"Resize (bilinear, antialiased) so that the long side is {prep['store_image_size']} "
            "px, keeping the aspect ratio; centre it in a square of that side padded with 0; "
            "quantise to 8 bits (round(x * 255)).",
            f"Resize the square to {prep['img_size']} x {prep['img_size']} (bilinear, "
            "antialiased, align_corners=False) and divide by 255.",
            f"Normalise: (x - {meta['mean']}) / {meta['std']}"
            + (f"; repeat the gray channel {c} times." if c > 1 else "."),
            f"Apply {activation} to the output.",
        ],
        "onnx": onnx,
    }


def export(config: ExportConfig) -> Path:
    """Exports a run's model (see the module docstring).

    Returns:
        The export folder.

    Raises:
        FileNotFoundError: no model in the run folder. ValueError: a model without recorded
        preprocessing, or an ONNX file whose outputs differ from PyTorch's.
    """
    if not config.run:
        raise ValueError("export: --run is required (a fine-tuning or segmentation run folder)")
    if config.report and not Path(config.report).exists():
        raise FileNotFoundError(f"export: --report {config.report}: no such file or folder")
    loaded = load_model(config.run)  # safetensors + JSON only
    out = Path(config.out)
    if out.resolve() == loaded.folder.resolve():
        raise ValueError(f"export: --out {out} is the model's own folder")
    writable_folder(out, "--out")
    source = {
        "model_dir": str(loaded.folder.resolve()),
        "weights_sha256": loaded.meta.get("weights_sha256"),
    }
    _save_full_model(loaded, out, source)
    model = loaded.model.cpu().eval()
    encoder_extra = {
        "task": loaded.task,
        "exported_from": source["model_dir"],
        "preprocessing": loaded.meta["extra"]["preprocessing"],
    }
    save_encoder(
        model.encoder,
        out / "encoder",
        mean=loaded.meta["mean"],
        std=loaded.meta["std"],
        extra_config=encoder_extra,
    )
    files = {
        "model.safetensors": "the full model (spcxr: `load_classifier` / `load_segmenter`, or "
        "`spcxr predict --run` on this folder)",
        "encoder/": 'the ViT encoder for timm: `timm.create_model("local-dir:encoder", '
        "pretrained=True)`",
    }
    onnx_record = None
    if config.onnx and importlib.util.find_spec("onnx") is None:
        # onnx is a default dependency; an install without it still gets every other file.
        print(
            "spcxr export: ONNX skipped (the onnx package is not installed: "
            "pip install 'spcxr[onnx]'); every other file was written",
            file=sys.stderr,
        )
        onnx_record = {"file": None, "skipped": "onnx is not installed"}
    elif config.onnx:
        output = "logits" if loaded.task == "classification" else "mask_logits"
        input_shape = tuple(loaded.meta["input_size"])
        path = export_onnx(
            model, out / "model.onnx", input_shape, output_name=output, opset=config.opset
        )
        onnx_record = {"file": "model.onnx", "opset": config.opset, "check": None}
        x = torch.randn(3, *input_shape, generator=torch.Generator().manual_seed(1))
        try:
            onnx_record["check"] = check_onnx(path, model, x)
        except ImportError:
            log.warning("onnxruntime is not installed: %s was not checked against PyTorch", path)
        check = onnx_record["check"]
        if check is not None and not check["ok"]:
            raise ValueError(
                f"{path}: ONNX Runtime and PyTorch differ by {check['max_abs_diff']:.3g} "
                f"(tolerance {check['tolerance']:.3g}): the export is wrong"
            )
        files["model.onnx"] = (
            f"the full model for ONNX Runtime (opset {config.opset}, dynamic batch)"
            + (
                f"; max |ONNX Runtime - PyTorch| = {check['max_abs_diff']:.2g} on a random "
                f"batch of {check['batch']}"
                if check
                else ""
            )
        )
    encoder_arch = json.loads((out / "encoder" / "config.json").read_text())["architecture"]
    record = _preprocessing_json(loaded, encoder_arch, onnx_record)
    atomic_write_text(out / "preprocessing.json", json.dumps(record, indent=2))
    files["preprocessing.json"] = "input size, channels, normalisation, classes, preprocessing"

    run_dir = run_record_dir(loaded.folder)
    training = out / "training"
    if run_dir is not None and run_dir.resolve() != training.resolve():
        training.mkdir(exist_ok=True)
        for name in ("run.json", "config.yaml"):
            if (run_dir / name).is_file():
                shutil.copyfile(run_dir / name, training / name)
        if (run_dir / "origin.json").is_file():  # an export of an export: keep the first origin
            shutil.copyfile(run_dir / "origin.json", training / "origin.json")
        else:
            origin = {"run": str(run_dir.resolve()), "model_dir": source["model_dir"]}
            atomic_write_text(training / "origin.json", json.dumps(origin, indent=2))
        files["training/"] = "the run's run.json and config.yaml (what the card is built from)"

    card = model_card(out, report=config.report, files=files)
    write_model_card(out / "MODEL_CARD.md", card)
    log.info("exported %s to %s", loaded.folder, out)
    return out
