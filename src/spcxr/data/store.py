"""The prepared store: compact uint8 images (+ masks) in memory-mappable shards and a manifest.

Layout of a store folder::

    store.json                   format version, image size, sources, prepare settings, fingerprint
    shards/<chunk>.images.npy    uint8 [n, S, S] (one .npy per chunk, opened with mmap)
    shards/<chunk>.masks.npy     uint8 [n, S, S] 0/1 lung masks (only for chunks that have any)
    shards/<chunk>.parquet       the chunk's manifest rows (written last: it marks the chunk done)
    shards/<chunk>.errors.csv    inputs of the chunk that were skipped, with the reason
    manifest.parquet             every row, with shard/offset, duplicate group, patient group, split
    errors.csv                   every skipped input (file, source, stage, reason)
    duplicates.csv               duplicate pairs (exact and near) found across all sources
    report.json, report.md       counts, classes, sources, splits, duplicates, errors

Loader workers only slice these arrays (no decoding), so reading a batch costs a memcpy per
image. Every file is written to a temporary name and renamed, so an interrupted run never
leaves a half-written file that a later run would trust.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from spcxr.atomic import atomic_path
from spcxr.errors import UsageError

STORE_FORMAT = "spcxr-store"
STORE_VERSION = 1


class CorruptStoreError(UsageError):
    """A store file is truncated or unreadable (e.g. a partial copy); the message names it."""

    def __init__(self, path: str | Path, detail: str) -> None:
        super().__init__(
            f"{path}: truncated or corrupt store file ({detail}); run spcxr prepare again "
            "(same sources and --out) to rebuild it"
        )


class _Stream:
    """A plain ``write`` wrapper: ``np.save`` then writes with ``write`` instead of
    ``ndarray.tofile``, whose short write on a full disk loses the errno ("131072 requested
    and 102272 written")."""

    def __init__(self, handle: Any) -> None:
        self.handle = handle

    def write(self, data: bytes) -> int:
        return self.handle.write(data)


def atomic_save_npy(path: Path, array: np.ndarray) -> None:
    """Save an array as .npy atomically (no pickles inside)."""
    with atomic_path(path) as tmp, tmp.open("wb") as f:
        np.save(_Stream(f), np.ascontiguousarray(array), allow_pickle=False)


def atomic_write_parquet(path: Path, frame: pd.DataFrame) -> None:
    with atomic_path(path) as tmp:
        frame.to_parquet(tmp, index=False)


def open_npy(path: Path) -> np.ndarray:
    """Memory-map a shard; a truncated or malformed file raises :class:`CorruptStoreError`."""
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, EOFError) as err:  # numpy: "mmap length is greater than file size"
        raise CorruptStoreError(path, str(err)) from err
    except OSError as err:
        if isinstance(err, FileNotFoundError | PermissionError):
            raise
        raise CorruptStoreError(path, err.strerror or str(err)) from err


def read_store_json(root: Path) -> dict[str, Any]:
    path = root / "store.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{root}: not a prepared store (no store.json); run `spcxr prepare`"
        )
    meta = json.loads(path.read_text())
    if meta.get("format") != STORE_FORMAT:
        raise ValueError(f"{path}: not an spcxr store (format={meta.get('format')!r})")
    if meta.get("version") != STORE_VERSION:
        raise ValueError(f"{path}: store version {meta.get('version')} is not supported")
    return meta


def fingerprint_manifest(manifest: pd.DataFrame, image_size: int) -> str:
    """A short content fingerprint: image size + every row's pixel hash, mask flag and split."""
    h = hashlib.blake2b(digest_size=12)
    h.update(f"size={image_size};n={len(manifest)};".encode())
    cols = [c for c in ("pixel_hash", "has_mask", "label", "split") if c in manifest.columns]
    columns = [
        manifest[c].astype(object).where(manifest[c].notna(), "").map(str).tolist() for c in cols
    ]
    for values in zip(*columns, strict=True):
        h.update("|".join(values).encode())
        h.update(b"\n")
    return h.hexdigest()


class PreparedStore:
    """Read access to a prepared store: the manifest plus memory-mapped image / mask shards.

    Opening is cheap (the arrays are memory-mapped, nothing is decoded). ``images(idx)``
    gathers any set of rows into one contiguous uint8 array, shard by shard, so a loader worker
    costs one memcpy per image.

    Args:
        root: the store folder written by ``spcxr prepare``.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.meta = read_store_json(self.root)
        manifest_path = self.root / "manifest.parquet"
        if not manifest_path.is_file():
            raise FileNotFoundError(
                f"{self.root}: store has no manifest.parquet (prepare was interrupted before "
                "it finished); run `spcxr prepare` again to resume"
            )
        try:
            manifest = pd.read_parquet(manifest_path)
        except (OSError, ValueError) as err:  # pyarrow's ArrowInvalid is a ValueError
            if isinstance(err, FileNotFoundError | PermissionError):
                raise
            raise CorruptStoreError(manifest_path, str(err).splitlines()[0]) from err
        self._index(manifest, int(self.meta["image_size"]))
        self._check_shards()

    @classmethod
    def from_manifest(
        cls, root: str | Path, manifest: pd.DataFrame, image_size: int
    ) -> PreparedStore:
        """Read access to shards through a manifest not yet written (used while preparing)."""
        store = cls.__new__(cls)
        store.root = Path(root)
        store.meta = {"image_size": image_size}
        store._index(manifest, image_size)
        return store

    def _index(self, manifest: pd.DataFrame, image_size: int) -> None:
        self.manifest = manifest
        self.image_size = image_size
        self.shard_names: list[str] = sorted(manifest["shard"].unique().tolist())
        shard_index = {name: i for i, name in enumerate(self.shard_names)}
        self._shard_of = manifest["shard"].map(shard_index).to_numpy(np.int64)
        self._offset = manifest["offset"].to_numpy(np.int64)
        self._images: list[np.ndarray | None] = [None] * len(self.shard_names)
        self._masks: list[np.ndarray | None] = [None] * len(self.shard_names)
        self.has_mask = manifest["has_mask"].to_numpy(bool)

    def _check_shards(self) -> None:
        """Map every image shard (and mask shard) now, in the opening process.

        A truncated shard then fails here with one line naming it, not later inside a
        DataLoader worker ("Caught ValueError in DataLoader worker process 0" + traceback).
        Mapping reads only the .npy headers.
        """
        size = self.image_size
        last = pd.Series(self._offset).groupby(self._shard_of).max()
        masked = pd.Series(self.has_mask).groupby(self._shard_of).any()
        for i, name in enumerate(self.shard_names):
            for kind in ("images", "masks"):
                if kind == "masks" and not masked.get(i, False):
                    continue
                path = self.root / "shards" / f"{name}.{kind}.npy"
                if not path.is_file():
                    raise CorruptStoreError(path, "file missing")
                arr = open_npy(path)
                if arr.ndim != 3 or arr.shape[1:] != (size, size) or arr.shape[0] <= last[i]:
                    raise CorruptStoreError(
                        path, f"shape {arr.shape} does not hold the manifest's rows"
                    )
                (self._images if kind == "images" else self._masks)[i] = arr

    def __len__(self) -> int:
        return len(self.manifest)

    @property
    def fingerprint(self) -> str:
        return str(self.meta["fingerprint"])

    @property
    def test_only_sources(self) -> list[str]:
        """Sources prepared as external test sets (``split.test_only``)."""
        split = (self.meta.get("prepare_config") or {}).get("split") or {}
        return [str(s) for s in split.get("test_only") or []]

    def trainable(self, rows: np.ndarray) -> np.ndarray:
        """``rows`` without external test rows: rows of a test-only source or of a patient
        group holding one (a duplicate). Training, selection and pretraining call this, so an
        external test set never reaches them whatever splits are asked for."""
        rows = np.asarray(rows, dtype=np.int64)
        external = self.test_only_sources
        if not external or not len(rows):
            return rows
        m = self.manifest
        groups = m.loc[m["source"].astype(str).isin(external), "group"].unique()
        return rows[~m["group"].iloc[rows].isin(groups).to_numpy()]

    def _shard(self, i: int, kind: str) -> np.ndarray | None:
        cache = self._images if kind == "images" else self._masks
        arr = cache[i]
        if arr is None:
            path = self.root / "shards" / f"{self.shard_names[i]}.{kind}.npy"
            if not path.is_file():
                return None
            arr = open_npy(path)
            cache[i] = arr
        return arr

    def _gather(self, idx: Sequence[int] | np.ndarray, kind: str) -> np.ndarray:
        idx = np.asarray(idx, dtype=np.int64)
        size = self.image_size
        out = np.zeros((len(idx), size, size), dtype=np.uint8)
        if len(idx) == 0:
            return out
        shards = self._shard_of[idx]
        offsets = self._offset[idx]
        # Group by shard so each shard is touched once; fancy indexing on a memmap copies the
        # selected rows straight into a new array.
        order = np.argsort(shards, kind="stable")
        bounds = np.flatnonzero(np.diff(shards[order])) + 1
        for group in np.split(order, bounds):
            shard_arr = self._shard(int(shards[group[0]]), kind)
            if shard_arr is None:
                continue  # masks of a chunk without any mask: zeros
            rows = offsets[group]
            sort = np.argsort(rows)
            out[group[sort]] = shard_arr[rows[sort]]
        return out

    def images(self, idx: Sequence[int] | np.ndarray) -> np.ndarray:
        """uint8 [n, S, S] images of the given manifest rows (higher = more attenuation)."""
        return self._gather(idx, "images")

    def masks(self, idx: Sequence[int] | np.ndarray) -> np.ndarray:
        """uint8 [n, S, S] lung masks (0/1) of the given rows; zeros where a row has no mask."""
        return self._gather(idx, "masks")

    def indices(
        self,
        split: str | Sequence[str] | None = None,
        *,
        source: str | Sequence[str] | None = None,
        labelled: bool = False,
        with_mask: bool = False,
    ) -> np.ndarray:
        """Row indices selected by split / source / label / mask availability."""
        keep = np.ones(len(self.manifest), dtype=bool)
        for column, wanted in (("split", split), ("source", source)):
            if wanted is not None:
                values = [wanted] if isinstance(wanted, str) else list(wanted)
                keep &= self.manifest[column].isin(values).to_numpy()
        if labelled:
            keep &= self.manifest["label"].notna().to_numpy()
        if with_mask:
            keep &= self.has_mask
        return np.flatnonzero(keep)
