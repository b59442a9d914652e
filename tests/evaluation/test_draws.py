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


def _accuracy(correct: np.ndarray) -> dict[str, float]:
    return {"accuracy": float(np.mean(correct))}


def test_paired_bootstrap_matches_a_direct_row_bootstrap() -> None:
    """One patient per row: each replicate draws rows with replacement and scores both runs on
    them; the interval is the percentile interval of the differences (numpy by hand)."""
    from spcxr.evaluation.draws import TestSample, paired_bootstrap

    rng = np.random.default_rng(3)
    n = 200
    keys = np.array([f"img{i}" for i in range(n)])
    a = rng.random(n) < 0.85
    b = np.where(rng.random(n) < 0.97, a, ~a)  # mostly the same rows right: a strong pairing
    ia = TestSample(keys, np.arange(n), {"correct": a.astype(float)}, _accuracy)
    ib = TestSample(keys, np.arange(n), {"correct": b.astype(float)}, _accuracy)
    ci = paired_bootstrap(ia, ib, n_boot=500, seed=7)["accuracy"]

    draws = np.random.default_rng(7)
    diffs = []
    for _ in range(500):
        rows = draws.integers(0, n, size=n)
        diffs.append(a[rows].mean() - b[rows].mean())
    low, high = np.quantile(diffs, [0.025, 0.975])
    assert ci["value"] == pytest.approx(a.mean() - b.mean())
    assert ci["low"] == pytest.approx(low) and ci["high"] == pytest.approx(high)
    # pairing removes the shared test-set variance: narrower than either run's own interval
    own = np.quantile([a[draws.integers(0, n, size=n)].mean() for _ in range(500)], [0.025, 0.975])
    assert ci["high"] - ci["low"] < 0.7 * (own[1] - own[0])


def test_paired_bootstrap_of_a_run_with_itself_is_zero_and_other_rows_are_refused() -> None:
    from spcxr.evaluation.draws import TestSample, paired_bootstrap

    keys = np.array(["a", "b", "c", "d"])
    groups = np.array([0, 0, 1, 2])  # two rows of one patient
    same = TestSample(keys, groups, {"correct": np.array([1.0, 0.0, 1.0, 1.0])}, _accuracy)
    ci = paired_bootstrap(same, same, n_boot=50)["accuracy"]
    assert (ci["value"], ci["low"], ci["high"]) == (0.0, 0.0, 0.0)
    other = TestSample(keys[::-1].copy(), groups, same.arrays, _accuracy)
    with pytest.raises(ValueError, match="same test rows"):
        paired_bootstrap(same, other)
