"""COVIDx CXR adapter: index lines, splits, sites, file names with spaces, old classes."""

from __future__ import annotations

from pathlib import Path

import pytest
from tests.data.sources.layouts import make_covidx, make_covidx_v1, split_items

from spcxr.data.sources import open_source
from spcxr.data.sources.covidx import CovidxSource, parse_line


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("p1 a.png positive rsna", ("p1", "a.png", "positive", "rsna")),
        ("p1 COVID (7).png positive cohen", ("p1", "COVID (7).png", "positive", "cohen")),
        ("p1 a.jpg COVID-19", ("p1", "a.jpg", "COVID-19", None)),
        ("p1 a.png", None),
        ("p1 a.png b c d", None),
        ("only-one-field", None),
    ],
)
def test_parse_line(line: str, expected: tuple | None) -> None:
    assert parse_line(line) == expected


def test_cxr4_records(tmp_path: Path) -> None:
    root = make_covidx(tmp_path / "covidx")
    records, skips = split_items(list(CovidxSource(root).records()))
    assert [(Path(s.path).name, s.reason) for s in skips] == [
        ("train.txt:5", "malformed line: 'broken-line-without-file negative'"),
        ("missing.png", "image file not found"),
    ]
    assert [
        (Path(r.image_path).name, r.patient_id, r.label, r.site, r.official_split) for r in records
    ] == [
        ("8dd1d1b4-7e1f.png", "8dd1d1b4-7e1f", "negative", "rsna", "train"),
        ("A035989-01-07-1901-NA-CHEST_AP_PORT-10853-3.png", "ANON66", "negative", "bimcv", "train"),
        ("COVID (7).png", "p7", "positive", "cohen", "train"),
        ("MIDRC-RICORD-1C-419639-003251-46647-0.png", "419639-003251", "positive", "ricord",
         "train"),
        ("val-1.png", "p3", "negative", "sirm", "val"),
        ("test-1.png", "p4", "positive", "stonybrook", "test"),
        ("test-2.png", "p5", "negative", "rsna", "test"),
    ]  # fmt: skip
    assert records[0].image_path == str(root / "train" / "8dd1d1b4-7e1f.png")
    assert {r.source for r in records} == {"covidx"}


def test_early_release_three_classes(tmp_path: Path) -> None:
    root = make_covidx_v1(tmp_path / "covidx3")
    records, skips = split_items(list(CovidxSource(root).records()))
    assert skips == []
    assert [(r.patient_id, r.label, r.official_split) for r in records] == [
        ("3", "covid19", "train"),
        ("5", "normal", "train"),
        ("6", "pneumonia", "train"),
        ("7", "normal", "test"),
    ]


def test_list_options_and_errors(tmp_path: Path) -> None:
    root = make_covidx(tmp_path / "c")
    (root / "train.txt").rename(root / "train_COVIDx9A.txt")
    records, _ = split_items(list(CovidxSource(root, train_list="train_COVIDx9A.txt").records()))
    assert sum(r.official_split == "train" for r in records) == 4
    only_eval, _ = split_items(list(CovidxSource(root).records()))
    assert {r.official_split for r in only_eval} == {"val", "test"}
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no COVIDx index file"):
        CovidxSource(tmp_path / "empty")


def test_detect(tmp_path: Path) -> None:
    root = make_covidx(tmp_path / "c")
    assert CovidxSource.detect(root)
    assert isinstance(open_source(str(root)), CovidxSource)
    (root / "train.txt").write_text("a b\n")
    assert not CovidxSource.detect(root)
    assert not CovidxSource.detect(tmp_path)
