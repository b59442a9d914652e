"""A reduced ``spcxr demo`` (seconds): every stage runs and its outputs exist and are sane."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd
import pytest

from spcxr.demo import run_demo


@pytest.mark.slow
def test_reduced_demo_runs_every_stage(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    summary = run_demo(
        out,
        n_patients=30,
        seed=1,
        steps=8,
        finetune_steps=8,
        segment_steps=8,
        n_boot=50,
        predict_images=2,
        draws=2,
    )
    # pretraining ran and exported an encoder
    assert summary["pretrain"]["steps"] == 8
    assert (out / "pretrain" / "encoder" / "model.safetensors").is_file()
    # classification: GMML and scratch at the same small budget, each with a CI
    rows = summary["tasks"]["classify"]["comparison"]
    assert {r["run"] for r in rows} == {"gmml_8perclass", "scratch_8perclass"}
    for r in rows:
        v = r["value"]
        assert 0.0 <= v["low"] <= v["value"] <= v["high"] <= 1.0
    # GMML and scratch on the same two label draws: a paired difference per metric
    paired = summary["tasks"]["classify"]["paired"]
    assert paired and all(p["comparison"] == "gmml - scratch" and p["draws"] == 2 for p in paired)
    for p in paired:
        d = p["difference"]
        assert d["low"] <= d["value"] <= d["high"]
    metrics = json.loads((out / "reports" / "classify" / "metrics.json").read_text())
    # trained on site_a only, tested on every site: the drift table has the three sites
    drift = metrics["drift"]["gmml_8perclass_draw0"]
    assert drift["train_sources"] == ["site_a"]
    assert set(drift["cells"]) == {"site_a", "site_b", "site_c"}
    # segmentation ran and was scored with Dice
    seg = summary["tasks"]["lungs"]["comparison"]
    assert all(r["metric"] == "dice" and 0 <= r["value"]["value"] <= 1 for r in seg)
    # all masks, one run per initialisation: the difference carries the test-set bootstrap
    (seg_pair,) = summary["tasks"]["lungs"]["paired"]
    d = seg_pair["difference"]
    assert seg_pair["draws"] == 1 and d["interval"] == "test bootstrap"
    assert d["low"] <= d["value"] <= d["high"]
    # predictions with heatmaps and masks, read back from the files on disk
    cls = pd.read_csv(summary["predictions"]["classify"]["csv"])
    assert (cls["status"] == "ok").all() and len(cls) == 2
    assert cls[["p_normal", "p_abnormal"]].sum(axis=1).round(5).eq(1.0).all()
    lungs = pd.read_csv(summary["predictions"]["lungs"]["csv"])
    assert (lungs["lung_area_fraction"].between(0, 1)).all()
    # the report links every plot, and every link resolves
    report = (out / "report.md").read_text()
    links = re.findall(r"\]\(([^)]+)\)", report)
    assert any(link.endswith("drift.png") for link in links)
    assert any("heatmap" in link or "overlay" in link for link in links)
    for link in links:
        assert (out / link).exists(), link
    assert "(one draw: test bootstrap)" in report
