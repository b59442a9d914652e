"""ViT classifier: pooling heads, linear probing, build / save / load (spcxr.models.classifier)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from spcxr.models.classifier import (
    Classifier,
    ClassifierConfig,
    build_classifier,
    load_classifier,
    save_classifier,
)
from spcxr.models.vit import create_encoder

CFG = dict(arch="vit_tiny", img_size=32, patch_size=8)


# tiny models on one intra-op thread (tests/conftest.py: one_thread)
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def encoder() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_encoder(**CFG, drop_path_rate=0.0).eval()


@pytest.fixture()
def images() -> torch.Tensor:
    return torch.randn(3, 1, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("head", ["cls", "mean", "both"])
def test_pooling_heads(encoder, images, head: str) -> None:
    model = Classifier(encoder, num_classes=4, head=head).eval()
    with torch.no_grad():
        tokens = model.tokens(images)
        reference = encoder.forward_features(images)
        logits = model(images)
        feats = model.features(images)
    assert tokens.shape == (3, 1 + 16, 192)
    assert torch.equal(tokens, reference)  # after the final norm, CLS first
    cls, mean = reference[:, 0], reference[:, 1:].mean(dim=1)
    expected = {"cls": cls, "mean": mean, "both": torch.cat([cls, mean], dim=1)}[head]
    assert torch.allclose(feats, expected, atol=1e-6)
    assert model.head.in_features == (384 if head == "both" else 192)
    assert logits.shape == (3, 4)
    assert torch.allclose(logits, feats @ model.head.weight.T + model.head.bias, atol=1e-6)


def test_head_init_is_near_zero(encoder) -> None:
    torch.manual_seed(0)
    model = Classifier(encoder, num_classes=3)
    weight = model.head.weight.detach()
    assert torch.equal(model.head.bias.detach(), torch.zeros(3))
    assert float(weight.std()) == pytest.approx(2e-5, rel=0.2)  # MAE fine-tuning init


def test_freeze_encoder_keeps_it_frozen_and_in_eval(images) -> None:
    torch.manual_seed(0)
    model = Classifier(create_encoder(**CFG, drop_path_rate=0.5), num_classes=2)
    model.freeze_encoder()
    model.train()
    assert not model.encoder.training and model.head.training
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"head.weight", "head.bias"}
    # Drop path is off in a frozen encoder: two training-mode passes give the same features.
    assert torch.equal(model.features(images), model.features(images))
    model(images).sum().backward()
    assert all(p.grad is None for p in model.encoder.parameters())
    assert model.head.weight.grad is not None
    model.freeze_encoder(False)
    assert model.encoder.training
    assert all(p.requires_grad for p in model.parameters())
    assert not torch.equal(model.features(images), model.features(images))  # drop path again


def test_probe_bn_standardises_features_in_training(encoder, images) -> None:
    model = Classifier(encoder, num_classes=2, probe_bn=True)
    model.freeze_encoder()
    model.train()
    normed = model.probe_norm(model.features(images))
    assert torch.allclose(normed.mean(dim=0), torch.zeros(192), atol=1e-4)
    assert not any(p.requires_grad for p in model.probe_norm.parameters())  # affine=False
    assert model.probe_norm.running_mean.abs().sum() > 0  # statistics were tracked


def test_build_from_scratch_and_bad_settings() -> None:
    torch.manual_seed(0)
    model, info = build_classifier(ClassifierConfig(**CFG, head="both"), num_classes=5)
    assert info["init"] == "scratch"
    assert model.num_classes == 5 and model.pooling == "both"
    assert model.encoder.blocks[-1].drop_path1.drop_prob == pytest.approx(0.1)
    with pytest.raises(ValueError, match="head must be one of"):
        ClassifierConfig(head="max")
    with pytest.raises(ValueError, match="not a multiple"):
        ClassifierConfig(img_size=100, patch_size=16)
    with pytest.raises(ValueError, match="num_classes=0"):
        Classifier(create_encoder(**CFG, num_classes=3, device="meta"), num_classes=2)


def test_save_load_round_trip_gives_identical_logits(tmp_path: Path, images) -> None:
    torch.manual_seed(0)
    cfg = ClassifierConfig(**CFG, head="both", probe_bn=True)
    model, info = build_classifier(cfg, num_classes=3)
    model.train()
    model(images)  # move the BatchNorm statistics away from their initial values
    with torch.no_grad():
        model.head.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
    model.eval()
    folder = save_classifier(model, cfg, ["a", "b", "c"], tmp_path / "m", extra={"init": info})
    assert sorted(p.name for p in folder.iterdir()) == ["model.json", "model.safetensors"]
    loaded, meta = load_classifier(folder)
    assert not loaded.training
    with torch.no_grad():
        assert torch.equal(loaded(images), model(images))
    assert meta["class_names"] == ["a", "b", "c"] and meta["num_classes"] == 3
    assert meta["mean"] == 0.5 and meta["std"] == 0.25
    assert meta["input_size"] == [1, 32, 32]
    assert meta["config"]["head"] == "both" and meta["extra"]["init"]["init"] == "scratch"
    assert json.loads((folder / "model.json").read_text()) == meta


def test_save_and_load_errors(tmp_path: Path, encoder) -> None:
    model = Classifier(encoder, num_classes=2)
    cfg = ClassifierConfig(**CFG)
    with pytest.raises(ValueError, match="3 class names for 2 logits"):
        save_classifier(model, cfg, ["a", "b", "c"], tmp_path / "m")
    folder = save_classifier(model, cfg, ["a", "b"], tmp_path / "m")
    meta = json.loads((folder / "model.json").read_text())
    meta["config"]["head"] = "both"  # no longer fits the stored head
    (folder / "model.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"m: weights do not fit"):
        load_classifier(folder)
    with pytest.raises(FileNotFoundError, match=r"model\.json"):
        load_classifier(tmp_path / "elsewhere")
