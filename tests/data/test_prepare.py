"""``spcxr prepare``: store contents, geometry, bad inputs, strict mode, resumption, appending."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from scipy.ndimage import gaussian_filter

from spcxr.cli import main
from spcxr.data.prepare import PrepareConfig, fit_mask, fit_square, prepare
from spcxr.data.splits import SplitConfig
from spcxr.data.store import PreparedStore


def _film(seed: int, height: int = 96, width: int = 80) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = gaussian_filter(rng.random((height, width)), 4)
    return ((img - img.min()) / (img.max() - img.min())).astype(np.float32)


def _write_png(path: Path, img: np.ndarray, bits: int = 8) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if bits == 8:
        Image.fromarray((img * 255).round().astype(np.uint8)).save(path)
    else:
        Image.fromarray((img * 65535).round().astype(np.uint16)).save(path)


def _class_folders(root: Path, n_patients: int = 12, per_patient: int = 2) -> Path:
    """A Kermany-style layout: CLASS/personN_kind_M.png, 8- and 16-bit PNGs, JPEGs."""
    k = 0
    for p in range(n_patients):
        label = "PNEUMONIA" if p % 3 else "NORMAL"
        for m in range(per_patient):
            img = _film(1000 * p + m)
            name = f"person{p}_virus_{k}" if label == "PNEUMONIA" else f"person{p}_{k}"
            if k % 3 == 0:
                _write_png(root / label / f"{name}.png", img, bits=16)
            elif k % 3 == 1:
                (root / label).mkdir(parents=True, exist_ok=True)
                rgb = Image.fromarray((img * 255).astype(np.uint8)).convert("RGB")
                rgb.save(root / label / f"{name}.jpeg", quality=95)
            else:
                _write_png(root / label / f"{name}.png", img)
            k += 1
    return root


def _config(sources: list[str], out: Path, **kwargs) -> PrepareConfig:
    kwargs.setdefault("image_size", 64)
    kwargs.setdefault("workers", 1)
    kwargs.setdefault("progress", False)
    return PrepareConfig(sources=sources, out=str(out), **kwargs)


def test_fit_square_keeps_aspect_and_pads() -> None:
    img = np.zeros((100, 50), np.float32)
    img[:, :25] = 1.0  # left half bright
    out, box = fit_square(img, 64)
    assert box == (0, 16, 64, 32)
    assert out.shape == (64, 64) and out.dtype == np.uint8
    assert (out[:, :16] == 0).all() and (out[:, 48:] == 0).all()  # padding is 0
    assert out[:, 16:30].min() >= 250 and out[:, 34:48].max() <= 5
    # A mask resized with the same geometry stays aligned with its image.
    mask = img > 0.5
    m = fit_mask(mask, 64, box)
    assert m.dtype == np.uint8 and set(np.unique(m)) <= {0, 1}
    assert (m[:, 16:30] == 1).all() and (m[:, 34:] == 0).all() and (m[:, :16] == 0).all()


def test_prepare_class_folders(tmp_path: Path) -> None:
    root = _class_folders(tmp_path / "kermany")
    result = prepare(_config([f"folder:{root}"], tmp_path / "store", chunk_size=5))
    store = PreparedStore(tmp_path / "store")
    m = store.manifest
    assert len(store) == 24 and result.n_errors == 0
    assert m.patient_id.nunique() == 12
    assert set(m.label) == {"normal", "pneumonia"}
    assert set(m.loc[m.label == "pneumonia", "sublabel"]) == {"virus"}
    assert set(m.format) == {"png", "jpeg"}
    assert (m.orig_height == 96).all() and (m.orig_width == 80).all()
    assert (m.box_height == 64).all() and (m.box_width == 53).all()
    # Random access, any order, equals the stored content.
    idx = np.array([7, 3, 3, 20, 0])
    imgs = store.images(idx)
    assert imgs.shape == (5, 64, 64) and imgs.dtype == np.uint8
    for k, i in enumerate(idx):
        row = m.iloc[i]
        shard = np.load(tmp_path / "store" / "shards" / f"{row.shard}.images.npy")
        assert np.array_equal(imgs[k], shard[row.offset])
    # Stored pixels match the source image (resized the same way).
    row = m.iloc[idx[0]]
    src = np.asarray(Image.open(row.image_path).convert("L"), np.float32)
    src = src / (65535.0 if src.max() > 255 else 255.0)
    expected, _ = fit_square(src, 64)
    assert np.abs(imgs[0].astype(int) - expected.astype(int)).max() <= 3
    # Splits by patient, report and fingerprint written.
    assert m.groupby("patient_id")["split"].nunique().max() == 1
    report = json.loads((tmp_path / "store" / "report.json").read_text())
    assert report["images"] == 24 and report["patients"] == 12
    assert store.fingerprint == report["fingerprint"]
    assert store.meta["versions"]["pydicom"] and store.meta["prepare_config"]["image_size"] == 64
    assert (tmp_path / "store" / "report.md").read_text().startswith("# Prepared store")


def _dicom_without_pixels(path: Path) -> None:
    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.PatientID = "X1"
    ds.Modality = "DX"
    ds.save_as(path, enforce_file_format=True)


def _bad_inputs(root: Path) -> dict[str, str]:
    """A CSV-manifest source with one good image and every kind of bad input."""
    images = root / "images"
    images.mkdir(parents=True)
    good = _film(1)
    _write_png(images / "good.png", good)
    _write_png(images / "good2.png", _film(2))
    _write_png(root / "masks" / "good.png", (good > 0.5).astype(np.float32))
    _write_png(root / "masks" / "small.png", np.ones((10, 10), np.float32))
    (images / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(200))
    png = (images / "good.png").read_bytes()
    (images / "truncated.png").write_bytes(png[: len(png) // 2])
    (images / "empty.png").write_bytes(b"")
    (images / "notes.png").write_text("this is not an image\n")
    _dicom_without_pixels(images / "nopixels.dcm")
    rows = [
        ("images/good.png", "masks/good.png", "normal", "p1"),
        ("images/good2.png", "masks/small.png", "normal", "p2"),  # mask size mismatch
        ("images/corrupt.png", "", "normal", "p3"),
        ("images/truncated.png", "", "normal", "p4"),
        ("images/empty.png", "", "normal", "p5"),
        ("images/notes.png", "", "normal", "p6"),
        ("images/nopixels.dcm", "", "normal", "p7"),
        ("images/good.png", "", "", "p8"),  # missing label (and a repeated path)
        ("images/missing.png", "", "normal", "p9"),  # file does not exist
    ]
    pd.DataFrame(rows, columns=["file", "mask_file", "label", "patient_id"]).to_csv(
        root / "manifest.csv", index=False
    )
    return {
        "good2.png": "mask",
        "corrupt.png": "read",
        "truncated.png": "read",
        "empty.png": "read",
        "notes.png": "read",
        "nopixels.dcm": "read",
        "missing.png": "list",
    }


def test_bad_inputs_are_skipped_and_reported(tmp_path: Path) -> None:
    expected = _bad_inputs(tmp_path / "bad")
    result = prepare(_config([f"csv:{tmp_path / 'bad'}"], tmp_path / "store"))
    store = PreparedStore(tmp_path / "store")
    assert len(store) == 1 and store.manifest.image_path.iloc[0].endswith("good.png")
    assert bool(store.manifest.has_mask.iloc[0])
    errors = pd.read_csv(tmp_path / "store" / "errors.csv")
    by_file = {
        Path(p).name: (stage, reason)
        for p, stage, reason in errors[["path", "stage", "reason"]].itertuples(index=False)
    }
    for name, stage in expected.items():
        assert name in by_file, name
        assert by_file[name][0] == stage, (name, by_file[name])
    assert "size" in by_file["good2.png"][1] or "shape" in by_file["good2.png"][1]
    assert "pixel" in by_file["nopixels.dcm"][1].lower()
    assert "empty" in by_file["empty.png"][1].lower()
    # The unlabeled row and the repeated path are reported too (by the listing).
    listing = errors[errors.stage == "list"]
    assert len(listing) >= 2
    assert result.n_errors == len(errors) >= 8
    assert json.loads((tmp_path / "store" / "report.json").read_text())["errors"]["total"] == len(
        errors
    )


def test_strict_flag_fails_after_writing_report(tmp_path: Path, capsys) -> None:
    _bad_inputs(tmp_path / "bad")
    out = tmp_path / "store"
    argv = [
        "prepare",
        f"csv:{tmp_path / 'bad'}",
        "--out",
        str(out),
        "--image-size",
        "64",
        "--workers",
        "1",
        "--no-progress",
    ]
    assert main(argv) == 0
    assert main([*argv, "--strict"]) == 1
    assert "--strict" in capsys.readouterr().err
    assert (out / "errors.csv").is_file() and (out / "prepare_config.yaml").is_file()


def test_cli_config_file_and_flags(tmp_path: Path) -> None:
    root = _class_folders(tmp_path / "k", n_patients=6)
    cfg = tmp_path / "prep.yaml"
    cfg.write_text(
        f"sources: ['folder:{root}']\nimage_size: 48\nsplit:\n  fractions: [0.5, 0.25, 0.25]\nworkers: 1\n"
    )
    assert (
        main(
            [
                "prepare",
                "--config",
                str(cfg),
                "--out",
                str(tmp_path / "s"),
                "--split-seed",
                "3",
                "--no-progress",
            ]
        )
        == 0
    )
    store = PreparedStore(tmp_path / "s")
    assert store.image_size == 48
    saved = (tmp_path / "s" / "prepare_config.yaml").read_text()
    assert "seed: 3" in saved and "- 0.5" in saved


def test_append_a_source_and_resume_without_redoing(tmp_path: Path) -> None:
    a = _class_folders(tmp_path / "a", n_patients=6)
    b = _class_folders(tmp_path / "b", n_patients=4)
    out = tmp_path / "store"
    first = prepare(_config([f"site_a=folder:{a}"], out, chunk_size=4))
    assert first.n_processed == 12
    again = prepare(_config([f"site_a=folder:{a}"], out, chunk_size=4))
    assert again.n_processed == 0 and again.n_resumed_chunks == 3
    added = prepare(_config([f"site_b=folder:{b}"], out, chunk_size=4))
    assert added.n_processed == 8
    store = PreparedStore(out)
    assert len(store) == 20
    assert store.manifest.groupby("source").size().to_dict() == {"site_a": 12, "site_b": 8}


def test_changed_image_size_is_refused(tmp_path: Path) -> None:
    a = _class_folders(tmp_path / "a", n_patients=3)
    prepare(_config([f"folder:{a}"], tmp_path / "s"))
    with pytest.raises(ValueError, match="image size 64"):
        prepare(_config([f"folder:{a}"], tmp_path / "s", image_size=32))


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_store(tmp_path: Path) -> None:
    root = _class_folders(tmp_path / "k", n_patients=60, per_patient=2)
    out = tmp_path / "killed"
    argv = [
        sys.executable,
        "-m",
        "spcxr.cli",
        "prepare",
        f"folder:{root}",
        "--out",
        str(out),
        "--image-size",
        "64",
        "--chunk-size",
        "8",
        "--workers",
        "1",
        "--no-progress",
    ]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    shards = out / "shards"
    deadline = time.time() + 300  # a loaded machine can take long to import torch
    while time.time() < deadline and len(list(shards.glob("*.parquet"))) < 2:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = len(list(shards.glob("*.parquet")))
    assert 2 <= done_before < 15, "the kill should land mid-run"
    assert not (out / "manifest.parquet").exists()
    resumed = prepare(_config([f"folder:{root}"], out, chunk_size=8))
    assert resumed.n_resumed_chunks >= done_before
    assert resumed.n_processed == 120 - 8 * resumed.n_resumed_chunks
    fresh = prepare(_config([f"folder:{root}"], tmp_path / "fresh", chunk_size=8))
    a = PreparedStore(out)
    b = PreparedStore(tmp_path / "fresh")
    cols = ["image_path", "patient_id", "label", "pixel_hash", "phash", "split", "fold"]
    pd.testing.assert_frame_equal(a.manifest[cols], b.manifest[cols])
    assert np.array_equal(a.images(np.arange(len(a))), b.images(np.arange(len(b))))
    assert a.fingerprint == b.fingerprint == fresh.report["fingerprint"]


def test_parallel_workers_give_the_same_store(tmp_path: Path) -> None:
    root = _class_folders(tmp_path / "k", n_patients=8)
    serial = prepare(_config([f"folder:{root}"], tmp_path / "s1", workers=1))
    parallel = prepare(
        _config([f"folder:{root}"], tmp_path / "s2", workers=2, split=SplitConfig(seed=0))
    )
    assert serial.report["fingerprint"] == parallel.report["fingerprint"]
    assert np.array_equal(
        PreparedStore(tmp_path / "s1").images(range(16)),
        PreparedStore(tmp_path / "s2").images(range(16)),
    )
