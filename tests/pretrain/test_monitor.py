"""The feature monitor: exact leave-one-out read-outs, and its rows in a pretraining run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tests.conftest import tiny_pretrain_config

from spcxr.data.prepare import PrepareConfig, prepare
from spcxr.data.splits import SplitConfig
from spcxr.data.store import PreparedStore
from spcxr.pretrain.engine import OptimConfig, PretrainConfig, Pretrainer, pretrain
from spcxr.pretrain.gmml import GMMLConfig
from spcxr.pretrain.monitor import (
    knn_predict,
    ridge_loo,
    score_features,
    select_monitor_set,
)
from spcxr.train.logging import read_log


def test_ridge_leave_one_out_matches_refitting_without_each_row() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(30, 8, generator=gen, dtype=torch.float64)
    y = torch.randn(30, 2, generator=gen, dtype=torch.float64)
    rel = 0.1
    loo = ridge_loo(x, y, rel)
    lam = rel * float((torch.linalg.svdvals(x) ** 2).mean())
    for i in range(30):
        keep = torch.arange(30) != i
        xi, yi = x[keep], y[keep]
        w = torch.linalg.solve(xi.T @ xi + lam * torch.eye(8, dtype=x.dtype), xi.T @ yi)
        torch.testing.assert_close(loo[i], x[i] @ w, rtol=1e-9, atol=1e-9)


def test_knn_leaves_each_image_out() -> None:
    # Two tight pairs far apart, and a singleton of class 2 next to the first pair: with k = 1
    # every pair member finds its twin; the singleton (itself excluded) is voted class 0.
    features = torch.tensor([[1.0, 0.0], [0.99, 0.01], [0.0, 1.0], [0.01, 0.99], [0.97, 0.03]])
    labels = torch.tensor([0, 0, 1, 1, 2])
    assert knn_predict(features, labels, k=1).tolist() == [0, 0, 1, 1, 0]


def test_scores_separate_clusters_and_sit_at_chance_on_random_labels() -> None:
    gen = torch.Generator().manual_seed(1)
    labels = torch.arange(300) % 3
    centres = torch.randn(3, 32, generator=gen) * 3
    clustered = centres[labels] + torch.randn(300, 32, generator=gen)
    good = score_features(clustered, labels)
    assert good["knn_acc"] > 0.95 and good["probe_acc"] > 0.95
    noise = score_features(torch.randn(300, 32, generator=gen), labels)
    # Chance is 1/3; the probe's best-of-grid strength is picked on the same held-out rows.
    assert noise["knn_acc"] < 0.45 and noise["probe_acc"] < 0.45


@pytest.fixture(scope="module")
def bright_store(module_dir) -> Path:
    """Labels that pixels show: "bright" images are lighter than "dark" ones (40 px)."""
    root = module_dir("bright")
    rng = np.random.default_rng(0)
    for p in range(60):
        label = "bright" if p % 2 else "dark"
        (root / "images" / label).mkdir(parents=True, exist_ok=True)
        level = 150 if label == "bright" else 90
        img = np.clip(level + 40 * rng.standard_normal((40, 40)), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(root / "images" / label / f"person{p}_0.png")
    prepare(
        PrepareConfig(
            sources=[f"folder:{root / 'images'}"],
            out=str(root / "store"),
            image_size=40,
            split=SplitConfig(fractions=(0.6, 0.4, 0.0)),
            workers=1,
            progress=False,
        )
    )
    return root / "store"


def _config(store: Path, out: Path, **kw) -> PretrainConfig:
    return tiny_pretrain_config(
        store,
        out,
        **{
            "model": GMMLConfig(arch="vit_tiny", img_size=32, patch_size=8, drop_path_rate=0.0),
            "optim": OptimConfig(lr=1e-3, warmup_epochs=0),
            "max_steps": 4,
            "precision": "fp32",
            "checkpoint_every": 1000,
            "preview_every": 1000,
            "monitor_every": 2,
            "monitor_images": 64,
            "tensorboard": True,
            **kw,
        },
    )


def test_monitor_set_is_fixed_labelled_and_from_the_split(bright_store: Path) -> None:
    store = PreparedStore(bright_store)
    a = select_monitor_set(store, split="val", images=10, seed=0)
    b = select_monitor_set(store, split="val", images=10, seed=0)
    assert np.array_equal(a.rows, b.rows) and len(a.rows) == 10
    assert set(store.manifest["split"].iloc[a.rows]) == {"val"}
    assert a.classes == ["bright", "dark"]
    names = store.manifest["label"].iloc[a.rows].to_numpy()
    assert [a.classes[i] for i in a.labels] == names.tolist()


def test_pretraining_logs_monitor_rows_above_chance(bright_store: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    pretrain(_config(bright_store, run))
    rows = [r for r in read_log(run) if r.get("kind") == "monitor"]
    assert [r["step"] for r in rows] == [2, 4]
    n_val = len(PreparedStore(bright_store).indices("val"))
    for r in rows:
        assert r["images"] == min(64, n_val)
        # Brightness passes linearly through the patch embedding: even barely trained
        # features separate the classes, well above always guessing the larger one.
        assert r["knn_acc"] > r["majority"] + 0.2
        assert r["probe_acc"] > r["majority"] + 0.2
    train_rows = [r for r in read_log(run) if "loss" in r]
    assert [r["step"] for r in train_rows] == [2, 4]
    info = json.loads((run / "run.json").read_text())
    assert info["monitor"]["classes"] == ["bright", "dark"]
    assert sum(info["monitor"]["per_class"]) == rows[0]["images"]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tb"))
    events.Reload()
    assert "monitor/knn_acc" in events.Tags()["scalars"]


def test_monitor_refuses_images_that_are_pretrained_on(bright_store: Path, tmp_path) -> None:
    with pytest.raises(ValueError, match="--monitor-split"):
        Pretrainer(_config(bright_store, tmp_path / "run", splits=["train", "val"]))
