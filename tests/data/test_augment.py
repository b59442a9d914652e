"""Tests of the batched view augmentation against torchvision's semantics, on numbers."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from scipy.stats import ks_2samp
from torchvision.transforms import RandomResizedCrop

from spcxr.data.augment import (
    AugmentConfig,
    ViewParams,
    crop_affine,
    crop_grid,
    denormalize,
    eval_transform,
    gaussian_kernels,
    make_views,
    normalize,
    render_views,
    sample_view_params,
)
from spcxr.rng import BatchRandom

# Only the crop (and flip, where a test sets it): the geometric tests compare pixel positions.
PLAIN = AugmentConfig(flip_p=0.0, jitter_p=0.0, blur_p=0.0)


def gen(seed: int = 0) -> torch.Generator:
    """Generator for test fixtures (not for the code under test)."""
    return torch.Generator().manual_seed(seed)


def rnd(
    batch: int, n_views: int = 2, seed: int = 0, step: int = 0, device: str = "cpu"
) -> BatchRandom:
    """The draws of one step for ``batch`` images x ``n_views`` views held by one process."""
    return BatchRandom.local(seed, step, batch * n_views, device)


def textured(batch: int, size: int, seed: int = 0) -> torch.Tensor:
    """uint8 [B, 1, S, S] images: smooth random blobs plus fine noise, like a textured CXR."""
    g = gen(seed)
    coarse = torch.rand(batch, 1, size // 8, size // 8, generator=g)
    smooth = F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)
    x = 0.8 * smooth + 0.2 * torch.rand(batch, 1, size, size, generator=g)
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)


def unit(images_u8: torch.Tensor) -> torch.Tensor:
    return images_u8.float() / 255


def test_shapes_dtype_and_range() -> None:
    cfg = AugmentConfig(out_size=32, n_views=3)
    views, ids = make_views(textured(4, 64), cfg, rnd(4, 3))
    assert views.shape == (12, 1, 32, 32)
    assert views.dtype == torch.float32
    assert ids.dtype == torch.int64 and ids.shape == (12,)
    x01 = denormalize(views, cfg)
    assert x01.min() >= -1e-6 and x01.max() <= 1 + 1e-6
    assert x01.std() > 0.1  # real content, not a constant


def test_normalize_roundtrip_and_constants() -> None:
    cfg = AugmentConfig()
    x = torch.rand(2, 1, 8, 8)
    assert torch.allclose(denormalize(normalize(x, cfg), cfg), x, atol=1e-6)
    assert normalize(torch.tensor(0.5), cfg) == 0 and normalize(torch.tensor(1.0), cfg) == 2


def test_reproducible_with_fixed_generator() -> None:
    images = textured(4, 64)
    cfg = AugmentConfig(out_size=32, jitter_p=0.5, blur_p=0.5)
    a, ids_a = make_views(images, cfg, rnd(4, seed=7))
    torch.manual_seed(99)  # the global RNG plays no part
    b, ids_b = make_views(images, cfg, rnd(4, seed=7))
    assert torch.equal(a, b) and torch.equal(ids_a, ids_b)
    for other in (rnd(4, seed=8), rnd(4, seed=7, step=1)):  # another seed, another step
        c, _ = make_views(images, cfg, other)
        assert (a - c).abs().mean() > 0.1


def test_views_of_one_image_differ() -> None:
    batch = 8
    views, _ = make_views(textured(batch, 64), AugmentConfig(out_size=32), rnd(batch))
    first, second = views.chunk(2)
    per_image = (first - second).abs().flatten(1).mean(dim=1)
    assert per_image.min() > 0.05


def test_image_ids_order() -> None:
    batch, n_views = 5, 3
    values = torch.tensor([10, 60, 110, 160, 210], dtype=torch.uint8)
    images = values.view(-1, 1, 1, 1).expand(batch, 1, 32, 32).contiguous()
    cfg = AugmentConfig(out_size=16, n_views=n_views, jitter_p=0.0, blur_p=0.5)
    views, ids = make_views(images, cfg, rnd(batch, n_views))
    assert torch.equal(ids, torch.arange(batch).repeat(n_views))
    # Every view of a constant image is that constant: view v * B + i comes from image i.
    x01 = denormalize(views, cfg)
    expected = (values.float() / 255).repeat(n_views).view(-1, 1, 1, 1).expand_as(x01)
    assert torch.allclose(x01, expected, atol=1e-5)


def sample_torchvision_boxes(n: int, size: int, cfg: AugmentConfig) -> torch.Tensor:
    torch.manual_seed(0)
    img = torch.zeros(1, size, size)
    boxes = [
        RandomResizedCrop.get_params(img, list(cfg.crop_scale), list(cfg.crop_ratio))
        for _ in range(n)
    ]
    return torch.tensor(boxes, dtype=torch.float64)


@pytest.mark.parametrize(
    ("scale", "ratio"), [((0.05, 1.0), (3 / 4, 4 / 3)), ((0.3, 1.0), (0.5, 2.0))]
)
def test_crop_distribution_matches_torchvision(
    scale: tuple[float, float], ratio: tuple[float, float]
) -> None:
    size, n = 256, 4000
    cfg = dataclasses.replace(PLAIN, crop_scale=scale, crop_ratio=ratio)
    ours = sample_view_params(n // 2, size, size, cfg, rnd(n // 2)).boxes.double()
    ref = sample_torchvision_boxes(n, size, cfg)

    def stats(boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        area = boxes[:, 2] * boxes[:, 3] / size**2
        return area, torch.log(boxes[:, 3] / boxes[:, 2])

    area, log_ratio = stats(ours)
    ref_area, ref_log_ratio = stats(ref)
    assert abs(area.mean() - ref_area.mean()) < 0.02
    assert ks_2samp(area.numpy(), ref_area.numpy()).pvalue > 0.01
    assert ks_2samp(log_ratio.numpy(), ref_log_ratio.numpy()).pvalue > 0.01
    # Within the configured ranges, up to rounding the sides to whole pixels.
    assert area.min() >= scale[0] * 0.95 and area.max() <= 1.0
    assert log_ratio.min() >= math.log(ratio[0]) - 0.05
    assert log_ratio.max() <= math.log(ratio[1]) + 0.05
    top, left, h, w = ours.T
    assert (top >= 0).all() and (left >= 0).all()
    assert (top + h <= size).all() and (left + w <= size).all()


def test_crop_statistics_without_rejection() -> None:
    # With scale <= 0.5 and ratio <= 4/3 no attempt can exceed the image: area ~ U(0.2, 0.5).
    size, n = 256, 20000
    cfg = dataclasses.replace(PLAIN, crop_scale=(0.2, 0.5))
    boxes = sample_view_params(n, size, size, cfg, rnd(n, seed=3)).boxes.double()
    area = boxes[:, 2] * boxes[:, 3] / size**2
    log_ratio = torch.log(boxes[:, 3] / boxes[:, 2])
    assert abs(area.mean().item() - 0.35) < 0.005
    assert abs(area.std().item() - 0.3 / math.sqrt(12)) < 0.005
    assert 0.195 < area.min() < 0.21 and 0.49 < area.max() < 0.505
    assert abs(log_ratio.mean().item()) < 0.01
    # Offsets are uniform over the free range: the box centres average to the image centre.
    centre = (boxes[:, 1] + boxes[:, 3] / 2).mean().item()
    assert abs(centre - size / 2) < 1.0


@pytest.mark.parametrize(
    ("height", "width", "ratio"), [(100, 100, (2.0, 3.0)), (60, 100, (0.25, 1 / 3))]
)
def test_fallback_is_torchvisions_centre_crop(
    height: int, width: int, ratio: tuple[float, float]
) -> None:
    # No attempt can fit, so every view takes the fallback (deterministic in torchvision).
    cfg = dataclasses.replace(PLAIN, crop_scale=(0.9, 1.0), crop_ratio=ratio)
    boxes = sample_view_params(6, height, width, cfg, rnd(6)).boxes
    ref = RandomResizedCrop.get_params(torch.zeros(1, height, width), [0.9, 1.0], list(ratio))
    assert (boxes == torch.tensor(ref)).all()


def test_full_crop_equals_plain_resize() -> None:
    images = textured(3, 256)
    cfg = dataclasses.replace(PLAIN, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0))
    views, _ = make_views(images, cfg, rnd(3))
    expected = F.interpolate(unit(images), size=224, mode="bilinear", align_corners=False)
    assert torch.allclose(denormalize(views, cfg)[:3], expected, atol=1e-5)
    assert torch.allclose(denormalize(views, cfg)[3:], expected, atol=1e-5)


def test_crop_grid_equals_affine_grid() -> None:
    cfg = dataclasses.replace(PLAIN, flip_p=0.5)
    params = sample_view_params(16, 80, 120, cfg, rnd(16))
    theta = crop_affine(params.boxes, params.flip, 80, 120)
    expected = F.affine_grid(theta.float(), [32, 1, 40, 40], align_corners=False)
    assert torch.allclose(crop_grid(theta, 40), expected, atol=1e-6)


def test_crop_affine_puts_output_pixel_centres_on_the_box() -> None:
    """Output pixel j samples source x = left + (j + 0.5) w / out - 0.5 (mirrored when flipped)."""
    cfg = dataclasses.replace(PLAIN, flip_p=0.5)
    params = sample_view_params(16, 80, 120, cfg, rnd(16))
    theta = crop_affine(params.boxes, params.flip, 80, 120)
    grid = F.affine_grid(theta, [32, 1, 40, 40], align_corners=False)
    x_px = (grid[..., 0] + 1) * 120 / 2 - 0.5  # [N, 40, 40] source pixel coordinates
    y_px = (grid[..., 1] + 1) * 80 / 2 - 0.5
    top, left, h, w = params.boxes.double().unbind(dim=1)
    steps = (torch.arange(40, dtype=torch.float64) + 0.5) / 40  # [40]
    along_x = torch.where(params.flip[:, None], 1 - steps, steps)  # [N, 40]
    expected_x = left[:, None] + along_x * w[:, None] - 0.5
    expected_y = top[:, None] + steps * h[:, None] - 0.5
    torch.testing.assert_close(x_px, expected_x[:, None, :].expand_as(x_px))
    torch.testing.assert_close(y_px, expected_y[:, :, None].expand_as(y_px))


def test_forced_flip_mirrors_exactly() -> None:
    images = textured(4, 64)
    cfg = AugmentConfig(
        out_size=64, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_p=1.0, jitter_p=0, blur_p=0
    )
    views, _ = make_views(images, cfg, rnd(4))
    expected = torch.flip(unit(images), dims=[-1]).repeat(2, 1, 1, 1)
    assert torch.allclose(denormalize(views, cfg), expected, atol=1e-5)


def test_flip_mirrors_any_view() -> None:
    # The same draws with flip_p 1 vs 0 give mirrored views (jitter and blur commute with it).
    images = textured(4, 64)
    cfg = AugmentConfig(out_size=32, jitter_p=0.5, blur_p=0.5)
    flipped, _ = make_views(images, dataclasses.replace(cfg, flip_p=1.0), rnd(4, seed=5))
    plain, _ = make_views(images, dataclasses.replace(cfg, flip_p=0.0), rnd(4, seed=5))
    assert torch.allclose(flipped, torch.flip(plain, dims=[-1]), atol=1e-5)
    assert (flipped - plain).abs().mean() > 0.05


@pytest.mark.parametrize(("size", "out"), [(96, 48), (256, 32)])
def test_crop_geometry_bright_dot(size: int, out: int) -> None:
    """A blob at a known pixel lands where the sampled box and flip say it should."""
    batch, sigma = 8, 2.5
    g = gen(11)
    centres = 20 + torch.rand(batch, 2, generator=g) * (size - 40)  # (row, col), sub-pixel
    coords = torch.arange(size, dtype=torch.float32)
    dy = coords.view(1, -1, 1) - centres[:, 0].view(-1, 1, 1)
    dx = coords.view(1, 1, -1) - centres[:, 1].view(-1, 1, 1)
    blob = torch.exp(-(dx**2 + dy**2) / (2 * sigma**2))
    images = (blob * 255).round().to(torch.uint8).unsqueeze(1)

    cfg = AugmentConfig(
        out_size=out, n_views=8, crop_scale=(0.05, 0.6), flip_p=0.5, jitter_p=0, blur_p=0
    )
    params = sample_view_params(batch, size, size, cfg, rnd(batch, 8, seed=12))
    views = denormalize(render_views(images, params, cfg), cfg)[:, 0]  # [N, out, out]

    row, col = centres[params.image_ids].unbind(dim=1)
    top, left, h, w = params.boxes.float().unbind(dim=1)
    margin = 4 * sigma
    inside = (
        (row - margin > top)
        & (row + margin < top + h)
        & (col - margin > left)
        & (col + margin < left + w)
    )
    assert inside.sum() >= 8 and (~inside).sum() >= 8  # both cases are exercised
    # Expected position in output pixel-index coordinates (centre of pixel j at j).
    exp_row = (row + 0.5 - top) / h * out - 0.5
    exp_col = (col + 0.5 - left) / w * out - 0.5
    exp_col = torch.where(params.flip, out - 1 - exp_col, exp_col)
    grid = torch.arange(out, dtype=torch.float32)
    mass = views.sum(dim=(1, 2))
    got_row = (views.sum(dim=2) * grid).sum(dim=1) / mass
    got_col = (views.sum(dim=1) * grid).sum(dim=1) / mass
    assert (got_row - exp_row)[inside].abs().max() < 0.25
    assert (got_col - exp_col)[inside].abs().max() < 0.25
    # Views whose box misses the blob entirely are dark.
    far = (row + margin < top) | (row - margin > top + h) | (col + margin < left)
    far |= col - margin > left + w
    assert views[far].max() < 0.01


def test_antialias_suppresses_aliasing() -> None:
    # Pixel noise downscaled 256 -> 56: correct resampling averages it away, plain bilinear not.
    images = (torch.rand(4, 1, 256, 256, generator=gen()) * 255).round().to(torch.uint8)
    cfg = dataclasses.replace(PLAIN, out_size=56, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0))
    ours = denormalize(make_views(images, cfg, rnd(4))[0], cfg)
    naive = denormalize(
        make_views(images, dataclasses.replace(cfg, antialias=False), rnd(4))[0], cfg
    )
    ref = F.interpolate(unit(images), size=56, mode="bilinear", antialias=True)
    assert naive.std() > 0.15  # aliased: pixel noise survives
    assert ours.std() < 0.3 * naive.std()
    assert ours.std() < 2 * ref.std()
    # On textured content the pyramid is close to torchvision's antialiased resize.
    images = textured(4, 256)
    ref = F.interpolate(unit(images), size=56, mode="bilinear", antialias=True)
    ours = denormalize(make_views(images, cfg, rnd(4))[0], cfg)[:4]
    naive = denormalize(
        make_views(images, dataclasses.replace(cfg, antialias=False), rnd(4))[0], cfg
    )[:4]
    assert (ours - ref).abs().mean() < 0.015
    assert (ours - ref).abs().mean() < 0.5 * (naive - ref).abs().mean()


def test_jitter_frequency_and_factor_bounds() -> None:
    n = 20000
    params = sample_view_params(n, 64, 64, AugmentConfig(), rnd(n))
    assert abs(params.jitter.float().mean().item() - 0.3) < 0.015
    assert abs(params.contrast_first.float().mean().item() - 0.5) < 0.015
    for factor in (params.brightness, params.contrast):
        assert factor.min() >= 0.9 and factor.max() <= 1.1
        assert factor.min() < 0.901 and factor.max() > 1.099
        assert abs(factor.mean().item() - 1.0) < 0.002


def test_jitter_matches_torchvision() -> None:
    images = textured(4, 64)
    cfg = AugmentConfig(out_size=32, n_views=4, jitter_p=1.0, brightness=0.6, contrast=0.6)
    cfg = dataclasses.replace(cfg, blur_p=0.0)
    params = sample_view_params(4, 64, 64, cfg, rnd(4, 4, seed=2))
    jittered = denormalize(render_views(images, params, cfg), cfg)
    plain_params = dataclasses.replace(params, jitter=torch.zeros_like(params.jitter))
    plain = denormalize(render_views(images, plain_params, cfg), cfg)
    assert params.contrast_first.any() and not params.contrast_first.all()
    clamped = 0
    for v in range(plain.shape[0]):
        b, c = params.brightness[v].item(), params.contrast[v].item()
        x = plain[v]
        if params.contrast_first[v]:
            ref = TF.adjust_brightness(TF.adjust_contrast(x, c), b)
        else:
            ref = TF.adjust_contrast(TF.adjust_brightness(x, b), c)
        assert torch.allclose(jittered[v], ref, atol=1e-5)
        clamped += int((ref == 1).any() or (ref == 0).any())
    assert clamped > 0  # the clamps (where the order matters) were exercised


def test_blur_frequency_and_sigma_range() -> None:
    params = sample_view_params(20000, 64, 64, AugmentConfig(), rnd(20000))
    assert abs(params.blur.float().mean().item() - 0.1) < 0.01
    assert params.sigma.min() >= 0.1 and params.sigma.max() <= 2.0
    assert abs(params.sigma.mean().item() - 1.05) < 0.02


def test_blurred_constant_stays_constant() -> None:
    images = torch.full((3, 1, 48, 48), 77, dtype=torch.uint8)
    cfg = AugmentConfig(out_size=32, blur_p=1.0, jitter_p=0.0)
    x01 = denormalize(make_views(images, cfg, rnd(3))[0], cfg)
    assert torch.allclose(x01, torch.full_like(x01, 77 / 255), atol=1e-5)


def test_blur_reduces_high_frequency_energy() -> None:
    images = (torch.rand(4, 1, 64, 64, generator=gen()) * 255).round().to(torch.uint8)
    cfg = AugmentConfig(out_size=64, jitter_p=0.0, blur_sigma=(0.8, 2.0))
    blurred, _ = make_views(images, dataclasses.replace(cfg, blur_p=1.0), rnd(4, seed=4))
    sharp, _ = make_views(images, dataclasses.replace(cfg, blur_p=0.0), rnd(4, seed=4))

    def hf_energy(x: torch.Tensor) -> torch.Tensor:
        dx = x[..., :, 1:] - x[..., :, :-1]
        dy = x[..., 1:, :] - x[..., :-1, :]
        return dx.pow(2).flatten(1).mean(1) + dy.pow(2).flatten(1).mean(1)

    assert (hf_energy(blurred) < 0.5 * hf_energy(sharp)).all()


def test_blur_matches_torchvision_per_sample() -> None:
    images = textured(4, 64)
    cfg = AugmentConfig(out_size=40, n_views=2, jitter_p=0.0, blur_p=1.0)
    params = sample_view_params(4, 64, 64, cfg, rnd(4, seed=9))
    params.sigma[:2] = torch.tensor([0.1, 2.0])  # the range's ends: radius 1 and 6
    blurred = denormalize(render_views(images, params, cfg), cfg)
    no_blur = dataclasses.replace(params, blur=torch.zeros_like(params.blur))
    plain = denormalize(render_views(images, no_blur, cfg), cfg)
    for v in range(plain.shape[0]):
        sigma = params.sigma[v].item()
        size = 2 * math.ceil(3 * sigma) + 1
        ref = TF.gaussian_blur(plain[v], kernel_size=[size, size], sigma=[sigma, sigma])
        assert torch.allclose(blurred[v], ref, atol=1e-5)
    assert (blurred - plain).abs().mean() > 0.005


def test_gaussian_kernels_are_normalised_and_truncated() -> None:
    sigma = torch.tensor([0.1, 0.5, 2.0])
    kernels = gaussian_kernels(sigma, radius=6)
    assert kernels.shape == (3, 13)
    assert torch.allclose(kernels.sum(dim=1), torch.ones(3))
    # Kernel sizes 3, 5 and 13: taps beyond ceil(3 sigma) are zero.
    assert (kernels[0, :5] == 0).all() and (kernels[1, :4] == 0).all() and (kernels[2] > 0).all()
    assert torch.equal(kernels, kernels.flip(dims=[1]))


def test_eval_transform_is_deterministic_resize() -> None:
    images = textured(2, 96)
    cfg = AugmentConfig()
    out = eval_transform(images, 64, cfg)
    assert out.shape == (2, 1, 64, 64) and torch.equal(out, eval_transform(images, 64, cfg))
    ref = F.interpolate(unit(images), size=64, mode="bilinear", antialias=True)
    assert torch.allclose(denormalize(out, cfg), ref, atol=1e-5)
    assert torch.allclose(denormalize(eval_transform(images, 96, cfg), cfg), unit(images))


def test_bad_inputs_raise_clear_errors() -> None:
    cfg = AugmentConfig(out_size=16)
    with pytest.raises(TypeError, match="make_views: expected uint8"):
        make_views(torch.rand(2, 1, 32, 32), cfg, rnd(2))
    with pytest.raises(ValueError, match=r"\[B, 1, H, W\]"):
        make_views(torch.zeros(2, 3, 32, 32, dtype=torch.uint8), cfg, rnd(2))
    with pytest.raises(ValueError, match="BatchRandom draws on cpu but images are on meta"):
        make_views(torch.zeros(2, 1, 32, 32, dtype=torch.uint8, device="meta"), cfg, rnd(2))
    with pytest.raises(ValueError, match=r"draws for 6 views, but 2 images x 2 views = 4"):
        make_views(torch.zeros(2, 1, 32, 32, dtype=torch.uint8), cfg, rnd(3))
    with pytest.raises(TypeError, match="BatchRandom, got Generator"):
        sample_view_params(2, 32, 32, cfg, gen())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="crop_scale"):
        AugmentConfig(crop_scale=(0.5, 0.2))
    with pytest.raises(ValueError, match="flip_p"):
        AugmentConfig(flip_p=1.5)
    with pytest.raises(ValueError, match="radius 6 < out_size 4"):
        AugmentConfig(out_size=4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu() -> None:
    images = textured(8, 128)
    cfg = AugmentConfig(out_size=56, jitter_p=0.5, blur_p=0.5)
    params = sample_view_params(8, 128, 128, cfg, rnd(8))
    cpu = render_views(images, params, cfg)
    cuda = render_views(images.cuda(), params.to("cuda"), cfg)
    assert torch.allclose(cpu, cuda.cpu(), atol=1e-4)
    a, ids = make_views(images.to("cuda:0"), cfg, rnd(8, seed=1, device="cuda"))
    b, _ = make_views(images.cuda(), cfg, rnd(8, seed=1, device="cuda"))
    assert a.is_cuda and ids.is_cuda and torch.equal(a, b)
    # The parameters are drawn on the CPU for both: identical on either device.
    on_cuda = sample_view_params(8, 128, 128, cfg, rnd(8, seed=1, device="cuda"))
    on_cpu = sample_view_params(8, 128, 128, cfg, rnd(8, seed=1))
    assert all(torch.equal(getattr(on_cuda, k).cpu(), getattr(on_cpu, k)) for k in vars(on_cpu))
    assert torch.allclose(a.cpu(), make_views(images, cfg, rnd(8, seed=1))[0], atol=1e-4)


def test_view_params_to_keeps_values() -> None:
    params = sample_view_params(3, 32, 32, AugmentConfig(out_size=16), rnd(3))
    moved = params.to("cpu")
    assert isinstance(moved, ViewParams)
    assert all(torch.equal(getattr(params, k), getattr(moved, k)) for k in vars(params))


@pytest.mark.parametrize("size", [40, 128])  # one pyramid level, three levels
def test_two_process_split_equals_one_process(size: int) -> None:
    """Process p of 2, holding images p*B/2 .. (p+1)*B/2 - 1, renders exactly those views of
    one process holding all B images (view v of global image j at global position v*B + j)."""
    batch, n_views = 8, 3
    images = textured(batch, size, seed=4)
    cfg = AugmentConfig(out_size=32, n_views=n_views, jitter_p=0.5, blur_p=0.5)
    full_rnd = BatchRandom.for_views(
        3, 17, n_views=n_views, global_batch=batch, first_image=0, local_batch=batch
    )
    full, full_ids = make_views(images, cfg, full_rnd)
    full_params = sample_view_params(batch, size, size, cfg, full_rnd)
    assert full_params.jitter.any() and full_params.blur.any() and full_params.flip.any()
    half = batch // 2
    for p in range(2):
        part_rnd = BatchRandom.for_views(
            3, 17, n_views=n_views, global_batch=batch, first_image=p * half, local_batch=half
        )
        idx = part_rnd.index
        part, part_ids = make_views(images[p * half : (p + 1) * half], cfg, part_rnd)
        assert torch.equal(part, full[idx])
        assert torch.equal(part_ids + p * half, full_ids[idx])  # local image numbering
        params = sample_view_params(half, size, size, cfg, part_rnd)
        for name in vars(params):
            if name != "image_ids":
                assert torch.equal(getattr(params, name), getattr(full_params, name)[idx]), name
