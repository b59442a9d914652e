"""The prepared store's report (spcxr.data.prepare_report): counts, and its markdown."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from spcxr.data.prepare_report import build_report, render_report
from spcxr.data.splits import SplitConfig
from spcxr.data.store import fingerprint_manifest


def _inputs():
    manifest = pd.DataFrame(
        {
            "source": ["a", "a", "a", "b", "b"],
            "patient_id": ["p1", "p1", "p2", "p1", "p3"],
            "group": [0, 0, 1, 2, 3],
            "label": ["normal", "normal", "pneumonia", None, "normal"],
            "split": ["train", "train", "val", "test", "train"],
            "has_mask": [True, False, False, True, False],
            "fold": [0, 0, 1, 1, 2],
            "pixel_hash": ["h1", "h2", "h3", "h4", "h5"],
        }
    )
    errors = pd.DataFrame(
        {"path": ["x.png", "y.png"], "source": ["a", "b"], "stage": ["read", "mask"]}
    )
    duplicates = pd.DataFrame(
        {
            "kind": ["exact", "near"],
            "same_patient": [True, False],
            "source_a": ["a", "a"],
            "source_b": ["a", "b"],
            "group": [0, 1],
        }
    )
    meta = {"image_size": 64, "sources": {"a": {"spec": "folder:/a"}, "b": {"spec": "csv:/b"}}}
    return manifest, errors, duplicates, meta


def test_counts_by_source_split_duplicates_and_errors() -> None:
    manifest, errors, duplicates, meta = _inputs()
    report = build_report(manifest, errors, duplicates, ["a note"], meta, Path("/s"), SplitConfig())
    assert report["store"] == "/s" and report["image_size"] == 64
    # patients are per source (a:p1 and b:p1 differ); groups as assigned
    assert (report["images"], report["patients"], report["patient_groups"]) == (5, 4, 4)
    assert report["with_mask"] == 2
    assert report["sources"]["a"] == {
        "spec": "folder:/a",
        "images": 3,
        "patients": 2,
        "labels": {"normal": 2, "pneumonia": 1},
    }
    assert report["sources"]["b"]["labels"] == {"<none>": 1, "normal": 1}
    assert report["splits"]["train"] == {"images": 3, "patients": 2, "labels": {"normal": 3}}
    assert report["split_mode"] == "random"
    assert report["folds"] == {"0": 2, "1": 2, "2": 1}
    no_folds = build_report(
        manifest, errors, duplicates, [], meta, Path("/s"), SplitConfig(n_folds=0)
    )
    assert no_folds["folds"] == {}
    assert report["duplicates"] == {
        "pairs": 2,
        "exact_pairs": 1,
        "near_pairs": 1,
        "cross_patient_pairs": 1,
        "cross_source_pairs": 1,
        "groups": 2,
    }
    assert report["errors"] == {"total": 2, "by_stage": {"mask": 1, "read": 1}}
    assert report["fingerprint"] == fingerprint_manifest(manifest, 64)


def test_markdown_has_a_row_per_source_and_split_and_names_missing_masks() -> None:
    manifest, errors, duplicates, meta = _inputs()
    text = render_report(
        build_report(manifest, errors, duplicates, ["a note"], meta, Path("/s"), SplitConfig())
    )
    assert text.startswith("# Prepared store `/s`")
    assert "| a | `folder:/a` | 3 | 2 | normal 2, pneumonia 1 |" in text
    assert "| val | 1 | 1 | pneumonia 1 |" in text
    assert "2 pairs (1 exact, 1 near) in 2 groups" in text
    assert "2 skipped: mask 1, read 1. See `errors.csv`." in text
    assert "1 mask files named by a listing were not found" in text
    assert text.endswith("## Notes\n\n- a note\n")
