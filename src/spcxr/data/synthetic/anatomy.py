"""One patient's anatomy and one film's pose, in patient coordinates ``(u, v)`` (``u`` from
image left to right, ``v`` from top to bottom, both about ``[-1, 1]``), and the shapes drawn
from them: body envelope with shoulders and arms, two lungs (rounded apices, costophrenic
angles, domes with the right one higher), heart (bulging to the image right) and aortic knob
indenting the left lung, posterior and anterior ribs, clavicles, scapulae, spine, trachea,
gastric bubble, and a texture grid of branching vessels fanning out from the hila. A pose is
the position, rotation, magnification (AP views are magnified), exposure and depth of
inspiration of one film.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np
from scipy import ndimage

from spcxr.data.synthetic.config import VIEWS
from spcxr.data.synthetic.grids import (
    _GRID_EXTENT,
    _grid_axis,
    _positive,
    _ramp,
    _sample_grid,
    _smooth_noise,
    _smoothstep,
    _soft,
    _splat,
    _u,
)

# Attenuation of soft tissue through the thickest part of the chest, and the fraction of it that
# fully aerated lung removes: chosen so that the mediastinum displays at ~0.85 and the lungs at
# ~0.35 with unit exposure, the look of a normally exposed PA film.
_SOFT_TISSUE = 1.9
_LUNG_AIR = 0.74
_TEXTURE_SIZE = 128


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
