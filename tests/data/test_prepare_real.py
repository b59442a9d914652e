"""``spcxr prepare`` on the shared real chest X-rays (skipped with a reason when absent)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from spcxr.data.prepare import PrepareConfig, fit_mask, fit_square, prepare
from spcxr.data.splits import check_leakage
from spcxr.data.store import PreparedStore
from spcxr.io import read_image, read_mask

pytestmark = pytest.mark.real_data


def _prepare(sources: list[str], out: Path, **kwargs) -> PreparedStore:
    prepare(PrepareConfig(sources=sources, out=str(out), progress=False, **kwargs))
    return PreparedStore(out)


@pytest.fixture(scope="module")
def kermany(shared_data: Path, module_dir) -> PreparedStore:
    # The official train folder only: test/ is external test A, never prepared with training data.
    return _prepare(
        [f"kermany_pediatric=folder:{shared_data / 'kermany_pediatric/train'}"],
        module_dir("k") / "store",
    )


def test_kermany_store(kermany: PreparedStore) -> None:
    m = kermany.manifest
    assert len(m) == 5216
    assert m.patient_id.nunique() == 2846
    assert m.label.value_counts().to_dict() == {"pneumonia": 3875, "normal": 1341}
    assert m.sublabel.value_counts().to_dict() == {"bacteria": 2530, "virus": 1345}
    check_leakage(m)
    # Splits by patient, stratified: the pneumonia share of each split is within 2 points.
    share = m.groupby("split")["label"].apply(lambda s: (s == "pneumonia").mean())
    assert share.max() - share.min() < 0.02
    assert len(kermany.images(np.arange(0, 5216, 97))) == 54


def test_kermany_duplicates(kermany: PreparedStore) -> None:
    dup = pd.read_csv(kermany.root / "duplicates.csv")
    exact = dup[dup.kind == "exact"]
    # The 28 identical-image pairs of the Kermany train folder (24 groups, two of them triples).
    assert len(exact) == 28
    assert exact.group.nunique() == 24
    # Every duplicate pair (exact or near) lies within one patient: no false merge of patients.
    assert dup.same_patient.all()
    # Near pairs are rare (the one found is person1730's film re-cropped: thumbnail corr 0.98).
    assert (dup.kind == "near").sum() <= 3


def test_ieee8023_duplicates_and_masks(shared_data: Path, tmp_path: Path) -> None:
    store = _prepare([str(shared_data / "covid_ieee8023")], tmp_path / "s")
    m = store.manifest
    assert len(m) == 392 and m.patient_id.nunique() == 220
    dup = pd.read_csv(store.root / "duplicates.csv")
    pairs = {
        tuple(sorted((Path(a).name, Path(b).name)))
        for a, b in dup[["image_path_a", "image_path_b"]].itertuples(index=False)
    }
    ards = "covid-19-rapidly-progressive-acute-respiratory-distress-syndrome-ards-"
    expected = {
        ("16660_2_1.png", f"{ards}admission.png"),
        ("16660_3_1.png", f"{ards}day-1.png"),
        ("16660_4_1.png", f"{ards}day-2.png"),
        ("16660_5_1.png", f"{ards}day-3.png"),
        (
            "3d4364c0e44859e86017ee1660112e_jumbo-1.png",
            "81ba2932af55c7663e9d87016776a6_jumbo-1.png",
        ),
    }
    # Exactly the 5 same-image pairs: 4 filed under patients 178 and 97, one twice under 364.
    # No pair of different films of one patient (several follow-ups per patient) is flagged.
    assert pairs == expected
    assert (~dup.same_patient).sum() == 4
    groups = m.set_index(m.image_path.map(lambda p: Path(p).name))["group"]
    assert groups["16660_2_1.png"] == groups[f"{ards}day-3.png"]  # patients 178 and 97 merged
    check_leakage(m)
    assert int(m.has_mask.sum()) == 226


def test_shenzhen_masks_are_aligned(shared_data: Path, tmp_path: Path) -> None:
    store = _prepare([str(shared_data / "shenzhen")], tmp_path / "s", image_size=128)
    m = store.manifest
    assert len(m) == 662 and int(m.has_mask.sum()) == 566
    rows = np.flatnonzero(m.has_mask.to_numpy())[::50]
    images, masks = store.images(rows), store.masks(rows)
    for k, i in enumerate(rows):
        row = m.iloc[i]
        pixels = read_image(row.image_path).pixels
        mask = read_mask(row.mask_paths, shape=pixels.shape)
        expected_img, box = fit_square(pixels, 128)
        expected = fit_mask(mask, 128, box)
        assert np.array_equal(images[k], expected_img)
        inter = np.logical_and(masks[k], expected).sum()
        union = np.logical_or(masks[k], expected).sum()
        assert inter / union > 0.99
        # Lungs are dark (low attenuation) next to the mediastinum between them.
        lungs = images[k][masks[k] == 1].mean()
        ys = np.nonzero(masks[k])[0]
        centre = images[k][ys.min() : ys.max(), 60:68].mean()
        assert lungs + 10 < centre, (row.image_path, lungs, centre)


def test_dicom_folder_reads_every_file(shared_data: Path, tmp_path: Path) -> None:
    store = _prepare([f"csv:{shared_data / 'dicom'}"], tmp_path / "s")
    m = store.manifest
    assert len(m) == 7
    assert pd.read_csv(store.root / "errors.csv").empty
    # Patient ids come from the DICOM headers (the manifest has none).
    assert set(m.patient_id) >= {"9RG1", "Covid0000"}
    # The three RG1 renderings are one duplicate group (one patient).
    rg1 = m[m.image_path.str.contains("rg1_")]
    assert rg1.dup_group.nunique() == 1 and (rg1.dup_group >= 0).all()


def test_cross_source_store(shared_data: Path, tmp_path: Path) -> None:
    store = _prepare(
        [str(shared_data / s) for s in ("covid_ieee8023", "shenzhen", "nih_tbx_samples")],
        tmp_path / "s",
    )
    dup = pd.read_csv(store.root / "duplicates.csv")
    assert len(store) == 392 + 662 + 5
    assert (dup.source_a == dup.source_b).all()  # no false cross-source merges
    check_leakage(store.manifest)
