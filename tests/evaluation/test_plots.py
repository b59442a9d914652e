"""Report figures: valid PNGs of the documented size, written without pyplot global state."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from spcxr.evaluation import plots
from spcxr.evaluation.plots import (
    budget_curve,
    confusion_matrix_plot,
    drift_heatmap,
    reliability_diagram,
    roc_curves,
    segmentation_examples,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _check_png(path: Path, size: tuple[int, int]) -> np.ndarray:
    """Asserts a valid PNG of ``size`` (width, height) pixels; returns its RGB pixels."""
    assert path.is_file() and path.stat().st_size > 1000
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.size == size
        pixels = np.asarray(image.convert("RGB"))
    assert pixels.std() > 10  # something was drawn, not a blank canvas
    return pixels


def _problem(n_classes: int, n: int = 200) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(n_classes)
    y = rng.integers(0, n_classes, n)
    logits = rng.normal(size=(n, n_classes)) + 2.0 * np.eye(n_classes)[y]
    return y, np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)


@pytest.fixture(autouse=True)
def _no_pyplot_figures() -> None:
    """Every test must leave pyplot's figure registry empty."""
    yield
    if "matplotlib.pyplot" in sys.modules:
        assert sys.modules["matplotlib.pyplot"].get_fignums() == []


@pytest.mark.parametrize("n_classes", [2, 3])
def test_roc_curves(tmp_path: Path, n_classes: int) -> None:
    y, prob = _problem(n_classes)
    out = roc_curves(y, prob, [f"c{i}" for i in range(n_classes)], tmp_path / "sub" / "roc.png")
    assert out == tmp_path / "sub" / "roc.png"
    _check_png(out, (600, 500))


def test_roc_curves_absent_class(tmp_path: Path) -> None:
    y, prob = _problem(3)
    prob, y = prob[y != 2], y[y != 2]
    _check_png(roc_curves(y, prob, ["a", "b", "c"], tmp_path / "roc.png", title="t"), (600, 500))


@pytest.mark.parametrize("normalize", [True, False])
def test_confusion_matrix_plot(tmp_path: Path, normalize: bool) -> None:
    cm = [[50, 3, 2], [4, 40, 6], [0, 0, 0]]  # an empty row must not divide by zero
    out = confusion_matrix_plot(
        cm, ["normal", "pneumonia", "covid"], tmp_path / "cm.png", normalize
    )
    _check_png(out, (530, 480))  # side = max(5, 1.1 * 3 + 2) = 5.3 inches
    with pytest.raises(ValueError, match="3 x 3"):
        confusion_matrix_plot([[1, 2], [3, 4]], ["a", "b", "c"], tmp_path / "bad.png")


def test_reliability_diagram(tmp_path: Path) -> None:
    y, prob = _problem(2, n=500)
    _check_png(reliability_diagram(y, prob, tmp_path / "rel.png"), (600, 700))
    _check_png(reliability_diagram(y, prob, tmp_path / "rel10.png", n_bins=10), (600, 700))


def test_budget_curve(tmp_path: Path) -> None:
    rows = [
        {"run": run, "labels": labels, "value": v, "low": v - 0.05, "high": v + 0.04}
        for run, offset in (("GMML", 0.1), ("scratch", 0.0))
        for labels, v in ((50, 0.6 + offset), (500, 0.7 + offset), (5000, 0.8 + offset))
    ]
    rows.append({"run": "linear probe", "labels": 500, "value": 0.65})  # no band
    pixels = _check_png(budget_curve(rows, tmp_path / "budget.png"), (700, 450))
    # the shaded bands leave light tinted pixels that are neither white nor a saturated line
    tinted = (pixels.min(axis=2) > 150) & (pixels.max(axis=2) < 250) & (np.ptp(pixels, axis=2) > 20)
    assert tinted.sum() > 500
    with pytest.raises(ValueError, match="lacks"):
        budget_curve([{"run": "x", "value": 1.0}], tmp_path / "bad.png")
    with pytest.raises(ValueError, match="log axis"):
        budget_curve([{"run": "x", "labels": 0, "value": 1.0}], tmp_path / "bad.png")


def test_drift_heatmap(tmp_path: Path) -> None:
    sources = ["kermany", "rsna", "covidx"]
    values = np.array([[0.95, 0.71, 0.66], [0.74, 0.9, np.nan], [0.6, 0.69, 0.93]])
    table = pd.DataFrame(values, index=sources, columns=sources)
    out = drift_heatmap(table, tmp_path / "drift.png", "AUROC")
    _check_png(out, (720, 470))  # (1.4 * 3 + 3) x (0.9 * 3 + 2) inches
    notes = table.map(lambda v: f"{v:.2f}\n[{v - 0.03:.2f}, {v + 0.03:.2f}]")
    _check_png(
        drift_heatmap(table, tmp_path / "drift_ci.png", "AUROC", annotations=notes), (720, 470)
    )
    with pytest.raises(ValueError, match="same index"):
        drift_heatmap(table, tmp_path / "bad.png", annotations=notes.iloc[:2])


def test_segmentation_examples(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    rows, cols = np.mgrid[:64, :64]
    images = rng.integers(0, 255, (5, 64, 64), dtype=np.uint8)
    true = np.stack([(rows - 32) ** 2 + (cols - 30) ** 2 < (12 + i) ** 2 for i in range(5)])
    pred = np.roll(true, 3, axis=2)
    pred[4] = False  # an empty prediction draws no contour
    out = segmentation_examples(images, true, pred, tmp_path / "seg.png")
    pixels = _check_png(out, (1200, 600))  # 4 columns x 2 rows of 3-inch panels
    red = (pixels[..., 0] > 200) & (pixels[..., 1] < 60) & (pixels[..., 2] < 60)
    green = (pixels[..., 1] > 200) & (pixels[..., 0] < 60) & (pixels[..., 2] < 60)
    assert red.sum() > 100 and green.sum() > 100
    _check_png(
        segmentation_examples(images[:2], true[:2], pred[:2], tmp_path / "s2.png", [0.9, 0.8]),
        (600, 300),
    )
    with pytest.raises(ValueError, match="scores"):
        segmentation_examples(images, true, pred, tmp_path / "bad.png", scores=[0.5])


def test_plots_never_import_pyplot(tmp_path: Path) -> None:
    code = (
        "import sys, numpy as np\n"
        "from pathlib import Path\n"
        "from spcxr.evaluation.plots import roc_curves\n"
        "y = np.array([0, 1, 0, 1]); p = np.array([[.8, .2], [.3, .7], [.6, .4], [.1, .9]])\n"
        f"roc_curves(y, p, ['a', 'b'], Path({str(tmp_path)!r}) / 'r.png')\n"
        "assert 'matplotlib.pyplot' not in sys.modules, 'pyplot was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_pyplot_registry_untouched(tmp_path: Path) -> None:
    import matplotlib.pyplot as plt

    before = plt.get_fignums()
    y, prob = _problem(2)
    roc_curves(y, prob, ["a", "b"], tmp_path / "r.png")
    reliability_diagram(y, prob, tmp_path / "rel.png")
    assert plt.get_fignums() == before == []
    assert plots.DPI == 100
