"""ieee8023 COVID-19 collection adapter: official metadata.csv, label mapping, reduced copy."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pandas as pd
import pytest
from tests.data.sources.layouts import (
    by_name,
    make_ieee8023,
    make_ieee8023_reduced,
    split_items,
)

from spcxr.data.sources import open_source
from spcxr.data.sources.ieee8023 import Ieee8023Source, finding_label, finding_sublabel


@pytest.mark.parametrize(
    ("finding", "label", "sublabel"),
    [
        ("Pneumonia/Viral/COVID-19", "covid19", None),
        ("COVID-19, ARDS", "covid19", None),
        ("No Finding", "normal", None),
        ("todo", "unknown", None),
        ("Unknown", "unknown", None),
        ("", "unknown", None),
        ("Pneumonia/Lipoid", "other", "lipoid"),
        ("Lipoid", "other", "lipoid"),
        ("Tuberculosis", "other", "tuberculosis"),
        ("Pneumonia/Bacterial/Streptococcus", "other_pneumonia", "streptococcus"),
        ("Pneumonia/Fungal/Pneumocystis", "other_pneumonia", "pneumocystis"),
        ("Pneumonia/Aspiration", "other_pneumonia", "aspiration"),
        ("SARS", "other_pneumonia", "sars"),
        ("ARDS", "other_pneumonia", "ards"),
        ("E.Coli", "other_pneumonia", "e_coli"),
        ("Mycoplasma Bacterial Pneumonia", "other_pneumonia", "mycoplasma_bacterial_pneumonia"),
        ("Pneumonia", "other_pneumonia", "pneumonia"),
        ("Pneumothorax", "other", "pneumothorax"),
    ],
)
def test_finding_label(finding: str, label: str, sublabel: str | None) -> None:
    assert finding_label(finding) == label
    assert finding_sublabel(finding, label) == sublabel


def test_official_layout_records(tmp_path: Path) -> None:
    root = make_ieee8023(tmp_path / "covid-chestxray-dataset")
    records, skips = split_items(list(Ieee8023Source(root, mask_dir="lungmasks").records()))
    assert [(Path(s.path).name, s.reason) for s in skips] == [
        ("missing.png", "image file not found"),
        ("no-patient.png", "malformed row: no patientid"),
    ]
    named = by_name(records)
    assert sorted(named) == [
        "a-covid.jpeg",
        "ards.png",
        "aspiration.png",
        "b-covid-lat.jpeg",
        "lipoid.png",
        "normal.jpg",
        "strep.png",
        "tb.png",
        "todo.png",
    ]  # fmt: skip  (the CT row is left out)
    assert [Path(r.image_path).name for r in records] == sorted(named)
    covid = named["a-covid.jpeg"]
    assert (covid.patient_id, covid.label, covid.sublabel, covid.view, covid.sex, covid.age) == (
        "2", "covid19", None, "PA", "M", 65.0
    )  # fmt: skip
    assert covid.mask_paths == [str(root / "lungmasks" / "a-covid_mask.png")]
    assert covid.extra["offset_days"] == "3"
    assert covid.extra["finding"] == "Pneumonia/Viral/COVID-19"
    assert covid.extra["rt_pcr_positive"] == "Y"
    assert "survival" not in covid.extra  # empty cells are left out
    assert named["b-covid-lat.jpeg"].view == "LATERAL"
    strep = named["strep.png"]
    assert (strep.label, strep.sublabel, strep.view, strep.sex, strep.age) == (
        "other_pneumonia", "streptococcus", "AP SUPINE", "F", None
    )  # fmt: skip
    assert strep.mask_paths == [str(root / "lungmasks" / "strep.png")]
    assert (named["normal.jpg"].label, named["normal.jpg"].sex, named["normal.jpg"].view) == (
        "normal", None, "AP ERECT"
    )  # fmt: skip
    assert named["todo.png"].label == "unknown"
    assert named["lipoid.png"].label == named["tb.png"].label == "other"
    assert named["aspiration.png"].label == named["ards.png"].label == "other_pneumonia"
    assert {r.source for r in records} == {"ieee8023"}
    assert all(not r.mask_paths for r in records if r.patient_id not in {"2", "5"})


def test_no_mask_dir_means_no_masks(tmp_path: Path) -> None:
    records, _ = split_items(list(Ieee8023Source(make_ieee8023(tmp_path / "c")).records()))
    assert len(records) == 9 and not any(r.mask_paths for r in records)


def test_reduced_copy(tmp_path: Path) -> None:
    root = make_ieee8023_reduced(tmp_path / "covid_ieee8023")
    records, skips = split_items(list(Ieee8023Source(root).records()))
    assert skips == []
    first, covid, todo = records
    assert (first.patient_id, first.label, first.sublabel, first.sex, first.age, first.view) == (
        "281", "other_pneumonia", "pneumonia", "F", 71.0, "PA"
    )  # fmt: skip
    assert first.extra == {
        "finding": "Pneumonia",
        "offset_days": "14",
        "survival": "Y",
        "modality": "X-ray",
        "license": "CC BY-NC-SA 4.0",
    }
    assert (covid.patient_id, covid.label, covid.view, covid.sex, covid.age) == (
        "360b", "covid19", "AP SUPINE", "M", None
    )  # fmt: skip
    assert covid.mask_paths == [str(root / "masks" / "covid-a.png")]
    assert covid.extra["ignore_mask_path"] == str(root / "ignore_masks" / "covid-a.png")
    assert "survival" not in covid.extra  # "?" means unknown
    assert (todo.label, todo.view, todo.official_split) == ("unknown", None, None)


def test_detect_and_errors(tmp_path: Path) -> None:
    official = make_ieee8023(tmp_path / "a")
    reduced = make_ieee8023_reduced(tmp_path / "b")
    assert Ieee8023Source.detect(official)
    assert Ieee8023Source.detect(reduced)
    assert not Ieee8023Source.detect(tmp_path)
    assert isinstance(open_source(str(reduced)), Ieee8023Source)
    assert isinstance(open_source(str(official)), Ieee8023Source)
    with pytest.raises(FileNotFoundError, match="no ieee8023 layout found"):
        Ieee8023Source(tmp_path)
    with pytest.raises(FileNotFoundError, match="nomasks"):
        list(Ieee8023Source(official, mask_dir="nomasks").records())


@pytest.mark.real_data
def test_real_reduced_copy(shared_data: Path) -> None:
    root = shared_data / "covid_ieee8023"
    source = open_source(str(root))
    assert isinstance(source, Ieee8023Source)
    records, skips = split_items(list(source.records()))
    assert skips == []
    assert len(records) == 392
    assert len({r.patient_id for r in records}) == 220
    assert Counter(r.label for r in records) == {
        "covid19": 228,
        "other_pneumonia": 65,
        "normal": 11,
        "other": 3,
        "unknown": 85,
    }
    assert sum(bool(r.mask_paths) for r in records) == 226
    assert all(Path(p).is_file() for r in records for p in r.mask_paths)
    assert sum("ignore_mask_path" in r.extra for r in records) == 15
    assert Counter(r.view for r in records) == {"PA": 196, "AP SUPINE": 105, "AP": 57, None: 34}
    # the documented finding -> label mapping reproduces the curated labels of every row
    table = pd.read_csv(root / "manifest.csv", dtype=str, keep_default_na=False)
    assert [finding_label(f) for f in table["finding"]] == table["label"].tolist()
