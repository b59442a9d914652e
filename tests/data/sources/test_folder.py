"""Folder-of-class-folders adapter: Kermany layout, patient patterns, real Kermany train set."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
from tests.data.sources.layouts import (
    by_name,
    make_kermany,
    split_items,
    write_dicom,
    write_image,
)

from spcxr.data.sources import open_source
from spcxr.data.sources.folder import FolderSource


def test_kermany_layout_records(tmp_path: Path) -> None:
    root = make_kermany(tmp_path / "chest_xray")
    records, skips = split_items(list(FolderSource(root).records()))
    assert skips == []
    assert [(Path(r.image_path).name, r.patient_id, r.label, r.sublabel, r.official_split)
            for r in records] == [
        ("IM-0001-0001.jpeg", "IM-0001", "normal", None, "test"),
        ("person100_bacteria_475.jpeg", "person100", "pneumonia", "bacteria", "test"),
        ("IM-0115-0001.jpeg", "IM-0115", "normal", None, "train"),
        ("IM-0429-0001-0002.jpeg", "IM-0429", "normal", None, "train"),
        ("IM-0429-0001.jpeg", "IM-0429", "normal", None, "train"),
        ("NORMAL2-IM-0383-0001.jpeg", "NORMAL2-IM-0383", "normal", None, "train"),
        ("scan_07.jpeg", "scan_07", "normal", None, "train"),
        ("person1000_virus_1681_1.jpeg", "person1000", "pneumonia", "virus", "train"),
        ("person1_bacteria_1.jpeg", "person1", "pneumonia", "bacteria", "train"),
        ("person1_virus_6.jpeg", "person1", "pneumonia", "virus", "train"),
        ("person22_virus_55.jpeg", "person22", "pneumonia", "virus", "train"),
        ("NORMAL2-IM-1427-0001.jpeg", "NORMAL2-IM-1427", "normal", None, "val"),
        ("person1946_bacteria_4874.jpeg", "person1946", "pneumonia", "bacteria", "val"),
    ]  # fmt: skip
    named = by_name(records)
    assert named["scan_07.jpeg"].extra == {"patient_id_inferred": True}
    assert named["IM-0115-0001.jpeg"].extra == {}
    first = records[0]
    assert first.source == first.site == "chest_xray"
    assert Path(first.image_path).is_absolute()
    assert first.image_path == str(root / "test" / "NORMAL" / "IM-0001-0001.jpeg")


def test_unmatched_names_can_be_skipped(tmp_path: Path) -> None:
    root = make_kermany(tmp_path / "k")
    records, skips = split_items(list(FolderSource(root, on_unmatched="skip").records()))
    assert len(records) == 12
    assert [Path(s.path).name for s in skips] == ["scan_07.jpeg"]
    assert skips[0].reason.startswith("unparseable patient id")
    assert skips[0].source == "k"


def test_flat_layout_custom_pattern_and_source_name(tmp_path: Path) -> None:
    root = tmp_path / "hospital_a"
    write_image(root / "Lung Opacity" / "pt-0042_1.png")
    write_image(root / "Lung Opacity" / "pt-0042_2.png")
    write_image(root / "normal" / "pt-7_1.PNG")
    write_image(root / "normal" / "unknown.png")
    write_image(root / "stray.png")  # not in a class folder
    source = FolderSource(
        root, source_name="hosp_a", patient_pattern=r"pt-(?P<patient>\d+)_", on_unmatched="skip"
    )
    records, skips = split_items(list(source.records()))
    assert [(r.patient_id, r.label, r.official_split) for r in records] == [
        ("0042", "lung_opacity", None),
        ("0042", "lung_opacity", None),
        ("7", "normal", None),
    ]
    assert {r.source for r in records} == {"hosp_a"}
    assert [(Path(s.path).name, s.reason.split(" (")[0]) for s in skips] == [
        ("stray.png", "image outside a class folder"),
        ("unknown.png", "unparseable patient id"),
    ]


def test_extensions_option_limits_listing(tmp_path: Path) -> None:
    root = tmp_path / "d"
    write_image(root / "a" / "x.png")
    write_image(root / "a" / "y.jpeg")
    write_image(root / "b" / "z.png")
    records, _ = split_items(list(FolderSource(root, extensions="png").records()))
    assert sorted(Path(r.image_path).name for r in records) == ["x.png", "z.png"]


def test_bad_options_raise(tmp_path: Path) -> None:
    root = make_kermany(tmp_path / "k")
    with pytest.raises(ValueError, match="invalid patient_pattern"):
        FolderSource(root, patient_pattern="(unclosed")
    with pytest.raises(ValueError, match="needs a group"):
        FolderSource(root, patient_pattern=r"person\d+")
    with pytest.raises(ValueError, match="on_unmatched"):
        FolderSource(root, on_unmatched="guess")
    with pytest.raises(TypeError, match=r"unknown option.*patient_regex.*known options"):
        FolderSource(root, patient_regex="x")
    with pytest.raises(FileNotFoundError, match="not found"):
        FolderSource(tmp_path / "absent")
    write_image(tmp_path / "file.png")
    with pytest.raises(NotADirectoryError, match=r"file\.png"):
        FolderSource(tmp_path / "file.png")


def test_detect(tmp_path: Path) -> None:
    assert FolderSource.detect(make_kermany(tmp_path / "k"))
    flat = tmp_path / "flat"
    write_image(flat / "a" / "1.png")
    assert not FolderSource.detect(flat)  # one class folder is not a class layout
    write_dicom(flat / "b" / "2.dcm", "p2")
    assert FolderSource.detect(flat)
    assert FolderSource.detect(flat / "a" / "1.png") is False
    empty = tmp_path / "empty"
    (empty / "train" / "NORMAL").mkdir(parents=True)
    assert not FolderSource.detect(empty)
    source = open_source(str(tmp_path / "k"))
    assert isinstance(source, FolderSource)


@pytest.mark.real_data
def test_real_kermany_train(shared_data: Path) -> None:
    items = list(
        open_source(str(shared_data / "kermany_pediatric/train"), source_name="kermany").records()
    )
    records, skips = split_items(items)
    assert skips == []
    assert len(records) == 5216
    # The train folder alone is class folders: no official split is recorded.
    assert {r.official_split for r in records} == {None}
    assert {r.source for r in records} == {"kermany"}
    assert Counter(r.label for r in records) == {"normal": 1341, "pneumonia": 3875}
    assert Counter(r.sublabel for r in records) == {"bacteria": 2530, "virus": 1345, None: 1341}
    assert not any(r.extra.get("patient_id_inferred") for r in records)
    patients = {r.patient_id for r in records}
    assert len(patients) == 2846
    assert {p for p in patients if p.startswith("NORMAL2-")}  # separate numbering kept
    # a patient never has both classes
    labels_of: dict[str, set[str | None]] = {}
    for r in records:
        labels_of.setdefault(r.patient_id, set()).add(r.label)
    assert all(len(labels) == 1 for labels in labels_of.values())


@pytest.mark.real_data
def test_real_kermany_official_layout(shared_data: Path) -> None:
    """The root holds Kermany's official train/ + test/ (external test A: 312 images)."""
    items = list(open_source(str(shared_data / "kermany_pediatric"), source_name="k").records())
    records, skips = split_items(items)
    assert skips == []
    assert Counter(r.official_split for r in records) == {"train": 5216, "test": 312}
    test = [r for r in records if r.official_split == "test"]
    assert Counter(r.label for r in test) == {"normal": 117, "pneumonia": 195}
    assert Counter(r.sublabel for r in test) == {"bacteria": 126, "virus": 69, None: 117}
    assert len({r.patient_id for r in test}) == 213


def test_split_names_with_image_folders_beside_them_are_classes(tmp_path: Path) -> None:
    root = tmp_path / "export"
    write_image(root / "test" / "a.png")  # a class that happens to be called "test"
    write_image(root / "control" / "b.png")
    records, _ = split_items(list(FolderSource(root).records()))
    assert [(r.label, r.official_split) for r in records] == [("control", None), ("test", None)]
