"""A folder of class folders: ``ROOT/CLASS/*.ext``, optionally ``ROOT/{train,val,test}/CLASS/``.

This is the layout of Kermany et al. 2018 (pediatric pneumonia, ``chest_xray/{train,val,test}/
{NORMAL,PNEUMONIA}``) and of many hospital exports. The label is the class folder name in
snake_case; the patient id is parsed from the file name, because radiographs of one patient
must stay in one split (Kermany has several images per child).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

from spcxr.data.records import Record, Skip
from spcxr.data.sources.base import (
    IMAGE_EXTENSIONS,
    SPLIT_ALIASES,
    Source,
    is_image_name,
    link_problem,
    list_images,
    snake_label,
)

#: Kermany file names: ``person1_bacteria_1.jpeg`` / ``person1_virus_6.jpeg`` (patient
#: ``person1``, sublabel bacteria / virus), ``IM-0115-0001.jpeg`` and ``IM-0429-0001-0002.jpeg``
#: (patient ``IM-0115`` / ``IM-0429``) and ``NORMAL2-IM-0383-0001.jpeg`` (patient
#: ``NORMAL2-IM-0383``: the NORMAL2 prefix is a separate numbering, so it is kept).
KERMANY_PATTERN = (
    r"^(?P<patient>person\d+|(?:[A-Za-z0-9]+-)?IM-\d+)(?:_(?P<sublabel>bacteria|virus)_)?"
)


def _subdirs(path: Path, problems: list[tuple[str, str]] | None = None) -> list[os.DirEntry[str]]:
    """Visible sub-folders of ``path``, sorted; links that cannot be followed go to
    ``problems`` as ``(path, reason)`` when it is given."""
    found = []
    with os.scandir(path) as entries:
        for entry in entries:
            if entry.name.startswith((".", "__")):
                continue
            reason = link_problem(entry)
            if reason is not None:
                if problems is not None:
                    problems.append((entry.path, reason))
            elif entry.is_dir():
                found.append(entry)
    if problems is not None:
        problems.sort()
    return sorted(found, key=lambda entry: entry.name)


def _has_image(path: str) -> bool:
    """True if ``path`` directly holds at least one image file (stops at the first one)."""
    try:
        with os.scandir(path) as entries:
            return any(is_image_name(entry.name) for entry in entries)
    except OSError:
        return False


def _split_dirs(root: Path) -> list[os.DirEntry[str]]:
    """The official split folders of ``root``, or ``[]`` if ``root`` holds class folders.

    Other sub-folders are ignored when they hold no images themselves: the Kaggle copy of
    Kermany et al. unpacks to ``chest_xray/{train,test,val}`` next to a nested duplicate
    ``chest_xray/chest_xray/``, which must not be listed twice.
    """
    subdirs = _subdirs(root)
    splits = [entry for entry in subdirs if entry.name.lower() in SPLIT_ALIASES]
    others = [entry for entry in subdirs if entry.name.lower() not in SPLIT_ALIASES]
    if not splits or any(_has_image(entry.path) for entry in others):
        return []
    return splits


class FolderSource(Source):
    """Class folders, optionally under official split folders (Kermany et al. 2018 layout).

    Options:
        patient_pattern: regex searched in the file name; the patient id is the
            named group ``patient`` (or the first group); a named group ``sublabel`` gives the
            sublabel. Default :data:`KERMANY_PATTERN`.
        on_unmatched: ``"file"`` (default): a file whose name does not match is its own
            patient (its stem; ``extra["patient_id_inferred"]``); ``"skip"``: yield a Skip.
        extensions: comma-separated image extensions to list.
    """

    name: ClassVar[str] = "folder"
    expects: ClassVar[str] = "ROOT/CLASS/*.png|jpg|dcm..., optionally ROOT/{train,val,test}/CLASS/"
    priority: ClassVar[int] = 2
    defaults: ClassVar[dict[str, Any]] = {
        "patient_pattern": KERMANY_PATTERN,
        "on_unmatched": "file",
        "extensions": ",".join(IMAGE_EXTENSIONS),
    }
    choices: ClassVar[dict[str, tuple[str, ...]]] = {"on_unmatched": ("file", "skip")}

    def __init__(self, root: str | Path, *, source_name: str | None = None, **options: Any):
        super().__init__(root, source_name=source_name, **options)
        if not self.root.is_dir():
            raise NotADirectoryError(f"{self.root}: folder source root is not a folder")
        try:
            self.pattern = re.compile(self.options["patient_pattern"])
        except re.error as err:
            raise ValueError(
                f"folder source: invalid patient_pattern {self.options['patient_pattern']!r}: {err}"
            ) from err
        if self.pattern.groups == 0:
            raise ValueError("folder source: patient_pattern needs a group for the patient id")
        self.extensions = tuple(
            "." + ext.strip().lstrip(".").lower()
            for ext in self.options["extensions"].split(",")
            if ext.strip()
        )

    def default_source_name(self) -> str:
        """The root folder's name in snake_case (e.g. ``kermany_pediatric``)."""
        return snake_label(self.root.name) or self.name

    @classmethod
    def detect(cls, root: Path) -> bool:
        """At least two class folders holding images (at the root or in a split folder).

        One folder of images (``images/`` next to a manifest) is not a class layout; name the
        type (``folder:PATH``) to read a single-class folder.
        """
        if not root.is_dir():
            return False
        try:
            tops = [Path(e.path) for e in _split_dirs(root)] or [root]
            return any(sum(_has_image(e.path) for e in _subdirs(top)) >= 2 for top in tops)
        except OSError:
            return False

    def records(self) -> Iterator[Record | Skip]:
        """One record per image file, sorted by split folder, class folder and file name."""
        split_dirs = _split_dirs(self.root)
        for split_dir in split_dirs:
            yield from self._class_folders(
                Path(split_dir.path), SPLIT_ALIASES[split_dir.name.lower()]
            )
        if not split_dirs:
            yield from self._class_folders(self.root, None)

    def _class_folders(self, top: Path, split: str | None) -> Iterator[Record | Skip]:
        """Records of the class folders under ``top``; a folder that cannot be listed, a
        symbolic link loop or a dangling link becomes a Skip and the listing goes on."""
        problems: list[tuple[str, str]] = []
        try:
            loose = list_images(top, self.extensions, problems)
            class_dirs = _subdirs(top, problems)
        except OSError as err:
            yield self.skip(top, f"cannot list folder: {err.strerror or err}")
            return
        for entry in loose:
            yield self.skip(entry.path, "image outside a class folder")
        for path, reason in problems:
            yield self.skip(path, reason)
        for class_dir in class_dirs:
            label = snake_label(class_dir.name)
            problems = []
            try:
                entries = list_images(Path(class_dir.path), self.extensions, problems)
            except OSError as err:
                yield self.skip(class_dir.path, f"cannot list folder: {err.strerror or err}")
                continue
            for path, reason in problems:
                yield self.skip(path, reason)
            for entry in entries:
                yield self._record(entry, label, split)

    def _record(
        self, entry: os.DirEntry[str], label: str | None, split: str | None
    ) -> Record | Skip:
        match = self.pattern.search(entry.name)
        groups = match.groupdict() if match else {}
        patient_id = (groups.get("patient") or match.group(1)) if match else None
        extra: dict[str, Any] = {}
        if not patient_id:
            if self.options["on_unmatched"] == "skip":
                return self.skip(
                    entry.path, f"unparseable patient id (patient_pattern {self.pattern.pattern!r})"
                )
            patient_id = os.path.splitext(entry.name)[0]
            extra["patient_id_inferred"] = True
        return Record(
            image_path=os.path.abspath(entry.path),
            patient_id=patient_id,
            source=self.source,
            label=label,
            sublabel=snake_label(groups.get("sublabel")),
            official_split=split,
            extra=extra,
        )
