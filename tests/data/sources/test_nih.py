"""NIH ChestX-ray14 adapter: Data_Entry CSV, archive folders, split lists, 14 findings."""

from __future__ import annotations

from pathlib import Path

import pytest
from tests.data.sources.layouts import make_nih, split_items, write_csv, write_image

from spcxr.data.sources import open_source
from spcxr.data.sources.nih import PATHOLOGIES, NihSource, image_map

FINDING_NAMES = [
    "atelectasis", "cardiomegaly", "consolidation", "edema", "effusion", "emphysema",
    "fibrosis", "hernia", "infiltration", "mass", "nodule", "pleural_thickening", "pneumonia",
    "pneumothorax",
]  # fmt: skip


def positives(findings: dict[str, float]) -> list[str]:
    return [name for name, value in findings.items() if value == 1.0]


def test_records(tmp_path: Path) -> None:
    root = make_nih(tmp_path / "nih")
    records, skips = split_items(list(NihSource(root).records()))
    assert [(Path(s.path).name, s.reason) for s in skips] == [
        ("00000004_000.png", "image file not found"),
        ("00000005_000.png", "missing label (Finding Labels)"),
    ]
    assert [
        (Path(r.image_path).name, r.patient_id, r.label, positives(r.findings), r.official_split)
        for r in records
    ] == [
        ("00000001_000.png", "1", "abnormal", ["cardiomegaly"], "train"),
        ("00000001_001.png", "1", "abnormal", ["cardiomegaly", "emphysema"], "train"),
        ("00000002_000.png", "2", "normal", [], "test"),
        ("00000003_000.png", "3", "abnormal", ["hernia", "pleural_thickening"], "train"),
        ("00000006_000.png", "6", "normal", [], None),
    ]
    assert all(list(r.findings) == FINDING_NAMES for r in records)
    assert all(set(r.findings.values()) <= {0.0, 1.0} for r in records)
    assert [(r.sex, r.age, r.view, r.extra) for r in records] == [
        ("M", 58.0, "PA", {"follow_up": 0}),
        ("M", 58.0, "PA", {"follow_up": 1}),
        ("F", 81.0, "AP", {"follow_up": 0}),
        ("F", None, "PA", {"follow_up": 0}),  # age 414 is a data-entry error
        ("M", 81.0, "PA", {"follow_up": 0}),
    ]
    assert records[0].image_path == str(root / "images_001" / "images" / "00000001_000.png")
    assert records[3].image_path == str(root / "images_002" / "images" / "00000003_000.png")
    assert {r.source for r in records} == {"nih"}


def test_v2020_csv_flat_images_and_options(tmp_path: Path) -> None:
    root = make_nih(tmp_path / "nih", csv_name="Data_Entry_2017_v2020.csv")
    write_csv(root / "Data_Entry_2017.csv", ["Image Index"], [["old.png"]])  # ignored
    for path in (root / "images_002" / "images").iterdir():
        path.rename(root / "images_002" / path.name)  # archive unpacked without images/
    source = NihSource(root, on_missing_label="keep", check_files=False)
    assert source.csv_path.name == "Data_Entry_2017_v2020.csv"
    records, skips = split_items(list(source.records()))
    assert skips == []
    named = {Path(r.image_path).name: r for r in records}
    assert named["00000003_000.png"].image_path == str(root / "images_002" / "00000003_000.png")
    assert named["00000004_000.png"].image_path == str(root / "images" / "00000004_000.png")
    assert (named["00000005_000.png"].label, named["00000005_000.png"].findings) == (None, {})


def test_image_map_single_walk(tmp_path: Path) -> None:
    write_image(tmp_path / "images" / "a.png")
    write_image(tmp_path / "images_012" / "images" / "b.png")
    write_image(tmp_path / "other" / "c.png")
    found = image_map(tmp_path)
    assert found == {
        "a.png": str(tmp_path / "images" / "a.png"),
        "b.png": str(tmp_path / "images_012" / "images" / "b.png"),
    }


def test_detect_and_errors(tmp_path: Path) -> None:
    root = make_nih(tmp_path / "nih")
    assert NihSource.detect(root)
    assert not NihSource.detect(tmp_path)
    assert isinstance(open_source(str(root)), NihSource)
    with pytest.raises(FileNotFoundError, match="no NIH Data_Entry CSV"):
        NihSource(tmp_path)
    write_csv(root / "Data_Entry_2017.csv", ["Image Index", "Finding Labels"], [["a.png", "x"]])
    with pytest.raises(ValueError, match=r"Data_Entry_2017\.csv: missing column\(s\) Follow-up #"):
        list(NihSource(root).records())
    assert len(PATHOLOGIES) == 14
