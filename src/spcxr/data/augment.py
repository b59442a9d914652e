"""Batched, on-device view augmentation for GMML pretraining.

Loader workers only slice the prepared store, so a batch reaches the training device as uint8
``[B, 1, S, S]``; this module turns it into ``n_views`` augmented, normalised views per image
with a handful of batched tensor operations (no per-image Python loop). The recipe is the GMML
reference's per-view torchvision pipeline (Atito et al., ICIP 2023; SPCXR, arXiv 2211.12944):
``RandomResizedCrop`` -> ``RandomHorizontalFlip`` -> ``RandomApply(ColorJitter)`` -> random
Gaussian blur -> ``Normalize``, each step with torchvision's semantics. Parameters come from a
:class:`~spcxr.rng.BatchRandom` (a function of seed, step, stream and global view index only).
Details and measured speed: ``docs/internals.md``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from spcxr.rng import BatchRandom

# torchvision's RandomResizedCrop tries this many (area, ratio) draws before its fallback.
_CROP_ATTEMPTS = 10


@dataclass
class AugmentConfig:
    """Settings of the view augmentation (defaults: the GMML reference, METHOD.md section 1).

    Attributes:
        out_size: side of the square output views (ViT input size).
        n_views: views per image (reference: 2).
        crop_scale: range of the crop's area as a fraction of the image. The reference uses
            (0.05, 1.0) when no local crops are used; a CXR-specific range (e.g. (0.3, 1.0),
            keeping more anatomical context per view) is a choice left to the user.
        crop_ratio: range of the crop's width / height.
        flip_p: probability of a horizontal flip. Kept at the reference's 0.5 although a flip
            puts the heart on the right of the image (dextrocardia look-alike); set 0 to avoid.
        jitter_p: probability that a view gets brightness/contrast jitter.
        brightness: brightness factor drawn from [max(0, 1 - b), 1 + b].
        contrast: contrast factor drawn from [max(0, 1 - c), 1 + c].
        blur_p: probability that a view is Gaussian-blurred.
        blur_sigma: range of the blur's standard deviation, in output pixels.
        mean: intensity mean subtracted after augmentation (intensities in [0, 1]).
        std: intensity scale divided out after augmentation. ``mean=0.5, std=0.25`` is a round
            version of what real CXRs measure (200 images per source, intensities in [0, 1]:
            Kermany 0.48 / 0.24, Shenzhen 0.62 / 0.25, ieee8023 0.52 / 0.22; before any
            square padding, which darkens the mean a little), so normalised
            views have roughly zero mean and unit variance. That matters beyond optimisation:
            GMML's default corruption is N(0, 1) noise *in normalised space*, so ``std`` sets
            how strong that noise is relative to anatomy. ImageNet's constants do not apply to
            a single grey channel; whatever is used here must also be used at fine-tuning and
            inference (see :func:`eval_transform`).
        antialias: low-pass the source before downscaling by a factor of 2 or more (see
            :func:`render_views`); torchvision's resize antialiases too.
    """

    out_size: int = 224
    n_views: int = 2
    crop_scale: tuple[float, float] = (0.05, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    jitter_p: float = 0.3
    brightness: float = 0.1
    contrast: float = 0.1
    blur_p: float = 0.1
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    mean: float = 0.5
    std: float = 0.25
    antialias: bool = True

    def __post_init__(self) -> None:
        def check(ok: bool, what: str) -> None:
            if not ok:
                raise ValueError(f"AugmentConfig: {what}")

        check(self.out_size >= 1, f"out_size must be >= 1, got {self.out_size}")
        check(self.n_views >= 1, f"n_views must be >= 1, got {self.n_views}")
        lo, hi = self.crop_scale
        check(0 < lo <= hi <= 1, f"crop_scale must satisfy 0 < lo <= hi <= 1, got {(lo, hi)}")
        lo, hi = self.crop_ratio
        check(0 < lo <= hi, f"crop_ratio must satisfy 0 < lo <= hi, got {(lo, hi)}")
        for name in ("flip_p", "jitter_p", "blur_p"):
            p = getattr(self, name)
            check(0 <= p <= 1, f"{name} must be in [0, 1], got {p}")
        check(self.brightness >= 0, f"brightness must be >= 0, got {self.brightness}")
        check(self.contrast >= 0, f"contrast must be >= 0, got {self.contrast}")
        lo, hi = self.blur_sigma
        check(0 < lo <= hi, f"blur_sigma must satisfy 0 < lo <= hi, got {(lo, hi)}")
        # Reflect padding needs the blur radius to be smaller than the image side.
        check(
            blur_radius(hi) < self.out_size,
            f"blur_sigma max {hi} needs a radius {blur_radius(hi)} < out_size {self.out_size}",
        )
        check(self.std > 0, f"std must be > 0, got {self.std}")


@dataclass
class ViewParams:
    """The random draws behind a batch of views (one row per view, layout ``v * B + i``).

    Attributes:
        image_ids: int64 ``[N]``, source image of each view.
        boxes: int64 ``[N, 4]``, crop box ``(top, left, height, width)`` in source pixels, as
            returned by torchvision's ``RandomResizedCrop.get_params``.
        flip: bool ``[N]``, horizontal flip.
        jitter: bool ``[N]``, brightness/contrast jitter applied.
        brightness: float ``[N]``, brightness factor (used where ``jitter``).
        contrast: float ``[N]``, contrast factor (used where ``jitter``).
        contrast_first: bool ``[N]``, contrast is applied before brightness.
        blur: bool ``[N]``, Gaussian blur applied.
        sigma: float ``[N]``, blur standard deviation in output pixels (used where ``blur``).
    """

    image_ids: Tensor
    boxes: Tensor
    flip: Tensor
    jitter: Tensor
    brightness: Tensor
    contrast: Tensor
    contrast_first: Tensor
    blur: Tensor
    sigma: Tensor

    def to(self, device: torch.device | str) -> ViewParams:
        """Returns a copy with every tensor on ``device``."""
        return ViewParams(**{k: v.to(device) for k, v in vars(self).items()})


def blur_radius(sigma: float | Tensor) -> int | Tensor:
    """Half-width of the blur kernel, ``ceil(3 sigma)``: kernel size ``2 ceil(3 sigma) + 1``."""
    if isinstance(sigma, Tensor):
        return torch.ceil(3 * sigma).long()
    return math.ceil(3 * sigma)


def normalize(x01: Tensor, cfg: AugmentConfig) -> Tensor:
    """Maps intensities in [0, 1] to the model's input space: ``(x - mean) / std``."""
    return (x01 - cfg.mean) / cfg.std


def denormalize(x: Tensor, cfg: AugmentConfig) -> Tensor:
    """Inverse of :func:`normalize`: model space back to intensities in [0, 1]."""
    return x * cfg.std + cfg.mean


def make_views(images_u8: Tensor, cfg: AugmentConfig, rnd: BatchRandom) -> tuple[Tensor, Tensor]:
    """Draws ``cfg.n_views`` augmented, normalised views of every image of a batch.

    Args:
        images_u8: uint8 ``[B, 1, H, W]`` on the training device (square in practice).
        cfg: augmentation settings.
        rnd: the step's random draws for the ``B * n_views`` views of this batch, on the images'
            device (``BatchRandom.for_views`` under DistributedDataParallel,
            ``BatchRandom.local`` on one process).

    Returns:
        ``(views, image_ids)``: float32 ``[B * n_views, 1, out, out]`` normalised views and int64
        ``[B * n_views]`` source indices (into ``images_u8``); view ``v`` of image ``i`` is at
        ``v * B + i``.
    """
    _check_images(images_u8, "make_views")
    rd, dev = rnd.device, images_u8.device
    if rd.type != dev.type or (rd.index is not None and dev.index is not None and rd != dev):
        raise ValueError(
            f"make_views: BatchRandom draws on {rnd.device} but images are on "
            f"{images_u8.device}; build it with device= the images' device"
        )
    batch, _, height, width = images_u8.shape
    params = sample_view_params(batch, height, width, cfg, rnd)
    return render_views(images_u8, params, cfg), params.image_ids


def sample_view_params(
    batch: int, height: int, width: int, cfg: AugmentConfig, rnd: BatchRandom
) -> ViewParams:
    """Draws the random parameters of ``batch * cfg.n_views`` views of ``height x width`` images.

    Args:
        batch: number of source images B (of this process).
        height: source image height in pixels.
        width: source image width in pixels.
        cfg: augmentation settings.
        rnd: the step's random draws, ``rnd.count == batch * cfg.n_views``; row ``k`` of every
            draw belongs to view ``k``. The parameters live on ``rnd.device``.

    Returns:
        The parameters, one row per view in the ``v * B + i`` layout.
    """
    if not isinstance(rnd, BatchRandom):
        raise TypeError(
            f"sample_view_params: expected a spcxr.rng.BatchRandom, got {type(rnd).__name__}"
        )
    n = batch * cfg.n_views
    if rnd.count != n:
        raise ValueError(
            f"sample_view_params: the BatchRandom draws for {rnd.count} views, but {batch} "
            f"images x {cfg.n_views} views = {n}"
        )

    def uniform(stream: str, *shape: int) -> Tensor:
        return rnd.rand(stream, *shape, dtype=torch.float64)

    # A fixed amount per view, independent of the probabilities (see module docstring).
    crop_u = uniform("aug/crop", _CROP_ATTEMPTS, 2)  # [N, T, 2]: area fraction, log ratio
    offset_u = uniform("aug/offset", 2)  # [N, 2]: top, left
    boxes = _crop_boxes(crop_u, offset_u, height, width, cfg)

    b, c = cfg.brightness, cfg.contrast
    s_lo, s_hi = cfg.blur_sigma
    return ViewParams(
        image_ids=torch.arange(batch, device=rnd.device).repeat(cfg.n_views),
        boxes=boxes,
        flip=uniform("aug/flip") < cfg.flip_p,
        jitter=uniform("aug/jitter") < cfg.jitter_p,
        brightness=(max(0.0, 1 - b) + (1 + b - max(0.0, 1 - b)) * uniform("aug/bright")).float(),
        contrast=(max(0.0, 1 - c) + (1 + c - max(0.0, 1 - c)) * uniform("aug/contrast")).float(),
        contrast_first=uniform("aug/order") < 0.5,
        blur=uniform("aug/blur") < cfg.blur_p,
        sigma=(s_lo + (s_hi - s_lo) * uniform("aug/sigma")).float(),
    )


def _crop_boxes(
    crop_u: Tensor, offset_u: Tensor, height: int, width: int, cfg: AugmentConfig
) -> Tensor:
    """Vectorised ``RandomResizedCrop.get_params``: ``[N, T, 2]`` and ``[N, 2]`` uniforms -> boxes.

    Returns:
        int64 ``[N, 4]`` boxes ``(top, left, height, width)``.
    """
    area = height * width
    s_lo, s_hi = cfg.crop_scale
    log_lo, log_hi = math.log(cfg.crop_ratio[0]), math.log(cfg.crop_ratio[1])
    target_area = area * (s_lo + (s_hi - s_lo) * crop_u[..., 0])  # [N, T]
    aspect = torch.exp(log_lo + (log_hi - log_lo) * crop_u[..., 1])  # [N, T]
    # torch.round rounds half to even, as Python's round() in torchvision does.
    w = torch.round(torch.sqrt(target_area * aspect)).long()
    h = torch.round(torch.sqrt(target_area / aspect)).long()
    valid = (w > 0) & (w <= width) & (h > 0) & (h <= height)  # [N, T]
    first = valid.int().argmax(dim=1, keepdim=True)  # first valid attempt (0 if none)
    w = w.gather(1, first).squeeze(1)
    h = h.gather(1, first).squeeze(1)
    top = torch.floor(offset_u[:, 0] * (height - h + 1)).long().clamp_max(height - h)
    left = torch.floor(offset_u[:, 1] * (width - w + 1)).long().clamp_max(width - w)

    fb_top, fb_left, fb_h, fb_w = _fallback_box(height, width, cfg.crop_ratio)
    ok = valid.any(dim=1)
    boxes = torch.stack([top, left, h, w], dim=1)
    fallback = torch.tensor([fb_top, fb_left, fb_h, fb_w], device=boxes.device)
    return torch.where(ok[:, None], boxes, fallback)


def _fallback_box(height: int, width: int, ratio: tuple[float, float]) -> tuple[int, int, int, int]:
    """torchvision's fallback after failed attempts: the centre crop with the ratio clamped."""
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        h, w = height, round(height * ratio[1])
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


def render_views(images_u8: Tensor, params: ViewParams, cfg: AugmentConfig) -> Tensor:
    """Applies drawn parameters: crop + resize + flip, jitter, blur, normalise.

    Crop, resize and flip are one bilinear ``grid_sample`` (``align_corners=False``) over the
    sampling grid of :func:`crop_grid`; border padding makes a full-image crop equal
    ``F.interpolate``. A crop box's edge pixels are interpolated with their neighbours outside
    the box (torchvision crops first, then resizes, clamping at the box edge): a sub-pixel
    difference at the view border only.

    Bilinear sampling from a crop much larger than the output aliases (it reads 2x2 pixels
    however large the footprint), while torchvision's resize antialiases. With
    ``cfg.antialias`` the source is turned into a small pyramid (level L: an antialiased bilinear
    resize of the source to 1 / 2**L, as torchvision's) and each view samples the level that
    leaves it a downscale factor in [1, 2) along its longer box side, as in mip-mapping
    (rounding down keeps views sharp; factors just below 2 alias a little). Against
    torchvision's antialiased resize of a textured 256 px image to 56 px, the mean absolute
    error is 0.012 (plain bilinear sampling: 0.037). The level count is static: with S=256 and
    out=224 the largest factor is 1.14, so there is one level and no cost; it matters for larger
    stores (S=512, 1024). Levels span the same extent as the source in normalised coordinates,
    so one grid serves every level.

    Views to jitter, to blur and (with several levels) per level are picked with
    ``torch.nonzero``: up to ``2 + levels`` host syncs per batch on CUDA, in exchange for not
    convolving or jittering the 70-90% of views that need neither (it halves the CPU time).

    Args:
        images_u8: uint8 ``[B, 1, H, W]``.
        params: view parameters on the same device (from :func:`sample_view_params`).
        cfg: augmentation settings (``out_size``, ``antialias``, normalisation).

    Returns:
        float32 ``[N, 1, out, out]`` normalised views.
    """
    _check_images(images_u8, "render_views")
    if params.boxes.device != images_u8.device:
        raise ValueError(
            f"render_views: params on {params.boxes.device} but images on {images_u8.device}"
        )
    height, width = images_u8.shape[-2:]
    out = cfg.out_size
    theta = crop_affine(params.boxes, params.flip, height, width)  # [N, 2, 3]
    grid = crop_grid(theta, out)  # [N, out, out, 2]
    n_levels = _pyramid_levels(height, width, out) if cfg.antialias else 1
    if n_levels == 1:
        views = _sample(images_u8, params.image_ids, grid)
    else:
        # Level whose remaining downscale factor (longer box side / out) is in [1, 2).
        factor = params.boxes[:, 2:].amax(dim=1).float() / out  # [N]
        level = torch.floor(torch.log2(factor)).long().clamp(0, n_levels - 1)  # [N]
        views = grid.new_empty(grid.shape[0], 1, out, out)
        full = _to_unit(images_u8)
        for lv in range(n_levels):  # a few levels, not a loop over images
            sel = torch.nonzero(level == lv).squeeze(1)
            if sel.numel() == 0:
                continue
            source = images_u8
            if lv > 0:
                # Straight from full resolution: one filter, less blur than repeated halving.
                size = ((height + 2**lv - 1) >> lv, (width + 2**lv - 1) >> lv)
                source = F.interpolate(full, size=size, mode="bilinear", antialias=True)
            views[sel] = _sample(source, params.image_ids[sel], grid[sel])

    views = _jitter(views, params)
    views = _blur(views, params, cfg)
    return views.sub_(cfg.mean).div_(cfg.std)  # normalize(), in place


def _pyramid_levels(height: int, width: int, out: int) -> int:
    """Levels needed so that no view downscales by 2 or more: 1 + floor(log2(max side / out))."""
    return 1 + max(0, math.floor(math.log2(max(height, width) / out)))


def _to_unit(images: Tensor) -> Tensor:
    """uint8 -> float32 in [0, 1]; float images pass through."""
    return images.float().div_(255) if images.dtype == torch.uint8 else images


def _sample(source: Tensor, image_ids: Tensor, grid: Tensor) -> Tensor:
    """Bilinear sampling of each view's source image (gathered as uint8 if possible) at its grid."""
    images = _to_unit(source.index_select(0, image_ids))  # [n, 1, H, W]
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def crop_affine(boxes: Tensor, flip: Tensor, height: int, width: int) -> Tensor:
    """Affine matrices (``F.affine_grid`` convention) mapping each view onto its crop box.

    With ``align_corners=False`` the image edges are at -1 and 1, so the box
    ``[left, left + w)`` spans ``[2 left / W - 1, 2 (left + w) / W - 1]``: x scale ``w / W``,
    centre ``(2 left + w) / W - 1`` (likewise for y). A flip negates the x scale: a mirror
    about the box centre, folded into the same matrix.

    Args:
        boxes: int64 ``[N, 4]`` crop boxes ``(top, left, height, width)`` in source pixels.
        flip: bool ``[N]`` horizontal flips.
        height: source height.
        width: source width.

    Returns:
        float64 ``[N, 2, 3]`` matrices ``[[sx, 0, cx], [0, sy, cy]]``.
    """
    top, left, h, w = boxes.double().unbind(dim=1)
    sx = torch.where(flip, -w / width, w / width)
    zero = torch.zeros_like(sx)
    cx = (2 * left + w) / width - 1
    cy = (2 * top + h) / height - 1
    return torch.stack([sx, zero, cx, zero, h / height, cy], dim=1).view(-1, 2, 3)


def crop_grid(theta: Tensor, out: int) -> Tensor:
    """``F.affine_grid(theta, [N, 1, out, out], align_corners=False)`` for axis-aligned ``theta``.

    Crop and flip matrices have no rotation or shear, so x depends only on the output column
    and y only on the row: the grid is two ``[N, out]`` vectors broadcast into place, where
    ``affine_grid`` runs a matrix product per output pixel (it doubles the CPU cost of a batch of
    views; docs/internals.md).

    Args:
        theta: ``[N, 2, 3]`` matrices with zero off-diagonal terms (from :func:`crop_affine`).
        out: output side.

    Returns:
        float32 ``[N, out, out, 2]`` grid of ``(x, y)`` in normalised source coordinates.
    """
    theta = theta.double()
    # Output pixel centres in [-1, 1]: affine_grid's base grid with align_corners=False.
    base = (2 * torch.arange(out, device=theta.device, dtype=torch.float64) + 1) / out - 1
    gx = (theta[:, 0, 0, None] * base + theta[:, 0, 2, None]).float()  # [N, out]
    gy = (theta[:, 1, 1, None] * base + theta[:, 1, 2, None]).float()  # [N, out]
    grid = gx.new_empty(theta.shape[0], out, out, 2)
    grid[..., 0] = gx[:, None, :]
    grid[..., 1] = gy[:, :, None]
    return grid


def _jitter(views: Tensor, params: ViewParams) -> Tensor:
    """torchvision ``ColorJitter(brightness, contrast)`` on a grey channel, in place per view.

    Brightness blends with black (``f x``), contrast with the view's mean grey level
    (``f x + (1 - f) mean``); torchvision's ``_blend`` clamps each result to [0, 1]. The
    order of the two is random per view, as torchvision permutes its sub-transforms; the
    clamps make it matter. Both steps have the form ``clamp(a x + beta mean(x))``, so each
    view runs two such stages with its own order's coefficients.
    """
    sel = torch.nonzero(params.jitter).squeeze(1)
    if sel.numel() == 0:
        return views
    fb = params.brightness[sel].view(-1, 1, 1, 1)
    fc = params.contrast[sel].view(-1, 1, 1, 1)
    first_c = params.contrast_first[sel].view(-1, 1, 1, 1)
    zero = torch.zeros_like(fb)
    stages = (
        (torch.where(first_c, fc, fb), torch.where(first_c, 1 - fc, zero)),
        (torch.where(first_c, fb, fc), torch.where(first_c, zero, 1 - fc)),
    )
    x = views[sel]  # [n, 1, out, out]
    for a, beta in stages:
        mean = x.mean(dim=(-3, -2, -1), keepdim=True)
        x = torch.addcmul(beta * mean, a, x).clamp_(0, 1)
    views[sel] = x
    return views


def gaussian_kernels(sigma: Tensor, radius: int) -> Tensor:
    """Per-view 1-D Gaussian kernels of a shared size ``2 radius + 1``.

    Each kernel is torchvision's ``_get_gaussian_kernel1d(2 ceil(3 sigma) + 1, sigma)``,
    zero-padded to the shared size, so a convolution with reflect padding of ``radius``
    equals torchvision's ``gaussian_blur`` with that view's own kernel size.

    Args:
        sigma: float ``[N]`` standard deviations.
        radius: shared half-width, at least ``ceil(3 max(sigma))``.

    Returns:
        float ``[N, 2 radius + 1]`` kernels, each summing to 1.
    """
    x = torch.arange(-radius, radius + 1, device=sigma.device, dtype=sigma.dtype)  # [K]
    pdf = torch.exp(-0.5 * (x / sigma[:, None]) ** 2)  # [N, K]
    pdf = pdf * (x.abs() <= blur_radius(sigma)[:, None])
    return pdf / pdf.sum(dim=1, keepdim=True)


def _blur(views: Tensor, params: ViewParams, cfg: AugmentConfig) -> Tensor:
    """Gaussian blur, in place, of the views selected by ``params.blur``; one grouped conv per axis.

    Only the selected views (``blur_p`` = 0.1 of them by default) are convolved: on a CPU
    that is most of the blur's cost saved, for one data-dependent index.
    """
    sel = torch.nonzero(params.blur).squeeze(1)
    if sel.numel() == 0:
        return views
    radius = blur_radius(cfg.blur_sigma[1])
    kernels = gaussian_kernels(params.sigma[sel], radius)  # [n, K]
    n, k = kernels.shape
    x = views[sel].transpose(0, 1)  # [1, n, H, W]: the views become channels of one image
    x = F.pad(x, (radius, radius, radius, radius), mode="reflect")
    x = F.conv2d(x, kernels.view(n, 1, 1, k), groups=n)  # along width
    x = F.conv2d(x, kernels.view(n, 1, k, 1), groups=n)  # along height
    views[sel] = x.transpose(0, 1)
    return views


def eval_transform(images_u8: Tensor, out_size: int, cfg: AugmentConfig) -> Tensor:
    """Deterministic resize of whole images to ``out_size`` and normalisation (no randomness).

    Bilinear, ``align_corners=False``, antialiased when downscaling (torchvision ``Resize``).
    Images are expected square (the store pads them); others are resized to a square.

    Args:
        images_u8: uint8 ``[B, 1, H, W]``.
        out_size: output side.
        cfg: supplies the normalisation (the same ``mean``/``std`` as pretraining).

    Returns:
        float32 ``[B, 1, out_size, out_size]`` normalised images.
    """
    _check_images(images_u8, "eval_transform")
    x = images_u8.float().div_(255)
    if tuple(x.shape[-2:]) != (out_size, out_size):
        x = F.interpolate(
            x, size=(out_size, out_size), mode="bilinear", align_corners=False, antialias=True
        ).clamp_(0, 1)
    return normalize(x, cfg)


def _check_images(images: Tensor, where: str) -> None:
    if not isinstance(images, Tensor):
        raise TypeError(f"{where}: expected a torch.Tensor, got {type(images).__name__}")
    if images.dtype != torch.uint8:
        raise TypeError(f"{where}: expected uint8 images, got {images.dtype}")
    if images.ndim != 4 or images.shape[1] != 1:
        raise ValueError(
            f"{where}: expected images of shape [B, 1, H, W], got {list(images.shape)}"
        )
    if images.shape[0] == 0 or images.shape[2] == 0 or images.shape[3] == 0:
        raise ValueError(f"{where}: empty batch or image, shape {list(images.shape)}")
