"""COVIDx CXR (Wang et al. 2020, COVID-Net; versions 2-4): an assembly of public collections.

Layout: ``train.txt``, ``test.txt`` (and ``val.txt`` in CXR-4) with whitespace-separated lines
``patient_id filename class data_source``; images in ``train/``, ``test/``, ``val/``. Classes
are ``positive`` / ``negative`` (CXR-2 onwards) or ``normal`` / ``pneumonia`` / ``COVID-19``
(earlier releases, labelled ``covid19`` here as in the ieee8023 adapter). The ``data_source``
(``cohen``, ``rsna``, ``bimcv``, ``ricord``, ...) becomes ``Record.site``: COVIDx mixes
collections whose class balance differs by source, so drift must be measured per site.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

from spcxr.data.records import Record, Skip
from spcxr.data.sources.base import Source, is_image_name, snake_label

SPLITS = ("train", "val", "test")


def parse_line(line: str) -> tuple[str, str, str, str | None] | None:
    """(patient id, file name, class, data source) of one index line, or ``None`` if malformed.

    A file name may contain spaces: it runs from the second field to the last field that ends
    in an image extension; one field (class) or two (class, data source) must follow it.
    """
    tokens = line.split()
    ends = [i for i, token in enumerate(tokens) if i >= 1 and is_image_name(token)]
    if not ends:
        return None
    rest = tokens[ends[-1] + 1 :]
    if len(rest) not in (1, 2):
        return None
    filename = " ".join(tokens[1 : ends[-1] + 1])
    return tokens[0], filename, rest[0], rest[1] if len(rest) == 2 else None


class CovidxSource(Source):
    """COVIDx CXR index files (``train.txt`` / ``val.txt`` / ``test.txt``) and image folders.

    Options:
        train_list, val_list, test_list: index file names inside the root (defaults
            ``train.txt``, ``val.txt``, ``test.txt``; a missing val list is fine).
    """

    name: ClassVar[str] = "covidx"
    expects: ClassVar[str] = (
        "train.txt + test.txt (+ val.txt), lines 'patient_id filename class data_source', "
        "images in train/, test/, val/"
    )
    defaults: ClassVar[dict[str, Any]] = {
        "train_list": "train.txt",
        "val_list": "val.txt",
        "test_list": "test.txt",
    }

    def __init__(self, root: str | Path, *, source_name: str | None = None, **options: Any):
        super().__init__(root, source_name=source_name, **options)
        self.lists = {
            split: self.root / self.options[f"{split}_list"]
            for split in SPLITS
            if (self.root / self.options[f"{split}_list"]).is_file()
        }
        if not self.lists:
            raise FileNotFoundError(
                f"{self.root}: no COVIDx index file found; expected {self.expects}"
            )

    @classmethod
    def detect(cls, root: Path) -> bool:
        """``train.txt`` whose first line parses, next to a ``train/`` image folder."""
        index = root / "train.txt"
        if not index.is_file() or not (root / "train").is_dir():
            return False
        try:
            with open(index, encoding="utf-8", errors="replace") as handle:
                parsed = parse_line(handle.readline())
        except OSError:
            return False
        return parsed is not None and is_image_name(parsed[1])

    def records(self) -> Iterator[Record | Skip]:
        """Records of every split, each split sorted by file name (train, val, test)."""
        for split, index in self.lists.items():
            yield from self._split_records(split, index)

    def _split_records(self, split: str, index: Path) -> Iterator[Record | Skip]:
        try:
            lines = index.read_text(encoding="utf-8", errors="replace").splitlines()
        except OSError as err:
            raise OSError(f"{index}: cannot read COVIDx index file ({err})") from err
        rows = []
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            parsed = parse_line(line)
            if parsed is None:
                yield self.skip(f"{index}:{number}", f"malformed line: {line.strip()[:80]!r}")
                continue
            rows.append(parsed)
        image_dir = self.root / split
        for patient_id, filename, cls, data_source in sorted(rows, key=lambda row: row[1]):
            path = os.path.normpath(image_dir / filename)
            if not self.exists(path):
                yield self.skip(path, "image file not found")
                continue
            yield Record(
                image_path=path,
                patient_id=patient_id,
                source=self.source,
                site=snake_label(data_source),
                label=snake_label(cls),
                official_split=split,
            )
