"""``spcxr predict``: a trained model applied to image files, one CSV row per image.

Inputs are files, folders (searched recursively) and glob patterns of DICOM, PNG, JPEG and TIFF
images. Every image goes through the preprocessing recorded with the model at training time
(``model.json`` -> ``extra.preprocessing``, written by
:func:`spcxr.tasks.loop.preprocessing_record`), never a re-guessed one:

    raw file -> spcxr.io.read_image (the run's DICOM windowing and percentiles)
             -> spcxr.data.prepare.fit_square(store_image_size) -> uint8 (as ``spcxr prepare``)
             -> spcxr.data.augment.eval_transform(img_size) -> (x - mean) / std -> model

so an image gives the probabilities the evaluation path gives for the same image in a store.
Files are decoded by a pool of threads (or processes) while the model runs on the previous
batch; the model runs batched on the device, with bf16 autocast on CUDA and on CPUs with native
bf16 (``precision``).

Outputs: ``file, status ("ok" / "error"), error, height, width`` and

* classification runs: ``p_<class>`` per class, ``predicted`` (the top class; for multi-label
  runs the findings with probability >= 0.5, ``;``-separated) and, with heatmaps,
  ``heatmap_file`` (an overlay PNG of the Integrated-Gradients map of the predicted class,
  :mod:`spcxr.explain.heatmaps`) and ``heatmap_completeness_gap``;
* segmentation runs: ``lung_area_fraction`` and ``lung_area_px`` (lung pixels at the original
  resolution), ``mask_file`` (PNG 0/255 at the original resolution: the square padding of
  ``fit_square`` is undone) and ``overlay_file``.

Overlays are drawn on the image as the model saw it before resizing (the store-size square,
cropped to the content: its long side is ``store_image_size``). An input that cannot be read
gets a row with ``status = "error"`` and the reason; the other inputs are still predicted.
Output file paths in the CSV are relative to the CSV's folder when they lie inside it.
"""

from __future__ import annotations

import concurrent.futures as cf
import errno
import glob
import hashlib
import json
import logging
import multiprocessing
import os
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from spcxr.atomic import atomic_write_text, naming
from spcxr.data.augment import AugmentConfig, eval_transform
from spcxr.data.prepare import fit_square
from spcxr.explain.heatmaps import explain, heatmap_overlay, mask_overlay, save_png, upsample_maps
from spcxr.io import DEFAULT_MAX_PIXELS, DicomOptions, ImageReadError, read_image
from spcxr.io.types import IMAGE_SUFFIXES, is_dicom_file
from spcxr.train.distributed import autocast, resolve_device, resolve_precision

log = logging.getLogger(__name__)

__all__ = [
    "IMAGE_SUFFIXES",
    "BatchPredictor",
    "Decoded",
    "LoadedModel",
    "PredictConfig",
    "PredictStats",
    "Preprocessing",
    "decode",
    "expand_inputs",
    "load_model",
    "model_folder",
    "original_grid",
    "predict",
    "run_predict",
]

_GLOB_CHARS = frozenset("*?[")
_MIN_SIDE = 8  # as spcxr prepare: smaller images are unusable
_MODEL_META = "model.json"


HEATMAP_CHOICES = ("off", "positive", "all")


@dataclass
class PredictConfig:
    """Settings of ``spcxr predict`` (every field is a CLI flag and a YAML key).

    Attributes:
        run: a fine-tuning or segmentation run folder (its ``model/`` is used), or a folder
            written by ``spcxr export``.
        inputs: image files, folders (searched recursively for .dcm .dicom .png .jpg .jpeg .tif
            .tiff, and other files that carry the DICOM "DICM" marker) and glob patterns
            (``**`` allowed).
        out: the CSV written, one row per image.
        batch_size: images per model batch.
        device: ``auto`` (CUDA when available), ``cpu`` or ``cuda[:i]``.
        precision: ``auto`` (bf16 autocast on CUDA and on CPUs with AMX or AVX512-BF16, else
            float32), ``fp32`` or ``bf16`` (an error on a CPU without native bf16).
        heatmaps: explanation overlays (classification runs; Integrated Gradients of the
            predicted class, ``heatmap_steps + 1`` forward/backward passes each, so they cost
            far more than the prediction): ``off`` (default), ``positive`` (images predicted as
            anything but the first class, e.g. not ``normal``; multi-label: any finding) or
            ``all``.
        heatmap_steps: path-integral steps of the explanation maps.
        heatmap_dir: folder of the overlays (default: ``<out stem>_heatmaps`` next to the CSV).
        masks_dir: folder of the masks and mask overlays of segmentation runs (default:
            ``<out stem>_masks`` next to the CSV).
        workers: threads (or processes) decoding files while the model runs (0: decode in the
            main thread).
        processes: decode in worker processes instead of threads (DICOM parsing holds Python's
            GIL; PNG/JPEG decoding mostly does not).
        max_pixels: an image whose header declares more pixels gets an error row instead of
            being decoded (bounds each decoder's memory). 0: no limit.
        progress: show a progress bar.
    """

    run: str = ""
    inputs: list[str] = field(default_factory=list)
    out: str = "predictions.csv"
    batch_size: int = 64
    device: str = "auto"
    precision: str = "auto"
    heatmaps: str = "off"
    heatmap_steps: int = 16
    heatmap_dir: str = ""
    masks_dir: str = ""
    workers: int = 4
    processes: bool = False
    max_pixels: int = DEFAULT_MAX_PIXELS
    progress: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.heatmaps, bool):  # `heatmaps: true` in an older YAML file
            self.heatmaps = "all" if self.heatmaps else "off"
        if self.heatmaps not in HEATMAP_CHOICES:
            raise ValueError(
                f"--heatmaps must be one of {', '.join(HEATMAP_CHOICES)}, got {self.heatmaps!r}"
            )
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.workers < 0:
            raise ValueError(f"workers must be >= 0, got {self.workers}")
        if self.heatmap_steps < 1:
            raise ValueError(f"heatmap_steps must be >= 1, got {self.heatmap_steps}")
        if self.max_pixels < 0:
            raise ValueError(f"--max-pixels must be >= 0 (0: no limit), got {self.max_pixels}")


# ---------------------------------------------------------------------------------------------
# inputs


def _link_problem(path: Path) -> str | None:
    """Why a symbolic link cannot be followed (a loop, a missing target), else ``None``."""
    if not path.is_symlink():
        return None
    try:
        path.stat()
    except FileNotFoundError:
        return "dangling symbolic link (its target does not exist)"
    except OSError as err:
        return "symbolic link loop" if err.errno == errno.ELOOP else f"cannot follow link: {err}"
    return None


def _folder_images(folder: Path, problems: list[tuple[str, str]]) -> Iterator[Path]:
    """Image files under ``folder`` (recursive; hidden files and folders skipped).

    A sub-folder that cannot be listed goes to ``problems`` (and is logged as a warning);
    files that cannot be followed are yielded, and :func:`expand_inputs` reports them.
    """

    def unlistable(err: OSError) -> None:
        where = err.filename or str(folder)
        problems.append((str(where), f"cannot list folder: {err.strerror or err}"))
        log.warning("predict: cannot list folder %s (%s): skipped", where, err.strerror or err)

    for root, dirs, files in os.walk(folder, onerror=unlistable):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if name.startswith("."):
                continue
            path = Path(root) / name
            if path.suffix.lower() in IMAGE_SUFFIXES or is_dicom_file(path):
                yield path
            elif (reason := _link_problem(path)) is not None:
                # os.walk lists a looping or dangling link (to a folder, an extensionless
                # DICOM, ...) as a file: report it rather than drop it.
                problems.append((str(path), reason))


def expand_inputs(inputs: Sequence[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """Files named by ``inputs``: sorted, each once.

    A file named directly or matched by a glob pattern is taken whatever its extension (if it
    is no image, its row says so); folders, also those a pattern matches, contribute their
    image files (see :class:`PredictConfig`). Duplicates (the same file reached twice, also
    through different spellings) are dropped.

    Returns:
        ``(files, problems)``: the file paths (as found), and ``(input, reason)`` for inputs that
        name nothing (no such path, a pattern without matches).
    """
    found: dict[Path, str] = {}
    problems: list[tuple[str, str]] = []

    def add(path: Path) -> None:
        reason = _link_problem(path)
        if reason is not None:  # resolve() would raise on a loop and abort every input
            problems.append((str(path), reason))
        else:
            found.setdefault(path.resolve(), str(path))

    for item in inputs:
        if _GLOB_CHARS & set(item):
            matches = sorted(glob.glob(item, recursive=True))
            if not matches:
                problems.append((item, "no file matches this pattern"))
            paths = [Path(m) for m in matches]
        else:
            paths = [Path(item)]
            if not paths[0].exists():
                problems.append((item, _link_problem(paths[0]) or "no such file or folder"))
                continue
        for path in paths:
            if path.is_dir():
                for image in _folder_images(path, problems):
                    add(image)
            else:
                add(path)
    return sorted(found.values()), problems


# ---------------------------------------------------------------------------------------------
# model and preprocessing


@dataclass(frozen=True)
class Preprocessing:
    """How raw files become model inputs, as recorded at training time.

    Attributes:
        store_image_size: side of the square the image is fitted into (uint8, as in the store).
        img_size: model input side.
        mean: intensity mean of the normalisation (images in [0, 1]).
        std: intensity scale of the normalisation.
        dicom: DICOM windowing of the run's store.
    """

    store_image_size: int
    img_size: int
    mean: float
    std: float
    dicom: DicomOptions

    @classmethod
    def from_record(cls, record: Mapping[str, Any] | None, where: str | Path) -> Preprocessing:
        """From :func:`spcxr.tasks.loop.preprocessing_record`'s dict.

        Raises:
            ValueError: no record, or one without the needed keys (nothing is guessed).
        """
        if not record:
            raise ValueError(
                f"{where}: the model records no preprocessing (model.json extra.preprocessing); "
                "spcxr does not guess how a model's inputs were made: use a model saved by "
                "spcxr finetune / segment / export"
            )
        try:
            low, high = (float(v) for v in record["dicom_percentiles"])
            return cls(
                store_image_size=int(record["store_image_size"]),
                img_size=int(record["img_size"]),
                mean=float(record["mean"]),
                std=float(record["std"]),
                dicom=DicomOptions(windowing=record["dicom_windowing"], percentiles=(low, high)),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(
                f"{where}: invalid preprocessing record {dict(record)}: {err}"
            ) from err

    @property
    def norm(self) -> AugmentConfig:
        """The normalisation as the augmentation module's config (what eval_transform takes)."""
        return AugmentConfig(out_size=self.img_size, mean=self.mean, std=self.std)

    def model_input(self, images_u8: Tensor, in_chans: int) -> Tensor:
        """uint8 squares ``[B, 1, S, S]`` (any device) -> normalised ``[B, C, img, img]``."""
        x = eval_transform(images_u8, self.img_size, self.norm)
        return x if in_chans == 1 else x.expand(-1, in_chans, -1, -1)


@dataclass
class LoadedModel:
    """A model loaded for inference (weights from safetensors only).

    Attributes:
        model: the classifier or segmenter, in eval mode, on the CPU.
        meta: its ``model.json``.
        folder: the folder it was read from.
        task: ``"classification"`` or ``"segmentation"``.
        preprocessing: the recorded preprocessing.
        class_names: one name per logit (classification), else empty.
        multilabel: sigmoid outputs per finding (else softmax over classes).
    """

    model: nn.Module
    meta: dict[str, Any]
    folder: Path
    task: str
    preprocessing: Preprocessing
    class_names: list[str]
    multilabel: bool

    @property
    def in_chans(self) -> int:
        return int(self.meta["config"]["in_chans"])


def model_folder(run: str | os.PathLike[str]) -> Path:
    """The model folder of ``run``: ``run/model`` (a training run) or ``run`` (an export).

    Raises:
        FileNotFoundError: neither holds ``model.json`` (checkpoint pickles are never used).
    """
    run = Path(run)
    for candidate in (run / "model", run):
        if (candidate / _MODEL_META).is_file():
            return candidate
    if not run.exists():
        raise FileNotFoundError(f"{run}: no such run folder")
    raise FileNotFoundError(
        f"{run}: no model here: expected {run}/model/{_MODEL_META} (a run of spcxr finetune or "
        f"segment) or {run}/{_MODEL_META} (a folder written by spcxr export), with "
        "model.safetensors; spcxr does not load checkpoint pickles for inference"
    )


def load_model(run: str | os.PathLike[str]) -> LoadedModel:
    """Loads the model of a run or export folder, and its recorded preprocessing.

    Only ``model.safetensors`` and ``model.json`` are read: nothing is unpickled.
    """
    from spcxr.data.labels import LabelConfig
    from spcxr.models.classifier import load_classifier
    from spcxr.models.segmentation import load_segmenter

    folder = model_folder(run)
    try:
        task = json.loads((folder / _MODEL_META).read_text(encoding="utf-8")).get("task")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as err:
        raise ValueError(f"{folder / _MODEL_META}: not a valid model description ({err})") from err
    if task == "classification":
        model, meta = load_classifier(folder)
        labels = meta.get("extra", {}).get("labels") or {}
        multilabel = LabelConfig(**labels).multilabel if labels else False
        class_names = list(meta["class_names"])
    elif task == "segmentation":
        model, meta = load_segmenter(folder)
        multilabel, class_names = False, []
    else:
        raise ValueError(f"{folder / _MODEL_META}: unknown task {task!r}")
    prep = Preprocessing.from_record(meta.get("extra", {}).get("preprocessing"), folder)
    if prep.img_size != int(meta["config"]["img_size"]):
        raise ValueError(
            f"{folder}: preprocessing img_size {prep.img_size} differs from the model's "
            f"{meta['config']['img_size']}"
        )
    _warn_if_unfinished(folder)
    return LoadedModel(model.eval(), meta, folder, task, prep, class_names, multilabel)


def _warn_if_unfinished(folder: Path) -> None:
    """Predicting with (or exporting) a stopped run's model is allowed, never silently."""
    from spcxr.modelcard import run_record_dir
    from spcxr.tasks.loop import UNFINISHED_MODEL, unfinished_reason

    record = run_record_dir(folder)
    if record is None:
        return
    try:
        info = json.loads((record / "run.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return  # the model card and evaluate say what is wrong with it
    if isinstance(info, dict) and "kind" in info and "finished" not in info:
        log.warning(
            "%s: its run has not finished (%s): %s",
            folder,
            unfinished_reason(info),
            UNFINISHED_MODEL,
        )


# ---------------------------------------------------------------------------------------------
# decoding


@dataclass
class Decoded:
    """One input file after reading and fitting into the square.

    Attributes:
        file: the path as listed.
        image: uint8 ``[S, S]`` (``None`` on error).
        box: ``(top, left, height, width)`` of the content inside the square.
        shape: ``(height, width)`` of the original image.
        error: why it could not be read ("" when it could).
        seconds: time spent reading and fitting.
    """

    file: str
    image: np.ndarray | None = None
    box: tuple[int, int, int, int] | None = None
    shape: tuple[int, int] | None = None
    error: str = ""
    seconds: float = 0.0

    @property
    def content(self) -> np.ndarray:
        """The image as the model saw it before resizing: the square cropped to the content."""
        if self.image is None or self.box is None:
            raise ValueError(f"{self.file}: not decoded ({self.error})")
        return _content(self.image, self.box)


def decode(file: str, prep: Preprocessing, max_pixels: int | None = None) -> Decoded:
    """Reads ``file`` and fits it into the store-size square; errors become ``Decoded.error``.

    ``max_pixels`` refuses an image by its header size, before decoding it.
    """
    started = time.perf_counter()
    try:
        pixels = read_image(file, dicom=prep.dicom, max_pixels=max_pixels).pixels
        if pixels.ndim != 2 or min(pixels.shape) < _MIN_SIDE:
            raise ImageReadError(file, f"unusable image shape {tuple(pixels.shape)}")
        image, box = fit_square(pixels, prep.store_image_size)
        shape = (int(pixels.shape[0]), int(pixels.shape[1]))
        return Decoded(file, image, box, shape, seconds=time.perf_counter() - started)
    except ImageReadError as err:
        reason = err.reason
    except Exception as err:  # a decoder bug must not stop the other files
        reason = f"{type(err).__name__}: {err}"
    return Decoded(file, error=reason, seconds=time.perf_counter() - started)


def _ordered_map(
    fn: Callable[[str], Decoded], items: Sequence[str], pool: cf.Executor | None, ahead: int
) -> Iterator[Decoded]:
    """``map(fn, items)`` in order, at most ``ahead`` items in flight in ``pool``."""
    if pool is None:
        yield from map(fn, items)
        return
    pending: deque[cf.Future[Decoded]] = deque()
    source = iter(items)
    for item in source:
        pending.append(pool.submit(fn, item))
        if len(pending) >= ahead:
            break
    while pending:
        done = pending.popleft()
        for item in source:
            pending.append(pool.submit(fn, item))
            break
        yield done.result()


def _decoder_pool(workers: int, processes: bool) -> cf.Executor | None:
    if workers == 0:
        return None
    if processes:
        # spawn: forking a process that holds torch's thread pools can deadlock.
        return cf.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
    return cf.ThreadPoolExecutor(workers, thread_name_prefix="spcxr-decode")


# ---------------------------------------------------------------------------------------------
# outputs


def _output_name(file: str, suffix: str) -> str:
    """``<stem>_<8 hex of the full path>_<suffix>.png``: unique for equal names in two folders."""
    digest = hashlib.blake2b(str(Path(file).resolve()).encode(), digest_size=4).hexdigest()
    return f"{Path(file).stem}_{digest}_{suffix}.png"


def _shown(path: Path, base: Path) -> str:
    """``path`` relative to ``base`` when inside it, else absolute."""
    path, base = path.resolve(), base.resolve()
    return str(path.relative_to(base)) if path.is_relative_to(base) else str(path)


def _content(image: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    top, left, height, width = box
    return image[top : top + height, left : left + width]


def original_grid(
    box: tuple[int, int, int, int], shape: tuple[int, int], square: int, device: torch.device
) -> Tensor:
    """``grid_sample`` coordinates of every original pixel's centre in the model's square.

    ``fit_square`` maps the ``H x W`` original onto the content box ``(top, left, h, w)`` of an
    ``S x S`` square, edge to edge; a model output covering the square is sampled there (with
    ``align_corners=False``, -1 and 1 are the square's outer edges).

    Returns:
        ``[1, H, W, 2]`` (x, y) in [-1, 1].
    """
    top, left, height, width = box
    rows, cols = shape
    y = (top + (torch.arange(rows, device=device) + 0.5) * (height / rows)) * (2.0 / square) - 1
    x = (left + (torch.arange(cols, device=device) + 0.5) * (width / cols)) * (2.0 / square) - 1
    grid_y, grid_x = torch.meshgrid(y, x, indexing="ij")
    return torch.stack([grid_x, grid_y], dim=-1)[None].float()


@dataclass
class PredictStats:
    """Where the time of a prediction went.

    Attributes:
        images: images predicted.
        errors: inputs that got an error row.
        seconds: wall time of the whole call (model loading excluded).
        decode_seconds: reading + fitting time summed over the decoding workers.
        wait_seconds: time the main loop waited for decoded images (the model idle).
        model_seconds: transfer, preprocessing on the device and the model (and explanations).
        write_seconds: time spent at the end waiting for PNG writes still in flight (masks and
            overlays are encoded by a small thread pool while the model runs).
    """

    images: int = 0
    errors: int = 0
    seconds: float = 0.0
    decode_seconds: float = 0.0
    wait_seconds: float = 0.0
    model_seconds: float = 0.0
    write_seconds: float = 0.0


class BatchPredictor:
    """One loaded model applied to batches of decoded images, without writing anything.

    Shared by ``spcxr predict`` (which writes the images to files) and ``spcxr serve`` (which
    sends them back), so both give the same numbers for the same image.

    Args:
        loaded: the model (moved to ``device`` here).
        device: where the model runs.
        precision: ``auto``, ``fp32`` or ``bf16`` (autocast; see
            :func:`~spcxr.train.distributed.resolve_precision`).
        heatmap_steps: path-integral steps of the explanation maps.
        max_batch: images per forward pass of the explanation.
    """

    def __init__(
        self,
        loaded: LoadedModel,
        device: torch.device,
        *,
        heatmap_steps: int = 16,
        max_batch: int = 64,
        precision: str = "auto",
    ) -> None:
        self.loaded = loaded
        self.device = device
        self.model = loaded.model.to(device).eval()
        self.precision = resolve_precision(precision, device)
        self.heatmap_steps = heatmap_steps
        self.max_batch = max_batch

    def __call__(
        self, ok: Sequence[Decoded], heatmaps: bool | str = False
    ) -> list[tuple[dict[str, Any], dict[str, np.ndarray]]]:
        """Predicts decoded images (none with an error).

        ``heatmaps``: explain every image (``True`` / ``"all"``), the positive ones
        (``"positive"``: predicted as anything but the first class; multi-label: any finding)
        or none (``False`` / ``"off"``).

        Returns:
            Per image ``(values, images)``: ``values`` are the CSV columns of the prediction
            (``p_<class>``, ``predicted`` and, with ``heatmaps``, ``heatmap_completeness_gap``;
            or ``lung_area_fraction``, ``lung_area_px``), ``images`` the pictures: ``heatmap``
            (RGB overlay, classification with ``heatmaps``), ``mask`` (0/255 at the original
            resolution) and ``overlay`` (RGB) for segmentation.
        """
        if not ok:
            return []
        images = torch.from_numpy(np.stack([d.image for d in ok]))[:, None]
        if self.device.type == "cuda":
            images = images.pin_memory()
        images = images.to(self.device, non_blocking=True)
        x = self.loaded.preprocessing.model_input(images, self.loaded.in_chans)
        if self.loaded.task == "classification":
            return self._classify(x, ok, heatmaps)
        return self._segment(x, ok)

    def _classify(
        self, x: Tensor, ok: Sequence[Decoded], heatmaps: bool | str
    ) -> list[tuple[dict[str, Any], dict[str, np.ndarray]]]:
        names = self.loaded.class_names
        with torch.no_grad(), autocast(self.device, self.precision):
            logits = self.model(x).float()
        prob = (torch.sigmoid(logits) if self.loaded.multilabel else logits.softmax(-1)).cpu()
        out: list[tuple[dict[str, Any], dict[str, np.ndarray]]] = []
        for p in prob.numpy():
            row: dict[str, Any] = {f"p_{c}": float(v) for c, v in zip(names, p, strict=True)}
            if self.loaded.multilabel:
                row["predicted"] = ";".join(c for c, v in zip(names, p, strict=True) if v >= 0.5)
            else:
                row["predicted"] = names[int(p.argmax())]
            out.append((row, {}))
        chosen = self._explained(prob, heatmaps)
        if len(chosen):
            for row, _ in out:
                row["heatmap_completeness_gap"] = float("nan")
            on = chosen.to(x.device)
            with autocast(self.device, self.precision):
                found = explain(
                    self.model,
                    x[on],
                    logits.argmax(dim=1)[on],
                    steps=self.heatmap_steps,
                    multilabel=self.loaded.multilabel,
                    max_batch=self.max_batch,
                )
            square = self.loaded.preprocessing.store_image_size
            heat = upsample_maps(found.maps, square).cpu().numpy()
            for j, i in enumerate(chosen.tolist()):
                d, (row, pictures) = ok[i], out[i]
                pictures["heatmap"] = heatmap_overlay(d.content, _content(heat[j], d.box))
                row["heatmap_completeness_gap"] = float(found.completeness_gap[j])
        return out

    def _explained(self, prob: Tensor, heatmaps: bool | str) -> Tensor:
        """Indices of the images to explain: ``all`` (or True), ``positive`` or none."""
        if heatmaps is True or heatmaps == "all":
            chosen = torch.ones(len(prob), dtype=torch.bool)
        elif heatmaps == "positive" and self.loaded.multilabel:
            chosen = (prob >= 0.5).any(dim=1)
        elif heatmaps == "positive":
            chosen = prob.argmax(dim=1) != 0  # the first class is the reference (normal)
        else:
            chosen = torch.zeros(len(prob), dtype=torch.bool)
        return torch.nonzero(chosen).flatten()

    def _segment(
        self, x: Tensor, ok: Sequence[Decoded]
    ) -> list[tuple[dict[str, Any], dict[str, np.ndarray]]]:
        with torch.no_grad(), autocast(self.device, self.precision):
            logits = self.model(x).float()  # [B, 1, img, img]
        square = self.loaded.preprocessing.store_image_size
        size = (square, square)
        with torch.no_grad():
            on_square = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
        on_square = on_square[:, 0].cpu().numpy()
        out: list[tuple[dict[str, Any], dict[str, np.ndarray]]] = []
        for i, d in enumerate(ok):
            grid = original_grid(d.box, d.shape, square, self.device)
            with torch.no_grad():
                sampled = F.grid_sample(
                    logits[i : i + 1], grid, mode="bilinear", align_corners=False
                )
            mask = (sampled[0, 0] > 0).cpu().numpy()  # probability > 0.5
            overlay = mask_overlay(d.content, _content(on_square[i], d.box) > 0)
            area = int(mask.sum())
            out.append(
                (
                    {"lung_area_fraction": area / mask.size, "lung_area_px": area},
                    {"mask": mask.astype(np.uint8) * 255, "overlay": overlay},
                )
            )
        return out


class _Predictor:
    """Runs one loaded model over batches of decoded images and builds the CSV rows."""

    def __init__(self, loaded: LoadedModel, config: PredictConfig, device: torch.device) -> None:
        self.loaded = loaded
        self.config = config
        self.device = device
        self.core = BatchPredictor(
            loaded,
            device,
            heatmap_steps=config.heatmap_steps,
            max_batch=max(config.batch_size, 64),
            precision=config.precision,
        )
        out = Path(config.out)
        self.base = out.parent
        self.heatmap_dir = Path(config.heatmap_dir or out.parent / f"{out.stem}_heatmaps")
        self.masks_dir = Path(config.masks_dir or out.parent / f"{out.stem}_masks")
        self.writes: deque[cf.Future[Path]] = deque()
        self.writer = cf.ThreadPoolExecutor(2, thread_name_prefix="spcxr-png")
        # Back-pressure: masks at the original resolution are megabytes each, so a model faster
        # than PNG encoding must not queue them without bound.
        self.max_pending = 4 * config.batch_size
        self.heatmaps = config.heatmaps != "off" and loaded.task == "classification"

    def columns(self) -> list[str]:
        cols = ["file", "status", "error", "height", "width"]
        if self.loaded.task == "segmentation":
            return [*cols, "lung_area_fraction", "lung_area_px", "mask_file", "overlay_file"]
        cols += [f"p_{c}" for c in self.loaded.class_names] + ["predicted"]
        if self.heatmaps:
            cols += ["heatmap_file", "heatmap_completeness_gap"]
        return cols

    def _write(self, array: np.ndarray, path: Path) -> str:
        while self.writes and (self.writes[0].done() or len(self.writes) >= self.max_pending):
            self.writes.popleft().result()  # a failed write (disk full, ...) fails the run
        self.writes.append(self.writer.submit(_save_png_named, array, path))
        return _shown(path, self.base)

    def close(self) -> None:
        self.writer.shutdown(wait=True)
        while self.writes:
            self.writes.popleft().result()

    def rows(self, batch: list[Decoded]) -> list[dict[str, Any]]:
        ok = [d for d in batch if not d.error]
        rows = {id(d): _error_row(d.file, d.error) for d in batch if d.error}
        folders = {"heatmap": self.heatmap_dir, "mask": self.masks_dir, "overlay": self.masks_dir}
        heatmaps = self.config.heatmaps if self.heatmaps else "off"
        for d, (values, pictures) in zip(ok, self.core(ok, heatmaps), strict=True):
            files = {
                f"{kind}_file": self._write(array, folders[kind] / _output_name(d.file, kind))
                for kind, array in pictures.items()
            }
            rows[id(d)] = {
                "file": d.file,
                "status": "ok",
                "error": "",
                "height": d.shape[0],
                "width": d.shape[1],
                **values,
                **files,
            }
        return [rows[id(d)] for d in batch]


def _save_png_named(array: np.ndarray, path: Path) -> Path:
    """:func:`save_png`; an OS error (a full disk) names the file."""
    with naming(path):
        return save_png(array, path)


def _error_row(file: str, reason: str) -> dict[str, Any]:
    return {"file": file, "status": "error", "error": reason}


def run_predict(config: PredictConfig) -> tuple[pd.DataFrame, PredictStats]:
    """:func:`predict`, also returning where the time went."""
    if not config.run:
        raise ValueError("predict: --run is required (a run folder or an spcxr export)")
    if not config.inputs:
        raise ValueError("predict: name at least one INPUT (file, folder or glob pattern)")
    files, problems = expand_inputs(config.inputs)
    if not files and not problems:
        raise ValueError(f"predict: no image files found in {config.inputs}")
    device = resolve_device(config.device)
    loaded = load_model(config.run)
    predictor = _Predictor(loaded, config, device)
    stats = PredictStats(errors=len(problems))
    rows = [_error_row(item, reason) for item, reason in problems]
    started = time.perf_counter()
    pool = _decoder_pool(config.workers, config.processes)
    decode_one = partial(decode, prep=loaded.preprocessing, max_pixels=config.max_pixels or None)
    ahead = 2 * config.batch_size + config.workers
    bar = tqdm(total=len(files), unit="img", desc="predict", disable=not config.progress)
    try:
        decoded = _ordered_map(decode_one, files, pool, ahead)
        while True:
            t0 = time.perf_counter()
            batch = next(_batches_once(decoded, config.batch_size), None)
            t1 = time.perf_counter()
            if batch is None:
                break
            rows.extend(predictor.rows(batch))
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t2 = time.perf_counter()
            stats.wait_seconds += t1 - t0
            stats.model_seconds += t2 - t1
            stats.decode_seconds += sum(d.seconds for d in batch)
            stats.images += sum(not d.error for d in batch)
            stats.errors += sum(bool(d.error) for d in batch)
            bar.update(len(batch))
    finally:
        bar.close()
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        t3 = time.perf_counter()
        predictor.close()
        stats.write_seconds = time.perf_counter() - t3
    frame = pd.DataFrame(rows, columns=predictor.columns())
    frame = frame.sort_values("file", kind="stable").reset_index(drop=True)
    frame["error"] = frame["error"].fillna("")
    for column in ("height", "width", "lung_area_px"):
        if column in frame:
            frame[column] = frame[column].astype("Int64")  # integers, empty on error rows
    out = Path(config.out)
    atomic_write_text(out, frame.to_csv(index=False))
    stats.seconds = time.perf_counter() - started
    log.info(
        "predicted %d images (%d errors) in %.1f s on %s (%s): %s",
        stats.images,
        stats.errors,
        stats.seconds,
        device,
        predictor.core.precision,
        out,
    )
    return frame, stats


def _batches_once(items: Iterator[Decoded], size: int) -> Iterator[list[Decoded]]:
    """The next batch of ``items`` (at most one), so the caller can time each wait."""
    batch = [item for _, item in zip(range(size), items, strict=False)]
    if batch:
        yield batch


def predict(config: PredictConfig) -> pd.DataFrame:
    """Predicts every input image with a trained run (see the module docstring).

    Returns:
        The rows written to ``config.out`` (also for unreadable inputs, with their error).

    Raises:
        ValueError: no run or inputs, or a model without recorded preprocessing.
        FileNotFoundError: no model in the run folder.
    """
    return run_predict(config)[0]
