"""``spcxr segment`` end to end on the synthetic store, the loss, and its evaluation."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from spcxr.models.segmentation import SegmenterConfig
from spcxr.tasks.evaluate import EvaluateConfig, evaluate
from spcxr.tasks.loop import FinetuneOptimConfig, TrainConfig
from spcxr.tasks.segment import (
    SegmentConfig,
    dice_bce_loss,
    mask_rows,
    resolution_ceiling,
    segment,
)


def _config(store, out, **kw) -> SegmentConfig:
    train = TrainConfig(
        epochs=1,
        min_steps=40,
        batch_size=8,
        eval_every=20,
        patience=0,
        device="cpu",
        workers=0,
        progress=False,
        tensorboard=False,
        optim=FinetuneOptimConfig(lr=3e-3, warmup_epochs=0.0, layer_decay=1.0),
    )
    base = dict(
        store=str(store),
        out=str(out),
        model=SegmenterConfig(
            arch="vit_tiny",
            img_size=32,
            patch_size=8,
            decoder="unetr",
            decoder_channels=[32, 16, 8, 8],
        ),
        train=train,
    )
    base.update(kw)
    return SegmentConfig(**base)


def test_dice_bce_loss_is_small_for_a_perfect_prediction_and_respects_ignore() -> None:
    target = torch.zeros(2, 1, 8, 8)
    target[:, :, 2:6, 2:6] = 1
    perfect = (target * 2 - 1) * 20
    assert float(dice_bce_loss(perfect, target, None, 1.0, 1.0)) < 0.02
    wrong = -perfect
    assert float(dice_bce_loss(wrong, target, None, 1.0, 1.0)) > 1.0
    # a wrong region that is ignored costs nothing
    logits = perfect.clone()
    logits[:, :, 0, 0] = 20.0
    valid = torch.ones_like(target)
    valid[:, :, 0, 0] = 0
    assert float(dice_bce_loss(logits, target, valid, 0.0, 1.0)) == pytest.approx(
        float(dice_bce_loss(perfect, target, None, 0.0, 1.0)), abs=1e-6
    )


def test_segment_learns_the_phantom_lungs_and_evaluates(synth_store, tmp_path) -> None:
    from spcxr.data.store import PreparedStore

    info = segment(_config(synth_store, tmp_path / "seg"))
    store = PreparedStore(synth_store)
    val = store.masks(store.indices("val", with_mask=True)).astype(bool)
    # Dice of calling every pixel lung (about 0.39 here): the trained model must beat it clearly
    trivial = float((2 * val.sum((1, 2)) / (val.sum((1, 2)) + val[0].size)).mean())
    assert info["best_value"] > trivial + 0.1, (info["best_value"], trivial)
    out = tmp_path / "rep"
    results = evaluate(
        EvaluateConfig(runs=[str(tmp_path / "seg")], out=str(out), n_boot=100, device="cpu")
    )
    entry = results["runs"]["seg"]
    ev = entry["eval"]["synthetic"]
    dice = ev["metrics"]["dice"]
    assert 0.5 < dice["value"] <= 1 and dice["low"] <= dice["value"] <= dice["high"]
    assert "hd95" in ev["metrics"] and "iou" in ev["metrics"]
    per_image = pd.read_csv(out / "per_image_seg.csv")
    assert len(per_image) == ev["data"]["images"]
    assert np.isclose(per_image["dice"].mean(), dice["value"])
    assert "Dice" in (out / "report.md").read_text()
    assert any(p.endswith(".png") for p in entry["plots"].values())
    # the resolution ceiling of the model's 32 px grid: below 1, above what the model scored
    ceiling = ev["data"]["resolution_ceiling"]
    assert dice["value"] < ceiling < 1
    assert f"input size: {ceiling:.3f}" in (out / "report.md").read_text()


def test_resolution_ceiling_is_one_at_full_size_and_falls_with_the_grid() -> None:
    yy, xx = np.mgrid[:64, :64]
    # two ellipses, the thin one needs fine pixels
    masks = np.stack(
        [
            ((yy - 30) / 20.0) ** 2 + ((xx - 20) / 9.0) ** 2 <= 1,
            ((yy - 32) / 25.0) ** 2 + ((xx - 40) / 3.0) ** 2 <= 1,
        ]
    ).astype(np.uint8)
    assert np.allclose(resolution_ceiling(masks, 64), 1.0)
    at32, at8 = resolution_ceiling(masks, 32), resolution_ceiling(masks, 8)
    assert np.all(at8 < at32) and np.all(at32 < 1)
    assert at32[0] > 0.95 and at8[1] < at8[0]  # the thin one loses more
    assert resolution_ceiling(np.zeros((0, 64, 64), np.uint8), 32).shape == (0,)


def test_images_without_masks_are_excluded_and_counted(synth_store) -> None:
    from spcxr.data.store import PreparedStore

    store = PreparedStore(synth_store)
    store.has_mask = store.has_mask.copy()
    train = store.indices("train")
    store.has_mask[train[:3]] = False
    rows, missing = mask_rows(store, "train", [])
    assert missing == 3 and not set(train[:3]) & set(rows)


def test_segment_errors(synth_store, tmp_path) -> None:
    with pytest.raises(ValueError, match="--store"):
        segment(SegmentConfig())
    with pytest.raises(ValueError, match="no images with lung masks"):
        segment(_config(synth_store, tmp_path / "x", sources=["nope"]))


def test_segment_draws_with_an_external_test_source(tmp_path) -> None:
    """Two label draws per init on one source, an external test-only source: evaluation reports
    the external Dice on its own and the paired difference over the same draws."""
    from spcxr.data.prepare import PrepareConfig, prepare
    from spcxr.data.synthetic import SyntheticConfig, write_synthetic_dataset
    from spcxr.tasks.loop import run_draws

    for name, seed in (("inner", 3), ("outer", 4)):
        write_synthetic_dataset(tmp_path / name, SyntheticConfig(n_patients=16, size=48, seed=seed))
    store = tmp_path / "store"
    sources = [f"inner=csv:{tmp_path / 'inner'}", f"outer=csv:{tmp_path / 'outer'}"]
    config = PrepareConfig(
        sources=sources, out=str(store), image_size=32, workers=1, progress=False
    )
    config.split.test_only = ["outer"]
    prepare(config)
    base = _config(store, tmp_path / "scratch", sources=["inner"], budget="4", budget_seeds="0,1")
    base.train.min_steps = 4
    base.train.eval_every = 4
    run_draws(base, segment)
    other = _config(
        store,
        tmp_path / "ft",
        sources=["inner"],
        budget="4",
        budget_seeds="0,1",
        init=str(tmp_path / "scratch" / "draw-0"),
    )
    other.train.min_steps = 4
    other.train.eval_every = 4
    run_draws(other, segment)
    runs = [str(tmp_path / d / f"draw-{s}") for d in ("scratch", "ft") for s in (0, 1)]
    results = evaluate(
        EvaluateConfig(
            runs=runs,
            out=str(tmp_path / "rep"),
            n_boot=20,
            device="cpu",
            sources=["inner"],
            external=["outer"],
        )
    )
    entry = results["runs"]["scratch_draw-0"]
    assert entry["eval"]["outer"]["external"] and "inner" in entry["eval"]
    assert entry["budget_seed"] == 0
    rows = {(r["setting"], r["tested_on"]): r for r in results["comparison"]}
    assert rows[("scratch", "outer")]["draws"] == 2 and rows[("scratch", "outer")]["external"]
    paired = [p for p in results["paired"] if p["tested_on"] == "outer"]
    assert len(paired) == 1 and paired[0]["metric"] == "dice" and paired[0]["difference"]["n"] == 2
    dice = {
        r: results["runs"][r]["eval"]["outer"]["metrics"]["dice"]["value"]
        for r in ("scratch_draw-0", "scratch_draw-1", "ft_draw-0", "ft_draw-1")
    }
    expected = [dice[f"ft_draw-{s}"] - dice[f"scratch_draw-{s}"] for s in (0, 1)]
    np.testing.assert_allclose(paired[0]["difference"]["differences"], expected)
    assert "## Paired differences" in (tmp_path / "rep" / "report.md").read_text()


def test_rows_without_a_mask_are_counted_for_their_own_source(tmp_path, monkeypatch) -> None:
    """Two test rows of one source lose their mask: that source reports 2 excluded, the other
    source none."""
    import spcxr.tasks.segment as seg
    from spcxr.data.prepare import PrepareConfig, prepare
    from spcxr.data.store import PreparedStore
    from spcxr.data.synthetic import SyntheticConfig, write_synthetic_dataset

    for name, seed in (("inner", 3), ("outer", 4)):
        write_synthetic_dataset(tmp_path / name, SyntheticConfig(n_patients=16, size=48, seed=seed))
    store = tmp_path / "store"
    sources = [f"inner=csv:{tmp_path / 'inner'}", f"outer=csv:{tmp_path / 'outer'}"]
    prep = PrepareConfig(sources=sources, out=str(store), image_size=32, workers=1, progress=False)
    prep.split.test_only = ["outer"]
    prepare(prep)
    config = _config(store, tmp_path / "seg", sources=["inner"])
    config.train.min_steps = config.train.eval_every = 4
    segment(config)

    class TwoMissing(PreparedStore):
        def __init__(self, *a, **k) -> None:
            super().__init__(*a, **k)
            self.has_mask = self.has_mask.copy()
            self.has_mask[self.indices("test", source=["inner"])[:2]] = False

    monkeypatch.setattr(seg, "PreparedStore", TwoMissing)
    results = evaluate(
        EvaluateConfig(runs=[str(tmp_path / "seg")], out=str(tmp_path / "rep"), n_boot=20)
    )
    ev = results["runs"]["seg"]["eval"]
    assert ev["inner"]["data"]["excluded"]["no lung mask"] == 2
    assert "no lung mask" not in ev["outer"]["data"]["excluded"]
