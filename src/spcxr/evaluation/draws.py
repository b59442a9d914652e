"""Statistics across repeated label draws: the spread of a setting and paired differences.

With a few labels per class the draw of *which* patients are labelled moves a metric more than
the choice of initialisation does, so a single run decides nothing. A setting is summarised over
its draws (mean, sample SD, Student t interval of the mean); two initialisations trained on the
same draws are compared draw by draw (paired t interval of the mean difference), which removes
the between-draw variance both share. Without matching draws the comparison falls back to
Welch's unpaired interval and says so. With a single draw (e.g. all labels) only the test set
varies: :func:`paired_bootstrap` gives the patient-bootstrap interval of the difference of two
models scored on the same test images, which says nothing about the variation between draws.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import stats

from spcxr.evaluation.bootstrap import bootstrap_ci, fold_summary
from spcxr.evaluation.metrics import flatten_scalars


def draw_summary(values: Sequence[float], level: float = 0.95) -> dict[str, Any]:
    """Mean over draws with the sample SD and a Student t interval of the mean.

    Returns:
        ``{"value": mean, "low", "high", "std", "n", "min", "max"}`` (interval NaN below two
        finite draws; non-finite values are dropped).
    """
    out: dict[str, Any] = fold_summary(values, level)
    v = np.asarray(values, dtype=np.float64).ravel()
    v = v[np.isfinite(v)]
    out["min"] = float(v.min()) if v.size else float("nan")
    out["max"] = float(v.max()) if v.size else float("nan")
    return out


def paired_difference(
    a: Mapping[Hashable, float], b: Mapping[Hashable, float], level: float = 0.95
) -> dict[str, Any]:
    """``a - b`` over the draws both were trained on (matched by key, e.g. budget seed).

    The interval is the paired t interval: ``mean(d) +- t_{(1+level)/2, n-1} sd(d) / sqrt(n)``
    of the per-draw differences ``d``. Draws present in only one of ``a``/``b`` are left out and
    counted. With no common draw the result is :func:`unpaired_difference` of all values.

    Returns:
        ``{"paired": True, "value", "low", "high", "std", "n", "keys", "differences",
        "unmatched"}``.
    """
    common = [k for k in a if k in b and np.isfinite(a[k]) and np.isfinite(b[k])]
    if not common:
        return unpaired_difference(list(a.values()), list(b.values()), level)
    common = sorted(common, key=str)
    d = np.array([a[k] - b[k] for k in common], dtype=np.float64)
    summary = fold_summary(d, level)
    return {
        "paired": True,
        **summary,
        "keys": [k if isinstance(k, (int, str)) else str(k) for k in common],
        "differences": d.tolist(),
        "unmatched": len(set(a) ^ set(b)),
    }


def unpaired_difference(
    a: Sequence[float], b: Sequence[float], level: float = 0.95
) -> dict[str, Any]:
    """Difference of means ``mean(a) - mean(b)`` with Welch's t interval (no pairing).

    Returns:
        ``{"paired": False, "value", "low", "high", "n_a", "n_b"}``; the interval is NaN when
        either side has fewer than two finite values.
    """
    x = np.asarray(a, dtype=np.float64)
    y = np.asarray(b, dtype=np.float64)
    x, y = x[np.isfinite(x)], y[np.isfinite(y)]
    nan = float("nan")
    if not x.size or not y.size:
        return {
            "paired": False,
            "value": nan,
            "low": nan,
            "high": nan,
            "n_a": x.size,
            "n_b": y.size,
        }
    diff = float(x.mean() - y.mean())
    low = high = nan
    if x.size > 1 and y.size > 1:
        va, vb = x.var(ddof=1) / x.size, y.var(ddof=1) / y.size
        se = float(np.sqrt(va + vb))
        if se > 0:
            dof = (va + vb) ** 2 / (va**2 / (x.size - 1) + vb**2 / (y.size - 1))
            half = float(stats.t.ppf((1.0 + level) / 2.0, dof)) * se
        else:
            half = 0.0
        low, high = diff - half, diff + half
    return {
        "paired": False,
        "value": diff,
        "low": low,
        "high": high,
        "n_a": int(x.size),
        "n_b": int(y.size),
    }


@dataclass
class TestSample:
    """What one run's metrics on one test set were computed from, kept for paired bootstraps.

    Attributes:
        keys: ``[n]`` identity of each test row (two samples pair only when these are equal).
        groups: ``[n]`` patient group per row (the bootstrap resamples groups).
        arrays: ``[n, ...]`` per-row inputs of ``metric_fn`` (e.g. ``y_true``, ``prob``).
        metric_fn: ``metric_fn(**arrays)`` -> (nested) dict of metrics.
    """

    keys: np.ndarray
    groups: np.ndarray
    arrays: dict[str, np.ndarray]
    metric_fn: Callable[..., Mapping[str, Any]]


def paired_bootstrap(
    a: TestSample,
    b: TestSample,
    *,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, dict[str, float]]:
    """Patient-bootstrap intervals of ``metric(a) - metric(b)`` on the same test rows.

    Every replicate draws patient groups with replacement and scores both runs on the same drawn
    rows, so the interval holds the test-set uncertainty of the difference (not the variation
    between label draws).

    Returns:
        ``{metric key: {"value", "low", "high", "n_valid"}}`` for every scalar both return.

    Raises:
        ValueError: when the two samples were not scored on the same rows.
    """
    if a.keys.shape != b.keys.shape or not np.array_equal(a.keys, b.keys):
        raise ValueError("paired_bootstrap: the two runs were not scored on the same test rows")

    def difference(**arrays: np.ndarray) -> dict[str, float]:
        fa = flatten_scalars(a.metric_fn(**{k[2:]: v for k, v in arrays.items() if k[:2] == "a_"}))
        fb = flatten_scalars(b.metric_fn(**{k[2:]: v for k, v in arrays.items() if k[:2] == "b_"}))
        return {k: fa[k] - fb[k] for k in fa if k in fb}

    arrays = {f"a_{k}": v for k, v in a.arrays.items()}
    arrays.update({f"b_{k}": v for k, v in b.arrays.items()})
    ci = bootstrap_ci(difference, a.groups, n_boot=n_boot, seed=seed, level=level, **arrays)
    return ci["intervals"]


__all__ = [
    "TestSample",
    "draw_summary",
    "paired_bootstrap",
    "paired_difference",
    "unpaired_difference",
]
