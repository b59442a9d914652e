"""Classification metrics against scikit-learn and hand-computed values."""

from __future__ import annotations

import warnings
from types import ModuleType

import numpy as np
import pytest

from spcxr.evaluation.metrics import (
    binary_auroc,
    calibration_bins,
    classification_metrics,
    expected_calibration_error,
    flatten_scalars,
    multilabel_metrics,
    ovr_auroc,
    roc_curve,
)


@pytest.fixture(scope="module")
def skm() -> ModuleType:
    """scikit-learn's metrics module, the reference for the cross-checks (test extra)."""
    return pytest.importorskip("sklearn.metrics", reason="scikit-learn is needed for cross-checks")


def _problem(n: int, n_classes: int, seed: int, ties: bool = False) -> tuple[np.ndarray, ...]:
    """Labels and softmax probabilities that carry some signal; coarse (tied) when ``ties``."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, n_classes, n)
    logits = rng.normal(size=(n, n_classes)) + 1.5 * np.eye(n_classes)[y]
    prob = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    if ties:
        prob = np.round(prob, 1)
        prob /= prob.sum(axis=1, keepdims=True)
    return y, prob


@pytest.mark.parametrize(("n_classes", "ties"), [(2, False), (3, False), (4, True), (2, True)])
def test_matches_sklearn(n_classes: int, ties: bool, skm: ModuleType) -> None:
    y, prob = _problem(300, n_classes, seed=n_classes, ties=ties)
    names = [f"c{i}" for i in range(n_classes)]
    out = classification_metrics(y, prob, names)
    pred = prob.argmax(axis=1)
    labels = list(range(n_classes))

    assert out["n"] == 300
    assert out["counts"] == {names[c]: int((y == c).sum()) for c in labels}
    assert out["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert out["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred))
    assert out["macro_f1"] == pytest.approx(skm.f1_score(y, pred, average="macro"))
    assert out["confusion"] == skm.confusion_matrix(y, pred, labels=labels).tolist()
    recall = skm.recall_score(y, pred, average=None, labels=labels)
    f1 = skm.f1_score(y, pred, average=None, labels=labels)
    for c, name in enumerate(names):
        assert out["per_class_accuracy"][name] == pytest.approx(recall[c])
        assert out["f1"][name] == pytest.approx(f1[c])
        assert out["auroc"][name] == pytest.approx(skm.roc_auc_score(y == c, prob[:, c]))
        # specificity of class c = recall of "not c"
        spec = skm.recall_score(y != c, pred != c)
        assert out["specificity"][name] == pytest.approx(spec)
    if n_classes == 2:
        assert out["macro_auroc"] == pytest.approx(skm.roc_auc_score(y, prob[:, 1]))
        assert out["positive_class"] == "c1"
        assert out["sensitivity"] == pytest.approx(skm.recall_score(y, pred))
        assert out["specificity_binary"] == pytest.approx(skm.recall_score(1 - y, 1 - pred))
    else:
        expected = skm.roc_auc_score(y, prob, multi_class="ovr", average="macro")
        assert out["macro_auroc"] == pytest.approx(expected)
        assert "sensitivity" not in out


def _tied_scores() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 500)
    return y, np.round(rng.random(500) * 0.6 + 0.4 * y, 1)  # ~11 distinct values: many ties


def test_auroc_with_ties_matches_sklearn(skm: ModuleType) -> None:
    y, score = _tied_scores()
    assert binary_auroc(y, score) == pytest.approx(skm.roc_auc_score(y, score))


def test_auroc_with_ties_equals_trapezoid_area() -> None:
    y, score = _tied_scores()
    fpr, tpr, _ = roc_curve(y, score)
    assert binary_auroc(y, score) == pytest.approx(np.trapezoid(tpr, fpr))
    assert binary_auroc(np.array([0, 1, 0, 1]), np.array([0.5, 0.5, 0.5, 0.5])) == 0.5
    assert binary_auroc(np.array([0, 0, 1]), np.array([0.1, 0.2, 0.9])) == 1.0


def test_roc_curve_matches_sklearn(skm: ModuleType) -> None:
    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, 200)
    score = np.round(rng.random(200), 2)
    fpr, tpr, thr = roc_curve(y, score)
    sk_fpr, sk_tpr, sk_thr = skm.roc_curve(y, score, drop_intermediate=False)
    np.testing.assert_allclose(fpr, sk_fpr)
    np.testing.assert_allclose(tpr, sk_tpr)
    np.testing.assert_allclose(thr[1:], sk_thr[1:])
    assert np.isinf(thr[0])


def test_absent_class_gives_nan_not_error(skm: ModuleType) -> None:
    y, prob = _problem(120, 3, seed=5)
    keep = y != 2  # class 2 never occurs in y_true but may still be predicted
    y, prob = y[keep], prob[keep]
    pred = prob.argmax(axis=1)
    out = classification_metrics(y, prob, ["a", "b", "c"])
    assert np.isnan(out["auroc"]["c"])
    assert np.isnan(out["per_class_accuracy"]["c"])
    assert out["counts"]["c"] == 0
    assert out["macro_auroc"] == pytest.approx((out["auroc"]["a"] + out["auroc"]["b"]) / 2)
    # scikit-learn averages balanced accuracy over the classes present in y_true, and macro F1
    # over the classes present in y_true or y_pred: both agree with our NaN-skipping means.
    assert (pred == 2).any()  # the fixture exercises "predicted but never true"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # sklearn warns about the absent class
        assert out["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred))
    assert out["macro_f1"] == pytest.approx(skm.f1_score(y, pred, average="macro"))


def test_single_class_in_y_true() -> None:
    prob = np.array([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8]])
    out = classification_metrics(np.zeros(3, dtype=int), prob, ["neg", "pos"])
    assert np.isnan(out["macro_auroc"])
    assert np.isnan(out["sensitivity"])
    assert out["specificity_binary"] == pytest.approx(2 / 3)
    assert out["accuracy"] == pytest.approx(2 / 3)


def test_hand_computed_binary() -> None:
    y = np.array([0, 0, 0, 1, 1])
    p1 = np.array([0.1, 0.4, 0.7, 0.6, 0.9])
    out = classification_metrics(y, np.stack([1 - p1, p1], axis=1), ["normal", "pneumonia"])
    assert out["confusion"] == [[2, 1], [0, 2]]
    assert out["sensitivity"] == 1.0
    assert out["specificity_binary"] == pytest.approx(2 / 3)
    assert out["f1"]["pneumonia"] == pytest.approx(2 * 2 / (2 * 2 + 1 + 0))
    # positives 0.6, 0.9 vs negatives 0.1, 0.4, 0.7: 5 of 6 pairs ordered correctly
    assert out["auroc"]["pneumonia"] == pytest.approx(5 / 6)


def _ece_loop(y: np.ndarray, prob: np.ndarray, n_bins: int) -> float:
    """Reference ECE, one bin at a time, bins (lo, hi] as in Guo et al. 2017."""
    conf, correct = prob.max(axis=1), prob.argmax(axis=1) == y
    total = 0.0
    for m in range(n_bins):
        lo, hi = m / n_bins, (m + 1) / n_bins
        inside = (conf > lo) & (conf <= hi)
        if inside.any():
            total += inside.sum() / len(y) * abs(correct[inside].mean() - conf[inside].mean())
    return total


def test_ece_matches_reference_loop() -> None:
    y, prob = _problem(400, 3, seed=7)
    assert expected_calibration_error(y, prob) == pytest.approx(_ece_loop(y, prob, 15))
    assert classification_metrics(y, prob, "abc")["ece"] == pytest.approx(_ece_loop(y, prob, 15))
    assert expected_calibration_error(y, prob, 5) == pytest.approx(_ece_loop(y, prob, 5))


def test_ece_hand_computed_and_bin_edges() -> None:
    # confidences 0.6 (right), 0.6 (wrong), 0.9 (right), 1.0 (right); 0.6 sits on the edge 9/15
    prob = np.array([[0.6, 0.4], [0.6, 0.4], [0.1, 0.9], [0.0, 1.0]])
    y = np.array([0, 1, 1, 1])
    bins = calibration_bins(y, prob, 15)
    assert bins["count"].sum() == 4
    assert bins["count"][8] == 2  # 0.6 = 9/15 belongs to (8/15, 9/15]
    assert bins["count"][13] == 1 and bins["count"][14] == 1
    expected = (2 * abs(0.5 - 0.6) + abs(1 - 0.9) + abs(1 - 1.0)) / 4
    assert expected_calibration_error(y, prob) == pytest.approx(expected)


def test_ece_small_when_calibrated_large_when_overconfident() -> None:
    rng = np.random.default_rng(3)
    conf = rng.uniform(0.5, 1.0, 20000)
    y = (rng.random(20000) < conf).astype(int)  # P(class 1) really is conf
    calibrated = np.stack([1 - conf, conf], axis=1)
    assert expected_calibration_error(y, calibrated) < 0.02
    sharp = np.clip(conf + 0.3, 0, 1)
    assert expected_calibration_error(y, np.stack([1 - sharp, sharp], axis=1)) > 0.15


def test_multilabel_ignores_nan_and_matches_sklearn(skm: ModuleType) -> None:
    rng = np.random.default_rng(4)
    n, names = 300, ["effusion", "nodule", "cardiomegaly"]
    y = (rng.random((n, 3)) < 0.3).astype(float)
    prob = np.clip(0.35 * y + 0.65 * rng.random((n, 3)), 0, 1)
    y[rng.random((n, 3)) < 0.2] = np.nan
    y[:, 2] = np.where(np.isnan(y[:, 2]), np.nan, 0.0)  # no positives left for cardiomegaly
    out = multilabel_metrics(y, prob, names)
    for j, name in enumerate(names[:2]):
        known = ~np.isnan(y[:, j])
        assert out["auroc"][name] == pytest.approx(skm.roc_auc_score(y[known, j], prob[known, j]))
        assert out["f1"][name] == pytest.approx(skm.f1_score(y[known, j], prob[known, j] >= 0.5))
        assert out["positives"][name] == int(np.sum(y[:, j] == 1))
        assert out["negatives"][name] == int(np.sum(y[:, j] == 0))
    assert np.isnan(out["auroc"]["cardiomegaly"])
    assert out["positives"]["cardiomegaly"] == 0
    assert out["macro_auroc"] == pytest.approx(
        (out["auroc"]["effusion"] + out["auroc"]["nodule"]) / 2
    )
    assert out["n"] == n


def test_flatten_scalars() -> None:
    d = {
        "auroc": {"pneumonia": np.float64(0.9), "normal": 0.8},
        "n": 10,
        "confusion": [[1, 2], [3, 4]],
        "positive_class": "pneumonia",
        "flag": True,
        "deep": {"a": {"b": np.int64(3)}},
    }
    assert flatten_scalars(d) == {
        "auroc/pneumonia": 0.9,
        "auroc/normal": 0.8,
        "n": 10.0,
        "deep/a/b": 3.0,
    }


def test_ovr_auroc_vector(skm: ModuleType) -> None:
    y, prob = _problem(200, 4, seed=9)
    expected = [skm.roc_auc_score(y == c, prob[:, c]) for c in range(4)]
    np.testing.assert_allclose(ovr_auroc(y, prob), expected)


@pytest.mark.parametrize(
    ("y", "prob", "names", "message"),
    [
        (np.array([0, 1]), np.array([0.2, 0.8]), "ab", "2-D"),
        (np.array([0, 1]), np.array([[0.2, 0.8], [0.5, 0.5]]), "abc", "class_names"),
        (np.array([0, 1, 1]), np.array([[0.2, 0.8], [0.5, 0.5]]), "ab", "2 entries"),
        (np.array([0, 2]), np.array([[0.2, 0.8], [0.5, 0.5]]), "ab", r"\[0, 2\)"),
        (np.array([0, 1]), np.array([[-2.0, 3.0], [0.5, 0.5]]), "ab", "softmax"),
        (np.array([0, 1]), np.array([[np.nan, 1.0], [0.5, 0.5]]), "ab", "NaN"),
        (np.array([0.5, 1.0]), np.array([[0.2, 0.8], [0.5, 0.5]]), "ab", "integer"),
    ],
)
def test_bad_input_raises(y: np.ndarray, prob: np.ndarray, names: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        classification_metrics(y, prob, list(names))
