"""Segmentation: a ViT encoder and a convolutional decoder back to pixel resolution.

Two decoders (METHOD.md section 2: lung masks from the same pretrained encoder):

* ``"unetr"``: UNETR (Hatamizadeh et al., WACV 2022; MONAI's ``UNETR``), adapted to 2D. The
  token outputs of a few blocks become feature grids ``[B, D, H/p, W/p]``; the deepest (after the
  final LayerNorm) is upsampled stage by stage with 2x2 transposed convolutions, and at every
  stage it is concatenated with a skip: shallower blocks' grids brought to that stage's resolution
  by stacks of transposed convolutions, and, at full resolution, convolutional features of the raw
  image. A convolution block follows each concatenation; a 1x1 convolution gives the logits. With
  a patch of 16 and blocks (3, 6, 9, 12) this is UNETR's layout: block 12 at 1/16, block 9 at
  1/8, block 6 at 1/4, block 3 at 1/2, the image at full resolution.
* ``"progressive"``: SETR-PUP (Zheng et al., CVPR 2021): the last block's tokens only, then
  ``log2(p)`` steps of (2x bilinear upsampling + convolution block).

A patch of ``p = 2^L`` pixels gives ``L`` decoder stages, so any power-of-2 patch works and the
output has the input's resolution for any input size that is a multiple of ``p`` (the encoder's
``img_size``). UNETR uses residual convolution blocks with instance norm; plain
(Conv 3x3, norm, ReLU) x 2 blocks, as in U-Net, are used here, with GroupNorm by default since
segmentation batches of chest X-rays are small.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn
from torch.nn import functional as F

from spcxr.config import to_dict
from spcxr.models.folder import load_exact, read_task_model, write_model_dir
from spcxr.models.init_from import load_init
from spcxr.models.vit import map_blocks
from spcxr.train.lrd import EncoderGroups

__all__ = [
    "DECODERS",
    "FREEZE_MODES",
    "NORMS",
    "ConvBlock",
    "ProgressiveDecoder",
    "Segmenter",
    "SegmenterConfig",
    "UNETRDecoder",
    "build_segmenter",
    "load_segmenter",
    "save_segmenter",
]

DECODERS = ("unetr", "progressive")
FREEZE_MODES = ("none", "all", "partial")
NORMS = ("group", "batch", "instance")
_GROUPS = 8  # GroupNorm groups (fewer when a layer's channels are not a multiple of 8)


@dataclass
class SegmenterConfig:
    """Segmentation model: encoder (as for the classifier) and decoder.

    Attributes:
        arch: ``"vit_tiny"``, ``"vit_small"``, ``"vit_base"`` or a timm ViT name; must match the
            initialisation's encoder.
        img_size: input side in pixels (a multiple of ``patch_size``).
        patch_size: patch side in pixels: a power of 2 (8, 16); must match the initialisation.
        in_chans: image channels (1: grayscale chest X-rays).
        drop_path_rate: stochastic depth of the encoder's last block.
        decoder: ``"unetr"`` (skips from several blocks and from the image) or ``"progressive"``
            (the last block only, SETR-PUP).
        skip_blocks: 1-based blocks whose outputs feed the UNETR decoder, numbered for an encoder
            of depth ``skip_reference_depth`` and mapped proportionally onto other depths; the
            deepest one is the bottleneck (blocks after it are not run).
        skip_reference_depth: the depth ``skip_blocks`` is numbered for.
        decoder_channels: decoder channels per resolution, coarse to fine, the last one at full
            resolution; a patch of ``2^L`` uses the last ``L`` entries.
        norm: normalisation in the decoder's convolution blocks: ``"group"`` (GroupNorm, 8
            groups), ``"batch"`` or ``"instance"``.
        freeze: ``"none"``, ``"all"`` (the whole encoder frozen) or ``"partial"`` (patch
            embedding, CLS token, position embedding and the first ``frozen_blocks`` blocks
            frozen). Frozen parts stay in eval mode and get no gradient.
        frozen_blocks: blocks frozen by ``freeze="partial"``.
    """

    arch: str = "vit_small"
    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 1
    drop_path_rate: float = 0.1
    decoder: str = "unetr"
    skip_blocks: list[int] = field(default_factory=lambda: [3, 6, 9, 12])
    skip_reference_depth: int = 12
    decoder_channels: list[int] = field(default_factory=lambda: [256, 128, 64, 32])
    norm: str = "group"
    freeze: str = "none"
    frozen_blocks: int = 6

    def __post_init__(self) -> None:
        self.skip_blocks = [int(b) for b in self.skip_blocks]
        self.decoder_channels = [int(c) for c in self.decoder_channels]
        checks = [
            (self.decoder in DECODERS, f"decoder must be one of {DECODERS}, got {self.decoder!r}"),
            (
                self.freeze in FREEZE_MODES,
                f"freeze must be one of {FREEZE_MODES}, got {self.freeze!r}",
            ),
            (self.norm in NORMS, f"norm must be one of {NORMS}, got {self.norm!r}"),
            (self.frozen_blocks >= 0, f"frozen_blocks must be >= 0, got {self.frozen_blocks}"),
            (all(c > 0 for c in self.decoder_channels), "decoder_channels must be positive"),
            (
                self.img_size % self.patch_size == 0,
                f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        _stages(self.patch_size)
        map_blocks(self.skip_blocks, self.skip_reference_depth, self.skip_reference_depth)


def _stages(patch_size: int) -> int:
    """``L`` for a patch of ``2^L`` pixels (the number of 2x decoder stages)."""
    if patch_size < 2 or patch_size & (patch_size - 1):
        raise ValueError(f"the decoders need a power-of-2 patch size >= 2, got {patch_size}")
    return int(math.log2(patch_size))


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "instance":
        return nn.GroupNorm(channels, channels)  # instance norm, with affine parameters
    return nn.GroupNorm(math.gcd(_GROUPS, channels), channels)


class ConvBlock(nn.Sequential):
    """``n_layers`` x (Conv 3x3 without bias, norm, ReLU)."""

    def __init__(self, in_ch: int, out_ch: int, norm: str, n_layers: int = 2) -> None:
        layers: list[nn.Module] = []
        for i in range(n_layers):
            conv = nn.Conv2d(in_ch if i == 0 else out_ch, out_ch, 3, padding=1, bias=False)
            layers += [conv, _norm(norm, out_ch), nn.ReLU(inplace=True)]
        super().__init__(*layers)


def _up(in_ch: int, out_ch: int) -> nn.ConvTranspose2d:
    """2x upsampling by a 2x2 transposed convolution with stride 2 (UNETR)."""
    return nn.ConvTranspose2d(in_ch, out_ch, kernel_size=2, stride=2)


def _skip_projection(dim: int, out_ch: int, n_up: int, norm: str) -> nn.Sequential:
    """A block's token grid brought ``2^n_up`` x up (UNETR's ``UnetrPrUpBlock``).

    A transposed convolution ``dim -> out_ch``, then ``n_up - 1`` x (transposed convolution,
    convolution block).
    """
    layers: list[nn.Module] = [_up(dim, out_ch)]
    for _ in range(n_up - 1):
        layers += [_up(out_ch, out_ch), ConvBlock(out_ch, out_ch, norm)]
    return nn.Sequential(*layers)


class UNETRDecoder(nn.Module):
    """UNETR's decoder in 2D (see the module docstring).

    Args:
        dim: token width D.
        in_chans: image channels (for the full-resolution skip).
        n_stages: ``L = log2(patch)``.
        channels: ``L`` channel counts, stage 1 (1/2^(L-1)) to stage L (full resolution).
        n_skips: number of intermediate blocks; the i-th deepest joins stage ``min(i, L - 1)``
            (stage 1 when L is 1), several at one stage are concatenated.
        norm: convolution blocks' normalisation.
    """

    def __init__(
        self, dim: int, in_chans: int, n_stages: int, channels: list[int], n_skips: int, norm: str
    ) -> None:
        super().__init__()
        last_skip_stage = max(n_stages - 1, 1)
        self.skip_stage = [min(i, last_skip_stage) for i in range(1, n_skips + 1)]
        self.skips = nn.ModuleList(
            _skip_projection(dim, channels[s - 1], s, norm) for s in self.skip_stage
        )
        self.image_skip = ConvBlock(in_chans, channels[-1], norm)
        self.ups = nn.ModuleList()
        self.fuse = nn.ModuleList()
        for stage in range(1, n_stages + 1):
            ch = channels[stage - 1]
            self.ups.append(_up(dim if stage == 1 else channels[stage - 2], ch))
            n_in = 1 + self.skip_stage.count(stage) + (stage == n_stages)
            self.fuse.append(ConvBlock(n_in * ch, ch, norm))
        self.out = nn.Conv2d(channels[-1], 1, kernel_size=1)

    def forward(self, image: Tensor, deepest: Tensor, skips: list[Tensor]) -> Tensor:
        """Logits ``[B, 1, H, W]``.

        Args:
            image: the input ``[B, C, H, W]``.
            deepest: bottleneck grid ``[B, D, H/p, W/p]``.
            skips: intermediate grids ``[B, D, H/p, W/p]``, deepest first.
        """
        projected = [proj(grid) for proj, grid in zip(self.skips, skips, strict=True)]
        x = deepest
        n_stages = len(self.ups)
        for stage, (up, fuse) in enumerate(zip(self.ups, self.fuse, strict=True), start=1):
            parts = [up(x)]  # [B, ch, H / 2^(L - stage), ...]
            parts += [p for p, s in zip(projected, self.skip_stage, strict=True) if s == stage]
            if stage == n_stages:
                parts.append(self.image_skip(image))
            x = fuse(parts[0] if len(parts) == 1 else torch.cat(parts, dim=1))
        return self.out(x)


class ProgressiveDecoder(nn.Module):
    """SETR-PUP: ``L`` x (2x bilinear upsampling, Conv-norm-ReLU), then a 1x1 convolution."""

    def __init__(self, dim: int, n_stages: int, channels: list[int], norm: str) -> None:
        super().__init__()
        ins = [dim, *channels[:-1]]
        self.stages = nn.ModuleList(
            ConvBlock(i, o, norm, n_layers=1) for i, o in zip(ins, channels, strict=True)
        )
        self.out = nn.Conv2d(channels[-1], 1, kernel_size=1)

    def forward(self, deepest: Tensor) -> Tensor:
        x = deepest
        for stage in self.stages:
            x = stage(F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False))
        return self.out(x)


class Segmenter(EncoderGroups, nn.Module):
    """A timm ViT encoder with a UNETR or progressive decoder; one logit map per image.

    Args:
        encoder: a timm ``VisionTransformer`` (``num_classes=0``) whose patch size is a power of
            2 and whose image size, patch size and channels agree with ``cfg``.
        cfg: decoder, skip blocks and freezing (see :class:`SegmenterConfig`).

    Attributes:
        encoder: the ViT.
        decoder: ``UNETRDecoder`` or ``ProgressiveDecoder``.
        blocks: the 1-based encoder blocks the decoder reads, deepest last.
    """

    def __init__(self, encoder: VisionTransformer, cfg: SegmenterConfig) -> None:
        super().__init__()
        _check_encoder(encoder, cfg)
        self.cfg = cfg
        self.encoder = encoder
        depth, dim = len(encoder.blocks), encoder.embed_dim
        n_stages = _stages(cfg.patch_size)
        if len(cfg.decoder_channels) < n_stages:
            raise ValueError(
                f"decoder_channels {cfg.decoder_channels} has fewer than the {n_stages} stages a "
                f"patch of {cfg.patch_size} needs"
            )
        channels = cfg.decoder_channels[-n_stages:]
        if cfg.decoder == "unetr":
            self.blocks = map_blocks(cfg.skip_blocks, depth, cfg.skip_reference_depth)
            self.decoder: nn.Module = UNETRDecoder(
                dim, cfg.in_chans, n_stages, channels, len(self.blocks) - 1, cfg.norm
            )
        else:
            self.blocks = (depth,)
            self.decoder = ProgressiveDecoder(dim, n_stages, channels, cfg.norm)
        self._frozen = self._apply_freeze(cfg)

    def _apply_freeze(self, cfg: SegmenterConfig) -> list[nn.Module]:
        """Sets ``requires_grad=False`` on the frozen encoder parts; returns their modules."""
        enc = self.encoder
        if cfg.freeze == "none":
            return []
        if cfg.freeze == "all":
            enc.requires_grad_(False)
            return [enc]
        if cfg.frozen_blocks > len(enc.blocks):
            raise ValueError(
                f"frozen_blocks {cfg.frozen_blocks} exceeds the encoder's {len(enc.blocks)} blocks"
            )
        for name in ("cls_token", "pos_embed", "reg_token"):
            param = getattr(enc, name, None)
            if isinstance(param, nn.Parameter):
                param.requires_grad_(False)
        modules = [enc.patch_embed, enc.norm_pre, *enc.blocks[: cfg.frozen_blocks]]
        for module in modules:
            module.requires_grad_(False)
        return modules

    def train(self, mode: bool = True) -> Segmenter:
        """Sets train / eval mode; frozen encoder parts always stay in eval mode."""
        super().train(mode)
        for module in getattr(self, "_frozen", []):
            module.eval()
        return self

    def encode(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        """Feature grids of images ``x`` ``[B, C, H, W]``.

        Returns:
            ``(deepest, skips)``: the deepest chosen block's output after the final norm, and the
            other chosen blocks' raw outputs (as in UNETR), deepest first; each ``[B, D, h, w]``.
        """
        enc = self.encoder
        indices = [b - 1 for b in self.blocks]
        # timm's forward_intermediates runs the blocks up to the deepest index only (stop_early),
        # returns their outputs as NCHW grids (prefix tokens dropped) and the final-normed tokens.
        final, grids = enc.forward_intermediates(
            x, indices=indices, stop_early=True, output_fmt="NCHW"
        )
        batch, _, height, width = grids[-1].shape
        tokens = final[:, enc.num_prefix_tokens :]  # [B, N, D]
        deepest = tokens.transpose(1, 2).reshape(batch, -1, height, width)  # [B, D, h, w]
        return deepest, grids[:-1][::-1]

    def forward(self, x: Tensor) -> Tensor:
        """Mask logits ``[B, 1, H, W]`` of images ``x`` ``[B, C, H, W]``."""
        deepest, skips = self.encode(x)
        if isinstance(self.decoder, UNETRDecoder):
            return self.decoder(x, deepest, skips)
        return self.decoder(deepest)


def _check_encoder(encoder: VisionTransformer, cfg: SegmenterConfig) -> None:
    found = {
        "img_size": tuple(encoder.patch_embed.img_size),
        "patch_size": tuple(encoder.patch_embed.patch_size),
        "in_chans": encoder.patch_embed.proj.in_channels,
    }
    wanted = {
        "img_size": (cfg.img_size, cfg.img_size),
        "patch_size": (cfg.patch_size, cfg.patch_size),
        "in_chans": cfg.in_chans,
    }
    diff = {k: (found[k], wanted[k]) for k in found if found[k] != wanted[k]}
    if diff:
        raise ValueError(f"encoder does not match the segmenter config (encoder, config): {diff}")


def build_segmenter(
    cfg: SegmenterConfig, init: str = "scratch"
) -> tuple[Segmenter, dict[str, Any]]:
    """A segmenter whose encoder comes from ``init`` (see :func:`spcxr.models.init_from.load_init`).

    Returns:
        ``(segmenter, init info)``.
    """
    encoder, info = load_init(
        init,
        arch=cfg.arch,
        img_size=cfg.img_size,
        patch_size=cfg.patch_size,
        in_chans=cfg.in_chans,
        drop_path_rate=cfg.drop_path_rate,
    )
    return Segmenter(encoder, cfg), info


def save_segmenter(
    model: Segmenter,
    folder: str | os.PathLike[str],
    extra: Mapping[str, Any] | None = None,
    *,
    mean: float = 0.5,
    std: float = 0.25,
) -> Path:
    """Saves ``model`` as ``folder/model.safetensors`` (full state) + ``folder/model.json``.

    Args:
        model: the segmenter (its config is recorded, so :func:`load_segmenter` rebuilds it).
        folder: output folder.
        extra: JSON-serialisable facts to keep (init info, data, ...).
        mean: intensity mean of the input normalisation (images in [0, 1]).
        std: intensity scale of the input normalisation.

    Returns:
        The folder.
    """
    cfg = model.cfg
    meta = {
        "task": "segmentation",
        "config": to_dict(cfg),
        "input_size": [cfg.in_chans, cfg.img_size, cfg.img_size],
        "mean": mean,
        "std": std,
        "extra": dict(extra or {}),
    }
    return write_model_dir(model, folder, meta)


def load_segmenter(folder: str | os.PathLike[str]) -> tuple[Segmenter, dict[str, Any]]:
    """Loads a folder written by :func:`save_segmenter` (safetensors: nothing is unpickled).

    Returns:
        ``(segmenter in eval mode, model.json contents)``.
    """
    folder = Path(folder)
    state, meta, cfg, encoder = read_task_model(
        folder, "segmentation", "segmenter", SegmenterConfig
    )
    model = Segmenter(encoder, cfg)
    load_exact(model, state, folder)
    return model.eval(), meta
