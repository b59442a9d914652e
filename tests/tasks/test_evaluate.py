"""``spcxr evaluate``: metrics with CIs, per-site drift table, comparison, report, hygiene."""

from __future__ import annotations

import json
from pathlib import Path

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


def test_an_unfinished_run_is_refused_naming_why(synth_store, tmp_path) -> None:
    """A stopped or killed run's model/ is its best state so far, not its result."""
    finetune(_config(synth_store, tmp_path / "r"))
    info_path = tmp_path / "r" / "run.json"
    info = json.loads(info_path.read_text())
    del info["finished"]
    config = EvaluateConfig(runs=[str(tmp_path / "r")], out=str(tmp_path / "rep"), device="cpu")
    info_path.write_text(json.dumps({**info, "stopped": {"by": "SIGTERM", "step": 4}}))
    with pytest.raises(ValueError, match=r"not finished \(stopped by SIGTERM at step 4\)"):
        evaluate(config)
    info_path.write_text(json.dumps(info))
    with pytest.raises(ValueError, match=r"not finished \(interrupted, or still training\)"):
        evaluate(config)
    assert not (tmp_path / "rep" / "metrics.json").exists()


def _entry(init: str, budget: str, seed, acc: float, ext_acc: float, images: int = 40) -> dict:
    run = f"/runs/{init}_{budget.replace('/', 'per')}" + (
        f"_draw{seed}" if seed is not None else ""
    )
    metric = {"accuracy": {"value": acc, "low": acc - 0.1, "high": acc + 0.1}}
    ext = {"accuracy": {"value": ext_acc, "low": ext_acc - 0.1, "high": ext_acc + 0.1}}
    return {
        "kind": "classification",
        "run": run,
        "init": {"init": init},
        "budget": budget,
        "budget_seed": seed,
        "train": {"images": images, "patients": images // 2},
        "train_sources": ["a"],
        "eval": {
            "a": {"data": {"images": 100, "patients": 60}, "metrics": metric},
            "ext": {"data": {"images": 30, "patients": 20}, "metrics": ext, "external": True},
        },
    }


def test_draw_tables_and_paired_comparisons_match_direct_computation() -> None:
    from scipy import stats

    from spcxr.tasks.evaluate import comparison, draw_tables, paired_comparisons
    from spcxr.tasks.report import draws_section, paired_section

    rng = np.random.default_rng(0)
    gmml, scratch = rng.uniform(0.6, 0.9, 5), rng.uniform(0.5, 0.8, 5)
    gx, sx = rng.uniform(0.6, 0.9, 5), rng.uniform(0.5, 0.8, 5)
    runs = [_entry("gmml", "20/class", s, gmml[s], gx[s]) for s in range(5)]
    runs += [_entry("scratch", "20/class", s, scratch[s], sx[s]) for s in range(5)]
    # all labels: runs recorded before budget seeds existed are never paired
    runs += [
        _entry("gmml", "all", None, 0.9, 0.8, 900),
        _entry("scratch", "all", None, 0.85, 0.7, 900),
    ]
    results = {"runs": {Path(e["run"]).name: e for e in runs}}
    rows = {(r["setting"], r["tested_on"]): r for r in comparison(results, 0.95)}
    row = rows[("gmml_20perclass", "ext")]
    assert row["external"] and row["draws"] == 5 and row["test_images"] == 30
    low, high = stats.t.interval(0.95, 4, loc=gx.mean(), scale=stats.sem(gx))
    assert (row["value"]["value"], row["value"]["low"], row["value"]["high"]) == pytest.approx(
        (gx.mean(), low, high)
    )
    tables = draw_tables(results, 0.95)
    t = next(t for t in tables if t["setting"] == "scratch_20perclass" and t["tested_on"] == "a")
    assert [r["value"] for r in t["runs"]] == pytest.approx(scratch.tolist())
    assert t["summary"]["std"] == pytest.approx(scratch.std(ddof=1))
    paired = {
        (p["budget"], p["tested_on"]): p["difference"] for p in paired_comparisons(results, 0.95)
    }
    d = paired[("20/class", "ext")]
    ci = stats.ttest_rel(gx, sx).confidence_interval(0.95)
    assert d["paired"] and d["n"] == 5
    assert (d["value"], d["low"], d["high"]) == pytest.approx(((gx - sx).mean(), ci.low, ci.high))
    single = paired[("all", "a")]
    assert single["paired"] is False and single["value"] == pytest.approx(0.05)
    text = "\n".join(paired_section(paired_comparisons(results, 0.95)) + draws_section(tables))
    assert "| unpaired |" in text and "| paired | 5 |" in text and "ext (external)" in text


def test_repeated_training_seeds_on_one_draw_are_paired_seed_by_seed() -> None:
    """All-label runs repeated with training seeds 0, 1, 2 share one label draw: each seed is
    paired with the same seed of scratch (a t interval over 3), none is dropped."""
    from scipy import stats

    from spcxr.tasks.evaluate import draw_tables, paired_comparisons
    from spcxr.tasks.report import draws_section

    gx, sx = np.array([0.91, 0.90, 0.88]), np.array([0.83, 0.82, 0.84])
    runs = []
    for init, values in (("gmml", gx), ("scratch", sx)):
        for train_seed, value in enumerate(values):
            entry = _entry(init, "all", 0, value, value, 900)
            entry["run"] += f"_seed{train_seed}"
            entry["train_seed"] = train_seed
            runs.append(entry)
    results = {"runs": {Path(e["run"]).name: e for e in runs}}
    d = next(
        p["difference"]
        for p in paired_comparisons(results, 0.95)
        if p["tested_on"] == "ext" and p["metric"] == "accuracy"
    )
    ci = stats.ttest_rel(gx, sx).confidence_interval(0.95)
    assert d["paired"] and d["n"] == 3
    assert (d["value"], d["low"], d["high"]) == pytest.approx(((gx - sx).mean(), ci.low, ci.high))
    tables = draw_tables(results, 0.95)
    draws = {r["draw"] for t in tables for r in t["runs"]}
    # the default training seed keeps the plain label (pages of earlier studies read the same)
    assert draws == {"seed 0", "seed 0, training seed 1", "seed 0, training seed 2"}
    assert "another training seed" in "\n".join(draws_section(tables))


def test_two_gmml_encoders_are_two_initialisations() -> None:
    """GMML runs from encoders pretrained for different lengths are never pooled: each gets
    its own name (from its pretraining epochs) and its own paired difference to scratch."""
    from spcxr.tasks.evaluate import comparison, label_inits, paired_comparisons

    rng = np.random.default_rng(1)
    acc = {k: rng.uniform(0.5, 0.9, 3) for k in ("short", "long", "scratch")}
    runs = []
    for key, sha, epochs in (("short", "aaa", 9.8), ("long", "bbb", 27.27), ("scratch", None, 0)):
        for s in range(3):
            e = _entry("scratch" if key == "scratch" else "gmml", "20/class", s, acc[key][s], 0.5)
            e["run"] = f"/runs/{key}_20perclass_draw{s}"
            if sha:
                e["init"].update(weights_sha256=sha, source_run={"epochs": epochs})
            runs.append(e)
    results = {"runs": {Path(e["run"]).name: e for e in runs}}
    label_inits(results["runs"])
    assert {e["init_label"] for e in runs} == {"gmml 10 ep", "gmml 27 ep", "scratch"}
    rows = {r["setting"]: r for r in comparison(results, 0.95) if r["tested_on"] == "a"}
    assert rows["short_20perclass"]["init"] == "gmml 10 ep"
    assert rows["short_20perclass"]["value"]["value"] == pytest.approx(acc["short"].mean())
    paired = {
        p["comparison"]: p["difference"]
        for p in paired_comparisons(results, 0.95)
        if p["tested_on"] == "a" and p["metric"] == "accuracy"
    }
    assert set(paired) == {"gmml 10 ep - scratch", "gmml 27 ep - scratch"}
    np.testing.assert_allclose(
        paired["gmml 27 ep - scratch"]["differences"], acc["long"] - acc["scratch"]
    )
    # a checkpoint of an unfinished run is named by the epochs it had, not the planned ones
    for e in runs[:3]:
        e["init"]["source_run"] = {"epochs": 100.0, "steps_done": 330, "steps_per_epoch": 110}
    label_inits(results["runs"])
    assert runs[0]["init_label"] == "gmml 3 ep"
    # one encoder only: plain "gmml", as before; same length, other weights: told apart by hash
    one = {"r": _entry("gmml", "all", None, 0.8, 0.7)}
    one["r"]["init"].update(weights_sha256="aaa", source_run={"epochs": 27.0})
    label_inits(one)
    assert one["r"]["init_label"] == "gmml"
    for e, sha in zip(runs[:6], ["aaa"] * 3 + ["ccc"] * 3, strict=True):
        e["init"].update(weights_sha256=sha, source_run={"epochs": 27.0})
    label_inits(results["runs"])
    assert {e["init_label"] for e in runs[:6]} == {"gmml 27 ep aaa", "gmml 27 ep ccc"}


def test_a_single_draw_pair_gets_the_paired_test_bootstrap() -> None:
    """All labels, one run per initialisation on the same draw: no t interval exists, so the
    difference carries the patient bootstrap of both runs scored on the same test rows."""
    from spcxr.evaluation.draws import TestSample, paired_bootstrap
    from spcxr.tasks.evaluate import paired_comparisons
    from spcxr.tasks.report import paired_section

    rng = np.random.default_rng(1)
    keys = np.array([f"img{i}" for i in range(100)])
    groups = np.repeat(np.arange(50), 2)  # two images per patient
    a = (rng.random(100) < 0.9).astype(float)
    b = (rng.random(100) < 0.8).astype(float)

    def acc(correct: np.ndarray) -> dict[str, float]:
        return {"accuracy": float(correct.mean())}

    runs = [
        _entry("gmml", "all", 0, a.mean(), 0.8, 900),
        _entry("scratch", "all", 0, b.mean(), 0.7, 900),
    ]
    samples = {
        (runs[0]["run"], "a"): TestSample(keys, groups, {"correct": a}, acc),
        (runs[1]["run"], "a"): TestSample(keys, groups, {"correct": b}, acc),
    }
    results = {"runs": {Path(e["run"]).name: e for e in runs}}
    paired = {
        p["tested_on"]: p
        for p in paired_comparisons(results, 0.95, samples=samples, n_boot=200, seed=3)
    }
    d = paired["a"]["difference"]
    expected = paired_bootstrap(*samples.values(), n_boot=200, seed=3)["accuracy"]
    assert d["n"] == 1 and d["interval"] == "test bootstrap"
    assert (d["value"], d["low"], d["high"]) == pytest.approx(
        (a.mean() - b.mean(), expected["low"], expected["high"])
    )
    assert d["low"] < d["value"] < d["high"]
    # the external set has no samples: one draw, no interval, labelled paired
    assert "interval" not in paired["ext"]["difference"]
    text = "\n".join(paired_section(list(paired.values())))
    assert "| one draw | 1 |" in text and "| paired | 1 |" in text
