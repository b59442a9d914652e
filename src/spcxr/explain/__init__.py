"""Explanation maps for classifiers (Integrated Gradients per ViT patch) and overlay images."""

from spcxr.explain.heatmaps import (
    Explanation,
    explain,
    explained_score,
    heatmap_overlay,
    mask_overlay,
    normalize_maps,
    save_png,
    upsample_maps,
)

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
