"""NIH ChestX-ray14 (Wang et al. 2017): 112,120 frontal radiographs, 14 text-mined labels.

Layout: ``Data_Entry_2017_v2020.csv`` or ``Data_Entry_2017.csv`` (Image Index, Finding Labels
pipe-separated, Follow-up #, Patient ID, Patient Age, Patient Gender, View Position, ...);
images in ``images/`` or in the twelve archives' ``images_001/images/`` ... folders (found with
one walk into a name -> path map); official split from ``train_val_list.txt`` (train) and
``test_list.txt`` (test) when present. ``findings`` holds the 14 labels as 1.0 / 0.0 (``No
Finding`` -> all 0.0) under snake_case names; the label is ``normal`` for ``No Finding`` and
``abnormal`` otherwise. Early CSVs spell ages like ``058Y`` and hold a few impossible ages
(over 120 years), which become ``None``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd

from spcxr.data.records import Record, Skip
from spcxr.data.sources.base import (
    Source,
    clean_column,
    is_image_name,
    parse_age,
    parse_column,
    parse_sex,
    parse_view,
    read_table,
    snake_label,
)

CSV_NAMES = ("Data_Entry_2017_v2020.csv", "Data_Entry_2017.csv")
SPLIT_LISTS = {"train": "train_val_list.txt", "test": "test_list.txt"}
PATHOLOGIES = (
    "Atelectasis",
    "Cardiomegaly",
    "Consolidation",
    "Edema",
    "Effusion",
    "Emphysema",
    "Fibrosis",
    "Hernia",
    "Infiltration",
    "Mass",
    "Nodule",
    "Pleural_Thickening",
    "Pneumonia",
    "Pneumothorax",
)
NO_FINDING = "No Finding"
COLUMNS = {
    "image": "Image Index",
    "findings": "Finding Labels",
    "follow_up": "Follow-up #",
    "patient": "Patient ID",
    "age": "Patient Age",
    "sex": "Patient Gender",
    "view": "View Position",
}
_IMAGE_DIR_RE = re.compile(r"^images(_\d+)?$")


def _label(finding_labels: str) -> str | None:
    """``normal`` for "No Finding", ``abnormal`` for any finding, ``None`` when empty."""
    if not finding_labels:
        return None
    return "normal" if finding_labels == NO_FINDING else "abnormal"


def _follow_up(value: str) -> int | None:
    text = value.strip()
    return int(text) if text.isdigit() else None


def image_map(root: Path) -> dict[str, str]:
    """Image file name -> path for ``root/images`` and ``root/images_NNN[/images]`` folders."""
    folders: list[str] = []
    with os.scandir(root) as entries:
        for entry in entries:
            if entry.is_dir() and _IMAGE_DIR_RE.match(entry.name):
                folders.append(entry.path)
                nested = os.path.join(entry.path, "images")
                if entry.name != "images" and os.path.isdir(nested):
                    folders.append(nested)
    found: dict[str, str] = {}
    for folder in sorted(folders):
        with os.scandir(folder) as entries:
            for entry in entries:
                if is_image_name(entry.name):
                    found.setdefault(entry.name, entry.path)
    return found


def finding_matrix(labels: pd.Series) -> np.ndarray:
    """``[N, 14]`` float32 of the 14 pathologies from pipe-separated ``Finding Labels``."""
    dummies = labels.str.replace(r"\s*\|\s*", "|", regex=True).str.get_dummies(sep="|")
    return dummies.reindex(columns=list(PATHOLOGIES), fill_value=0).to_numpy(np.float32)


class NihSource(Source):
    """NIH ChestX-ray14 official layout (Data_Entry CSV, image folders, split lists)."""

    name: ClassVar[str] = "nih"
    expects: ClassVar[str] = (
        "Data_Entry_2017_v2020.csv or Data_Entry_2017.csv, images/ or images_0NN/images/, "
        "optional train_val_list.txt / test_list.txt"
    )

    def __init__(self, root: str | Path, *, source_name: str | None = None, **options: Any):
        super().__init__(root, source_name=source_name, **options)
        csv = next((self.root / n for n in CSV_NAMES if (self.root / n).is_file()), None)
        if csv is None:
            raise FileNotFoundError(f"{self.root}: no NIH Data_Entry CSV; expected {self.expects}")
        self.csv_path = csv

    @classmethod
    def detect(cls, root: Path) -> bool:
        """A ``Data_Entry_2017*.csv`` at the root."""
        return any((root / name).is_file() for name in CSV_NAMES)

    def records(self) -> Iterator[Record | Skip]:
        """One record per CSV row, sorted by image file name."""
        table = read_table(self.csv_path)
        missing = [name for name in COLUMNS.values() if name not in table.columns]
        if missing:
            raise ValueError(f"{self.csv_path}: missing column(s) {', '.join(missing)}")
        table = table.sort_values(COLUMNS["image"], kind="stable", ignore_index=True)
        paths, splits = image_map(self.root), self._splits()
        labels = table[COLUMNS["findings"]].str.strip()
        rows = finding_matrix(labels).tolist()
        names = [snake_label(name) or name for name in PATHOLOGIES]
        images, patients = (
            clean_column(table[COLUMNS["image"]]),
            clean_column(table[COLUMNS["patient"]]),
        )
        follow_ups = parse_column(table[COLUMNS["follow_up"]].tolist(), _follow_up)
        views = parse_column(table[COLUMNS["view"]].tolist(), parse_view)
        sexes = parse_column(table[COLUMNS["sex"]].tolist(), parse_sex)
        ages = parse_column(table[COLUMNS["age"]].tolist(), parse_age)
        default_dir = os.path.join(self.root, "images")
        for i, raw_labels in enumerate(labels.tolist()):
            name = images[i]
            if name is None:
                yield self.skip(f"{self.csv_path}:row {i + 2}", "malformed row: no Image Index")
                continue
            path = paths.get(name)
            if path is None:
                path = os.path.join(default_dir, name)
                if self.options["check_files"]:
                    yield self.skip(path, "image file not found")
                    continue
            if not raw_labels and not self.keep_unlabelled:
                yield self.skip(path, "missing label (Finding Labels)")
                continue
            extra: dict[str, Any] = {}
            if follow_ups[i] is not None:
                extra["follow_up"] = follow_ups[i]
            patient_id = patients[i]
            if patient_id is None:
                patient_id = name.split("_")[0]  # names are {patient:08d}_{follow-up:03d}.png
                extra["patient_id_inferred"] = True
            yield Record(
                image_path=path,
                patient_id=patient_id,
                source=self.source,
                label=_label(raw_labels),
                findings=dict(zip(names, rows[i], strict=True)) if raw_labels else {},
                view=views[i],
                sex=sexes[i],
                age=ages[i],
                official_split=splits.get(name),
                extra=extra,
            )

    def _splits(self) -> dict[str, str]:
        """Image name -> official split from the list files present."""
        splits: dict[str, str] = {}
        for split, file_name in SPLIT_LISTS.items():
            path = self.root / file_name
            if path.is_file():
                for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
                    if line.strip():
                        splits[line.strip()] = split
        return splits
