"""Explanation maps of ViT classifiers: Integrated Gradients per patch, and overlay images.

Method: Integrated Gradients (IG; Sundararajan, Taly & Yan, "Axiomatic attribution for deep
networks", ICML 2017) summed over every ViT patch. For an image ``x``, a baseline ``b`` and the
explained score ``F``, the attribution of pixel ``p`` is
``(x_p - b_p) * integral_0^1 dF/dx_p(b + a (x - b)) da``, estimated with the trapezoid rule on
``steps + 1`` points. The patch embedding is linear, so the sum over a patch's pixels is exactly
IG with respect to that patch's token embedding: one number per token, which is what the map
shows (positive part, scaled to a maximum of 1, upsampled bilinearly).

* Baseline: a uniform image at the normalisation mean (0 in model space: intensity 0.5 with
  spcxr's mean 0.5), i.e. "no structure at average brightness".
* Score: the explained class's logit margin ``z_c - logsumexp_{j != c} z_j`` for softmax
  classifiers (a logit alone is not identifiable: adding the same amount to every logit changes
  no probability), the logit ``z_c`` for multi-label (sigmoid) and one-logit models.
* Completeness: the attributions sum to ``F(x) - F(b)`` as the steps grow; the relative gap is
  returned, so a saturated model (a near step function along the path) is visible as a large gap
  rather than silently giving a poor map.

Why not Grad-CAM on the last block's tokens or attention rollout (the usual ViT recipes): both
were tried on the planted-signal set of ``tests/explain/test_heatmaps.py`` (tiny ViTs of 2 and 4
blocks with a CLS head, trained for 60-150 steps to detect a bright square). Grad-CAM on
``blocks[-1].norm1`` (the ``pytorch-grad-cam`` ViT recipe; the last block's *output* patch
tokens get no gradient under a CLS head) put its peak on the square in only 11-25 % of the
images: LayerNorm'd tokens are signed, so a gradient-weighted activation has no meaningful zero,
and its sign flipped between images. Gradient-weighted attention rollout (Chefer, Gur & Wolf,
ICCV 2021) did little better (28-42 %). Plain attention rollout (Abnar & Zuidema, ACL 2020) is
the same for every class and ignores the head; its absolute gradient-weighted form found the
square, but its maps from a randomly re-initialised head correlated 0.85-0.98 with the trained
ones, failing the randomisation check of Adebayo et al. ("Sanity checks for saliency maps", NeurIPS
2018). IG found the square in every image, and its maps change when the model is randomised.
Its cost: ``steps + 1`` forward and backward passes per image, batched (the interpolated images
of a whole batch go through the model together, in chunks of at most ``max_batch``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib import colormaps
from PIL import Image
from torch import Tensor, nn

__all__ = [
    "Explanation",
    "explain",
    "explained_score",
    "heatmap_overlay",
    "mask_overlay",
    "normalize_maps",
    "save_png",
    "upsample_maps",
]


@dataclass
class Explanation:
    """Integrated-Gradients explanation of one batch.

    Attributes:
        target: ``[B]`` the explained class of every image.
        attributions: ``[B, h, w]`` signed attribution of every patch (sums to about
            ``score - baseline_score``).
        maps: ``[B, h, w]`` the positive part of ``attributions``, each scaled to a maximum of 1
            (all zeros when no patch speaks for the class).
        score: ``[B]`` the explained score at the image.
        baseline_score: ``[B]`` the explained score at the baseline.
        completeness_gap: ``[B]`` ``|sum(attributions) - (score - baseline_score)|`` relative to
            ``|score - baseline_score|`` (0 is exact; large values: more ``steps`` needed, or a
            saturated model).
    """

    target: Tensor
    attributions: Tensor
    maps: Tensor
    score: Tensor
    baseline_score: Tensor
    completeness_gap: Tensor


def explained_score(logits: Tensor, target: Tensor, multilabel: bool = False) -> Tensor:
    """The score IG explains, per image: the class margin (softmax) or the logit (sigmoid)."""
    z = logits.gather(1, target[:, None])[:, 0]
    if multilabel or logits.shape[1] == 1:
        return z
    others = logits.masked_fill(F.one_hot(target, logits.shape[1]).bool(), float("-inf"))
    return z - others.logsumexp(dim=1)


def _patch_size(model: nn.Module) -> tuple[int, int]:
    patch = model.encoder.patch_embed.patch_size
    return int(patch[0]), int(patch[1])


def explain(
    model: nn.Module,
    x: Tensor,
    target: Tensor | None = None,
    *,
    steps: int = 16,
    multilabel: bool = False,
    max_batch: int = 256,
) -> Explanation:
    """Integrated Gradients of a batch, per ViT patch (see the module docstring).

    Images do not interact in an eval-mode ViT (no batch statistics), so the gradient of the
    batch's summed score gives every image the gradient of its own score.

    Args:
        model: a classifier with a timm ViT ``encoder`` (``patch_embed.patch_size``), in eval
            mode (dropout and stochastic depth would make the maps random).
        x: normalised images ``[B, C, H, W]`` as the model takes them (autocast may be active).
        target: ``[B]`` class index to explain per image; ``None``: the top logit.
        steps: trapezoid intervals of the path integral (``steps + 1`` model evaluations).
        multilabel: sigmoid outputs (explain the logit rather than the softmax margin).
        max_batch: at most this many interpolated images per forward/backward pass.

    Returns:
        The explanation (see :class:`Explanation`).
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    x = x.detach()
    batch = x.shape[0]
    baseline = torch.zeros_like(x)
    alphas = torch.linspace(0.0, 1.0, steps + 1, device=x.device, dtype=x.dtype)
    weights = torch.full((steps + 1,), 1.0 / steps, device=x.device, dtype=torch.float32)
    weights[0] = weights[-1] = 0.5 / steps  # trapezoid rule
    if target is None:
        with torch.no_grad():
            target = model(x).float().argmax(dim=1)
    target = target.to(x.device).long()
    grad_sum = torch.zeros_like(x, dtype=torch.float32)
    scores = torch.empty(steps + 1, batch, device=x.device)
    per_pass = max(1, max_batch // batch)  # interpolation points per pass
    for start in range(0, steps + 1, per_pass):
        idx = torch.arange(start, min(start + per_pass, steps + 1), device=x.device)
        a = alphas[idx].view(-1, 1, 1, 1, 1)
        points = (baseline[None] + a * (x - baseline)[None]).flatten(0, 1)  # [k * B, C, H, W]
        points.requires_grad_(True)
        with torch.enable_grad():
            logits = model(points).float()
            score = explained_score(logits, target.repeat(len(idx)), multilabel)
            (grad,) = torch.autograd.grad(score.sum(), points)
        grad = grad.float().view(len(idx), batch, *x.shape[1:])
        grad_sum += (grad * weights[idx].view(-1, 1, 1, 1, 1)).sum(dim=0)
        scores[idx] = score.detach().view(len(idx), batch)
    pixel = (grad_sum * (x - baseline).float()).sum(dim=1, keepdim=True)  # [B, 1, H, W]
    ph, pw = _patch_size(model)
    attributions = F.avg_pool2d(pixel, (ph, pw))[:, 0] * (ph * pw)  # sum per patch
    delta = scores[-1] - scores[0]
    gap = (attributions.flatten(1).sum(dim=1) - delta).abs() / delta.abs().clamp_min(1e-6)
    return Explanation(
        target=target,
        attributions=attributions,
        maps=normalize_maps(F.relu(attributions)),
        score=scores[-1],
        baseline_score=scores[0],
        completeness_gap=gap,
    )


def normalize_maps(maps: Tensor) -> Tensor:
    """Scales every map of ``[B, h, w]`` to a maximum of 1 (all-zero maps stay zero)."""
    peak = maps.flatten(1).amax(dim=1).clamp_min(1e-12)
    return maps / peak[:, None, None]


def upsample_maps(maps: Tensor, size: int | tuple[int, int]) -> Tensor:
    """Bilinear upsampling of ``[B, h, w]`` maps to ``size`` (patch centres stay centred)."""
    out = F.interpolate(maps[:, None].float(), size=size, mode="bilinear", align_corners=False)
    return out[:, 0].clamp_(0, 1)


def heatmap_overlay(
    gray_u8: np.ndarray, heat: np.ndarray, *, alpha: float = 0.6, cmap: str = "jet"
) -> np.ndarray:
    """The image in gray with a coloured heat map blended in where the map is high.

    The blend weight of a pixel is ``alpha * heat``, so cold regions show the radiograph itself
    and hot ones the colour map.

    Args:
        gray_u8: uint8 ``[H, W]``.
        heat: float ``[H, W]`` in ``[0, 1]``.
        alpha: blend weight at ``heat == 1``.
        cmap: a matplotlib colour map name.

    Returns:
        uint8 RGB ``[H, W, 3]``.
    """
    if gray_u8.shape != heat.shape:
        raise ValueError(f"image {gray_u8.shape} and heat map {heat.shape} differ in shape")
    heat = np.clip(np.asarray(heat, dtype=np.float32), 0.0, 1.0)
    colour = colormaps[cmap](heat)[..., :3].astype(np.float32)  # [H, W, 3] in [0, 1]
    gray = (gray_u8.astype(np.float32) / 255.0)[..., None]
    weight = (alpha * heat)[..., None]
    out = (1.0 - weight) * gray + weight * colour
    return np.clip(out * 255.0 + 0.5, 0, 255).astype(np.uint8)


def mask_overlay(
    gray_u8: np.ndarray,
    mask: np.ndarray,
    *,
    colour: Sequence[int] = (255, 80, 40),
    alpha: float = 0.3,
) -> np.ndarray:
    """The image in gray with a mask tinted and outlined.

    Args:
        gray_u8: uint8 ``[H, W]``.
        mask: bool ``[H, W]``.
        colour: RGB of the tint and the outline.
        alpha: tint weight inside the mask (the 1-pixel outline is opaque).

    Returns:
        uint8 RGB ``[H, W, 3]``.
    """
    if gray_u8.shape != mask.shape:
        raise ValueError(f"image {gray_u8.shape} and mask {mask.shape} differ in shape")
    mask = mask.astype(bool)
    rgb = np.repeat(gray_u8[..., None], 3, axis=-1).astype(np.float32)
    tint = np.asarray(colour, dtype=np.float32)
    rgb[mask] = (1.0 - alpha) * rgb[mask] + alpha * tint
    # Outline: mask pixels with a 4-neighbour outside the mask.
    padded = np.pad(mask, 1)
    inner = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    rgb[mask & ~inner] = tint
    return np.clip(rgb + 0.5, 0, 255).astype(np.uint8)


def save_png(array: np.ndarray, path: str | Path) -> Path:
    """Writes a uint8 ``[H, W]`` (gray) or ``[H, W, 3]`` (RGB) array as PNG (folders created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(array)).save(path, format="PNG")
    return path
