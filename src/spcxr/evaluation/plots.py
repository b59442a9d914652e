"""Report figures written straight to PNG files.

Every function builds a ``matplotlib.figure.Figure`` on a ``FigureCanvasAgg`` and never touches
``matplotlib.pyplot``: no global figure registry, no backend selection, safe in worker processes
and on headless machines. Each writes a PNG at ``path`` (parent folders created) and returns it.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from spcxr.evaluation.metrics import (
    ECE_BINS,
    binary_auroc,
    calibration_bins,
    expected_calibration_error,
    roc_curve,
)
from spcxr.evaluation.segmetrics import dice

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "DPI",
    "budget_curve",
    "confusion_matrix_plot",
    "drift_heatmap",
    "reliability_diagram",
    "roc_curves",
    "segmentation_examples",
]

DPI = 100  # figure sizes below are in inches, so a 6 x 5 figure is 600 x 500 pixels


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=DPI)
    return path


def roc_curves(
    y_true: np.ndarray,
    prob: np.ndarray,
    class_names: Sequence[str],
    path: str | Path,
    title: str = "",
) -> Path:
    """One-vs-rest ROC curve per class with its AUROC in the legend (600 x 500 px).

    For two classes only the positive class (index 1) is drawn. A class with no positive or no
    negative row is listed in the legend as "not estimable" without a curve.
    """
    y = np.asarray(y_true)
    p = np.asarray(prob, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] != len(class_names) or y.shape != (p.shape[0],):
        raise ValueError(
            f"need y_true [n] and prob [n, {len(class_names)}]; got {y.shape} and {p.shape}"
        )
    fig = _new_figure(6, 5)
    ax = fig.add_subplot()
    classes = [1] if p.shape[1] == 2 else range(p.shape[1])
    for c in classes:
        truth = (y == c).astype(int)
        auc = binary_auroc(truth, p[:, c])
        if np.isnan(auc):
            ax.plot([], [], label=f"{class_names[c]} (not estimable)")
            continue
        fpr, tpr, _ = roc_curve(truth, p[:, c])
        ax.plot(fpr, tpr, lw=1.8, label=f"{class_names[c]} (AUROC {auc:.3f})")
    ax.plot([0, 1], [0, 1], ls="--", lw=1, color="grey")
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="1 - specificity (FPR)")
    ax.set(ylabel="sensitivity (TPR)", title=title or "ROC, one-vs-rest")
    ax.set_aspect("equal")
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


def confusion_matrix_plot(
    confusion: Sequence[Sequence[int]] | np.ndarray,
    class_names: Sequence[str],
    path: str | Path,
    normalize: bool = True,
) -> Path:
    """Confusion matrix (rows = true class); each cell shows its count and row percentage.

    Colour encodes the row fraction when ``normalize`` (recall on the diagonal) and the raw count
    otherwise. Size grows with the number of classes (at least 500 x 450 px).
    """
    cm = np.asarray(confusion, dtype=np.float64)
    n = len(class_names)
    if cm.shape != (n, n):
        raise ValueError(f"confusion must be {n} x {n} for {n} class names; got {cm.shape}")
    row_sum = cm.sum(axis=1, keepdims=True)
    frac = np.divide(cm, row_sum, out=np.zeros_like(cm), where=row_sum > 0)
    shown = frac if normalize else cm
    side = max(5.0, 1.1 * n + 2.0)
    fig = _new_figure(side, side - 0.5)
    ax = fig.add_subplot()
    image = ax.imshow(shown, cmap="Blues", vmin=0, vmax=1 if normalize else max(cm.max(), 1))
    fig.colorbar(image, ax=ax, shrink=0.8, label="row fraction" if normalize else "count")
    threshold = (1.0 if normalize else max(cm.max(), 1)) / 2
    for i in range(n):
        for j in range(n):
            colour = "white" if shown[i, j] > threshold else "black"
            text = f"{int(cm[i, j])}\n{100 * frac[i, j]:.1f}%"
            ax.text(j, i, text, ha="center", va="center", color=colour, fontsize=9)
    ax.set_xticks(range(n), labels=list(class_names), rotation=30, ha="right")
    ax.set_yticks(range(n), labels=list(class_names))
    ax.set(xlabel="predicted", ylabel="true", title="Confusion matrix (row %)")
    return _save(fig, path)


def reliability_diagram(
    y_true: np.ndarray, prob: np.ndarray, path: str | Path, n_bins: int = ECE_BINS
) -> Path:
    """Top-label reliability diagram (Guo et al. 2017) over a histogram of bin counts (600 x 700 px).

    Upper panel: accuracy per confidence bin (bars), the gap to perfect calibration (red, hatched)
    and the diagonal; ECE over the same bins in the title. Lower panel: rows per bin.
    """
    y = np.asarray(y_true)
    p = np.asarray(prob, dtype=np.float64)
    if p.ndim != 2 or y.shape != (p.shape[0],):
        raise ValueError(f"need y_true [n] and prob [n, C]; got {y.shape} and {p.shape}")
    bins = calibration_bins(y, p, n_bins)
    ece = expected_calibration_error(y, p, n_bins)
    edges, count = bins["edges"], bins["count"]
    width = np.diff(edges)
    centres = edges[:-1] + width / 2
    filled = count > 0
    acc = np.where(filled, bins["accuracy"], 0.0)
    conf = np.where(filled, bins["confidence"], 0.0)

    fig = _new_figure(6, 7)
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    top.bar(centres, acc, width=width, edgecolor="black", color="#7fa7d6", label="accuracy")
    top.bar(
        centres[filled],
        (conf - acc)[filled],
        bottom=acc[filled],
        width=width[filled],
        facecolor=(1.0, 0.0, 0.0, 0.15),
        hatch="//",
        edgecolor="tab:red",
        label="gap to confidence",
    )
    top.plot([0, 1], [0, 1], ls="--", color="grey", label="perfect calibration")
    top.set(ylim=(0, 1), ylabel="accuracy", title=f"Reliability (ECE {ece:.3f}, {n_bins} bins)")
    top.legend(loc="upper left", fontsize=8)
    bottom.bar(centres, count, width=width, edgecolor="black", color="tab:grey")
    bottom.set(xlim=(0, 1), xlabel="confidence (max probability)", ylabel="rows")
    return _save(fig, path)


def budget_curve(
    rows: Sequence[dict[str, Any]],
    path: str | Path,
    metric: str = "macro_auroc",
    ylabel: str | None = None,
) -> Path:
    """Metric against the number of training labels, one line per run kind (700 x 450 px).

    Args:
        rows: dicts with ``"run"`` (line label, e.g. "GMML" or "scratch"), ``"labels"`` (number
            of training labels), ``"value"`` and optionally ``"low"``/``"high"`` (confidence
            band, shaded; rows with a NaN or missing bound get no band).
        path: PNG to write.
        metric: name shown in the title and, by default, on the y axis.
        ylabel: y-axis label; defaults to ``metric``.
    """
    fig = _new_figure(7, 4.5)
    ax = fig.add_subplot()
    _budget_axes(ax, rows, metric, ylabel, f"{metric} vs label budget")
    return _save(fig, path)


def _budget_axes(ax, rows: Sequence[dict[str, Any]], metric: str, ylabel: str | None, title: str):
    lines: dict[str, list[tuple[float, float, float, float]]] = defaultdict(list)
    for i, row in enumerate(rows):
        missing = [key for key in ("run", "labels", "value") if key not in row]
        if missing:
            raise ValueError(f"budget row {i} lacks {missing}: {row}")
        if row["labels"] <= 0:
            raise ValueError(f"budget row {i} has labels={row['labels']}; a log axis needs > 0")
        low, high = row.get("low", np.nan), row.get("high", np.nan)
        lines[str(row["run"])].append(
            (float(row["labels"]), float(row["value"]), float(low), float(high))
        )
    if not lines:
        raise ValueError("budget_curve needs at least one row")
    for run, points in lines.items():
        labels, value, low, high = np.array(sorted(points)).T
        (line,) = ax.plot(labels, value, marker="o", lw=1.8, label=run)
        band = np.isfinite(low) & np.isfinite(high)
        if band.any():
            ax.fill_between(
                labels[band], low[band], high[band], color=line.get_color(), alpha=0.2, lw=0
            )
    ax.set_xscale("log")
    ax.set(xlabel="training labels", ylabel=ylabel or metric, title=title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=9)


def budget_panels(
    panels: dict[str, Sequence[dict[str, Any]]],
    path: str | Path,
    metric: str = "macro_auroc",
    ylabel: str | None = None,
) -> Path:
    """:func:`budget_curve` for several test sets side by side (e.g. internal and external),
    one panel each with a shared y axis; a row's band is its ``low``/``high`` (e.g. the t
    interval of the mean across label draws)."""
    if not panels:
        raise ValueError("budget_panels needs at least one panel")
    fig = _new_figure(5 * len(panels), 4.5)
    axes = fig.subplots(1, len(panels), sharey=True, squeeze=False)[0]
    for ax, (title, rows) in zip(axes, panels.items(), strict=True):
        _budget_axes(ax, rows, metric, ylabel, title)
    return _save(fig, path)


def drift_heatmap(
    table: pd.DataFrame,
    path: str | Path,
    title: str = "",
    fmt: str = "{:.2f}",
    annotations: pd.DataFrame | None = None,
) -> Path:
    """Train-source x test-source heatmap of a metric (cross-source drift table).

    Args:
        table: rows = training source, columns = test source, values = metric.
        path: PNG to write.
        title: figure title.
        fmt: format of the cell values when ``annotations`` is None.
        annotations: optional frame of strings with the same index and columns (e.g.
            ``"0.91\\n[0.88, 0.93]"``) written in the cells instead of ``fmt`` values.

    NaN cells (pairs not evaluated) are left blank. Size: ``(1.4 * cols + 3) x (0.9 * rows + 2)``
    inches at 100 dpi.
    """
    values = table.to_numpy(dtype=np.float64)
    n_rows, n_cols = values.shape
    if annotations is not None and (
        list(annotations.index) != list(table.index)
        or list(annotations.columns) != list(table.columns)
    ):
        raise ValueError("annotations must have the same index and columns as table")
    fig = _new_figure(1.4 * n_cols + 3, 0.9 * n_rows + 2)
    ax = fig.add_subplot()
    image = ax.imshow(np.ma.masked_invalid(values), cmap="viridis", aspect="auto")
    fig.colorbar(image, ax=ax, shrink=0.9)
    finite = values[np.isfinite(values)]
    middle = (finite.min() + finite.max()) / 2 if finite.size else 0.0
    for i in range(n_rows):
        for j in range(n_cols):
            if not np.isfinite(values[i, j]):
                continue
            text = (
                str(annotations.iat[i, j]) if annotations is not None else fmt.format(values[i, j])
            )
            colour = "black" if values[i, j] > middle else "white"
            ax.text(j, i, text, ha="center", va="center", color=colour, fontsize=8)
    ax.set_xticks(range(n_cols), labels=[str(c) for c in table.columns], rotation=30, ha="right")
    ax.set_yticks(range(n_rows), labels=[str(r) for r in table.index])
    ax.set(xlabel="test source", ylabel="train source", title=title)
    return _save(fig, path)


def segmentation_examples(
    images: np.ndarray,
    true_masks: np.ndarray,
    pred_masks: np.ndarray,
    path: str | Path,
    scores: Sequence[float] | None = None,
) -> Path:
    """Grid of images with the true contour (green) and predicted contour (red).

    Up to 4 panels per row, 3 x 3 inches each. Panel titles give the Dice (``scores`` when
    given, otherwise computed from the masks).

    Args:
        images: ``[k, H, W]`` uint8 grayscale images.
        true_masks: ``[k, H, W]`` bool or 0/1 masks.
        pred_masks: ``[k, H, W]`` bool or 0/1 masks.
        path: PNG to write.
        scores: optional k Dice values to show.
    """
    imgs = np.asarray(images)
    truth = np.asarray(true_masks).astype(bool)
    pred = np.asarray(pred_masks).astype(bool)
    if imgs.ndim != 3 or truth.shape != imgs.shape or pred.shape != imgs.shape:
        raise ValueError(
            f"images, true_masks and pred_masks must all be [k, H, W]; got "
            f"{imgs.shape}, {truth.shape}, {pred.shape}"
        )
    k = imgs.shape[0]
    if k == 0:
        raise ValueError("segmentation_examples needs at least one image")
    shown = np.asarray(dice(pred, truth)) if scores is None else np.asarray(scores, dtype=float)
    if shown.shape != (k,):
        raise ValueError(f"scores must hold {k} values; got shape {shown.shape}")
    n_cols = min(k, 4)
    n_rows = -(-k // n_cols)
    fig = _new_figure(3 * n_cols, 3 * n_rows)
    axes = np.atleast_1d(fig.subplots(n_rows, n_cols, squeeze=False)).ravel()
    for i, ax in enumerate(axes):
        ax.set_axis_off()
        if i >= k:
            continue
        ax.imshow(imgs[i], cmap="gray", vmin=0, vmax=255)
        # contour at 0.5 of a 0/1 mask traces its edge; skipped when the mask is empty
        for mask, colour in ((truth[i], "lime"), (pred[i], "red")):
            if mask.any() and not mask.all():
                ax.contour(mask.astype(float), levels=[0.5], colors=colour, linewidths=1.2)
        ax.set_title(f"#{i}  Dice {shown[i]:.3f}", fontsize=9)
    fig.suptitle("green: reference mask, red: prediction", fontsize=10)
    return _save(fig, path)
