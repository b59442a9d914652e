"""Numeric helpers of the generator: clamps and ramps, pixel grids, and texture grids in
patient coordinates (drawn once per patient, sampled bilinearly per image)."""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from scipy import ndimage

# Textures (lung vessels, pathology) are drawn once per patient on grids in patient coordinates,
# so they move with the anatomy between follow-ups, and are sampled bilinearly per image: far
# cheaper than drawing them at full resolution. The grids cover +-_GRID_EXTENT, which holds the
# lungs in every pose.
_GRID_EXTENT = 1.0


def _u(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(rng.uniform(lo, hi))


@lru_cache(maxsize=8)
def _grid_axis(n: int) -> np.ndarray:
    """Patient coordinates of the nodes of an ``[n, n]`` texture grid (covering ±_GRID_EXTENT)."""
    axis = np.linspace(-_GRID_EXTENT, _GRID_EXTENT, n, dtype=np.float32)
    axis.flags.writeable = False
    return axis


def _smooth_noise(rng: np.random.Generator, n: int, sigma: float) -> np.ndarray:
    """An ``[n, n]`` float32 grid of smooth noise scaled to ``[0, 1]``."""
    grid = ndimage.gaussian_filter(rng.standard_normal((n, n)), sigma, mode="wrap")
    grid = (grid - grid.min()) / max(float(np.ptp(grid)), 1e-6)
    return grid.astype(np.float32)


def _splat(grid: np.ndarray, u: np.ndarray, v: np.ndarray, weight: np.ndarray) -> None:
    """Add point masses at ``(u, v)`` into ``grid`` with bilinear weights (in place)."""
    n = grid.shape[0]
    step = (n - 1) / (2 * _GRID_EXTENT)
    gx = np.clip((u + _GRID_EXTENT) * step, 0.0, n - 1.001)
    gy = np.clip((v + _GRID_EXTENT) * step, 0.0, n - 1.001)
    ix, iy = gx.astype(np.intp), gy.astype(np.intp)
    fx, fy = gx - ix, gy - iy
    flat = grid.reshape(-1)
    base = iy * n + ix
    for offset, w in (
        (0, (1 - fx) * (1 - fy)),
        (1, fx * (1 - fy)),
        (n, (1 - fx) * fy),
        (n + 1, fx * fy),
    ):
        flat += np.bincount(base + offset, weights=weight * w, minlength=n * n)


def _clip01(x: np.ndarray) -> np.ndarray:
    # np.clip with two finite bounds takes numpy's fast path (one-sided bounds and
    # np.maximum with a scalar are ~3x slower on float32 here).
    return np.clip(x, 0.0, 1.0, out=x)


def _positive(x: np.ndarray) -> np.ndarray:
    return np.clip(x, 0.0, 3.0e38, out=x)


def _ramp(edge0: float, edge1: float, x: np.ndarray) -> np.ndarray:
    """0 below ``edge0``, 1 above ``edge1``, linear between."""
    return _clip01((x - edge0) * (1.0 / (edge1 - edge0)))


def _smoothstep(edge0: float, edge1: float, x: np.ndarray) -> np.ndarray:
    t = _ramp(edge0, edge1, x)
    return t * t * (3.0 - 2.0 * t)


def _soft(margin: np.ndarray, width: float) -> np.ndarray:
    """Chord-like thickness profile: 0 outside, rising as sqrt(distance) to 1 at ``width``."""
    return np.sqrt(_clip01(margin * (1.0 / width)))


@lru_cache(maxsize=8)
def _pixel_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates in ``[-1, 1]``: ``x`` as ``[1, W]`` and ``y`` as ``[H, 1]``."""
    c = ((np.arange(size, dtype=np.float32) + 0.5) * (2.0 / size) - 1.0).astype(np.float32)
    c.flags.writeable = False
    return c[None, :], c[:, None]


def _bilinear(grid: np.ndarray, gx: np.ndarray, gy: np.ndarray) -> np.ndarray:
    """Bilinear sample of ``grid [ny, nx]`` at fractional indices ``(gx, gy)`` (clamped).

    Not ``scipy.ndimage.map_coordinates(order=1)``: that agrees within 2.4e-7 but is about 3x
    slower on these small grids and moves pixels of the synthetic set, whose bytes the demo and
    the fixtures reproduce exactly.
    """
    ny, nx = grid.shape
    gx = np.clip(gx, 0.0, nx - 1.001, out=gx)
    gy = np.clip(gy, 0.0, ny - 1.001, out=gy)
    fx, fy = np.floor(gx), np.floor(gy)
    idx = (fy * nx + fx).astype(np.intp)
    fx = gx - fx
    fy = gy - fy
    flat = grid.reshape(-1)
    a, b = flat[idx], flat[idx + 1]
    idx += nx
    c, d = flat[idx], flat[idx + 1]
    b -= a
    b *= fx
    a += b  # top row
    d -= c
    d *= fx
    c += d  # bottom row
    c -= a
    c *= fy
    a += c
    return a


def _sample_grid(grid: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Bilinear sample of an ``[n, n]`` texture grid (covering ±_GRID_EXTENT) at ``(u, v)``."""
    step = (grid.shape[-1] - 1) / (2 * _GRID_EXTENT)
    return _bilinear(grid, (u + _GRID_EXTENT) * step, (v + _GRID_EXTENT) * step)
