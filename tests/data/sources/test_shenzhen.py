"""Shenzhen adapter: official NLM layout, clinical readings, masks, the shared reduced copy."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
from tests.data.sources.layouts import (
    by_name,
    make_shenzhen,
    make_shenzhen_reduced,
    split_items,
)

from spcxr.data.sources import open_source
from spcxr.data.sources.shenzhen import ShenzhenSource, parse_reading


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        (["Male 45yrs", "normal"], ("M", 45.0, "normal")),
        (["female 35yr", "normal"], ("F", 35.0, "normal")),
        (["femal, 24yrs", "bilateral PTB"], ("F", 24.0, "bilateral PTB")),
        (["Male35yrs"], ("M", 35.0, None)),
        (["male 6month", "normal"], ("M", 0.5, "normal")),
        (["STB"], (None, None, "STB")),
        ([], (None, None, None)),
    ],
)
def test_parse_reading(lines: list[str], expected: tuple) -> None:
    assert parse_reading(lines) == expected


def test_official_layout_records(tmp_path: Path) -> None:
    root = make_shenzhen(tmp_path / "shenzhen")
    records, skips = split_items(list(ShenzhenSource(root).records()))
    assert [(Path(s.path).name, s.reason) for s in skips] == [
        ("CHNCXR_extra.png", "unparseable patient id (expected CHNCXR_NNNN_0|1.png)")
    ]
    assert [(r.patient_id, r.label, r.sex, r.age) for r in records] == [
        ("CHNCXR_0001", "normal", "M", 45.0),
        ("CHNCXR_0002", "normal", "F", 35.0),
        ("CHNCXR_0327", "tuberculosis", "M", 27.0),
        ("CHNCXR_0328", "tuberculosis", "F", 24.0),
        ("CHNCXR_0329", "tuberculosis", "M", pytest.approx(10 / 12)),
        ("CHNCXR_0330", "tuberculosis", None, None),
    ]
    named = by_name(records)
    assert named["CHNCXR_0001_0.png"].mask_paths == [str(root / "mask" / "CHNCXR_0001_0_mask.png")]
    assert named["CHNCXR_0329_1.png"].mask_paths == []
    assert named["CHNCXR_0330_1.png"].mask_paths == [str(root / "mask" / "CHNCXR_0330_1_mask.png")]
    assert named["CHNCXR_0327_1.png"].extra == {
        "finding": "STB,ATB,tuberculosis pleuritis left upper"
    }
    assert named["CHNCXR_0330_1.png"].extra == {}
    assert {(r.view, r.source, r.official_split) for r in records} == {("PA", "shenzhen", None)}
    assert named["CHNCXR_0001_0.png"].image_path == str(
        root / "ChinaSet_AllFiles" / "CXR_png" / "CHNCXR_0001_0.png"
    )


def test_root_may_be_the_inner_folder_and_masks_found_above(tmp_path: Path) -> None:
    root = make_shenzhen(tmp_path / "s", mask_dir="masks")
    records, _ = split_items(list(ShenzhenSource(root / "ChinaSet_AllFiles").records()))
    assert len(records) == 6
    assert sum(bool(r.mask_paths) for r in records) == 5
    assert records[0].mask_paths == [str(root / "masks" / "CHNCXR_0001_0_mask.png")]


def test_mask_dir_option(tmp_path: Path) -> None:
    root = make_shenzhen(tmp_path / "s", mask_dir="stirenko_2018")
    unmasked, _ = split_items(list(ShenzhenSource(root).records()))  # not a common mask name
    assert len(unmasked) == 6 and not any(r.mask_paths for r in unmasked)
    records, _ = split_items(list(ShenzhenSource(root, mask_dir="stirenko_2018").records()))
    assert sum(bool(r.mask_paths) for r in records) == 5
    with pytest.raises(FileNotFoundError, match="absent_dir"):
        list(ShenzhenSource(root, mask_dir="absent_dir").records())


def test_reduced_copy(tmp_path: Path) -> None:
    root = make_shenzhen_reduced(tmp_path / "shenzhen")
    records, skips = split_items(list(ShenzhenSource(root).records()))
    assert [(Path(s.path).name, s.reason) for s in skips] == [
        ("CHNCXR_0401_1.png", "image file not found")
    ]
    assert [(r.patient_id, r.label, r.view, r.official_split, r.extra) for r in records] == [
        ("CHNCXR_0001", "normal", "PA", None, {}),
        ("CHNCXR_0400", "tuberculosis", "PA", None, {}),
    ]
    assert records[0].mask_paths == [str(root / "masks" / "CHNCXR_0001_0.png")]
    assert records[1].mask_paths == []


def test_detect_and_errors(tmp_path: Path) -> None:
    official = make_shenzhen(tmp_path / "a")
    reduced = make_shenzhen_reduced(tmp_path / "b")
    assert ShenzhenSource.detect(official)
    assert ShenzhenSource.detect(official / "ChinaSet_AllFiles")
    assert ShenzhenSource.detect(reduced)
    assert not ShenzhenSource.detect(tmp_path)
    assert isinstance(open_source(str(official)), ShenzhenSource)
    assert isinstance(open_source(str(reduced)), ShenzhenSource)  # wins over the csv layout
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no shenzhen layout found"):
        ShenzhenSource(tmp_path / "empty")


@pytest.mark.real_data
def test_real_shenzhen_reduced_copy(shared_data: Path) -> None:
    source = open_source(str(shared_data / "shenzhen"))
    assert isinstance(source, ShenzhenSource)
    records, skips = split_items(list(source.records()))
    assert skips == []
    assert len(records) == 662
    assert Counter(r.label for r in records) == {"normal": 326, "tuberculosis": 336}
    with_masks = [r for r in records if r.mask_paths]
    assert len(with_masks) == 566
    assert all(len(r.mask_paths) == 1 and Path(r.mask_paths[0]).is_file() for r in with_masks)
    assert len({r.patient_id for r in records}) == 662
    for record in records:
        stem = Path(record.image_path).stem
        assert record.patient_id == stem[:11] and stem.startswith("CHNCXR_")
        assert record.label == ("tuberculosis" if stem.endswith("_1") else "normal")
    assert {r.view for r in records} == {"PA"}
