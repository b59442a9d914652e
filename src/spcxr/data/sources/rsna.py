"""RSNA Pneumonia Detection Challenge (Shih et al. 2019; Kaggle 2018).

Layout: ``stage_2_train_labels.csv`` (patientId, x, y, width, height, Target; one row per
box, so several rows per image), ``stage_2_detailed_class_info.csv`` (patientId, class:
``Lung Opacity``, ``No Lung Opacity / Not Normal``, ``Normal``) and DICOM images
``stage_2_train_images/{patientId}.dcm``; the stage 1 names are accepted too. One record per
image: label ``pneumonia`` (Target 1) or ``no_pneumonia``, sublabel the detailed class, boxes
``[x, y, width, height]`` in ``extra["boxes"]``. Each patientId has one image. Sex, age and
view stay ``None`` here: the DICOM headers hold them and are read by a later step.

The challenge's test labels were never released, so no official split is set. The images are a
subset of NIH ChestX-ray14: duplicate detection across sources matters when both are used.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pandas as pd

from spcxr.data.records import Record, Skip
from spcxr.data.sources.base import Source, first_existing, read_table, snake_label

STAGES = ("stage_2", "stage_1")
LABELS = {0: "no_pneumonia", 1: "pneumonia"}
BOX_COLUMNS = ("x", "y", "width", "height")


def _stage_files(root: Path) -> tuple[Path, Path, Path] | None:
    """(labels CSV, detailed class CSV, image folder) of the newest stage present."""
    for stage in STAGES:
        labels = root / f"{stage}_train_labels.csv"
        if labels.is_file():
            return (
                labels,
                root / f"{stage}_detailed_class_info.csv",
                first_existing(*(root / f"{s}_train_images" for s in (stage, *STAGES)))
                or root / f"{stage}_train_images",
            )
    return None


class RsnaSource(Source):
    """RSNA Pneumonia Detection Challenge training set (stage 2 or stage 1 files)."""

    name: ClassVar[str] = "rsna"
    expects: ClassVar[str] = (
        "stage_2_train_labels.csv (+ stage_2_detailed_class_info.csv) and "
        "stage_2_train_images/*.dcm (stage_1 names accepted)"
    )

    def __init__(self, root: str | Path, *, source_name: str | None = None, **options: Any):
        super().__init__(root, source_name=source_name, **options)
        files = _stage_files(self.root)
        if files is None:
            raise FileNotFoundError(
                f"{self.root}: no RSNA labels file found; expected {self.expects}"
            )
        self.labels_csv, self.class_csv, self.image_dir = files

    @classmethod
    def detect(cls, root: Path) -> bool:
        """A ``stage_{1,2}_train_labels.csv`` at the root."""
        return _stage_files(root) is not None

    def records(self) -> Iterator[Record | Skip]:
        """One record per patientId, sorted by patientId."""
        table = read_table(self.labels_csv)
        missing = [c for c in ("patientId", "Target") if c not in table.columns]
        if missing:
            raise ValueError(f"{self.labels_csv}: missing column(s) {', '.join(missing)}")
        table["patientId"] = table["patientId"].str.strip()
        table["Target"] = pd.to_numeric(table["Target"], errors="coerce")
        for row in table.index[table["patientId"] == ""].tolist():
            yield self.skip(f"{self.labels_csv}:row {row + 2}", "malformed row: no patientId")
        table = table[table["patientId"] != ""]
        classes = self._classes()
        boxes = self._boxes(table)
        targets = table.groupby("patientId", sort=True)["Target"].max()
        for patient_id, target in targets.items():
            yield self._record(str(patient_id), target, classes, boxes)

    def _record(
        self, patient_id: str, target: float, classes: dict[str, str], boxes: dict[str, list]
    ) -> Record | Skip:
        path = os.path.join(self.image_dir, f"{patient_id}.dcm")
        if not self.exists(path):
            return self.skip(path, "image file not found")
        if pd.isna(target):
            if not self.keep_unlabelled:
                return self.skip(path, "missing label (Target)")
            label = None
        elif target in LABELS:
            label = LABELS[int(target)]
        else:
            return self.skip(path, f"malformed row: Target {target:g} is not 0 or 1")
        extra: dict[str, Any] = {"boxes": boxes[patient_id]} if patient_id in boxes else {}
        return Record(
            image_path=path,
            patient_id=patient_id,
            source=self.source,
            label=label,
            sublabel=classes.get(patient_id),
            extra=extra,
        )

    def _classes(self) -> dict[str, str]:
        """patientId -> detailed class in snake_case (empty if the file is absent)."""
        if not self.class_csv.is_file():
            return {}
        table = read_table(self.class_csv)
        if not {"patientId", "class"} <= set(table.columns):
            raise ValueError(f"{self.class_csv}: expected columns patientId, class")
        table = table.drop_duplicates("patientId")
        return {
            pid.strip(): label
            for pid, cls in zip(table["patientId"], table["class"], strict=True)
            if (label := snake_label(cls)) is not None
        }

    @staticmethod
    def _boxes(table: pd.DataFrame) -> dict[str, list[list[float]]]:
        """patientId -> boxes ``[x, y, width, height]`` (rows with four numeric values)."""
        if not set(BOX_COLUMNS) <= set(table.columns):
            return {}
        values = table[list(BOX_COLUMNS)].apply(pd.to_numeric, errors="coerce")
        valid = values.notna().all(axis=1)
        result: dict[str, list[list[float]]] = {}
        for pid, box in zip(
            table["patientId"][valid], values[valid].to_numpy().tolist(), strict=True
        ):
            result.setdefault(pid, []).append(box)
        return result
