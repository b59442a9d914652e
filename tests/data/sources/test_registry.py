"""Registry, open_source (TYPE:PATH and detection), ambiguity errors and CLI option parsing."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from tests.data.sources import layouts

from spcxr.data.sources import REGISTRY, detect_types, open_source, parse_options

BUILDERS: dict[str, Callable[[Path], Path]] = {
    "folder": layouts.make_kermany,
    "csv": layouts.make_manifest,
    "shenzhen": layouts.make_shenzhen,
    "montgomery": layouts.make_montgomery,
    "ieee8023": layouts.make_ieee8023,
    "covidx": layouts.make_covidx,
    "rsna": layouts.make_rsna,
    "nih": layouts.make_nih,
    "chexpert": layouts.make_chexpert,
}


def test_registry_has_every_layout() -> None:
    assert set(REGISTRY) == set(BUILDERS)
    assert all(cls.name == name and cls.expects for name, cls in REGISTRY.items())


@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_each_layout_is_detected_as_itself_only(tmp_path: Path, kind: str) -> None:
    root = BUILDERS[kind](tmp_path / "dataset")
    assert detect_types(root) == [kind]
    source = open_source(str(root))
    assert type(source) is REGISTRY[kind]
    assert any(True for _ in source.records())
    named = open_source(f"{kind}:{root}", source_name="site_x")
    assert type(named) is REGISTRY[kind] and named.source == "site_x"


def test_reduced_copies_win_over_generic_manifest(tmp_path: Path) -> None:
    shenzhen = layouts.make_shenzhen_reduced(tmp_path / "s")
    ieee = layouts.make_ieee8023_reduced(tmp_path / "i")
    assert REGISTRY["csv"].detect(shenzhen) and REGISTRY["csv"].detect(ieee)
    assert detect_types(shenzhen) == ["shenzhen"]
    assert detect_types(ieee) == ["ieee8023"]


def test_manifest_wins_over_class_folders(tmp_path: Path) -> None:
    root = layouts.make_manifest(tmp_path / "m")
    layouts.write_image(root / "more" / "x.png")  # img/, masks/, more/, elsewhere/ hold images
    assert REGISTRY["folder"].detect(root)
    assert detect_types(root) == ["csv"]


def test_ambiguous_layout_raises_with_known_types(tmp_path: Path) -> None:
    root = layouts.make_rsna(tmp_path / "mixed")
    layouts.make_nih(root)
    with pytest.raises(ValueError, match=r"ambiguous \(matches rsna, nih\)") as info:
        open_source(str(root))
    message = str(info.value)
    assert str(root) in message
    for name, cls in REGISTRY.items():
        assert f"  {name}: {cls.expects}" in message
    assert isinstance(open_source(f"nih:{root}"), REGISTRY["nih"])


def test_undetectable_and_unknown(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"layout not recognised; name the type as TYPE:PATH"):
        open_source(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match=r"unknown source type 'mimic'.*\n  folder: "):
        open_source(f"mimic:{tmp_path}")
    with pytest.raises(FileNotFoundError, match="source path not found"):
        open_source(str(tmp_path / "absent"))
    with pytest.raises(FileNotFoundError, match="nih source root not found"):
        open_source(f"nih:{tmp_path / 'absent'}")


def test_path_with_colon_is_a_path(tmp_path: Path) -> None:
    root = layouts.make_montgomery(tmp_path / "scan:2020")
    assert type(open_source(str(root))) is REGISTRY["montgomery"]


def test_parse_options() -> None:
    options = parse_options(
        ["uncertain=ones", "frontal-only=false", "check_files=yes", "patient_pattern=^(\\d+)=x",
         "age=", "mask_dir=none", "count=12", "ratio=0.5", "code=007", "flag=True"]
    )  # fmt: skip
    assert options == {
        "uncertain": "ones",
        "frontal_only": False,
        "check_files": True,
        "patient_pattern": "^(\\d+)=x",
        "age": "",
        "mask_dir": None,
        "count": 12,
        "ratio": 0.5,
        "code": "007",
        "flag": True,
    }
    with pytest.raises(ValueError, match="not KEY=VALUE"):
        parse_options(["uncertain"])
    with pytest.raises(ValueError, match="given twice"):
        parse_options(["a=1", "a=2"])


def test_cli_options_are_coerced_by_the_adapter(tmp_path: Path) -> None:
    root = layouts.make_chexpert(tmp_path)
    source = open_source(f"chexpert:{root}", **parse_options(["frontal_only=no", "uncertain=ones"]))
    assert source.options["frontal_only"] is False and source.options["uncertain"] == "ones"
    manifest = layouts.write_csv(tmp_path / "m" / "manifest.csv", ["file", "7"], [["a.png", "x"]])
    source = open_source(str(manifest.parent), **parse_options(["label=7", "check_files=0"]))
    assert source.options["label"] == "7" and source.options["check_files"] is False
    (record,) = source.records()
    assert record.label == "x"
