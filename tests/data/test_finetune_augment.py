"""Tests of the batched fine-tuning augmentation: geometry, alignment, jitter, determinism."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from torchvision.transforms import InterpolationMode

from spcxr.data.augment import AugmentConfig, normalize
from spcxr.data.finetune_augment import (
    DEFAULT_FILL,
    FinetuneAugmentConfig,
    FinetuneAugmentParams,
    affine_grid,
    affine_theta,
    apply_params,
    augment_batch,
    sample_params,
)

IDENTITY = FinetuneAugmentConfig(
    rotate_deg=0.0, scale=(1.0, 1.0), translate=0.0, brightness=0.0, contrast=0.0
)
NO_JITTER = FinetuneAugmentConfig(brightness=0.0, contrast=0.0)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def smooth_images(batch: int, height: int, width: int | None = None, seed: int = 0) -> torch.Tensor:
    """Normalised float [B, 1, H, W]: smooth random structure in about [-2, 2]."""
    width = width or height
    coarse = torch.rand(batch, 1, height // 8, width // 8, generator=gen(seed))
    x01 = F.interpolate(coarse, size=(height, width), mode="bicubic", align_corners=False)
    return normalize(x01.clamp(0, 1), AugmentConfig())


def blob_masks(batch: int, size: int, seed: int = 0) -> torch.Tensor:
    """0/1 float masks of smooth random blobs (lung-like extents, not touching the border)."""
    masks = (smooth_images(batch, size, seed=seed) > 0.0).float()
    border = size // 8
    masks[..., :border, :] = 0
    masks[..., -border:, :] = 0
    masks[..., :, :border] = 0
    masks[..., :, -border:] = 0
    return masks


def params_of(
    angle: float, scale: float = 1.0, translate: tuple[float, float] = (0.0, 0.0)
) -> FinetuneAugmentParams:
    f64 = torch.float64
    return FinetuneAugmentParams(
        angle_deg=torch.tensor([angle], dtype=f64),
        scale=torch.tensor([scale], dtype=f64),
        translate=torch.tensor([translate], dtype=f64),
        flip=torch.tensor([False]),
        brightness=torch.zeros(1, dtype=f64),
        contrast=torch.ones(1, dtype=f64),
    )


def test_default_fill_is_normalised_zero() -> None:
    assert DEFAULT_FILL == -2.0
    assert normalize(torch.tensor(0.0), AugmentConfig()).item() == DEFAULT_FILL


def test_identity_config_changes_nothing() -> None:
    images = smooth_images(4, 48, 40)
    masks = (images > 0).float()
    out, out_masks = augment_batch(images, IDENTITY, gen(), masks)
    assert torch.allclose(out, images, atol=1e-5)
    assert torch.equal(out_masks, masks)


def test_affine_grid_equals_torch() -> None:
    cfg = FinetuneAugmentConfig(rotate_deg=30.0, hflip_p=0.5)
    theta = affine_theta(sample_params(6, cfg, gen(8)), 40, 56).float()
    expected = F.affine_grid(theta, [6, 1, 40, 56], align_corners=False)
    assert torch.allclose(affine_grid(theta, 40, 56), expected, atol=1e-6)


def test_forced_flip_mirrors_exactly() -> None:
    images = smooth_images(3, 32)
    masks = blob_masks(3, 32)
    cfg = dataclasses.replace(IDENTITY, hflip_p=1.0)
    out, out_masks = augment_batch(images, cfg, gen(), masks)
    assert torch.allclose(out, images.flip(-1), atol=1e-5)
    assert torch.equal(out_masks, masks.flip(-1))


@pytest.mark.parametrize(("height", "width"), [(64, 64), (64, 48)])
def test_matches_torchvision_rotate_and_affine(height: int, width: int) -> None:
    # Positive angle = counter-clockwise on screen, as torchvision's rotate; torchvision's
    # affine counts clockwise. Compared away from the border, where the two pad differently.
    image = smooth_images(1, height, width)
    interior = (..., slice(8, -8), slice(8, -8))
    ours, _ = apply_params(image, params_of(17.0), fill=0.0)
    ref = TF.rotate(image, 17.0, interpolation=InterpolationMode.BILINEAR)
    assert (ours - ref)[interior].abs().max() < 1e-4
    ours, _ = apply_params(image, params_of(17.0, 1.08, (3 / width, -2 / height)), fill=0.0)
    ref = TF.affine(
        image,
        angle=-17.0,
        translate=[3, -2],
        scale=1.08,
        shear=[0.0, 0.0],
        interpolation=InterpolationMode.BILINEAR,
    )
    assert (ours - ref)[interior].abs().max() < 1e-4
    assert (ours - image)[interior].abs().max() > 0.5  # it did move


def test_rotation_moves_an_offcentre_spot_by_the_sampled_angle() -> None:
    # A bright spot right of centre on a dark image; each image gets its own sampled angle
    # (up to 60 degrees) and the spot's centroid must land at angle degrees counter-clockwise.
    size, radius, batch = 65, 20, 16
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    centre = (size - 1) / 2
    spot = ((xx - centre - radius) ** 2 + (yy - centre) ** 2 <= 9).float()
    images = (spot * 4 - 2).expand(batch, 1, size, size).contiguous()
    cfg = dataclasses.replace(IDENTITY, rotate_deg=60.0)
    out, _ = augment_batch(images, cfg, gen(4))
    angle = torch.deg2rad(sample_params(batch, cfg, gen(4)).angle_deg)
    assert angle.abs().max() > math.radians(40)  # large angles, both signs, were drawn
    assert (angle > 0).any() and (angle < 0).any()
    weight = (out + 2).clamp_min(0)[:, 0]  # [B, S, S]
    cx = (weight * xx).sum((1, 2)) / weight.sum((1, 2))
    cy = (weight * yy).sum((1, 2)) / weight.sum((1, 2))
    assert torch.allclose(cx, centre + radius * torch.cos(angle).float(), atol=0.3)
    assert torch.allclose(cy, centre - radius * torch.sin(angle).float(), atol=0.3)


def test_translation_and_scale_directions() -> None:
    size = 64
    spot = torch.zeros(1, 1, size, size)
    spot[..., 40:44, 40:44] = 1.0  # centred at (41.5, 41.5): 10 px right of / below centre
    image = spot * 4 - 2

    def centroid(x: torch.Tensor) -> tuple[float, float]:
        w = (x + 2).clamp_min(0)[0, 0]
        idx = torch.arange(size, dtype=torch.float32)
        return (w.sum(0) * idx).sum().item() / w.sum().item(), (
            w.sum(1) * idx
        ).sum().item() / w.sum().item()

    moved, _ = apply_params(image, params_of(0.0, translate=(0.125, -0.0625)))
    assert centroid(moved) == pytest.approx((41.5 + 8, 41.5 - 4), abs=1e-3)  # right and up
    zoomed, _ = apply_params(image, params_of(0.0, scale=1.5))
    assert centroid(zoomed) == pytest.approx((31.5 + 15, 31.5 + 15), abs=0.05)  # away from centre


def test_images_and_masks_stay_aligned() -> None:
    batch, size = 16, 64
    masks = blob_masks(batch, size, seed=2)
    images = masks * 4 - 2  # mask 0 -> -2 (= fill), 1 -> 2
    cfg = dataclasses.replace(NO_JITTER, rotate_deg=25.0, translate=0.1, hflip_p=0.5)
    out, out_masks = augment_batch(images, cfg, gen(1), masks)
    assert out_masks is not None and set(out_masks.unique().tolist()) <= {0.0, 1.0}
    from_image = out > 0
    inter = (from_image & (out_masks > 0)).sum((1, 2, 3)).float()
    union = (from_image | (out_masks > 0)).sum((1, 2, 3)).float()
    assert (inter / union).min() > 0.98
    # Geometry is independent of the jitter settings: same masks with jitter switched on.
    jittered = dataclasses.replace(cfg, brightness=0.5, contrast=0.5)
    out_j, masks_j = augment_batch(images, jittered, gen(1), masks)
    assert torch.equal(masks_j, out_masks)
    assert (out_j - out).abs().max() > 0.1
    # Mask area follows the zoom: scale^2 per image, on a centred ellipse.
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    ellipse = ((xx - 31.5) / 14) ** 2 + ((yy - 31.5) / 9) ** 2 <= 1
    central = ellipse.float().expand(batch, 1, size, size).contiguous()
    cfg = dataclasses.replace(NO_JITTER, rotate_deg=25.0, translate=0.0, scale=(0.8, 1.2))
    _, zoomed = augment_batch(central * 4 - 2, cfg, gen(2), central)
    scale = sample_params(batch, cfg, gen(2)).scale.float()
    ratio = zoomed.sum((1, 2, 3)) / central.sum((1, 2, 3))
    assert torch.allclose(ratio, scale**2, rtol=0.03)


def test_fill_value_outside_the_image() -> None:
    images = torch.ones(2, 1, 33, 33)
    cfg = dataclasses.replace(IDENTITY, rotate_deg=45.0, p=1.0)
    params = sample_params(2, cfg, gen(0))
    params.angle_deg[:] = torch.tensor([45.0, -45.0], dtype=torch.float64)
    out, _ = apply_params(images, params)
    assert torch.allclose(out[..., 0, 0], torch.tensor(DEFAULT_FILL))  # corners come from outside
    assert torch.allclose(out[..., 16, 16], torch.tensor(1.0))
    out3, _ = apply_params(images, params, fill=3.0)
    assert torch.allclose(out3[..., 0, 0], torch.tensor(3.0))


def test_jitter_is_contrast_about_the_mean_plus_shift() -> None:
    batch = 256
    images = smooth_images(batch, 16)
    cfg = dataclasses.replace(IDENTITY, brightness=0.3, contrast=0.2)
    out, _ = augment_batch(images, cfg, gen(6))
    params = sample_params(batch, cfg, gen(6))
    b, c = params.brightness.float(), params.contrast.float()
    mean = images.mean((1, 2, 3))
    assert torch.allclose(out.mean((1, 2, 3)), mean + b, atol=1e-5)
    expected = (images - mean.view(-1, 1, 1, 1)) * c.view(-1, 1, 1, 1) + (mean + b).view(
        -1, 1, 1, 1
    )
    assert torch.allclose(out, expected, atol=1e-5)
    assert -0.3 <= b.min() < -0.25 and 0.25 < b.max() <= 0.3
    assert 0.8 <= c.min() < 0.82 and 1.18 < c.max() <= 1.2


def test_parameter_ranges_and_probability() -> None:
    n = 4000
    cfg = FinetuneAugmentConfig(rotate_deg=10.0, scale=(0.9, 1.1), translate=0.06, p=0.5)
    params = sample_params(n, cfg, gen(0))
    applied = params.scale != 1.0
    assert abs(applied.float().mean().item() - 0.5) < 0.04  # binomial sd 0.008
    angle = params.angle_deg[applied]
    assert angle.abs().max() <= 10.0 and angle.abs().max() > 9.9
    assert abs(angle.mean().item()) < 0.5 and abs(angle.std().item() - 20 / math.sqrt(12)) < 0.3
    assert params.scale[applied].min() >= 0.9 and params.scale[applied].max() <= 1.1
    assert params.translate.abs().max() <= 0.06
    assert torch.all(params.angle_deg[~applied] == 0) and torch.all(params.translate[~applied] == 0)
    assert not params.flip.any()  # hflip_p defaults to 0
    flips = sample_params(n, dataclasses.replace(cfg, hflip_p=0.3), gen(0))
    assert abs(flips.flip.float().mean().item() - 0.3) < 0.04
    # A fixed number of draws per image: the flip setting does not change the geometry drawn.
    assert torch.equal(flips.angle_deg, params.angle_deg)


def test_never_flips_vertically() -> None:
    # Top-heavy images (bright top, dark bottom) stay top-heavy under every draw, flips included.
    batch, size = 128, 32
    x01 = torch.linspace(1, 0, size).view(1, 1, size, 1).expand(batch, 1, size, size)
    images = normalize(x01, AugmentConfig()).contiguous()
    cfg = FinetuneAugmentConfig(rotate_deg=10.0, translate=0.06, hflip_p=0.5)
    out, _ = augment_batch(images, cfg, gen(3))
    top, bottom = out[..., : size // 2, :].mean((1, 2, 3)), out[..., size // 2 :, :].mean((1, 2, 3))
    assert torch.all(top - bottom > 1.0)
    theta = affine_theta(sample_params(batch, cfg, gen(3)), size, size)
    assert torch.all(theta[:, 1, 1] > 0)  # y is never mirrored


def test_shapes_dtypes_and_determinism() -> None:
    images = smooth_images(5, 40, 24)
    masks = blob_masks(5, 40)[..., :24]
    cfg = FinetuneAugmentConfig(hflip_p=0.5)
    a, ma = augment_batch(images, cfg, gen(9), masks)
    assert a.shape == images.shape and a.dtype == torch.float32
    assert ma is not None and ma.shape == masks.shape and ma.dtype == masks.dtype
    torch.manual_seed(123)  # the global RNG plays no part
    b, mb = augment_batch(images, cfg, gen(9), masks)
    assert torch.equal(a, b) and torch.equal(ma, mb)
    c, _ = augment_batch(images, cfg, gen(10), masks)
    assert (a - c).abs().mean() > 0.05
    d, md = augment_batch(images.double(), cfg, gen(9), masks.double())
    assert d.dtype == torch.float64 and md.dtype == torch.float64
    assert torch.allclose(d.float(), a, atol=1e-4)
    h, _ = augment_batch(images.bfloat16(), cfg, gen(9))
    assert h.dtype == torch.bfloat16
    out, none = augment_batch(images, cfg, gen(9))
    assert none is None and torch.equal(out, a)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu() -> None:
    images = smooth_images(8, 64)
    masks = blob_masks(8, 64)
    cfg = FinetuneAugmentConfig(hflip_p=0.5)
    cpu, cpu_masks = augment_batch(images, cfg, gen(2), masks)
    gpu, gpu_masks = augment_batch(images.cuda(), cfg, gen(2), masks.cuda())
    assert gpu.device.type == "cuda" and gpu_masks is not None and gpu_masks.device.type == "cuda"
    assert torch.allclose(gpu.cpu(), cpu, atol=1e-4)
    # Threshold ties at exactly 0.5 may differ by rounding: allow a handful of pixels.
    assert (gpu_masks.cpu() != cpu_masks).sum() <= 5


def test_config_validation() -> None:
    bad = [
        {"rotate_deg": -1.0},
        {"scale": (1.1, 0.9)},
        {"scale": (0.0, 1.0)},
        {"translate": 1.0},
        {"brightness": -0.1},
        {"contrast": 1.5},
        {"hflip_p": 1.5},
        {"p": -0.1},
    ]
    for kwargs in bad:
        with pytest.raises(ValueError, match="FinetuneAugmentConfig"):
            FinetuneAugmentConfig(**kwargs)


def test_input_errors() -> None:
    images = smooth_images(2, 16)
    with pytest.raises(TypeError, match="float"):
        augment_batch((images > 0).to(torch.uint8), IDENTITY, gen())
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        augment_batch(images[0], IDENTITY, gen())
    with pytest.raises(ValueError, match="do not match"):
        augment_batch(images, IDENTITY, gen(), torch.zeros(2, 1, 16, 15))
    with pytest.raises(TypeError, match="masks must be a float"):
        augment_batch(images, IDENTITY, gen(), torch.zeros(2, 1, 16, 16, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"CPU torch\.Generator"):
        augment_batch(images, IDENTITY, None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="parameters for 3 images"):
        apply_params(images, sample_params(3, IDENTITY, gen()))
