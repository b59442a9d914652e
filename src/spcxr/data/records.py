"""Harmonised records: what every source adapter yields, whatever the dataset's own layout.

A :class:`Record` names one radiograph and everything known about it before its pixels are
read. A :class:`Skip` names an input that cannot become a record (missing file, missing label,
...) and why; ``spcxr prepare`` writes skips to the store's error report instead of stopping.
The columns follow torchxrayvision's practice of mapping every public dataset onto the same
fields (patient id, sex, age, view), so that splits and drift experiments work across sources.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

SPLITS = ("train", "val", "test")


@dataclass
class Record:
    """One radiograph of one source, before reading.

    Attributes:
        image_path: absolute path of the image file (DICOM, PNG, JPEG or TIFF).
        patient_id: patient identifier *within the source* (the store prefixes the source name).
        source: short dataset name, e.g. ``"kermany"``, ``"shenzhen"``.
        site: acquisition site / hospital (for drift experiments); defaults to ``source``.
        label: the primary single-class label (e.g. ``"pneumonia"``), or ``None`` if unlabeled.
        sublabel: a finer label when the source has one (Kermany ``bacteria`` / ``virus``).
        findings: multi-label targets (NIH, CheXpert): name -> 1.0 / 0.0 / NaN (not mentioned);
            uncertain labels are resolved by the adapter's policy before they get here.
        mask_paths: lung-mask files; several are merged by union (Montgomery left + right).
        view: projection, upper case (``"PA"``, ``"AP"``, ``"AP SUPINE"``, ``"LATERAL"``...).
        sex: ``"M"``, ``"F"`` or ``None``.
        age: age in years, or ``None``.
        official_split: ``"train"`` / ``"val"`` / ``"test"`` when the source defines one.
        extra: any other source-specific fields worth keeping (kept as JSON in the manifest).
    """

    image_path: str
    patient_id: str
    source: str
    site: str | None = None
    label: str | None = None
    sublabel: str | None = None
    findings: dict[str, float] = field(default_factory=dict)
    mask_paths: list[str] = field(default_factory=list)
    view: str | None = None
    sex: str | None = None
    age: float | None = None
    official_split: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.site is None:
            self.site = self.source
        if self.official_split is not None and self.official_split not in SPLITS:
            raise ValueError(
                f"{self.image_path}: official_split must be one of {SPLITS}, "
                f"got {self.official_split!r}"
            )


@dataclass
class Skip:
    """An input that cannot become a record; it goes to the store's error report."""

    path: str
    source: str
    reason: str
