"""``spcxr evaluate``: metrics with CIs, per-site drift table, comparison, report, hygiene."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from tests.tasks.test_classify import _config

from spcxr.tasks.classify import finetune
from spcxr.tasks.evaluate import EvaluateConfig, evaluate


def test_evaluate_report_with_cis_drift_and_comparison(synth_store, tmp_path) -> None:
    runs = []
    for name, budget in (("scratch_small", "3/class"), ("scratch_all", "all")):
        finetune(_config(synth_store, tmp_path / name, budget=budget))
        runs.append(str(tmp_path / name))
    out = tmp_path / "report"
    results = evaluate(
        EvaluateConfig(runs=runs, out=str(out), n_boot=200, device="cpu", group_by="site")
    )
    metrics = json.loads((out / "metrics.json").read_text())
    entry = metrics["runs"]["scratch_all"]
    assert set(entry["eval"]) == {"site_a", "site_b", "site_c", "all"}
    auroc = entry["eval"]["all"]["metrics"]["macro_auroc"]
    assert auroc["low"] <= auroc["value"] <= auroc["high"]
    # every site's test images are the store's test split of that site, by patient
    preds = pd.read_csv(out / "predictions_scratch_all.csv")
    from spcxr.data.store import PreparedStore

    m = PreparedStore(synth_store).manifest
    test = m[(m.split == "test")]
    assert len(preds) == len(test)
    assert set(preds["image_path"]) == set(test["image_path"])
    # probabilities are a distribution; predicted = argmax
    p = preds[["p_normal", "p_abnormal"]].to_numpy()
    np.testing.assert_allclose(p.sum(1), 1.0, atol=1e-5)
    # point estimate equals a direct computation
    y = (preds["true"] == "abnormal").to_numpy().astype(int)
    acc = float(((p[:, 1] > p[:, 0]).astype(int) == y).mean())
    assert abs(entry["eval"]["all"]["metrics"]["accuracy"]["value"] - acc) < 1e-9
    # comparison: two settings with their training sizes; a label-efficiency plot
    rows = {r["setting"]: r for r in results["comparison"]}
    assert rows["scratch_small"]["train_images"] < rows["scratch_all"]["train_images"]
    assert (out / "plots" / "label_efficiency.png").stat().st_size > 1000
    assert (out / "plots" / "drift.png").is_file()
    for plot in ("roc", "confusion", "reliability"):
        assert (out / "plots" / f"scratch_all_{plot}.png").is_file()
    report = (out / "report.md").read_text()
    assert "## Drift" in report and "## Comparison" in report
    assert "site_b" in report and "[" in report
    assert "random initialisation" in report


def test_training_images_are_never_scored(synth_store, tmp_path) -> None:
    finetune(_config(synth_store, tmp_path / "r"))
    out = tmp_path / "rep"
    config = EvaluateConfig(
        runs=[str(tmp_path / "r")], split="train", out=str(out), n_boot=50, device="cpu"
    )
    # the run's own training images are all excluded: nothing is left to score
    with pytest.raises(ValueError, match="identical to a training image"):
        evaluate(config)
    # the validation split is scored (it was only used for model selection) and nothing excluded
    config.split = "val"
    results = evaluate(config)
    ev = next(iter(results["runs"]["r"]["eval"].values()))
    assert "identical to a training image" not in ev["data"]["excluded"]
