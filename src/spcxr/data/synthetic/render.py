"""A line-integral (attenuation) map and the exact lung mask of one film.

Two frames. Everything but the lungs (body, bones, trachea...) is drawn on an axis-aligned grid
in patient coordinates, where most terms depend on one axis only (a rib's curve on |u|, its
bend on v, the body's width on v) and numpy broadcasting keeps them 1-D; that grid is then
resampled once into the rotated, shifted image. The lungs are drawn directly in pixel
coordinates, inside their bounding boxes, so that the mask is exact: the same expressions
decide the mask and the lung's darkness.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from spcxr.data.synthetic.anatomy import (
    _SOFT_TISSUE,
    Anatomy,
    Pose,
    _body,
    _clavicles,
    _ellipse_profile,
    _lung_bounds,
    _lung_field,
    _ribs,
    _shoulder_girdle,
    _spine,
)
from spcxr.data.synthetic.findings import Pathology, _pathology_grid
from spcxr.data.synthetic.grids import _bilinear, _pixel_grid, _positive, _sample_grid, _smoothstep


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
