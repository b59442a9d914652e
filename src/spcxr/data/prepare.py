"""``spcxr prepare``: raw datasets -> a prepared store (see :mod:`spcxr.data.store`).

The work list is every record of every source, in the sources' deterministic order, cut into
chunks of ``chunk_size`` records. Worker processes (all cores) read, resize and hash images; the
main process writes each finished chunk as one shard (images, masks, rows, errors), atomically,
the rows file last. A second run skips every chunk whose rows file exists with the same content
key, so an interrupted run resumes where it stopped, and naming a new source adds it to the
store. Finally the whole store is deduplicated, grouped by patient, split, checked for leakage
and summarised in a report (:mod:`spcxr.data.prepare_report`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing as mp
import os
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import imagehash
import numpy as np
import pandas as pd
from PIL import Image
from tqdm.auto import tqdm

from spcxr import __version__
from spcxr.atomic import atomic_path, atomic_write_text
from spcxr.data.dedup import DedupConfig, find_duplicates
from spcxr.data.prepare_report import build_report, render_report
from spcxr.data.records import Record, Skip
from spcxr.data.splits import SplitConfig, assign_splits, check_leakage, patient_groups
from spcxr.data.store import (
    STORE_FORMAT,
    STORE_VERSION,
    PreparedStore,
    atomic_save_npy,
    atomic_write_parquet,
    open_npy,
)
from spcxr.errors import RunFailed, UsageError
from spcxr.io import DEFAULT_MAX_PIXELS, DicomOptions, ImageReadError, read_image, read_mask
from spcxr.versions import library_versions

log = logging.getLogger(__name__)

ERROR_COLUMNS = ["path", "source", "stage", "reason"]
#: Columns of every manifest row written by :func:`process_record` (the split settings may
#: stratify on any of them).
ROW_COLUMNS = (
    "image_path",
    "source",
    "site",
    "patient_id",
    "label",
    "sublabel",
    "findings",
    "view",
    "sex",
    "age",
    "official_split",
    "mask_paths",
    "has_mask",
    "format",
    "orig_height",
    "orig_width",
    "bits_stored",
    "photometric",
    "windowing",
    "box_top",
    "box_left",
    "box_height",
    "box_width",
    "pixel_hash",
    "phash",
    "extra",
)
#: Smallest ``--image-size``: below it nothing of a radiograph is left to learn from.
MIN_IMAGE_SIZE = 16
DECODING_PACKAGES = (
    "numpy",
    "pillow",
    "pydicom",
    "pylibjpeg",
    "pylibjpeg-openjpeg",
    "pylibjpeg-libjpeg",
    "tifffile",
    "imagehash",
)


@dataclass
class PrepareConfig:
    """Settings of ``spcxr prepare`` (every field is also a CLI flag and a YAML key).

    Attributes:
        sources: source specs ``[NAME=][TYPE:]PATH`` (type auto-detected when omitted).
        out: the store folder.
        image_size: side of the stored square images; the aspect ratio is kept and the short
            side padded with 0 (no attenuation). 256 leaves room for random crops to 224.
        chunk_size: records per shard (the unit of resumption).
        workers: worker processes (0 = all cores).
        strict: fail (exit status 1) when any input was skipped, after writing the report.
        overwrite: delete an existing store first.
        options: source options ``key=value`` (all sources) or ``NAME.key=value`` (one source).
        dicom_windowing: DICOM VOI handling (see :class:`spcxr.io.DicomOptions`).
        dicom_percentiles: robust window percentiles when the header has no VOI.
        max_pixels: refuse an image whose header declares more pixels (an errors.csv row,
            stage ``read``), before decoding it: one 13,000 x 13,000 16-bit PNG would take
            several GB per worker. 0: no limit.
        split: patient-level split settings.
        dedup: duplicate detection settings.
        progress: show a progress bar.
    """

    sources: list[str] = field(default_factory=list)
    out: str = "store"
    image_size: int = 256
    chunk_size: int = 1024
    workers: int = 0
    strict: bool = False
    overwrite: bool = False
    options: list[str] = field(default_factory=list)
    dicom_windowing: str = "auto"
    dicom_percentiles: tuple[float, float] = (0.5, 99.5)
    max_pixels: int = DEFAULT_MAX_PIXELS
    split: SplitConfig = field(default_factory=SplitConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    progress: bool = True

    def __post_init__(self) -> None:
        if self.image_size < MIN_IMAGE_SIZE:
            raise UsageError(f"--image-size must be >= {MIN_IMAGE_SIZE}, got {self.image_size}")
        if self.chunk_size < 1:
            raise UsageError(f"--chunk-size must be >= 1, got {self.chunk_size}")
        if self.workers < 0:
            raise UsageError(f"--workers must be >= 0 (0: all cores), got {self.workers}")
        if self.max_pixels < 0:
            raise UsageError(f"--max-pixels must be >= 0 (0: no limit), got {self.max_pixels}")
        stratify = self.split.stratify
        if stratify is not None and stratify not in ROW_COLUMNS:
            raise UsageError(
                f"--split-stratify: no manifest column {stratify!r}; columns: "
                f"{', '.join(ROW_COLUMNS)} (or none)"
            )


@dataclass
class PrepareResult:
    """What a prepare run did."""

    store: Path
    n_images: int
    n_processed: int
    n_resumed_chunks: int
    n_errors: int
    n_duplicate_pairs: int
    seconds: float
    seconds_images: float
    report: dict[str, Any]


# ---------------------------------------------------------------------------------------------
# per-image work (runs in worker processes)


def fit_square(pixels: np.ndarray, size: int) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """Resize ``pixels`` (float [H, W] in [0, 1]) into a ``size`` square, aspect kept, padded.

    Pillow's resampling filters widen with the scale factor, so downscaling is antialiased.

    Returns:
        (uint8 [size, size], (top, left, height, width) of the content inside the square).
    """
    h, w = pixels.shape
    scale = size / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    image = Image.fromarray(np.ascontiguousarray(pixels, dtype=np.float32), mode="F")
    if (nh, nw) != (h, w):
        image = image.resize((nw, nh), Image.Resampling.BILINEAR)
    resized = np.asarray(image, dtype=np.float32)
    out = np.zeros((size, size), dtype=np.uint8)
    top, left = (size - nh) // 2, (size - nw) // 2
    out[top : top + nh, left : left + nw] = np.clip(resized * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return out, (top, left, nh, nw)


def fit_mask(mask: np.ndarray, size: int, box: tuple[int, int, int, int]) -> np.ndarray:
    """Resize a bool mask with the same geometry as its image (bilinear, threshold 0.5)."""
    top, left, nh, nw = box
    image = Image.fromarray(mask.astype(np.uint8) * 255)
    if image.size != (nw, nh):
        image = image.resize((nw, nh), Image.Resampling.BILINEAR)
    out = np.zeros((size, size), dtype=np.uint8)
    out[top : top + nh, left : left + nw] = np.asarray(image) >= 128
    return out


def pixel_hash(pixels: np.ndarray) -> str:
    """Hash of the native pixels (quantised to 16 bits, with the shape): equal = same image."""
    quantised = np.round(pixels * 65535.0).astype(np.uint16)
    h = hashlib.blake2b(digest_size=16)
    h.update(np.asarray(quantised.shape, dtype=np.int64).tobytes())
    h.update(quantised.tobytes())
    return h.hexdigest()


def perceptual_hash(image_u8: np.ndarray, box: tuple[int, int, int, int]) -> int:
    """64-bit DCT perceptual hash (imagehash.phash) of the image content, as a signed int64."""
    top, left, nh, nw = box
    content = Image.fromarray(image_u8[top : top + nh, left : left + nw])
    bits = imagehash.phash(content).hash.ravel()
    value = int("".join("1" if b else "0" for b in bits), 2)
    return int(np.array([value], dtype=np.uint64).view(np.int64)[0])


_WORKER: dict[str, Any] = {}


def _init_worker(size: int, dicom: DicomOptions, max_pixels: int | None) -> None:
    _WORKER["size"] = size
    _WORKER["dicom"] = dicom
    _WORKER["max_pixels"] = max_pixels


def process_record(
    record: Record, size: int, dicom: DicomOptions, max_pixels: int | None = None
) -> tuple[dict[str, Any], np.ndarray, np.ndarray | None] | Skip:
    """Read one record's image (+ masks) and turn it into a manifest row and store arrays.

    ``max_pixels`` refuses images (and masks) by their header size, before decoding.
    """
    try:
        loaded = read_image(record.image_path, dicom=dicom, max_pixels=max_pixels)
    except ImageReadError as e:
        return Skip(record.image_path, record.source, f"read: {e.reason}")
    except Exception as e:  # a decoder bug must not stop a million-image batch
        return Skip(record.image_path, record.source, f"read: {type(e).__name__}: {e}")
    pixels = loaded.pixels
    if pixels.ndim != 2 or min(pixels.shape) < 8:
        return Skip(record.image_path, record.source, f"read: unusable image shape {pixels.shape}")
    mask = None
    for mask_path in record.mask_paths:
        try:
            part = read_mask(mask_path, shape=pixels.shape, max_pixels=max_pixels)
        except ImageReadError as e:
            return Skip(record.image_path, record.source, f"mask: {e}")
        mask = part if mask is None else (mask | part)
    image_u8, box = fit_square(pixels, size)
    mask_u8 = fit_mask(mask, size, box) if mask is not None else None
    meta = loaded.meta
    patient_id = str(record.patient_id)
    extra = dict(record.extra)
    if extra.get("patient_id_inferred") and meta.get("patient_id"):
        # The listing had no patient id (it used the file name); the DICOM header has one.
        patient_id = str(meta["patient_id"])
        extra["patient_id_inferred"] = "dicom"
    row = {
        "image_path": record.image_path,
        "source": record.source,
        "site": record.site,
        "patient_id": patient_id,
        "label": record.label,
        "sublabel": record.sublabel,
        "findings": json.dumps(record.findings, sort_keys=True) if record.findings else None,
        "view": record.view or meta.get("view"),
        "sex": record.sex or meta.get("sex"),
        "age": record.age if record.age is not None else meta.get("age"),
        "official_split": record.official_split,
        "mask_paths": ";".join(record.mask_paths) if record.mask_paths else None,
        "has_mask": mask is not None,
        "format": meta.get("format"),
        "orig_height": int(pixels.shape[0]),
        "orig_width": int(pixels.shape[1]),
        "bits_stored": meta.get("bits_stored"),
        "photometric": meta.get("photometric"),
        "windowing": meta.get("windowing"),
        "box_top": box[0],
        "box_left": box[1],
        "box_height": box[2],
        "box_width": box[3],
        "pixel_hash": pixel_hash(pixels),
        "phash": perceptual_hash(image_u8, box),
        "extra": json.dumps(extra, sort_keys=True, default=str) if extra else None,
    }
    return row, image_u8, mask_u8


def _work(record: Record):
    return process_record(record, _WORKER["size"], _WORKER["dicom"], _WORKER["max_pixels"])


# ---------------------------------------------------------------------------------------------
# chunks, resumption


@dataclass
class Chunk:
    """A slice of one source's records: the unit written as a shard and resumed."""

    name: str
    source: str
    records: list[Record]

    def key(self, size: int, dicom: DicomOptions, max_pixels: int = DEFAULT_MAX_PIXELS) -> str:
        """Content key: changes if the records or the per-image settings change."""
        h = hashlib.blake2b(digest_size=12)
        h.update(f"{STORE_VERSION};{size};{asdict(dicom)}".encode())
        if max_pixels != DEFAULT_MAX_PIXELS:  # keys of stores made before the limit still hold
            h.update(f";max_pixels={max_pixels}".encode())
        for r in self.records:
            h.update(json.dumps(asdict(r), sort_keys=True, default=str).encode())
        return h.hexdigest()


def make_chunks(source: str, records: list[Record], chunk_size: int) -> list[Chunk]:
    return [
        Chunk(f"{source}-{i // chunk_size:05d}", source, records[i : i + chunk_size])
        for i in range(0, len(records), chunk_size)
    ]


def _chunk_done(shards: Path, chunk: Chunk, key: str) -> bool:
    """True if the chunk's rows file has ``key`` and its image / mask shards are intact (a
    truncated shard, e.g. from a partial copy, makes the chunk run again)."""
    path = shards / f"{chunk.name}.parquet"
    if not path.is_file():
        return False
    import pyarrow.parquet as pq

    try:
        stored = (pq.read_schema(path).metadata or {}).get(b"spcxr_chunk_key", b"").decode()
        n_rows = pq.read_metadata(path).num_rows
    except (OSError, ValueError):  # an unreadable rows file: redo the chunk
        return False
    if stored != key:
        return False
    for kind in ("images", "masks"):
        array_path = shards / f"{chunk.name}.{kind}.npy"
        if kind == "masks" and not array_path.is_file():
            continue
        try:
            if open_npy(array_path).shape[0] != n_rows:
                return False
        except (OSError, ValueError):
            return False
    return True


def _write_chunk(
    shards: Path,
    chunk: Chunk,
    key: str,
    results: list[tuple[dict[str, Any], np.ndarray, np.ndarray | None] | Skip],
    size: int,
) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    good = [r for r in results if not isinstance(r, Skip)]
    skips = [r for r in results if isinstance(r, Skip)]
    images = np.stack([g[1] for g in good]) if good else np.zeros((0, size, size), np.uint8)
    atomic_save_npy(shards / f"{chunk.name}.images.npy", images)
    if any(g[2] is not None for g in good):
        masks = np.stack(
            [g[2] if g[2] is not None else np.zeros((size, size), np.uint8) for g in good]
        )
        atomic_save_npy(shards / f"{chunk.name}.masks.npy", masks)
    errors = pd.DataFrame(
        [(s.path, s.source, s.reason.split(":", 1)[0], s.reason) for s in skips],
        columns=ERROR_COLUMNS,
    )
    atomic_write_text(shards / f"{chunk.name}.errors.csv", errors.to_csv(index=False))
    rows = pd.DataFrame([g[0] for g in good])
    if len(rows):
        rows["shard"] = chunk.name
        rows["offset"] = np.arange(len(rows), dtype=np.int64)
    table = pa.Table.from_pandas(rows, preserve_index=False)
    table = table.replace_schema_metadata(
        {**(table.schema.metadata or {}), b"spcxr_chunk_key": key.encode()}
    )
    rows_path = shards / f"{chunk.name}.parquet"
    with atomic_path(rows_path) as tmp:  # last: marks the chunk done
        pq.write_table(table, tmp)


# ---------------------------------------------------------------------------------------------
# the run


def _option_key(pair: str) -> tuple[str | None, str]:
    """``"NAME.key=value"`` -> ``("NAME", "key")``, ``"key=value"`` -> ``(None, "key")``.

    Raises:
        UsageError: naming ``--options`` for a pair without ``=`` or with an empty key.
    """
    key, sep, _ = pair.partition("=")
    prefix, dot, rest = key.partition(".")
    name, key = (prefix.strip(), rest) if dot else (None, key)
    key = key.strip().replace("-", "_")
    if not sep or not key or name == "":
        raise UsageError(f"--options {pair!r}: expected KEY=VALUE or NAME.KEY=VALUE")
    return name, key


def check_options(options: list[str], accepted: dict[str, set[str]]) -> None:
    """Refuse an ``--options`` pair that no named source would use.

    An unprefixed key must be an option of at least one source; ``NAME.key`` needs a source
    called ``NAME`` that has option ``key``. Silently dropping a misspelt option would run the
    whole preparation with the default instead.

    Args:
        options: the ``--options`` pairs.
        accepted: source name -> the option names its adapter knows.
    """
    known = sorted(set().union(*accepted.values())) if accepted else []
    for pair in options:
        name, key = _option_key(pair)
        if name is None and key not in known:
            raise UsageError(
                f"--options {pair!r}: no source has option {key!r}; known options: "
                f"{', '.join(known)}"
            )
        if name is not None and name not in accepted:
            raise UsageError(
                f"--options {pair!r}: no source is called {name!r}; sources: "
                f"{', '.join(sorted(accepted))}"
            )
        if name is not None and key not in accepted[name]:
            raise UsageError(
                f"--options {pair!r}: source {name!r} has no option {key!r}; its options: "
                f"{', '.join(sorted(accepted[name]))}"
            )


def _source_options(config: PrepareConfig, name: str, accepted: set[str]) -> dict[str, Any]:
    """Options for source ``name``: ``NAME.key=value`` pairs, plus the unprefixed pairs that this
    adapter accepts (an option meant for another layout is not an error here)."""
    from spcxr.data.sources import parse_options

    shared, own = [], []
    for pair in config.options:
        prefix, key = _option_key(pair)
        if prefix is not None:
            if prefix == name:
                own.append(pair.split(".", 1)[1])
        elif key in accepted:
            shared.append(pair)
    try:
        return {**parse_options(shared), **parse_options(own)}
    except ValueError as err:
        raise UsageError(f"--options: {err}") from err


def _split_spec(spec: str) -> tuple[str | None, str]:
    """``NAME=REST`` -> (NAME, REST); a ``=`` inside a path does not count."""
    head, sep, rest = spec.partition("=")
    if sep and head and "/" not in head and ":" not in head:
        return head, rest
    return None, spec


def list_records(
    config: PrepareConfig,
) -> tuple[dict[str, list[Record]], dict[str, list[Skip]], dict[str, str]]:
    """Run every source adapter: records and listing skips per source name, and each spec."""
    from spcxr.data.sources import open_source

    records: dict[str, list[Record]] = {}
    skips: dict[str, list[Skip]] = {}
    specs: dict[str, str] = {}
    opened = []
    accepted: dict[str, set[str]] = {}
    for spec in config.sources:
        name, rest = _split_spec(spec)
        named = {"source_name": name} if name else {}
        adapter = open_source(rest, **named)
        if adapter.source in accepted:
            raise UsageError(
                f"two sources are both called {adapter.source!r}; name them: NAME={spec}"
            )
        accepted[adapter.source] = set(adapter._common_defaults) | set(adapter.defaults)
        opened.append((spec, rest, named, adapter))
    check_options(config.options, accepted)
    for spec, rest, named, adapter in opened:
        source_name = adapter.source
        options = _source_options(config, source_name, accepted[source_name])
        if options:
            adapter = open_source(rest, **named, **options)
        records[source_name], skips[source_name] = [], []
        for item in adapter.records():
            (skips if isinstance(item, Skip) else records)[source_name].append(item)
            if isinstance(item, Record):
                skips[source_name] += _missing_mask_rows(item)
        specs[source_name] = spec
    return records, skips, specs


def _missing_mask_rows(record: Record) -> list[Skip]:
    """One errors.csv row (stage ``mask``) per mask file a listing named but could not find.

    The image itself is kept, without that mask: it still serves classification and
    pretraining, and ``has_mask`` keeps it out of segmentation when it has no mask at all.
    """
    return [
        Skip(
            path, record.source, f"mask: file not found; image {record.image_path} kept without it"
        )
        for path in record.extra.get("missing_masks", [])
    ]


def _listing_stage(reason: str) -> str:
    return "mask" if reason.startswith("mask:") else "list"


def prepare(config: PrepareConfig) -> PrepareResult:
    """Build or extend a prepared store (resumable; see the module docstring)."""
    start = time.perf_counter()
    root = Path(config.out)
    if root.exists() and not root.is_dir():
        raise UsageError(f"--out {root}: exists and is not a folder; name a (new) store folder")
    if not config.sources:
        raise UsageError("prepare: name at least one SOURCE ([NAME=][TYPE:]PATH)")
    try:
        dicom = DicomOptions(
            windowing=config.dicom_windowing, percentiles=tuple(config.dicom_percentiles)
        )
    except ValueError as err:
        raise UsageError(f"--dicom-windowing / --dicom-percentiles: {err}") from err
    # Listing first: a bad source or --options value is refused before anything is written.
    records, listing_skips, specs = list_records(config)
    if config.overwrite and root.exists():
        import shutil

        shutil.rmtree(root)
    shards = root / "shards"
    shards.mkdir(parents=True, exist_ok=True)
    meta_path = root / "store.json"
    meta: dict[str, Any] = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    if meta and int(meta.get("image_size", config.image_size)) != config.image_size:
        raise UsageError(
            f"{root}: store has image size {meta['image_size']}, asked for --image-size "
            f"{config.image_size}; use another --out or --overwrite"
        )

    sources_meta: dict[str, Any] = dict(meta.get("sources", {}))
    all_chunks: list[tuple[Chunk, str]] = []
    for name, recs in records.items():
        chunks = make_chunks(name, recs, config.chunk_size)
        sources_meta[name] = {
            "spec": specs[name],
            "chunks": [c.name for c in chunks],
            "records": len(recs),
        }
        errors = pd.DataFrame(
            [(s.path, s.source, _listing_stage(s.reason), s.reason) for s in listing_skips[name]],
            columns=ERROR_COLUMNS,
        )
        atomic_write_text(shards / f"{name}.listing-errors.csv", errors.to_csv(index=False))
        all_chunks += [(c, c.key(config.image_size, dicom, config.max_pixels)) for c in chunks]
    meta.update(
        format=STORE_FORMAT,
        version=STORE_VERSION,
        image_size=config.image_size,
        sources=sources_meta,
        spcxr_version=__version__,
    )
    meta.pop("fingerprint", None)  # not final until the manifest is rewritten
    atomic_write_text(meta_path, json.dumps(meta, indent=2, default=str))

    pending = [(c, k) for c, k in all_chunks if not _chunk_done(shards, c, k)]
    n_resumed = len(all_chunks) - len(pending)
    n_todo = sum(len(c.records) for c, _ in pending)
    if n_resumed:
        log.info("resuming: %d of %d chunks already done", n_resumed, len(all_chunks))
    images_start = time.perf_counter()
    _run_chunks(pending, shards, config, dicom, n_todo)
    seconds_images = time.perf_counter() - images_start

    result_report = finalize(root, config)
    n_errors = result_report["errors"]["total"]
    result = PrepareResult(
        store=root,
        n_images=result_report["images"],
        n_processed=n_todo,
        n_resumed_chunks=n_resumed,
        n_errors=n_errors,
        n_duplicate_pairs=result_report["duplicates"]["pairs"],
        seconds=time.perf_counter() - start,
        seconds_images=seconds_images,
        report=result_report,
    )
    return result


def _run_chunks(
    pending: list[tuple[Chunk, str]],
    shards: Path,
    config: PrepareConfig,
    dicom: DicomOptions,
    n_todo: int,
) -> None:
    if not pending:
        return
    workers = config.workers or os.cpu_count() or 1
    max_pixels = config.max_pixels or None
    flat: Iterable[Record] = (r for c, _ in pending for r in c.records)
    bar = tqdm(
        total=n_todo, desc="prepare", unit="img", disable=not config.progress, smoothing=0.05
    )
    chunk_iter = iter(pending)
    chunk, key = next(chunk_iter)
    results: list = []

    def consume(result) -> None:
        nonlocal chunk, key, results
        results.append(result)
        bar.update(1)
        while chunk is not None and len(results) == len(chunk.records):
            _write_chunk(shards, chunk, key, results, config.image_size)
            results = []
            chunk, key = next(chunk_iter, (None, None))

    if workers == 1:
        _init_worker(config.image_size, dicom, max_pixels)
        for record in flat:
            consume(_work(record))
    else:
        ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context()
        with ctx.Pool(
            workers, initializer=_init_worker, initargs=(config.image_size, dicom, max_pixels)
        ) as pool:
            for result in pool.imap(_work, flat, chunksize=8):
                consume(result)
    bar.close()


def finalize(root: Path, config: PrepareConfig) -> dict[str, Any]:
    """Merge shards, deduplicate, group, split, check leakage, write manifest and report."""
    shards = root / "shards"
    meta = json.loads((root / "store.json").read_text())
    chunk_names = [c for s in meta["sources"].values() for c in s["chunks"]]
    missing = [c for c in chunk_names if not (shards / f"{c}.parquet").is_file()]
    if missing:
        raise RunFailed(f"{root}: chunks not finished: {missing[:5]}; run prepare again")
    parts = [pd.read_parquet(shards / f"{c}.parquet") for c in chunk_names]
    manifest = (
        pd.concat([p for p in parts if len(p)], ignore_index=True)
        if any(len(p) for p in parts)
        else pd.DataFrame()
    )
    errors = pd.concat(
        [pd.read_csv(shards / f"{c}.errors.csv", dtype=str) for c in chunk_names]
        + [pd.read_csv(shards / f"{s}.listing-errors.csv", dtype=str) for s in meta["sources"]],
        ignore_index=True,
    )
    if manifest.empty:
        atomic_errors = root / "errors.csv"
        atomic_write_text(atomic_errors, errors.to_csv(index=False))
        raise RunFailed(
            f"{root}: no image could be prepared ({len(errors)} skipped; see {atomic_errors})"
        )

    manifest["index"] = np.arange(len(manifest), dtype=np.int64)
    reader = PreparedStore.from_manifest(root, manifest, int(meta["image_size"]))
    pairs, dup_group, dedup_notes = find_duplicates(manifest, reader.images, config.dedup)
    manifest["dup_group"] = dup_group
    groups = patient_groups(manifest, dup_group)
    manifest["group"] = groups
    split, fold, split_notes = assign_splits(manifest, groups, config.split)
    manifest["split"] = split
    manifest["fold"] = fold
    check_leakage(manifest)

    atomic_write_parquet(root / "manifest.parquet", manifest)
    atomic_write_text(root / "errors.csv", errors.to_csv(index=False))
    dup_table = _describe_pairs(pairs, manifest)
    atomic_write_text(root / "duplicates.csv", dup_table.to_csv(index=False))
    report = build_report(
        manifest, errors, dup_table, dedup_notes + split_notes, meta, Path(config.out), config.split
    )
    meta["fingerprint"] = report["fingerprint"]
    meta["prepare_config"] = json.loads(json.dumps(asdict(config), default=str))
    # The libraries that decode and resize images decide the stored pixels.
    meta["versions"] = library_versions(*DECODING_PACKAGES)
    atomic_write_text(root / "store.json", json.dumps(meta, indent=2, default=str))
    atomic_write_text(root / "report.json", json.dumps(report, indent=2, default=str))
    atomic_write_text(root / "report.md", render_report(report))
    return report


def _describe_pairs(pairs: pd.DataFrame, manifest: pd.DataFrame) -> pd.DataFrame:
    cols = ["image_path", "source", "patient_id", "label"]
    a = manifest.loc[pairs["a"].to_numpy(), cols].reset_index(drop=True).add_suffix("_a")
    b = manifest.loc[pairs["b"].to_numpy(), cols].reset_index(drop=True).add_suffix("_b")
    out = pd.concat([pairs.reset_index(drop=True), a, b], axis=1)
    out["same_patient"] = (out["source_a"] + ":" + out["patient_id_a"]) == (
        out["source_b"] + ":" + out["patient_id_b"]
    )
    return out
