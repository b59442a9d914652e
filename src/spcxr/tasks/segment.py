"""``spcxr segment``: lung segmentation with the pretrained ViT as encoder (or random, baseline).

The paper shows that one GMML pretraining also serves lung segmentation (Anwar et al., arXiv
2211.12944; METHOD.md section 2): a decoder turns ViT tokens into a full-resolution mask
(UNETR-style skips from intermediate blocks, or progressive upsampling), trained with Dice + BCE.

Masks across sources: every image of the training sources that has no mask is excluded and
counted; masks drawn with another convention (the V7 masks of covid_ieee8023 include the lung
behind the heart; Shenzhen / Montgomery masks do not) are evaluated and reported per source, never
pooled; "ignore" masks (devices, text) listed by a source are left out of the loss and metrics.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from spcxr.checks import at_least, require
from spcxr.data.augment import AugmentConfig, eval_transform
from spcxr.data.budget import parse_budget, select_budget
from spcxr.data.finetune_augment import FinetuneAugmentConfig, augment_batch
from spcxr.data.store import PreparedStore
from spcxr.models.segmentation import (
    Segmenter,
    SegmenterConfig,
    build_segmenter,
    load_segmenter,
    save_segmenter,
)
from spcxr.rng import derive_seed
from spcxr.tasks.classify import describe_rows
from spcxr.tasks.loop import (
    StepBatches,
    SupervisedTask,
    TrainConfig,
    preprocessing_record,
    run_task,
)
from spcxr.train.distributed import autocast, resolve_device, resolve_precision

log = logging.getLogger(__name__)

NORM = AugmentConfig()

#: How each public source draws its lung masks (reported next to its scores).
MASK_CONVENTIONS = {
    "shenzhen": "Stirenko et al. 2018: lung fields without the region behind the heart",
    "montgomery": "NLM: left + right lung fields (merged), without the region behind the heart",
    "ieee8023": "V7 Labs: includes the retro-cardiac lung (behind the heart); a different "
    "convention from Shenzhen / Montgomery",
    "synthetic": "exact phantom lung fields",
}


@dataclass
class SegmentConfig:
    """Settings of ``spcxr segment`` (every field is a CLI flag and a YAML key).

    Attributes:
        store: the prepared store (images with lung masks).
        out: the run folder.
        init: ``scratch``, a GMML pretraining run folder, an exported encoder, or a fine-tuned
            run folder (its encoder).
        sources: train and validate on these sources only (empty: every source with masks).
        train_split: split of the training rows.
        val_split: split for model selection.
        budget: training images: ``all``, a fraction, or ``N`` images (drawn by patient).
        budget_seeds: repeated label draws, e.g. ``0-4`` or ``0,2,5``: one run per draw in
            ``OUT/draw-SEED`` (a finished draw is skipped); overrides ``budget_seed``.
        budget_seed: seed of the budget draw.
        dice_weight: weight of the soft Dice loss.
        bce_weight: weight of the binary cross-entropy.
        model: encoder (must match the initialisation), decoder and freezing settings.
        augment: augmentation, applied identically to image and mask.
        train: schedule, batching, optimiser, seed, device.
    """

    store: str = ""
    out: str = "runs/segment"
    init: str = "scratch"
    sources: list[str] = field(default_factory=list)
    train_split: str = "train"
    val_split: str = "val"
    budget: str = "all"
    budget_seed: int = 0
    budget_seeds: str = ""
    dice_weight: float = 1.0
    bce_weight: float = 1.0
    model: SegmenterConfig = field(default_factory=SegmenterConfig)
    augment: FinetuneAugmentConfig = field(default_factory=FinetuneAugmentConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        self.train.validate("--train-")
        at_least(self.dice_weight, 0, "--dice-weight")
        at_least(self.bce_weight, 0, "--bce-weight")
        require(
            self.dice_weight + self.bce_weight > 0,
            "--dice-weight",
            self.dice_weight,
            "and --bce-weight are both 0: the loss would be 0",
        )


def mask_rows(store: PreparedStore, split: str, sources: list[str]) -> tuple[np.ndarray, int]:
    """Rows of ``split`` with a lung mask, and how many rows were left out for having none."""
    if sources:
        rows = store.indices(split, source=sources)
    else:
        with_any = store.manifest.loc[store.has_mask, "source"].unique().tolist()
        rows = store.indices(split, source=with_any)
    keep = store.has_mask[rows]
    return rows[keep], int((~keep).sum())


def ignore_masks(store: PreparedStore, rows: np.ndarray) -> np.ndarray | None:
    """uint8 [n, S, S] regions to ignore (devices, text) where a source lists them, else None.

    The files named in the manifest's ``extra`` (``ignore_mask_path``) are read and fitted with
    the same geometry as their image (content box, square padding), as ``spcxr prepare`` does
    for lung masks.
    """
    from spcxr.data.prepare import fit_mask
    from spcxr.io import read_mask

    m = store.manifest
    if "extra" not in m.columns:
        return None
    out = None
    for i, r in enumerate(rows):
        text = m["extra"].iat[r]
        if not isinstance(text, str) or "ignore_mask_path" not in text:
            continue
        path = json.loads(text).get("ignore_mask_path")
        if not path:
            continue
        if not Path(path).is_file():
            log.warning("%s: ignore mask listed in the manifest is missing; not applied", path)
            continue
        shape = (int(m["orig_height"].iat[r]), int(m["orig_width"].iat[r]))
        box = tuple(int(m[c].iat[r]) for c in ("box_top", "box_left", "box_height", "box_width"))
        mask = read_mask(path, shape=shape)
        if out is None:
            out = np.zeros((len(rows), store.image_size, store.image_size), dtype=np.uint8)
        out[i] = fit_mask(mask, store.image_size, box)
    return out


def resize_masks(masks_u8: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 0/1 masks [B,1,S,S] -> float 0/1 at ``size`` (area-weighted, then > 0.5)."""
    m = masks_u8.float()
    if m.shape[-1] != size:
        m = F.interpolate(
            m, size=(size, size), mode="bilinear", align_corners=False, antialias=True
        )
    return (m > 0.5).float()


def resolution_ceiling(true: np.ndarray, size: int) -> np.ndarray:
    """Per-image Dice of the reference masks after a round trip through the model's grid.

    The masks ``[n, S, S]`` go down to ``size`` as the training targets do
    (:func:`resize_masks`) and back up as predictions do (:func:`predict_masks`: bilinear,
    then > 0.5). A perfect model at ``size`` px scores this, so ``1 - ceiling`` is what the
    input resolution alone costs; a Dice far below it is lost elsewhere (issue 14 point 6).
    """
    from spcxr.evaluation.segmetrics import dice

    if true.size == 0:
        return np.zeros(0)
    t = torch.from_numpy(np.ascontiguousarray(true, dtype=np.uint8)).unsqueeze(1)
    small = resize_masks(t, size)
    if small.shape[-1] != t.shape[-1]:
        small = F.interpolate(small, size=t.shape[-2:], mode="bilinear", align_corners=False)
    back = (small > 0.5)[:, 0].numpy()
    return np.atleast_1d(dice(back, true.astype(bool)))


def dice_bce_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    valid: torch.Tensor | None,
    dice_weight: float,
    bce_weight: float,
) -> torch.Tensor:
    """Soft Dice (per image, averaged) + BCE, over the valid (not ignored) pixels."""
    valid = torch.ones_like(target) if valid is None else valid
    prob = torch.sigmoid(logits)
    inter = (prob * target * valid).sum((1, 2, 3))
    denom = ((prob + target) * valid).sum((1, 2, 3))
    dice = 1 - (2 * inter + 1) / (denom + 1)
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    bce = (bce * valid).sum() / valid.sum().clamp_min(1)
    return dice_weight * dice.mean() + bce_weight * bce


@torch.no_grad()
def predict_masks(
    model: Segmenter,
    store: PreparedStore,
    rows: np.ndarray,
    *,
    img_size: int,
    in_chans: int,
    device: torch.device,
    out_size: int | None = None,
    batch_size: int = 64,
    precision: str = "auto",
) -> np.ndarray:
    """Lung probability maps [n, s, s] (float16) at ``out_size`` (default: the store's size)."""
    model.eval()
    out_size = out_size or store.image_size
    precision = resolve_precision(precision, device)
    out = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        images = torch.from_numpy(store.images(chunk)).unsqueeze(1).to(device)
        x = eval_transform(images, img_size, NORM)
        if in_chans != 1:
            x = x.expand(-1, in_chans, -1, -1)
        with autocast(device, precision):
            logits = model(x).float()
        if logits.shape[-1] != out_size:
            logits = F.interpolate(
                logits, size=(out_size, out_size), mode="bilinear", align_corners=False
            )
        out.append(torch.sigmoid(logits)[:, 0].to(torch.float16).cpu())
    if not out:
        return np.zeros((0, out_size, out_size), dtype=np.float16)
    return torch.cat(out).numpy()


class SegmentTask(SupervisedTask):
    """Training a lung segmenter on the rows with masks, selected on validation Dice."""

    kind = "segmentation"
    with_masks = True
    select = "dice"

    def __init__(self, config: SegmentConfig) -> None:
        super().__init__(config, "segment")
        store = self.store
        train, self.no_mask_train = mask_rows(store, config.train_split, config.sources)
        val, self.no_mask_val = mask_rows(store, config.val_split, config.sources)
        train, val = store.trainable(train), store.trainable(val)
        if self.no_mask_train:
            log.warning(
                "%d training images have no lung mask: excluded from training", self.no_mask_train
            )
        if len(train) == 0:
            raise ValueError(
                f"{config.store}: no images with lung masks in split {config.train_split!r}"
            )
        if len(val) == 0:
            raise ValueError(
                f"{config.store}: no images with lung masks in split {config.val_split!r}"
            )
        budget = parse_budget(config.budget)
        frame = store.manifest.iloc[train].assign(_y="lung")
        self.train_rows = train[
            select_budget(frame, budget, seed=config.budget_seed, label_col="_y")
        ]
        self.val = val
        self.ignore_train = ignore_masks(store, self.train_rows)
        self.pos_of = {int(r): i for i, r in enumerate(self.train_rows)}
        self.plan = StepBatches(self.train_rows, config.train.batch_size, config.train.seed)
        self.val_masks = store.masks(val).astype(bool)

    def build_model(self) -> tuple[nn.Module, dict[str, Any]]:
        model, init_info = build_segmenter(self.config.model, self.config.init)
        return model.to(self.device), init_info

    def loss(self, batch: dict[str, torch.Tensor], step: int) -> torch.Tensor:
        config, img = self.config, self.config.model.img_size
        x = eval_transform(batch["images"], img, NORM)
        y = resize_masks(batch["masks"], img)
        valid = None
        if self.ignore_train is not None:
            idx = [self.pos_of[int(r)] for r in batch["rows"].tolist()]
            ign = torch.from_numpy(self.ignore_train[idx]).unsqueeze(1).to(x.device)
            valid = 1 - resize_masks(ign, img)
        gen = torch.Generator().manual_seed(derive_seed(config.train.seed, "augment", step))
        stacked = y if valid is None else torch.cat([y, valid], 1)
        x, stacked = augment_batch(x, config.augment, gen, masks=stacked)
        y, valid = (stacked, None) if valid is None else (stacked[:, :1], stacked[:, 1:])
        if config.model.in_chans != 1:
            x = x.expand(-1, config.model.in_chans, -1, -1)
        logits = self.model(x).float()
        return dice_bce_loss(logits, y, valid, config.dice_weight, config.bce_weight)

    def validate(self) -> dict[str, float]:
        prob = predict_masks(
            self.model,
            self.store,
            self.val,
            img_size=self.config.model.img_size,
            in_chans=self.config.model.in_chans,
            device=self.device,
            precision=self.precision,
        )
        pred = prob > 0.5
        inter = (pred & self.val_masks).sum((1, 2))
        total = pred.sum((1, 2)) + self.val_masks.sum((1, 2))
        dice = np.where(total > 0, 2 * inter / np.maximum(total, 1), 1.0)
        return {"dice": float(dice.mean())}

    def save_best(self) -> None:
        config = self.config
        extra = {
            "init": self.init_info,
            "preprocessing": preprocessing_record(self.store, config.model.img_size),
            "dice_weight": config.dice_weight,
            "bce_weight": config.bce_weight,
        }
        save_segmenter(self.model, self.run_dir / "model", extra=extra)

    def describe(self) -> dict[str, Any]:
        config, store, train, val = self.config, self.store, self.train_rows, self.val
        ignored = self.ignore_train
        return {
            "store": str(Path(config.store).resolve()),
            "store_fingerprint": store.fingerprint,
            "train": describe_rows(store, train, np.zeros(len(train), np.int64), ["lung"]),
            "val": describe_rows(store, val, np.zeros(len(val), np.int64), ["lung"]),
            "budget": config.budget,
            "budget_seed": config.budget_seed,
            "excluded": {
                "train without mask": self.no_mask_train,
                "val without mask": self.no_mask_val,
            },
            "ignore_masks_in_train": int(
                0 if ignored is None else (ignored.reshape(len(train), -1).any(1)).sum()
            ),
        }


def segment(config: SegmentConfig) -> dict[str, Any]:
    """Train a lung segmenter (see :class:`SegmentConfig`); returns the run summary."""
    return run_task(SegmentTask(config))


def evaluate_segmentation_run(
    run: Path, info: dict, config, out: Path, samples: dict | None = None
) -> dict[str, Any]:
    """Dice / IoU / HD95 with patient-bootstrap CIs per test source; per-image scores saved.

    ``samples``, when given, receives each test source's per-image scores
    (:class:`~spcxr.evaluation.draws.TestSample`) for paired bootstraps between runs."""
    from spcxr.evaluation.bootstrap import bootstrap_ci, split_ci
    from spcxr.evaluation.draws import TestSample
    from spcxr.evaluation.plots import segmentation_examples
    from spcxr.evaluation.segmetrics import segmentation_scores

    device = resolve_device(config.device)
    model, meta = load_segmenter(run / "model")
    model.to(device).eval()
    enc = meta["config"]
    name = run.name
    train_hashes = set(pd.read_csv(run / "train_rows.csv")["pixel_hash"].astype(str))
    entry: dict[str, Any] = {
        "kind": "segmentation",
        "run": str(run),
        "init": info["init"],
        "mode": "frozen encoder" if meta["config"].get("freeze") == "all" else "finetune",
        "budget": info["data"].get("budget", "all"),
        "budget_seed": info["data"].get("budget_seed"),
        "train_seed": info.get("seed"),
        "train": info["data"]["train"],
        "train_sources": sorted(info["data"]["train"]["sources"]),
        "eval": {},
        "plots": {},
    }
    frames = []
    for store_path in config.stores or [info["data"]["store"]]:
        store = PreparedStore(store_path)
        rows, no_mask = mask_rows(store, config.split, config.test_sources())
        hashes = store.manifest["pixel_hash"].iloc[rows].astype(str).to_numpy()
        seen = np.isin(hashes, list(train_hashes))
        rows = rows[~seen]
        sources = store.manifest["source"].iloc[rows].to_numpy()
        for source in sorted(set(sources)):
            r = rows[sources == source]
            prob = predict_masks(
                model,
                store,
                r,
                img_size=enc["img_size"],
                in_chans=enc["in_chans"],
                device=device,
                precision=config.precision,
            )
            pred = prob > 0.5
            true = store.masks(r).astype(bool)
            ignore = ignore_masks(store, r)
            if ignore is not None:
                keep = ~ignore.astype(bool)
                pred, true = pred & keep, true & keep
            scores = segmentation_scores(pred, true)
            groups = store.manifest["group"].iloc[r].to_numpy()
            arrays = {k: np.asarray(v, dtype=float) for k, v in scores.items()}

            def mean_scores(**a: np.ndarray) -> dict[str, float]:
                return {
                    k: float(np.nanmean(v)) if np.isfinite(v).any() else float("nan")
                    for k, v in a.items()
                }

            ci = bootstrap_ci(
                mean_scores,
                groups,
                n_boot=config.n_boot,
                seed=config.seed,
                level=config.level,
                **arrays,
            )
            if samples is not None:
                keys = store.manifest["image_path"].iloc[r].to_numpy().astype(str)
                samples[(str(run), source)] = TestSample(keys, groups, arrays, mean_scores)
            excluded = {}
            # this source's own rows without a mask (not the count over every test source)
            missing = mask_rows(store, config.split, [source])[1] if no_mask else 0
            if missing:
                excluded["no lung mask"] = missing
            if seen.any():
                excluded["identical to a training image"] = int(seen.sum())
            entry["eval"][source] = {
                "data": {
                    "store": str(store.root),
                    "images": len(r),
                    "patients": len(set(groups)),
                    "excluded": excluded,
                    "mask_convention": MASK_CONVENTIONS.get(source, "as provided by the source"),
                    "hd95_undefined": int(np.isnan(arrays["hd95"]).sum()),
                    "grid": f"{store.image_size} px store grid",
                    # the best Dice a model at its input size can reach on these masks
                    "resolution_ceiling": float(
                        np.mean(resolution_ceiling(true, int(enc["img_size"])))
                    ),
                },
                **split_ci(ci),
                **({"external": True} if source in config.external else {}),
            }
            frame = pd.DataFrame(
                {
                    "image_path": store.manifest["image_path"].iloc[r].to_numpy(),
                    "source": source,
                    "patient_group": groups,
                    **arrays,
                }
            )
            frames.append(frame)
            order = np.argsort(arrays["dice"])
            pick = np.unique(np.concatenate([order[:3], order[-3:]]))
            path = segmentation_examples(
                store.images(r[pick]),
                true[pick],
                pred[pick],
                out / "plots" / f"{name}_{source}_examples.png",
                scores=arrays["dice"][pick],
            )
            entry["plots"][f"examples {source} (3 worst, 3 best)"] = str(path.relative_to(out))
    if frames:
        pd.concat(frames).to_csv(out / f"per_image_{name}.csv", index=False)
    return entry


def load_run_segmenter(run: str | Path, device: torch.device) -> tuple[Segmenter, dict]:
    model, meta = load_segmenter(Path(run) / "model")
    return model.to(device).eval(), meta


__all__ = [
    "MASK_CONVENTIONS",
    "SegmentConfig",
    "dice_bce_loss",
    "evaluate_segmentation_run",
    "predict_masks",
    "resolution_ceiling",
    "segment",
]
