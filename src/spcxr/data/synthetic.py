"""Embedded synthetic chest radiographs: the data set spcxr runs on when no real data is present.

A phantom generator draws PA (and some AP) chest radiographs with anatomy-like structure, exact
lung masks, three labels and several acquisition sites, so that the demo, the tests and CI
exercise every stage of the pipeline (GMML pretraining, classification, lung segmentation,
drift across hospitals, follow-up images for patient-level splits and deduplication) without
any real image. Everything is deterministic from a seed.

Conventions
    Images are float32 ``[H, W]`` in ``[0, 1]``, higher = more attenuation (bone and soft tissue
    bright, air and lungs dark), as a PA chest radiograph is displayed. Image left is the
    patient's right. Masks are bool ``[H, W]``: the lung fields exactly as drawn (pathology never
    changes them; the retro-cardiac lung is excluded, as in the Shenzhen/JSRT-style masks).

Labels
    ``normal``; ``consolidation`` (one or two dense, irregular, soft-edged patches in one lung,
    sometimes bounded by a fissure: lobar pneumonia); ``bilateral_opacities`` (patchy
    ground-glass haze in both lungs, peripheral and lower-zone predominant: the COVID-19
    pattern). ``severity`` (0..1, the fraction of air replaced) makes them subtle or obvious.

How an image is made (vectorised numpy on coordinate grids, no per-pixel Python)
    1. ``sample_anatomy``: one patient's anatomy in patient coordinates ``(u, v)`` (``u`` from
       image left to right, ``v`` from top to bottom, both about ``[-1, 1]``): body envelope
       with shoulders and arms, two lungs (rounded apices, costophrenic angles, domes with the
       right one higher), heart (bulging to the image right) and aortic knob indenting the left
       lung, posterior and anterior ribs, clavicles, scapulae, spine, trachea, gastric bubble,
       and a texture grid of branching vessels fanning out from the hila.
    2. ``sample_pose`` / ``followup_pose``: position, rotation, magnification (AP views are
       magnified), exposure and depth of inspiration of one film.
    3. ``sample_pathology``: lesions of the label; ``Pathology.evolved`` for follow-ups.
    4. ``render_attenuation``: a line-integral map (soft tissue + bone - lung air + disease)
       and the lung mask; the detector shows ``1 - exp(-exposure * A)``.
    5. ``acquire``: the site's acquisition (``SiteProfile``): window, gamma, heel-effect ramp,
       blur, noise, offset and an optional burned-in corner marker (a shortcut a classifier can
       learn, as the text and arrows of public COVID collections are).

``generate_case`` draws one case; ``iter_synthetic_cases`` the patients of a
``SyntheticConfig``; ``write_synthetic_dataset`` writes 16-bit PNG images, 8-bit masks and a
``manifest.csv`` with the columns the generic CSV source adapter reads.
"""

from __future__ import annotations

import csv
import math
import os
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from functools import cache, lru_cache
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from spcxr.atomic import naming

LABELS = ("normal", "consolidation", "bilateral_opacities")
MANIFEST_COLUMNS = ("file", "mask_file", "label", "patient_id", "site", "view", "sex", "age")
VIEWS = ("PA", "AP")
CORNERS = ("top_left", "top_right", "bottom_left", "bottom_right")

# Attenuation of soft tissue through the thickest part of the chest, and the fraction of it that
# fully aerated lung removes: chosen so that the mediastinum displays at ~0.85 and the lungs at
# ~0.35 with unit exposure, the look of a normally exposed PA film.
_SOFT_TISSUE = 1.9
_LUNG_AIR = 0.74
# Textures (lung vessels, pathology) are drawn once per patient on grids in patient coordinates,
# so they move with the anatomy between follow-ups, and are sampled bilinearly per image: far
# cheaper than drawing them at full resolution. The grids cover +-_GRID_EXTENT, which holds the
# lungs in every pose.
_GRID_EXTENT = 1.0
_TEXTURE_SIZE = 128
_PATHOLOGY_SIZE = 96


# ----------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SiteProfile:
    """Acquisition of one synthetic hospital: what makes its images drift from the others.

    Attributes:
        gamma: display gamma applied after windowing (> 1 darkens mid-tones, more contrast in
            bright regions; < 1 washes out).
        window: detector signal mapped to ``[0, 1]`` (lower, upper); narrower = more contrast.
        noise_std: standard deviation of the additive quantum-like noise, in display units.
        blur_sigma: Gaussian blur in pixels at 256 px (scaled with the image size, at least
            0.5 px when > 0): resolution.
        offset: intensity offset added after noise (a different display calibration).
        gradient: top-to-bottom intensity ramp amplitude (anode heel effect / uneven exposure).
        marker: corner of a burned-in text-like label, or ``None``.
        ap_fraction: probability that an image is an AP (portable) view instead of PA.
    """

    gamma: float = 1.0
    window: tuple[float, float] = (0.0, 1.0)
    noise_std: float = 0.01
    blur_sigma: float = 0.5
    offset: float = 0.0
    gradient: float = 0.0
    marker: str | None = None
    ap_fraction: float = 0.1

    def __post_init__(self) -> None:
        object.__setattr__(self, "window", tuple(self.window))  # YAML gives lists
        lo, hi = self.window
        if not 0.0 <= lo < hi <= 1.5:
            raise ValueError(
                f"SiteProfile.window must satisfy 0 <= lower < upper <= 1.5, got {self.window}"
            )
        if self.gamma <= 0 or self.noise_std < 0 or self.blur_sigma < 0:
            raise ValueError(
                "SiteProfile: gamma must be > 0, noise_std and blur_sigma >= 0, got "
                f"gamma={self.gamma}, noise_std={self.noise_std}, blur_sigma={self.blur_sigma}"
            )
        if self.marker is not None and self.marker not in CORNERS:
            raise ValueError(
                f"SiteProfile.marker must be one of {CORNERS} or None, got {self.marker!r}"
            )
        if not 0.0 <= self.ap_fraction <= 1.0:
            raise ValueError(f"SiteProfile.ap_fraction must be in [0, 1], got {self.ap_fraction}")


def default_site_profiles() -> dict[str, SiteProfile]:
    """Three hospitals that differ the way real ones do (contrast, noise, resolution, labels).

    ``site_a`` is a clean modern DR unit; ``site_b`` an older, noisier, blurrier CR unit with a
    washed-out display; ``site_c`` a high-contrast unit that burns a marker into the corner and
    images many patients AP at the bedside (like the portable COVID films in public sets).
    """
    return {
        "site_a": SiteProfile(
            gamma=1.0, window=(0.02, 0.98), noise_std=0.008, blur_sigma=0.45, ap_fraction=0.05
        ),
        "site_b": SiteProfile(
            gamma=0.75,
            window=(0.0, 1.05),
            noise_std=0.028,
            blur_sigma=1.3,
            offset=0.04,
            gradient=0.05,
            ap_fraction=0.15,
        ),
        "site_c": SiteProfile(
            gamma=1.45,
            window=(0.12, 0.95),
            noise_std=0.016,
            blur_sigma=0.7,
            offset=-0.02,
            marker="top_right",
            ap_fraction=0.45,
        ),
    }


def default_class_weights() -> dict[str, dict[str, float]]:
    """Label prevalence per site: different on purpose, so that drift experiments see it."""
    return {
        "site_a": {"normal": 0.5, "consolidation": 0.3, "bilateral_opacities": 0.2},
        "site_b": {"normal": 0.4, "consolidation": 0.4, "bilateral_opacities": 0.2},
        "site_c": {"normal": 0.3, "consolidation": 0.2, "bilateral_opacities": 0.5},
    }


@dataclass
class SyntheticConfig:
    """What ``write_synthetic_dataset`` generates.

    Attributes:
        n_patients: number of patients; patient ``i`` goes to site ``sites[i % len(sites)]``.
        images_per_patient: inclusive range of images (follow-ups) per patient.
        size: image side in pixels (square images).
        sites: site names; each needs a profile in ``site_profiles``.
        classes: labels to draw, a subset of ``LABELS``.
        class_weights: per site, label -> prevalence (renormalised over ``classes``); a site
            missing here gets equal weights.
        seed: root seed; patient ``i`` is drawn from ``SeedSequence([seed, i])``, so adding
            patients never changes the earlier ones.
        severity: range of pathology severity (0 = invisible, 1 = as dense as soft tissue).
        age_range: inclusive range of ages in years; ages below 16 get pediatric proportions.
        site_profiles: acquisition per site.
        id_prefix: first part of patient ids (``synth-site_a-00012``).
        png_compress_level: zlib level of the written PNGs. 0 stores the noisy 16-bit pixels
            uncompressed: deflate saves only ~2 % on them and would cost more time than
            generating the image.
    """

    n_patients: int = 120
    images_per_patient: tuple[int, int] = (1, 3)
    size: int = 256
    sites: tuple[str, ...] = ("site_a", "site_b", "site_c")
    classes: tuple[str, ...] = LABELS
    class_weights: dict[str, dict[str, float]] = field(default_factory=default_class_weights)
    seed: int = 0
    severity: tuple[float, float] = (0.35, 0.8)
    age_range: tuple[int, int] = (18, 90)
    site_profiles: dict[str, SiteProfile] = field(default_factory=default_site_profiles)
    id_prefix: str = "synth"
    png_compress_level: int = 0

    def __post_init__(self) -> None:
        # Accept what a YAML file gives: lists for tuples, mappings for site profiles.
        for name in ("images_per_patient", "sites", "classes", "severity", "age_range"):
            setattr(self, name, tuple(getattr(self, name)))
        self.site_profiles = {
            site: p if isinstance(p, SiteProfile) else SiteProfile(**p)
            for site, p in self.site_profiles.items()
        }
        lo, hi = self.images_per_patient
        if self.n_patients < 1:
            raise ValueError(f"SyntheticConfig.n_patients must be >= 1, got {self.n_patients}")
        if not 1 <= lo <= hi:
            raise ValueError(
                f"SyntheticConfig.images_per_patient must be (lo, hi) with 1 <= lo <= hi, "
                f"got {self.images_per_patient}"
            )
        if self.size < 32:
            raise ValueError(f"SyntheticConfig.size must be >= 32 pixels, got {self.size}")
        if not self.sites:
            raise ValueError("SyntheticConfig.sites is empty")
        unknown = [c for c in self.classes if c not in LABELS]
        if unknown or not self.classes:
            raise ValueError(
                f"SyntheticConfig.classes must be a non-empty subset of {LABELS}, got {self.classes}"
            )
        missing = [s for s in self.sites if s not in self.site_profiles]
        if missing:
            raise ValueError(
                f"SyntheticConfig: no site profile for {missing}; known: {sorted(self.site_profiles)}"
            )
        if not 0.0 <= self.severity[0] <= self.severity[1] <= 1.5:
            raise ValueError(
                f"SyntheticConfig.severity must be a range in [0, 1.5], got {self.severity}"
            )
        if not 0 <= self.age_range[0] <= self.age_range[1]:
            raise ValueError(
                f"SyntheticConfig.age_range must be (lo, hi) with 0 <= lo <= hi, got {self.age_range}"
            )
        if not 0 <= self.png_compress_level <= 9:
            raise ValueError(
                f"SyntheticConfig.png_compress_level must be in 0..9, got {self.png_compress_level}"
            )
        for site in self.sites:
            self.label_probabilities(site)  # raises on bad weights

    def label_probabilities(self, site: str) -> np.ndarray:
        """Probabilities of ``classes`` at ``site`` (float64, sums to 1)."""
        weights = self.class_weights.get(site)
        if weights is None:
            return np.full(len(self.classes), 1.0 / len(self.classes))
        p = np.array([float(weights.get(c, 0.0)) for c in self.classes])
        if (p < 0).any() or p.sum() <= 0:
            raise ValueError(
                f"SyntheticConfig.class_weights[{site!r}] must be >= 0 with a positive sum over "
                f"{self.classes}, got {weights}"
            )
        return p / p.sum()


# ----------------------------------------------------------------------------------------------
# Patient anatomy, pose and pathology parameters
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Lung:
    """One lung field in lung-local coordinates: ``s`` = distance from the midline (outward).

    The lateral edge grows from the apex like a quarter circle (rounded apex) to ``lateral`` at
    the costophrenic angle; the medial edge turns in to ``medial`` within ``medial_turn`` of the
    height; the floor is a diaphragm dome ``v = dome_top + dome_curvature * (s - dome_center)^2``.
    """

    top: float
    apex: float
    medial: float
    lateral: float
    medial_turn: float
    dome_top: float
    dome_center: float
    dome_curvature: float


@dataclass(frozen=True, eq=False)
class Anatomy:
    """Everything about one patient that does not change between follow-up images."""

    sex: str
    age: int
    scale: float
    neck_half_width: float
    chest_half_width: float
    shoulder_v: float
    arms: bool  # arms beside the chest (else air between the chest wall and the image edge)
    right_lung: Lung  # the patient's right = image left
    left_lung: Lung
    heart_center: tuple[float, float]
    heart_radii: tuple[float, float]
    heart_tilt: float  # radians; the long axis runs from the upper right to the apex lower left
    aortic_knob: tuple[float, float, float]  # u, v, radius
    rib_start: float
    rib_spacing: float
    rib_growth: float  # relative widening of each successive intercostal space
    rib_curvature: float
    rib_peak: float
    rib_radius: float
    n_ribs: int
    anterior_start: float
    anterior_spacing: float
    anterior_slope: float
    clavicle_v: float
    clavicle_rise: float
    scapula_a: float  # |u| of the scapula's medial border at the shoulder
    spine_half_width: float
    hilum_v: float
    gastric_bubble: bool
    # [n, n] grid in patient coordinates: attenuation a fully aerated lung removes per unit of
    # depth, i.e. soft tissue x chest thickness x (1 - vessels, hila, parenchymal texture).
    lung_air: np.ndarray = field(repr=False, default_factory=lambda: np.zeros((1, 1), np.float32))


@dataclass(frozen=True)
class Pose:
    """One exposure: where the patient stood and how the film was exposed."""

    view: str = "PA"
    shift: tuple[float, float] = (0.0, 0.0)
    rotation: float = 0.0  # degrees
    magnification: float = 1.0
    exposure: float = 1.0
    # Relative change of the exposure across the image (per unit x, y): tube angle, anode heel
    # effect, scatter; it differs between any two films.
    exposure_tilt: tuple[float, float] = (0.0, 0.0)
    inspiration: float = 0.0  # downward shift of the domes (deeper breath = positive)


@dataclass(frozen=True, eq=False)
class Lesion:
    """A focal consolidation: a cluster of soft blobs in one lung, maybe cut by a fissure.

    ``blobs`` is ``[k, 4]``: offset along / across the lesion axes (in radii), blob radius (in
    radii) and weight.
    """

    side: int  # -1: patient's right lung (image left), +1: left lung (image right)
    center: tuple[float, float]  # (u, v) patient coordinates
    radii: tuple[float, float]
    angle: float  # radians
    blobs: np.ndarray
    fissure: float | None = None  # v of a fissure that bounds the lesion sharply
    fissure_keeps_below: bool = True


@dataclass(frozen=True, eq=False)
class Pathology:
    """The disease in one image: label, severity and its lesions or opacity pattern."""

    label: str
    severity: float = 0.0
    lesions: tuple[Lesion, ...] = ()
    noise: np.ndarray | None = None  # [2, n, n] outline irregularity, patchiness/mottling

    def evolved(self, factor: float) -> Pathology:
        """The same disease ``factor`` times as severe (a follow-up); lesions grow slowly."""
        grow = factor**0.25
        lesions = tuple(
            replace(lesion, radii=(lesion.radii[0] * grow, lesion.radii[1] * grow))
            for lesion in self.lesions
        )
        severity = float(np.clip(self.severity * factor, 0.0, 1.5))
        return replace(self, severity=severity, lesions=lesions)


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


def _vessel_tree(
    rng: np.random.Generator, hilum: tuple[float, float], generations: int = 5
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Points ``(s, v, width)`` along a randomly branching vessel tree rooted at a hilum.

    Pulmonary vessels fan out from the hilum and taper as they branch (each generation is
    shorter and thinner); this is what gives a real lung its linear "markings".
    """
    n_trunks = 8
    angle = np.linspace(-1.55, 1.4, n_trunks) + rng.normal(0.0, 0.12, n_trunks)
    # Trunks leave from along the hilum (a vertical stretch), not from one point.
    s = hilum[0] + rng.uniform(-0.04, 0.03, n_trunks)
    v = hilum[1] + np.linspace(-0.12, 0.1, n_trunks) + rng.normal(0.0, 0.02, n_trunks)
    length = rng.uniform(0.08, 0.13, n_trunks)
    width = np.ones(n_trunks)
    samples = np.linspace(0.0, 1.0, 6, endpoint=False)[None, :]
    points_s, points_v, weights = [], [], []
    for _ in range(generations):
        end_s, end_v = s + length * np.cos(angle), v + length * np.sin(angle)
        points_s.append((s[:, None] + (end_s - s)[:, None] * samples).ravel())
        points_v.append((v[:, None] + (end_v - v)[:, None] * samples).ravel())
        # Weight per point = width x length per point: constant density along a vessel.
        weights.append(np.repeat(width * length / samples.size, samples.size))
        k = len(s)
        spread = rng.uniform(0.3, 0.7, k)
        turn = rng.normal(0.0, 0.1, k)
        angle = np.concatenate([angle + turn + 0.3 * spread, angle + turn - 0.7 * spread])
        s, v = np.tile(end_s, 2), np.tile(end_v, 2)
        length = np.tile(length, 2) * rng.uniform(0.7, 0.9, 2 * k)
        width = np.tile(width, 2) * 0.72
    return np.concatenate(points_s), np.concatenate(points_v), np.concatenate(weights)


def _lung_texture(rng: np.random.Generator, hilum_v: float) -> np.ndarray:
    """The patient's lung texture grid: vessel trees of both lungs, hilar shadows, mottling.

    Values are the fraction of the lung's air that is "put back" by tissue at that point.
    """
    n = _TEXTURE_SIZE
    grid = np.zeros((n, n), dtype=np.float64)
    for side in (-1.0, 1.0):
        hilum = (0.17, hilum_v + (-0.03 if side > 0 else 0.0))  # the left hilum sits higher
        s, v, w = _vessel_tree(rng, hilum)
        _splat(grid, side * s, v, w)
    # A blurred line of unit width peaks at ~0.57 / cell after splatting: x cell -> ~0.57 x width.
    cell = 2 * _GRID_EXTENT / (n - 1)
    vessels = ndimage.gaussian_filter(grid, 0.7) * (1.0 / cell)
    axis = _grid_axis(n)
    r2 = (np.abs(axis[None, :]) - 0.17) ** 2 + (axis[:, None] - hilum_v) ** 2
    hila = np.exp(r2 * -45.0)
    mottle = _sample_grid(_smooth_noise(rng, 24, 0.8), axis[None, :], axis[:, None])
    texture = 0.32 * np.minimum(vessels, 1.2) + 0.2 * hila + 0.12 * (mottle - 0.5)
    return np.clip(texture, -0.2, 0.85).astype(np.float32)


def _lung_air(anatomy: Anatomy, texture: np.ndarray) -> np.ndarray:
    """Attenuation removed per unit lung depth, on the texture grid (see ``Anatomy.lung_air``)."""
    axis = _grid_axis(texture.shape[0])
    torso, _ = _body(anatomy, axis[None, :], np.abs(axis[None, :]), axis[:, None])
    return ((_SOFT_TISSUE * _LUNG_AIR) * torso * (1.0 - texture)).astype(np.float32)


def sample_anatomy(rng: np.random.Generator, sex: str = "M", age: int = 45) -> Anatomy:
    """Draw one patient's anatomy.

    Proportions follow a normal adult PA film: cardiothoracic ratio ~0.4-0.5, right dome about
    half an interspace higher than the left, about ten posterior ribs above the diaphragm. Ages
    below 16 get pediatric proportions (relatively larger heart, more horizontal ribs).
    """
    pediatric = age < 16
    scale = _u(rng, 0.86, 1.08) * (0.96 if sex == "F" else 1.0)
    top = _u(rng, -0.86, -0.7)
    dome_right = _u(rng, 0.26, 0.46)
    dome_left = dome_right + _u(rng, 0.03, 0.08)
    curvature = _u(rng, 1.4, 2.2)
    lateral = _u(rng, 0.68, 0.82)
    right = Lung(
        top=top,
        apex=_u(rng, 0.26, 0.33),
        medial=_u(rng, 0.06, 0.09),
        lateral=lateral,
        medial_turn=_u(rng, 0.15, 0.25),
        dome_top=dome_right,
        dome_center=_u(rng, 0.36, 0.44),
        dome_curvature=curvature,
    )
    left = Lung(
        top=top + _u(rng, -0.01, 0.03),
        apex=_u(rng, 0.26, 0.33),
        medial=_u(rng, 0.07, 0.1),
        lateral=lateral - _u(rng, 0.0, 0.04),
        medial_turn=_u(rng, 0.15, 0.25),
        dome_top=dome_left,
        dome_center=_u(rng, 0.4, 0.48),
        dome_curvature=curvature * _u(rng, 0.9, 1.1),
    )
    heart_scale = _u(rng, 0.88, 1.1) * (1.12 if pediatric else 1.0)
    knob = _u(rng, 0.1, 0.13)
    hilum_v = _u(rng, -0.12, 0.0)
    anatomy = Anatomy(
        sex=sex,
        age=int(age),
        scale=scale,
        neck_half_width=_u(rng, 0.16, 0.24),
        chest_half_width=lateral + _u(rng, 0.06, 0.14),
        shoulder_v=top - _u(rng, 0.0, 0.08),
        arms=bool(rng.random() < 0.7),
        right_lung=right,
        left_lung=left,
        heart_center=(_u(rng, 0.08, 0.12), dome_left - _u(rng, 0.1, 0.16)),
        heart_radii=(0.36 * heart_scale, 0.28 * heart_scale),
        heart_tilt=math.radians(_u(rng, 10.0, 25.0)),
        aortic_knob=(left.medial - knob + _u(rng, 0.025, 0.05), _u(rng, -0.4, -0.3), knob),
        rib_start=top - _u(rng, 0.02, 0.06),
        rib_spacing=_u(rng, 0.085, 0.1),
        rib_growth=_u(rng, 0.05, 0.09),
        rib_curvature=_u(rng, 0.8, 1.1) * (0.55 if pediatric else 1.0),
        rib_peak=_u(rng, 0.14, 0.2),
        rib_radius=_u(rng, 0.022, 0.028),
        n_ribs=int(rng.integers(10, 12)),
        anterior_start=top + _u(rng, 0.12, 0.18),
        anterior_spacing=_u(rng, 0.15, 0.19),
        anterior_slope=_u(rng, 0.35, 0.55),
        clavicle_v=top + _u(rng, 0.12, 0.2),
        clavicle_rise=_u(rng, 0.12, 0.22),
        scapula_a=lateral - _u(rng, 0.06, 0.14),
        spine_half_width=_u(rng, 0.045, 0.06),
        hilum_v=hilum_v,
        gastric_bubble=bool(rng.random() < 0.6),
    )
    # Drawn last: the texture needs the finished anatomy (chest thickness under the lungs).
    return replace(anatomy, lung_air=_lung_air(anatomy, _lung_texture(rng, hilum_v)))


def sample_pose(rng: np.random.Generator, view: str = "PA") -> Pose:
    """Draw the pose of a first image: small shifts, a few degrees of rotation, exposure."""
    if view not in VIEWS:
        raise ValueError(f"view must be one of {VIEWS}, got {view!r}")
    return Pose(
        view=view,
        shift=(float(rng.normal(0.0, 0.04)), float(rng.normal(0.02, 0.05))),
        rotation=float(np.clip(rng.normal(0.0, 2.0), -5.0, 5.0)),
        magnification=_view_magnification(view) * _u(rng, 0.98, 1.02),
        exposure=_u(rng, 0.85, 1.15),
        exposure_tilt=_tilt(rng),
        inspiration=float(rng.normal(0.0, 0.02)),
    )


def followup_pose(
    base: Pose, rng: np.random.Generator, view: str | None = None, direction: float | None = None
) -> Pose:
    """Another image of the same patient: the base pose with small changes (never identical).

    The patient is re-positioned by 0.035-0.05 (4.5-6.5 px at 256 px) towards ``direction``
    (radians; random if None) and turned by 0.8-2 degrees: enough that near-duplicate
    detection (32 x 32 rank thumbnails, correlation >= 0.98) does not merge follow-ups, as it
    must not for real follow-up films, while the images stay strongly correlated. A change of
    view (PA <-> AP) changes the magnification too.
    """
    view = base.view if view is None else view
    if view not in VIEWS:
        raise ValueError(f"view must be one of {VIEWS}, got {view!r}")
    magnification = base.magnification / _view_magnification(base.view) * _view_magnification(view)
    distance = _u(rng, 0.04, 0.055)
    direction = _u(rng, 0.0, 2.0 * math.pi) if direction is None else direction
    sign = 1.0 if rng.random() < 0.5 else -1.0
    return Pose(
        view=view,
        shift=(
            base.shift[0] + distance * math.cos(direction),
            base.shift[1] + distance * math.sin(direction),
        ),
        rotation=base.rotation + sign * _u(rng, 1.0, 2.5),
        magnification=magnification * _u(rng, 0.985, 1.015),
        exposure=base.exposure * _u(rng, 0.9, 1.1),
        exposure_tilt=_tilt(rng),
        inspiration=base.inspiration + _u(rng, -0.03, 0.03),
    )


def _tilt(rng: np.random.Generator) -> tuple[float, float]:
    amount, direction = _u(rng, 0.04, 0.1), _u(rng, 0.0, 2.0 * math.pi)
    return (amount * math.cos(direction), amount * math.sin(direction))


def _view_magnification(view: str) -> float:
    # AP: the chest is farther from the detector and the source closer, so everything projects
    # larger (the heart most, see render_attenuation).
    return 1.07 if view == "AP" else 1.0


def sample_pathology(
    rng: np.random.Generator, label: str, anatomy: Anatomy, severity: float | None = None
) -> Pathology:
    """Draw the disease of ``label`` for one patient.

    ``consolidation``: one or two irregular, dense, soft-edged patches in one lung, in an
    upper/middle/lower zone, sometimes bounded by a fissure (lobar pattern).
    ``bilateral_opacities``: COVID-like hazy ground-glass opacities, peripheral and lower-zone
    predominant, in both lungs.
    """
    if label not in LABELS:
        raise ValueError(f"unknown label {label!r}; expected one of {LABELS}")
    if label == "normal":
        return Pathology(label="normal")
    severity = _u(rng, 0.35, 0.8) if severity is None else float(severity)
    noise = np.stack(
        [
            _smooth_noise(rng, _PATHOLOGY_SIZE, 1.5),  # outline irregularity
            _smooth_noise(rng, _PATHOLOGY_SIZE, 3.5),  # patchiness / mottling
        ]
    )
    if label == "bilateral_opacities":
        return Pathology(label=label, severity=severity, noise=noise)
    side = -1 if rng.random() < 0.55 else 1  # right-sided pneumonia is a little more common
    n_lesions = 1 if rng.random() < 0.6 else 2
    lesions = tuple(_sample_lesion(rng, anatomy, side) for _ in range(n_lesions))
    return Pathology(label=label, severity=severity, lesions=lesions, noise=noise)


def _sample_lesion(rng: np.random.Generator, anatomy: Anatomy, side: int) -> Lesion:
    lung = anatomy.left_lung if side > 0 else anatomy.right_lung
    zone = int(rng.integers(0, 3))  # upper, middle, lower
    t_lo, t_hi = ((0.2, 0.45), (0.42, 0.68), (0.62, 0.85))[zone]
    # Rejection-sample a centre well inside the lung (same geometry as the renderer).
    costo = _costophrenic_v(lung, 0.0)
    v = (lung.top + rng.uniform(t_lo, t_hi, 64) * (costo - lung.top)).astype(np.float32)
    u = (side * rng.uniform(lung.medial, lung.lateral, 64)).astype(np.float32)
    depth = _lung_field(anatomy, side, u, v, Pose(), heart_scale=1.0)[1]
    inside = np.flatnonzero(depth > 0.6)
    pick = int(inside[0]) if inside.size else int(np.argmax(depth))
    radii = (_u(rng, 0.13, 0.24), _u(rng, 0.1, 0.2))
    n_blobs = int(rng.integers(3, 7))
    blobs = np.column_stack(
        [
            rng.normal(0.0, 0.5, n_blobs),
            rng.normal(0.0, 0.5, n_blobs),
            rng.uniform(0.35, 0.7, n_blobs),
            rng.uniform(0.6, 1.0, n_blobs),
        ]
    )
    fissure = None
    keeps_below = True
    if zone != 1 and rng.random() < 0.5:
        # Lobar look: the lesion stops at a fissure on the side facing the middle of the lung.
        keeps_below = zone == 2
        offset = _u(rng, 0.3, 0.7) * radii[1]
        fissure = float(v[pick] - offset if keeps_below else v[pick] + offset)
    return Lesion(
        side=side,
        center=(float(u[pick]), float(v[pick])),
        radii=radii,
        angle=_u(rng, -0.6, 0.6),
        blobs=blobs,
        fissure=fissure,
        fissure_keeps_below=keeps_below,
    )


# ----------------------------------------------------------------------------------------------
# Rendering
#
# Two frames. Everything but the lungs (body, bones, trachea...) is drawn on an axis-aligned grid
# in patient coordinates, where most terms depend on one axis only (a rib's curve on |u|, its
# bend on v, the body's width on v) and numpy broadcasting keeps them 1-D; that grid is then
# resampled once into the rotated, shifted image. The lungs are drawn directly in pixel
# coordinates, inside their bounding boxes, so that the mask is exact: the same expressions
# decide the mask and the lung's darkness.
# ----------------------------------------------------------------------------------------------


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


def _patient_coords(anatomy: Anatomy, pose: Pose, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Patient coordinates ``(u, v)`` of every pixel for this pose (rotation, shift, scale)."""
    x, y = _pixel_grid(size)
    scale = anatomy.scale * pose.magnification
    angle = math.radians(pose.rotation)
    cos, sin = math.cos(angle) / scale, math.sin(angle) / scale
    xs, ys = x - pose.shift[0], y - pose.shift[1]
    u = cos * xs + sin * ys  # [H, W]
    v = cos * ys - sin * xs
    return u, v


def _bilinear(grid: np.ndarray, gx: np.ndarray, gy: np.ndarray) -> np.ndarray:
    """Bilinear sample of ``grid [ny, nx]`` at fractional indices ``(gx, gy)`` (clamped)."""
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


@dataclass(frozen=True, eq=False)
class _Frame:
    """An axis-aligned grid in patient coordinates that covers the whole image in this pose."""

    u0: float
    v0: float
    cell: float
    u: np.ndarray  # [1, nu]
    v: np.ndarray  # [nv, 1]

    def cols(self, lo: float, hi: float) -> slice:
        return self._span(lo, hi, self.u0, self.u.shape[1])

    def rows(self, lo: float, hi: float) -> slice:
        return self._span(lo, hi, self.v0, self.v.shape[0])

    def _span(self, lo: float, hi: float, origin: float, n: int) -> slice:
        start = math.floor((lo - origin) / self.cell) - 1
        stop = math.ceil((hi - origin) / self.cell) + 2
        return slice(min(max(start, 0), n), min(max(stop, 0), n))

    def resample(self, grid: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
        """Values of the frame grid at patient coordinates ``(u, v)`` (bilinear)."""
        inv = 1.0 / self.cell
        return _bilinear(grid, (u - self.u0) * inv, (v - self.v0) * inv)


def _frame(anatomy: Anatomy, pose: Pose, size: int) -> _Frame:
    scale = anatomy.scale * pose.magnification
    angle = math.radians(pose.rotation)
    cos, sin = math.cos(angle) / scale, math.sin(angle) / scale
    corners = [(x - pose.shift[0], y - pose.shift[1]) for x in (-1.0, 1.0) for y in (-1.0, 1.0)]
    us = [cos * xs + sin * ys for xs, ys in corners]
    vs = [cos * ys - sin * xs for xs, ys in corners]
    cell = 2.0 / (size * scale)  # one image pixel
    u0, v0 = min(us) - 2 * cell, min(vs) - 2 * cell
    nu = math.ceil((max(us) - u0) / cell) + 3
    nv = math.ceil((max(vs) - v0) / cell) + 3
    u = (u0 + cell * np.arange(nu, dtype=np.float64)).astype(np.float32)[None, :]
    v = (v0 + cell * np.arange(nv, dtype=np.float64)).astype(np.float32)[:, None]
    return _Frame(u0=u0, v0=v0, cell=cell, u=u, v=v)


def _box(
    anatomy: Anatomy,
    pose: Pose,
    size: int,
    u_range: tuple[float, float],
    v_range: tuple[float, float],
) -> tuple[slice, slice]:
    """Pixel rows/columns covering a patient-coordinate rectangle in this pose (+1 px margin)."""
    scale = anatomy.scale * pose.magnification
    angle = math.radians(pose.rotation)
    cos, sin = math.cos(angle) * scale, math.sin(angle) * scale
    corners = [(cu, cv) for cu in u_range for cv in v_range]
    x = [cos * cu - sin * cv + pose.shift[0] for cu, cv in corners]
    y = [sin * cu + cos * cv + pose.shift[1] for cu, cv in corners]
    half = size / 2.0

    def span(coords: list[float]) -> slice:
        lo = math.floor((min(coords) + 1.0) * half - 0.5) - 1
        hi = math.ceil((max(coords) + 1.0) * half - 0.5) + 2
        return slice(min(max(lo, 0), size), min(max(hi, 0), size))

    return span(y), span(x)


def _costophrenic_v(lung: Lung, inspiration: float) -> float:
    curve = lung.dome_curvature * (lung.lateral - lung.dome_center) ** 2
    return lung.dome_top + inspiration + curve


def _heart_carve(anatomy: Anatomy, u: np.ndarray, v: np.ndarray, heart_scale: float) -> np.ndarray:
    """Normalised squared radius of the heart ellipse, extended downwards (> 1 outside).

    Below its centre the heart's width continues to the diaphragm, so no lung pocket is left
    under the heart (real lung masks end there too). The heart gets no density of its own: it
    is no denser than the rest of the mediastinum or the liver, so what shows on a radiograph is
    its outline against the lungs.
    """
    hu, hv = anatomy.heart_center
    rx, ry = anatomy.heart_radii[0] * heart_scale, anatomy.heart_radii[1] * heart_scale
    cos, sin = math.cos(anatomy.heart_tilt), math.sin(anatomy.heart_tilt)
    du, dv = u - hu, v - hv
    along = (cos * du + sin * dv) * (1.0 / rx)
    across = np.clip((cos * dv - sin * du) * (1.0 / ry), -3.0e38, 0.0)
    along *= along
    across *= across
    along += across
    return along


def _lung_bounds(lung: Lung, side: int, inspiration: float) -> tuple[tuple[float, float], ...]:
    """Patient-coordinate rectangle ``(u_range, v_range)`` that contains the lung."""
    medial_dome = lung.dome_curvature * (lung.medial - lung.dome_center) ** 2
    bottom = max(_costophrenic_v(lung, inspiration), lung.dome_top + inspiration + medial_dome)
    s_range = (lung.medial - 0.01, lung.lateral + 0.01)
    u_range = s_range if side > 0 else (-s_range[1], -s_range[0])
    return u_range, (lung.top - 0.01, bottom + 0.01)


def _lung_field(
    anatomy: Anatomy, side: int, u: np.ndarray, v: np.ndarray, pose: Pose, heart_scale: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One lung at points ``(u, v)``: mask, depth (0..1 thickness of air), height t, laterality.

    ``side`` is -1 for the patient's right lung (image left) and +1 for the left lung, which
    the heart and the aortic knob indent (so it is the smaller one).
    """
    lung = anatomy.left_lung if side > 0 else anatomy.right_lung
    s = u if side > 0 else -u
    dome_top = lung.dome_top + pose.inspiration
    costo = _costophrenic_v(lung, pose.inspiration)
    t = _ramp(lung.top, costo, v)  # 0 at the apex, 1 at the costophrenic angle
    s_lateral = lung.apex + (lung.lateral - lung.apex) * np.sqrt(t * (2.0 - t))
    tm = np.clip(t * (1.0 / lung.medial_turn), 0.0, 1.0)
    s_medial = lung.apex - (lung.apex - lung.medial) * np.sqrt(tm * (2.0 - tm))
    m_lateral = s_lateral - s
    m_medial = s - s_medial
    m_dome = (s - lung.dome_center) ** 2
    m_dome *= lung.dome_curvature
    m_dome += dome_top
    m_dome -= v
    m_heart = _heart_carve(anatomy, u, v, heart_scale) - 1.0
    mask = (m_lateral > 0) & (m_medial > 0) & (m_dome > 0) & (m_heart > 0)
    depth = _soft(m_lateral, 0.16) * _soft(m_medial, 0.05)
    depth *= _soft(m_dome, 0.12)
    depth *= _soft(m_heart, 0.35)
    if side > 0:
        ku, kv, kr = anatomy.aortic_knob
        m_knob = ((u - ku) ** 2 + (v - kv) ** 2) * (1.0 / kr**2) - 1.0
        mask &= m_knob > 0
        depth *= _soft(m_knob, 0.6)
    depth *= mask
    m_medial /= np.clip(s_lateral - s_medial, 1e-3, 10.0)  # 0 medial .. 1 lateral
    return mask, depth, t, m_medial


def _tube(distance: np.ndarray, radius: float, cortex: float = 0.55) -> np.ndarray:
    """Projected thickness of a bone of ``radius`` with brighter cortical edges.

    ``sqrt(p)`` is the chord through a solid cylinder (``p = 1 - (d / r)^2``); the factor
    ``1 - cortex * p`` hollows out the middle, where the beam crosses only marrow.
    """
    p = distance * (1.0 / radius)
    p *= p
    np.subtract(1.0, p, out=p)
    p = _positive(p)
    out = np.sqrt(p)
    p *= -cortex
    p += 1.0
    out *= p
    return out


def _ribs(anatomy: Anatomy, a: np.ndarray, v: np.ndarray, torso: np.ndarray) -> np.ndarray:
    """Posterior and anterior ribs of both sides (``a`` = |u| ``[1, W]``, ``v`` ``[H, 1]``).

    All ribs at once via a phase. Posterior ribs leave the spine, rise slightly and curve down
    laterally, more steeply and farther apart lower down; anterior ribs run from the lateral
    wall obliquely down towards the sternum and are fainter (farther from the detector, ending
    in invisible cartilage).
    """
    spacing, growth = anatomy.rib_spacing, anatomy.rib_growth
    bend = anatomy.rib_curvature * (1.0 + 0.5 * np.clip(v - anatomy.rib_start, 0.0, 1.6))
    lateral = np.clip(a - 0.45, 0.0, 2.0)
    curve = bend * ((a - anatomy.rib_peak) ** 2 - anatomy.rib_peak**2)  # [H, W]
    curve += 0.7 * lateral * lateral
    x = np.subtract(v - anatomy.rib_start, curve, out=curve)
    x = np.clip(x, -0.5 * spacing, 3.0e38, out=x)
    # Rib k lies at x = spacing * (k + growth k^2 / 2): intercostal spaces widen downwards.
    phase = np.sqrt((2.0 * growth / spacing) * x + 1.0)
    phase -= 1.0 - 0.5 * growth
    phase *= 1.0 / growth
    index = np.floor(phase, out=phase)  # rounded phase
    distance = index * (0.5 * growth)
    distance += 1.0
    distance *= index
    distance *= -spacing
    distance += x
    posterior = _tube(distance, anatomy.rib_radius)
    posterior *= index < anatomy.n_ribs
    line = anatomy.anterior_slope * (0.75 - a) - 0.4 * (a - 0.75) ** 2  # [1, W]
    phase = (v - anatomy.anterior_start) - line
    phase *= 1.0 / anatomy.anterior_spacing
    index = np.floor(phase + 0.5)
    phase -= index
    phase *= anatomy.anterior_spacing
    anterior = _tube(phase, 1.3 * anatomy.rib_radius, cortex=0.35)
    anterior *= (index >= 0) & (index < 6)
    # Weights per column (medial fade: posterior ribs start at the spine, anterior ones end in
    # cartilage) and per row (below the domes the ribs overlie the dense abdomen).
    dome = anatomy.right_lung.dome_top
    fade = 1.0 - _smoothstep(dome, dome + 0.6, v)
    posterior *= (0.34 * _smoothstep(0.03, 0.09, a)) * fade
    anterior *= (0.16 * _smoothstep(0.2, 0.38, a)) * fade
    posterior += anterior
    posterior *= np.clip(torso * 4.0, 0.0, 1.0)
    return posterior


def _clavicles(anatomy: Anatomy, a: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Clavicles: from the sternum up and out to the shoulders, with a gentle S curve."""
    span = _ramp(0.05, 0.75, a)
    center = anatomy.clavicle_v - anatomy.clavicle_rise * span + 0.025 * np.sin(6.283 * span)
    extent = 0.6 * _smoothstep(0.02, 0.07, a) * (1.0 - _smoothstep(0.72, 0.8, a))
    bone = _tube(v - center, 0.045, cortex=0.35)
    bone *= extent
    return bone


def _ellipse_profile(
    u: np.ndarray, v: np.ndarray, cu: float, cv: float, ru: float, rv: float
) -> np.ndarray:
    """Projected thickness of an ellipsoid: sqrt(1 - r^2) inside, 0 outside."""
    du, dv = (u - cu) * (1.0 / ru), (v - cv) * (1.0 / rv)
    r2 = du * du + dv * dv  # broadcasts [1, W] + [H, 1] -> [H, W]
    np.subtract(1.0, r2, out=r2)
    return np.sqrt(_positive(r2))


def _shoulder_girdle(anatomy: Anatomy, a: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Humeral heads and the scapulae, whose medial borders overlie the lateral upper lungs."""
    sv, outer = anatomy.shoulder_v, anatomy.chest_half_width + 0.16
    bones = _ellipse_profile(a, v, outer + 0.04, sv + 0.12, 0.15, 0.15)
    bones *= 0.45
    # The blade is a triangle: medial border running down and out, lateral border running down
    # and in from the shoulder joint, meeting at the inferior angle.
    length = 0.6
    drop = _ramp(sv, sv + length, v)  # [H, 1]
    medial = anatomy.scapula_a + 0.3 * length * drop
    lateral = outer + (anatomy.scapula_a + 0.3 * length - outer) * drop
    span = _smoothstep(sv - 0.04, sv + 0.06, v)
    beyond = a - medial
    blade = _ramp(-0.01, 0.01, lateral - a)
    blade *= _ramp(-0.006, 0.006, beyond)
    blade *= 0.08 * span
    beyond *= beyond
    beyond *= -8000.0
    rim = np.exp(beyond, out=beyond)
    rim *= 0.07 * span * (drop < 1.0)
    bones += blade
    bones += rim
    return bones


def _spine(anatomy: Anatomy, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Vertebral column: bright bodies separated by thin dark discs, one per rib level."""
    width = anatomy.spine_half_width * (1.0 + 0.25 * np.clip(v + 0.8, 0.0, 1.8))  # [H, 1]
    phase = (v - anatomy.rib_start) * (1.0 / anatomy.rib_spacing)
    frac = phase - np.floor(phase)
    vertebra = 0.6 + 0.4 * _smoothstep(0.0, 0.2, frac) * (1.0 - _smoothstep(0.8, 1.0, frac))
    r = u * (1.0 / width)  # [H, W]
    across = np.abs(r)
    across *= 0.25
    across += 0.75  # pedicles: brighter lateral rims
    r *= r
    np.subtract(1.0, r, out=r)
    across *= np.sqrt(_positive(r))
    across *= 0.4 * vertebra
    return across


def _body(
    anatomy: Anatomy, u: np.ndarray, a: np.ndarray, v: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Relative soft-tissue thickness (0..1): (torso only, torso with the arms)."""
    sv = anatomy.shoulder_v
    widen = _smoothstep(sv - 0.24, sv + 0.02, v)
    narrow = _smoothstep(sv + 0.04, sv + 0.32, v)
    shoulders = anatomy.neck_half_width + (1.3 - anatomy.neck_half_width) * widen
    half_width = shoulders + (anatomy.chest_half_width + 0.05 * v - shoulders) * narrow
    r = u * (1.0 / half_width)
    r *= r
    np.subtract(1.0, r, out=r)
    torso = np.sqrt(_positive(r))
    if not anatomy.arms:
        return torso, torso
    arm = _ellipse_profile(a, v, anatomy.chest_half_width + 0.19, sv + 1.0, 0.15, 1.0)
    arm *= 0.5
    return torso, np.maximum(torso, arm, out=arm)


def _drop_detached_tips(mask: np.ndarray, v: np.ndarray, dome_top: float) -> bool:
    """Remove pixels of a lung mask not 4-connected to the lung, in place; True if none.

    The thin tips of a lung (costophrenic and cardiophrenic angles, all below the top of the
    dome) can leave a pixel joined to the lung only diagonally. Only the rows below the dome
    top are searched (a quarter of the box, so this stays cheap): there, a component that does
    not reach the first row is detached from the rest of the lung.
    """
    rows = np.flatnonzero((v > dome_top - 0.02).any(axis=1))
    if rows.size == 0 or rows[0] == 0:  # no rows below the dome top (a cropped lung)
        return True
    tips = mask[rows[0] :]
    labels, n = ndimage.label(tips)
    if n <= 1:
        return True
    attached = np.unique(labels[0])
    keep = np.isin(labels, attached[attached > 0])
    if keep.sum() == tips.sum():
        return True
    tips &= keep  # a view: edits the mask
    return False


def _background(anatomy: Anatomy, pose: Pose, frame: _Frame) -> np.ndarray:
    """Attenuation of everything but the lungs' air, on the patient frame."""
    u, v = frame.u, frame.v
    a = np.abs(u)
    torso, body = _body(anatomy, u, a, v)
    # Abdomen and liver are thicker than the chest.
    atten = body * (_SOFT_TISSUE * (1.0 + 0.3 * _smoothstep(0.35, 0.95, v)))
    if anatomy.sex == "F":
        r = frame.rows(0.25, 0.75)
        atten[r] += 0.12 * _ellipse_profile(a, v[r], 0.5, 0.5, 0.34, 0.24)  # breasts
    th = anatomy.chest_half_width + 0.12
    r = frame.rows(anatomy.rib_start - 0.08, anatomy.right_lung.dome_top + 0.62)
    c = frame.cols(-th, th)
    atten[r, c] += _ribs(anatomy, a[:, c], v[r], torso[r, c])
    c = frame.cols(-0.12, 0.12)
    atten[:, c] += _spine(anatomy, u[:, c], v)
    r = frame.rows(anatomy.clavicle_v - anatomy.clavicle_rise - 0.08, anatomy.clavicle_v + 0.08)
    c = frame.cols(-0.82, 0.82)
    atten[r, c] += _clavicles(anatomy, a[:, c], v[r])
    r = frame.rows(anatomy.shoulder_v - 0.06, anatomy.shoulder_v + 0.62)
    atten[r] += _shoulder_girdle(anatomy, a, v[r])
    carina = anatomy.aortic_knob[1] + 0.12
    r, c = frame.rows(-2.0, carina + 0.01), frame.cols(-0.04, 0.04)
    across = np.sqrt(np.clip(1.0 - (u[:, c] * (1.0 / 0.035)) ** 2, 0.0, 1.0))
    atten[r, c] -= across * (0.3 * (1.0 - _smoothstep(carina - 0.1, carina, v[r])))
    if anatomy.gastric_bubble:
        bu = anatomy.left_lung.dome_center
        bv = anatomy.left_lung.dome_top + pose.inspiration + 0.09
        r, c = frame.rows(bv - 0.06, bv + 0.06), frame.cols(bu - 0.09, bu + 0.09)
        bubble = _ellipse_profile(u[:, c], v[r], bu, bv, 0.08, 0.05) * (v[r] > bv - 0.01)
        atten[r, c] -= 0.25 * bubble
    return atten


def render_attenuation(
    anatomy: Anatomy, pose: Pose, pathology: Pathology, size: int
) -> tuple[np.ndarray, np.ndarray]:
    """Line-integral attenuation map ``A >= 0`` (float32) and the exact lung mask (bool).

    The attenuation is soft tissue minus the air of the lungs plus bone, lung texture and
    pathology; the detector later shows ``1 - exp(-exposure * A)``, which compresses contrast in
    dense regions the way film does (ribs fade behind the mediastinum and the abdomen).
    """
    frame = _frame(anatomy, pose, size)
    background = _background(anatomy, pose, frame)
    u, v = _patient_coords(anatomy, pose, size)
    atten = frame.resample(background, u, v)
    heart_scale = 1.1 if pose.view == "AP" else 1.0  # AP projection magnifies the heart more
    diseased = pathology.label != "normal" and pathology.severity > 0
    fill_grid = _pathology_grid(pathology, anatomy) if diseased else None
    mask = np.zeros((size, size), dtype=bool)
    for side in (-1, 1):
        lung = anatomy.left_lung if side > 0 else anatomy.right_lung
        b = _box(anatomy, pose, size, *_lung_bounds(lung, side, pose.inspiration))
        ub, vb = u[b], v[b]
        lung_mask, depth, t, relative = _lung_field(anatomy, side, ub, vb, pose, heart_scale)
        if not _drop_detached_tips(lung_mask, vb, lung.dome_top + pose.inspiration):
            depth *= lung_mask
        mask[b] |= lung_mask
        # Air replaces tissue in proportion to the lung's depth and the chest's thickness;
        # vessels put some of it back, and so does disease (fluid and cells in the air spaces).
        change = _sample_grid(anatomy.lung_air, ub, vb)
        if fill_grid is not None:
            fill = _sample_grid(fill_grid, ub, vb)
            if pathology.label == "bilateral_opacities":
                # Peripheral and lower-zone predominance, typical of COVID-19 pneumonia.
                fill *= _smoothstep(0.2, 0.8, relative)
                fill *= _smoothstep(0.15, 0.7, t)
            change -= fill
        change *= depth
        atten[b] -= change
    return _positive(atten), mask


def _pathology_grid(pathology: Pathology, anatomy: Anatomy) -> np.ndarray:
    """Attenuation the disease puts back per unit lung depth, on the pathology grid.

    Fluid and cells replace a fraction of the air: up to ``severity`` of it in a consolidation
    (at 1 the patch is as dense as soft tissue); ground glass is patchy and hazy, and the
    renderer weights it towards the periphery and the lower zones.
    """
    axis = _grid_axis(_PATHOLOGY_SIZE)
    u, v = axis[None, :], axis[:, None]
    torso, _ = _body(anatomy, u, np.abs(u), v)
    scale = (_SOFT_TISSUE * _LUNG_AIR * pathology.severity) * torso
    irregular, patchy = pathology.noise
    if pathology.label == "bilateral_opacities":
        return _smoothstep(0.2, 0.65, patchy) * (0.6 + 0.8 * irregular) * scale
    total = np.zeros((_PATHOLOGY_SIZE, _PATHOLOGY_SIZE), dtype=np.float32)
    for lesion in pathology.lesions:
        cos, sin = math.cos(lesion.angle), math.sin(lesion.angle)
        du, dv = u - lesion.center[0], v - lesion.center[1]
        p = (cos * du + sin * dv) * (1.0 / lesion.radii[0])
        q = (cos * dv - sin * du) * (1.0 / lesion.radii[1])
        blobs = np.zeros_like(total)
        for bp, bq, br, bw in lesion.blobs:
            blobs += bw * np.exp(((p - bp) ** 2 + (q - bq) ** 2) * (-1.0 / br**2))
        # Saturating sum of blobs with a noisy threshold: a confluent patch, ragged margins.
        field = 1.0 - np.exp(-1.5 * blobs) + 0.7 * (irregular - 0.5)
        patch = _smoothstep(0.15, 0.8, field) * _smoothstep(0.0, 0.05, lesion.side * u)
        if lesion.fissure is not None:
            below = 1.0 if lesion.fissure_keeps_below else -1.0
            patch *= _smoothstep(0.0, 0.012, below * (v - lesion.fissure))
        total = np.maximum(total, patch)
    return total * (0.75 + 0.5 * patchy) * scale


# ----------------------------------------------------------------------------------------------
# Acquisition (site effects)
# ----------------------------------------------------------------------------------------------


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
    for the small kernels of detector blur (it works line by line in float64).
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


def render_case(
    anatomy: Anatomy,
    pose: Pose,
    pathology: Pathology,
    profile: SiteProfile,
    size: int,
    rng: np.random.Generator,
    site: str = "",
) -> tuple[np.ndarray, np.ndarray]:
    """Image (float32 ``[size, size]`` in ``[0, 1]``) and lung mask (bool) of one exposure."""
    attenuation, mask = render_attenuation(anatomy, pose, pathology, size)
    return acquire(attenuation, profile, pose.exposure, rng, site, pose.exposure_tilt), mask


@cache
def _prefer_heap_allocations() -> None:
    """Let glibc serve the generator's many short-lived 64 KB - 1 MB arrays from its heap.

    glibc allocates blocks above its mmap threshold (128 KB at start) with ``mmap`` and gives
    them back to the OS on ``free``, so every temporary image costs fresh page faults: in
    sandboxed or virtualised machines that is about 3x the arithmetic. Freeing one large block
    raises the threshold (glibc's documented dynamic heuristic), after which such blocks are
    reused. It changes no result, and does nothing on other allocators.
    """
    block = np.empty(16 << 20, dtype=np.uint8)
    del block


def _children(rng: np.random.Generator, n: int) -> list[np.random.Generator]:
    """Independent child generators, so that e.g. the anatomy does not depend on the label."""
    return [np.random.default_rng(int(s)) for s in rng.integers(0, 2**63 - 1, size=n)]


def site_profile(site: str, profiles: Mapping[str, SiteProfile] | None = None) -> SiteProfile:
    """The profile of ``site`` (default profiles unless ``profiles`` is given)."""
    profiles = default_site_profiles() if profiles is None else profiles
    if site not in profiles:
        raise ValueError(f"unknown site {site!r}; known sites: {sorted(profiles)}")
    return profiles[site]


def generate_case(
    rng: np.random.Generator,
    label: str,
    site: str,
    size: int,
    *,
    severity: float | None = None,
    view: str = "PA",
    sex: str | None = None,
    age: int | None = None,
    profile: SiteProfile | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic radiograph and its lung mask.

    The anatomy, pose, pathology and acquisition noise come from separate child generators of
    ``rng``, so the same ``rng`` state with another label (or severity, or site) gives the same
    patient and the same noise: only the disease (or the acquisition) differs.

    Args:
        rng: source of randomness (consumed).
        label: one of ``LABELS``.
        site: a site name with a default profile, unless ``profile`` is given.
        size: image side in pixels.
        severity: pathology severity (default: drawn in [0.35, 0.8]).
        view: ``"PA"`` or ``"AP"``.
        sex: ``"M"`` / ``"F"`` (default: drawn).
        age: years (default: drawn in [18, 90]).
        profile: acquisition profile overriding the site's default.

    Returns:
        ``(image, mask)``: float32 ``[size, size]`` in ``[0, 1]`` and bool ``[size, size]``.
    """
    profile = site_profile(site) if profile is None else profile
    _prefer_heap_allocations()
    anatomy_rng, pathology_rng, pose_rng, noise_rng = _children(rng, 4)
    if sex is None:
        sex = "M" if anatomy_rng.random() < 0.5 else "F"
    if age is None:
        age = int(anatomy_rng.integers(18, 91))
    anatomy = sample_anatomy(anatomy_rng, sex=sex, age=age)
    pose = sample_pose(pose_rng, view)
    pathology = sample_pathology(pathology_rng, label, anatomy, severity)
    return render_case(anatomy, pose, pathology, profile, size, noise_rng, site)


# ----------------------------------------------------------------------------------------------
# Data set
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class SyntheticCase:
    """One generated image with its metadata (a manifest row before writing)."""

    image_id: str
    patient_id: str
    site: str
    label: str
    view: str
    sex: str
    age: int
    image: np.ndarray
    mask: np.ndarray


def iter_synthetic_cases(config: SyntheticConfig | None = None) -> Iterator[SyntheticCase]:
    """Every image of the data set described by ``config``, patient by patient.

    Follow-ups share the patient's anatomy and label; their pose, exposure, view and disease
    severity change a little (the disease progresses or resolves), so no two are identical.
    """
    config = SyntheticConfig() if config is None else config
    _prefer_heap_allocations()
    classes = list(config.classes)
    for index in range(config.n_patients):
        site = config.sites[index % len(config.sites)]
        profile = config.site_profiles[site]
        rng = np.random.default_rng([config.seed, index])
        label = classes[int(rng.choice(len(classes), p=config.label_probabilities(site)))]
        sex = "M" if rng.random() < 0.5 else "F"
        age = int(rng.integers(config.age_range[0], config.age_range[1] + 1))
        n_images = int(rng.integers(config.images_per_patient[0], config.images_per_patient[1] + 1))
        anatomy_rng, pathology_rng, pose_rng, noise_rng = _children(rng, 4)
        anatomy = sample_anatomy(anatomy_rng, sex=sex, age=age)
        severity = _u(pathology_rng, *config.severity)
        pathology = sample_pathology(pathology_rng, label, anatomy, severity)
        trend = _u(pathology_rng, -0.5, 0.35)  # < 0: resolving, > 0: progressing
        patient_id = f"{config.id_prefix}-{site}-{index:05d}"
        # Follow-ups are displaced from the first image in directions 60-100 degrees apart, so
        # that no two images of the patient end up in the same position.
        direction = _u(pose_rng, 0.0, 2.0 * math.pi)
        base = None
        for k in range(n_images):
            view = "AP" if pose_rng.random() < profile.ap_fraction else "PA"
            if base is None:
                pose = base = sample_pose(pose_rng, view)
            else:
                direction += math.radians(_u(pose_rng, 60.0, 100.0))
                pose = followup_pose(base, pose_rng, view, direction)
            image, mask = render_case(
                anatomy,
                pose,
                pathology.evolved(math.exp(trend * k)),
                profile,
                config.size,
                noise_rng,
                site,
            )
            yield SyntheticCase(
                image_id=f"{patient_id}-{k}",
                patient_id=patient_id,
                site=site,
                label=label,
                view=view,
                sex=sex,
                age=age,
                image=image,
                mask=mask,
            )


def write_synthetic_dataset(
    out_dir: str | Path, config: SyntheticConfig | None = None, *, progress: bool = False
) -> Path:
    """Write the synthetic data set: images, lung masks and a manifest.

    Layout: ``out_dir/images/<id>.png`` (16-bit grayscale), ``out_dir/masks/<id>.png`` (8-bit,
    0/255) and ``out_dir/manifest.csv`` with columns ``file, mask_file, label, patient_id, site,
    view, sex, age`` (paths relative to ``out_dir``), readable by the generic CSV source adapter.
    The same config gives byte-identical files.

    Returns:
        The path of ``manifest.csv`` (written last, atomically).
    """
    config = SyntheticConfig() if config is None else config
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    cases = iter_synthetic_cases(config)
    if progress:
        from tqdm import tqdm

        expected = config.n_patients * sum(config.images_per_patient) / 2
        cases = tqdm(cases, total=round(expected), desc="synthetic", unit="img")
    rows = []
    for case in cases:
        image_file = f"images/{case.image_id}.png"
        mask_file = f"masks/{case.image_id}.png"
        pixels = np.round(case.image * 65535.0).astype(np.uint16)
        # Pillow removes a file it could not finish; naming() puts the file in the error line.
        with naming(out / image_file):
            Image.fromarray(pixels).save(out / image_file, compress_level=config.png_compress_level)
        with naming(out / mask_file):
            Image.fromarray(case.mask.astype(np.uint8) * 255).save(
                out / mask_file, compress_level=1
            )
        rows.append(
            (
                image_file,
                mask_file,
                case.label,
                case.patient_id,
                case.site,
                case.view,
                case.sex,
                case.age,
            )
        )
    manifest = out / "manifest.csv"
    tmp = out / "manifest.csv.tmp"
    try:
        with naming(manifest), tmp.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle, lineterminator="\n")
            writer.writerow(MANIFEST_COLUMNS)
            writer.writerows(rows)
        os.replace(tmp, manifest)
    finally:
        tmp.unlink(missing_ok=True)  # a full disk must not leave a half-written manifest
    return manifest
