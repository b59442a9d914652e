"""GMML's reconstruction head (spcxr.models.heads)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from spcxr.models.heads import ReconstructionHead


@pytest.mark.parametrize(
    ("dim", "patch", "chans", "grid"),
    [(192, 16, 1, (4, 4)), (384, 8, 1, (12, 12)), (32, 16, 3, (14, 14)), (32, 8, 1, (4, 6))],
)
def test_output_shape(dim: int, patch: int, chans: int, grid: tuple[int, int]) -> None:
    head = ReconstructionHead(dim, patch, chans)
    tokens = torch.randn(2, grid[0] * grid[1], dim)
    out = head(tokens, grid)
    assert out.shape == (2, chans, grid[0] * patch, grid[1] * patch)
    if grid[0] == grid[1]:
        assert torch.equal(head(tokens), out)  # square grid inferred


def test_layers_and_reference_init() -> None:
    torch.manual_seed(0)
    head = ReconstructionHead(384, 16, 1)
    linears = [m for m in head.mlp if isinstance(m, nn.Linear)]
    assert len(linears) == 3 and sum(isinstance(m, nn.GELU) for m in head.mlp) == 3
    assert isinstance(head.mlp[-1], nn.GELU)  # the last GELU feeds the transposed conv
    weights = torch.cat([m.weight.flatten() for m in linears])
    assert weights.std().item() == pytest.approx(0.02, rel=0.03)
    assert weights.mean().abs().item() < 1e-3
    assert all(torch.count_nonzero(m.bias) == 0 for m in linears)
    conv = head.conv_transpose
    assert conv.kernel_size == (16, 16) and conv.stride == (16, 16)
    assert (conv.in_channels, conv.out_channels) == (384, 1)


def test_each_token_paints_only_its_own_patch() -> None:
    torch.manual_seed(1)
    patch, grid = 4, (3, 5)
    head = ReconstructionHead(16, patch, 2).eval()
    tokens = torch.randn(1, grid[0] * grid[1], 16)
    base = head(tokens, grid)
    for i, j in [(0, 0), (1, 3), (2, 4)]:
        changed = tokens.clone()
        changed[0, i * grid[1] + j] += 1.0  # token (i, j) in row-major order
        diff = (head(changed, grid) - base).abs()[0]
        inside = diff[:, i * patch : (i + 1) * patch, j * patch : (j + 1) * patch]
        assert inside.min() > 0  # every pixel of the patch moves
        outside = diff.clone()
        outside[:, i * patch : (i + 1) * patch, j * patch : (j + 1) * patch] = 0
        assert torch.count_nonzero(outside) == 0


def test_matches_per_token_linear_unpatchify() -> None:
    # Hand computation: pixel block of token (i, j) = W^T mlp(token) + b, W [D, C, p, p].
    torch.manual_seed(2)
    dim, patch, chans, grid = 8, 4, 3, (2, 3)
    head = ReconstructionHead(dim, patch, chans)
    tokens = torch.randn(2, grid[0] * grid[1], dim)
    out = head(tokens, grid)
    hidden = head.mlp(tokens)  # [B, N, D]
    weight, bias = head.conv_transpose.weight, head.conv_transpose.bias
    for i in range(grid[0]):
        for j in range(grid[1]):
            block = torch.einsum("bd,dcpq->bcpq", hidden[:, i * grid[1] + j], weight)
            block = block + bias[None, :, None, None]
            got = out[:, :, i * patch : (i + 1) * patch, j * patch : (j + 1) * patch]
            torch.testing.assert_close(got, block, rtol=1e-5, atol=1e-6)


def test_mlp_is_per_token() -> None:
    head = ReconstructionHead(8, 2, 1, n_layers=2)
    tokens = torch.randn(1, 4, 8)
    assert len(head.mlp) == 4
    torch.testing.assert_close(head.mlp(tokens)[0, 2], head.mlp(tokens[:, 2:3])[0, 0])


def test_bad_grid_is_rejected() -> None:
    head = ReconstructionHead(8, 2, 1)
    with pytest.raises(ValueError, match="does not hold 6 tokens"):
        head(torch.randn(1, 6, 8))
    with pytest.raises(ValueError, match="does not hold 6 tokens"):
        head(torch.randn(1, 6, 8), (2, 2))
    with pytest.raises(ValueError, match="n_layers"):
        ReconstructionHead(8, 2, 1, n_layers=-1)
