"""Per-image segmentation metrics: Dice, IoU and the 95th percentile Hausdorff distance.

Definitions (2-D masks; ``P`` = prediction, ``T`` = truth):

- ``dice = 2 |P & T| / (|P| + |T|)``, ``iou = |P & T| / |P | T|``.
- Boundary of a mask = the mask minus its binary erosion by the 4-connected cross, with pixels
  outside the image counted as background (so a mask touching the border has a boundary there).
- ``hd95``: for each boundary pixel of P its Euclidean distance to the nearest boundary pixel of
  T, and for each boundary pixel of T its distance to the nearest boundary pixel of P; hd95 is
  the 95th percentile (``numpy.percentile``, linear interpolation) of the union of both sets.
  This is medpy's ``medpy.metric.binary.hd95`` (MONAI instead takes the larger of the two
  directed 95th percentiles). Distances come from ``scipy.ndimage.distance_transform_edt`` with
  ``sampling=spacing``: in millimetres when ``spacing`` is the (row, column) pixel size in mm,
  in pixels when it is None.

Empty masks: both empty -> dice 1, iou 1, hd95 0 (a correct "nothing here"); exactly one empty
-> dice 0, iou 0, hd95 NaN (no distance exists; callers should report how many were NaN).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

__all__ = ["boundary", "dice", "hd95", "iou", "segmentation_scores"]

Spacing = tuple[float, float] | Sequence[float] | None


def _as_bool_masks(pred: np.ndarray, true: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both masks as bool arrays of one shape ``[H, W]`` or ``[n, H, W]``."""
    pair = []
    for name, mask in (("pred", pred), ("true", true)):
        m = np.asarray(mask)
        if m.dtype != np.bool_:
            if not np.all((m == 0) | (m == 1)):
                raise ValueError(f"{name} mask must be bool or hold only 0 and 1")
            m = m.astype(bool)
        pair.append(m)
    p, t = pair
    if p.shape != t.shape:
        raise ValueError(f"pred and true masks differ in shape: {p.shape} vs {t.shape}")
    if p.ndim not in (2, 3):
        raise ValueError(f"masks must be [H, W] or [n, H, W]; got shape {p.shape}")
    return p, t


def _overlap(pred: np.ndarray, true: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-image ``(|P & T|, |P|, |T|)`` over the last two axes."""
    inter = np.logical_and(pred, true).sum(axis=(-2, -1))
    return inter, pred.sum(axis=(-2, -1)), true.sum(axis=(-2, -1))


def dice(pred: np.ndarray, true: np.ndarray) -> float | np.ndarray:
    """Dice coefficient of one ``[H, W]`` pair (float) or per image of ``[n, H, W]`` (array).

    Both masks empty gives 1.0.
    """
    p, t = _as_bool_masks(pred, true)
    inter, n_pred, n_true = _overlap(p, t)
    total = n_pred + n_true
    out = np.where(total > 0, 2.0 * inter / np.maximum(total, 1), 1.0)
    return float(out) if p.ndim == 2 else out


def iou(pred: np.ndarray, true: np.ndarray) -> float | np.ndarray:
    """Intersection over union (Jaccard) of one pair or per image; both empty gives 1.0."""
    p, t = _as_bool_masks(pred, true)
    inter, n_pred, n_true = _overlap(p, t)
    union = n_pred + n_true - inter
    out = np.where(union > 0, inter / np.maximum(union, 1), 1.0)
    return float(out) if p.ndim == 2 else out


def boundary(mask: np.ndarray) -> np.ndarray:
    """Boundary pixels of a 2-D bool mask: the mask minus its 4-connected erosion."""
    return mask & ~ndimage.binary_erosion(mask, border_value=0)


def _check_spacing(spacing: Spacing) -> tuple[float, float] | None:
    if spacing is None:
        return None
    s = tuple(float(v) for v in spacing)
    if len(s) != 2 or not all(np.isfinite(v) and v > 0 for v in s):
        raise ValueError(f"spacing must be two positive (row, column) sizes; got {spacing}")
    return s  # type: ignore[return-value]


def _hd95_single(pred: np.ndarray, true: np.ndarray, spacing: tuple[float, float] | None) -> float:
    if not pred.any() and not true.any():
        return 0.0
    if not pred.any() or not true.any():
        return float("nan")
    edge_p, edge_t = boundary(pred), boundary(true)
    # The distance transform only needs the box holding both boundaries: every nearest
    # boundary pixel lies inside it, so cropping first gives the same distances, faster.
    rows, cols = np.nonzero(edge_p | edge_t)
    box = np.s_[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
    edge_p, edge_t = edge_p[box], edge_t[box]
    to_true = ndimage.distance_transform_edt(~edge_t, sampling=spacing)  # distance to T's edge
    to_pred = ndimage.distance_transform_edt(~edge_p, sampling=spacing)
    distances = np.concatenate([to_true[edge_p], to_pred[edge_t]])
    return float(np.percentile(distances, 95))


def hd95(pred: np.ndarray, true: np.ndarray, spacing: Spacing = None) -> float | np.ndarray:
    """Symmetric 95th percentile Hausdorff distance (medpy definition, see the module docstring).

    Args:
        pred: ``[H, W]`` or ``[n, H, W]`` bool (or 0/1) mask.
        true: same shape as ``pred``.
        spacing: ``(row, column)`` pixel size, e.g. in mm; None measures in pixels.

    Returns:
        A float for one pair, a ``[n]`` array for a stack. 0 when both masks are empty, NaN
        when exactly one is.
    """
    p, t = _as_bool_masks(pred, true)
    s = _check_spacing(spacing)
    if p.ndim == 2:
        return _hd95_single(p, t, s)
    return np.array([_hd95_single(a, b, s) for a, b in zip(p, t, strict=True)])


def segmentation_scores(
    pred: np.ndarray, true: np.ndarray, spacing: Spacing | np.ndarray = None
) -> dict[str, np.ndarray]:
    """Dice, IoU and hd95 per image.

    Args:
        pred: ``[n, H, W]`` bool (or 0/1) predicted masks.
        true: ``[n, H, W]`` ground-truth masks.
        spacing: None (pixels), one ``(row, column)`` pixel size for all images, or a
            ``[n, 2]`` array with one pixel size per image (images resized from different
            originals have different pixel sizes).

    Returns:
        ``{"dice": [n], "iou": [n], "hd95": [n]}`` float arrays (hd95 NaN where exactly one
        mask is empty).
    """
    p, t = _as_bool_masks(pred, true)
    if p.ndim != 3:
        raise ValueError(f"segmentation_scores needs [n, H, W] masks; got shape {p.shape}")
    n = p.shape[0]
    if spacing is None:
        per_image: list[tuple[float, float] | None] = [None] * n
    else:
        arr = np.asarray(spacing, dtype=np.float64)
        if arr.shape == (2,):
            per_image = [_check_spacing(arr)] * n
        elif arr.shape == (n, 2):
            per_image = [_check_spacing(row) for row in arr]
        else:
            raise ValueError(f"spacing must be (2,) or ({n}, 2); got shape {arr.shape}")
    return {
        "dice": np.asarray(dice(p, t), dtype=np.float64),
        "iou": np.asarray(iou(p, t), dtype=np.float64),
        "hd95": np.array([_hd95_single(a, b, s) for a, b, s in zip(p, t, per_image, strict=True)]),
    }
