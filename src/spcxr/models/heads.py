"""Heads on top of ViT tokens.

``ReconstructionHead`` is GMML's image-reconstruction head (``RECHead`` in the reference code of
Atito, Awais, Kittler, "GMML is all you need", ICIP 2023): a per-token MLP followed by a
transposed convolution whose kernel and stride equal the patch size, so each token paints
exactly its own patch of pixels.
"""

from __future__ import annotations

import math

from timm.layers import trunc_normal_
from torch import Tensor, nn

__all__ = ["ReconstructionHead"]


class ReconstructionHead(nn.Module):
    """Maps patch tokens ``[B, N, D]`` back to an image ``[B, C, h * p, w * p]``.

    ``n_layers`` x (Linear D -> D, GELU) per token, then ``ConvTranspose2d(D, C, kernel=stride=p)``
    on the token grid ``[B, D, h, w]``. As in the reference, the Linear weights start from a
    truncated normal with std 0.02 and zero biases; the transposed convolution keeps PyTorch's
    default initialisation (the reference creates it after applying its init).

    Args:
        embed_dim: token width D.
        patch_size: patch side p in pixels.
        out_chans: image channels C to reconstruct (1 for grayscale chest X-rays).
        n_layers: number of Linear + GELU layers (3 in the reference).
    """

    def __init__(self, embed_dim: int, patch_size: int, out_chans: int, n_layers: int = 3) -> None:
        super().__init__()
        if n_layers < 0:
            raise ValueError(f"n_layers must be >= 0, got {n_layers}")
        layers: list[nn.Module] = []
        for _ in range(n_layers):
            layers += [nn.Linear(embed_dim, embed_dim), nn.GELU()]
        self.mlp = nn.Sequential(*layers)
        self.mlp.apply(self._init_weights)
        self.patch_size = patch_size
        self.conv_transpose = nn.ConvTranspose2d(
            embed_dim, out_chans, kernel_size=patch_size, stride=patch_size
        )

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            trunc_normal_(module.weight, std=0.02)
            nn.init.zeros_(module.bias)

    def forward(self, tokens: Tensor, grid_size: tuple[int, int] | None = None) -> Tensor:
        """Reconstructs the image.

        Args:
            tokens: patch tokens ``[B, N, D]`` in row-major grid order (no CLS token).
            grid_size: ``(h, w)`` with ``h * w == N``; ``None`` assumes a square grid.

        Returns:
            The image ``[B, C, h * p, w * p]``.
        """
        batch, n_tokens, dim = tokens.shape
        if grid_size is None:
            side = math.isqrt(n_tokens)
            grid_size = (side, side)
        if grid_size[0] * grid_size[1] != n_tokens:
            raise ValueError(f"grid {grid_size} does not hold {n_tokens} tokens")
        x = self.mlp(tokens)  # [B, N, D]
        x = x.transpose(1, 2).reshape(batch, dim, *grid_size)  # [B, D, h, w]
        return self.conv_transpose(x)  # [B, C, h*p, w*p]
