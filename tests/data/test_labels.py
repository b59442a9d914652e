"""Targets of supervised tasks: renaming, class selection, excluded rows, multi-label."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from spcxr.data.labels import LabelConfig, class_values, resolve_classes, targets, usable


def _manifest() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "label": ["normal", "pneumonia", "tuberculosis", None, "covid19", "normal"],
            "sublabel": [None, "virus", None, None, None, None],
            "findings": [
                json.dumps({"Effusion": 1.0, "Mass": 0.0}),
                json.dumps({"Effusion": 0.0, "Mass": float("nan")}),
                None,
                json.dumps({"Effusion": float("nan"), "Mass": 1.0}),
                None,
                None,
            ],
        }
    )


def test_rename_merges_sources_vocabularies() -> None:
    m = _manifest()
    cfg = LabelConfig(
        rename=["pneumonia=abnormal", "tuberculosis=abnormal"], classes=["normal", "abnormal"]
    )
    assert class_values(m, cfg).tolist() == [
        "normal",
        "abnormal",
        "abnormal",
        None,
        "covid19",
        "normal",
    ]
    y = targets(m, np.arange(6), cfg, cfg.classes)
    # covid19 is not a kept class and row 3 has no label: both excluded (-1), never relabelled
    assert y.tolist() == [0, 1, 1, -1, -1, 0]
    assert usable(y).tolist() == [True, True, True, False, False, True]


def test_classes_default_to_sorted_training_values_and_need_two() -> None:
    m = _manifest()
    assert resolve_classes(m, np.array([0, 1, 2]), LabelConfig()) == [
        "normal",
        "pneumonia",
        "tuberculosis",
    ]
    with pytest.raises(ValueError, match="fewer than two classes"):
        resolve_classes(m, np.array([0, 5]), LabelConfig())
    with pytest.raises(ValueError, match="rename"):
        LabelConfig(rename=["pneumonia"]).mapping()
    with pytest.raises(ValueError, match="no column"):
        class_values(m, LabelConfig(column="nope"))


def test_multilabel_targets_keep_missing_as_nan() -> None:
    m = _manifest()
    cfg = LabelConfig(column="findings")
    classes = resolve_classes(m, np.arange(6), cfg)
    assert classes == ["Effusion", "Mass"]
    y = targets(m, np.arange(6), cfg, classes)
    assert y.shape == (6, 2)
    assert y[0].tolist() == [1.0, 0.0]
    assert y[1, 0] == 0.0 and np.isnan(y[1, 1])
    assert usable(y).tolist() == [True, True, False, True, False, False]
