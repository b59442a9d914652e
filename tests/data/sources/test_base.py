"""Shared value parsers, directory-listing existence checks and option handling."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from tests.data.sources.layouts import make_montgomery, write_image

from spcxr.data.sources.base import (
    DirIndex,
    clean,
    find_child_dir,
    parse_age,
    parse_bool,
    parse_sex,
    parse_split,
    parse_view,
    read_table,
    snake_label,
)
from spcxr.data.sources.montgomery import MontgomerySource


@pytest.mark.parametrize(
    ("value", "expected"),
    [(" x ", "x"), ("", None), ("NaN", None), ("--", None), ("?", None), (float("nan"), None),
     (None, None), (0, "0"), ("N/A", None)],
)  # fmt: skip
def test_clean(value: object, expected: str | None) -> None:
    assert clean(value) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [("NORMAL", "normal"), ("COVID-19", "covid19"), ("Lung Opacity", "lung_opacity"),
     ("No Lung Opacity / Not Normal", "no_lung_opacity_not_normal"), ("E.Coli", "e_coli"),
     ("  ", None), ("--", None)],
)  # fmt: skip
def test_snake_label(value: str, expected: str | None) -> None:
    assert snake_label(value) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [("058Y", 58.0), ("45yrs", 45.0), ("35 yr", 35.0), ("6M", 0.5), ("6 months", 0.5),
     ("52W", 52 * 7 / 365.25), ("10D", 10 / 365.25), ("81", 81.0), ("45.5", 45.5), (70, 70.0),
     (70.0, 70.0), ("414", None), ("-3", None), ("old", None), ("", None), ("?", None),
     (float("nan"), None)],
)  # fmt: skip
def test_parse_age(value: object, expected: float | None) -> None:
    result = parse_age(value)
    if expected is None:
        assert result is None
    else:
        assert result is not None and math.isclose(result, expected)


def test_parse_sex_view_split_bool() -> None:
    assert [parse_sex(v) for v in ("M", "female", "Male", " f ", "O", "Unknown", "")] == [
        "M", "F", "M", "F", None, None, None
    ]  # fmt: skip
    assert [parse_view(v) for v in ("pa", "AP Supine", "AP  supine", "L", "LL", "APS", "?")] == [
        "PA", "AP SUPINE", "AP SUPINE", "LATERAL", "LATERAL", "AP SUPINE", None
    ]  # fmt: skip
    assert [parse_split(v) for v in ("Train", "valid", "validation", "test", "holdout", "")] == [
        "train", "val", "val", "test", None, None
    ]  # fmt: skip
    assert [parse_bool(v) for v in (True, "yes", "0", 1, "False")] == [
        True,
        True,
        False,
        True,
        False,
    ]
    with pytest.raises(ValueError, match="not a boolean"):
        parse_bool("perhaps")


def test_dir_index_lists_each_folder_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_image(tmp_path / "a.png")
    write_image(tmp_path / "b.png")
    index = DirIndex()
    calls: list[str] = []
    real_scandir = __import__("os").scandir

    def counting_scandir(path: str):  # type: ignore[no-untyped-def]
        calls.append(path)
        return real_scandir(path)

    monkeypatch.setattr("spcxr.data.sources.base.os.scandir", counting_scandir)
    assert index.exists(tmp_path / "a.png")
    assert index.exists(tmp_path / "b.png")
    assert not index.exists(tmp_path / "c.png")
    assert not index.exists(tmp_path / "absent" / "d.png")
    assert calls == [str(tmp_path), str(tmp_path / "absent")]
    write_image(tmp_path / "late.png")  # created after the listing: found by the real check
    assert index.exists(tmp_path / "late.png")


def test_read_table_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"labels\.csv: index file not found"):
        read_table(tmp_path / "labels.csv")
    (tmp_path / "bad.csv").write_text('a,b\n"unclosed,2\n')
    with pytest.raises(ValueError, match=r"bad\.csv: cannot read index file"):
        read_table(tmp_path / "bad.csv")


def test_find_child_dir(tmp_path: Path) -> None:
    (tmp_path / "Set" / "Set" / "CXR_png").mkdir(parents=True)
    assert find_child_dir(tmp_path, "CXR_png", ("Set",)) == tmp_path / "Set" / "Set" / "CXR_png"
    assert find_child_dir(tmp_path, "CXR_png", ("Other",)) is None


def test_options_are_validated(tmp_path: Path) -> None:
    root = make_montgomery(tmp_path)
    source = MontgomerySource(root, check_files="no", on_missing_label="keep")
    assert source.options == {"on_missing_label": "keep", "check_files": False, "view": "PA"}
    with pytest.raises(ValueError, match="on_missing_label='drop' is not one of"):
        MontgomerySource(root, on_missing_label="drop")
    with pytest.raises(TypeError, match=r"unknown option.*mask_dir.*known options: check_files"):
        MontgomerySource(root, mask_dir="x")
