"""Multi-label fine-tuning (NIH / CheXpert-style findings) with missing labels masked out."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
from tests.tasks.test_classify import _config

from spcxr.data.labels import LabelConfig
from spcxr.data.store import PreparedStore
from spcxr.tasks.classify import FinetuneConfig, finetune, select_rows
from spcxr.tasks.evaluate import EvaluateConfig, evaluate


def _findings_store(synth_store, tmp_path):
    """The synthetic store with a findings column: Opacity known everywhere, Consolidation
    missing (uncertain / not mentioned) on every third image."""
    store = tmp_path / "ml_store"
    shutil.copytree(synth_store, store)
    m = pd.read_parquet(store / "manifest.parquet")
    findings = []
    for i, label in enumerate(m["label"]):
        cons = float(label == "consolidation") if i % 3 else float("nan")
        findings.append(json.dumps({"Opacity": float(label != "normal"), "Consolidation": cons}))
    m["findings"] = findings
    m.to_parquet(store / "manifest.parquet", index=False)
    return store


def test_multilabel_finetune_masks_missing_labels_and_evaluates(synth_store, tmp_path) -> None:
    store = _findings_store(synth_store, tmp_path)
    labels = LabelConfig(column="findings")
    cfg: FinetuneConfig = _config(store, tmp_path / "ml", labels=labels)
    rows = select_rows(PreparedStore(store), cfg)
    assert rows.classes == ["Consolidation", "Opacity"]
    assert np.isnan(rows.y_train[:, 0]).any() and not np.isnan(rows.y_train[:, 1]).any()
    info = finetune(cfg)
    assert np.isfinite(info["best_value"])
    results = evaluate(
        EvaluateConfig(
            runs=[str(tmp_path / "ml")], out=str(tmp_path / "rep"), n_boot=50, device="cpu"
        )
    )
    metrics = results["runs"]["ml"]["eval"]["synthetic"]["metrics"]
    assert "auroc/Opacity" in metrics and "macro_auroc" in metrics
    preds = pd.read_csv(tmp_path / "rep" / "predictions_ml.csv")
    # sigmoid per finding, not a softmax over findings
    assert not np.allclose(preds[["p_Consolidation", "p_Opacity"]].sum(axis=1), 1.0)
    assert preds["true_Consolidation"].isna().any()
