"""Targets for supervised tasks: which manifest column, which classes, which rows take part.

A store keeps each source's own labels (``label``: normal / pneumonia / tuberculosis /
covid19 ...; ``sublabel``: bacteria / virus ...; ``findings``: NIH/CheXpert multi-label JSON).
A task names the column, optionally renames labels (``pneumonia=abnormal``) so that different
sources share one vocabulary (the paper's normal-vs-abnormal screening and drift experiments),
and lists the classes it keeps; rows whose label is missing or not kept take no part and are
counted, never silently relabelled.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd


@dataclass
class LabelConfig:
    """Which targets a classifier learns.

    Attributes:
        column: manifest column with the targets: ``label`` (multi-class), ``sublabel``
            (e.g. Kermany bacteria / virus) or ``findings`` (multi-label, NIH / CheXpert).
        classes: the classes kept, in this order (after renaming); empty: every value found in
            the training rows, sorted. For ``findings``: the findings used (empty: all).
        rename: ``old=new`` pairs applied before selecting classes, e.g. ``pneumonia=abnormal
            tuberculosis=abnormal`` for normal-vs-abnormal screening across sources.
    """

    column: str = "label"
    classes: list[str] = field(default_factory=list)
    rename: list[str] = field(default_factory=list)

    @property
    def multilabel(self) -> bool:
        return self.column == "findings"

    def mapping(self) -> dict[str, str]:
        pairs = {}
        for item in self.rename:
            old, sep, new = item.partition("=")
            if not sep or not old or not new:
                raise ValueError(f"label rename {item!r}: expected old=new")
            pairs[old.strip()] = new.strip()
        return pairs


def class_values(manifest: pd.DataFrame, config: LabelConfig) -> pd.Series:
    """The renamed label of every row (``None`` where missing)."""
    if config.column not in manifest.columns:
        raise ValueError(f"the store's manifest has no column {config.column!r}")
    mapping = config.mapping()
    values = [
        None if v is None or (isinstance(v, float) and math.isnan(v)) else mapping.get(v, v)
        for v in manifest[config.column].tolist()
    ]
    return pd.Series(values, index=manifest.index, dtype=object)


def resolve_classes(manifest: pd.DataFrame, rows: np.ndarray, config: LabelConfig) -> list[str]:
    """The class list: the configured one, or every value found in ``rows`` (sorted)."""
    if config.multilabel:
        if config.classes:
            return list(config.classes)
        names: set[str] = set()
        for text in manifest["findings"].iloc[rows].dropna():
            names.update(json.loads(text))
        if not names:
            raise ValueError("no findings in the training rows (column 'findings' is empty)")
        return sorted(names)
    if config.classes:
        return list(config.classes)
    found = class_values(manifest.iloc[rows], config).dropna().unique().tolist()
    if len(found) < 2:
        raise ValueError(
            f"column {config.column!r} has fewer than two classes in the training rows: {found}"
        )
    return sorted(found)


def targets(manifest: pd.DataFrame, rows: np.ndarray, config: LabelConfig, classes: list[str]):
    """Targets of ``rows``: int class ids (-1 = excluded) or float [n, C] (NaN = missing)."""
    if config.multilabel:
        out = np.full((len(rows), len(classes)), np.nan, dtype=np.float32)
        for i, text in enumerate(manifest["findings"].iloc[rows].tolist()):
            if text is None or (isinstance(text, float) and math.isnan(text)):
                continue
            values = json.loads(text)
            for j, name in enumerate(classes):
                v = values.get(name)
                if v is not None and not (isinstance(v, float) and math.isnan(v)):
                    out[i, j] = float(v)
        return out
    index = {name: i for i, name in enumerate(classes)}
    values = class_values(manifest.iloc[rows], config)
    return np.array([index.get(v, -1) if v is not None else -1 for v in values], dtype=np.int64)


def usable(y: np.ndarray) -> np.ndarray:
    """Rows that take part: a kept class, or at least one known finding."""
    if y.ndim == 2:
        return ~np.isnan(y).all(axis=1)
    return y >= 0
