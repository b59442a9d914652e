"""Montgomery adapter: official NLM layout, clinical readings, left + right lung masks."""

from __future__ import annotations

from pathlib import Path

import pytest
from tests.data.sources.layouts import by_name, make_montgomery, split_items

from spcxr.data.sources import open_source
from spcxr.data.sources.montgomery import MontgomerySource, parse_reading


def test_parse_reading() -> None:
    lines = ["Patient's Sex: F", "Patient's Age: 040Y", "Image: upper lobe", "TB"]
    assert parse_reading(lines) == ("F", 40.0, "Image: upper lobe TB")
    assert parse_reading(["Patient's Sex: O", "Patient's Age:"]) == (None, None, None)


def test_official_layout_records(tmp_path: Path) -> None:
    root = make_montgomery(tmp_path / "nlm")
    records, skips = split_items(list(MontgomerySource(root).records()))
    assert [(Path(s.path).name, s.reason) for s in skips] == [
        ("MCUCXR_bad.png", "unparseable patient id (expected MCUCXR_NNNN_0|1.png)")
    ]
    assert [(r.patient_id, r.label, r.sex, r.age, r.extra) for r in records] == [
        ("MCUCXR_0001", "normal", "F", 40.0, {"finding": "normal"}),
        ("MCUCXR_0002", "normal", "M", 0.5, {"finding": "normal"}),
        ("MCUCXR_0104", "tuberculosis", "M", 52.0, {"finding": "Right upper lobe cavity; TB"}),
        ("MCUCXR_0105", "tuberculosis", None, None,
         {"finding": "bilateral infiltrates", "mask_incomplete": True}),
        ("MCUCXR_0106", "tuberculosis", None, None, {}),
    ]  # fmt: skip
    masks = root / "MontgomerySet" / "ManualMask"
    named = by_name(records)
    assert named["MCUCXR_0001_0.png"].mask_paths == [
        str(masks / "leftMask" / "MCUCXR_0001_0.png"),
        str(masks / "rightMask" / "MCUCXR_0001_0.png"),
    ]
    assert named["MCUCXR_0105_1.png"].mask_paths == []
    assert named["MCUCXR_0106_1.png"].mask_paths == []
    assert {(r.view, r.source) for r in records} == {("PA", "montgomery")}


def test_root_may_be_montgomeryset_and_view_option(tmp_path: Path) -> None:
    root = make_montgomery(tmp_path / "nlm") / "MontgomerySet"
    source = MontgomerySource(root, view="ap", source_name="mc")
    records, _ = split_items(list(source.records()))
    assert len(records) == 5
    assert {(r.view, r.source, r.site) for r in records} == {("AP", "mc", "mc")}
    assert len(records[0].mask_paths) == 2


def test_detect_and_errors(tmp_path: Path) -> None:
    root = make_montgomery(tmp_path / "nlm")
    assert MontgomerySource.detect(root)
    assert MontgomerySource.detect(root / "MontgomerySet")
    assert not MontgomerySource.detect(tmp_path)
    assert isinstance(open_source(str(root)), MontgomerySource)
    assert isinstance(open_source(f"montgomery:{root}"), MontgomerySource)
    with pytest.raises(FileNotFoundError, match="no montgomery layout found"):
        MontgomerySource(tmp_path)
