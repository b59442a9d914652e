"""Image classifier: a ViT encoder and a linear head on its pooled tokens.

The head follows the fine-tuning setups of SPCXR (Anwar et al., arXiv 2211.12944) and of the
authors' SiT code (Atito, Awais, Kittler, arXiv 2104.03602), which classify from the CLS token or
from the mean of the patch tokens; both are offered, and their concatenation. Tokens are taken
after the encoder's final LayerNorm (timm's ``forward_features``). For linear probing the encoder
is frozen and kept in eval mode; MAE's probing recipe (He et al., CVPR 2022,
``main_linprobe.py``) also puts a BatchNorm without affine parameters in front of the linear
layer, which makes probing insensitive to the feature scale (``probe_bn``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from timm.layers import trunc_normal_
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from spcxr.config import to_dict
from spcxr.models.folder import load_exact, read_task_model, write_model_dir
from spcxr.models.init_from import load_init
from spcxr.train.lrd import EncoderGroups

__all__ = [
    "HEADS",
    "Classifier",
    "ClassifierConfig",
    "build_classifier",
    "load_classifier",
    "save_classifier",
]

HEADS = ("cls", "mean", "both")


@dataclass
class ClassifierConfig:
    """Classifier architecture (defaults: the paper's ViT-S/16 at 224 x 224).

    Attributes:
        arch: ``"vit_tiny"``, ``"vit_small"``, ``"vit_base"`` or a timm ViT name; must match the
            initialisation's encoder.
        img_size: input side in pixels (a multiple of ``patch_size``); a pretrained position
            embedding for another size is resampled.
        patch_size: patch side in pixels; must match the initialisation's encoder.
        in_chans: image channels (1: grayscale chest X-rays).
        head: what the linear head sees: ``"cls"`` (the CLS token), ``"mean"`` (the mean of the
            patch tokens) or ``"both"`` (their concatenation).
        drop_path_rate: stochastic depth of the encoder's last block (DeiT fine-tuning: 0.1).
        head_dropout: dropout on the pooled features before the linear head.
        probe_bn: a BatchNorm without affine parameters before the linear head (MAE's linear
            probing recipe).
    """

    arch: str = "vit_small"
    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 1
    head: str = "cls"
    drop_path_rate: float = 0.1
    head_dropout: float = 0.0
    probe_bn: bool = False

    def __post_init__(self) -> None:
        if self.head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {self.head!r}")
        if self.img_size % self.patch_size:
            raise ValueError(
                f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}"
            )
        if not 0.0 <= self.head_dropout < 1.0:
            raise ValueError(f"head_dropout must be in [0, 1), got {self.head_dropout}")


class Classifier(EncoderGroups, nn.Module):
    """A timm ViT encoder (no classifier of its own) with a linear head on pooled tokens.

    Args:
        encoder: a timm ``VisionTransformer`` built with ``num_classes=0``.
        num_classes: number of outputs (logits).
        head: ``"cls"``, ``"mean"`` or ``"both"`` (see :class:`ClassifierConfig`).
        head_dropout: dropout before the linear layer.
        probe_bn: a non-affine BatchNorm before the linear layer (MAE linear probing).

    Attributes:
        encoder: the ViT.
        probe_norm: the BatchNorm, or ``Identity``.
        head_drop: the dropout.
        head: the linear layer ``[D or 2D] -> num_classes``.
        encoder_frozen: whether :meth:`freeze_encoder` froze the encoder.
    """

    def __init__(
        self,
        encoder: VisionTransformer,
        num_classes: int,
        head: str = "cls",
        head_dropout: float = 0.0,
        probe_bn: bool = False,
    ) -> None:
        super().__init__()
        if head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {head!r}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if encoder.num_classes != 0:
            raise ValueError(
                f"the encoder has its own {encoder.num_classes}-way classifier; "
                "build it with num_classes=0"
            )
        self.encoder = encoder
        self.pooling = head
        dim = encoder.embed_dim * (2 if head == "both" else 1)
        self.probe_norm: nn.Module = (
            nn.BatchNorm1d(dim, affine=False, eps=1e-6) if probe_bn else nn.Identity()
        )
        self.head_drop = nn.Dropout(head_dropout)
        self.head = nn.Linear(dim, num_classes)
        # MAE / DeiT fine-tuning (``main_finetune.py``): a near-zero head, so the first steps
        # do not push large random gradients into the pretrained encoder.
        trunc_normal_(self.head.weight, std=2e-5)
        nn.init.zeros_(self.head.bias)
        self.encoder_frozen = False

    @property
    def num_classes(self) -> int:
        """Number of logits."""
        return self.head.out_features

    def tokens(self, x: Tensor) -> Tensor:
        """All output tokens ``[B, 1 + N, D]`` of images ``x`` ``[B, C, H, W]``, after the norm."""
        return self.encoder.forward_features(x)

    def pool(self, tokens: Tensor) -> Tensor:
        """Pooled features ``[B, D]`` (``"both"``: ``[B, 2D]``) of ``tokens`` ``[B, 1 + N, D]``."""
        prefix = self.encoder.num_prefix_tokens
        if self.pooling == "cls":
            return tokens[:, 0]
        mean = tokens[:, prefix:].mean(dim=1)  # [B, D], patch tokens only
        if self.pooling == "mean":
            return mean
        return torch.cat([tokens[:, 0], mean], dim=1)  # [B, 2D]

    def features(self, x: Tensor) -> Tensor:
        """Pooled features of images (what the head sees, before ``probe_norm`` and dropout)."""
        return self.pool(self.tokens(x))

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``[B, num_classes]`` of images ``x`` ``[B, C, H, W]``."""
        return self.head(self.head_drop(self.probe_norm(self.features(x))))

    def freeze_encoder(self, frozen: bool = True) -> None:
        """Freezes (or unfreezes) the encoder for linear probing.

        A frozen encoder's parameters get ``requires_grad=False`` and the encoder stays in eval
        mode even while the classifier trains, so stochastic depth and dropout are off and the
        features are those of the pretrained network.
        """
        self.encoder_frozen = frozen
        self.encoder.requires_grad_(not frozen)
        self.train(self.training)

    def train(self, mode: bool = True) -> Classifier:
        """Sets train / eval mode; a frozen encoder always stays in eval mode."""
        super().train(mode)
        if self.encoder_frozen:
            self.encoder.eval()
        return self


def build_classifier(
    cfg: ClassifierConfig, num_classes: int, init: str = "scratch"
) -> tuple[Classifier, dict[str, Any]]:
    """A classifier whose encoder comes from ``init`` (see :func:`spcxr.models.init_from.load_init`).

    Returns:
        ``(classifier, init info)``.
    """
    encoder, info = load_init(
        init,
        arch=cfg.arch,
        img_size=cfg.img_size,
        patch_size=cfg.patch_size,
        in_chans=cfg.in_chans,
        drop_path_rate=cfg.drop_path_rate,
    )
    model = Classifier(
        encoder, num_classes, cfg.head, head_dropout=cfg.head_dropout, probe_bn=cfg.probe_bn
    )
    return model, info


def save_classifier(
    model: Classifier,
    cfg: ClassifierConfig,
    class_names: Sequence[str],
    folder: str | os.PathLike[str],
    extra: Mapping[str, Any] | None = None,
    *,
    mean: float = 0.5,
    std: float = 0.25,
) -> Path:
    """Saves ``model`` as ``folder/model.safetensors`` (full state) + ``folder/model.json``.

    Args:
        model: the classifier.
        cfg: its architecture (recorded so that :func:`load_classifier` rebuilds it).
        class_names: one name per logit, in logit order.
        folder: output folder.
        extra: JSON-serialisable facts to keep (labels, init info, ...).
        mean: intensity mean of the input normalisation (images in [0, 1]).
        std: intensity scale of the input normalisation.

    Returns:
        The folder.
    """
    if len(class_names) != model.num_classes:
        raise ValueError(f"{len(class_names)} class names for {model.num_classes} logits")
    meta = {
        "task": "classification",
        "config": to_dict(cfg),
        "class_names": list(class_names),
        "num_classes": model.num_classes,
        "input_size": [cfg.in_chans, cfg.img_size, cfg.img_size],
        "mean": mean,
        "std": std,
        "extra": dict(extra or {}),
    }
    return write_model_dir(model, folder, meta)


def load_classifier(folder: str | os.PathLike[str]) -> tuple[Classifier, dict[str, Any]]:
    """Loads a folder written by :func:`save_classifier` (safetensors: nothing is unpickled).

    Returns:
        ``(classifier in eval mode, model.json contents)``.
    """
    folder = Path(folder)
    state, meta, cfg, encoder = read_task_model(
        folder, "classification", "classifier", ClassifierConfig
    )
    model = Classifier(
        encoder, meta["num_classes"], cfg.head, cfg.head_dropout, probe_bn=cfg.probe_bn
    )
    load_exact(model, state, folder)
    return model.eval(), meta
