"""CheXpert (Irvin et al. 2019): 224,316 radiographs of 65,240 Stanford patients.

Layout (``CheXpert-v1.0`` or ``CheXpert-v1.0-small``): ``train.csv`` and ``valid.csv`` with
Path, Sex, Age, Frontal/Lateral, AP/PA and 14 observations coded 1 (positive), 0 (negative),
-1 (uncertain) or blank (not mentioned). Paths start with the dataset folder's name
(``CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg``), so that first part is
replaced by the folder holding the CSVs, whatever the user renamed it to.

Uncertain labels follow the policies compared by Irvin et al. 2019: U-Zeros, U-Ones, or
``ignore`` (NaN, masked out of the loss, as torchxrayvision does; the default). The label is
``normal`` when No Finding is 1 and ``abnormal`` otherwise.

``valid.csv`` (200 studies labelled by the consensus of three radiologists, not by the report
labeller used for train.csv) is the only public held-out set with reference-standard labels,
so by default it is the official ``test`` split (option ``valid_as="val"`` to tune on it).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd

from spcxr.data.records import Record, Skip
from spcxr.data.sources.base import (
    Source,
    parse_age,
    parse_column,
    parse_sex,
    parse_view,
    read_header,
    read_table,
    snake_label,
)

OBSERVATIONS = (
    "No Finding",
    "Enlarged Cardiomediastinum",
    "Cardiomegaly",
    "Lung Opacity",
    "Lung Lesion",
    "Edema",
    "Consolidation",
    "Pneumonia",
    "Atelectasis",
    "Pneumothorax",
    "Pleural Effusion",
    "Pleural Other",
    "Fracture",
    "Support Devices",
)
CSV_FILES = {"train": "train.csv", "valid": "valid.csv"}
UNCERTAIN_VALUES = {"zeros": 0.0, "ones": 1.0, "ignore": np.nan}
_FOLDER_PREFIX = r"^[^/]*chexpert[^/]*/"


def _is_chexpert_csv(path: Path) -> bool:
    header = read_header(path)
    return bool(header) and header[0] == "Path" and "Frontal/Lateral" in header


def find_base(root: Path) -> Path | None:
    """The folder holding ``train.csv`` / ``valid.csv``: the root or a ``CheXpert*`` child."""
    candidates = [root]
    if root.is_dir():
        with os.scandir(root) as entries:
            candidates += sorted(
                Path(e.path) for e in entries if e.is_dir() and "chexpert" in e.name.lower()
            )
    for base in candidates:
        if any(_is_chexpert_csv(base / name) for name in CSV_FILES.values()):
            return base
    return None


def resolve_uncertain(values: np.ndarray, policy: str) -> np.ndarray:
    """Replace -1 (uncertain) by the policy's value; anything but -1/0/1 becomes NaN."""
    out = np.where(np.isin(values, (0.0, 1.0)), values, np.nan).astype(np.float32)
    out[values == -1.0] = UNCERTAIN_VALUES[policy]
    return out


class ChexpertSource(Source):
    """CheXpert ``train.csv`` / ``valid.csv`` with images under the same folder.

    Options:
        uncertain: ``"ignore"`` (default, NaN), ``"zeros"`` (U-Zeros) or ``"ones"`` (U-Ones).
        frontal_only: ``True`` (default) lists frontal images only (the usual CXR setting;
            laterals are left out without a skip entry).
        valid_as: official split of ``valid.csv``: ``"test"`` (default) or ``"val"``.
    """

    name: ClassVar[str] = "chexpert"
    expects: ClassVar[str] = (
        "CheXpert-v1.0[-small]/train.csv + valid.csv (Path, Sex, Age, Frontal/Lateral, ...)"
    )
    defaults: ClassVar[dict[str, Any]] = {
        "uncertain": "ignore",
        "frontal_only": True,
        "valid_as": "test",
    }
    choices: ClassVar[dict[str, tuple[str, ...]]] = {
        "uncertain": tuple(UNCERTAIN_VALUES),
        "valid_as": ("test", "val"),
    }

    def __init__(self, root: str | Path, *, source_name: str | None = None, **options: Any):
        super().__init__(root, source_name=source_name, **options)
        base = find_base(self.root)
        if base is None:
            raise FileNotFoundError(f"{self.root}: no CheXpert CSV found; expected {self.expects}")
        self.base = base

    @classmethod
    def detect(cls, root: Path) -> bool:
        """``train.csv`` or ``valid.csv`` with CheXpert columns at the root or in a child."""
        try:
            return root.is_dir() and find_base(root) is not None
        except OSError:
            return False

    def records(self) -> Iterator[Record | Skip]:
        """Records of train.csv then valid.csv, each sorted by path."""
        splits = {"train": "train", "valid": self.options["valid_as"]}
        for key, file_name in CSV_FILES.items():
            path = self.base / file_name
            if path.is_file():
                yield from self._csv_records(path, splits[key])

    def _csv_records(self, csv_path: Path, split: str) -> Iterator[Record | Skip]:
        table = read_table(csv_path)
        missing = [c for c in ("Path", "Sex", "Age", "Frontal/Lateral", "AP/PA") if c not in table]
        if missing:
            raise ValueError(f"{csv_path}: missing column(s) {', '.join(missing)}")
        if self.options["frontal_only"]:
            table = table[table["Frontal/Lateral"].str.strip().str.lower() != "lateral"]
        relative = table["Path"].str.strip().str.replace(_FOLDER_PREFIX, "", regex=True, case=False)
        table = table.assign(_relative=relative).sort_values("_relative", kind="stable")
        observations = [name for name in OBSERVATIONS if name in table.columns]
        numeric = table[observations].apply(
            lambda col: pd.to_numeric(col.str.strip(), errors="coerce")
        )
        values = resolve_uncertain(numeric.to_numpy(np.float64), self.options["uncertain"])
        names = [snake_label(name) or name for name in observations]
        patients = table["_relative"].str.extract(r"(patient\d+)", expand=False).tolist()
        studies = table["_relative"].str.extract(r"(study\d+)", expand=False).tolist()
        no_finding = observations.index("No Finding") if "No Finding" in observations else None
        lateral = (table["Frontal/Lateral"].str.strip().str.lower() == "lateral").tolist()
        views = parse_column(table["AP/PA"].tolist(), parse_view)
        sexes = parse_column(table["Sex"].tolist(), parse_sex)
        ages = parse_column(table["Age"].tolist(), parse_age)
        base = os.fspath(self.base)
        for i, (row_number, rel, row) in enumerate(
            zip(table.index.tolist(), table["_relative"].tolist(), values.tolist(), strict=True)
        ):
            if not rel:
                yield self.skip(f"{csv_path}:row {row_number + 2}", "malformed row: empty Path")
                continue
            path = os.path.normpath(os.path.join(base, rel))
            if not self.exists(path):
                yield self.skip(path, "image file not found")
                continue
            if not isinstance(patients[i], str):
                yield self.skip(path, "unparseable patient id (expected patientNNNNN in Path)")
                continue
            label = None
            if no_finding is not None:
                label = "normal" if row[no_finding] == 1.0 else "abnormal"
            yield Record(
                image_path=path,
                patient_id=patients[i],
                source=self.source,
                label=label,
                findings=dict(zip(names, row, strict=True)),
                view="LATERAL" if lateral[i] else views[i],
                sex=sexes[i],
                age=ages[i],
                official_split=split,
                extra={"study": studies[i]} if isinstance(studies[i], str) else {},
            )
