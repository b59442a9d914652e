"""Dice, IoU and hd95 on shapes with known answers and against a brute-force reference."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage
from scipy.spatial.distance import cdist

from spcxr.evaluation.segmetrics import boundary, dice, hd95, iou, segmentation_scores


def _square(size: int, top: int, left: int, side: int) -> np.ndarray:
    mask = np.zeros((size, size), dtype=bool)
    mask[top : top + side, left : left + side] = True
    return mask


def _disc(size: int, radius: float, centre: tuple[float, float] = (32.0, 32.0)) -> np.ndarray:
    rows, cols = np.mgrid[:size, :size]
    return (rows - centre[0]) ** 2 + (cols - centre[1]) ** 2 <= radius**2


def _blob(seed: int, size: int = 48) -> np.ndarray:
    """An irregular random mask (thresholded smooth noise), possibly several components."""
    noise = ndimage.gaussian_filter(np.random.default_rng(seed).random((size, size)), 3)
    return noise > np.quantile(noise, 0.6)


def _hd95_brute_force(
    pred: np.ndarray, true: np.ndarray, spacing: tuple[float, float] = (1.0, 1.0)
) -> float:
    """medpy's hd95 from first principles: all pairwise boundary distances."""
    scale = np.asarray(spacing)
    points_p = np.argwhere(boundary(pred)) * scale
    points_t = np.argwhere(boundary(true)) * scale
    pairwise = cdist(points_p, points_t)  # [|dP|, |dT|]
    return float(np.percentile(np.r_[pairwise.min(axis=1), pairwise.min(axis=0)], 95))


def test_dice_iou_offset_squares() -> None:
    a = _square(40, 10, 10, 10)  # 100 px
    b = _square(40, 15, 10, 10)  # shifted 5 rows: overlap 5 x 10 = 50 px, union 150 px
    assert dice(a, b) == pytest.approx(2 * 50 / 200)
    assert iou(a, b) == pytest.approx(50 / 150)
    c = _square(40, 15, 13, 10)  # shifted 5 rows and 3 columns: overlap 5 x 7 = 35 px
    assert dice(a, c) == pytest.approx(70 / 200)
    assert iou(a, c) == pytest.approx(35 / 165)
    assert dice(a, a) == 1.0 and iou(a, a) == 1.0
    assert dice(a, _square(40, 25, 25, 10)) == 0.0


def test_boundary_of_square() -> None:
    edge = boundary(_square(20, 5, 5, 6))
    assert edge.sum() == 4 * 6 - 4
    assert not edge[6:10, 6:10].any()  # interior
    # a mask touching the image border has its boundary on the border
    assert boundary(np.ones((5, 5), dtype=bool)).sum() == 16


@pytest.mark.parametrize("k", [1, 3, 6])
def test_hd95_translated_square_equals_shift(k: int) -> None:
    a = _square(48, 10, 10, 20)
    b = _square(48, 10 + k, 10, 20)
    assert hd95(a, b) == pytest.approx(k)


@pytest.mark.parametrize("k", [2, 4, 7])
def test_hd95_concentric_discs_within_one_pixel(k: int) -> None:
    assert abs(hd95(_disc(64, 15), _disc(64, 15 + k)) - k) <= 1.0


def test_hd95_spacing_scales_distances() -> None:
    a, b = _blob(1), _blob(2)
    pixels = hd95(a, b)
    assert hd95(a, b, spacing=(0.5, 0.5)) == pytest.approx(0.5 * pixels)
    # anisotropic: a vertical shift of 4 rows of 0.7 mm is 2.8 mm
    assert hd95(_square(48, 10, 10, 20), _square(48, 14, 10, 20), (0.7, 3.0)) == pytest.approx(2.8)


@pytest.mark.parametrize("seed", range(6))
def test_hd95_matches_brute_force(seed: int) -> None:
    pred, true = _blob(2 * seed), _blob(2 * seed + 1)
    assert hd95(pred, true) == pytest.approx(_hd95_brute_force(pred, true))
    spacing = (0.6, 1.3)
    assert hd95(pred, true, spacing) == pytest.approx(_hd95_brute_force(pred, true, spacing))


def test_hd95_brute_force_small_shapes() -> None:
    # a small blob far from a big one: the crop keeps both, distances span the image
    pred = _square(64, 2, 2, 3)
    true = _disc(64, 10, centre=(45.0, 40.0))
    assert hd95(pred, true) == pytest.approx(_hd95_brute_force(pred, true))
    assert hd95(pred, true) > 30


def test_empty_mask_conventions() -> None:
    empty = np.zeros((16, 16), dtype=bool)
    full = _square(16, 4, 4, 5)
    assert dice(empty, empty) == 1.0 and iou(empty, empty) == 1.0 and hd95(empty, empty) == 0.0
    assert dice(full, empty) == 0.0 and iou(empty, full) == 0.0
    assert np.isnan(hd95(full, empty)) and np.isnan(hd95(empty, full))


def test_stacks_match_single_images() -> None:
    pred = np.stack([_blob(s) for s in range(4)] + [np.zeros((48, 48), bool)])
    true = np.stack([_blob(s + 10) for s in range(4)] + [np.zeros((48, 48), bool)])
    true[2] = False  # one image with an empty truth
    d, j, h = dice(pred, true), iou(pred, true), hd95(pred, true)
    assert d.shape == j.shape == h.shape == (5,)
    for i in range(5):
        assert d[i] == pytest.approx(dice(pred[i], true[i]))
        assert j[i] == pytest.approx(iou(pred[i], true[i]))
        np.testing.assert_equal(h[i], hd95(pred[i], true[i]))
    assert np.isnan(h[2]) and d[4] == 1.0 and h[4] == 0.0
    # dice and iou are linked: iou = d / (2 - d)
    np.testing.assert_allclose(j, d / (2 - d))


def test_segmentation_scores_per_image_spacing() -> None:
    pred = np.stack([_blob(s) for s in range(3)]).astype(np.uint8)  # 0/1 integers are accepted
    true = np.stack([_blob(s + 20) for s in range(3)])
    spacing = np.array([[1.0, 1.0], [0.5, 0.5], [2.0, 1.0]])
    scores = segmentation_scores(pred, true, spacing)
    assert set(scores) == {"dice", "iou", "hd95"}
    for i in range(3):
        expected = hd95(pred[i], true[i], tuple(spacing[i]))
        assert scores["hd95"][i] == pytest.approx(expected)
    same = segmentation_scores(pred, true, (0.5, 0.5))["hd95"]
    np.testing.assert_allclose(same, 0.5 * segmentation_scores(pred, true)["hd95"])


def test_bad_masks_raise() -> None:
    a = np.zeros((8, 8), dtype=bool)
    with pytest.raises(ValueError, match="differ in shape"):
        dice(a, np.zeros((8, 9), dtype=bool))
    with pytest.raises(ValueError, match="only 0 and 1"):
        iou(a, np.full((8, 8), 0.7))
    with pytest.raises(ValueError, match="spacing"):
        hd95(a, a, spacing=(1.0, -1.0))
    with pytest.raises(ValueError, match=r"\[n, H, W\]"):
        segmentation_scores(a, a)
    with pytest.raises(ValueError, match="spacing"):
        segmentation_scores(a[None], a[None], np.ones((2, 2)))
