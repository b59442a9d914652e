"""Layer-wise learning-rate decay parameter groups (spcxr.train.lrd)."""

from __future__ import annotations

import itertools

import pytest
import torch

from spcxr.models.classifier import Classifier
from spcxr.models.segmentation import Segmenter, SegmenterConfig
from spcxr.models.vit import create_encoder
from spcxr.train.lrd import layer_ids, param_groups_lrd

DEPTH = 4


# tiny models on one intra-op thread (tests/conftest.py: one_thread)
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def classifier() -> Classifier:
    torch.manual_seed(0)
    encoder = create_encoder("vit_tiny", img_size=32, patch_size=8, depth=DEPTH)
    return Classifier(encoder, num_classes=3)


def _scale_of(groups: list[dict]) -> dict[int, float]:
    """lr_scale of every parameter, by id."""
    return {id(p): g["lr_scale"] for g in groups for p in g["params"]}


def test_layer_ids_follow_mae() -> None:
    encoder = create_encoder("vit_tiny", img_size=32, patch_size=8, depth=12, device="meta")
    layers = layer_ids(Classifier(encoder, num_classes=3))
    assert layers["encoder.cls_token"] == 0
    assert layers["encoder.pos_embed"] == 0
    assert layers["encoder.patch_embed.proj.weight"] == 0
    assert layers["encoder.blocks.0.attn.qkv.weight"] == 1
    assert layer_ids(encoder)["blocks.11.mlp.fc2.bias"] == 12  # a bare timm ViT
    assert layers["encoder.norm.weight"] == 13
    assert layers["head.weight"] == 13
    cfg = SegmenterConfig(arch="vit_tiny", img_size=32, patch_size=8, decoder="unetr")
    assert layer_ids(Segmenter(encoder, cfg))["decoder.ups.0.weight"] == 13


def _mae_reference(
    model: torch.nn.Module, weight_decay: float, layer_decay: float, depth: int
) -> dict[str, tuple[float, float]]:
    """(lr_scale, weight_decay) of every trainable parameter by MAE's rule, written out by hand.

    MAE ``util/lr_decay.py``: ``get_layer_id_for_vit`` (embedding 0, block i -> i + 1, the rest
    depth + 1) and ``param_groups_lrd`` (no decay for 1-D parameters and pos_embed / cls_token).
    """
    out = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        local = name.removeprefix("encoder.")
        if local.split(".")[0] in ("cls_token", "pos_embed", "patch_embed", "norm_pre"):
            layer = 0
        elif local.startswith("blocks."):
            layer = int(local.split(".")[1]) + 1
        else:
            layer = depth + 1
        exempt = p.ndim == 1 or local in ("cls_token", "pos_embed")
        out[name] = (layer_decay ** (depth + 1 - layer), 0.0 if exempt else weight_decay)
    return out


@pytest.mark.parametrize("decoder", [None, "unetr", "progressive"])
def test_every_parameter_gets_maes_scale_and_decay(decoder: str | None) -> None:
    torch.manual_seed(0)
    encoder = create_encoder("vit_tiny", img_size=32, patch_size=8, depth=DEPTH)
    if decoder is None:
        model: torch.nn.Module = Classifier(encoder, num_classes=2)
    else:
        cfg = SegmenterConfig(
            arch="vit_tiny",
            img_size=32,
            patch_size=8,
            decoder=decoder,
            freeze="partial",
            frozen_blocks=2,
        )
        model = Segmenter(encoder, cfg)
    groups = param_groups_lrd(model, weight_decay=0.05, layer_decay=0.65, num_layers=DEPTH)
    names = {id(p): n for n, p in model.named_parameters()}
    got = {names[id(p)]: (g["lr_scale"], g["weight_decay"]) for g in groups for p in g["params"]}
    assert got == _mae_reference(model, 0.05, 0.65, DEPTH)  # exact, float for float


def test_scales_decay_with_depth_and_head_gets_full_rate(classifier: Classifier) -> None:
    decay = 0.75
    groups = param_groups_lrd(classifier, weight_decay=0.05, layer_decay=decay)
    scale = _scale_of(groups)
    named = dict(classifier.named_parameters())
    assert scale[id(named["head.weight"])] == 1.0
    assert scale[id(named["encoder.norm.weight"])] == 1.0
    assert scale[id(named["encoder.patch_embed.proj.weight"])] == pytest.approx(
        decay ** (DEPTH + 1)
    )
    assert scale[id(named["encoder.cls_token"])] == pytest.approx(decay ** (DEPTH + 1))
    for i in range(DEPTH):
        expected = decay ** (DEPTH - i)
        assert scale[id(named[f"encoder.blocks.{i}.attn.qkv.weight"])] == pytest.approx(expected)
    # One scale per layer, strictly increasing with depth.
    per_layer: dict[int, set[float]] = {}
    layers = layer_ids(classifier)
    for name, p in named.items():
        per_layer.setdefault(layers[name], set()).add(scale[id(p)])
    assert sorted(per_layer) == list(range(DEPTH + 2))
    assert all(len(v) == 1 for v in per_layer.values())
    ordered = [per_layer[i].pop() for i in range(DEPTH + 2)]
    assert all(a < b for a, b in itertools.pairwise(ordered))
    assert [g["name"] for g in groups][:2] == ["layer0_decay", "layer0_no_decay"]
    assert groups[-1]["name"] == f"layer{DEPTH + 1}_no_decay"


def test_weight_decay_rules_and_counts(classifier: Classifier) -> None:
    groups = param_groups_lrd(classifier, weight_decay=0.05, layer_decay=0.65)
    params = [p for g in groups for p in g["params"]]
    assert len(params) == len({id(p) for p in params})  # each parameter once
    assert sum(p.numel() for p in params) == sum(p.numel() for p in classifier.parameters())
    decayed = {id(p) for g in groups if g["weight_decay"] == 0.05 for p in g["params"]}
    for name, p in classifier.named_parameters():
        exempt = p.ndim <= 1 or name.endswith(".bias") or name.endswith(("cls_token", "pos_embed"))
        assert (id(p) not in decayed) == exempt, name
    assert {tuple(sorted(g)) for g in groups} == {("lr_scale", "name", "params", "weight_decay")}


def test_frozen_parameters_are_left_out_and_depth_is_inferred(classifier: Classifier) -> None:
    classifier.freeze_encoder()
    try:
        groups = param_groups_lrd(classifier, weight_decay=0.05, layer_decay=0.75)
    finally:
        classifier.freeze_encoder(False)
    assert [g["name"] for g in groups] == [f"layer{DEPTH + 1}_decay", f"layer{DEPTH + 1}_no_decay"]
    assert [len(g["params"]) for g in groups] == [1, 1]
    assert all(g["lr_scale"] == 1.0 for g in groups)  # depth inferred from the frozen blocks too


def test_segmenter_decoder_trains_at_full_rate() -> None:
    torch.manual_seed(0)
    encoder = create_encoder("vit_tiny", img_size=32, patch_size=8, depth=DEPTH)
    cfg = SegmenterConfig(arch="vit_tiny", img_size=32, patch_size=8, decoder="progressive")
    model = Segmenter(encoder, cfg)
    groups = param_groups_lrd(model, weight_decay=0.05, layer_decay=0.5, num_layers=DEPTH)
    scale = _scale_of(groups)
    for name, p in model.named_parameters():
        if name.startswith("decoder."):
            assert scale[id(p)] == 1.0, name
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert sum(p.numel() for g in groups for p in g["params"]) == trainable


def test_a_bare_vit_and_bad_arguments() -> None:
    encoder = create_encoder("vit_tiny", img_size=32, patch_size=8, depth=DEPTH, device="meta")
    groups = param_groups_lrd(encoder, weight_decay=0.1, layer_decay=0.5)
    assert min(g["lr_scale"] for g in groups) == pytest.approx(0.5 ** (DEPTH + 1))
    with pytest.raises(ValueError, match="beyond num_layers=2"):
        param_groups_lrd(encoder, weight_decay=0.1, layer_decay=0.5, num_layers=2)
    with pytest.raises(ValueError, match="layer_decay"):
        param_groups_lrd(encoder, weight_decay=0.1, layer_decay=1.5)
