"""Source adapters: every supported dataset layout, and how a user names one.

A source is named ``TYPE:PATH`` (``shenzhen:/data/ChinaSet``) or by a bare ``PATH``, whose
layout is then detected. The public datasets' layouts win over a generic CSV manifest, which
wins over a folder of class folders (``Source.priority``): the shared reduced copies with a
``manifest.csv`` thus open with their own adapter, and a folder with a ``manifest.csv`` and an
``images/`` folder is read through its manifest. Two matches of the same rank are ambiguous.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from spcxr.data.sources.base import Source
from spcxr.data.sources.chexpert import ChexpertSource
from spcxr.data.sources.covidx import CovidxSource
from spcxr.data.sources.csv_manifest import CsvManifestSource
from spcxr.data.sources.folder import FolderSource
from spcxr.data.sources.ieee8023 import Ieee8023Source
from spcxr.data.sources.montgomery import MontgomerySource
from spcxr.data.sources.nih import NihSource
from spcxr.data.sources.rsna import RsnaSource
from spcxr.data.sources.shenzhen import ShenzhenSource

REGISTRY: dict[str, type[Source]] = {
    cls.name: cls
    for cls in (
        FolderSource,
        CsvManifestSource,
        ShenzhenSource,
        MontgomerySource,
        Ieee8023Source,
        CovidxSource,
        RsnaSource,
        NihSource,
        ChexpertSource,
    )
}

# "TYPE:" prefix: two or more characters, so a Windows drive letter ("C:") is not a type.
_TYPE_PREFIX = re.compile(r"^(?P<type>[A-Za-z][A-Za-z0-9_-]+):(?P<path>.+)$")
_INT = re.compile(r"^[+-]?(0|[1-9]\d*)$")
_FLOAT = re.compile(r"^[+-]?(\d+\.\d*|\.\d+|\d+(\.\d*)?[eE][+-]?\d+)$")


def known_types() -> str:
    """One line per registered type with the layout it expects (for error messages)."""
    return "\n".join(f"  {name}: {cls.expects}" for name, cls in REGISTRY.items())


def detect_types(root: Path) -> list[str]:
    """Registry names whose layout matches ``root``, keeping only the best-ranked matches."""
    matches = [name for name, cls in REGISTRY.items() if cls.detect(root)]
    best = min((REGISTRY[name].priority for name in matches), default=0)
    return [name for name in matches if REGISTRY[name].priority == best]


def open_source(spec: str, **options: Any) -> Source:
    """Open ``"TYPE:PATH"`` or a bare ``PATH`` (layout detected) as a :class:`Source`.

    Args:
        spec: ``"shenzhen:/data/ChinaSet"`` or ``"/data/ChinaSet"``.
        **options: adapter options, including ``source_name``.

    Raises:
        ValueError: unknown type, or a bare path whose layout is ambiguous or not recognised
            (the message lists the known types and what each expects).
        FileNotFoundError: the path does not exist.
    """
    match = _TYPE_PREFIX.match(spec)
    if match is not None and not Path(spec).exists():
        kind = match.group("type").lower()
        if kind not in REGISTRY:
            raise ValueError(
                f"unknown source type {kind!r} in {spec!r}; known types:\n{known_types()}"
            )
        return REGISTRY[kind](match.group("path"), **options)
    root = Path(spec).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"{root}: source path not found")
    found = detect_types(root)
    if len(found) == 1:
        return REGISTRY[found[0]](root, **options)
    if found:
        reason = f"layout is ambiguous (matches {', '.join(found)})"
    else:
        reason = "layout not recognised"
    raise ValueError(f"{root}: {reason}; name the type as TYPE:PATH. Known types:\n{known_types()}")


def parse_value(text: str) -> Any:
    """Type a CLI option value: bool, int, float, ``None`` (none/null) or the string itself.

    Numbers with leading zeros (``007``) stay strings: they are identifiers, not numbers.
    """
    lower = text.strip().lower()
    if lower in {"true", "yes"}:
        return True
    if lower in {"false", "no"}:
        return False
    if lower in {"none", "null"}:
        return None
    if _INT.match(text.strip()):
        return int(text)
    if _FLOAT.match(text.strip()):
        return float(text)
    return text


def parse_options(pairs: list[str]) -> dict[str, Any]:
    """``["uncertain=ones", "frontal_only=false"]`` -> ``{"uncertain": "ones", ...}``.

    Values are typed by :func:`parse_value`; an empty value (``split=``) is the empty string,
    which CSV column options read as "do not use this column". Dashes in keys become
    underscores.

    Raises:
        ValueError: a pair without ``=``, an empty key, or a key given twice.
    """
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise ValueError(f"option {pair!r} is not KEY=VALUE")
        if key in options:
            raise ValueError(f"option {key!r} given twice")
        options[key] = parse_value(value) if value else ""
    return options


__all__ = [
    "REGISTRY",
    "ChexpertSource",
    "CovidxSource",
    "CsvManifestSource",
    "FolderSource",
    "Ieee8023Source",
    "MontgomerySource",
    "NihSource",
    "RsnaSource",
    "ShenzhenSource",
    "Source",
    "detect_types",
    "known_types",
    "open_source",
    "parse_options",
    "parse_value",
]
