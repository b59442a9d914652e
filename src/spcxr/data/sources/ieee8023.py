"""Cohen et al. 2020, COVID-19 image data collection (github.com/ieee8023/covid-chestxray-dataset).

Official layout: ``metadata.csv`` (patientid, offset, sex, age, finding, RT_PCR_positive,
survival, view, modality, date, location, folder, filename, doi, url, license, clinical_notes,
other_notes) with images in ``images/`` (the ``folder`` column). Only X-ray rows are kept (the
collection also holds CT slices). Also reads the shared reduced copy (``manifest.csv`` with
``file``, ``mask_file``, ``ignore_mask_file``, ``label``, ``finding``, ``patient_id``,
``offset_days``, ``sex``, ``age``, ``view``...), whose labels follow :func:`finding_label`.

Label mapping of the ``finding`` text (flat in early versions, ``"Pneumonia/Viral/COVID-19"``
in later ones; several findings may be comma-separated):

=================  =====================================================================
label              finding
=================  =====================================================================
covid19            any part names COVID-19 (``"COVID-19, ARDS"`` included)
normal             ``No Finding``
unknown            ``todo`` (not yet labelled by the curators), ``Unknown`` or empty
other              Lipoid (a chemical, not infectious, pneumonia), Tuberculosis, anything
                   else that is not a pneumonia
other_pneumonia    other infectious pneumonias: ``Pneumonia/...`` (viral, bacterial, fungal,
                   aspiration), SARS, MERS, ARDS, Streptococcus, Pneumocystis, Klebsiella...
=================  =====================================================================

The sublabel is the most specific finding part in snake_case (``streptococcus``, ``ards``).
Masks: the reduced copy's ``mask_file`` (V7 Labs lung masks); for the official layout only a
``mask_dir`` given as an option is used, because the repository's ``annotations/lungVAE-masks``
are model predictions, not manual annotations. ``ignore_mask_file`` (devices, text) goes to
``extra["ignore_mask_path"]``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from spcxr.data.records import Record, Skip
from spcxr.data.sources.base import (
    Source,
    clean,
    parse_age,
    parse_sex,
    parse_view,
    read_header,
    read_table,
    snake_label,
)
from spcxr.data.sources.csv_manifest import manifest_records, map_columns

# Finding parts (lower case) that name an infectious pneumonia or its agent in the flat
# (early) spelling; the hierarchical spelling starts with "Pneumonia/".
PNEUMONIA_PARTS = frozenset(
    {
        "pneumonia",
        "viral",
        "bacterial",
        "fungal",
        "aspiration",
        "sars",
        "mers",
        "mers-cov",
        "ards",
        "influenza",
        "h1n1",
        "varicella",
        "herpes",
        "streptococcus",
        "staphylococcus",
        "pneumocystis",
        "klebsiella",
        "chlamydophila",
        "legionella",
        "mycoplasma",
        "mycoplasma bacterial pneumonia",
        "e.coli",
        "nocardia",
        "aspergillosis",
        "candida",
        "mycobacterium avium",
    }
)
NOT_PNEUMONIA_PARTS = frozenset({"lipoid", "tuberculosis"})
UNKNOWN_FINDINGS = frozenset({"todo", "unknown"})

_REDUCED_EXTRA = ("finding", "offset_days", "survival", "modality", "license", "doi", "image_url")
_OFFICIAL_EXTRA = {
    "offset": "offset_days",
    "finding": "finding",
    "RT_PCR_positive": "rt_pcr_positive",
    "survival": "survival",
    "date": "date",
    "location": "location",
    "doi": "doi",
    "url": "url",
    "license": "license",
}


def finding_parts(finding: str) -> list[str]:
    """The parts of a finding, most general first: ``"Pneumonia/Viral/COVID-19"`` -> 3 parts."""
    return [part.strip() for part in re.split(r"[/,]", finding) if part.strip()]


def finding_label(finding: Any) -> str:
    """Map an ieee8023 ``finding`` to covid19 / normal / other_pneumonia / other / unknown."""
    text = clean(finding)
    if text is None or text.lower() in UNKNOWN_FINDINGS:
        return "unknown"
    parts = [part.lower() for part in finding_parts(text)]
    if any(part.replace("-", "") == "covid19" for part in parts):
        return "covid19"
    if parts == ["no finding"]:
        return "normal"
    if any(part in NOT_PNEUMONIA_PARTS for part in parts):
        return "other"
    if any(part in PNEUMONIA_PARTS or "pneumonia" in part for part in parts):
        return "other_pneumonia"
    return "other"


def finding_sublabel(finding: Any, label: str | None) -> str | None:
    """The most specific finding part for other / other_pneumonia labels, else ``None``."""
    text = clean(finding)
    if text is None or label not in {"other", "other_pneumonia"}:
        return None
    parts = finding_parts(text)
    return snake_label(parts[-1]) if parts else None


class Ieee8023Source(Source):
    """ieee8023 COVID-19 collection: official ``metadata.csv`` layout or the reduced copy.

    Options:
        mask_dir: folder of lung masks named ``{image stem}.png`` or ``{image stem}_mask.png``
            (official layout only; relative to the root).
    """

    name: ClassVar[str] = "ieee8023"
    expects: ClassVar[str] = (
        "metadata.csv (patientid, finding, modality, filename...) + images/, "
        "or manifest.csv with file, finding, patient_id, offset_days"
    )
    defaults: ClassVar[dict[str, Any]] = {"mask_dir": None}
    option_types: ClassVar[dict[str, type]] = {"mask_dir": str}

    def __init__(self, root: str | Path, *, source_name: str | None = None, **options: Any):
        super().__init__(root, source_name=source_name, **options)
        self.metadata = self.root / "metadata.csv"
        self.manifest = self.root / "manifest.csv"
        if not self.metadata.is_file() and not self.manifest.is_file():
            raise FileNotFoundError(
                f"{self.root}: no ieee8023 layout found; expected {self.expects}"
            )

    @classmethod
    def detect(cls, root: Path) -> bool:
        """``metadata.csv`` with patientid/finding/filename, or the reduced ``manifest.csv``."""
        official = {"patientid", "finding", "filename"}
        reduced = {"file", "finding", "patient_id", "offset_days"}
        if official <= {name.lower() for name in read_header(root / "metadata.csv")}:
            return True
        return reduced <= set(read_header(root / "manifest.csv"))

    def records(self) -> Iterator[Record | Skip]:
        """One record per X-ray image, sorted by image path."""
        if self.metadata.is_file():
            yield from self._official_records()
        else:
            yield from self._reduced_records()

    def _reduced_records(self) -> Iterator[Record | Skip]:
        table = read_table(self.manifest)
        mapping = map_columns(list(table.columns), {"image": "file", "split": ""}, self.manifest)
        wanted = (*_REDUCED_EXTRA, "ignore_mask_file")
        extra_columns = [name for name in wanted if name in table.columns]
        for item in manifest_records(self, table, self.manifest, self.root, mapping, extra_columns):
            if isinstance(item, Record):
                item.sublabel = finding_sublabel(item.extra.get("finding"), item.label)
                ignore_mask = item.extra.pop("ignore_mask_file", None)
                if ignore_mask:
                    path = os.path.normpath(self.root / ignore_mask)
                    key = "ignore_mask_path" if self.exists(path) else "missing_ignore_mask"
                    item.extra[key] = path
            yield item

    def _official_records(self) -> Iterator[Record | Skip]:
        table = read_table(self.metadata)
        columns = {name.strip().lower(): name for name in table.columns}
        if "filename" not in columns:
            raise ValueError(f"{self.metadata}: no filename column")

        def column(name: str) -> list[Any]:
            return table[columns[name]].tolist() if name in columns else [None] * len(table)

        modality = [clean(v) for v in column("modality")]
        folders = [clean(v) or "images" for v in column("folder")]
        names = [clean(v) or "" for v in column("filename")]
        paths = [
            os.path.normpath(self.root / folder / name) if name else ""
            for folder, name in zip(folders, names, strict=True)
        ]
        mask_dir = self._mask_dir()
        mask_names = self._dirs.names(mask_dir) if mask_dir else frozenset()
        patients, findings = column("patientid"), column("finding")
        sexes, ages, views = column("sex"), column("age"), column("view")
        extras = {key: column(name.lower()) for name, key in _OFFICIAL_EXTRA.items()}
        for i in np.argsort(np.asarray(paths, dtype=object), kind="stable").tolist():
            # Rows without a modality are X-rays in early versions of the CSV.
            if modality[i] is not None and modality[i].lower() != "x-ray":
                continue
            path = paths[i]
            if not path:
                yield self.skip(f"{self.metadata}:row {i + 2}", "malformed row: no filename")
                continue
            if not self.exists(path):
                yield self.skip(path, "image file not found")
                continue
            patient_id = clean(patients[i])
            if patient_id is None:
                yield self.skip(path, "malformed row: no patientid")
                continue
            label = finding_label(findings[i])
            stem = os.path.splitext(os.path.basename(path))[0]
            masks = [n for n in (f"{stem}.png", f"{stem}_mask.png") if n in mask_names][:1]
            yield Record(
                image_path=path,
                patient_id=patient_id,
                source=self.source,
                label=label,
                sublabel=finding_sublabel(findings[i], label),
                mask_paths=[os.path.join(mask_dir, n) for n in masks] if mask_dir else [],
                view=parse_view(views[i]),
                sex=parse_sex(sexes[i]),
                age=parse_age(ages[i]),
                extra={key: value for key, vals in extras.items() if (value := clean(vals[i]))},
            )

    def _mask_dir(self) -> Path | None:
        given = self.options["mask_dir"]
        if not given:
            return None
        path = self.root / Path(given).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(f"{path}: ieee8023 mask_dir not found")
        return path
