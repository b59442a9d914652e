"""NLM Shenzhen chest X-ray set (Jaeger et al. 2014): tuberculosis screening, Shenzhen No.3 Hospital.

Official layout::

    ChinaSet_AllFiles/CXR_png/CHNCXR_0001_0.png           suffix _0 normal, _1 tuberculosis
    ChinaSet_AllFiles/ClinicalReadings/CHNCXR_0001_0.txt  "Male 45yrs" / "female 35yr", findings
    mask/CHNCXR_0001_0_mask.png                           lung masks of Stirenko et al. 2018

Also reads the reduced copy in the shared data folder (``manifest.csv`` with ``file``,
``mask_file``, ``label``, ``patient_id``, ``view``): its ``split`` column (``train_with_mask`` /
``no_mask``) says which images have masks, not an official split, so it is not used.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

from spcxr.data.records import Record, Skip
from spcxr.data.sources.base import (
    Source,
    find_child_dir,
    list_images,
    parse_age,
    parse_view,
    read_table,
    read_text_lines,
)
from spcxr.data.sources.csv_manifest import manifest_records, map_columns

IMAGE_RE = re.compile(r"^(?P<patient>CHNCXR_\d{4})_(?P<abnormal>[01])\.png$", re.IGNORECASE)
LABELS = {"0": "normal", "1": "tuberculosis"}

# First line of a clinical reading: "Male 45yrs", "female 35yr", "femal, 24yrs", "male 10month".
_SEX_AGE_RE = re.compile(
    r"^(?P<sex>female|femal|male)[\s,:;]*(?P<age>\d+(?:\.\d+)?\s*[a-z]*)", re.IGNORECASE
)
_MASK_DIRS = ("mask", "masks", "Mask", "Masks")
_PARENTS = ("ChinaSet_AllFiles",)


def parse_reading(lines: list[str]) -> tuple[str | None, float | None, str | None]:
    """(sex, age in years, finding text) from the lines of a Shenzhen clinical reading."""
    if not lines:
        return None, None, None
    match = _SEX_AGE_RE.match(lines[0])
    if match is None:
        return None, None, " ".join(lines)
    sex = "F" if match.group("sex").lower().startswith("fem") else "M"
    finding = " ".join(lines[1:]) or None
    return sex, parse_age(match.group("age")), finding


def _peek_matches(directory: Path, pattern: re.Pattern[str]) -> bool:
    """True if some file directly in ``directory`` matches ``pattern`` (stops at the first)."""
    try:
        with os.scandir(directory) as entries:
            return any(pattern.match(entry.name) for entry in entries)
    except OSError:
        return False


def _manifest_first_file(path: Path) -> str | None:
    """The ``file`` cell of the first data row of a reduced-copy ``manifest.csv``."""
    try:
        with open(path, encoding="utf-8-sig", errors="replace") as handle:
            header = handle.readline().rstrip("\r\n").split(",")
            row = handle.readline().rstrip("\r\n").split(",")
    except OSError:
        return None
    if "file" not in header or len(row) <= header.index("file"):
        return None
    return row[header.index("file")]


class ShenzhenSource(Source):
    """Shenzhen official NLM layout, or the shared reduced copy (``manifest.csv``).

    Options:
        mask_dir: folder of lung masks (``CHNCXR_0001_0_mask.png`` or ``CHNCXR_0001_0.png``);
            relative to the root; default: the first of ``mask/``, ``masks/`` found next to
            ``CXR_png``, at the root or one level up.
        view: the projection given to every image (default ``PA``: the set is frontal PA,
            Jaeger et al. 2014).
    """

    name: ClassVar[str] = "shenzhen"
    expects: ClassVar[str] = (
        "ChinaSet_AllFiles/CXR_png/CHNCXR_0001_0.png (+ ClinicalReadings/, mask/), "
        "or manifest.csv listing CHNCXR_ files"
    )
    defaults: ClassVar[dict[str, Any]] = {"mask_dir": None, "view": "PA"}
    option_types: ClassVar[dict[str, type]] = {"mask_dir": str}

    def __init__(self, root: str | Path, *, source_name: str | None = None, **options: Any):
        super().__init__(root, source_name=source_name, **options)
        self.image_dir = find_child_dir(self.root, "CXR_png", _PARENTS)
        self.manifest = self.root / "manifest.csv"
        if self.image_dir is None and not self.manifest.is_file():
            raise FileNotFoundError(
                f"{self.root}: no shenzhen layout found; expected {self.expects}"
            )

    @classmethod
    def detect(cls, root: Path) -> bool:
        """``CXR_png`` with ``CHNCXR_*`` files, or a manifest whose first file is one."""
        image_dir = find_child_dir(root, "CXR_png", _PARENTS)
        if image_dir is not None:
            return _peek_matches(image_dir, IMAGE_RE)
        first = _manifest_first_file(root / "manifest.csv")
        return first is not None and IMAGE_RE.match(os.path.basename(first)) is not None

    def records(self) -> Iterator[Record | Skip]:
        """One record per image, sorted by file name."""
        if self.image_dir is None:
            yield from self._manifest_records()
            return
        mask_dir = self._mask_dir(self.image_dir)
        mask_names = self._dirs.names(mask_dir) if mask_dir else frozenset()
        readings = self.image_dir.parent / "ClinicalReadings"
        problems: list[tuple[str, str]] = []
        entries = list_images(self.image_dir, problems=problems)
        for path, reason in problems:  # link loops, dangling links
            yield self.skip(path, reason)
        for entry in entries:
            match = IMAGE_RE.match(entry.name)
            if match is None:
                yield self.skip(entry.path, "unparseable patient id (expected CHNCXR_NNNN_0|1.png)")
                continue
            stem = os.path.splitext(entry.name)[0]
            sex, age, finding = parse_reading(read_text_lines(readings / f"{stem}.txt") or [])
            masks = [n for n in (f"{stem}_mask.png", f"{stem}.png") if n in mask_names][:1]
            yield Record(
                image_path=entry.path,
                patient_id=match.group("patient").upper(),
                source=self.source,
                label=LABELS[match.group("abnormal")],
                mask_paths=[os.path.join(mask_dir, name) for name in masks] if mask_dir else [],
                view=parse_view(self.options["view"]),
                sex=sex,
                age=age,
                extra={"finding": finding} if finding else {},
            )

    def _mask_dir(self, image_dir: Path) -> Path | None:
        given = self.options["mask_dir"]
        if given:
            path = self.root / Path(given).expanduser()
            if not path.is_dir():
                raise FileNotFoundError(f"{path}: shenzhen mask_dir not found")
            return path
        for base in (image_dir.parent, self.root, image_dir.parent.parent):
            for name in _MASK_DIRS:
                if (base / name).is_dir():
                    return base / name
        return None

    def _manifest_records(self) -> Iterator[Record | Skip]:
        table = read_table(self.manifest)
        mapping = map_columns(list(table.columns), {"image": "file", "split": ""}, self.manifest)
        for item in manifest_records(self, table, self.manifest, self.root, mapping, []):
            if isinstance(item, Record):
                item.view = item.view or parse_view(self.options["view"])
                match = IMAGE_RE.match(os.path.basename(item.image_path))
                if item.extra.pop("patient_id_inferred", False) and match:
                    item.patient_id = match.group("patient").upper()
            yield item
