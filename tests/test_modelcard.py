"""Model cards: facts from run.json / config.yaml / model.json, evaluation with CIs from the
newest matching report, pretraining record, shortcut flags, and the not-a-device statement."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pandas as pd
import pytest
import yaml
from tests.conftest import write_smooth_images
from tests.inference.test_predict import make_class_run

from spcxr.data.store import PreparedStore
from spcxr.modelcard import NOT_A_DEVICE, find_evaluation, model_card, shortcut_table
from spcxr.tasks.evaluate import EvaluateConfig, evaluate


def _model_json(folder: Path, classes: list[str], init: dict | None = None) -> Path:
    """A model.json as save_classifier writes it (the card never reads the weights)."""
    folder.mkdir(parents=True, exist_ok=True)
    meta = {
        "format": "spcxr-model",
        "task": "classification",
        "config": {"arch": "vit_small", "img_size": 224, "patch_size": 16, "in_chans": 1,
                   "head": "cls"},
        "class_names": classes,
        "input_size": [1, 224, 224],
        "mean": 0.5,
        "std": 0.25,
        "extra": {
            "labels": {"column": "label", "classes": classes, "rename": []},
            "init": init or {"init": "scratch"},
            "mode": "finetune",
            "preprocessing": {"store_image_size": 256, "img_size": 224, "mean": 0.5,
                              "std": 0.25, "dicom_windowing": "auto",
                              "dicom_percentiles": [0.5, 99.5]},
        },
    }  # fmt: skip
    (folder / "model.json").write_text(json.dumps(meta))
    return folder


def _run_json(run: Path, **data) -> None:
    info = {"kind": "classification", "steps": 10, "best_step": 5, "select": "macro_auroc",
            "best_value": 0.75, "finished": "2026-01-01T00:00:00+0000",
            "data": {"train": {"images": 12, "patients": 6,
                                                   "digest": "d1"}, **data}}  # fmt: skip
    (run / "run.json").write_text(json.dumps(info))


def test_card_of_a_tiny_run_before_and_after_evaluation(synth_store, tmp_path) -> None:
    run = make_class_run(synth_store, tmp_path / "tiny")
    info = json.loads((run / "run.json").read_text())
    card = model_card(run / "model")
    assert card.startswith("# Model card: tiny (classification)")
    assert NOT_A_DEVICE in card and "Not a medical device" in card
    train = info["data"]["train"]
    assert f"Training images: {train['images']} from {train['patients']} patients" in card
    per_class = ", ".join(f"{k} {v}" for k, v in train["per_class"].items())
    assert f"Per class: {per_class}" in card
    assert "Per source: synthetic" in card and "synthetic phantoms only" in card
    assert "None: random initialisation" in card
    assert "base lr 0.002 per 256 images" in card and "label smoothing 0.1" in card
    assert f"model selected at step {info['best_step']}" in card
    assert "Not evaluated: no `spcxr evaluate` report was given" in card
    # the class x source table and the share of children come from the store
    store = PreparedStore(synth_store)
    m = store.manifest.iloc[pd.read_csv(run / "train_rows.csv")["row"].to_numpy()]
    ages = pd.to_numeric(m["age"], errors="coerce")
    normal = ages[(m["label"] == "normal").to_numpy()].dropna()
    assert len(normal) > 0
    share = f"{(normal < 18).mean():.0%}"
    assert f"| normal | {train['per_class']['normal']} | {share} |" in card

    report = tmp_path / "reports" / "r1"
    evaluate(EvaluateConfig(runs=[str(run)], out=str(report), n_boot=20, device="cpu"))
    card = model_card(run / "model", report=tmp_path / "reports")
    metrics = json.loads((report / "metrics.json").read_text())["runs"]["tiny"]["eval"]
    source, block = next(iter(metrics.items()))
    auroc = block["metrics"]["macro_auroc"]
    line = f"| macro_auroc | {auroc['value']:.3f} [{auroc['low']:.3f}, {auroc['high']:.3f}] |"
    assert line in card
    assert f"### {source}: {block['data']['images']} images" in card
    assert "95% patient-level bootstrap (20 replicates" in card
    assert "| sensitivity/normal |" in card  # per-class accuracy shown as sensitivity


def test_find_evaluation_takes_the_newest_report_of_this_run(tmp_path) -> None:
    run = tmp_path / "runs" / "mine"
    run.mkdir(parents=True)
    info = {"data": {"train": {"digest": "abc"}}}

    def report(name: str, entries: dict, age: int) -> Path:
        path = tmp_path / "reports" / name / "metrics.json"
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps({"config": {"level": 0.9}, "runs": entries}))
        os.utime(path, (1_000_000 + age, 1_000_000 + age))
        return path

    by_path = {"mine": {"run": str(run), "train": {"digest": "zzz"}, "eval": {}}}
    by_digest = {"moved": {"run": "/elsewhere/mine", "train": {"digest": "abc"}, "eval": {}}}
    other = {"other": {"run": "/x/other", "train": {"digest": "nope"}, "eval": {}}}
    old = report("old", by_path, age=1)
    new = report("new", by_digest, age=2)
    report("newest_but_other", other, age=3)
    path, _, entry = find_evaluation(tmp_path / "reports", run, info)
    assert path == new and entry["run"] == "/elsewhere/mine"
    assert find_evaluation(old, run, info)[0] == old  # a metrics.json named directly
    assert find_evaluation(tmp_path / "reports", tmp_path / "x", {"data": {}}) is None
    with pytest.raises(FileNotFoundError, match="no such report"):
        find_evaluation(tmp_path / "missing", run, info)
    # a card whose report folder holds nothing for this run says so
    model = _model_json(tmp_path / "solo" / "model", ["a", "b"])
    _run_json(model.parent)
    card = model_card(model, report=tmp_path / "reports" / "newest_but_other")
    assert "Not evaluated: no `spcxr evaluate` report under" in card


def test_pretraining_record_and_images_seen(tmp_path) -> None:
    pre = tmp_path / "gmml"
    pre.mkdir()
    (pre / "config.yaml").write_text(yaml.safe_dump({"batch_size": 32, "store": "s"}))
    init = {
        "init": "gmml",
        "path": str(pre / "encoder" / "model.safetensors"),
        "weights_sha256": "0123abcd",
        "source_run": {
            "run": str(pre), "steps": 120, "steps_done": 100, "epochs": 5.0, "images": 640,
            "patients": 300, "sources": {"nih": 600, "rsna": 40}, "splits": ["train"],
            "store_fingerprint": "ff00", "seed": 0,
        },
    }  # fmt: skip
    model = _model_json(tmp_path / "ft" / "model", ["normal", "pneumonia"], init)
    _run_json(model.parent)
    card = model_card(model)
    assert "Initialisation: gmml" in card and "sha256 0123abcd" in card
    assert "100 steps (planned 120, 5.0 epochs)" in card
    assert "Pretraining images: 640 from 300 patients" in card
    assert "Pretraining sources: nih 600, rsna 40" in card
    assert "Images seen during pretraining: 3200 (100 steps x batch 32)" in card


@pytest.fixture(scope="module")
def two_source_store(module_dir) -> Path:
    """Every 'normal' image from source a, every 'abnormal' one from source b."""
    from spcxr.data.prepare import PrepareConfig, prepare

    root = module_dir("shortcut")
    write_smooth_images(root / "all", n_patients=12, size=32)
    for source, label in (("A", "normal"), ("B", "abnormal")):
        (root / source).mkdir()
        shutil.move(root / "all" / label, root / source / label)
    prepare(
        PrepareConfig(
            sources=[f"a=folder:{root / 'A'}", f"b=folder:{root / 'B'}"],
            out=str(root / "store"), image_size=32, workers=1, progress=False,
        )
    )  # fmt: skip
    return root / "store"


def test_source_shortcut_is_flagged(two_source_store, tmp_path) -> None:
    store = PreparedStore(two_source_store)
    rows = store.indices("train")
    run = tmp_path / "run"
    model = _model_json(run / "model", ["normal", "abnormal"])
    _run_json(run, store=str(two_source_store), store_fingerprint=store.fingerprint)
    pd.DataFrame({"row": rows}).to_csv(run / "train_rows.csv", index=False)
    info = json.loads((run / "run.json").read_text())
    meta = json.loads((model / "model.json").read_text())
    table, children = shortcut_table(run, info, meta)
    labels = store.manifest["label"].iloc[rows]
    assert table.loc["normal", "a"] == (labels == "normal").sum() and table.loc["normal", "b"] == 0
    assert table.loc["abnormal", "b"] == (labels == "abnormal").sum()
    assert children == {"normal": None, "abnormal": None}  # no ages in a folder source
    card = model_card(model)
    assert "**Shortcut risk**" in card
    assert "normal (100% from a)" in card and "abnormal (100% from b)" in card
    # a store that changed since training is not used (its rows would be different images)
    _run_json(run, store=str(two_source_store), store_fingerprint="different")
    info = json.loads((run / "run.json").read_text())
    assert shortcut_table(run, info, meta) is None
    assert "Shortcut risk" not in model_card(model)


def test_a_run_that_has_not_finished_says_so_on_its_card_and_when_loaded(
    synth_store, tmp_path, caplog
) -> None:
    """A stopped run's model/ is the best state so far: the card and predict say so."""
    from spcxr.inference.predict import load_model

    run = make_class_run(synth_store, tmp_path / "tiny")
    info = json.loads((run / "run.json").read_text())
    del info["finished"]
    (run / "run.json").write_text(json.dumps({**info, "stopped": {"by": "SIGTERM", "step": 3}}))
    card = model_card(run / "model")
    assert (
        "- Run: **not finished** (stopped by SIGTERM at step 3): its model is only the best" in card
    )
    assert "model selected at step" not in card
    with caplog.at_level("WARNING", logger="spcxr.inference.predict"):
        load_model(run)
    assert "its run has not finished (stopped by SIGTERM at step 3)" in caplog.text
