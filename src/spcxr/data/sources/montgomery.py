"""NLM Montgomery County chest X-ray set (Jaeger et al. 2014): tuberculosis screening, USA.

Official layout::

    MontgomerySet/CXR_png/MCUCXR_0001_0.png            suffix _0 normal, _1 tuberculosis
    MontgomerySet/ClinicalReadings/MCUCXR_0001_0.txt   "Patient's Sex: F", "Patient's Age: 040Y",
                                                       then the finding text
    MontgomerySet/ManualMask/leftMask/MCUCXR_0001_0.png   and rightMask/: one lung each

The left and right lung masks are both listed in ``mask_paths`` (the store merges them by
union). An image with only one of the two gets no mask (one lung is not a lung mask) and
``extra["mask_incomplete"] = True``.
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
    parse_sex,
    parse_view,
    read_text_lines,
)

IMAGE_RE = re.compile(r"^(?P<patient>MCUCXR_\d{4})_(?P<abnormal>[01])\.png$", re.IGNORECASE)
LABELS = {"0": "normal", "1": "tuberculosis"}
_PARENTS = ("MontgomerySet",)


def parse_reading(lines: list[str]) -> tuple[str | None, float | None, str | None]:
    """(sex, age in years, finding text) from the lines of a Montgomery clinical reading."""
    sex = age = None
    finding: list[str] = []
    for line in lines:
        key, sep, value = line.partition(":")
        words = set(re.findall(r"[a-z]+", key.lower())) if sep else set()
        if "sex" in words:
            sex = parse_sex(value)
        elif "age" in words:
            age = parse_age(value)
        else:
            finding.append(line)
    return sex, age, " ".join(finding) or None


class MontgomerySource(Source):
    """Montgomery official NLM layout (``MontgomerySet/`` or its parent as the root).

    Options:
        view: the projection given to every image (default ``PA``, Jaeger et al. 2014).
    """

    name: ClassVar[str] = "montgomery"
    expects: ClassVar[str] = (
        "MontgomerySet/CXR_png/MCUCXR_0001_0.png (+ ClinicalReadings/, ManualMask/{left,right}Mask/)"
    )
    defaults: ClassVar[dict[str, Any]] = {"view": "PA"}

    def __init__(self, root: str | Path, *, source_name: str | None = None, **options: Any):
        super().__init__(root, source_name=source_name, **options)
        image_dir = find_child_dir(self.root, "CXR_png", _PARENTS)
        if image_dir is None:
            raise FileNotFoundError(
                f"{self.root}: no montgomery layout found; expected {self.expects}"
            )
        self.image_dir = image_dir

    @classmethod
    def detect(cls, root: Path) -> bool:
        """``CXR_png`` (at the root or under ``MontgomerySet/``) holding ``MCUCXR_*`` files."""
        image_dir = find_child_dir(root, "CXR_png", _PARENTS)
        if image_dir is None:
            return False
        try:
            with os.scandir(image_dir) as entries:
                return any(IMAGE_RE.match(entry.name) for entry in entries)
        except OSError:
            return False

    def records(self) -> Iterator[Record | Skip]:
        """One record per image, sorted by file name."""
        base = self.image_dir.parent
        readings = base / "ClinicalReadings"
        mask_dirs = [base / "ManualMask" / "leftMask", base / "ManualMask" / "rightMask"]
        problems: list[tuple[str, str]] = []
        entries = list_images(self.image_dir, problems=problems)
        for path, reason in problems:  # link loops, dangling links
            yield self.skip(path, reason)
        for entry in entries:
            match = IMAGE_RE.match(entry.name)
            if match is None:
                yield self.skip(entry.path, "unparseable patient id (expected MCUCXR_NNNN_0|1.png)")
                continue
            stem = os.path.splitext(entry.name)[0]
            sex, age, finding = parse_reading(read_text_lines(readings / f"{stem}.txt") or [])
            masks = [os.path.join(d, entry.name) for d in mask_dirs]
            found = [self._dirs.exists(path) for path in masks]
            extra: dict[str, Any] = {"finding": finding} if finding else {}
            if any(found) and not all(found):
                extra["mask_incomplete"] = True
            yield Record(
                image_path=entry.path,
                patient_id=match.group("patient").upper(),
                source=self.source,
                label=LABELS[match.group("abnormal")],
                mask_paths=masks if all(found) else [],
                view=parse_view(self.options["view"]),
                sex=sex,
                age=age,
                extra=extra,
            )
