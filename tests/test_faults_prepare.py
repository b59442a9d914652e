"""Fault injection for ``spcxr prepare``, the image readers, the store and ``spcxr predict``.

Every fault must end as one line naming the file or the flag (exit status 2 for a usage
error, 1 for a failed run), or as an errors.csv / error row while a batch runs on; nothing torn
and no orphan temporary file. Tests run as root in CI, where ``chmod`` does not bite: the real
permission cases skip there, and a monkeypatched twin of each always runs.
"""

from __future__ import annotations

import errno
import logging
import os
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from tests.conftest import console_script, write_smooth_images
from tests.data.sources.layouts import write_csv, write_dicom
from tests.inference.test_predict import make_class_run

import spcxr
from spcxr.cli import main
from spcxr.data.loader import StoreBatches
from spcxr.data.prepare import ROW_COLUMNS, PrepareConfig, prepare, process_record
from spcxr.data.records import Record
from spcxr.data.store import CorruptStoreError, PreparedStore
from spcxr.errors import UsageError
from spcxr.io import DicomOptions, ImageTooLargeError, read_image

AS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
ROOT_SKIP = pytest.mark.skipif(AS_ROOT, reason="runs as root: chmod does not restrict root")


# ---------------------------------------------------------------------------------------------
# helpers


def run_cli(argv: list[str], capsys) -> tuple[int, list[str]]:
    """``spcxr.cli.main(argv)``: exit status and the non-empty stderr lines."""
    capsys.readouterr()
    rc = main(argv)
    err = capsys.readouterr().err
    return rc, [line for line in err.splitlines() if line.strip()]


def prepare_argv(sources: list[str], out: Path, *flags: str) -> list[str]:
    return [
        "prepare",
        *sources,
        "--out",
        str(out),
        "--image-size",
        "16",
        "--workers",
        "1",
        "--chunk-size",
        "4",
        "--no-progress",
        *flags,
    ]


def class_folders(root: Path, n_patients: int = 6) -> Path:
    """``root/{normal,abnormal}/personN_K.png``: 32 px smooth images, one per patient."""
    return write_smooth_images(root, n_patients=n_patients, per_patient=1, size=32)


def errors_csv(store: Path) -> pd.DataFrame:
    return pd.read_csv(store / "errors.csv", dtype=str, keep_default_na=False)


def orphans(*folders: Path) -> list[Path]:
    """Temporary files left behind (atomic writes use ``.<name>.<random>.tmp``)."""
    return [p for folder in folders if folder.exists() for p in folder.rglob("*.tmp")]


def assert_one_line(lines: list[str], *needles: str) -> None:
    assert len(lines) == 1, lines
    assert "Traceback" not in lines[0]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def png16(path: Path, shape: tuple[int, int], seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 4096, shape, dtype=np.uint16)).save(path)
    return path


def write_bad_rle_dicom(path: Path, size: int = 16) -> Path:
    """An RLE Lossless DICOM whose segment header is wrong: pydicom's decoder fails (and,
    left alone, logs the failure with its traceback at ERROR level)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.uid import RLELossless, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = RLELossless
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.PatientID = "P1"
    ds.Modality = "CR"
    ds.Rows = ds.Columns = size
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = encapsulate([b"\x05\x00\x00\x00" + b"\xff" * 60])  # 5 segments, not 1
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def deny_scandir(monkeypatch, denied: Path) -> None:
    """``os.scandir(denied)`` raises PermissionError, as for a chmod 000 folder (non-root)."""
    real = os.scandir

    def scandir(path=".", *args, **kwargs):
        if os.path.abspath(os.fspath(path)) == os.path.abspath(denied):
            raise PermissionError(errno.EACCES, "Permission denied", os.fspath(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(os, "scandir", scandir)


# ---------------------------------------------------------------------------------------------
# 1-2: links, unreadable folders, missing masks: errors.csv rows, the batch goes on


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        ("file_loop", "symbolic link loop"),
        ("dir_loop", "symbolic link loop"),
        ("dangling", "dangling symbolic link"),
    ],
)
def test_prepare_records_broken_links_and_strict_counts_them(tmp_path, capsys, make, reason):
    src = class_folders(tmp_path / "images")
    if make == "file_loop":
        bad = src / "normal" / "loop_a.png"
        os.symlink("loop_b.png", bad)
        os.symlink("loop_a.png", src / "normal" / "loop_b.png")
    elif make == "dir_loop":
        bad = src / "d1"
        os.symlink("d2", bad)
        os.symlink("d1", src / "d2")
    else:
        bad = src / "abnormal" / "gone.png"
        os.symlink("never_written.png", bad)
    out = tmp_path / "store"
    rc, lines = run_cli(prepare_argv([f"folder:{src}"], out), capsys)
    assert rc == 0, lines
    errors = errors_csv(out)
    row = errors[errors.path == str(bad)]
    assert len(row) == 1, errors
    assert row.stage.item() == "list" and reason in row.reason.item()
    assert len(PreparedStore(out)) == 6  # every good image was prepared
    rc, lines = run_cli(prepare_argv([f"folder:{src}"], out, "--strict"), capsys)
    assert rc == 1 and any("--strict" in line for line in lines)
    assert not orphans(out)


def test_prepare_records_an_unreadable_class_folder_and_goes_on(tmp_path, capsys, monkeypatch):
    src = class_folders(tmp_path / "images")
    deny_scandir(monkeypatch, src / "abnormal")
    out = tmp_path / "store"
    rc, lines = run_cli(prepare_argv([f"folder:{src}"], out), capsys)
    assert rc == 0, lines
    row = errors_csv(out).set_index("path").loc[str(src / "abnormal")]
    assert row.stage == "list" and row.reason == "cannot list folder: Permission denied"
    store = PreparedStore(out)
    assert sorted(store.manifest.label.unique()) == ["normal"] and len(store) == 3


@ROOT_SKIP
def test_prepare_records_a_chmod_000_class_folder(tmp_path, capsys):
    src = class_folders(tmp_path / "images")
    (src / "abnormal").chmod(0)
    try:
        rc, lines = run_cli(prepare_argv([f"folder:{src}"], tmp_path / "store"), capsys)
    finally:
        (src / "abnormal").chmod(0o755)
    assert rc == 0, lines
    assert str(src / "abnormal") in set(errors_csv(tmp_path / "store").path)


def test_missing_mask_is_a_row_a_report_line_and_strict_counts_it(tmp_path, capsys):
    root = tmp_path / "export"
    rows = []
    for i in range(6):
        name = f"img/p{i}.png"
        Image.fromarray(np.full((32, 32), 40 * i, np.uint8)).save(_mk(root / name))
        mask = f"masks/p{i}.png"
        if i != 2:  # p2's mask is named but never written
            Image.fromarray(np.full((32, 32), 255, np.uint8)).save(_mk(root / mask))
        rows.append([name, f"P{i}", "normal" if i % 2 else "abnormal", mask])
    write_csv(root / "manifest.csv", ["file", "patient_id", "label", "mask_file"], rows)
    out = tmp_path / "store"
    rc, lines = run_cli(prepare_argv([f"csv:{root}"], out), capsys)
    assert rc == 0, lines
    errors = errors_csv(out)
    assert list(errors.path) == [str(root / "masks" / "p2.png")]
    assert errors.stage.item() == "mask"
    assert f"image {root / 'img' / 'p2.png'} kept without it" in errors.reason.item()
    manifest = PreparedStore(out).manifest.set_index("image_path")
    assert len(manifest) == 6  # the image is kept ...
    assert not manifest.loc[str(root / "img" / "p2.png"), "has_mask"]  # ... without a mask
    assert manifest.has_mask.sum() == 5
    report = (out / "report.md").read_text()
    assert "1 skipped: mask 1" in report
    assert "1 mask files named by a listing were not found" in report
    rc, lines = run_cli(prepare_argv([f"csv:{root}"], out, "--strict"), capsys)
    assert rc == 1


def _mk(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


# ---------------------------------------------------------------------------------------------
# 3: output paths, read-only folders, full disks


def test_prepare_out_naming_a_file_is_a_usage_error(tmp_path, capsys):
    src = class_folders(tmp_path / "images")
    target = tmp_path / "store.txt"
    target.write_text("not a folder")
    rc, lines = run_cli(prepare_argv([f"folder:{src}"], target), capsys)
    assert rc == 2
    assert_one_line(lines, "spcxr prepare: error:", "--out", str(target))
    assert target.read_text() == "not a folder"


def _read_only(monkeypatch) -> None:
    """Every atomic write fails as in a read-only folder (root ignores chmod)."""
    import spcxr.atomic

    def create(path):
        raise PermissionError(errno.EACCES, "Permission denied", os.fspath(path.parent))

    monkeypatch.setattr(spcxr.atomic, "_create_temporary", create)


def test_prepare_into_a_read_only_folder_is_one_line(tmp_path, capsys, monkeypatch):
    src = class_folders(tmp_path / "images")
    _read_only(monkeypatch)
    rc, lines = run_cli(prepare_argv([f"folder:{src}"], tmp_path / "store"), capsys)
    assert rc == 2
    assert_one_line(lines, "Permission denied", str(tmp_path / "store"), "choose a folder")


@ROOT_SKIP
def test_prepare_into_a_chmod_read_only_folder_is_one_line(tmp_path, capsys):
    src = class_folders(tmp_path / "images")
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o555)
    try:
        rc, lines = run_cli(prepare_argv([f"folder:{src}"], out / "store"), capsys)
    finally:
        out.chmod(0o755)
    assert rc == 2
    assert_one_line(lines, "Permission denied")


def _full_disk_on(monkeypatch, target: str, where: str) -> None:
    """The write of the file whose name contains ``target`` fails halfway with ENOSPC, the way
    numpy (no errno, no file name) or pyarrow report it."""
    import pyarrow.parquet as pq

    if where == "npy":
        real = np.save

        def save(f, array, **kwargs):
            if target in f.handle.name:
                f.write(b"\x93NUMPY" + b"\0" * 100)
                raise OSError("131072 requested and 102272 written")  # numpy's short write
            return real(f, array, **kwargs)

        monkeypatch.setattr(np, "save", save)
    else:
        real_write = pq.write_table

        def write_table(table, path, *args, **kwargs):
            if target in str(path):
                Path(path).write_bytes(b"PAR1")
                raise OSError(errno.ENOSPC, "No space left on device")
            return real_write(table, path, *args, **kwargs)

        monkeypatch.setattr(pq, "write_table", write_table)


@pytest.mark.parametrize(
    ("where", "file", "text"),
    [
        ("npy", "images-00001.images.npy", "131072 requested and 102272 written"),
        ("parquet", "images-00001.parquet", "No space left on device"),
    ],
)
def test_prepare_on_a_full_disk_fails_in_one_line_and_resumes_exactly(
    tmp_path, capsys, monkeypatch, where, file, text
):
    src = class_folders(tmp_path / "images", n_patients=10)  # chunks of 4: 3 chunks
    reference = tmp_path / "reference"
    assert run_cli(prepare_argv([f"folder:{src}"], reference), capsys)[0] == 0

    out = tmp_path / "store"
    with monkeypatch.context() as patch:
        _full_disk_on(patch, file, where)
        rc, lines = run_cli(prepare_argv([f"folder:{src}"], out), capsys)
    assert rc == 1
    assert_one_line(lines, "spcxr prepare: failed:", text, str(out / "shards" / file))
    assert not orphans(out)
    assert not (out / "shards" / file).exists()
    rc, lines = run_cli(prepare_argv([f"folder:{src}"], out), capsys)
    assert rc == 0, lines
    done = PreparedStore(out)
    ref = PreparedStore(reference)
    assert done.fingerprint == ref.fingerprint
    assert np.array_equal(done.images(np.arange(len(done))), ref.images(np.arange(len(ref))))
    assert not orphans(out)


def run_synth(argv: list[str], capsys) -> tuple[int, list[str]]:
    """:func:`run_cli` without synth's progress-bar lines."""
    rc, lines = run_cli(argv, capsys)
    return rc, [line for line in lines if not line.startswith("synthetic:")]


def test_synth_on_a_full_disk_or_read_only_folder_is_one_line(tmp_path, capsys, monkeypatch):
    out = tmp_path / "synthetic"
    argv = ["synth", "--out", str(out), "--n-patients", "4", "--size", "32"]
    with monkeypatch.context() as patch:
        real_save = Image.Image.save
        masks_saved = []

        def save(self, fp, *args, **kwargs):
            if Path(str(fp)).parent.name == "masks":
                masks_saved.append(fp)
                if len(masks_saved) == 3:
                    raise OSError(errno.ENOSPC, "No space left on device")
            return real_save(self, fp, *args, **kwargs)

        patch.setattr(Image.Image, "save", save)
        rc, lines = run_synth(argv, capsys)
    assert rc == 1
    assert_one_line(lines, "No space left on device", str(out / "masks"), "run the same command")
    assert not orphans(out) and not (out / "manifest.csv").exists()

    import spcxr.data.synthetic.dataset as synthetic

    class FullWriter:
        def __init__(self, handle, **kwargs):
            self.handle = handle

        def writerow(self, row):
            self.handle.write(",".join(map(str, row)) + "\n")

        def writerows(self, rows):
            raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(synthetic.csv, "writer", FullWriter)
        rc, lines = run_synth(argv, capsys)
    assert rc == 1
    assert_one_line(lines, "No space left on device", str(out / "manifest.csv"))
    assert not orphans(out) and not (out / "manifest.csv").exists()

    with monkeypatch.context() as patch:

        def denied(self, fp, *args, **kwargs):
            raise PermissionError(errno.EACCES, "Permission denied", str(fp))

        patch.setattr(Image.Image, "save", denied)
        rc, lines = run_synth(argv, capsys)
    assert rc == 2
    assert_one_line(lines, "Permission denied", str(out))


# ---------------------------------------------------------------------------------------------
# 4: flag validation: exit 2, one line naming the flag, nothing written


@pytest.mark.parametrize(
    ("flags", "needles"),
    [
        (["--image-size", "0"], ["--image-size must be >= 16, got 0"]),
        (["--image-size", "-5"], ["--image-size must be >= 16, got -5"]),
        (["--image-size", "8"], ["--image-size must be >= 16, got 8"]),
        (["--chunk-size", "0"], ["--chunk-size must be >= 1, got 0"]),
        (["--workers", "-3"], ["--workers must be >= 0", "got -3"]),
        (["--max-pixels", "-1"], ["--max-pixels must be >= 0"]),
        (["--split-fractions", "0.5", "0.5", "0.5"], ["--split-fractions 0.5 0.5 0.5 sum to 1.5"]),
        (["--split-fractions", "0.7", "0.2", "-0.1"], ["--split-fractions must be 3 non-neg"]),
        (["--split-n-folds", "-1"], ["--split-n-folds must be 0 (off) or >= 2, got -1"]),
        (["--split-stratify", "lable"], ["--split-stratify: no manifest column 'lable'", "label"]),
        (["--split-mode", "by_image"], ["--split-mode"]),
        (["--options", "foo=bar"], ["--options 'foo=bar'", "known options:", "patient_pattern"]),
        (["--options", "nonsense"], ["--options 'nonsense'", "KEY=VALUE"]),
        (["--options", "other.extensions=.png"], ["no source is called 'other'", "images"]),
        (["--options", "images.uncertain=ones"], ["source 'images' has no option 'uncertain'"]),
        (["--dicom-windowing", "magic"], ["--dicom-windowing", "magic"]),
    ],
)
def test_bad_prepare_flags_are_one_line_usage_errors(tmp_path, capsys, flags, needles):
    src = class_folders(tmp_path / "images", n_patients=2)
    out = tmp_path / "store"
    rc, lines = run_cli(prepare_argv([f"folder:{src}"], out, *flags), capsys)
    assert rc == 2
    assert_one_line(lines, "spcxr prepare: error:", *needles)
    assert not out.exists()  # refused before anything was written


def test_options_known_to_one_of_several_sources_are_accepted(tmp_path, capsys):
    src = class_folders(tmp_path / "images")
    rc, lines = run_cli(
        prepare_argv([f"folder:{src}"], tmp_path / "store", "--options", "on-unmatched=skip"),
        capsys,
    )
    assert rc == 0, lines


def test_prepare_without_a_source_is_a_usage_error(tmp_path, capsys):
    rc, lines = run_cli(["prepare", "--out", str(tmp_path / "s")], capsys)
    assert rc == 2
    assert_one_line(lines, "name at least one SOURCE")


def test_row_columns_are_the_columns_process_record_writes(tmp_path):
    path = tmp_path / "a.png"
    Image.fromarray(np.full((20, 20), 9, np.uint8)).save(path)
    record = Record(image_path=str(path), patient_id="p", source="s")
    row, _, _ = process_record(record, 16, DicomOptions())
    assert tuple(row) == ROW_COLUMNS


# ---------------------------------------------------------------------------------------------
# 5: a truncated store shard


def _store(tmp_path: Path, capsys) -> tuple[Path, Path]:
    src = class_folders(tmp_path / "images", n_patients=10)
    out = tmp_path / "store"
    assert run_cli(prepare_argv([f"folder:{src}"], out), capsys)[0] == 0
    return src, out


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_a_truncated_shard_names_the_file_and_prepare_again_rebuilds_it(tmp_path, capsys):
    src, out = _store(tmp_path, capsys)
    shard = out / "shards" / "images-00001.images.npy"
    _truncate(shard)
    with pytest.raises(CorruptStoreError, match="run spcxr prepare again") as caught:
        PreparedStore(out)
    assert str(shard) in str(caught.value) and "\n" not in str(caught.value)
    with pytest.raises(CorruptStoreError, match=r"images-00001\.images\.npy"):
        len(StoreBatches(str(out)))  # the loader's dataset opens the store in this process

    rc, lines = run_cli(
        ["pretrain", "--store", str(out), "--out", str(tmp_path / "run"), "--device", "cpu"],
        capsys,
    )
    assert rc == 2
    assert_one_line(lines, "spcxr pretrain: error:", str(shard), "run spcxr prepare again")

    rc, lines = run_cli(prepare_argv([f"folder:{src}"], out), capsys)
    assert rc == 0, lines
    store = PreparedStore(out)
    assert len(store) == 10 and store.images(np.arange(10)).shape == (10, 16, 16)


def test_a_truncated_manifest_names_the_file(tmp_path, capsys):
    _, out = _store(tmp_path, capsys)
    _truncate(out / "manifest.parquet")
    with pytest.raises(CorruptStoreError, match=r"manifest\.parquet"):
        PreparedStore(out)


# ---------------------------------------------------------------------------------------------
# 6: DICOM decode failures: a row, no pydicom traceback in the log


def test_a_dicom_decode_failure_is_a_row_without_pydicom_tracebacks(tmp_path, capsys, caplog):
    src = class_folders(tmp_path / "images")
    bad = write_bad_rle_dicom(src / "normal" / "person99_broken.dcm")
    write_dicom(src / "abnormal" / "person98_fine.dcm", "P98", size=32)
    out = tmp_path / "store"
    with caplog.at_level(logging.DEBUG, logger="pydicom"):
        rc, lines = run_cli(prepare_argv([f"folder:{src}"], out), capsys)
        assert logging.getLogger("pydicom").level == logging.DEBUG  # restored after the reads
    assert rc == 0, lines
    pydicom_records = [r for r in caplog.records if r.name.startswith("pydicom")]
    assert not [r for r in pydicom_records if r.levelno >= logging.ERROR or r.exc_info]
    row = errors_csv(out).set_index("path").loc[str(bad)]
    assert row.stage == "read" and "cannot decode the pixel data (RLE Lossless" in row.reason
    assert not any("Traceback" in line for line in lines)


# ---------------------------------------------------------------------------------------------
# 7: the per-image pixel limit, checked on the header before decoding


def test_a_huge_image_is_refused_from_its_header_before_decoding(tmp_path, monkeypatch):
    big = png16(tmp_path / "big.png", (130, 130))  # a 13,000 x 13,000 PNG at 1/100 scale
    from PIL import ImageFile

    loads = []
    real_load = ImageFile.ImageFile.load

    def load(self):
        loads.append(self.size)
        return real_load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)
    with pytest.raises(ImageTooLargeError, match=r"130x130 \(HxW\) = 0.0169 MP exceeds") as err:
        read_image(big, max_pixels=10_000)
    assert "--max-pixels" in str(err.value) and loads == []
    assert read_image(big, max_pixels=16_900).pixels.shape == (130, 130)  # at the limit: read
    assert read_image(big).pixels.shape == (130, 130)  # no limit
    assert set(loads) == {(130, 130)}  # the spy does see decoding when it happens

    dcm = write_dicom(tmp_path / "big.dcm", "P1", size=120)
    with pytest.raises(ImageTooLargeError, match="120x120"):
        read_image(dcm, max_pixels=10_000)
    tif = tmp_path / "big.tif"
    Image.fromarray(np.zeros((120, 120), np.uint16)).save(tif)
    with pytest.raises(ImageTooLargeError, match="120x120"):
        read_image(tif, max_pixels=10_000)


def test_prepare_refuses_images_over_max_pixels_with_a_row(tmp_path, capsys):
    src = class_folders(tmp_path / "images")  # 32 x 32 = 1,024 pixels each
    big = png16(src / "normal" / "person77_big.png", (130, 130))
    out = tmp_path / "store"
    rc, lines = run_cli(prepare_argv([f"folder:{src}"], out, "--max-pixels", "5000"), capsys)
    assert rc == 0, lines
    row = errors_csv(out).set_index("path").loc[str(big)]
    assert (
        row.stage == "read" and "exceeds the pixel limit of 0.005 MP (--max-pixels)" in row.reason
    )
    assert len(PreparedStore(out)) == 6
    # Raising the limit is a new setting: the chunk runs again and the image is kept.
    rc, lines = run_cli(prepare_argv([f"folder:{src}"], out, "--max-pixels", "0"), capsys)
    assert rc == 0 and len(PreparedStore(out)) == 7


# ---------------------------------------------------------------------------------------------
# predict: links, unreadable folders, huge images, read-only output, full disk


@pytest.fixture(scope="module")
def class_run(synth_store, module_dir) -> Path:
    return make_class_run(synth_store, module_dir("faults") / "cls")


def _predict_argv(run: Path, out: Path, *inputs: str, extra: tuple[str, ...] = ()) -> list[str]:
    return [
        "predict",
        *inputs,
        "--run",
        str(run),
        "--out",
        str(out),
        "--heatmaps",
        "off",
        "--workers",
        "0",
        "--device",
        "cpu",
        "--no-progress",
        *extra,
    ]


def test_predict_gives_rows_for_links_unreadable_folders_and_huge_images(
    class_run, tmp_path, capsys, monkeypatch, caplog
):
    d = tmp_path / "in"
    good = png16(d / "good.png", (40, 40))
    png16(d / "sub" / "hidden_by_permissions.png", (40, 40))
    big = png16(d / "big.png", (130, 130))
    os.symlink("loop_b.png", d / "loop_a.png")
    os.symlink("loop_a.png", d / "loop_b.png")
    os.symlink("nowhere.png", d / "dangling.png")
    os.symlink("scans_b", d / "scans_a")  # a looping folder link inside an input folder
    os.symlink("scans_a", d / "scans_b")
    (tmp_path / "named").mkdir()
    os.symlink("l2", tmp_path / "named" / "l1")
    os.symlink("l1", tmp_path / "named" / "l2")
    deny_scandir(monkeypatch, d / "sub")
    out = tmp_path / "pred.csv"
    argv = _predict_argv(
        class_run, out, str(d), str(tmp_path / "named" / "l1"), extra=("--max-pixels", "5000")
    )
    with caplog.at_level(logging.WARNING, logger="spcxr.inference.predict"):
        rc, lines = run_cli(argv, capsys)
    assert rc == 0, lines
    frame = pd.read_csv(out, keep_default_na=False).set_index("file")
    assert frame.loc[str(good), "status"] == "ok"
    reasons = frame.loc[frame.status == "error", "error"].to_dict()
    assert reasons == {
        str(big): reasons[str(big)],
        str(d / "dangling.png"): "dangling symbolic link (its target does not exist)",
        str(d / "loop_a.png"): "symbolic link loop",
        str(d / "loop_b.png"): "symbolic link loop",
        str(d / "scans_a"): "symbolic link loop",
        str(d / "scans_b"): "symbolic link loop",
        str(d / "sub"): "cannot list folder: Permission denied",
        str(tmp_path / "named" / "l1"): "symbolic link loop",
    }
    assert "exceeds the pixel limit" in reasons[str(big)]
    assert any("cannot list folder" in r.getMessage() for r in caplog.records)


def test_predict_into_a_read_only_folder_or_a_full_disk_is_one_line(
    class_run, tmp_path, capsys, monkeypatch
):
    image = png16(tmp_path / "in" / "a.png", (40, 40))
    out = tmp_path / "out" / "pred.csv"
    out.parent.mkdir()
    with monkeypatch.context() as patch:
        _read_only(patch)
        rc, lines = run_cli(_predict_argv(class_run, out, str(image)), capsys)
    assert rc == 2
    assert_one_line(lines, "spcxr predict: error:", "Permission denied", str(out.parent))

    import spcxr.atomic

    with monkeypatch.context() as patch:
        real = Path.write_bytes

        def write_bytes(self, data):
            if self.name.startswith(".pred.csv."):
                real(self, data[:5])
                raise OSError(errno.ENOSPC, "No space left on device")
            return real(self, data)

        patch.setattr(spcxr.atomic.Path, "write_bytes", write_bytes)
        rc, lines = run_cli(_predict_argv(class_run, out, str(image)), capsys)
    assert rc == 1
    assert_one_line(lines, "spcxr predict: failed:", "No space left on device", str(out))
    assert not orphans(out.parent) and not out.exists()


def test_predict_on_a_full_disk_while_writing_overlays_names_the_file(
    class_run, tmp_path, capsys, monkeypatch
):
    import importlib

    predict_module = importlib.import_module("spcxr.inference.predict")  # not the function

    image = png16(tmp_path / "in" / "a.png", (40, 40))
    out = tmp_path / "pred.csv"

    def full(array, path):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(predict_module, "save_png", full)
    argv = _predict_argv(class_run, out, str(image))
    argv[argv.index("--heatmaps") + 1] = "all"
    rc, lines = run_cli([*argv, "--heatmap-steps", "1"], capsys)
    assert rc == 1
    assert_one_line(lines, "No space left on device", str(tmp_path / "pred_heatmaps"), "a_")
    assert not out.exists() and not orphans(tmp_path)


@ROOT_SKIP
def test_predict_reports_a_chmod_000_subfolder(class_run, tmp_path, capsys):
    d = tmp_path / "in"
    png16(d / "good.png", (40, 40))
    png16(d / "sub" / "x.png", (40, 40))
    (d / "sub").chmod(0)
    try:
        rc, _ = run_cli(_predict_argv(class_run, tmp_path / "p.csv", str(d)), capsys)
    finally:
        (d / "sub").chmod(0o755)
    assert rc == 0
    frame = pd.read_csv(tmp_path / "p.csv", keep_default_na=False)
    assert str(d / "sub") in set(frame.file)


# ---------------------------------------------------------------------------------------------
# through the installed console script


def _spcxr(args: list[str]) -> subprocess.CompletedProcess[str]:
    exe = console_script()
    env = dict(os.environ)
    src = str(Path(spcxr.__file__).resolve().parents[1])  # this checkout's code
    env["PYTHONPATH"] = os.pathsep.join([src, env.get("PYTHONPATH", "")])
    return subprocess.run([exe, *args], capture_output=True, text=True, env=env, timeout=300)


def test_console_script_faults(tmp_path):
    src = class_folders(tmp_path / "images")
    file_out = tmp_path / "file.txt"
    file_out.write_text("x")
    for flags, out, needle in [
        ([], file_out, f"--out {file_out}: exists and is not a folder"),
        (["--split-fractions", "0.5", "0.5", "0.5"], tmp_path / "s1", "--split-fractions"),
        (["--options", "foo=bar"], tmp_path / "s2", "no source has option 'foo'"),
    ]:
        done = _spcxr(prepare_argv([f"folder:{src}"], out, *flags))
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        assert done.returncode == 2, done.stderr
        assert_one_line(lines, "spcxr prepare: error:", needle)

    os.symlink("loop_b.png", src / "normal" / "loop_a.png")
    os.symlink("loop_a.png", src / "normal" / "loop_b.png")
    out = tmp_path / "store"
    done = _spcxr(prepare_argv([f"folder:{src}"], out, "--strict"))
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr and "--strict: 2 inputs were skipped" in done.stderr
    assert set(errors_csv(out).reason) == {"symbolic link loop"}

    _truncate(out / "shards" / "images-00000.images.npy")
    done = _spcxr(["pretrain", "--store", str(out), "--out", str(tmp_path / "run")])
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2
    assert_one_line(lines, "images-00000.images.npy", "run spcxr prepare again")
    assert not orphans(out, tmp_path / "run")


def test_prepare_api_keeps_its_errors_typed(tmp_path):
    """The library raises the typed errors that ``cli.main`` maps (no SystemExit)."""
    with pytest.raises(UsageError, match="name at least one SOURCE"):
        prepare(PrepareConfig(out=str(tmp_path / "s"), progress=False))
    with pytest.raises(UsageError, match="--image-size"):
        PrepareConfig(image_size=0)
