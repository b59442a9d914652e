"""RSNA Pneumonia Detection Challenge adapter: box rows grouped per image, DICOM images."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from tests.data.sources.layouts import make_rsna, split_items, write_csv

from spcxr.data.sources import open_source
from spcxr.data.sources.rsna import RsnaSource


def test_stage2_records(tmp_path: Path) -> None:
    root = make_rsna(tmp_path / "rsna")
    records, skips = split_items(list(RsnaSource(root).records()))
    images = root / "stage_2_train_images"
    assert [(s.path, s.reason) for s in skips] == [
        (f"{root / 'stage_2_train_labels.csv'}:row 8", "malformed row: no patientId"),
        (str(images / "ccc.dcm"), "image file not found"),
        (str(images / "ddd.dcm"), "missing label (Target)"),
        (str(images / "eee.dcm"), "malformed row: Target 2 is not 0 or 1"),
    ]
    assert [(r.patient_id, r.label, r.sublabel, r.extra) for r in records] == [
        ("aaa", "pneumonia", "lung_opacity",
         {"boxes": [[264.0, 152.0, 213.0, 379.0], [562.0, 152.0, 256.0, 453.0]]}),
        ("bbb", "no_pneumonia", "no_lung_opacity_not_normal", {}),
        ("fff", "no_pneumonia", "normal", {}),
    ]  # fmt: skip
    aaa = records[0]
    assert aaa.image_path == str(images / "aaa.dcm")
    assert (aaa.view, aaa.sex, aaa.age, aaa.official_split, aaa.source) == (
        None, None, None, None, "rsna"
    )  # fmt: skip
    assert pydicom.dcmread(aaa.image_path).PatientID == "aaa"  # the fixture is a real DICOM


def test_keep_unlabelled_and_stage1_names(tmp_path: Path) -> None:
    root = make_rsna(tmp_path / "rsna1", stage="stage_1")
    records, _ = split_items(list(RsnaSource(root, on_missing_label="keep").records()))
    assert [(r.patient_id, r.label) for r in records] == [
        ("aaa", "pneumonia"),
        ("bbb", "no_pneumonia"),
        ("ddd", None),
        ("fff", "no_pneumonia"),
    ]
    assert records[0].image_path == str(root / "stage_1_train_images" / "aaa.dcm")


def test_stage2_preferred_and_class_file_optional(tmp_path: Path) -> None:
    root = make_rsna(tmp_path / "r")
    write_csv(root / "stage_1_train_labels.csv", ["patientId", "Target"], [["zzz", 1]])
    (root / "stage_2_detailed_class_info.csv").unlink()
    records, _ = split_items(list(RsnaSource(root).records()))
    assert [(r.patient_id, r.sublabel) for r in records] == [
        ("aaa", None),
        ("bbb", None),
        ("fff", None),
    ]


def test_detect_and_errors(tmp_path: Path) -> None:
    root = make_rsna(tmp_path / "r")
    assert RsnaSource.detect(root)
    assert not RsnaSource.detect(tmp_path)
    assert isinstance(open_source(str(root)), RsnaSource)
    with pytest.raises(FileNotFoundError, match="no RSNA labels file"):
        RsnaSource(tmp_path)
    write_csv(root / "stage_2_train_labels.csv", ["patient", "Target"], [["a", 1]])
    with pytest.raises(
        ValueError, match=r"stage_2_train_labels\.csv: missing column\(s\) patientId"
    ):
        list(RsnaSource(root).records())
