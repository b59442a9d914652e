"""The prepared store's report (report.json, report.md): the counts that sit next to every
result, from the manifest, the skipped inputs and the duplicate pairs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from spcxr.data.splits import SplitConfig
from spcxr.data.store import fingerprint_manifest
from spcxr.markdown import table


def build_report(
    manifest: pd.DataFrame,
    errors: pd.DataFrame,
    duplicates: pd.DataFrame,
    notes: list[str],
    meta: dict[str, Any],
    store: Path,
    split: SplitConfig,
) -> dict[str, Any]:
    """Counts that must sit next to every result: sources, classes, splits, duplicates, errors.

    ``meta`` is the store's ``store.json`` (image size, sources), ``split`` the split settings.
    """

    def counts(frame: pd.DataFrame, column: str) -> dict[str, int]:
        return {
            str(k): int(v)
            for k, v in frame[column].fillna("<none>").value_counts().sort_index().items()
        }

    per_split = {
        s: {
            "images": int((manifest.split == s).sum()),
            "patients": int(manifest.loc[manifest.split == s, "group"].nunique()),
            "labels": counts(manifest[manifest.split == s], "label"),
        }
        for s in ("train", "val", "test")
    }
    return {
        "store": str(store),
        "image_size": int(meta["image_size"]),
        "images": len(manifest),
        "patients": int((manifest.source + ":" + manifest.patient_id).nunique()),
        "patient_groups": int(manifest.group.nunique()),
        "with_mask": int(manifest.has_mask.sum()),
        "sources": {
            name: {
                "spec": info["spec"],
                "images": int((manifest.source == name).sum()),
                "patients": int(manifest.loc[manifest.source == name, "patient_id"].nunique()),
                "labels": counts(manifest[manifest.source == name], "label"),
            }
            for name, info in meta["sources"].items()
        },
        "splits": per_split,
        "split_mode": split.mode,
        "folds": counts(manifest, "fold") if split.n_folds > 1 else {},
        "duplicates": {
            "pairs": len(duplicates),
            "exact_pairs": int((duplicates.kind == "exact").sum()) if len(duplicates) else 0,
            "near_pairs": int((duplicates.kind == "near").sum()) if len(duplicates) else 0,
            "cross_patient_pairs": int((~duplicates.same_patient).sum()) if len(duplicates) else 0,
            "cross_source_pairs": int((duplicates.source_a != duplicates.source_b).sum())
            if len(duplicates)
            else 0,
            "groups": int(duplicates.group.nunique()) if len(duplicates) else 0,
        },
        "errors": {
            "total": len(errors),
            "by_stage": counts(errors, "stage") if len(errors) else {},
        },
        "notes": notes,
        "fingerprint": fingerprint_manifest(manifest, int(meta["image_size"])),
    }


def render_report(report: dict[str, Any]) -> str:
    """The report as Markdown."""
    lines = [
        f"# Prepared store `{report['store']}`",
        "",
        f"{report['images']} images of {report['patients']} patients "
        f"({report['patient_groups']} patient groups after merging duplicates), "
        f"{report['with_mask']} with lung masks; stored at {report['image_size']} px. "
        f"Fingerprint `{report['fingerprint']}`.",
        "",
        "## Sources",
        "",
    ]

    def labels(counts: dict[str, int]) -> str:
        return ", ".join(f"{k} {v}" for k, v in counts.items())

    lines += table(
        ["source", "spec", "images", "patients", "labels"],
        [
            [name, f"`{s['spec']}`", s["images"], s["patients"], labels(s["labels"])]
            for name, s in report["sources"].items()
        ],
    )
    lines += ["", f"## Splits ({report['split_mode']}, by patient group)", ""]
    lines += table(
        ["split", "images", "patient groups", "labels"],
        [
            [name, s["images"], s["patients"], labels(s["labels"])]
            for name, s in report["splits"].items()
        ],
    )
    d = report["duplicates"]
    lines += [
        "",
        "## Duplicates",
        "",
        f"{d['pairs']} pairs ({d['exact_pairs']} exact, {d['near_pairs']} near) in {d['groups']} "
        f"groups; {d['cross_patient_pairs']} pairs join different patient ids and "
        f"{d['cross_source_pairs']} join different sources. Every duplicate group is one patient "
        "group, so it never spans splits. See `duplicates.csv`.",
        "",
        "## Skipped inputs",
        "",
        f"{report['errors']['total']} skipped"
        + (
            ": " + ", ".join(f"{k} {v}" for k, v in report["errors"]["by_stage"].items())
            if report["errors"]["total"]
            else ""
        )
        + ". See `errors.csv`.",
    ]
    n_masks = report["errors"]["by_stage"].get("mask", 0)
    if n_masks:
        lines += [
            "",
            f"{n_masks} mask files named by a listing were not found (stage `mask`); their "
            "images are kept without them.",
        ]
    if report["notes"]:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in report["notes"]]
    return "\n".join(lines) + "\n"
