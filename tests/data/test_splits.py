"""Patient-level splits: grouping, stratification, official splits, folds and the leakage check."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from spcxr.data.splits import (
    LeakageError,
    SplitConfig,
    assign_splits,
    check_leakage,
    patient_groups,
)


def _manifest(n_patients: int = 400, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(n_patients):
        label = "pneumonia" if rng.random() < 0.7 else "normal"
        for _ in range(int(rng.integers(1, 4))):
            rows.append({"source": "a", "patient_id": f"p{p}", "label": label})
    return pd.DataFrame(rows)


def test_patient_groups_join_patients_and_duplicates() -> None:
    m = pd.DataFrame(
        {
            "source": ["a", "a", "a", "b", "b"],
            "patient_id": ["1", "1", "2", "1", "3"],
        }
    )
    # Same id in two sources are different patients.
    groups = patient_groups(m)
    assert groups[0] == groups[1]
    assert len({groups[0], groups[2], groups[3], groups[4]}) == 4
    # A duplicate pair (rows 2 and 4) merges patient a:2 and b:3 into one group.
    dup = np.array([-1, -1, 7, -1, 7])
    groups = patient_groups(m, dup)
    assert groups[2] == groups[4]
    assert groups[0] != groups[2]


def test_random_split_is_grouped_stratified_and_close_to_fractions() -> None:
    m = _manifest()
    groups = patient_groups(m)
    split, fold, _ = assign_splits(m, groups, SplitConfig(fractions=(0.7, 0.1, 0.2), n_folds=5))
    m["split"], m["fold"], m["group"] = split, fold, groups
    check_leakage(m)  # no group spans splits
    shares = m["split"].value_counts(normalize=True)
    assert shares["train"] == pytest.approx(0.7, abs=0.02)
    assert shares["val"] == pytest.approx(0.1, abs=0.02)
    assert shares["test"] == pytest.approx(0.2, abs=0.02)
    # Stratified: the class balance of every split is within 3 points of the whole set.
    overall = (m.label == "pneumonia").mean()
    for _, part in m.groupby("split"):
        assert (part.label == "pneumonia").mean() == pytest.approx(overall, abs=0.03)
    # Folds: grouped, balanced.
    assert m.groupby("group")["fold"].nunique().max() == 1
    fold_shares = m["fold"].value_counts(normalize=True)
    assert set(fold_shares.index) == set(range(5))
    assert fold_shares.max() - fold_shares.min() < 0.03


def test_split_is_seeded() -> None:
    m = _manifest()
    groups = patient_groups(m)
    a, _, _ = assign_splits(m, groups, SplitConfig(seed=1))
    b, _, _ = assign_splits(m, groups, SplitConfig(seed=1))
    c, _, _ = assign_splits(m, groups, SplitConfig(seed=2))
    assert (a == b).all()
    assert (a != c).any()


def test_official_split_is_kept_and_val_carved_from_train_by_patient() -> None:
    m = _manifest(300)
    patient_num = m.patient_id.str[1:].astype(int)
    m["official_split"] = np.where(patient_num < 240, "train", "test")
    groups = patient_groups(m)
    split, _, notes = assign_splits(
        m, groups, SplitConfig(mode="official", fractions=(0.8, 0.2, 0.0))
    )
    m["split"], m["group"] = split, groups
    check_leakage(m)
    assert (m.loc[m.official_split == "test", "split"] == "test").all()
    from_train = m.loc[m.official_split == "train", "split"]
    assert set(from_train) == {"train", "val"}
    assert (from_train == "val").mean() == pytest.approx(0.2, abs=0.04)
    assert notes == []


def test_official_split_conflict_goes_to_held_out_side_or_fails() -> None:
    m = pd.DataFrame(
        {
            "source": ["c"] * 4,
            "patient_id": ["1", "1", "2", "3"],
            "label": ["x"] * 4,
            "official_split": ["train", "test", "train", "test"],
        }
    )
    groups = patient_groups(m)
    split, _, notes = assign_splits(m, groups, SplitConfig(mode="official", fractions=(1, 0, 0)))
    assert list(split[:2]) == ["test", "test"]  # the leaking patient moved wholly to test
    assert "1 patient groups spanned official splits; 1 rows moved" in notes[0]
    with pytest.raises(LeakageError, match="span official splits"):
        assign_splits(m, groups, SplitConfig(mode="official", official_conflict="fail"))


def test_leakage_check_fails_loudly() -> None:
    m = pd.DataFrame(
        {
            "source": ["a", "a", "a"],
            "patient_id": ["1", "1", "2"],
            "group": [0, 0, 1],
            "split": ["train", "test", "train"],
        }
    )
    with pytest.raises(LeakageError, match=r"group 0 \(patients a:1\) in \['test', 'train'\]"):
        check_leakage(m)
    # A group column edited to hide the leak is still caught through the patient key.
    m["group"] = [0, 1, 2]
    with pytest.raises(LeakageError, match="1 patients span several splits"):
        check_leakage(m)


def test_bad_config_is_rejected() -> None:
    with pytest.raises(ValueError, match="--split-mode"):
        SplitConfig(mode="by_image")
    with pytest.raises(ValueError, match="--split-fractions"):
        SplitConfig(fractions=(0.5, 0.5))
    with pytest.raises(ValueError, match=r"--split-fractions 0\.5 0\.5 0\.5 sum to 1\.5, not 1"):
        SplitConfig(fractions=(0.5, 0.5, 0.5))
    with pytest.raises(ValueError, match="--split-n-folds"):
        SplitConfig(n_folds=-1)
    assert SplitConfig(fractions=(0.6, 0.1, 0.3)).fractions == (0.6, 0.1, 0.3)  # 0.9999999...
    assert SplitConfig(stratify="none").stratify is None


def test_unknown_stratify_column_names_the_flag_and_the_columns() -> None:
    m = _manifest(10)
    with pytest.raises(ValueError, match=r"--split-stratify: no manifest column 'lable'.*label"):
        assign_splits(m, patient_groups(m), SplitConfig(stratify="lable"))


def test_test_only_sources_go_to_test_with_their_duplicates_and_leave_the_rest_unchanged() -> None:
    internal = _manifest(200)
    # an external set whose patient ids reuse the internal numbers (Kermany's official test)
    external = _manifest(40, seed=1).assign(source="ext")
    m = pd.concat([internal, external], ignore_index=True)
    planted = len(internal)  # first external row; an internal row is its duplicate
    dup = np.full(len(m), -1)
    dup[[3, planted]] = 0
    groups = patient_groups(m, dup)
    config = SplitConfig(fractions=(0.6, 0.1, 0.3), n_folds=5, test_only=["ext"])
    split, fold, notes = assign_splits(m, groups, config)
    is_ext = (m["source"] == "ext").to_numpy()
    assert set(split[is_ext]) == {"test"} and (fold[is_ext] == -1).all()
    # the internal duplicate of an external image (and that patient's other images) is test
    copy = groups == groups[3]
    assert set(split[copy]) == {"test"} and (fold[copy] == -1).all()
    assert any("test-only" in n for n in notes)
    m["group"], m["split"] = groups, split
    check_leakage(m)
    # the other internal rows still get train, val and test, and folds 0..4
    rest = ~is_ext & ~copy
    assert set(split[rest]) == {"train", "val", "test"}
    assert set(fold[rest]) == set(range(5))
    # without test_only the external rows would be split like any other
    plain, _, _ = assign_splits(m, groups, SplitConfig(fractions=(0.6, 0.1, 0.3)))
    assert "train" in set(plain[is_ext])
