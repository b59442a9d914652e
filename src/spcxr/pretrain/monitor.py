"""Feature monitor: k-NN and linear-probe accuracy of the frozen encoder during pretraining.

The reconstruction loss says how well GMML fills in masked patches, not how useful the encoder's
features are for a downstream task; it keeps falling long after transfer stops improving (or
while it degrades). Every ``monitor_every`` steps the pretraining loop embeds a fixed labelled
subset of the store's validation split with the frozen encoder and scores two label-efficient
read-outs of those features:

- k-NN accuracy (k = 20, cosine similarity, votes weighted by ``exp(sim / 0.07)``, leave-one-out
  within the subset): the standard SSL feature monitor (Wu et al. 2018; Caron et al. 2021, DINO).
- linear-probe accuracy: ridge regression of one-hot labels on the standardised features, with
  the exact leave-one-out predictions of the closed form (Allen 1974's PRESS) over a small grid
  of ridge strengths (the best one is logged with it).

The labels are read only here and never reach training; validation images are not pretrained
on (``splits`` defaults to ``train``). A run's curve therefore shows whether its features still
improve, and a study can pick a checkpoint by it without touching any test set.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from spcxr.data.augment import AugmentConfig, eval_transform
from spcxr.data.labels import LabelConfig, class_values
from spcxr.data.store import PreparedStore
from spcxr.train.distributed import autocast

RIDGE_GRID = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)
"""Ridge strengths tried, relative to the mean squared singular value of the features."""


def _balanced(pred: Tensor, labels: Tensor, n_classes: int) -> float:
    recalls = [
        float((pred[labels == c] == c).float().mean())
        for c in range(n_classes)
        if (labels == c).any()
    ]
    return float(np.mean(recalls))


def knn_predict(features: Tensor, labels: Tensor, k: int = 20, temperature: float = 0.07) -> Tensor:
    """Leave-one-out weighted k-NN predictions (cosine similarity; DINO's vote).

    Args:
        features: ``[n, d]`` features.
        labels: ``[n]`` class ids in ``0..C-1``.
        k: neighbours (capped at ``n - 1``).
        temperature: vote weight ``exp(similarity / temperature)``.
    """
    n = features.shape[0]
    x = nn.functional.normalize(features.double(), dim=1)
    sim = x @ x.T
    sim.fill_diagonal_(-math.inf)  # leave one out
    k = min(k, n - 1)
    top, idx = sim.topk(k, dim=1)
    n_classes = int(labels.max()) + 1
    votes = torch.zeros(n, n_classes, dtype=torch.float64)
    votes.scatter_add_(1, labels[idx], (top / temperature).exp())
    return votes.argmax(1)


def ridge_loo(x: Tensor, y: Tensor, rel: float) -> Tensor:
    """Leave-one-out ridge predictions ``[n, C]`` of targets ``y`` from centred features ``x``.

    With ``x = U S V^T`` the ridge fit is ``y_hat = H y``, ``H = U diag(s^2 / (s^2 + lam)) U^T``,
    and the prediction for row ``i`` of the fit without row ``i`` is
    ``(y_hat_i - h_ii y_i) / (1 - h_ii)`` (Allen 1974): every held-out prediction from one SVD.
    ``lam = rel * mean(s^2)``.
    """
    u, s, _ = torch.linalg.svd(x, full_matrices=False)
    shrink = s**2 / (s**2 + rel * float((s**2).mean()))
    fit = u @ (shrink[:, None] * (u.T @ y))
    h = (u**2 * shrink).sum(1).clamp_max(1 - 1e-9)
    return (fit - h[:, None] * y) / (1 - h[:, None])


def ridge_loo_predict(features: Tensor, labels: Tensor) -> tuple[Tensor, float]:
    """Leave-one-out class predictions of a ridge probe on one-hot labels (best of the grid).

    Features are standardised and targets centred (the intercept) on the whole subset.

    Returns:
        The predicted class ids at the best strength of :data:`RIDGE_GRID` and that strength.
    """
    x = features.double()
    x = (x - x.mean(0)) / x.std(0).clamp_min(1e-8)
    y = nn.functional.one_hot(labels, int(labels.max()) + 1).double()
    y = y - y.mean(0)
    best: tuple[float, Tensor, float] | None = None
    for rel in RIDGE_GRID:
        pred = ridge_loo(x, y, rel).argmax(1)
        acc = float((pred == labels).double().mean())
        if best is None or acc > best[0]:
            best = (acc, pred, rel)
    assert best is not None
    return best[1], best[2]


def score_features(features: Tensor, labels: Tensor, k: int = 20) -> dict[str, float]:
    """k-NN and ridge-probe accuracy (and balanced accuracy) of ``features``, leave-one-out."""
    labels = labels.long()
    n_classes = int(labels.max()) + 1
    knn = knn_predict(features, labels, k)
    probe, rel = ridge_loo_predict(features, labels)
    return {
        "knn_acc": float((knn == labels).double().mean()),
        "knn_bacc": _balanced(knn, labels, n_classes),
        "probe_acc": float((probe == labels).double().mean()),
        "probe_bacc": _balanced(probe, labels, n_classes),
        "probe_ridge": rel,
    }


@dataclass
class MonitorSet:
    """The fixed labelled images the monitor embeds."""

    rows: np.ndarray
    labels: np.ndarray
    classes: list[str]

    @property
    def majority(self) -> float:
        """Accuracy of always guessing the most frequent class (the chance line)."""
        return float(np.bincount(self.labels).max() / len(self.labels))


def select_monitor_set(
    store: PreparedStore,
    *,
    split: str,
    images: int,
    column: str = "label",
    sources: list[str] | None = None,
    seed: int = 0,
) -> MonitorSet:
    """A seeded subset of ``images`` labelled rows of ``split`` (the same for every step)."""
    rows = store.indices(split, source=sources or None)
    if column not in store.manifest.columns:
        raise ValueError(f"--monitor-column: the store's manifest has no column {column!r}")
    values = class_values(store.manifest.iloc[rows], LabelConfig(column=column))
    keep = values.notna().to_numpy()
    rows, values = rows[keep], values[keep]
    classes = sorted(values.unique().tolist())
    if len(classes) < 2:
        raise ValueError(
            f"--monitor-split {split!r}: needs images of at least two classes in column "
            f"{column!r}, found {classes or 'none'}"
        )
    rng = np.random.default_rng([seed, 7919])
    pick = np.sort(rng.choice(len(rows), min(images, len(rows)), replace=False))
    index = {c: i for i, c in enumerate(classes)}
    labels = np.array([index[v] for v in values.iloc[pick]], dtype=np.int64)
    return MonitorSet(rows=rows[pick], labels=labels, classes=classes)


@torch.no_grad()
def embed(
    encoder: nn.Module,
    store: PreparedStore,
    rows: np.ndarray,
    *,
    img_size: int,
    in_chans: int,
    norm: AugmentConfig,
    device: torch.device,
    precision: str = "fp32",
    batch_size: int = 128,
) -> Tensor:
    """CLS and mean patch token, concatenated, of whole images (eval mode; float32 on the CPU)."""
    was_training = encoder.training
    encoder.eval()
    prefix = int(getattr(encoder, "num_prefix_tokens", 1))
    parts = []
    try:
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            images = torch.from_numpy(store.images(chunk)).unsqueeze(1).to(device)
            x = eval_transform(images, img_size, norm)
            if in_chans != 1:
                x = x.expand(-1, in_chans, -1, -1)
            with autocast(device, precision):
                tokens = encoder.forward_features(x)
            tokens = tokens.float()
            parts.append(torch.cat([tokens[:, 0], tokens[:, prefix:].mean(1)], 1).cpu())
    finally:
        encoder.train(was_training)
    return torch.cat(parts)


class FeatureMonitor:
    """Scores an encoder's frozen features on a fixed :class:`MonitorSet` (see the module)."""

    def __init__(
        self,
        store: PreparedStore,
        subset: MonitorSet,
        *,
        img_size: int,
        in_chans: int,
        norm: AugmentConfig,
        device: torch.device,
        precision: str = "fp32",
        k: int = 20,
    ) -> None:
        self.store, self.subset = store, subset
        self.img_size, self.in_chans, self.norm = img_size, in_chans, norm
        self.device, self.precision, self.k = device, precision, k

    def __call__(self, encoder: nn.Module) -> dict[str, float]:
        features = embed(
            encoder,
            self.store,
            self.subset.rows,
            img_size=self.img_size,
            in_chans=self.in_chans,
            norm=self.norm,
            device=self.device,
            precision=self.precision,
        )
        scores = score_features(features, torch.from_numpy(self.subset.labels), self.k)
        return {**scores, "images": len(self.subset.rows), "majority": self.subset.majority}
