"""Evaluation: classification and segmentation metrics, confidence intervals, report plots.

The plotting functions (:mod:`spcxr.evaluation.plots`) are exported too but imported on first
use, so that computing metrics never loads matplotlib.
"""

from typing import Any

from spcxr.evaluation.bootstrap import GroupIndex, bootstrap_ci, fold_summary, summarize_folds
from spcxr.evaluation.metrics import (
    ECE_BINS,
    binary_auroc,
    calibration_bins,
    classification_metrics,
    expected_calibration_error,
    flatten_scalars,
    multilabel_metrics,
    ovr_auroc,
    roc_curve,
)
from spcxr.evaluation.segmetrics import boundary, dice, hd95, iou, segmentation_scores

_PLOTS = (
    "budget_curve",
    "confusion_matrix_plot",
    "drift_heatmap",
    "reliability_diagram",
    "roc_curves",
    "segmentation_examples",
)

__all__ = [
    "ECE_BINS",
    "GroupIndex",
    "binary_auroc",
    "bootstrap_ci",
    "boundary",
    "calibration_bins",
    "classification_metrics",
    "dice",
    "expected_calibration_error",
    "flatten_scalars",
    "fold_summary",
    "hd95",
    "iou",
    "multilabel_metrics",
    "ovr_auroc",
    "roc_curve",
    "segmentation_scores",
    "summarize_folds",
    *_PLOTS,
]


def __getattr__(name: str) -> Any:
    """Imports :mod:`spcxr.evaluation.plots` (and matplotlib) only when a plot is asked for."""
    if name in _PLOTS:
        from spcxr.evaluation import plots

        return getattr(plots, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
