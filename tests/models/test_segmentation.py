"""ViT segmentation: UNETR / progressive decoders, freezing, save / load (spcxr.models.segmentation)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from spcxr.models.init_from import load_init
from spcxr.models.segmentation import (
    Segmenter,
    SegmenterConfig,
    UNETRDecoder,
    build_segmenter,
    load_segmenter,
    save_segmenter,
)
from spcxr.models.vit import create_encoder
from spcxr.train.lrd import param_groups_lrd

TINY = dict(arch="vit_tiny", img_size=32, patch_size=8, decoder_channels=[64, 32, 16, 8])


# tiny models on one intra-op thread (tests/conftest.py: one_thread)
pytestmark = pytest.mark.usefixtures("one_thread")


def _segmenter(cfg: SegmenterConfig, depth: int = 4) -> Segmenter:
    """A segmenter on a shallow ViT-Ti (fast to build), random weights."""
    encoder = create_encoder(
        cfg.arch,
        img_size=cfg.img_size,
        patch_size=cfg.patch_size,
        drop_path_rate=cfg.drop_path_rate,
        depth=depth,
    )
    return Segmenter(encoder, cfg)


def _images(size: int, n: int = 2) -> torch.Tensor:
    return torch.randn(n, 1, size, size, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("decoder", ["unetr", "progressive"])
@pytest.mark.parametrize(("patch", "size"), [(8, 32), (16, 64), (8, 48)])
def test_logits_at_input_resolution_and_gradients_reach_everything(
    decoder: str, patch: int, size: int
) -> None:
    torch.manual_seed(0)
    cfg = SegmenterConfig(**dict(TINY, img_size=size, patch_size=patch), decoder=decoder)
    model = _segmenter(cfg, depth=2)
    out = model(_images(size))
    assert out.shape == (2, 1, size, size)
    out.square().mean().backward()
    # Every decoder parameter and every encoder block gets a gradient.
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()]
    assert missing == []


def test_build_segmenter_from_scratch() -> None:
    torch.manual_seed(0)
    model, info = build_segmenter(SegmenterConfig(**TINY, drop_path_rate=0.2))
    assert info["init"] == "scratch" and len(model.encoder.blocks) == 12
    assert model.encoder.blocks[-1].drop_path1.drop_prob == pytest.approx(0.2)
    assert model.blocks == (3, 6, 9, 12)


def test_unetr_layout_matches_the_paper_for_patch_16() -> None:
    torch.manual_seed(0)
    model = _segmenter(SegmenterConfig(**dict(TINY, img_size=64, patch_size=16)), depth=12)
    assert model.blocks == (3, 6, 9, 12)
    decoder = model.decoder
    assert isinstance(decoder, UNETRDecoder)
    # Blocks 9, 6, 3 join at 1/8, 1/4, 1/2 of the input; the image at full resolution.
    assert decoder.skip_stage == [1, 2, 3]
    grid = torch.zeros(1, 192, 4, 4)
    assert [tuple(p(grid).shape[-2:]) for p in decoder.skips] == [(8, 8), (16, 16), (32, 32)]
    assert [u.out_channels for u in decoder.ups] == [64, 32, 16, 8]


def test_patch_8_uses_the_finest_channels_and_merges_extra_skips() -> None:
    torch.manual_seed(0)
    model = _segmenter(SegmenterConfig(**TINY))  # 3 stages for a patch of 8
    assert [u.out_channels for u in model.decoder.ups] == [32, 16, 8]
    assert model.decoder.skip_stage == [1, 2, 2]  # blocks 9 -> 1/4; 6 and 3 -> 1/2
    assert model.decoder.fuse[1][0].in_channels == 3 * 16


def test_skip_blocks_map_onto_shallower_encoders() -> None:
    model = _segmenter(SegmenterConfig(**TINY), depth=6)
    assert model.blocks == (2, 3, 5, 6)  # ceil(b * 6 / 12)
    assert model(_images(32)).shape == (2, 1, 32, 32)


def test_encode_returns_block_outputs_as_row_major_grids() -> None:
    torch.manual_seed(0)
    cfg = SegmenterConfig(**TINY, skip_blocks=[4, 8], skip_reference_depth=8)
    model = _segmenter(cfg, depth=8).eval()
    assert model.blocks == (4, 8)
    x = _images(32)
    enc = model.encoder
    with torch.no_grad():
        deepest, skips = model.encode(x)
        tokens = enc.norm_pre(enc._pos_embed(enc.patch_embed(x)))
        outputs = []
        for block in enc.blocks[:8]:
            tokens = block(tokens)
            outputs.append(tokens)

    def grid(t: torch.Tensor) -> torch.Tensor:  # [B, 1 + 16, D] -> [B, D, 4, 4]
        return t[:, 1:].reshape(2, 4, 4, 192).permute(0, 3, 1, 2)

    assert len(skips) == 1
    assert torch.allclose(skips[0], grid(outputs[3]), atol=1e-5)  # block 4, raw
    assert torch.allclose(deepest, grid(enc.norm(outputs[7])), atol=1e-5)  # block 8, normed


def _trainable(model: torch.nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_freeze_modes_choose_the_trainable_parameters() -> None:
    torch.manual_seed(0)

    def build(freeze: str, frozen_blocks: int = 2) -> Segmenter:
        return _segmenter(SegmenterConfig(**TINY, freeze=freeze, frozen_blocks=frozen_blocks))

    none, full, partial = build("none"), build("all"), build("partial")
    every = {n for n, _ in none.named_parameters() if n.startswith("encoder.")}
    decoder = {n for n, _ in none.named_parameters() if n.startswith("decoder.")}
    assert _trainable(none) == every | decoder
    assert _trainable(full) == decoder
    frozen = {
        n
        for n in every
        if n in ("encoder.cls_token", "encoder.pos_embed")
        or n.startswith(("encoder.patch_embed.", "encoder.blocks.0.", "encoder.blocks.1."))
    }
    assert len(frozen) == 2 + 2 + 2 * 12  # cls, pos, patch conv w+b, 12 tensors per block
    assert _trainable(partial) == (every - frozen) | decoder
    # Frozen parts stay in eval mode; the optimiser never sees them.
    partial.train()
    assert not partial.encoder.blocks[1].training and partial.encoder.blocks[2].training
    assert partial.decoder.training
    full.train()
    assert not full.encoder.training
    groups = param_groups_lrd(partial, weight_decay=0.05, layer_decay=0.75)
    assert sum(len(g["params"]) for g in groups) == len(_trainable(partial))
    with pytest.raises(ValueError, match="frozen_blocks 5 exceeds"):
        build("partial", 5)


def test_frozen_encoder_is_unchanged_by_training_steps() -> None:
    torch.manual_seed(0)
    cfg = SegmenterConfig(**TINY, freeze="partial", frozen_blocks=3, drop_path_rate=0.0)
    model = _segmenter(cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.AdamW(param_groups_lrd(model, weight_decay=0.05, layer_decay=0.75))
    model.train()
    for _ in range(2):
        model(_images(32)).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert "encoder.blocks.2.attn.qkv.weight" not in changed
    assert "encoder.pos_embed" not in changed and "encoder.patch_embed.proj.weight" not in changed
    assert "encoder.blocks.3.attn.qkv.weight" in changed and "decoder.out.weight" in changed


def test_config_errors() -> None:
    with pytest.raises(ValueError, match="power-of-2"):
        SegmenterConfig(img_size=48, patch_size=12)
    with pytest.raises(ValueError, match="decoder must be one of"):
        SegmenterConfig(decoder="fpn")
    with pytest.raises(ValueError, match=r"outside 1\.\.12"):
        SegmenterConfig(skip_blocks=[0, 6])
    with pytest.raises(ValueError, match="fewer than the 4 stages"):
        Segmenter(
            create_encoder("vit_tiny", img_size=64, patch_size=16, device="meta"),
            SegmenterConfig(**dict(TINY, img_size=64, patch_size=16, decoder_channels=[16, 8])),
        )
    with pytest.raises(ValueError, match="img_size"):
        Segmenter(create_encoder("vit_tiny", img_size=64, patch_size=8), SegmenterConfig(**TINY))


@pytest.mark.parametrize("decoder", ["unetr", "progressive"])
def test_save_load_round_trip_and_encoder_reuse(tmp_path: Path, decoder: str) -> None:
    torch.manual_seed(0)
    cfg = SegmenterConfig(**TINY, decoder=decoder, norm="batch", freeze="partial", frozen_blocks=2)
    model, info = build_segmenter(cfg)
    model.train()
    model(_images(32, n=4))  # BatchNorm statistics move away from their initial values
    model.eval()
    folder = save_segmenter(model, tmp_path / "seg", extra={"init": info})
    loaded, meta = load_segmenter(folder)
    x = _images(32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert meta["task"] == "segmentation" and meta["config"]["decoder"] == decoder
    assert meta["input_size"] == [1, 32, 32] and meta["extra"]["init"]["init"] == "scratch"
    assert _trainable(loaded) == _trainable(model)  # the freeze setting comes back too
    encoder, init_info = load_init(str(folder), arch="vit_tiny", img_size=32, patch_size=8)
    assert init_info["init"] == "finetuned"
    for key, value in encoder.state_dict().items():
        assert torch.equal(value, model.encoder.state_dict()[key]), key
