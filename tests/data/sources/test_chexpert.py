"""CheXpert adapter: path resolution, uncertainty policies, views, valid.csv split."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from tests.data.sources.layouts import make_chexpert, split_items, write_csv

from spcxr.data.sources import open_source
from spcxr.data.sources.chexpert import ChexpertSource, resolve_uncertain


def known(findings: dict[str, float]) -> dict[str, float]:
    """The findings that are not NaN."""
    return {name: value for name, value in findings.items() if not math.isnan(value)}


def test_resolve_uncertain() -> None:
    values = np.array([1.0, 0.0, -1.0, np.nan, 2.0])
    np.testing.assert_array_equal(resolve_uncertain(values, "zeros"), [1, 0, 0, np.nan, np.nan])
    np.testing.assert_array_equal(resolve_uncertain(values, "ones"), [1, 0, 1, np.nan, np.nan])
    np.testing.assert_array_equal(
        resolve_uncertain(values, "ignore"), [1, 0, np.nan, np.nan, np.nan]
    )


def test_default_records(tmp_path: Path) -> None:
    root = make_chexpert(tmp_path)
    base = root / "CheXpert-v1.0-small"
    records, skips = split_items(list(ChexpertSource(root).records()))
    assert [(s.path, s.reason) for s in skips] == [
        (str(base / "train.csv") + ":row 8", "malformed row: empty Path"),
        (str(base / "train/patient00004/study1/view1_frontal.jpg"), "image file not found"),
        (
            str(base / "train/scans/view1_frontal.jpg"),
            "unparseable patient id (expected patientNNNNN in Path)",
        ),
    ]
    assert [
        (r.patient_id, r.label, r.view, r.sex, r.age, r.official_split, r.extra) for r in records
    ] == [
        ("patient00001", "abnormal", "AP", "F", 68.0, "train", {"study": "study1"}),
        ("patient00002", "normal", "PA", "M", 87.0, "train", {"study": "study2"}),
        ("patient00003", "abnormal", "AP", None, 0.0, "train", {"study": "study1"}),
        ("patient64541", "abnormal", "AP", "M", 73.0, "test", {"study": "study1"}),
    ]
    assert records[0].image_path == str(base / "train/patient00001/study1/view1_frontal.jpg")
    assert len(records[0].findings) == 14
    assert known(records[0].findings) == {"support_devices": 1.0, "edema": 0.0}
    assert known(records[1].findings) == {"no_finding": 1.0}
    assert known(records[2].findings) == {"lung_opacity": 1.0}
    assert known(records[3].findings) == {"no_finding": 0.0, "edema": 1.0, "cardiomegaly": 0.0}
    assert {r.source for r in records} == {"chexpert"}


@pytest.mark.parametrize(("policy", "value"), [("zeros", 0.0), ("ones", 1.0)])
def test_uncertain_policies(tmp_path: Path, policy: str, value: float) -> None:
    records, _ = split_items(
        list(ChexpertSource(make_chexpert(tmp_path), uncertain=policy).records())
    )
    assert records[0].findings["cardiomegaly"] == value
    assert records[2].findings["pneumonia"] == value
    assert records[0].findings["edema"] == 0.0
    assert math.isnan(records[0].findings["fracture"])  # blank stays "not mentioned"


def test_laterals_valid_as_and_renamed_folder(tmp_path: Path) -> None:
    root = make_chexpert(tmp_path, folder="my_chexpert_copy")
    source = ChexpertSource(
        root / "my_chexpert_copy", frontal_only="false", valid_as="val", check_files=False
    )
    records, skips = split_items(list(source.records()))
    assert [s.reason for s in skips] == [
        "malformed row: empty Path",
        "unparseable patient id (expected patientNNNNN in Path)",
    ]
    views = {(Path(r.image_path).name, r.patient_id): r.view for r in records}
    assert views[("view2_lateral.jpg", "patient00002")] == "LATERAL"
    assert len(records) == 6
    assert [r.official_split for r in records][-1] == "val"
    assert records[0].image_path == str(
        root / "my_chexpert_copy" / "train/patient00001/study1/view1_frontal.jpg"
    )


def test_detect_and_errors(tmp_path: Path) -> None:
    root = make_chexpert(tmp_path / "data")
    assert ChexpertSource.detect(root)
    assert ChexpertSource.detect(root / "CheXpert-v1.0-small")
    assert not ChexpertSource.detect(tmp_path / "elsewhere")
    assert isinstance(open_source(str(root)), ChexpertSource)
    with pytest.raises(ValueError, match="uncertain"):
        ChexpertSource(root, uncertain="maybe")
    with pytest.raises(ValueError, match="frontal_only"):
        ChexpertSource(root, frontal_only="sometimes")
    with pytest.raises(FileNotFoundError, match="no CheXpert CSV"):
        ChexpertSource(tmp_path / "data" / "CheXpert-v1.0-small" / "train")
    base = root / "CheXpert-v1.0-small"
    write_csv(base / "valid.csv", ["Path", "Frontal/Lateral", "Sex"], [["x", "Frontal", "F"]])
    with pytest.raises(ValueError, match=r"valid\.csv: missing column\(s\) Age, AP/PA"):
        list(ChexpertSource(root).records())
