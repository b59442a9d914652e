"""A generic CSV manifest: one row per image, columns mapped to record fields by options.

This is the escape hatch for any dataset without an adapter of its own (a hospital export, a
curated subset): write ``image,patient_id,label,...`` and point ``csv:`` at it. The shared
reduced copies of Shenzhen and ieee8023 are also CSV manifests; their adapters reuse
:func:`manifest_records` with a fixed column mapping.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd

from spcxr.data.records import Record, Skip
from spcxr.data.sources.base import (
    Source,
    clean,
    clean_column,
    find_column,
    parse_age,
    parse_column,
    parse_sex,
    parse_split,
    parse_view,
    read_header,
    read_table,
    snake_label,
)

#: Record field -> column names tried (case-insensitive) when the option does not name one.
COLUMN_CANDIDATES: dict[str, tuple[str, ...]] = {
    "image": ("image", "file", "path", "filename", "image_path", "file_name", "image_file"),
    "patient": ("patient_id", "patient", "PatientID", "patientid", "subject_id"),
    "label": ("label", "class"),
    "mask": ("mask_file", "mask", "mask_path", "mask_paths", "mask_files"),
    "view": ("view", "view_position", "ViewPosition"),
    "sex": ("sex", "gender", "PatientSex"),
    "age": ("age", "PatientAge"),
    "split": ("split",),
    "site": ("site",),
    "sublabel": ("sublabel",),
}

DEFAULT_CSV_NAME = "manifest.csv"


def resolve_paths(values: list[str], base_dir: Path) -> list[str]:
    """Absolute, normalised paths; relative ones are taken against ``base_dir``."""
    base = os.fspath(base_dir)
    return [os.path.normpath(os.path.join(base, value)) if value else "" for value in values]


def map_columns(
    columns: list[str], requested: dict[str, str | None], csv_path: Path
) -> dict[str, str | None]:
    """Record field -> CSV column: the named column, auto-detected (``None``) or unused (``""``).

    Raises:
        ValueError: naming ``csv_path`` when a named column is absent or no image column exists.
    """
    mapping: dict[str, str | None] = {}
    for field_name, candidates in COLUMN_CANDIDATES.items():
        wanted = requested.get(field_name)
        if wanted == "":
            mapping[field_name] = None
        elif wanted is None:
            mapping[field_name] = find_column(columns, candidates)
        else:
            found = find_column(columns, (wanted,))
            if found is None:
                raise ValueError(
                    f"{csv_path}: column {wanted!r} (option {field_name}) not found; "
                    f"columns: {', '.join(columns)}"
                )
            mapping[field_name] = found
    if mapping["image"] is None:
        raise ValueError(
            f"{csv_path}: no image column; name one with option image=COLUMN "
            f"(tried {', '.join(COLUMN_CANDIDATES['image'])})"
        )
    return mapping


def manifest_records(
    source: Source,
    table: pd.DataFrame,
    csv_path: Path,
    base_dir: Path,
    mapping: dict[str, str | None],
    extra_columns: list[str],
    mask_separator: str = ";",
) -> Iterator[Record | Skip]:
    """Records from a manifest table, sorted by resolved image path.

    A path listed twice keeps its first row; the repeat is skipped (it could otherwise carry a
    second label or patient id for the same radiograph).

    Args:
        source: the adapter (gives the source name, options and file checks).
        table: the CSV read with every cell a string.
        csv_path: the CSV file (named in skip reasons).
        base_dir: folder that relative paths are resolved against.
        mapping: record field -> column (``None``: not in this manifest); see :func:`map_columns`.
        extra_columns: columns copied into ``Record.extra`` (empty cells left out).
        mask_separator: separator between several mask paths in one cell.
    """
    n_rows = len(table)

    def column(field_name: str, parse: Callable[[Any], Any]) -> list[Any]:
        name = mapping.get(field_name)
        return parse_column(table[name].tolist(), parse) if name else [None] * n_rows

    def cleaned(field_name: str) -> list[str | None]:
        name = mapping.get(field_name)
        return clean_column(table[name]) if name else [None] * n_rows

    image_paths = resolve_paths([v or "" for v in cleaned("image")], base_dir)
    order = np.argsort(np.asarray(image_paths, dtype=object), kind="stable")
    labelled = mapping.get("label") is not None
    labels, sublabels = column("label", snake_label), column("sublabel", snake_label)
    patients, sites, masks, raw_splits = (cleaned(f) for f in ("patient", "site", "mask", "split"))
    splits = parse_column(raw_splits, parse_split)
    views, sexes, ages = (
        column("view", parse_view),
        column("sex", parse_sex),
        column("age", parse_age),
    )
    extras = {name: clean_column(table[name]) for name in extra_columns}
    previous = None
    for i in order.tolist():
        path = image_paths[i]
        if not path:
            yield source.skip(f"{csv_path}:row {i + 2}", "malformed row: no image path")
            continue
        if path == previous:  # sorted: a repeated path follows its first row
            yield source.skip(
                path, f"duplicate row {i + 2}: image listed earlier in {csv_path.name}"
            )
            continue
        previous = path
        if not source.exists(path):
            yield source.skip(path, "image file not found")
            continue
        if labelled and labels[i] is None and not source.keep_unlabelled:
            yield source.skip(path, "missing label")
            continue
        extra = {name: values[i] for name, values in extras.items() if values[i] is not None}
        patient_id = patients[i]
        if patient_id is None:
            patient_id = os.path.splitext(os.path.basename(path))[0]
            extra["patient_id_inferred"] = True
        if raw_splits[i] is not None and splits[i] is None:
            extra["split"] = raw_splits[i]  # not an official split name: kept, not guessed
        yield Record(
            image_path=path,
            patient_id=patient_id,
            source=source.source,
            site=sites[i],
            label=labels[i],
            sublabel=sublabels[i],
            mask_paths=_masks(source, masks[i], base_dir, mask_separator, extra),
            view=views[i],
            sex=sexes[i],
            age=ages[i],
            official_split=splits[i],
            extra=extra,
        )


def _masks(
    source: Source, text: str | None, base_dir: Path, separator: str, extra: dict[str, Any]
) -> list[str]:
    """Resolved mask paths of one cell; missing files go to ``extra["missing_masks"]``."""
    if text is None:
        return []
    paths = resolve_paths([p for p in (clean(v) for v in text.split(separator)) if p], base_dir)
    missing = [path for path in paths if not source.exists(path)]
    if missing:
        extra["missing_masks"] = missing
    return [path for path in paths if path not in missing]


class CsvManifestSource(Source):
    """Rows of a CSV manifest (``ROOT/manifest.csv`` or any CSV file given as the root).

    Options:
        csv: the CSV file name inside a root folder (default ``manifest.csv``).
        base_dir: folder that relative paths are resolved against (default: the CSV's folder).
        image, patient, label, mask, view, sex, age, split, site, sublabel: the column holding
            each field; unset: auto-detected from :data:`COLUMN_CANDIDATES`; empty: not used.
            A mask cell may hold several paths separated by ``mask_separator`` (default ``;``).
        extra_columns: comma-separated columns copied into ``extra``; unset: every column not
            mapped to a field; empty: none.

    Rows without a patient id get the file stem (``extra["patient_id_inferred"]``). Split
    values other than train / val / test spellings are kept in ``extra["split"]``.
    """

    name: ClassVar[str] = "csv"
    expects: ClassVar[str] = "ROOT/manifest.csv (or a CSV file) with an image/file/path column"
    priority: ClassVar[int] = 1
    defaults: ClassVar[dict[str, Any]] = {
        "csv": DEFAULT_CSV_NAME,
        "base_dir": None,
        "extra_columns": None,
        "mask_separator": ";",
        **dict.fromkeys(COLUMN_CANDIDATES),
    }
    option_types: ClassVar[dict[str, type]] = {
        "base_dir": str,
        "extra_columns": str,
        **dict.fromkeys(COLUMN_CANDIDATES, str),
    }

    def __init__(self, root: str | Path, *, source_name: str | None = None, **options: Any):
        super().__init__(root, source_name=source_name, **options)
        self.csv_path = self.root if self.root.is_file() else self.root / self.options["csv"]
        if not self.csv_path.is_file():
            raise FileNotFoundError(f"{self.csv_path}: CSV manifest not found")
        base = self.options["base_dir"]
        self.base_dir = Path(base).expanduser().absolute() if base else self.csv_path.parent

    def default_source_name(self) -> str:
        """The manifest folder's name in snake_case (e.g. ``nih_tbx_samples``)."""
        folder = self.root.parent if self.root.is_file() else self.root
        return snake_label(folder.name) or self.name

    @classmethod
    def detect(cls, root: Path) -> bool:
        """A ``.csv`` file, or a folder with ``manifest.csv``, that has an image column."""
        path = root if root.is_file() else root / DEFAULT_CSV_NAME
        if path.suffix.lower() != ".csv" or not path.is_file():
            return False
        return find_column(read_header(path), COLUMN_CANDIDATES["image"]) is not None

    def records(self) -> Iterator[Record | Skip]:
        """One record per manifest row, sorted by image path."""
        table = read_table(self.csv_path)
        requested = {field_name: self.options[field_name] for field_name in COLUMN_CANDIDATES}
        mapping = map_columns(list(table.columns), requested, self.csv_path)
        yield from manifest_records(
            self,
            table,
            self.csv_path,
            self.base_dir,
            mapping,
            self._extra_columns(list(table.columns), mapping),
            self.options["mask_separator"],
        )

    def _extra_columns(self, columns: list[str], mapping: dict[str, str | None]) -> list[str]:
        wanted = self.options["extra_columns"]
        if wanted is None:
            used = {name for name in mapping.values() if name}
            return [name for name in columns if name not in used]
        names = [name.strip() for name in wanted.split(",") if name.strip()]
        missing = [name for name in names if name not in columns]
        if missing:
            raise ValueError(f"{self.csv_path}: extra_columns not found: {', '.join(missing)}")
        return names
