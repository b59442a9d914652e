"""The labels' findings: lesions of consolidation (focal, one lung) and bilateral opacities
(patchy, peripheral and lower-zone), their evolution between follow-ups, and the grid of air
they replace."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from spcxr.data.synthetic.anatomy import (
    _LUNG_AIR,
    _SOFT_TISSUE,
    Anatomy,
    Pose,
    _body,
    _costophrenic_v,
    _lung_field,
)
from spcxr.data.synthetic.config import LABELS
from spcxr.data.synthetic.grids import _grid_axis, _smooth_noise, _smoothstep, _u

_PATHOLOGY_SIZE = 96


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
