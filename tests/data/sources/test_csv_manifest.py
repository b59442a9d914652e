"""Generic CSV manifest adapter: column mapping, empty-value conventions, real NIH/TBX samples."""

from __future__ import annotations

from pathlib import Path

import pytest
from tests.data.sources.layouts import make_manifest, split_items, write_csv, write_image

from spcxr.data.sources import open_source
from spcxr.data.sources.csv_manifest import CsvManifestSource


def test_manifest_records_and_skips(tmp_path: Path) -> None:
    root = make_manifest(tmp_path / "Hospital-B")
    records, skips = split_items(list(CsvManifestSource(root).records()))
    assert [(Path(s.path).name, s.reason) for s in skips] == [
        ("manifest.csv:row 7", "malformed row: no image path"),
        ("a.png", "duplicate row 10: image listed earlier in manifest.csv"),
        ("c.png", "missing label"),
        ("f.png", "missing label"),
        ("missing.png", "image file not found"),
    ]
    assert [Path(r.image_path).name for r in records] == ["e.png", "a.png", "b.png", "d.png"]
    e, a, b, d = records
    assert (e.image_path, e.patient_id, e.label, e.view, e.sex, e.age, e.official_split) == (
        str(root / "elsewhere" / "e.png"), "P7", "covid19", "LATERAL", "F", 30.0, "test"
    )  # fmt: skip
    assert a.image_path == str(root / "img" / "a.png")
    assert a.mask_paths == [str(root / "masks" / "a_left.png"), str(root / "masks" / "a_right.png")]
    assert (a.patient_id, a.label, a.view, a.sex, a.age, a.official_split, a.site) == (
        "P1", "pneumonia", "PA", "F", 45.0, "train", "ward 3"
    )  # fmt: skip
    assert a.extra == {"note": "x"}
    assert a.source == "hospital_b"
    assert (b.patient_id, b.extra) == ("b", {"patient_id_inferred": True})
    assert (b.view, b.sex, b.age, b.official_split, b.site) == (
        "AP SUPINE",
        "M",
        0.5,
        "val",
        "hospital_b",
    )
    assert (d.view, d.sex, d.age, d.official_split, d.mask_paths) == (None, None, None, None, [])
    assert d.extra == {
        "note": "y",
        "split": "holdout",
        "missing_masks": [str(root / "masks" / "gone.png")],
    }


def test_keep_unlabelled_rows(tmp_path: Path) -> None:
    root = make_manifest(tmp_path / "m")
    records, skips = split_items(list(CsvManifestSource(root, on_missing_label="keep").records()))
    assert len(records) == 6
    assert {Path(r.image_path).name for r in records if r.label is None} == {"c.png", "f.png"}
    assert [s.reason for s in skips] == [
        "malformed row: no image path",
        "duplicate row 10: image listed earlier in manifest.csv",
        "image file not found",
    ]


def test_no_file_checks_lists_missing_files(tmp_path: Path) -> None:
    root = make_manifest(tmp_path / "m")
    records, _ = split_items(list(CsvManifestSource(root, check_files=False).records()))
    assert "missing.png" in {Path(r.image_path).name for r in records}
    assert next(r for r in records if r.patient_id == "P4").mask_paths == [
        str(root / "masks" / "gone.png")
    ]


def test_csv_file_root_with_named_columns_and_base_dir(tmp_path: Path) -> None:
    images = tmp_path / "pacs"
    write_image(images / "x1.png")
    write_image(images / "x2.png")
    csv_path = write_csv(
        tmp_path / "meta" / "labels.csv",
        ["img_path", "subject", "diagnosis", "file", "extra_a", "extra_b"],
        [["x2.png", "S2", "TB", "ignored", "1", "2"], ["x1.png", "S1", "Normal", "", "3", ""]],
    )
    source = open_source(
        f"csv:{csv_path}",
        image="img_path",
        patient="subject",
        label="diagnosis",
        base_dir=str(images),
        extra_columns="extra_b",
        source_name="pacs",
    )
    records, skips = split_items(list(source.records()))
    assert skips == []
    assert [(r.patient_id, r.label, r.extra, r.source) for r in records] == [
        ("S1", "normal", {}, "pacs"),
        ("S2", "tb", {"extra_b": "2"}, "pacs"),
    ]
    assert records[0].image_path == str(images / "x1.png")
    default = CsvManifestSource(
        csv_path, image="img_path", label="", extra_columns="", base_dir=str(images)
    )
    assert default.source == "meta"
    unlabelled, _ = split_items(list(default.records()))
    assert [r.label for r in unlabelled] == [None, None]  # no label column: not a skip
    assert [r.extra for r in unlabelled] == [{"patient_id_inferred": True}] * 2


def test_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"manifest\.csv: CSV manifest not found"):
        CsvManifestSource(tmp_path)
    csv_path = write_csv(tmp_path / "manifest.csv", ["picture", "label"], [["a.png", "x"]])
    with pytest.raises(ValueError, match=r"manifest\.csv: no image column"):
        list(CsvManifestSource(tmp_path).records())
    with pytest.raises(ValueError, match=r"manifest\.csv: column 'img' \(option image\) not found"):
        list(CsvManifestSource(tmp_path, image="img").records())
    with pytest.raises(ValueError, match=r"extra_columns not found: nope"):
        list(CsvManifestSource(csv_path, image="picture", extra_columns="nope").records())
    csv_path.write_bytes(b"")
    with pytest.raises(ValueError, match=r"manifest\.csv: cannot read index file"):
        list(CsvManifestSource(csv_path).records())


def test_detect(tmp_path: Path) -> None:
    root = make_manifest(tmp_path / "m")
    assert CsvManifestSource.detect(root)
    assert CsvManifestSource.detect(root / "manifest.csv")
    other = write_csv(tmp_path / "o" / "manifest.csv", ["picture", "label"], [["a.png", "x"]])
    assert not CsvManifestSource.detect(other.parent)
    assert not CsvManifestSource.detect(tmp_path / "nothing")
    assert isinstance(open_source(str(root)), CsvManifestSource)


@pytest.mark.real_data
def test_real_nih_tbx_samples(shared_data: Path) -> None:
    root = shared_data / "nih_tbx_samples"
    source = open_source(str(root))
    assert isinstance(source, CsvManifestSource)
    records, skips = split_items(list(source.records()))
    assert skips == []
    assert [(r.patient_id, r.label, r.sex, r.age, r.view) for r in records] == [
        ("1", "abnormal_other", "M", 57.0, "PA"),
        ("27426", "normal", "M", 53.0, "PA"),
        ("tbx11k_h0001", "normal", None, None, None),
        ("tbx11k_tb0005", "tuberculosis", None, None, None),
        ("tbx11k_tb0007", "tuberculosis", None, None, None),
    ]
    assert [bool(r.extra.get("patient_id_inferred")) for r in records] == [
        False,
        False,
        True,
        True,
        True,
    ]
    assert records[0].extra["finding"] == "Cardiomegaly"
    assert all(Path(r.image_path).is_file() for r in records)
