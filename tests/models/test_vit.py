"""timm ViT backbones and their safetensors weight files (spcxr.models.vit)."""

from __future__ import annotations

import json
import logging
import pickle
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch
from timm.data import resolve_data_config
from timm.layers import resample_abs_pos_embed

from spcxr.models.vit import (
    VARIANTS,
    convert_in_chans,
    create_encoder,
    load_encoder,
    map_blocks,
    read_encoder_config,
    save_encoder,
    timm_name,
    timm_overlay,
)

# (embed_dim, depth, num_heads) of ViT-Ti / ViT-S / ViT-B (GMML reference vit_tiny/small/base).
ARCH_SHAPES = {"vit_tiny": (192, 12, 3), "vit_small": (384, 12, 6), "vit_base": (768, 12, 12)}


@pytest.fixture(scope="module")
def tiny() -> torch.nn.Module:
    """A ViT-Ti/16 for 64 x 64 grayscale images, in eval mode (deterministic)."""
    torch.manual_seed(0)
    return create_encoder("vit_tiny", img_size=64, patch_size=16).eval()


@pytest.fixture()
def gray() -> torch.Tensor:
    return torch.randn(2, 1, 64, 64, generator=torch.Generator().manual_seed(1))


def _timm_log_problems(records: list[logging.LogRecord]) -> list[str]:
    """timm's messages that signal an inexact load (missing/unexpected keys, channel guesses)."""
    flags = ("Missing keys", "Unexpected keys", "already match", "Unable to convert")
    return [r.getMessage() for r in records if any(f in r.getMessage() for f in flags)]


def _assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


@pytest.mark.parametrize("arch", sorted(VARIANTS))
def test_variant_matches_reference_architecture(arch: str) -> None:
    # Built on the meta device: the architecture is checked without paying for ViT-B's init.
    enc = create_encoder(arch, device="meta")
    dim, depth, heads = ARCH_SHAPES[arch]
    assert (enc.embed_dim, len(enc.blocks), enc.blocks[0].attn.num_heads) == (dim, depth, heads)
    block = enc.blocks[0]
    assert block.mlp.fc1.out_features == 4 * dim  # MLP ratio 4
    assert block.attn.qkv.bias is not None  # qkv bias
    assert block.norm1.eps == 1e-6 and enc.norm.eps == 1e-6
    assert enc.blocks[-1].drop_path1.drop_prob == pytest.approx(0.1)  # stochastic depth 0.1
    assert enc.cls_token is not None and enc.num_prefix_tokens == 1
    assert enc.pos_embed.requires_grad and enc.pos_embed.shape == (1, 1 + 14 * 14, dim)
    assert enc.num_classes == 0 and isinstance(enc.head, torch.nn.Identity)
    assert enc.patch_embed.proj.in_channels == 1
    assert enc.patch_embed.patch_size == (16, 16) and enc.patch_embed.img_size == (224, 224)
    tokens = enc.forward_features(torch.empty(2, 1, 224, 224, device="meta"))
    assert tokens.shape == (2, 1 + 196, dim)


@pytest.mark.parametrize(
    ("patch", "size", "chans"), [(16, 64, 1), (8, 64, 3), (16, 96, 1), (8, 96, 1), (16, 224, 3)]
)
def test_tiny_encoder_shapes(patch: int, size: int, chans: int) -> None:
    enc = create_encoder("vit_tiny", img_size=size, patch_size=patch, in_chans=chans).eval()
    n_tokens = (size // patch) ** 2
    x = torch.randn(1, chans, size, size)
    with torch.no_grad():
        assert enc.forward_features(x).shape == (1, 1 + n_tokens, 192)
        assert enc(x).shape == (1, 192)  # CLS embedding, no classifier


def test_small_encoder_on_cpu_sized_input() -> None:
    enc = create_encoder("vit_small", img_size=96, patch_size=8).eval()
    with torch.no_grad():
        assert enc.forward_features(torch.randn(1, 1, 96, 96)).shape == (1, 1 + 144, 384)


def test_non_square_input() -> None:
    enc = create_encoder("vit_tiny", img_size=(64, 96), patch_size=16)
    assert enc.patch_embed.grid_size == (4, 6)
    assert enc.forward_features(torch.randn(1, 1, 64, 96)).shape == (1, 25, 192)


@pytest.mark.parametrize(
    ("arch", "patch", "size", "expected"),
    [
        ("vit_small", 16, 224, "vit_small_patch16_224"),
        ("vit_small", 16, 96, "vit_small_patch16_224"),
        ("vit_small", 8, 224, "vit_small_patch8_224"),
        ("vit_small", 8, 96, "vit_small_patch8_224"),
        ("vit_base", 16, 384, "vit_base_patch16_384"),
        ("vit_tiny", 8, 64, "vit_tiny_patch16_224"),  # timm registers no ViT-Ti/8
        ("vit_small_patch16_224.augreg_in21k", 16, 224, "vit_small_patch16_224"),
    ],
)
def test_timm_name(arch: str, patch: int, size: int, expected: str) -> None:
    assert timm_name(arch, patch, size) == expected


def test_create_records_name_and_args() -> None:
    enc = create_encoder("vit_small", img_size=96, patch_size=8, device="meta")
    assert enc.pretrained_cfg["architecture"] == "vit_small_patch8_224"
    assert enc.patch_embed.patch_size == (8, 8) and enc.patch_embed.img_size == (96, 96)


def test_full_timm_names_keep_their_registered_sizes() -> None:
    enc = create_encoder("vit_small_patch8_224", device="meta")
    assert enc.patch_embed.patch_size == (8, 8) and enc.patch_embed.img_size == (224, 224)
    assert enc.patch_embed.proj.in_channels == 1 and enc.num_classes == 0
    enc = create_encoder("vit_base_patch16_384", img_size=192, device="meta")
    assert enc.patch_embed.img_size == (192, 192) and enc.embed_dim == 768


def test_bad_architectures_are_rejected() -> None:
    with pytest.raises(ValueError, match="unknown architecture"):
        create_encoder("vit_huge_typo")
    with pytest.raises(TypeError, match="not a timm VisionTransformer"):
        create_encoder("resnet18", device="meta")
    with pytest.raises(ValueError, match="not a multiple of the patch size"):
        create_encoder("vit_tiny", img_size=100, patch_size=16, device="meta")


def test_convert_in_chans_rule() -> None:
    w1 = torch.randn(8, 1, 4, 4)
    state = {"patch_embed.proj.weight": w1, "pos_embed": torch.zeros(1, 5, 8)}
    w3 = convert_in_chans(state, 3)["patch_embed.proj.weight"]
    assert w3.shape == (8, 3, 4, 4)
    assert torch.equal(w3, w1.repeat(1, 3, 1, 1) * (1 / 3))  # repeat, divide by 3
    back = convert_in_chans({"patch_embed.proj.weight": w3}, 1)["patch_embed.proj.weight"]
    assert torch.equal(back, w3.sum(dim=1, keepdim=True))  # 3 -> 1 sums
    torch.testing.assert_close(back, w1)
    assert state["patch_embed.proj.weight"] is w1  # input untouched
    with pytest.raises(KeyError, match="patch_embed"):
        convert_in_chans({"pos_embed": torch.zeros(1)}, 3)


def test_channel_conversion_is_equivalent_on_gray_images(tiny, gray) -> None:
    enc3 = create_encoder("vit_tiny", img_size=64, in_chans=3).eval()
    enc3.load_state_dict(convert_in_chans(tiny.state_dict(), 3))
    with torch.no_grad():
        torch.testing.assert_close(enc3(gray.repeat(1, 3, 1, 1)), tiny(gray), atol=1e-5, rtol=1e-5)
    # 3 -> 1: a 3-channel model and its summed 1-channel twin agree on replicated gray images.
    torch.manual_seed(3)
    rgb = create_encoder("vit_tiny", img_size=64, in_chans=3).eval()
    mono = create_encoder("vit_tiny", img_size=64, in_chans=1).eval()
    mono.load_state_dict(convert_in_chans(rgb.state_dict(), 1))
    with torch.no_grad():
        torch.testing.assert_close(mono(gray), rgb(gray.repeat(1, 3, 1, 1)), atol=1e-5, rtol=1e-5)


def test_timm_loads_file_with_overlay_exactly(tiny, gray, tmp_path, caplog) -> None:
    path = save_encoder(tiny, tmp_path / "encoder.safetensors")
    overlay = timm_overlay(path)
    assert overlay == {
        "file": str(path),
        "num_classes": 0,
        "input_size": (1, 64, 64),
        "mean": (0.5,),
        "std": (0.25,),
    }
    with caplog.at_level(logging.INFO, logger="timm"):
        model = timm.create_model(
            "vit_tiny_patch16_224",
            in_chans=1,
            pretrained=True,
            pretrained_cfg_overlay=dict(file=str(path), num_classes=0, input_size=(1, 64, 64)),
        ).eval()
    assert any("Loading pretrained weights from file" in r.getMessage() for r in caplog.records)
    assert _timm_log_problems(caplog.records) == []
    assert model.patch_embed.img_size == (64, 64)  # img_size follows input_size
    _assert_same_state(model, tiny)
    with torch.no_grad():
        assert torch.equal(model(gray), tiny(gray))


def test_plain_file_overlay_needs_num_classes_zero(tiny, tmp_path) -> None:
    # Pins the timm behaviour the docs explain: the registry's 1000 classes make the load strict.
    path = save_encoder(tiny, tmp_path / "encoder.safetensors")
    with pytest.raises(RuntimeError, match=r"head\.weight"):
        timm.create_model(
            "vit_tiny_patch16_224",
            in_chans=1,
            pretrained=True,
            pretrained_cfg_overlay=dict(file=str(path)),
        )
    model = timm.create_model(
        "vit_tiny_patch16_224",
        in_chans=1,
        num_classes=0,
        img_size=64,
        pretrained=True,
        pretrained_cfg_overlay=dict(file=str(path)),
    )
    _assert_same_state(model, tiny)


def test_timm_local_dir_rebuilds_everything(gray, tmp_path, caplog) -> None:
    torch.manual_seed(5)
    enc = create_encoder("vit_tiny", img_size=64, patch_size=8).eval()  # not a registered name
    weights = save_encoder(enc, tmp_path / "export")
    assert weights == tmp_path / "export" / "model.safetensors"
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert config == read_encoder_config(weights)
    assert config["architecture"] == "vit_tiny_patch16_224"
    assert config["model_args"]["patch_size"] == 8
    with caplog.at_level(logging.INFO, logger="timm"):
        model = timm.create_model(f"local-dir:{tmp_path / 'export'}", pretrained=True).eval()
    assert _timm_log_problems(caplog.records) == []
    assert model.patch_embed.patch_size == (8, 8) and model.num_classes == 0
    _assert_same_state(model, enc)
    with torch.no_grad():
        assert torch.equal(model(gray), enc(gray))
    # The same folder as a 3-channel model at another size: timm adapts like load_encoder.
    adapted = timm.create_model(
        f"local-dir:{tmp_path / 'export'}", pretrained=True, in_chans=3, img_size=96
    )
    assert adapted.patch_embed.proj.in_channels == 3 and adapted.pos_embed.shape[1] == 1 + 144
    _assert_same_state(adapted, load_encoder(tmp_path / "export", in_chans=3, img_size=96))
    assert timm_overlay(tmp_path / "export")["file"] == str(weights)
    assert sorted(p.name for p in (tmp_path / "export").iterdir()) == [
        "config.json",
        "model.safetensors",
    ]  # no temporary files left behind


def test_three_channel_export_and_consumption(tiny, gray, tmp_path, caplog) -> None:
    one = save_encoder(tiny, tmp_path / "gray.safetensors")
    three = save_encoder(tiny, tmp_path / "rgb.safetensors", in_chans=3)
    assert read_encoder_config(three)["pretrained_cfg"]["input_size"] == [3, 64, 64]
    assert read_encoder_config(three)["model_args"]["in_chans"] == 3
    with caplog.at_level(logging.INFO, logger="timm"):
        rgb = timm.create_model(
            "vit_tiny_patch16_224",
            in_chans=3,
            pretrained=True,
            pretrained_cfg_overlay=timm_overlay(three),
        ).eval()
        # The 1-channel file consumed as 3 channels: timm adapts it the same way.
        adapted = timm.create_model(
            "vit_tiny_patch16_224",
            in_chans=3,
            pretrained=True,
            pretrained_cfg_overlay=timm_overlay(one),
        ).eval()
    assert _timm_log_problems(caplog.records) == []
    assert any("from 1 to 3 channel" in r.getMessage() for r in caplog.records)
    _assert_same_state(rgb, adapted)
    assert rgb.pretrained_cfg["mean"] == (0.5, 0.5, 0.5)
    with torch.no_grad():
        torch.testing.assert_close(rgb(gray.repeat(1, 3, 1, 1)), tiny(gray), atol=1e-5, rtol=1e-5)
    _assert_same_state(load_encoder(three), rgb)
    _assert_same_state(load_encoder(one, in_chans=3), rgb)


def test_loading_at_another_image_size_resamples_pos_embed(tiny, tmp_path) -> None:
    path = save_encoder(tiny, tmp_path / "encoder.safetensors")
    model = timm.create_model(
        "vit_tiny_patch16_224",
        img_size=96,
        pretrained=True,
        pretrained_cfg_overlay=timm_overlay(path),
    ).eval()
    ours = load_encoder(path, img_size=96).eval()
    expected = resample_abs_pos_embed(
        tiny.pos_embed.detach(), new_size=(6, 6), old_size=(4, 4), num_prefix_tokens=1
    )
    assert model.pos_embed.shape == (1, 1 + 36, 192)
    assert torch.equal(model.pos_embed, expected)
    assert torch.equal(ours.pos_embed, expected)
    assert torch.equal(model.pos_embed[:, :1], tiny.pos_embed[:, :1])  # CLS entry kept
    _assert_same_state(ours, model)
    with torch.no_grad():
        x = torch.randn(1, 1, 96, 96)
        assert torch.equal(ours(x), model(x))


def test_load_encoder_round_trip_and_metadata(tiny, gray, tmp_path) -> None:
    path = save_encoder(
        tiny, tmp_path / "encoder.safetensors", mean=0.4, std=(0.3,), extra_config={"epochs": 3}
    )
    config = read_encoder_config(path)
    assert config["spcxr"]["extra"] == {"epochs": 3}
    assert config["spcxr"]["depth"] == 12 and config["spcxr"]["embed_dim"] == 192
    loaded = load_encoder(path).eval()
    _assert_same_state(loaded, tiny)
    with torch.no_grad():
        assert torch.equal(loaded(gray), tiny(gray))
    data = resolve_data_config(model=load_encoder(path))
    assert data["input_size"] == (1, 64, 64)
    assert data["mean"] == pytest.approx((0.4,)) and data["std"] == pytest.approx((0.3,))
    assert data["crop_pct"] == 1.0
    rgb = resolve_data_config(model=load_encoder(path, in_chans=3, img_size=96))
    assert rgb["input_size"] == (3, 96, 96) and rgb["mean"] == pytest.approx((0.4, 0.4, 0.4))
    with_head = load_encoder(path, num_classes=3)
    assert with_head.head.out_features == 3
    _assert_same_state(with_head.blocks, tiny.blocks)


def test_classifier_round_trip(tmp_path, gray) -> None:
    torch.manual_seed(7)
    clf = create_encoder("vit_tiny", img_size=64, num_classes=2).eval()
    path = save_encoder(clf, tmp_path / "clf.safetensors")
    assert read_encoder_config(path)["num_classes"] == 2
    again = load_encoder(path, num_classes=2).eval()
    _assert_same_state(again, clf)
    with torch.no_grad():
        assert torch.equal(again(gray), clf(gray))
    body = load_encoder(path)  # default: the encoder only, the stored head is dropped
    assert body.num_classes == 0 and "head.weight" not in body.state_dict()


def test_load_encoder_never_unpickles(tiny, tmp_path, monkeypatch) -> None:
    path = save_encoder(tiny, tmp_path / "encoder.safetensors")

    def forbidden(*args, **kwargs):
        raise AssertionError("pickle used")

    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(pickle, "Unpickler", forbidden)
    _assert_same_state(load_encoder(path), tiny)


def test_load_encoder_rejects_other_files(tiny, tmp_path) -> None:
    pickled = tmp_path / "encoder.pt"
    torch.save(tiny.state_dict(), pickled)
    with pytest.raises(ValueError, match=r"encoder\.pt.*safetensors only"):
        load_encoder(pickled)
    disguised = tmp_path / "disguised.safetensors"
    disguised.write_bytes(pickled.read_bytes())
    with pytest.raises(ValueError, match=r"disguised\.safetensors: not a readable safetensors"):
        load_encoder(disguised)
    plain = tmp_path / "plain.safetensors"
    safetensors.torch.save_file(tiny.state_dict(), str(plain))
    with pytest.raises(ValueError, match=r"plain\.safetensors: no spcxr config"):
        load_encoder(plain)
    with pytest.raises(FileNotFoundError, match=r"missing\.safetensors"):
        load_encoder(tmp_path / "missing.safetensors")
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors"):
        load_encoder(tmp_path)  # a folder without model.safetensors


def test_load_encoder_reports_mismatched_tensors(tiny, tmp_path) -> None:
    path = save_encoder(tiny, tmp_path / "encoder.safetensors")
    with pytest.raises(ValueError, match=r"encoder\.safetensors: tensors do not fit"):
        load_encoder(path, depth=6)  # blocks 6..11 in the file are unexpected


def test_save_encoder_rejects_other_suffixes(tiny, tmp_path) -> None:
    with pytest.raises(ValueError, match=r"encoder\.pt: weights are written as \.safetensors"):
        save_encoder(tiny, tmp_path / "encoder.pt")
    with pytest.raises(ValueError, match="mean has 2 values for 1 input channels"):
        save_encoder(tiny, tmp_path / "e.safetensors", mean=(0.5, 0.5))
    assert not Path(tmp_path / "e.safetensors").exists()


@pytest.mark.parametrize(
    ("depth", "expected"),
    [(12, (6, 8, 10, 12)), (6, (3, 4, 5, 6)), (4, (2, 3, 4)), (24, (12, 16, 20, 24))],
)
def test_map_blocks(depth: int, expected: tuple[int, ...]) -> None:
    assert map_blocks((6, 8, 10, 12), depth) == expected


def test_map_blocks_edges() -> None:
    assert map_blocks((1,), 3) == (1,)  # never below 1
    assert map_blocks((12, 1), 2) == (1, 2)  # sorted, the last block stays last
    assert map_blocks((2, 4), 6, reference_depth=4) == (3, 6)
    for bad in [(), (0,), (13,)]:
        with pytest.raises(ValueError):
            map_blocks(bad, 12)
    with pytest.raises(ValueError, match="depths must be >= 1"):
        map_blocks((6,), 0)
