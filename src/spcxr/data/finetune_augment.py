"""Batched, on-device augmentation for fine-tuning classifiers and segmenters on chest X-rays.

Pretraining views (:mod:`spcxr.data.augment`) follow the GMML recipe: aggressive random resized
crops and horizontal flips. Fine-tuning needs milder, anatomy-preserving changes: a radiograph
is taken upright, centred and at a roughly known magnification, so the variation worth teaching
is a small rotation (patient tilt), scale (distance, body size), shift (positioning) and
exposure (brightness/contrast). What this module never does:

- **No vertical flip**: radiographs are never displayed upside down.
- **No horizontal flip by default** (``hflip_p=0``): a flip moves the heart to the right of the
  image (dextrocardia look-alike) and swaps the side markers; it is available for studies.

One call per batch: the random parameters of every image are drawn at once from a
``torch.Generator`` **on the CPU** (a fixed 8 uniforms per image, whatever the config) and then
moved to the batch's device, so a given seed gives the same augmentation on CPU and CUDA, and
two configs that differ only in, e.g., the jitter strength see the same geometry. The warp is
one sampling grid (``F.affine_grid``'s, computed faster) + one ``F.grid_sample`` for all
images, with the masks as extra channels of that same call, so images and masks stay aligned.

Normalised space: the images come in already normalised (``(x01 - mean) / std``, mean 0.5,
std 0.25 by default; see :func:`spcxr.data.augment.normalize`). Pixels that the warp brings in
from outside the image take the value ``fill``, by default ``normalize(0) = -2.0``: intensity 0
is "no attenuation", the black of the store's square padding, so a rotated image looks like a
rotated film rather than a film on a grey background.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from spcxr.data.augment import AugmentConfig

#: ``normalize(0)`` with the default normalisation: (0 - 0.5) / 0.25 = -2.0.
DEFAULT_FILL: float = (0.0 - AugmentConfig.mean) / AugmentConfig.std

#: Uniform draws per image: apply, angle, scale, shift x, shift y, flip, brightness, contrast.
N_DRAWS = 8


@dataclass
class FinetuneAugmentConfig:
    """Settings of the fine-tuning augmentation (all zero / ``scale=(1, 1)``: no change).

    Attributes:
        rotate_deg: largest rotation in degrees; the angle is uniform in
            [-rotate_deg, rotate_deg], positive = counter-clockwise on screen (as
            torchvision's ``rotate``).
        scale: range of the zoom factor (uniform); above 1 enlarges the anatomy.
        translate: largest shift along each axis as a fraction of that side (uniform in
            [-translate, translate]); positive moves the content right / down.
        brightness: largest additive shift of intensity, in normalised units (one unit = one
            normalisation std, 0.25 of the [0, 1] range by default); uniform in
            [-brightness, brightness].
        contrast: contrast factor drawn from [1 - contrast, 1 + contrast], scaling each image's
            deviations from its own mean (torchvision's contrast, in normalised space).
        hflip_p: probability of a horizontal flip (0 by default: a flip moves the heart to the
            right of the image). There is no vertical flip.
        p: probability that an image gets the geometric transform (rotation, scale, shift);
            the flip and the intensity jitter are drawn independently of it.
    """

    rotate_deg: float = 10.0
    scale: tuple[float, float] = (0.9, 1.1)
    translate: float = 0.06
    brightness: float = 0.1
    contrast: float = 0.1
    hflip_p: float = 0.0
    p: float = 1.0

    def __post_init__(self) -> None:
        def check(ok: bool, what: str) -> None:
            if not ok:
                raise ValueError(f"FinetuneAugmentConfig: {what}")

        self.scale = tuple(self.scale)
        check(0 <= self.rotate_deg <= 180, f"rotate_deg must be in [0, 180], got {self.rotate_deg}")
        check(
            len(self.scale) == 2 and 0 < self.scale[0] <= self.scale[1],
            f"scale must be (lo, hi) with 0 < lo <= hi, got {self.scale}",
        )
        check(0 <= self.translate < 1, f"translate must be in [0, 1), got {self.translate}")
        check(self.brightness >= 0, f"brightness must be >= 0, got {self.brightness}")
        check(0 <= self.contrast <= 1, f"contrast must be in [0, 1], got {self.contrast}")
        for name in ("hflip_p", "p"):
            value = getattr(self, name)
            check(0 <= value <= 1, f"{name} must be in [0, 1], got {value}")


@dataclass
class FinetuneAugmentParams:
    """The random draws of one batch (one entry per image).

    Attributes:
        angle_deg: float64 ``[B]`` rotation, counter-clockwise on screen (0 where not applied).
        scale: float64 ``[B]`` zoom factor (1 where not applied).
        translate: float64 ``[B, 2]`` shift ``(x, y)`` as fractions of width and height.
        flip: bool ``[B]`` horizontal flip.
        brightness: float64 ``[B]`` additive shift in normalised units.
        contrast: float64 ``[B]`` contrast factor.
    """

    angle_deg: Tensor
    scale: Tensor
    translate: Tensor
    flip: Tensor
    brightness: Tensor
    contrast: Tensor

    def to(self, device: torch.device | str) -> FinetuneAugmentParams:
        """Returns a copy with every tensor on ``device``."""
        return FinetuneAugmentParams(**{k: v.to(device) for k, v in vars(self).items()})


def sample_params(
    batch: int, cfg: FinetuneAugmentConfig, generator: torch.Generator
) -> FinetuneAugmentParams:
    """Draws the parameters of ``batch`` images on the CPU: ``N_DRAWS`` uniforms per image.

    Args:
        batch: number of images.
        cfg: augmentation settings.
        generator: a CPU ``torch.Generator`` (the caller seeds it; the global RNG is not used).

    Returns:
        CPU parameters; :func:`apply_params` moves them to the images' device.
    """
    if not isinstance(generator, torch.Generator) or generator.device.type != "cpu":
        raise ValueError(
            "sample_params: generator must be a CPU torch.Generator (parameters are drawn on "
            "the CPU so that CPU and CUDA runs match), got "
            f"{getattr(generator, 'device', type(generator).__name__)}"
        )
    u = torch.rand(batch, N_DRAWS, generator=generator, dtype=torch.float64)
    apply = u[:, 0] < cfg.p

    def symmetric(col: int, half_width: float) -> Tensor:
        return (2 * u[:, col] - 1) * half_width

    lo, hi = cfg.scale
    angle = torch.where(apply, symmetric(1, cfg.rotate_deg), 0.0)
    scale = torch.where(apply, lo + (hi - lo) * u[:, 2], 1.0)
    shift = torch.stack([symmetric(3, cfg.translate), symmetric(4, cfg.translate)], dim=1)
    return FinetuneAugmentParams(
        angle_deg=angle,
        scale=scale,
        translate=torch.where(apply[:, None], shift, 0.0),
        flip=u[:, 5] < cfg.hflip_p,
        brightness=symmetric(6, cfg.brightness),
        contrast=1 + symmetric(7, cfg.contrast),
    )


def affine_theta(params: FinetuneAugmentParams, height: int, width: int) -> Tensor:
    """Sampling matrices (``F.affine_grid`` convention) of the per-image transforms.

    In pixel coordinates centred on the image (x right, y down) the forward map is
    ``p_out = s R F p_in + t``: flip ``F = diag(+-1, 1)``, rotation ``R`` counter-clockwise on
    screen by ``angle`` (``[[cos, sin], [-sin, cos]]`` with y pointing down), zoom ``s``,
    shift ``t = (tx W, ty H)``, about the image centre. This equals torchvision's
    ``rotate(angle)`` and ``affine(-angle, translate=t, scale=s)`` (``affine`` counts angles
    clockwise); the tests check both. ``affine_grid`` needs the inverse, from output to
    input, in normalised coordinates (``D = diag(W / 2, H / 2)`` pixels per unit with
    ``align_corners=False``): ``theta = [D^-1 A^-1 D | -D^-1 A^-1 t]`` with ``A = s R F``.
    Working in pixels keeps rotations rigid on non-square images.

    Args:
        params: drawn parameters (any device).
        height: image height in pixels.
        width: image width in pixels.

    Returns:
        float64 ``[B, 2, 3]`` on the parameters' device.
    """
    rad = torch.deg2rad(params.angle_deg.double())
    cos, sin = torch.cos(rad), torch.sin(rad)
    sign = torch.where(params.flip, -1.0, 1.0).to(cos)
    inv_s = 1 / params.scale.double()
    # A^-1 = F R^T / s; F flips the sign of the x row.
    a_inv = torch.stack(
        [sign * cos * inv_s, -sign * sin * inv_s, sin * inv_s, cos * inv_s], dim=1
    ).view(-1, 2, 2)
    half = torch.tensor([width / 2, height / 2], dtype=torch.float64, device=cos.device)
    linear = a_inv * half[None, None, :] / half[None, :, None]  # D^-1 A^-1 D
    shift_px = params.translate.double() * (2 * half)  # [B, 2] pixels
    offset = -torch.einsum("bij,bj->bi", a_inv, shift_px) / half  # -D^-1 A^-1 t
    return torch.cat([linear, offset[:, :, None]], dim=2)


def affine_grid(theta: Tensor, height: int, width: int) -> Tensor:
    """``F.affine_grid(theta, [B, 1, H, W], align_corners=False)``, computed by broadcasting.

    Each grid coordinate is ``a * x_col + (b * y_row + c)``: a ``[B, W]`` and a ``[B, H]``
    vector summed into place, where ``affine_grid`` runs a small matrix product per output
    pixel (slower on a CPU, and rounded differently: up to 3e-5 apart, enough to change every
    fine-tuned model's weights). The tests check equality with ``F.affine_grid`` within 1e-6.

    Args:
        theta: ``[B, 2, 3]`` sampling matrices (from :func:`affine_theta`).
        height: output height.
        width: output width.

    Returns:
        ``[B, H, W, 2]`` grid of ``(x, y)`` in normalised input coordinates, theta's dtype.
    """
    kw = {"device": theta.device, "dtype": theta.dtype}
    # Output pixel centres in [-1, 1] (align_corners=False).
    base_x = (2 * torch.arange(width, **kw) + 1) / width - 1
    base_y = (2 * torch.arange(height, **kw) + 1) / height - 1
    coords = [
        (theta[:, i, 0, None] * base_x)[:, None, :]
        + (theta[:, i, 1, None] * base_y + theta[:, i, 2, None])[:, :, None]
        for i in range(2)
    ]
    return torch.stack(coords, dim=-1)


def apply_params(
    images: Tensor,
    params: FinetuneAugmentParams,
    masks: Tensor | None = None,
    *,
    fill: float = DEFAULT_FILL,
) -> tuple[Tensor, Tensor | None]:
    """Warps images (and masks) with drawn parameters, then jitters the images' intensity.

    Geometry: one sampling grid (:func:`affine_grid`) and one bilinear ``grid_sample``
    (``align_corners=False``) for all images, outside pixels set to ``fill`` (the images are
    sampled minus ``fill`` with zero padding, then ``fill`` is added back: bilinear weights
    that fall outside the image blend towards ``fill``, as a constant pad would).

    Masks go through the same ``grid_sample`` call as extra channels (the very same grid and
    weights), bilinear then ``> 0.5``, outside = 0: the threshold puts the boundary where the
    interpolated mask crosses one half, i.e. on the warped outline, and exactly where a
    bilinearly warped image of that mask crosses its mid level. Nearest sampling would snap
    each output pixel to one source pixel and shift boundaries by up to half a pixel relative
    to the bilinear image, in a pattern that depends on the angle.

    Intensity (images only), per image in normalised space:
    ``x' = (x - m) * contrast + m + brightness`` with ``m`` the warped image's mean (fill
    included). No clamp: normalised values have no hard bounds; the shift is small.

    Args:
        images: float ``[B, C, H, W]`` normalised images (C = 1 for CXRs).
        params: parameters from :func:`sample_params` (any device; moved to the images').
        masks: float ``[B, Cm, H, W]`` with values 0/1, or ``None``.
        fill: value of pixels brought in from outside the image; default
            :data:`DEFAULT_FILL` = ``normalize(0)`` = -2.0 for mean 0.5, std 0.25.

    Returns:
        ``(images, masks)`` with the inputs' shapes, dtypes and device (masks 0/1 or ``None``).
    """
    _check_inputs(images, masks)
    batch, channels, height, width = images.shape
    if params.angle_deg.shape[0] != batch:
        raise ValueError(
            f"apply_params: parameters for {params.angle_deg.shape[0]} images, batch of {batch}"
        )
    params = params.to(images.device)
    # bfloat16 / float16 inputs are warped in float32 and cast back.
    work = images.dtype if images.dtype in (torch.float32, torch.float64) else torch.float32
    grid = affine_grid(affine_theta(params, height, width).to(work), height, width)
    source = images.to(work) - fill
    if masks is not None:
        source = torch.cat([source, masks.to(work)], dim=1)
    warped = F.grid_sample(source, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    out = warped[:, :channels].add_(fill)

    # (x - m) c + m + b as one fused pass: c x + (m (1 - c) + b).
    contrast = params.contrast.to(work).view(-1, 1, 1, 1)
    brightness = params.brightness.to(work).view(-1, 1, 1, 1)
    mean = out.mean(dim=(1, 2, 3), keepdim=True)
    out = torch.addcmul(mean * (1 - contrast) + brightness, out, contrast)

    warped_masks = None
    if masks is not None:
        warped_masks = (warped[:, channels:] > 0.5).to(masks.dtype)
    return out.to(images.dtype), warped_masks


def augment_batch(
    images: Tensor,
    cfg: FinetuneAugmentConfig,
    generator: torch.Generator,
    masks: Tensor | None = None,
    *,
    fill: float = DEFAULT_FILL,
) -> tuple[Tensor, Tensor | None]:
    """Augments a batch of normalised images (and their masks) on the batch's device.

    Draws every image's parameters with ``generator`` on the CPU (:func:`sample_params`),
    then warps and jitters all images at once (:func:`apply_params`).

    Args:
        images: float ``[B, 1, H, W]`` normalised images, on any device.
        cfg: augmentation settings.
        generator: seeded CPU ``torch.Generator``; the same seed gives the same result on
            CPU and CUDA (up to floating-point rounding).
        masks: float ``[B, 1, H, W]`` 0/1 masks aligned with the images, or ``None``.
        fill: normalised value of pixels from outside the image (default
            :data:`DEFAULT_FILL` = -2.0, intensity 0).

    Returns:
        ``(images, masks)``: augmented images (same shape, dtype, device) and the masks under
        the same geometry (0/1, same dtype), or ``None``.
    """
    _check_inputs(images, masks)
    params = sample_params(images.shape[0], cfg, generator)
    return apply_params(images, params, masks, fill=fill)


def _check_inputs(images: Tensor, masks: Tensor | None) -> None:
    if not isinstance(images, Tensor):
        raise TypeError(f"augment_batch: images must be a torch.Tensor, got {type(images)}")
    if not images.is_floating_point():
        raise TypeError(
            f"augment_batch: images must be float (normalised), got {images.dtype}; "
            "convert uint8 store images with spcxr.data.augment.eval_transform first"
        )
    if images.ndim != 4 or min(images.shape) == 0:
        raise ValueError(
            f"augment_batch: images must be non-empty [B, C, H, W], got {list(images.shape)}"
        )
    if masks is None:
        return
    if not isinstance(masks, Tensor) or not masks.is_floating_point():
        raise TypeError(
            "augment_batch: masks must be a float tensor of 0/1, got "
            f"{getattr(masks, 'dtype', type(masks).__name__)}"
        )
    if masks.ndim != 4 or masks.shape[0] != images.shape[0] or masks.shape[2:] != images.shape[2:]:
        raise ValueError(
            f"augment_batch: masks of shape {list(masks.shape)} do not match images "
            f"{list(images.shape)} (need [B, Cm, H, W] with the same B, H, W)"
        )
    if masks.device != images.device:
        raise ValueError(f"augment_batch: masks on {masks.device} but images on {images.device}")
