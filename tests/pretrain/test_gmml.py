"""The GMML reconstruction model, loss and optimiser groups (spcxr.pretrain.gmml)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from spcxr.models.vit import create_encoder
from spcxr.pretrain.gmml import (
    GMMLConfig,
    GMMLModel,
    param_groups,
    reconstruction_loss,
)


def _tiny_config(**overrides) -> GMMLConfig:
    return GMMLConfig(**{"arch": "vit_tiny", "img_size": 64, "patch_size": 16, **overrides})


@pytest.fixture(scope="module")
def tiny_model() -> GMMLModel:
    torch.manual_seed(0)
    return GMMLModel(_tiny_config()).eval()


@pytest.fixture()
def images() -> torch.Tensor:
    return torch.randn(2, 1, 64, 64, generator=torch.Generator().manual_seed(1))


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="loss_on"):
        GMMLConfig(loss_on="some")
    with pytest.raises(ValueError, match="not a multiple of --model-patch-size"):
        GMMLConfig(img_size=100)
    with pytest.raises(ValueError, match=r"outside 1\.\.12"):
        GMMLConfig(recon_blocks=(6, 13))
    assert GMMLConfig(recon_blocks=[12, 24], recon_reference_depth=24).recon_blocks == (12, 24)


@pytest.mark.parametrize(
    ("arch", "patch", "size", "chans"),
    [
        ("vit_tiny", 16, 64, 1),
        ("vit_tiny", 8, 64, 3),
        ("vit_tiny", 16, 96, 1),
        ("vit_small", 16, 96, 1),
        ("vit_small", 8, 64, 1),
    ],
)
def test_shapes(arch: str, patch: int, size: int, chans: int) -> None:
    model = GMMLModel(GMMLConfig(arch=arch, img_size=size, patch_size=patch, in_chans=chans)).eval()
    x = torch.randn(2, chans, size, size)
    with torch.no_grad():
        feats = model.features(x)
        out = model(x)
    assert feats.shape == (2, (size // patch) ** 2, model.encoder.embed_dim)  # every token kept
    assert out.shape == x.shape


def test_shapes_vit_base_at_224() -> None:
    # Built on the meta device and run there: shapes without ViT-B's CPU cost, never trained.
    with torch.device("meta"):
        model = GMMLModel(GMMLConfig(arch="vit_base"))
        x = torch.empty(2, 1, 224, 224)
        assert model.features(x).shape == (2, 196, 768)
        assert model(x).shape == (2, 1, 224, 224)
    assert model.recon_blocks == (6, 8, 10, 12)
    assert model.head.conv_transpose.kernel_size == (16, 16)


def test_no_mask_token_and_no_token_dropping(tiny_model) -> None:
    names = [name for name, _ in tiny_model.named_parameters()]
    assert not any("mask_token" in name for name in names)
    assert tiny_model.encoder.patch_embed.num_patches == 16
    assert isinstance(tiny_model.encoder.patch_drop, torch.nn.Identity)


def _block_outputs(model: GMMLModel, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Every block's output (forward hooks on timm's own forward_features) and its final output."""
    outputs: list[torch.Tensor] = []
    hooks = [
        b.register_forward_hook(lambda m, i, o: outputs.append(o)) for b in model.encoder.blocks
    ]
    try:
        final = model.encoder.forward_features(x)
    finally:
        for hook in hooks:
            hook.remove()
    return outputs, final


def test_features_equal_hand_computation(tiny_model, images) -> None:
    with torch.no_grad():
        outputs, _ = _block_outputs(tiny_model, images)
        chosen = torch.stack([outputs[b - 1] for b in (6, 8, 10, 12)]).mean(dim=0)
        norm = tiny_model.encoder.norm
        expected = F.layer_norm(chosen, (192,), norm.weight, norm.bias, eps=1e-6)[:, 1:]
        assert torch.equal(tiny_model.features(images), expected)


def test_last_block_only_equals_timm_forward_features(images) -> None:
    torch.manual_seed(2)
    model = GMMLModel(_tiny_config(recon_blocks=(12,))).eval()
    with torch.no_grad():
        assert torch.equal(model.features(images), model.encoder.forward_features(images)[:, 1:])


def test_blocks_after_the_last_chosen_one_are_skipped(images) -> None:
    torch.manual_seed(3)
    encoder = create_encoder("vit_tiny", img_size=64, depth=6).eval()
    model = GMMLModel(_tiny_config(recon_blocks=(2, 4)), encoder=encoder)
    assert model.recon_blocks == (1, 2)  # (2, 4) of 12 mapped to depth 6
    calls: list[int] = []
    for index, block in enumerate(encoder.blocks, start=1):
        block.register_forward_hook(lambda m, i, o, index=index: calls.append(index))
    with torch.no_grad():
        feats = model.features(images)
    assert calls == [1, 2]
    calls.clear()
    with torch.no_grad():
        outputs, _ = _block_outputs(model, images)
        expected = encoder.norm(torch.stack(outputs[:2]).mean(dim=0))[:, 1:]
    assert torch.equal(feats, expected)


def test_encoder_must_match_config() -> None:
    encoder = create_encoder("vit_tiny", img_size=64, patch_size=8, device="meta")
    with pytest.raises(ValueError, match="patch_size"):
        GMMLModel(_tiny_config(), encoder=encoder)


def test_loss_hand_example() -> None:
    recon = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])  # [1, 1, 2, 2]
    clean = torch.zeros_like(recon)
    mask = torch.tensor([[[True, True], [False, False]]])  # [1, 2, 2]
    assert reconstruction_loss(recon, clean, mask).item() == pytest.approx(1.5)
    assert reconstruction_loss(recon, clean, mask, loss_on="all").item() == pytest.approx(2.5)
    # Two channels, one mask: masked pixels of every channel count (|1|+|2|+|10|+|20|)/4.
    recon2 = torch.cat([recon, 10 * recon], dim=1)
    got = reconstruction_loss(recon2, torch.zeros_like(recon2), mask.unsqueeze(1))
    assert got.item() == pytest.approx(33 / 4)
    # Averaged over the batch's masked pixels, not per image: 1 + 3 masked pixels.
    batch = torch.stack([torch.full((1, 2, 2), 4.0), torch.full((1, 2, 2), 8.0)])
    batch_mask = torch.tensor([[[1, 0], [0, 0]], [[1, 1], [1, 0]]])
    got = reconstruction_loss(batch, torch.zeros_like(batch), batch_mask)
    assert got.item() == pytest.approx((4 + 3 * 8) / 4)


def test_loss_matches_reference_formula() -> None:
    gen = torch.Generator().manual_seed(4)
    recon, clean = torch.randn(3, 3, 8, 8, generator=gen), torch.randn(3, 3, 8, 8, generator=gen)
    mask = torch.rand(3, 1, 8, 8, generator=gen) > 0.4
    # Reference: recloss[mask == 1].mean() with the mask repeated over the channels.
    recloss = F.l1_loss(recon, clean, reduction="none")
    expected = recloss[mask.expand_as(recon)].mean()
    torch.testing.assert_close(reconstruction_loss(recon, clean, mask), expected)
    torch.testing.assert_close(reconstruction_loss(recon, clean, mask.expand_as(recon)), expected)
    assert reconstruction_loss(recon, clean, mask, "all") == pytest.approx(recloss.mean().item())


def test_loss_with_empty_mask_is_zero_not_nan() -> None:
    recon = torch.randn(2, 1, 4, 4, requires_grad=True)
    loss = reconstruction_loss(
        recon, torch.zeros(2, 1, 4, 4), torch.zeros(2, 4, 4, dtype=torch.bool)
    )
    loss.backward()
    assert loss.item() == 0.0
    assert torch.isfinite(recon.grad).all() and torch.count_nonzero(recon.grad) == 0


def test_loss_under_bfloat16_is_float32() -> None:
    recon = torch.randn(1, 1, 4, 4).bfloat16()
    loss = reconstruction_loss(recon, torch.zeros_like(recon), torch.ones(1, 4, 4))
    assert loss.dtype == torch.float32


def test_loss_rejects_bad_input() -> None:
    x = torch.zeros(2, 1, 4, 4)
    with pytest.raises(ValueError, match="loss_on"):
        reconstruction_loss(x, x, torch.ones(2, 4, 4), loss_on="masks")
    with pytest.raises(ValueError, match="does not fit"):
        reconstruction_loss(x, x, torch.ones(2, 4, 5))
    with pytest.raises(ValueError, match="channels"):
        reconstruction_loss(x, x, torch.ones(2, 2, 4, 4))
    with pytest.raises(ValueError, match="differ"):
        reconstruction_loss(x, torch.zeros(2, 1, 4, 5), torch.ones(2, 4, 4))


def test_gradients_reach_encoder_and_head(images) -> None:
    torch.manual_seed(5)
    model = GMMLModel(_tiny_config()).train()
    mask = torch.rand(2, 1, 64, 64) > 0.5
    reconstruction_loss(model(images), images, mask).backward()
    for name, param in model.named_parameters():
        assert param.grad is not None, name
        assert torch.isfinite(param.grad).all(), name
    for name in ["encoder.patch_embed.proj.weight", "encoder.cls_token", "encoder.pos_embed",
                 "encoder.blocks.0.attn.qkv.weight", "encoder.norm.weight",
                 "head.mlp.0.weight", "head.conv_transpose.weight"]:  # fmt: skip
        assert torch.count_nonzero(model.get_parameter(name).grad) > 0, name


def test_gradient_checkpointing_gives_the_same_gradients(images) -> None:
    torch.manual_seed(6)
    model = GMMLModel(_tiny_config(drop_path_rate=0.0)).train()
    mask = torch.rand(2, 1, 64, 64) > 0.5

    def grads() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model.zero_grad()
        loss = reconstruction_loss(model(images), images, mask)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    loss, plain = grads()
    model.set_grad_checkpointing(True)
    assert model.encoder.grad_checkpointing
    loss_ckpt, ckpt = grads()
    torch.testing.assert_close(loss_ckpt, loss)
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], rtol=1e-4, atol=1e-6)


def test_param_groups_follow_the_reference_rule() -> None:
    torch.manual_seed(7)
    model = GMMLModel(_tiny_config())
    model.head.mlp[0].weight.requires_grad_(False)  # frozen: left out
    groups = param_groups(model, 0.04)
    assert [g["name"] for g in groups] == ["decay", "no_decay"]
    assert [g["weight_decay"] for g in groups] == [0.04, 0.0]
    names = {id(p): n for n, p in model.named_parameters()}
    decay = {names[id(p)] for p in groups[0]["params"]}
    no_decay = {names[id(p)] for p in groups[1]["params"]}
    assert {"encoder.cls_token", "encoder.pos_embed", "encoder.patch_embed.proj.weight"} <= decay
    assert {"encoder.norm.weight", "encoder.blocks.0.norm1.weight", "head.mlp.2.bias"} <= no_decay
    assert all(n.endswith(".bias") or model.get_parameter(n).ndim == 1 for n in no_decay)
    assert all(model.get_parameter(n).ndim > 1 for n in decay)
    assert "head.mlp.0.weight" not in decay | no_decay
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert decay | no_decay == trainable and not decay & no_decay
    skipped = param_groups(model, 0.04, skip=["encoder.cls_token", "encoder.pos_embed"])
    assert len(skipped[1]["params"]) == len(no_decay) + 2


def test_adamw_decays_only_the_decay_group() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.LayerNorm(3))
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.AdamW(param_groups(model, 0.5), lr=0.1)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    after = list(model.parameters())
    torch.testing.assert_close(after[0], before[0] * (1 - 0.1 * 0.5))  # Linear weight decayed
    for b, a in zip(before[1:], after[1:], strict=True):
        assert torch.equal(a, b)  # bias and LayerNorm untouched


@pytest.mark.slow
def test_compiles_without_graph_breaks(images) -> None:
    torch.manual_seed(8)
    model = GMMLModel(_tiny_config()).eval()
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    loss_fn = torch.compile(reconstruction_loss, fullgraph=True, backend="eager")
    mask = torch.rand(2, 1, 64, 64) > 0.5
    with torch.no_grad():
        out = compiled(images)
        torch.testing.assert_close(out, model(images))
        torch.testing.assert_close(
            loss_fn(out, images, mask), reconstruction_loss(out, images, mask)
        )
