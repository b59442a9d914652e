"""Statistics across label draws, checked against direct numpy / scipy computations."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from spcxr.evaluation.draws import draw_summary, paired_difference, unpaired_difference


def _synthetic_runs(seed: int = 0) -> tuple[dict[int, float], dict[int, float]]:
    """Five draws: a shared draw effect (large) plus an init effect (+0.04) and noise."""
    rng = np.random.default_rng(seed)
    draw = rng.normal(0.75, 0.08, 5)
    gmml = draw + 0.04 + rng.normal(0, 0.01, 5)
    scratch = draw + rng.normal(0, 0.01, 5)
    return dict(enumerate(gmml.tolist())), dict(enumerate(scratch.tolist()))


def test_draw_summary_matches_scipy() -> None:
    gmml, _ = _synthetic_runs()
    v = np.array(list(gmml.values()))
    s = draw_summary(v)
    low, high = stats.t.interval(0.95, len(v) - 1, loc=v.mean(), scale=stats.sem(v))
    assert s["value"] == pytest.approx(v.mean())
    assert s["std"] == pytest.approx(v.std(ddof=1))
    assert (s["low"], s["high"]) == pytest.approx((low, high))
    assert (s["min"], s["max"], s["n"]) == (v.min(), v.max(), 5)


def test_paired_difference_matches_paired_t_and_is_narrower_than_unpaired() -> None:
    gmml, scratch = _synthetic_runs()
    d = np.array([gmml[k] - scratch[k] for k in range(5)])
    out = paired_difference(gmml, scratch)
    low, high = stats.t.interval(0.95, 4, loc=d.mean(), scale=stats.sem(d))
    assert out["paired"] and out["n"] == 5 and out["unmatched"] == 0
    np.testing.assert_allclose(out["differences"], d)
    assert (out["value"], out["low"], out["high"]) == pytest.approx((d.mean(), low, high))
    # scipy's paired t test agrees on the same differences
    res = stats.ttest_rel(list(gmml.values()), list(scratch.values()))
    ci = res.confidence_interval(0.95)
    assert (out["low"], out["high"]) == pytest.approx((ci.low, ci.high))
    # the shared draw effect cancels in the pairing: the unpaired interval is much wider
    unpaired = unpaired_difference(list(gmml.values()), list(scratch.values()))
    assert unpaired["high"] - unpaired["low"] > 2 * (out["high"] - out["low"])
    assert out["low"] > 0  # the +0.04 effect is found with pairing


def test_paired_difference_matches_draws_by_key_and_falls_back_to_unpaired() -> None:
    a = {"seed 0": 0.8, "seed 1": 0.7, "seed 2": 0.9}
    b = {"seed 2": 0.85, "seed 0": 0.75, "seed 3": 0.1}
    out = paired_difference(a, b)
    assert out["keys"] == ["seed 0", "seed 2"] and out["unmatched"] == 2
    assert out["differences"] == pytest.approx([0.05, 0.05])
    none = paired_difference({"x": 0.8, "y": 0.6}, {"z": 0.5, "w": 0.3})
    assert none["paired"] is False
    res = stats.ttest_ind([0.8, 0.6], [0.5, 0.3], equal_var=False)
    ci = res.confidence_interval(0.95)
    assert none["value"] == pytest.approx(0.3)
    assert (none["low"], none["high"]) == pytest.approx((ci.low, ci.high))


def test_one_draw_has_no_interval() -> None:
    out = paired_difference({"seed 0": 0.8}, {"seed 0": 0.7})
    assert out["value"] == pytest.approx(0.1) and np.isnan(out["low"]) and out["n"] == 1
    assert np.isnan(draw_summary([0.5])["low"])
