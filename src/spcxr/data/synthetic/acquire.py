"""A site's detector and display (``SiteProfile``): window, gamma, heel-effect ramp, blur,
noise, offset and an optional burned-in corner marker (a shortcut a classifier can learn, as
the text and arrows of public COVID collections are)."""

from __future__ import annotations

import math
import zlib
from functools import lru_cache

import numpy as np

from spcxr.data.synthetic.config import SiteProfile
from spcxr.data.synthetic.grids import _clip01, _pixel_grid


@lru_cache(maxsize=64)
def _marker_glyphs(site: str) -> np.ndarray:
    """A fixed text-like pattern per site name (crc32-seeded, so stable across runs)."""
    rng = np.random.default_rng(zlib.crc32(site.encode()))
    glyphs = rng.random((5, 14)) < 0.45
    glyphs[:, 3::4] = False  # gaps between "letters"
    glyphs.flags.writeable = False
    return glyphs


def _burn_marker(image: np.ndarray, corner: str, glyphs: np.ndarray) -> None:
    size = image.shape[0]
    h, w = max(4, round(0.07 * size)), max(8, round(0.17 * size))
    margin = max(1, round(0.035 * size))
    top = margin if corner.startswith("top") else size - margin - h
    left = margin if corner.endswith("left") else size - margin - w
    box = np.full((h, w), 0.93, dtype=np.float32)
    gh, gw = glyphs.shape
    cell_h, cell_w = max(1, (h - 2) // gh), max(1, (w - 2) // gw)
    text = np.kron(glyphs, np.ones((cell_h, cell_w), dtype=bool))[: h - 2, : w - 2]
    box[1 : 1 + text.shape[0], 1 : 1 + text.shape[1]][text] = 0.12
    image[top : top + h, left : left + w] = box


def _gaussian_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur (edge padding), kernel radius 3 sigma.

    Shifted-slice sums in float32: several times faster than ``scipy.ndimage.gaussian_filter``
    for the small kernels of detector blur (it works line by line in float64), and keeps the
    synthetic set's bytes (scipy's result differs in the last bit of some pixels).
    """
    radius = max(1, round(3.0 * sigma))
    taps = np.exp(-0.5 * (np.arange(radius + 1) / sigma) ** 2)
    weights = (taps / (taps[0] + 2.0 * taps[1:].sum())).tolist()  # Python floats keep float32
    h, w = image.shape
    padded = np.pad(image, radius, mode="edge")
    rows = padded[:, radius : radius + w] * weights[0]
    for i in range(1, radius + 1):
        rows += weights[i] * (
            padded[:, radius - i : radius - i + w] + padded[:, radius + i : radius + i + w]
        )
    out = rows[radius : radius + h] * weights[0]
    for i in range(1, radius + 1):
        out += weights[i] * (rows[radius - i : radius - i + h] + rows[radius + i : radius + i + h])
    return out


def _unit_noise(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """Zero-mean, unit-variance noise: the sum of two uniform bytes (a triangular law).

    Indistinguishable from Gaussian noise on an image and ~10x cheaper than
    ``rng.standard_normal``: one call for raw random bytes, one conversion.
    """
    raw = np.frombuffer(rng.bytes(2 * shape[0] * shape[1]), dtype=np.uint8).reshape(2, *shape)
    noise = raw[0].astype(np.float32)
    noise += raw[1]
    noise -= 255.0
    noise *= 1.0 / math.sqrt(2 * (256**2 - 1) / 12)  # std of a sum of two uniform bytes
    return noise


def acquire(
    attenuation: np.ndarray,
    profile: SiteProfile,
    exposure: float,
    rng: np.random.Generator,
    site: str = "",
    exposure_tilt: tuple[float, float] = (0.0, 0.0),
) -> np.ndarray:
    """Detector and display of one site: attenuation -> float32 image in ``[0, 1]``."""
    size = attenuation.shape[0]
    x, y = _pixel_grid(size)
    # Detector signal 1 - exp(-exposure * A), plus 3 % scatter fog (air is never perfectly
    # black), then the site's window: folded into one affine map of exp(-exposure * A).
    field = (-exposure * exposure_tilt[0]) * x - exposure
    field = field + (-exposure * exposure_tilt[1]) * y  # [H, W]
    image = np.multiply(attenuation, field, out=field)
    image = np.exp(image, out=image)
    lo, hi = profile.window
    gain = 0.97 / (hi - lo)
    image *= -gain
    image += (1.0 - lo) / (hi - lo)
    image = _clip01(image)
    if profile.gamma != 1.0:
        image = image**profile.gamma
    if profile.gradient:
        image += profile.gradient * y
    if profile.blur_sigma > 0:
        # At least half a pixel: the detector integrates over its pixel, and point-sampled ribs
        # would alias at small sizes.
        image = _gaussian_blur(image, max(profile.blur_sigma * size / 256.0, 0.5))
    if profile.noise_std > 0:
        image += (profile.noise_std * (0.6 + 0.8 * image)) * _unit_noise(rng, image.shape)
    image = _clip01(image + profile.offset)
    if profile.marker is not None:
        _burn_marker(image, profile.marker, _marker_glyphs(site))
    return image
