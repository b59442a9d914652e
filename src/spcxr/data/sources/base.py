"""The source-adapter interface and the value parsers every adapter shares.

A source adapter turns one dataset layout (a public set's official files, a folder of class
folders, a CSV manifest) into harmonised :class:`~spcxr.data.records.Record` objects. Adapters
only *list*: they never decode pixels, and they check files with one directory listing per
folder (:class:`DirIndex`) instead of one ``stat`` per file, so that listing millions of rows
stays fast on network storage. Following torchxrayvision's dataset classes, every dataset is
mapped onto the same columns (patient id, sex, age, view) with the parsers below.
"""

from __future__ import annotations

import errno
import math
import os
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import pandas as pd

from spcxr.data.records import Record, Skip
from spcxr.io.dicom import parse_age  # noqa: F401  (one age parser for DICOM and manifests)
from spcxr.io.types import IMAGE_SUFFIXES

#: Cell values that mean "no value" in the CSVs we read ("?" is ieee8023's "unknown").
EMPTY_VALUES = frozenset({"", "nan", "none", "null", "na", "n/a", "-", "--", "?"})

#: Image file extensions an adapter lists when it scans folders.
IMAGE_EXTENSIONS = IMAGE_SUFFIXES  # what spcxr.io.read_image reads

#: Spellings of the official split names found in public layouts.
SPLIT_ALIASES = {
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "dev": "val",
    "test": "test",
    "testing": "test",
}

# Labels whose snake_case spelling differs from the name used across spcxr sources.
_LABEL_ALIASES = {"covid_19": "covid19"}

_VIEW_ALIASES = {
    "L": "LATERAL",
    "LAT": "LATERAL",
    "LL": "LATERAL",
    "RL": "LATERAL",
    "LATERAL": "LATERAL",
    "APS": "AP SUPINE",
    "AP_SUPINE": "AP SUPINE",
    "POSTEROANTERIOR": "PA",
    "ANTEROPOSTERIOR": "AP",
}

_SEX_ALIASES = {"m": "M", "male": "M", "f": "F", "female": "F"}

# "045Y" (DICOM age string), "45yrs", "45 years", "6 months", "3W", "10D", "45", "45.5".

T = TypeVar("T")

#: Ages above this are data-entry errors (NIH ChestX-ray14's 2017 CSV has ages like 414).


def clean(value: Any) -> str | None:
    """Return ``value`` as a stripped string, or ``None`` for an empty / NaN / "?" cell."""
    if value is None:
        return None
    if isinstance(value, float) and math.isnan(value):
        return None
    text = str(value).strip()
    return None if text.lower() in EMPTY_VALUES else text


def clean_column(values: pd.Series) -> list[str | None]:
    """:func:`clean` for a whole column at once (vectorised: millions of rows)."""
    text = values.astype("string").str.strip()
    empty = text.isna() | text.str.lower().isin(EMPTY_VALUES)
    return text.astype(object).where(~empty, None).tolist()


def parse_column(values: Sequence[Any], parse: Callable[[Any], T]) -> list[T]:
    """``[parse(v) for v in values]``, calling ``parse`` once per distinct value.

    Columns such as sex, view, label or age repeat a handful of values over millions of rows.
    """
    cache = {value: parse(value) for value in set(values)}
    return [cache[value] for value in values]


def snake_label(value: Any) -> str | None:
    """Normalise a class name to lower-case snake_case (``"COVID-19"`` -> ``"covid19"``).

    ``covid_19`` is spelled ``covid19`` so that COVIDx, ieee8023 and folder sources agree.
    """
    text = clean(value)
    if text is None:
        return None
    snake = re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")
    if not snake:
        return None
    return _LABEL_ALIASES.get(snake, snake)


def parse_sex(value: Any) -> str | None:
    """``"M"`` / ``"F"`` from M, F, Male, female, ...; anything else (O, Unknown) -> ``None``."""
    text = clean(value)
    return None if text is None else _SEX_ALIASES.get(text.lower())


def parse_view(value: Any) -> str | None:
    """Upper-case projection name: ``"AP Supine"`` -> ``"AP SUPINE"``, ``"L"`` -> ``"LATERAL"``."""
    text = clean(value)
    if text is None:
        return None
    upper = " ".join(text.upper().split())
    return _VIEW_ALIASES.get(upper, upper)


def parse_split(value: Any) -> str | None:
    """Official split name (train / val / test) from its common spellings, else ``None``."""
    text = clean(value)
    return None if text is None else SPLIT_ALIASES.get(text.lower())


def parse_bool(value: Any) -> bool:
    """Parse an option value such as ``True``, ``"yes"``, ``"0"`` into a bool."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in {"1", "true", "yes", "y", "on"}:
        return True
    if text in {"0", "false", "no", "n", "off"}:
        return False
    raise ValueError(f"not a boolean: {value!r}")


def is_image_name(name: str, extensions: tuple[str, ...] = IMAGE_EXTENSIONS) -> bool:
    """True for a visible file name with one of ``extensions`` (case-insensitive)."""
    return not name.startswith(".") and name.lower().endswith(extensions)


def read_table(path: Path, **kwargs: Any) -> pd.DataFrame:
    """Read a CSV index file with every cell as a string (empty cells stay ``""``).

    Raises:
        FileNotFoundError / ValueError: naming ``path`` when it is missing or unreadable.
    """
    if not path.is_file():
        raise FileNotFoundError(f"{path}: index file not found")
    try:
        return pd.read_csv(path, dtype=str, keep_default_na=False, **kwargs)
    except (OSError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as err:
        raise ValueError(f"{path}: cannot read index file ({err})") from err


def read_header(path: Path) -> list[str]:
    """The column names of a CSV file (first line only), or ``[]`` if it cannot be read."""
    try:
        with open(path, encoding="utf-8-sig", errors="replace") as handle:
            line = handle.readline()
    except OSError:
        return []
    return [name.strip().strip('"') for name in line.rstrip("\r\n").split(",")]


def find_column(columns: list[str], candidates: tuple[str, ...]) -> str | None:
    """The first column of ``columns`` whose name matches a candidate, ignoring case."""
    by_lower = {name.lower(): name for name in columns}
    for candidate in candidates:
        if candidate.lower() in by_lower:
            return by_lower[candidate.lower()]
    return None


def first_existing(*paths: Path) -> Path | None:
    """The first of ``paths`` that exists, or ``None``."""
    for path in paths:
        if path.exists():
            return path
    return None


class DirIndex:
    """Existence checks answered from one cached ``os.scandir`` per directory.

    Checking 100,000 images in one folder costs one listing instead of 100,000 ``stat`` calls.
    """

    def __init__(self) -> None:
        self._names: dict[str, frozenset[str]] = {}

    def names(self, directory: str | Path) -> frozenset[str]:
        """File and folder names directly inside ``directory`` (empty if it is missing)."""
        key = os.fspath(directory)
        if key not in self._names:
            try:
                with os.scandir(key) as entries:
                    self._names[key] = frozenset(entry.name for entry in entries)
            except OSError:
                self._names[key] = frozenset()
        return self._names[key]

    def exists(self, path: str | Path) -> bool:
        """True if ``path`` is listed in its parent directory.

        A name missing from the listing gets one real check, so case-insensitive file systems
        (an index saying ``A.PNG`` for ``a.png``) still agree with ``os.path.exists``.
        """
        head, tail = os.path.split(os.fspath(path))
        return tail in self.names(head) or os.path.exists(path)


def link_problem(entry: os.DirEntry[str]) -> str | None:
    """Why a symbolic link cannot be followed (a loop, a missing target), else ``None``.

    Only symbolic links cost a ``stat``; other entries are answered from the listing.
    """
    if not entry.is_symlink():
        return None
    try:
        entry.stat()
    except FileNotFoundError:
        return f"dangling symbolic link (target {os.readlink(entry.path)!r} does not exist)"
    except OSError as err:
        if err.errno == errno.ELOOP:
            return "symbolic link loop"
        return f"cannot follow symbolic link: {err.strerror or err}"
    return None


def list_images(
    directory: Path,
    extensions: tuple[str, ...] = IMAGE_EXTENSIONS,
    problems: list[tuple[str, str]] | None = None,
) -> list[os.DirEntry[str]]:
    """Image files directly inside ``directory``, sorted by name (one scandir, no stat).

    An image name that is a symbolic link loop or a dangling link is left out and, when
    ``problems`` is given, appended to it as ``(path, reason)`` (sorted), so that the caller
    can report it instead of dropping it silently.

    Raises:
        OSError: when ``directory`` itself cannot be listed (e.g. ``PermissionError``).
    """
    found, broken = [], []
    with os.scandir(directory) as entries:
        for entry in entries:
            if not is_image_name(entry.name, extensions):
                continue
            reason = link_problem(entry)
            if reason is not None:
                broken.append((entry.path, reason))
            elif entry.is_file():
                found.append(entry)
    if problems is not None:
        problems.extend(sorted(broken))
    return sorted(found, key=lambda entry: entry.name)


class Source(ABC):
    """A dataset layout that lists harmonised records.

    Subclasses set :attr:`name` (the registry key), :attr:`expects` (one line describing the
    layout, shown when detection fails), :attr:`defaults` (their options and default values)
    and implement :meth:`records` and :meth:`detect`.

    Args:
        root: the dataset folder (or, for CSV manifests, the CSV file itself).
        source_name: overrides ``Record.source`` (e.g. two hospitals both in "folder" layout).
        **options: adapter options (see each adapter's ``defaults``); unknown names raise.

    Common options:
        on_missing_label: ``"skip"`` (default) yields a :class:`Skip` for a row of a labelled
            source that has no label; ``"keep"`` yields the record with ``label=None``.
        check_files: ``True`` (default) skips rows whose image file is missing; ``False``
            trusts the index file (faster on slow network storage).
    """

    name: ClassVar[str]
    expects: ClassVar[str]
    #: Detection rank: when several layouts match a root, only the lowest rank is kept, so the
    #: public datasets' layouts (0) win over a CSV manifest (1), which wins over class folders (2).
    priority: ClassVar[int] = 0
    defaults: ClassVar[dict[str, Any]] = {}
    #: Allowed values of string options with a closed set of choices.
    choices: ClassVar[dict[str, tuple[str, ...]]] = {}
    #: Types of options whose default is ``None`` (others take the default's type).
    option_types: ClassVar[dict[str, type]] = {}

    _common_defaults: ClassVar[dict[str, Any]] = {"on_missing_label": "skip", "check_files": True}
    _common_choices: ClassVar[dict[str, tuple[str, ...]]] = {"on_missing_label": ("skip", "keep")}

    def __init__(self, root: str | Path, *, source_name: str | None = None, **options: Any):
        self.root = Path(root).expanduser().absolute()
        if not self.root.exists():
            raise FileNotFoundError(f"{self.root}: {self.name} source root not found")
        if not os.access(self.root, os.R_OK):
            raise PermissionError(f"{self.root}: {self.name} source root is not readable")
        self.source = source_name or self.default_source_name()
        self.options = self._resolve_options(options)
        self._dirs = DirIndex()

    def default_source_name(self) -> str:
        """``Record.source`` when no ``source_name`` is given (the registry name)."""
        return self.name

    @abstractmethod
    def records(self) -> Iterator[Record | Skip]:
        """Yield one :class:`Record` per image, or a :class:`Skip`, in a sorted order."""

    @classmethod
    @abstractmethod
    def detect(cls, root: Path) -> bool:
        """True if ``root`` looks like this layout (cheap: a few listings, no full reads)."""

    # -- helpers for subclasses -------------------------------------------------------------

    def skip(self, path: str | Path, reason: str) -> Skip:
        """A :class:`Skip` of this source."""
        return Skip(path=os.fspath(path), source=self.source, reason=reason)

    def exists(self, path: str | Path) -> bool:
        """File existence via the cached directory listings (always True if not checking)."""
        return not self.options["check_files"] or self._dirs.exists(path)

    @property
    def keep_unlabelled(self) -> bool:
        """True when rows without a label become records with ``label=None``."""
        return self.options["on_missing_label"] == "keep"

    def _resolve_options(self, given: dict[str, Any]) -> dict[str, Any]:
        defaults = {**self._common_defaults, **self.defaults}
        choices = {**self._common_choices, **self.choices}
        unknown = sorted(set(given) - set(defaults))
        if unknown:
            raise TypeError(
                f"{self.name} source: unknown option(s) {', '.join(unknown)}; "
                f"known options: {', '.join(sorted(defaults))}"
            )
        resolved = dict(defaults)
        for key, value in given.items():
            kind = self.option_types.get(key) or type(defaults[key])
            try:
                resolved[key] = _coerce(value, kind)
            except ValueError as err:
                raise ValueError(f"{self.name} source: option {key}: {err}") from err
            if key in choices and resolved[key] not in choices[key]:
                raise ValueError(
                    f"{self.name} source: option {key}={value!r} is not one of {choices[key]}"
                )
        return resolved


def _coerce(value: Any, kind: type) -> Any:
    """Convert an option value (often a string from the CLI) to the option's type."""
    if value is None or kind is type(None):
        return value
    if kind is bool:
        return parse_bool(value)
    if kind is str:
        return value if isinstance(value, str) else str(value)
    if kind in (int, float):
        try:
            return kind(value)
        except (TypeError, ValueError) as err:
            raise ValueError(f"expected {kind.__name__}, got {value!r}") from err
    return value


def find_child_dir(root: Path, name: str, parents: tuple[str, ...]) -> Path | None:
    """``root/name`` or ``root/P/name`` or ``root/P/P/name`` for a parent folder name ``P``.

    Official archives unpack with one or two extra levels (``ChinaSet_AllFiles/
    ChinaSet_AllFiles/CXR_png`` in some mirrors), so a user may point at any of them.
    """
    candidates = [root / name]
    for parent in parents:
        candidates += [root / parent / name, root / parent / parent / name]
    return next((path for path in candidates if path.is_dir()), None)


def read_text_lines(path: Path) -> list[str] | None:
    """Non-empty stripped lines of a small text file, or ``None`` if it cannot be read."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    return [line.strip() for line in text.lstrip("\ufeff").splitlines() if line.strip()]
