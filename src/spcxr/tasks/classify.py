"""``spcxr finetune``: classification from a GMML-pretrained encoder or from scratch.

The paper's claim is comparative (Anwar et al., arXiv 2211.12944): a GMML-pretrained ViT beats
the same ViT trained from random initialisation (the "supervised transformer"). The two runs here
differ only in ``--init``: data, label budget, recipe, seed and model selection are the same.

Rows: the training split of the selected sources (optionally a label budget drawn by patient,
:mod:`spcxr.data.budget`, or all folds but one for k-fold cross-validation); model selection on
the validation split (or, in k-fold mode, on the last step: the held-out fold is the evaluation
set and is never looked at while training).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from spcxr.checks import at_least, require
from spcxr.config import to_dict
from spcxr.data.augment import AugmentConfig, eval_transform
from spcxr.data.budget import kfold_groups, parse_budget, select_budget
from spcxr.data.finetune_augment import FinetuneAugmentConfig, augment_batch
from spcxr.data.labels import LabelConfig, resolve_classes, targets, usable
from spcxr.data.store import PreparedStore
from spcxr.models.classifier import (
    Classifier,
    ClassifierConfig,
    build_classifier,
    load_classifier,
    save_classifier,
)
from spcxr.rng import derive_seed
from spcxr.tasks.loop import (
    StepBatches,
    SupervisedTask,
    TrainConfig,
    class_weights,
    preprocessing_record,
    run_task,
)
from spcxr.train.distributed import autocast, resolve_precision

log = logging.getLogger(__name__)

NORM = AugmentConfig()  # spcxr's intensity normalisation (mean 0.5, std 0.25), as in pretraining


@dataclass
class FinetuneConfig:
    """Settings of ``spcxr finetune`` (every field is a CLI flag and a YAML key).

    Attributes:
        store: the prepared store.
        out: the run folder.
        init: ``scratch`` (the paper's supervised-transformer baseline), a GMML pretraining run
            folder, an exported encoder (folder or .safetensors) or a fine-tuned run folder.
        sources: train and validate on these sources only (empty: all).
        sites: train and validate on these sites (hospitals) only (empty: all).
        train_split: split the training rows come from.
        val_split: split used for model selection and early stopping.
        max_val_images: validate on at most this many images (a fixed patient-level,
            class-stratified subset; 0: all) - validation is run many times per run.
        budget: label budget: ``all``, a fraction (``0.1``, ``10%``), ``N/class`` or ``N``
            images, drawn by whole patients, stratified, nested across sizes for one seed.
        budget_seeds: repeated label draws, e.g. ``0-4`` or ``0,2,5``: one run per draw in
            ``OUT/draw-SEED`` (a finished draw is skipped); overrides ``budget_seed``.
        budget_seed: seed of the budget draw (vary it for repeated draws).
        n_folds: k-fold cross-validation over the labelled rows of ``cv_splits`` (0: off).
        fold: the held-out fold of this run (0 .. n_folds-1) when ``n_folds`` > 0.
        cv_splits: splits pooled for k-fold cross-validation (small sets: all of them).
        mode: ``finetune`` (all weights), ``linear`` (linear probing: frozen encoder) or
            ``probe_finetune`` (LP-FT, Kumar et al. ICLR 2022: the head is first trained on the
            frozen encoder, then everything is fine-tuned from that head, so the first
            full-network steps do not push a random head's gradients into pretrained features;
            reported to keep more out-of-distribution accuracy).
        probe_fraction: ``probe_finetune``: share of the run's steps with the encoder frozen;
            each phase has its own warm-up and cosine schedule.
        balance: class imbalance handling: ``weighted_loss`` (inverse frequency),
            ``sampler`` (class-balanced batches) or ``none``.
        label_smoothing: label smoothing of the cross-entropy (DeiT: 0.1).
        select: validation metric for model selection (``auto``: macro AUROC, ``loss``,
            ``balanced_accuracy``, ...; ``last``: no selection, the last step is kept).
        labels: which targets to learn.
        model: classifier architecture (must match the initialisation's encoder).
        augment: fine-tuning augmentation (batched, on the device).
        train: schedule, batching, optimiser, seed, device.
    """

    store: str = ""
    out: str = "runs/finetune"
    init: str = "scratch"
    sources: list[str] = field(default_factory=list)
    sites: list[str] = field(default_factory=list)
    train_split: str = "train"
    val_split: str = "val"
    max_val_images: int = 0
    budget: str = "all"
    budget_seed: int = 0
    budget_seeds: str = ""
    n_folds: int = 0
    fold: int = 0
    cv_splits: list[str] = field(default_factory=lambda: ["train", "val", "test"])
    mode: str = "finetune"
    probe_fraction: float = 0.5
    balance: str = "weighted_loss"
    label_smoothing: float = 0.1
    select: str = "auto"
    labels: LabelConfig = field(default_factory=LabelConfig)
    model: ClassifierConfig = field(default_factory=ClassifierConfig)
    augment: FinetuneAugmentConfig = field(default_factory=FinetuneAugmentConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {self.mode!r}")
        require(
            0 < self.probe_fraction < 1,
            "--probe-fraction",
            self.probe_fraction,
            "must be in (0, 1): both phases need steps",
        )
        if self.balance not in ("weighted_loss", "sampler", "none"):
            raise ValueError(
                f"balance must be weighted_loss, sampler or none, not {self.balance!r}"
            )
        self.train.validate("--train-")
        require(
            0 <= self.label_smoothing < 1,
            "--label-smoothing",
            self.label_smoothing,
            "must be in [0, 1)",
        )
        at_least(self.max_val_images, 0, "--max-val-images")


MODES = ("finetune", "linear", "probe_finetune")


@dataclass
class TaskRows:
    """The rows a run trains, selects and (for k-fold) holds out, with their targets."""

    classes: list[str]
    train: np.ndarray
    val: np.ndarray
    heldout: np.ndarray
    y_train: np.ndarray
    y_val: np.ndarray
    excluded: dict[str, int]


def select_rows(store: PreparedStore, config: FinetuneConfig) -> TaskRows:
    """Training / validation / held-out rows of a run (see :class:`FinetuneConfig`)."""
    m = store.manifest
    sources = config.sources or None
    labels = config.labels
    excluded: dict[str, int] = {}

    def labelled(rows: np.ndarray, classes: list[str], what: str) -> np.ndarray:
        if config.sites:
            rows = rows[m["site"].iloc[rows].isin(config.sites).to_numpy()]
        y = targets(m, rows, labels, classes)
        keep = usable(y)
        if (~keep).any():
            excluded[what] = int((~keep).sum())
        return rows[keep]

    if config.n_folds:
        if not 0 <= config.fold < config.n_folds:
            raise ValueError(f"fold {config.fold} is not in 0..{config.n_folds - 1}")
        pool = store.trainable(store.indices(config.cv_splits, source=sources))
        classes = resolve_classes(m, pool, labels)
        pool = labelled(pool, classes, "cv pool (missing or other label)")
        frame = m.iloc[pool].assign(_y=targets(m, pool, labels, classes).astype(str))
        folds = kfold_groups(frame, config.n_folds, seed=config.budget_seed, label_col="_y")
        heldout = pool[folds == config.fold]
        train = pool[folds != config.fold]
        val = np.array([], dtype=np.int64)
    else:
        train = store.indices(config.train_split, source=sources)
        if config.sites:
            train = train[m["site"].iloc[train].isin(config.sites).to_numpy()]
        classes = resolve_classes(m, train, labels)
        train = labelled(train, classes, "train (missing or other label)")
        val = labelled(
            store.indices(config.val_split, source=sources), classes, "val (missing or other label)"
        )
        heldout = np.array([], dtype=np.int64)
        if config.max_val_images and len(val) > config.max_val_images and not labels.multilabel:
            frame = m.iloc[val].assign(_y=targets(m, val, labels, classes).astype(str))
            cap = parse_budget(str(config.max_val_images))
            val = val[select_budget(frame, cap, seed=config.budget_seed, label_col="_y")]
    # External test sets (test-only sources) never reach training or selection.
    train, val = store.trainable(train), store.trainable(val)
    if len(train) == 0:
        raise ValueError(
            f"no training rows with a kept label in {config.store} (sources {config.sources or 'all'}, "
            f"split {config.train_split!r}, classes {classes}): check --sources and --labels-*"
        )
    budget = parse_budget(config.budget)
    if not labels.multilabel:
        frame = m.iloc[train].assign(_y=targets(m, train, labels, classes).astype(str))
        train = train[select_budget(frame, budget, seed=config.budget_seed, label_col="_y")]
    elif str(budget) != "all":
        raise ValueError("label budgets are implemented for single-label tasks only")
    return TaskRows(
        classes=classes,
        train=train,
        val=val,
        heldout=heldout,
        y_train=targets(m, train, labels, classes),
        y_val=targets(m, val, labels, classes),
        excluded=excluded,
    )


def prepare_inputs(images_u8: torch.Tensor, img_size: int, in_chans: int) -> torch.Tensor:
    """uint8 store images ``[B,1,S,S]`` -> normalised model input (whole image, resized)."""
    x = eval_transform(images_u8, img_size, NORM)
    return x if in_chans == 1 else x.expand(-1, in_chans, -1, -1)


@torch.no_grad()
def predict_store(
    model: Classifier,
    store: PreparedStore,
    rows: np.ndarray,
    *,
    img_size: int,
    in_chans: int,
    multilabel: bool,
    device: torch.device,
    batch_size: int = 256,
    precision: str = "auto",
) -> np.ndarray:
    """Class probabilities of ``rows`` (softmax, or sigmoid per finding; ``precision``: see
    :func:`~spcxr.train.distributed.resolve_precision`)."""
    model.eval()
    out = []
    precision = resolve_precision(precision, device)
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        images = torch.from_numpy(store.images(chunk)).unsqueeze(1).to(device)
        with autocast(device, precision):
            logits = model(prepare_inputs(images, img_size, in_chans)).float()
        out.append((torch.sigmoid(logits) if multilabel else logits.softmax(-1)).cpu())
    if not out:
        return np.zeros((0, 0), dtype=np.float32)
    return torch.cat(out).numpy()


def rows_digest(store: PreparedStore, rows: np.ndarray) -> str:
    """A fingerprint of exactly which images a set of rows is (their pixel hashes)."""
    h = hashlib.blake2b(digest_size=12)
    for value in store.manifest["pixel_hash"].iloc[np.sort(rows)].astype(str):
        h.update(value.encode())
    return h.hexdigest()


def describe_rows(store: PreparedStore, rows: np.ndarray, y: np.ndarray, classes: list[str]):
    """Counts for reports: images, patients, per class, per source."""
    m = store.manifest.iloc[rows]
    info: dict[str, Any] = {
        "images": len(rows),
        "patients": int(m["group"].nunique()),
        "sources": {k: int(v) for k, v in m["source"].value_counts().items()},
        "sites": {str(k): int(v) for k, v in m["site"].value_counts().items()},
        "digest": rows_digest(store, rows),
    }
    if y.ndim == 1:
        info["per_class"] = {c: int((y == i).sum()) for i, c in enumerate(classes)}
    else:
        info["positives"] = {c: int(np.nansum(y[:, i])) for i, c in enumerate(classes)}
    return info


SMALL_VALIDATION_PER_CLASS = 10
"""Fewer validation images than this in some class: model selection is mostly noise."""


def _warn_if_small_validation(y_val: np.ndarray, classes: list[str]) -> None:
    """Say when the validation split is too small for the step it picks to mean much.

    With a handful of validation images per class, macro AUROC jumps between far-apart values
    from one validation to the next (0.53, 0.10, 0.13 on 8 images of the synthetic set, and 0.0
    is possible), so "best validation" is mostly which step happened to rank those few images
    well, and the summary's figure is no estimate of the model's quality.
    """
    counts = {c: int((y_val == i).sum()) for i, c in enumerate(classes)}
    present = {c: n for c, n in counts.items() if n}
    if len(present) < 2:
        return  # one class or none: said where selection falls back to the loss
    fewest = min(present, key=present.__getitem__)
    if present[fewest] < SMALL_VALIDATION_PER_CLASS:
        log.warning(
            "validation split: %d image(s), only %d of class %r: the validation metric that picks "
            "the best step is noisy at this size, and its value in the summary is no estimate "
            "of the model's quality (a larger validation split, or --select last, and a test "
            "set for the estimate)",
            len(y_val),
            present[fewest],
            fewest,
        )


class ClassifyTask(SupervisedTask):
    """Fine-tuning a classifier (or a linear probe) on the rows of :func:`select_rows`."""

    kind = "classification"

    def __init__(self, config: FinetuneConfig) -> None:
        super().__init__(config, "finetune")
        self.rows = rows = select_rows(self.store, config)
        self.multilabel = config.labels.multilabel
        if not config.n_folds and len(rows.val) == 0:
            raise ValueError(
                f"no validation rows in split {config.val_split!r}: model selection needs them"
            )
        self.train_rows = rows.train
        self.y_train = torch.as_tensor(rows.y_train)
        self.pos_of = {int(r): i for i, r in enumerate(rows.train)}
        weights = None
        self.loss_weight = None
        if not self.multilabel:
            cw = class_weights(rows.y_train, len(rows.classes))
            if config.balance == "sampler":
                weights = cw[rows.y_train]
            elif config.balance == "weighted_loss":
                self.loss_weight = torch.as_tensor(cw, dtype=torch.float32, device=self.device)
        self.plan = StepBatches(rows.train, config.train.batch_size, config.train.seed, weights)
        select = config.select
        if select == "auto":
            select = "macro_auroc"
            if not self.multilabel and len(rows.val) and len(np.unique(rows.y_val)) < 2:
                # AUROC is undefined on a one-class validation set (tiny sets): select on the loss.
                log.warning("validation rows hold one class only: selecting on the validation loss")
                select = "loss"
        self.higher_is_better = select != "loss"
        if not config.n_folds and not self.multilabel:
            _warn_if_small_validation(rows.y_val, rows.classes)
        if config.n_folds:
            log.info("k-fold: no validation split; the last step is kept (no early stopping)")
            select = "last"
        self.select = select
        if config.mode == "probe_finetune":
            self.probe_fraction = config.probe_fraction

    def build_model(self) -> tuple[nn.Module, dict[str, Any]]:
        model, init_info = build_classifier(
            self.config.model, len(self.rows.classes), self.config.init
        )
        if self.config.mode == "linear":
            model.freeze_encoder()
        return model.to(self.device), init_info

    def loss(self, batch: dict[str, torch.Tensor], step: int) -> torch.Tensor:
        config = self.config
        x = eval_transform(batch["images"], config.model.img_size, NORM)
        gen = torch.Generator().manual_seed(derive_seed(config.train.seed, "augment", step))
        x, _ = augment_batch(x, config.augment, gen)
        if config.model.in_chans != 1:
            x = x.expand(-1, config.model.in_chans, -1, -1)
        logits = self.model(x).float()
        idx = torch.as_tensor([self.pos_of[int(r)] for r in batch["rows"].tolist()])
        y = self.y_train[idx].to(self.device)
        smoothing = config.label_smoothing
        if self.multilabel:
            known = ~torch.isnan(y)
            target = torch.nan_to_num(y) * (1 - smoothing) + smoothing / 2
            per = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
            return (per * known).sum() / known.sum().clamp_min(1)
        return F.cross_entropy(logits, y, weight=self.loss_weight, label_smoothing=smoothing)

    def validate(self) -> dict[str, float]:
        rows = self.rows
        eval_rows = rows.val if len(rows.val) else rows.train
        y_eval = rows.y_val if len(rows.val) else rows.y_train
        prob = predict_store(
            self.model,
            self.store,
            eval_rows,
            img_size=self.config.model.img_size,
            in_chans=self.config.model.in_chans,
            multilabel=self.multilabel,
            device=self.device,
            precision=self.precision,
        )
        return validation_metrics(y_eval, prob, rows.classes, self.multilabel)

    def save_best(self) -> None:
        config = self.config
        extra = {
            "labels": to_dict(config.labels),
            "init": self.init_info,
            "mode": config.mode,
            "preprocessing": preprocessing_record(self.store, config.model.img_size),
        }
        save_classifier(
            self.model, config.model, self.rows.classes, self.run_dir / "model", extra=extra
        )

    def describe(self) -> dict[str, Any]:
        config, store, rows = self.config, self.store, self.rows
        data = {
            "store": str(Path(config.store).resolve()),
            "store_fingerprint": store.fingerprint,
            "classes": rows.classes,
            "train": describe_rows(store, rows.train, rows.y_train, rows.classes),
            "val": describe_rows(store, rows.val, rows.y_val, rows.classes)
            if len(rows.val)
            else None,
            "budget": config.budget,
            "budget_seed": config.budget_seed,
            "excluded": rows.excluded,
        }
        if config.n_folds:
            y_held = targets(store.manifest, rows.heldout, config.labels, rows.classes)
            data["heldout"] = describe_rows(store, rows.heldout, y_held, rows.classes)
            data["heldout"]["rows"] = rows.heldout.tolist()
            data["fold"] = {"n_folds": config.n_folds, "fold": config.fold}
        return data


def finetune(config: FinetuneConfig) -> dict[str, Any]:
    """Train a classifier (see :class:`FinetuneConfig`); returns the run summary."""
    return run_task(ClassifyTask(config))


def validation_metrics(
    y: np.ndarray, prob: np.ndarray, classes: list[str], multilabel: bool
) -> dict[str, float]:
    """Scalars watched during training: loss, macro AUROC, balanced accuracy."""
    from spcxr.evaluation.metrics import classification_metrics, multilabel_metrics

    p = torch.as_tensor(prob).clamp(1e-7, 1 - 1e-7)
    if multilabel:
        yt = torch.as_tensor(y)
        known = ~torch.isnan(yt)
        bce = F.binary_cross_entropy(p, torch.nan_to_num(yt), reduction="none")
        loss = float((bce * known).sum() / known.sum().clamp_min(1))
        m = multilabel_metrics(y, prob, classes)
        return {"loss": loss, "macro_auroc": float(m["macro_auroc"])}
    loss = float(F.nll_loss(p.log(), torch.as_tensor(y)))
    m = classification_metrics(y, prob, classes)
    return {
        "loss": loss,
        "macro_auroc": float(m["macro_auroc"]),
        "balanced_accuracy": float(m["balanced_accuracy"]),
        "accuracy": float(m["accuracy"]),
    }


def load_run_model(run: str | Path, device: torch.device) -> tuple[nn.Module, dict, dict]:
    """The best model of a fine-tuning run, its model.json and its run.json."""
    run = Path(run)
    model, meta = load_classifier(run / "model")
    info = json.loads((run / "run.json").read_text())
    return model.to(device).eval(), meta, info
