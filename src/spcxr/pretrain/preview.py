"""Reconstruction previews: clean | corrupted | reconstruction | mask for a few fixed images."""

from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure  # object API: no pyplot state, no GUI backend
from torch import Tensor

from spcxr.atomic import atomic_path
from spcxr.data.augment import AugmentConfig, denormalize

COLUMNS = ("clean", "corrupted", "reconstruction", "recon. in mask", "mask")


def save_preview(
    path: str | Path,
    clean: Tensor,
    corrupted: Tensor,
    recon: Tensor,
    mask: Tensor,
    augment: AugmentConfig,
    *,
    title: str = "",
) -> Path:
    """Write one row per image: clean view, corruption, reconstruction, reconstruction inside
    the mask (clean pixels elsewhere, as MAE-style figures show it), mask.

    Intensities are shown in [0, 1] (normalisation undone, first channel). With the default
    masked-pixel loss the model is never asked to reproduce visible pixels, so the raw
    reconstruction is only meaningful inside the mask.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean01 = denormalize(clean[:, :1].float(), augment)
    recon01 = denormalize(recon[:, :1].float(), augment)
    inside = mask[:, :1].bool()
    panels = [
        clean01,
        denormalize(corrupted[:, :1].float(), augment),
        recon01,
        recon01.where(inside, clean01),
        inside.float(),
    ]
    panels = [p.clamp(0, 1).cpu() for p in panels]
    n = clean.shape[0]
    fig = Figure(figsize=(2 * len(COLUMNS), 2 * n + 0.4))
    axes = fig.subplots(n, len(COLUMNS), squeeze=False)
    for i in range(n):
        for j, panel in enumerate(panels):
            ax = axes[i, j]
            ax.imshow(panel[i, 0].numpy(), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(COLUMNS[j], fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=80, format="png")
    return path
