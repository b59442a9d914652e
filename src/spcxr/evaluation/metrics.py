"""Classification metrics as point estimates: multi-class (one label per image) and multi-label.

Everything is plain numpy/scipy so that :func:`spcxr.evaluation.bootstrap.bootstrap_ci` can call
these functions a thousand times on resampled rows. Conventions:

- The predicted class is ``argmax(prob)`` (the first class on exact ties).
- A quantity whose denominator is zero is ``NaN``, never an exception: a class absent from
  ``y_true`` has no recall and no AUROC. Macro averages are taken over the classes where the
  quantity is defined (as scikit-learn does for balanced accuracy and for macro F1 with its
  default labels), and are ``NaN`` only when no class is defined.
- AUROC is the Mann-Whitney U statistic computed from average ranks (``scipy.stats.rankdata``),
  so tied scores count one half, which equals the trapezoidal area under the ROC curve.
- ECE follows Guo et al., "On Calibration of Modern Neural Networks", ICML 2017: 15 equal-width
  bins ``((m-1)/15, m/15]`` of the top-label confidence ``max(prob)``;
  ``ECE = sum_m |B_m| / n * |acc(B_m) - conf(B_m)|``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy.stats import rankdata

__all__ = [
    "ECE_BINS",
    "binary_auroc",
    "calibration_bins",
    "classification_metrics",
    "expected_calibration_error",
    "flatten_scalars",
    "multilabel_metrics",
    "ovr_auroc",
    "roc_curve",
]

ECE_BINS = 15  # Guo et al. 2017 use 15 bins


def _safe_divide(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """``num / den`` elementwise, ``NaN`` where ``den == 0``."""
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    out = np.full(np.broadcast(num, den).shape, np.nan)
    np.divide(num, den, out=out, where=den != 0)
    return out


def _nanmean(values: np.ndarray) -> float:
    """Mean of the finite entries; ``NaN`` (without a warning) when there are none."""
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if finite.size else float("nan")


def _rank_auroc(positive: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Column-wise AUROC from average ranks (Mann-Whitney U / (n_pos * n_neg)).

    Args:
        positive: bool ``[n, K]``, True where the row is a positive for column k.
        scores: float ``[n, K]``, higher means more likely positive.

    Returns:
        float ``[K]``; ``NaN`` for a column without positives or without negatives.
    """
    n = positive.shape[0]
    n_pos = positive.sum(axis=0).astype(np.float64)  # [K]
    n_neg = n - n_pos
    ranks = rankdata(scores, axis=0)  # [n, K], ties get their average rank
    rank_sum = np.where(positive, ranks, 0.0).sum(axis=0)  # [K]
    return _safe_divide(rank_sum - n_pos * (n_pos + 1) / 2, n_pos * n_neg)


def binary_auroc(y_true: np.ndarray, score: np.ndarray) -> float:
    """AUROC of a binary problem; ``NaN`` when one of the two classes is absent.

    Args:
        y_true: ``[n]`` 0/1 (or bool) labels, 1 = positive.
        score: ``[n]`` scores, higher means more likely positive.
    """
    y = np.asarray(y_true)
    s = np.asarray(score, dtype=np.float64)
    if y.ndim != 1 or s.shape != y.shape:
        raise ValueError(f"y_true and score must be 1-D of equal length; got {y.shape}, {s.shape}")
    return float(_rank_auroc((y == 1)[:, None], s[:, None])[0])


def ovr_auroc(y_true: np.ndarray, prob: np.ndarray) -> np.ndarray:
    """One-vs-rest AUROC per class ``[C]`` (class c positive, all others negative).

    Args:
        y_true: ``[n]`` integer class indices in ``[0, C)``.
        prob: ``[n, C]`` class scores.
    """
    n_classes = prob.shape[1]
    positive = y_true[:, None] == np.arange(n_classes)  # [n, C]
    return _rank_auroc(positive, prob)


def roc_curve(y_true: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC curve of a binary problem, one point per distinct score.

    Same points as ``sklearn.metrics.roc_curve(..., drop_intermediate=False)``: the curve starts at
    ``(0, 0)`` with threshold ``+inf`` and each later point predicts positive for
    ``score >= threshold``. Its trapezoidal area equals :func:`binary_auroc`.

    Args:
        y_true: ``[n]`` 0/1 labels.
        score: ``[n]`` scores.

    Returns:
        ``(fpr, tpr, thresholds)``; fpr (tpr) is ``NaN`` when there are no negatives (positives).
    """
    y = np.asarray(y_true) == 1
    s = np.asarray(score, dtype=np.float64)
    order = np.argsort(-s, kind="stable")
    s_sorted, y_sorted = s[order], y[order]
    # the last row of each run of tied scores closes a point of the curve
    last = np.r_[np.flatnonzero(np.diff(s_sorted)), s_sorted.size - 1]
    tps = np.cumsum(y_sorted)[last]
    fps = (last + 1) - tps
    tps, fps = np.r_[0, tps], np.r_[0, fps]
    thresholds = np.r_[np.inf, s_sorted[last]]
    return _safe_divide(fps, fps[-1]), _safe_divide(tps, tps[-1]), thresholds


def calibration_bins(
    y_true: np.ndarray, prob: np.ndarray, n_bins: int = ECE_BINS
) -> dict[str, np.ndarray]:
    """Top-label reliability statistics per equal-width confidence bin (Guo et al. 2017).

    Bin m (0-based) holds the rows whose confidence ``max(prob)`` lies in
    ``(m / n_bins, (m + 1) / n_bins]``; a confidence of exactly 0 falls in bin 0.

    Returns:
        ``{"edges": [n_bins + 1], "count": [n_bins] int, "accuracy": [n_bins],
        "confidence": [n_bins]}``; accuracy and confidence are ``NaN`` for empty bins.
    """
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    confidence = prob.max(axis=1)
    correct = (prob.argmax(axis=1) == y_true).astype(np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # side="left" puts a value equal to an inner edge in the bin below: intervals (lo, hi]
    idx = np.searchsorted(edges[1:-1], confidence, side="left")
    count = np.bincount(idx, minlength=n_bins)
    return {
        "edges": edges,
        "count": count,
        "accuracy": _safe_divide(np.bincount(idx, weights=correct, minlength=n_bins), count),
        "confidence": _safe_divide(np.bincount(idx, weights=confidence, minlength=n_bins), count),
    }


def expected_calibration_error(
    y_true: np.ndarray, prob: np.ndarray, n_bins: int = ECE_BINS
) -> float:
    """ECE (Guo et al. 2017): ``sum_m |B_m| / n * |acc(B_m) - conf(B_m)|`` over top-label bins."""
    bins = calibration_bins(y_true, prob, n_bins)
    filled = bins["count"] > 0
    gaps = np.abs(bins["accuracy"][filled] - bins["confidence"][filled])
    return float((bins["count"][filled] * gaps).sum() / bins["count"].sum())


def _check_classification(
    y_true: np.ndarray, prob: np.ndarray, class_names: Sequence[str]
) -> tuple[np.ndarray, np.ndarray]:
    """Validated ``(y int64 [n], prob float64 [n, C])``; raises ValueError naming the problem."""
    p = np.asarray(prob, dtype=np.float64)
    y = np.asarray(y_true)
    if p.ndim != 2:
        raise ValueError(f"prob must be 2-D [n, C]; got shape {p.shape}")
    n, n_classes = p.shape
    if n_classes < 2:
        raise ValueError(f"prob needs at least 2 class columns; got {n_classes}")
    if len(class_names) != n_classes:
        raise ValueError(f"{len(class_names)} class_names for {n_classes} prob columns")
    if y.ndim != 1 or y.shape[0] != n:
        raise ValueError(f"y_true must be 1-D with {n} entries (one per prob row); got {y.shape}")
    if n == 0:
        raise ValueError("no rows: y_true and prob are empty")
    integral_floats = np.issubdtype(y.dtype, np.floating) and np.all(y == np.round(y))
    if not (np.issubdtype(y.dtype, np.integer) or integral_floats):
        raise ValueError(f"y_true must hold integer class indices; got dtype {y.dtype}")
    y = y.astype(np.int64)
    if y.min() < 0 or y.max() >= n_classes:
        raise ValueError(f"y_true values must lie in [0, {n_classes}); got {y.min()}..{y.max()}")
    if not np.all(np.isfinite(p)):
        raise ValueError("prob contains NaN or infinite values")
    if p.min() < 0.0 or p.max() > 1.0:
        raise ValueError("prob must hold probabilities in [0, 1] (apply softmax to logits first)")
    return y, p


def classification_metrics(
    y_true: np.ndarray, prob: np.ndarray, class_names: Sequence[str]
) -> dict[str, Any]:
    """Point estimates for single-label classification (binary or multi-class).

    Args:
        y_true: ``[n]`` integer class indices in ``[0, C)``.
        prob: ``[n, C]`` class probabilities (softmax output); prediction = ``argmax``.
        class_names: C names; they key the per-class dicts.

    Returns:
        A dict with

        - ``"n"``: rows; ``"counts"``: ``{name: rows of that true class}``.
        - ``"accuracy"``: fraction of correct argmax predictions.
        - ``"balanced_accuracy"``: mean recall over the classes present in ``y_true``.
        - ``"macro_f1"``: mean F1 over classes with ``TP + FP + FN > 0``.
        - ``"macro_auroc"``: mean of the defined one-vs-rest AUROCs.
        - ``"ece"``: expected calibration error, 15 top-label bins (Guo et al. 2017).
        - ``"per_class_accuracy"``: ``{name: recall = TP / (TP + FN)}`` (the COVIDx
          "per-class accuracy", i.e. sensitivity of each class).
        - ``"specificity"``: ``{name: TN / (TN + FP)}`` one-vs-rest.
        - ``"f1"``: ``{name: 2 TP / (2 TP + FP + FN)}``.
        - ``"auroc"``: ``{name: one-vs-rest AUROC}``.
        - ``"confusion"``: C x C list of lists of counts, rows = true class, columns = predicted.
        - Binary problems (C == 2) only, taking class index 1 as the positive class:
          ``"positive_class"`` (its name), ``"sensitivity"`` (= recall of class 1) and
          ``"specificity_binary"`` (= TN / (TN + FP) of class 1 = recall of class 0).

        Undefined ratios are ``NaN`` (see the module docstring).
    """
    y, p = _check_classification(y_true, prob, class_names)
    n, n_classes = p.shape
    names = [str(name) for name in class_names]
    pred = p.argmax(axis=1)
    confusion = np.bincount(y * n_classes + pred, minlength=n_classes * n_classes).reshape(
        n_classes, n_classes
    )  # [C, C], rows = true
    tp = np.diag(confusion)
    support = confusion.sum(axis=1)  # TP + FN
    predicted = confusion.sum(axis=0)  # TP + FP
    fn, fp = support - tp, predicted - tp
    tn = n - tp - fn - fp
    recall = _safe_divide(tp, support)
    specificity = _safe_divide(tn, tn + fp)
    f1 = _safe_divide(2 * tp, 2 * tp + fp + fn)
    auroc = ovr_auroc(y, p)

    out: dict[str, Any] = {
        "n": int(n),
        "counts": dict(zip(names, support.tolist(), strict=True)),
        "accuracy": float(tp.sum() / n),
        "balanced_accuracy": _nanmean(recall),
        "macro_f1": _nanmean(f1),
        "macro_auroc": _nanmean(auroc),
        "ece": expected_calibration_error(y, p),
        "per_class_accuracy": dict(zip(names, recall.tolist(), strict=True)),
        "specificity": dict(zip(names, specificity.tolist(), strict=True)),
        "f1": dict(zip(names, f1.tolist(), strict=True)),
        "auroc": dict(zip(names, auroc.tolist(), strict=True)),
        "confusion": confusion.tolist(),
    }
    if n_classes == 2:
        out["positive_class"] = names[1]
        out["sensitivity"] = float(recall[1])
        out["specificity_binary"] = float(specificity[1])
    return out


def multilabel_metrics(
    y: np.ndarray, prob: np.ndarray, names: Sequence[str], threshold: float = 0.5
) -> dict[str, Any]:
    """Point estimates for multi-label findings, each judged only where its label is known.

    Args:
        y: ``[n, C]`` float labels: 1 positive, 0 negative, ``NaN`` missing (or an uncertain
            label the caller chose to mask). Each finding ignores its own NaN rows.
        prob: ``[n, C]`` independent per-finding probabilities (sigmoid outputs).
        names: C finding names.
        threshold: a finding is predicted positive when ``prob >= threshold``.

    Returns:
        ``{"n": rows, "auroc": {name}, "macro_auroc", "f1": {name}, "macro_f1",
        "positives": {name: labelled positives}, "negatives": {name: labelled negatives}}``;
        a finding without labelled positives or negatives has AUROC ``NaN``, and one with
        ``TP + FP + FN == 0`` has F1 ``NaN``; the macro means skip NaN findings.
    """
    labels = np.asarray(y, dtype=np.float64)
    p = np.asarray(prob, dtype=np.float64)
    if labels.ndim != 2 or p.shape != labels.shape:
        raise ValueError(f"y and prob must both be [n, C]; got {labels.shape} and {p.shape}")
    if len(names) != labels.shape[1]:
        raise ValueError(f"{len(names)} names for {labels.shape[1]} label columns")
    known = ~np.isnan(labels)
    if not np.all((labels[known] == 0) | (labels[known] == 1)):
        raise ValueError("y must hold 0, 1 or NaN (missing)")
    if not np.all(np.isfinite(p)) or p.min(initial=0.0) < 0.0 or p.max(initial=0.0) > 1.0:
        raise ValueError("prob must hold finite probabilities in [0, 1]")

    auroc, f1 = [], []
    for j in range(labels.shape[1]):
        truth = labels[known[:, j], j] == 1
        score = p[known[:, j], j]
        auroc.append(float(_rank_auroc(truth[:, None], score[:, None])[0]))
        hit = score >= threshold
        tp = np.sum(hit & truth)
        wrong = np.sum(hit != truth)  # FP + FN
        f1.append(float(_safe_divide(2 * tp, 2 * tp + wrong)))
    positives = (labels == 1).sum(axis=0)
    negatives = (labels == 0).sum(axis=0)
    names = [str(name) for name in names]
    return {
        "n": int(labels.shape[0]),
        "auroc": dict(zip(names, auroc, strict=True)),
        "macro_auroc": _nanmean(np.array(auroc)),
        "f1": dict(zip(names, f1, strict=True)),
        "macro_f1": _nanmean(np.array(f1)),
        "positives": dict(zip(names, positives.tolist(), strict=True)),
        "negatives": dict(zip(names, negatives.tolist(), strict=True)),
    }


def flatten_scalars(d: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """The numeric leaves of a nested dict, keyed by their path joined with ``/``.

    ``{"auroc": {"pneumonia": 0.9}, "n": 10, "confusion": [[...]], "positive_class": "x"}``
    gives ``{"auroc/pneumonia": 0.9, "n": 10.0}``: ints and floats (numpy too) are kept as float,
    everything else (lists, arrays, strings, bools) is left out.
    """
    out: dict[str, float] = {}
    for key, value in d.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten_scalars(value, prefix=f"{path}/"))
        elif isinstance(value, (bool, np.bool_)):
            continue
        elif isinstance(value, (int, float, np.integer, np.floating)):
            out[path] = float(value)
    return out
