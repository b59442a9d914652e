"""bf16 autocast on the CPU computes what float32 computes, within bf16 rounding.

On a CPU without native bf16 (no AMX / AVX512-BF16: ``--precision bf16`` is refused there) the
tests still run: oneDNN emulates the bf16 matmuls, slower but with the same rounding, so the
numerics checked here are those of a native CPU. They used to skip on such CPUs, which left the
bf16 path untested on every machine of that kind (e.g. an AVX2-only EPYC).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from spcxr.data.labels import LabelConfig
from spcxr.data.store import PreparedStore
from spcxr.models.classifier import ClassifierConfig
from spcxr.pretrain.engine import OptimConfig, PretrainConfig, pretrain
from spcxr.pretrain.gmml import GMMLConfig
from spcxr.tasks.classify import FinetuneConfig, finetune, load_run_model, predict_store
from spcxr.tasks.loop import FinetuneOptimConfig, TrainConfig
from spcxr.train import distributed
from spcxr.train.checkpoint import load_checkpoint
from spcxr.train.logging import read_log


@pytest.fixture(autouse=True)
def bf16_allowed(monkeypatch) -> None:
    """Let ``precision: bf16`` through on a CPU without native bf16 (emulated, same rounding)."""
    if distributed.cpu_bf16_support() is None:
        monkeypatch.setattr(distributed, "cpu_bf16_support", lambda: "emulated")


def test_bf16_pretraining_loss_matches_float32(tiny_store: Path, tmp_path: Path) -> None:
    """18 seeded steps of a tiny GMML in each precision (36 cost 90 s with emulated bf16).

    bf16 keeps 8 significant bits (relative rounding 2^-9 = 0.2%) in the matmuls; the loss is a
    mean over ~10^4 masked pixels, computed in float32, so the logged losses agree far closer
    than one rounding step: rel 5e-3 (measured: ~5e-5 after 36 steps on a native CPU).
    """
    runs = {}
    for precision in ("fp32", "bf16"):
        config = PretrainConfig(
            store=str(tiny_store),
            out=str(tmp_path / precision),
            model=GMMLConfig(arch="vit_tiny", img_size=32, patch_size=8, drop_path_rate=0.0),
            optim=OptimConfig(lr=2e-3, warmup_epochs=0.5),
            batch_size=8,
            max_steps=18,
            device="cpu",
            precision=precision,
            workers=0,
            log_every=3,
            preview_every=1000,
            progress=False,
            tensorboard=False,
        )
        runs[precision] = pretrain(config)
        info = json.loads((tmp_path / precision / "run.json").read_text())
        assert info["precision"] == precision
    fp32 = [loss for _, loss in runs["fp32"].losses]
    bf16 = [loss for _, loss in runs["bf16"].losses]
    assert len(fp32) == 6
    assert bf16 == pytest.approx(fp32, rel=5e-3)
    # Autocast really ran: the weights differ (by rounding), however little.
    a = load_checkpoint(tmp_path / "fp32" / "checkpoint.pt")["model"]
    b = load_checkpoint(tmp_path / "bf16" / "checkpoint.pt")["model"]
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_bf16_finetuning_metric_matches_float32(synth_store: Path, tmp_path: Path) -> None:
    """The same seeded fine-tuning in each precision, then the fp32 model evaluated in each.

    Tolerances: validation loss rel 1e-2 (measured: 2e-5) and AUROC +-0.05; class probabilities
    of one model through the evaluation path (``predict_store``) within 0.01 (bf16 logits carry
    ~3 significant digits).
    """
    out = {}
    for precision in ("fp32", "bf16"):
        train = TrainConfig(
            epochs=1,
            min_steps=8,
            batch_size=16,
            eval_every=8,
            patience=0,
            device="cpu",
            precision=precision,
            workers=0,
            progress=False,
            tensorboard=False,
            optim=FinetuneOptimConfig(lr=2e-3, warmup_epochs=0.0),
        )
        finetune(
            FinetuneConfig(
                store=str(synth_store),
                out=str(tmp_path / precision),
                labels=LabelConfig(
                    classes=["normal", "abnormal"],
                    rename=["consolidation=abnormal", "bilateral_opacities=abnormal"],
                ),
                model=ClassifierConfig(arch="vit_tiny", img_size=32, patch_size=8, head="both"),
                train=train,
            )
        )
        out[precision] = read_log(tmp_path / precision)[-1]
        info = json.loads((tmp_path / precision / "run.json").read_text())
        assert info["precision"] == precision
    assert out["bf16"]["val_loss"] == pytest.approx(out["fp32"]["val_loss"], rel=2e-2)
    assert out["bf16"]["val_macro_auroc"] == pytest.approx(out["fp32"]["val_macro_auroc"], abs=0.05)
    model, meta, _ = load_run_model(tmp_path / "fp32", torch.device("cpu"))
    store = PreparedStore(synth_store)
    rows = store.indices("val")
    probs = {
        precision: predict_store(
            model,
            store,
            rows,
            img_size=32,
            in_chans=meta["config"]["in_chans"],
            multilabel=False,
            device=torch.device("cpu"),
            precision=precision,
        )
        for precision in ("fp32", "bf16")
    }
    assert probs["bf16"].shape == (len(rows), 2)
    np.testing.assert_allclose(probs["bf16"], probs["fp32"], atol=1e-2)
    assert not np.array_equal(probs["bf16"], probs["fp32"])
