"""Tests of label budgets (by patient, stratified, nested) and stratified group k-fold."""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest

from spcxr.data.budget import (
    Budget,
    group_classes,
    kfold_groups,
    parse_budget,
    select_budget,
)

CLASS_PATIENTS = {"normal": 30, "pneumonia": 50, "tuberculosis": 12}


def make_frame(seed: int = 0, mixed: int = 4) -> pd.DataFrame:
    """Rows of patients with 1-4 images each, shuffled, with non-contiguous group ids.

    ``mixed`` pneumonia patients also have one normal image (a minority label).
    """
    rng = np.random.default_rng(seed)
    rows = []
    group_ids = rng.choice(10_000, size=sum(CLASS_PATIENTS.values()), replace=False) * 7
    k = 0
    for label, n_patients in CLASS_PATIENTS.items():
        for p in range(n_patients):
            n_images = int(rng.integers(1, 5))
            labels = [label] * n_images
            if label == "pneumonia" and p < mixed:
                labels = [label, label, "normal"]
            rows += [{"group": int(group_ids[k]), "label": lab, "patient": k} for lab in labels]
            k += 1
    frame = pd.DataFrame(rows)
    return frame.sample(frac=1.0, random_state=seed).reset_index(drop=True)


def selected_groups(frame: pd.DataFrame, idx: np.ndarray) -> set[int]:
    return set(frame["group"].iloc[idx].tolist())


def per_class_images(frame: pd.DataFrame, idx: np.ndarray) -> dict[str, int]:
    """Images per group class (the majority label) among the selected rows."""
    code, group_class, _, names = group_classes(frame)
    counts = np.bincount(group_class[code[idx]], minlength=len(names))
    return dict(zip(names.tolist(), counts.tolist(), strict=True))


# -- parse_budget ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("all", Budget("all")),
        (" ALL ", Budget("all")),
        ("0.1", Budget("fraction", 0.1)),
        (".25", Budget("fraction", 0.25)),
        ("1.0", Budget("fraction", 1.0)),
        ("5e-3", Budget("fraction", 0.005)),
        (0.5, Budget("fraction", 0.5)),
        (np.float32(0.5), Budget("fraction", 0.5)),
        ("10%", Budget("fraction", 0.1)),
        ("2.5 %", Budget("fraction", 0.025)),
        ("100%", Budget("fraction", 1.0)),
        ("20/class", Budget("per_class", 20)),
        ("2 / Class", Budget("per_class", 2)),
        ("100", Budget("total", 100)),
        ("100 images", Budget("total", 100)),
        (100, Budget("total", 100)),
        (np.int64(7), Budget("total", 7)),
        (Budget("per_class", 3), Budget("per_class", 3)),
    ],
)
def test_parse_budget_spellings(text: object, expected: Budget) -> None:
    assert parse_budget(text) == expected


@pytest.mark.parametrize(
    ("budget", "label", "slug"),
    [
        (Budget("all"), "all", "all"),
        (Budget("fraction", 0.1), "10%", "pct10"),
        (Budget("fraction", 0.025), "2.5%", "pct2_5"),
        (Budget("per_class", 20), "20/class", "20perclass"),
        (Budget("total", 100), "100 images", "n100"),
    ],
)
def test_str_slug_and_roundtrip(budget: Budget, label: str, slug: str) -> None:
    assert str(budget) == label
    assert budget.slug == slug
    assert parse_budget(str(budget)) == budget
    assert all(ch.isalnum() or ch in "_-" for ch in budget.slug)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("0", "integer >= 1"),
        ("0.0", r"\(0, 1\]"),
        ("1.5", r"\(0, 1\]"),
        (2.0, r"\(0, 1\]"),
        ("0%", r"\(0, 1\]"),
        ("150%", r"\(0, 1\]"),
        ("0/class", "integer >= 1"),
        ("-3", "not understood"),
        ("ten", "not understood"),
        ("10/patient", "not understood"),
        ("", "not understood"),
        (True, "string or number"),
        (None, "string or number"),
    ],
)
def test_parse_budget_errors(text: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        parse_budget(text)


def test_budget_validates_directly() -> None:
    with pytest.raises(ValueError, match="kind"):
        Budget("percent", 10)
    with pytest.raises(ValueError, match="no value"):
        Budget("all", 3)
    with pytest.raises(ValueError, match="integer"):
        Budget("per_class", 2.5)


# -- select_budget -------------------------------------------------------------------------

BUDGETS = ["2/class", "1", "5/class", "0.05", "40", "10%", "20/class", "0.3", "150", "all"]


def test_patient_integrity() -> None:
    frame = make_frame()
    for b in BUDGETS:
        idx = select_budget(frame, b, seed=3)
        chosen = selected_groups(frame, idx)
        in_chosen = frame["group"].isin(chosen).to_numpy()
        # Every row of a chosen patient group is in, every other row is out.
        assert np.array_equal(np.flatnonzero(in_chosen), idx), b
        assert idx.dtype == np.int64 and np.all(np.diff(idx) > 0)


def test_nested_within_each_kind() -> None:
    frame = make_frame()
    chains = [
        ["1/class", "2/class", "5/class", "20/class", "1000/class"],
        ["0.01", "0.05", "10%", "0.3", "0.75", "1.0"],
        ["1", "10", "40", "150", "100000"],
    ]
    for seed in (0, 1, 2):
        for chain in chains:
            sets = [set(select_budget(frame, b, seed=seed).tolist()) for b in chain]
            sizes = [len(s) for s in sets]
            assert sizes == sorted(sizes) and sizes[0] < sizes[-1], chain
            for small, large in itertools.pairwise(sets):
                assert small <= large, chain


def test_nested_across_kinds_per_class() -> None:
    # Every budget keeps a prefix of one per-class patient order: within a class, any two
    # selections are ordered by inclusion, whatever their kinds.
    frame = make_frame()
    code, group_class, _, names = group_classes(frame)
    selections = [select_budget(frame, b, seed=5) for b in BUDGETS]
    for c in range(len(names)):
        per_class = [set(idx[group_class[code[idx]] == c].tolist()) for idx in selections]
        for a, b in itertools.combinations(per_class, 2):
            assert a <= b or b <= a


def test_stratified_even_at_two_per_class() -> None:
    frame = make_frame()
    max_images = int(frame.groupby("group").size().max())
    for seed in range(10):
        idx = select_budget(frame, "2/class", seed=seed)
        counts = per_class_images(frame, idx)
        assert set(counts) == set(CLASS_PATIENTS)
        for n in counts.values():
            # Reaches 2 images, overshooting by at most one patient's images minus one.
            assert 2 <= n <= 2 + max_images - 1
        assert set(frame["label"].iloc[idx]) >= set(CLASS_PATIENTS)


def test_fraction_is_per_class() -> None:
    frame = make_frame()
    _, group_class, sizes, names = group_classes(frame)
    class_images = np.bincount(group_class, weights=sizes).astype(int)
    idx = select_budget(frame, 0.3, seed=0)
    counts = per_class_images(frame, idx)
    for name, total in zip(names, class_images, strict=True):
        target = np.floor(0.3 * total + 0.5)
        assert target <= counts[name] <= target + 3  # patients have at most 4 images


def test_fraction_rounding_with_one_image_per_patient() -> None:
    # 25 + 15 patients of one image: targets are exact image counts.
    frame = pd.DataFrame({"group": np.arange(40), "label": ["a"] * 25 + ["b"] * 15})
    counts = lambda f: per_class_images(frame, select_budget(frame, f, seed=0))  # noqa: E731
    assert counts(0.1) == {"a": 3, "b": 2}  # 2.5 -> 3 and 1.5 -> 2: half up
    assert counts(0.12) == {"a": 3, "b": 2}  # 3.0 and 1.8
    assert counts(0.001) == {"a": 1, "b": 1}  # at least one image per class
    assert counts(1.0) == {"a": 25, "b": 15}
    assert counts("8") == {"a": 5, "b": 3}  # total 8 in proportion 25:15
    assert counts("1") == {"a": 1, "b": 1}  # fewer labels than classes: every class kept
    assert counts("4/class") == {"a": 4, "b": 4}


def test_per_class_larger_than_class_takes_it_all() -> None:
    frame = make_frame()
    idx = select_budget(frame, "1000/class", seed=0)
    assert np.array_equal(idx, np.arange(len(frame)))
    assert np.array_equal(select_budget(frame, "all", seed=0), np.arange(len(frame)))


def test_deterministic_and_independent_of_row_order() -> None:
    frame = make_frame()
    a = select_budget(frame, "10%", seed=11)
    b = select_budget(frame, "10%", seed=11)
    assert np.array_equal(a, b)
    shuffled = frame.sample(frac=1.0, random_state=1).reset_index(drop=True)
    c = select_budget(shuffled, "10%", seed=11)
    assert selected_groups(frame, a) == selected_groups(shuffled, c)


def test_different_seeds_differ() -> None:
    frame = make_frame()
    chosen = {
        frozenset(selected_groups(frame, select_budget(frame, "10%", seed=s))) for s in range(8)
    }
    assert len(chosen) == 8


def test_majority_label_and_tie_rule() -> None:
    frame = pd.DataFrame(
        {"group": [1, 1, 1, 2, 2, 3], "label": ["b", "b", "a", "b", "a", "a"]},
    )
    code, group_class, sizes, names = group_classes(frame)
    assert names.tolist() == ["a", "b"]
    assert code.tolist() == [0, 0, 0, 1, 1, 2]
    assert group_class.tolist() == [1, 0, 0]  # group 2 ties 1:1 -> "a" (sorts first)
    assert sizes.tolist() == [3, 2, 1]


def test_errors() -> None:
    frame = make_frame()
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['group'\]"):
        select_budget(frame.drop(columns="group"), "10%", seed=0)
    with pytest.raises(ValueError, match="no rows"):
        select_budget(frame.iloc[:0], "10%", seed=0)
    unlabelled = frame.copy()
    unlabelled.loc[3, "label"] = None
    with pytest.raises(ValueError, match=r"1 of .* rows have no value in column 'label'"):
        select_budget(unlabelled, "10%", seed=0)
    # "c" only appears as a minority label of patient 1: no patient group of its own.
    minority = pd.DataFrame({"group": [1, 1, 1, 2], "label": ["a", "a", "c", "b"]})
    with pytest.raises(ValueError, match=r"\['c'\] .* no patient group"):
        select_budget(minority, "all", seed=0)
    with pytest.raises(ValueError, match="not understood"):
        select_budget(frame, "lots", seed=0)


# -- kfold_groups -------------------------------------------------------------------------


def test_kfold_groups_keeps_patients_together_and_balances_classes() -> None:
    frame = make_frame()
    k = 5
    fold = kfold_groups(frame, k, seed=0)
    assert fold.shape == (len(frame),) and fold.dtype == np.int64
    assert set(fold.tolist()) == set(range(k))
    assert (frame.assign(fold=fold).groupby("group")["fold"].nunique() == 1).all()
    code, group_class, _, names = group_classes(frame)
    row_class = group_class[code]
    for c, name in enumerate(names):
        per_fold = np.bincount(fold[row_class == c], minlength=k)
        share = (row_class == c).sum() / k
        # Greedy by images: each fold within one patient (<= 4 images) of its share.
        assert np.all(np.abs(per_fold - share) <= 4), (name, per_fold, share)
    assert np.array_equal(kfold_groups(frame, k, seed=0), fold)
    assert not np.array_equal(kfold_groups(frame, k, seed=1), fold)


def test_kfold_groups_errors() -> None:
    frame = pd.DataFrame({"group": [1, 1, 2, 3], "label": ["a", "a", "b", "a"]})
    assert sorted(set(kfold_groups(frame, 2, seed=0).tolist())) == [0, 1]
    for k in (1, 4, 2.0):
        with pytest.raises(ValueError, match=r"k must be an integer in \[2, 3\]"):
            kfold_groups(frame, k, seed=0)
    with pytest.raises(ValueError, match="lacks column"):
        kfold_groups(frame.drop(columns="label"), 2, seed=0)
    with pytest.raises(ValueError, match="no value in column 'group'"):
        kfold_groups(frame.assign(group=[1, None, 2, 3]), 2, seed=0)


# -- real data ------------------------------------------------------------------------------


@pytest.mark.real_data
def test_budgets_on_kermany_patients(shared_data) -> None:
    from spcxr.data.sources import open_source

    source = open_source(str(shared_data / "kermany_pediatric/train"))
    records = [r for r in source.records() if hasattr(r, "patient_id")]
    frame = pd.DataFrame(
        {"group": [r.patient_id for r in records], "label": [r.label for r in records]}
    )
    assert len(frame) == 5216
    sizes = frame.groupby("group").size()
    previous: set[int] = set()
    # Per class 2 <= 1% (13 / 39 images) <= 10% (134 / 388) <= 500/class: a nested chain.
    for b in ("2/class", "1%", "10%", "500/class", "all"):
        idx = select_budget(frame, b, seed=0)
        counts = frame["label"].iloc[idx].value_counts().to_dict()
        assert set(counts) == {"normal", "pneumonia"}, b
        assert previous <= set(idx.tolist())
        previous = set(idx.tolist())
        chosen = frame["group"].iloc[idx].unique()
        assert sizes[chosen].sum() == len(idx)  # whole patients
    idx = select_budget(frame, "10%", seed=0)
    counts = frame["label"].iloc[idx].value_counts()
    # Kermany: 1,341 normal / 3,875 pneumonia images; 10% of each, up to one patient's excess.
    assert 134 <= counts["normal"] <= 134 + sizes.max()
    assert 388 <= counts["pneumonia"] <= 388 + sizes.max()
