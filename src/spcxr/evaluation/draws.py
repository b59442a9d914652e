"""Statistics across repeated label draws: the spread of a setting and paired differences.

With a few labels per class the draw of *which* patients are labelled moves a metric more than
the choice of initialisation does, so a single run decides nothing. A setting is summarised over
its draws (mean, sample SD, Student t interval of the mean); two initialisations trained on the
same draws are compared draw by draw (paired t interval of the mean difference), which removes
the between-draw variance both share. Without matching draws the comparison falls back to
Welch's unpaired interval and says so.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
from scipy import stats

from spcxr.evaluation.bootstrap import fold_summary


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


__all__ = ["draw_summary", "paired_difference", "unpaired_difference"]
