"""Confidence intervals: patient-level (cluster) bootstrap over test rows, and t intervals over
cross-validation folds.

Images of one patient are correlated (same anatomy, same scanner, often the same label), so
resampling images as if independent gives intervals that are too narrow. ``bootstrap_ci``
resamples whole patient groups instead (the cluster bootstrap; Davison & Hinkley, "Bootstrap
Methods and their Application", 1997, section 3.8) and reports percentile intervals.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from scipy import stats

from spcxr.evaluation.metrics import flatten_scalars

__all__ = ["GroupIndex", "bootstrap_ci", "fold_summary", "split_ci", "summarize_folds"]


class GroupIndex:
    """Rows of each group, laid out so a whole resample is built with a few numpy calls.

    Rows are sorted by group; group g owns ``order[starts[g] : starts[g] + lengths[g]]``.
    """

    def __init__(self, groups: np.ndarray) -> None:
        groups = np.asarray(groups)
        if groups.ndim != 1 or groups.size == 0:
            raise ValueError(f"groups must be a non-empty 1-D array; got shape {groups.shape}")
        _, inverse = np.unique(groups, return_inverse=True)
        self.order = np.argsort(inverse, kind="stable")  # row ids sorted by group
        self.lengths = np.bincount(inverse)  # [G]
        self.starts = np.cumsum(self.lengths) - self.lengths  # [G]
        self.n_groups = int(self.lengths.size)
        self.singletons = bool(np.all(self.lengths == 1))  # plain row bootstrap

    def resample(self, rng: np.random.Generator) -> np.ndarray:
        """Row ids of one cluster-bootstrap replicate.

        Draws ``n_groups`` groups with replacement and returns all rows of each drawn group,
        once per draw (a group drawn twice contributes its rows twice).
        """
        drawn = rng.integers(0, self.n_groups, size=self.n_groups)  # [G]
        if self.singletons:
            return self.order[drawn]
        lengths = self.lengths[drawn]
        out_starts = np.cumsum(lengths) - lengths  # where each drawn group starts in the output
        # position in `order` = group start + offset within the group
        offsets = np.arange(lengths.sum()) - np.repeat(out_starts, lengths)
        return self.order[np.repeat(self.starts[drawn], lengths) + offsets]


def bootstrap_ci(
    metric_fn: Callable[..., Mapping[str, Any]],
    groups: np.ndarray,
    *,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    **arrays: np.ndarray,
) -> dict[str, Any]:
    """Percentile confidence intervals for every scalar that ``metric_fn`` returns.

    The point estimate is ``metric_fn(**arrays)`` on all rows. Each of ``n_boot`` replicates
    draws the unique ``groups`` (patients) with replacement and evaluates ``metric_fn`` on all
    rows of the drawn groups. For each scalar key (nested dicts flattened with ``/``, see
    :func:`~spcxr.evaluation.metrics.flatten_scalars`) the interval is the
    ``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles of the replicates where that key is
    finite; replicates where it is NaN (e.g. a class that was not drawn) are dropped for that key
    only and counted in ``n_valid``. Pass ``groups = np.arange(n)`` for the ordinary row bootstrap.

    Example::

        ci = bootstrap_ci(partial(classification_metrics, class_names=names), patient_ids,
                          y_true=y, prob=prob)
        ci["intervals"]["auroc/pneumonia"]  # {"value": .., "low": .., "high": .., "n_valid": ..}

    A paired comparison of two models on the same test rows is the same call with a
    ``metric_fn(y_true, prob_a, prob_b)`` that returns differences.

    Args:
        metric_fn: called with the resampled ``arrays`` as keyword arguments; returns a
            (nested) dict. It must return NaN rather than raise when a quantity is undefined.
        groups: ``[n]`` group id per row (patient or duplicate group); any sortable dtype.
        n_boot: number of bootstrap replicates.
        seed: seed of the ``numpy.random.default_rng`` that draws the replicates.
        level: confidence level of the percentile interval.
        **arrays: ``[n, ...]`` arrays indexed by row, passed to ``metric_fn``.

    Returns:
        ``{"intervals": {key: {"value", "low", "high", "n_valid"}}, "point": metric_fn output
        on all rows (non-scalar entries such as the confusion matrix live only here),
        "n_boot", "n_groups", "n_rows", "level", "seed", "method"}``. ``low``/``high`` are NaN
        when no replicate gave a finite value.
    """
    if not arrays:
        raise ValueError("bootstrap_ci needs at least one array keyword argument")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    groups = np.asarray(groups)
    arrays = {name: np.asarray(value) for name, value in arrays.items()}
    for name, value in arrays.items():
        if value.ndim == 0 or value.shape[0] != groups.shape[0]:
            raise ValueError(
                f"array {name!r} has {value.shape[0] if value.ndim else 0} rows but groups "
                f"has {groups.shape[0]}"
            )
    index = GroupIndex(groups)

    point = metric_fn(**arrays)
    point_flat = flatten_scalars(point)
    keys = list(point_flat)
    samples = np.full((n_boot, len(keys)), np.nan)  # [B, K]
    rng = np.random.default_rng(seed)
    for b in range(n_boot):
        rows = index.resample(rng)
        flat = flatten_scalars(metric_fn(**{name: v[rows] for name, v in arrays.items()}))
        samples[b] = [flat.get(key, np.nan) for key in keys]

    alpha = (1.0 - level) / 2.0
    intervals: dict[str, dict[str, float]] = {}
    for j, key in enumerate(keys):
        valid = samples[np.isfinite(samples[:, j]), j]
        low, high = np.quantile(valid, [alpha, 1.0 - alpha]) if valid.size else (np.nan, np.nan)
        intervals[key] = {
            "value": point_flat[key],
            "low": float(low),
            "high": float(high),
            "n_valid": int(valid.size),
        }
    return {
        "intervals": intervals,
        "point": point,
        "n_boot": int(n_boot),
        "n_groups": index.n_groups,
        "n_rows": int(groups.shape[0]),
        "level": float(level),
        "seed": int(seed),
        "method": "cluster (patient-group) bootstrap, percentile interval",
    }


def fold_summary(values: Sequence[float], level: float = 0.95) -> dict[str, float]:
    """Mean over cross-validation folds with a Student t interval.

    ``mean +- t_{(1 + level) / 2, n - 1} * sd / sqrt(n)`` with the sample standard deviation
    (``ddof=1``); non-finite fold values are dropped and ``n`` counts the rest. With one fold
    the interval is NaN; with none, everything is NaN.

    Returns:
        ``{"value": mean, "low", "high", "std", "n"}``.
    """
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    v = np.asarray(values, dtype=np.float64).ravel()
    v = v[np.isfinite(v)]
    n = int(v.size)
    nan = float("nan")
    if n == 0:
        return {"value": nan, "low": nan, "high": nan, "std": nan, "n": 0}
    mean = float(v.mean())
    if n == 1:
        return {"value": mean, "low": nan, "high": nan, "std": nan, "n": 1}
    std = float(v.std(ddof=1))
    half = float(stats.t.ppf((1.0 + level) / 2.0, n - 1)) * std / np.sqrt(n)
    return {"value": mean, "low": mean - half, "high": mean + half, "std": std, "n": n}


def summarize_folds(
    per_fold: Sequence[Mapping[str, Any]], level: float = 0.95
) -> dict[str, dict[str, float]]:
    """:func:`fold_summary` of every scalar key across the per-fold metric dicts.

    Args:
        per_fold: one (nested) metric dict per fold, e.g. ``classification_metrics`` outputs.
        level: confidence level.

    Returns:
        ``{key: fold_summary}`` with ``/``-joined keys in first-seen order; a key missing from
        a fold counts as NaN for that fold (so it is dropped from that key's ``n``).
    """
    flats = [flatten_scalars(d) for d in per_fold]
    keys = list(dict.fromkeys(key for flat in flats for key in flat))
    return {key: fold_summary([flat.get(key, np.nan) for flat in flats], level) for key in keys}


def split_ci(ci: dict[str, Any]) -> dict[str, Any]:
    """bootstrap_ci's result as metrics (intervals), point estimates and bootstrap details."""
    details = {k: v for k, v in ci.items() if k not in ("intervals", "point")}
    return {"metrics": ci["intervals"], "point": ci["point"], "bootstrap": details}
