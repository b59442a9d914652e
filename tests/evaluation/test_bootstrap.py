"""Cluster bootstrap and fold intervals: resampling by whole groups, coverage, NaN handling."""

from __future__ import annotations

from collections import Counter
from functools import partial

import numpy as np
import pytest
from scipy import stats

from spcxr.evaluation.bootstrap import GroupIndex, bootstrap_ci, fold_summary, summarize_folds
from spcxr.evaluation.metrics import binary_auroc, classification_metrics


def _auroc_metric(y: np.ndarray, score: np.ndarray) -> dict[str, float]:
    return {"auroc": binary_auroc(y, score)}


def test_resample_takes_whole_groups_with_multiplicity() -> None:
    rng = np.random.default_rng(0)
    sizes = rng.integers(1, 5, 30)
    groups = rng.permutation(np.repeat(np.arange(30) * 7 + 100, sizes))  # shuffled, gappy ids
    index = GroupIndex(groups)
    size_of = Counter(groups.tolist())
    draw = np.random.default_rng(1)
    for _ in range(20):
        rows = index.resample(draw)
        per_group = Counter(groups[rows].tolist())
        drawn = 0
        for group, count in per_group.items():
            # each draw of a group brings all its rows, each exactly once per draw
            assert count % size_of[group] == 0
            times = count // size_of[group]
            drawn += times
            row_counts = Counter(rows[groups[rows] == group].tolist())
            assert set(row_counts.values()) == {times}
            assert len(row_counts) == size_of[group]
        assert drawn == 30  # as many group draws as there are groups


def test_row_bootstrap_fast_path_equals_general_path() -> None:
    groups = np.random.default_rng(3).permutation(50) * 3  # one row per group, shuffled ids
    fast = GroupIndex(groups)
    general = GroupIndex(groups)
    general.singletons = False
    assert fast.singletons
    for seed in range(5):
        a = fast.resample(np.random.default_rng(seed))
        b = general.resample(np.random.default_rng(seed))
        np.testing.assert_array_equal(a, b)


def test_point_estimate_and_structure() -> None:
    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, 200)
    p1 = np.clip(0.4 * y + 0.6 * rng.random(200), 0, 1)
    prob = np.stack([1 - p1, p1], axis=1)
    fn = partial(classification_metrics, class_names=["normal", "pneumonia"])
    res = bootstrap_ci(fn, np.arange(200) // 2, n_boot=200, y_true=y, prob=prob)
    point = classification_metrics(y, prob, ["normal", "pneumonia"])
    assert res["point"] == point  # confusion matrix and names carried here
    assert res["n_boot"] == 200 and res["n_groups"] == 100 and res["n_rows"] == 200
    ci = res["intervals"]
    assert "confusion" not in ci and "positive_class" not in ci
    assert ci["auroc/pneumonia"]["value"] == point["auroc"]["pneumonia"]
    for key in ("accuracy", "macro_auroc", "sensitivity", "specificity_binary", "ece"):
        assert ci[key]["low"] <= ci[key]["value"] <= ci[key]["high"]
        assert ci[key]["n_valid"] == 200
        assert ci[key]["high"] - ci[key]["low"] > 0


def test_deterministic_under_seed() -> None:
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 100)
    score = rng.random(100) + 0.5 * y
    groups = np.arange(100) // 4
    a = bootstrap_ci(_auroc_metric, groups, n_boot=100, seed=7, y=y, score=score)
    b = bootstrap_ci(_auroc_metric, groups, n_boot=100, seed=7, y=y, score=score)
    c = bootstrap_ci(_auroc_metric, groups, n_boot=100, seed=8, y=y, score=score)
    assert a == b
    assert a["intervals"]["auroc"] != c["intervals"]["auroc"]


def test_nan_replicates_dropped_per_key() -> None:
    # 10 patients of 3 images; only patient 9 has class "c". A replicate misses it with
    # probability 0.9 ** 10 = 0.349, and then class c's recall and AUROC are undefined.
    rng = np.random.default_rng(4)
    groups = np.repeat(np.arange(10), 3)
    y = np.where(groups == 9, 2, groups % 2)
    prob = rng.dirichlet(np.ones(3), size=30)
    fn = partial(classification_metrics, class_names=["a", "b", "c"])
    res = bootstrap_ci(fn, groups, n_boot=1000, y_true=y, prob=prob)
    ci = res["intervals"]
    assert ci["accuracy"]["n_valid"] == 1000
    n_valid = ci["auroc/c"]["n_valid"]
    assert 0.58 < n_valid / 1000 < 0.72  # 1 - 0.349 = 0.651
    assert ci["per_class_accuracy/c"]["n_valid"] == n_valid
    assert np.isfinite(ci["auroc/c"]["low"]) and np.isfinite(ci["auroc/c"]["high"])


def test_all_nan_key_gives_nan_interval() -> None:
    res = bootstrap_ci(
        lambda y: {"m": float("nan"), "mean": float(np.mean(y))},
        np.arange(20),
        n_boot=50,
        y=np.arange(20.0),
    )
    assert res["intervals"]["m"]["n_valid"] == 0
    assert np.isnan(res["intervals"]["m"]["low"]) and np.isnan(res["intervals"]["m"]["high"])
    assert res["intervals"]["mean"]["value"] == pytest.approx(9.5)


def _pairwise_auroc(y: np.ndarray, score: np.ndarray) -> dict[str, float]:
    """AUROC by its definition, P(score_pos > score_neg) + P(tie) / 2; cheap for small n."""
    pos, neg = score[y == 1], score[y == 0]
    greater = (pos[:, None] > neg[None, :]).mean()
    return {"auroc": float(greater + 0.5 * (pos[:, None] == neg[None, :]).mean())}


def test_percentile_coverage_of_known_auroc() -> None:
    # Binormal model: negatives N(0, 1), positives N(d, 1) -> AUROC = Phi(d / sqrt(2)).
    d = 1.0
    true_auc = stats.norm.cdf(d / np.sqrt(2))
    y = np.r_[np.zeros(60, int), np.ones(60, int)]
    hits, n_sim = 0, 200
    for sim in range(n_sim):
        score = np.random.default_rng(1000 + sim).normal(size=120) + d * y
        res = bootstrap_ci(_pairwise_auroc, np.arange(120), n_boot=200, seed=sim, y=y, score=score)
        ci = res["intervals"]["auroc"]
        hits += ci["low"] <= true_auc <= ci["high"]
    assert 0.88 <= hits / n_sim <= 0.99


def test_cluster_wider_than_row_bootstrap_for_correlated_rows() -> None:
    # 40 patients, 8 images each; images of one patient share the label and most of the score.
    rng = np.random.default_rng(5)
    n_patients, per = 40, 8
    groups = np.repeat(np.arange(n_patients), per)
    patient_y = rng.integers(0, 2, n_patients)
    patient_score = rng.normal(size=n_patients) + 0.8 * patient_y
    y = patient_y[groups]
    score = patient_score[groups] + 0.1 * rng.normal(size=groups.size)
    cluster = bootstrap_ci(_auroc_metric, groups, n_boot=400, y=y, score=score)["intervals"]
    rows = bootstrap_ci(_auroc_metric, np.arange(groups.size), n_boot=400, y=y, score=score)
    width_cluster = cluster["auroc"]["high"] - cluster["auroc"]["low"]
    width_rows = rows["intervals"]["auroc"]["high"] - rows["intervals"]["auroc"]["low"]
    # 8 near-copies per patient: the honest interval is ~sqrt(8) = 2.8x wider
    assert width_cluster > 2.0 * width_rows


def test_bad_arguments() -> None:
    y = np.zeros(10)
    with pytest.raises(ValueError, match="rows"):
        bootstrap_ci(lambda y: {"m": 0.0}, np.arange(9), y=y)
    with pytest.raises(ValueError, match="at least one array"):
        bootstrap_ci(lambda: {"m": 0.0}, np.arange(10))
    with pytest.raises(ValueError, match="level"):
        bootstrap_ci(lambda y: {"m": 0.0}, np.arange(10), level=95, y=y)


@pytest.mark.slow
def test_fold_summary_t_interval() -> None:
    values = [0.81, 0.77, 0.85, 0.80, 0.79]
    out = fold_summary(values)
    low, high = stats.t.interval(0.95, 4, loc=np.mean(values), scale=stats.sem(values))
    assert out["value"] == pytest.approx(np.mean(values))
    assert out["low"] == pytest.approx(low) and out["high"] == pytest.approx(high)
    assert out["std"] == pytest.approx(np.std(values, ddof=1))
    assert out["n"] == 5
    # the 90% interval is narrower
    narrow = fold_summary(values, level=0.9)
    assert out["low"] < narrow["low"] < narrow["high"] < out["high"]


def test_fold_summary_edge_cases() -> None:
    one = fold_summary([0.7])
    assert one["value"] == 0.7 and one["n"] == 1 and np.isnan(one["low"])
    assert fold_summary([])["n"] == 0
    with_nan = fold_summary([0.7, float("nan"), 0.9])
    assert with_nan["n"] == 2 and with_nan["value"] == pytest.approx(0.8)


def test_fold_summary_coverage() -> None:
    rng = np.random.default_rng(8)
    hits = sum(
        (s := fold_summary(rng.normal(0.8, 0.05, 5)))["low"] <= 0.8 <= s["high"]
        for _ in range(2000)
    )
    assert 0.93 <= hits / 2000 <= 0.97


def test_summarize_folds() -> None:
    folds = [{"auroc": {"a": 0.8}, "acc": 0.7}, {"auroc": {"a": 0.9}, "acc": 0.75}, {"acc": 0.8}]
    out = summarize_folds(folds)
    assert list(out) == ["auroc/a", "acc"]
    assert out["auroc/a"]["n"] == 2 and out["auroc/a"]["value"] == pytest.approx(0.85)
    assert out["acc"]["n"] == 3 and out["acc"]["value"] == pytest.approx(0.75)
