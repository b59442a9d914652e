"""The GMML objective: reconstruct the clean image from a group-masked, corrupted one.

Group-masked model learning (Atito, Awais, Kittler, "GMML is all you need", ICIP 2023), as used
for chest X-rays by SPCXR (Anwar et al., arXiv 2211.12944). Unlike MAE there is no mask token and
no token dropping: the corrupted image goes through the normal patch embedding and every token is
encoded. The reconstruction features are the mean of the token outputs of blocks 6, 8, 10 and 12,
then the encoder's final LayerNorm, without the CLS token (``vision_transformer.py`` of the
reference); a per-token MLP and a transposed convolution paint them back into pixels; the loss is
L1 over the corrupted pixels.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from timm.optim import param_groups_weight_decay
from torch import Tensor, nn

from spcxr.checks import at_least, require
from spcxr.models.heads import ReconstructionHead
from spcxr.models.vit import create_encoder, map_blocks

__all__ = [
    "LOSS_ON",
    "GMMLConfig",
    "GMMLModel",
    "param_groups",
    "reconstruction_loss",
]

LOSS_ON = ("masked", "all")


@dataclass
class GMMLConfig:
    """Model side of GMML pretraining (defaults: the reference ViT-S/16 at 224 x 224).

    Attributes:
        arch: ``"vit_tiny"``, ``"vit_small"``, ``"vit_base"`` or a timm ViT name.
        img_size: input side in pixels (a multiple of ``patch_size``).
        patch_size: patch side in pixels.
        in_chans: image channels (1: grayscale chest X-rays); also the reconstructed channels.
        drop_path_rate: stochastic depth of the last block.
        recon_blocks: 1-based blocks whose outputs are averaged for reconstruction, numbered for
            an encoder of depth ``recon_reference_depth``; mapped onto other depths by
            ``map_blocks`` (reference ``--recons_blocks 6-8-10-12``).
        recon_reference_depth: the depth ``recon_blocks`` is numbered for.
        loss_on: ``"masked"`` (reference ``--drop_only 1``) or ``"all"`` pixels.
        head_layers: Linear + GELU layers of the reconstruction head (3 in the reference).
    """

    arch: str = "vit_small"
    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 1
    drop_path_rate: float = 0.1
    recon_blocks: tuple[int, ...] = (6, 8, 10, 12)
    recon_reference_depth: int = 12
    loss_on: str = "masked"
    head_layers: int = 3

    def __post_init__(self) -> None:
        self.recon_blocks = tuple(int(b) for b in self.recon_blocks)
        if self.loss_on not in LOSS_ON:
            raise ValueError(f"loss_on must be one of {LOSS_ON}, got {self.loss_on!r}")
        # Flags as ``spcxr pretrain`` spells them (this is its ``model`` group).
        at_least(self.img_size, 1, "--model-img-size")
        at_least(self.patch_size, 1, "--model-patch-size")
        at_least(self.in_chans, 1, "--model-in-chans")
        require(
            self.img_size % self.patch_size == 0,
            "--model-img-size",
            self.img_size,
            f"is not a multiple of --model-patch-size {self.patch_size}",
        )
        map_blocks(self.recon_blocks, self.recon_reference_depth, self.recon_reference_depth)


class GMMLModel(nn.Module):
    """A timm ViT encoder plus GMML's reconstruction head.

    Args:
        config: model settings; ``GMMLConfig()`` when ``None``.
        encoder: an existing timm ViT to use instead of building one from ``config``; its input
            channels, patch size and image size must agree with ``config``.

    Attributes:
        encoder: the ViT (``num_classes=0``); the part that is kept after pretraining.
        head: the ``ReconstructionHead``.
        recon_blocks: the 1-based blocks averaged, mapped to the encoder's depth.
    """

    def __init__(
        self, config: GMMLConfig | None = None, *, encoder: VisionTransformer | None = None
    ) -> None:
        super().__init__()
        self.config = config = config or GMMLConfig()
        if encoder is None:
            encoder = create_encoder(
                config.arch,
                img_size=config.img_size,
                patch_size=config.patch_size,
                in_chans=config.in_chans,
                drop_path_rate=config.drop_path_rate,
            )
        _check_encoder(encoder, config)
        self.encoder = encoder
        self.head = ReconstructionHead(
            encoder.embed_dim, config.patch_size, config.in_chans, n_layers=config.head_layers
        )
        self.recon_blocks = map_blocks(
            config.recon_blocks, len(encoder.blocks), config.recon_reference_depth
        )

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recomputes each block in the backward pass (timm's flag on the encoder)."""
        self.encoder.set_grad_checkpointing(enable)

    def features(self, x: Tensor) -> Tensor:
        """Reconstruction features of an image batch.

        Args:
            x: (corrupted) images ``[B, C, H, W]``.

        Returns:
            Patch tokens ``[B, N, D]``: the mean of the chosen blocks' outputs, then the encoder's
            final norm, prefix (CLS) tokens dropped.
        """
        enc = self.encoder
        # timm runs the blocks up to the deepest chosen one only (stop_early) and returns their
        # patch tokens, prefix (CLS) dropped; the final LayerNorm is per token, so dropping the
        # prefix before averaging and norming changes nothing.
        outputs = enc.forward_intermediates(
            x,
            indices=[b - 1 for b in self.recon_blocks],
            stop_early=True,
            output_fmt="NLC",
            intermediates_only=True,
        )  # each [B, N, D]
        return enc.norm(torch.stack(outputs).mean(dim=0))  # [B, N, D]

    def forward(self, x: Tensor) -> Tensor:
        """Reconstructs ``x`` ``[B, C, H, W]`` (the corrupted view) as ``[B, C, H, W]``."""
        patch = self.config.patch_size
        grid = (x.shape[-2] // patch, x.shape[-1] // patch)
        return self.head(self.features(x), grid)


def _check_encoder(encoder: VisionTransformer, config: GMMLConfig) -> None:
    found = {
        "in_chans": encoder.patch_embed.proj.in_channels,
        "patch_size": encoder.patch_embed.patch_size,
        "img_size": encoder.patch_embed.img_size,
    }
    wanted = {
        "in_chans": config.in_chans,
        "patch_size": (config.patch_size, config.patch_size),
        "img_size": (config.img_size, config.img_size),
    }
    diff = {k: (found[k], wanted[k]) for k in found if found[k] != wanted[k]}
    if diff:
        raise ValueError(f"encoder does not match the config (encoder, config): {diff}")


def reconstruction_loss_terms(
    recon: Tensor, clean: Tensor, mask: Tensor, loss_on: str = "masked"
) -> tuple[Tensor, Tensor]:
    """Sum of ``|recon - clean|`` over the scored pixels and their count (both float32).

    :func:`reconstruction_loss` is ``sum / max(count, 1)``. The two terms are what a
    distributed step needs: summing both over processes gives exactly the loss of one process
    holding the whole global batch (a mean of per-process means would weight processes by
    their share of masked pixels).

    Args:
        recon: reconstruction ``[B, C, H, W]``.
        clean: the clean (normalised) view ``[B, C, H, W]``.
        mask: True / 1 where the input was corrupted: ``[B, H, W]``, ``[B, 1, H, W]`` or
            ``[B, C, H, W]``.
        loss_on: ``"masked"`` or ``"all"``.
    """
    if recon.shape != clean.shape or recon.ndim != 4:
        raise ValueError(f"recon {tuple(recon.shape)} and clean {tuple(clean.shape)} differ")
    err = F.l1_loss(recon.float(), clean.float(), reduction="none")  # [B, C, H, W]
    if loss_on == "all":
        return err.sum(), torch.tensor(float(err.numel()), device=err.device)
    if loss_on != "masked":
        raise ValueError(f"loss_on must be one of {LOSS_ON}, got {loss_on!r}")
    if mask.ndim == 3:
        mask = mask.unsqueeze(1)
    batch, chans, height, width = err.shape
    if mask.ndim != 4 or mask.shape[0] != batch or mask.shape[2:] != (height, width):
        raise ValueError(f"mask {tuple(mask.shape)} does not fit images {tuple(err.shape)}")
    if mask.shape[1] not in (1, chans):
        raise ValueError(f"mask has {mask.shape[1]} channels, images have {chans}")
    weight = mask.to(err.dtype).expand_as(err)
    return (err * weight).sum(), weight.sum()


def reconstruction_loss(
    recon: Tensor, clean: Tensor, mask: Tensor, loss_on: str = "masked"
) -> Tensor:
    """GMML's L1 reconstruction loss.

    As in the reference (``recloss[mask == 1].mean()``), ``"masked"`` averages ``|recon - clean|``
    over the masked pixels of the whole batch, every channel counted; ``"all"`` averages over every
    pixel. Computed in float32 (safe under autocast). A batch with no masked pixel gives 0 rather
    than NaN, without a data-dependent branch (``torch.compile`` friendly).

    Args: as :func:`reconstruction_loss_terms`.

    Returns:
        The scalar loss.
    """
    total, count = reconstruction_loss_terms(recon, clean, mask, loss_on)
    return total / count.clamp_min(1.0)


def param_groups(
    model: nn.Module, weight_decay: float, *, skip: Sequence[str] = ()
) -> list[dict[str, Any]]:
    """AdamW parameter groups with the reference rule for weight decay.

    DINO / GMML ``utils.get_params_groups``, which is timm's ``param_groups_weight_decay``: a
    parameter gets no weight decay when it is 1-D (norm weights) or its name ends with ``.bias``.
    ``cls_token`` ``[1, 1, D]`` and ``pos_embed`` ``[1, 1 + N, D]`` are 3-D and are therefore
    decayed, as in the reference (timm's ``no_weight_decay()`` would exempt them; pass their names
    in ``skip`` to do that). Unlike timm's order, the decayed group comes first, because the
    reference schedules weight decay on group 0 only and saved optimiser states follow this order;
    each group also carries a ``"name"`` ("decay" / "no_decay") so schedules can find it by name.

    Args:
        model: the module to optimise; frozen parameters are left out.
        weight_decay: initial weight decay of the decayed group.
        skip: extra parameter names (fnmatch patterns) to exempt from weight decay.

    Returns:
        ``[{"name": "decay", ...}, {"name": "no_decay", "weight_decay": 0.0, ...}]``.
    """
    # A placeholder decay of 1.0 tells timm's groups apart (at 0, timm would return one group).
    groups = param_groups_weight_decay(model, 1.0, no_weight_decay_list=skip)
    by_decay = {group["weight_decay"]: group["params"] for group in groups}
    return [
        {"name": "decay", "params": by_decay.get(1.0, []), "weight_decay": weight_decay},
        {"name": "no_decay", "params": by_decay.get(0.0, []), "weight_decay": 0.0},
    ]
