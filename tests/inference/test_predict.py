"""``spcxr predict``: input expansion, error rows, agreement with the evaluation path, masks at
the original resolution, explanation overlays."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from spcxr.data.labels import LabelConfig
from spcxr.data.prepare import fit_square
from spcxr.data.store import PreparedStore
from spcxr.inference import PredictConfig, expand_inputs, load_model, predict, run_predict
from spcxr.inference.predict import original_grid
from spcxr.models.classifier import ClassifierConfig
from spcxr.models.segmentation import SegmenterConfig
from spcxr.tasks.classify import FinetuneConfig, finetune, predict_store
from spcxr.tasks.loop import FinetuneOptimConfig, TrainConfig
from spcxr.tasks.segment import SegmentConfig, segment


def _train(steps: int) -> TrainConfig:
    return TrainConfig(
        epochs=1,
        min_steps=steps,
        batch_size=16,
        eval_every=steps,
        patience=0,
        device="cpu",
        workers=0,
        progress=False,
        tensorboard=False,
        optim=FinetuneOptimConfig(lr=2e-3, warmup_epochs=0.0),
    )


def make_class_run(store: Path, out: Path) -> Path:
    """A 3-class ViT-Ti/8 classifier at 32 px, trained for 3 steps on the synthetic store."""
    finetune(
        FinetuneConfig(
            store=str(store),
            out=str(out),
            labels=LabelConfig(classes=["normal", "consolidation", "bilateral_opacities"]),
            model=ClassifierConfig(arch="vit_tiny", img_size=32, patch_size=8, head="cls"),
            train=_train(3),
        )
    )
    return out


def make_seg_run(store: Path, out: Path) -> Path:
    """A UNETR lung segmenter (ViT-Ti/8 at 32 px), trained for 2 steps."""
    segment(
        SegmentConfig(
            store=str(store),
            out=str(out),
            model=SegmenterConfig(
                arch="vit_tiny", img_size=32, patch_size=8, decoder_channels=[16, 8, 8]
            ),
            train=_train(2),
        )
    )
    return out


@pytest.fixture(scope="module")
def class_run(synth_store, module_dir) -> Path:
    return make_class_run(synth_store, module_dir("predict") / "cls")


@pytest.fixture(scope="module")
def seg_run(synth_store, module_dir) -> Path:
    return make_seg_run(synth_store, module_dir("predict") / "seg")


def _png(path: Path, shape: tuple[int, int], seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(path)
    return path


def _dicom(path: Path, shape: tuple[int, int]) -> Path:
    from pydicom.dataset import Dataset
    from pydicom.uid import generate_uid

    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1"  # CR Image Storage
    ds.SOPInstanceUID = generate_uid()
    ds.Modality = "CR"
    ds.PatientID = "P1"
    pixels = (np.arange(shape[0] * shape[1]).reshape(shape) % 4096).astype(np.uint16)
    ds.set_pixel_data(pixels, "MONOCHROME2", 12)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def test_expand_inputs_sorts_dedupes_recurses_and_reports(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    _png(tmp_path / "d" / "b.png", (10, 10))
    _png(tmp_path / "d" / "sub" / "a.JPG", (10, 10))  # a PNG named .JPG: content decides later
    _dicom(tmp_path / "d" / "sub" / "IM0001", (10, 10))  # extensionless DICOM
    _dicom(tmp_path / "d" / "1.2.840.99", (10, 10))  # UID-named DICOM
    (tmp_path / "d" / "notes.txt").write_text("not an image")
    _png(tmp_path / "d" / ".hidden.png", (10, 10))
    _png(tmp_path / "d" / ".cache" / "c.png", (10, 10))
    files, problems = expand_inputs(
        ["d", "d/b.png", str(tmp_path / "d" / "b.png"), "d/**/*.JPG", "nope.png", "x/*.dcm"]
    )
    assert files == ["d/1.2.840.99", "d/b.png", "d/sub/IM0001", "d/sub/a.JPG"]
    assert problems == [
        ("nope.png", "no such file or folder"),
        ("x/*.dcm", "no file matches this pattern"),
    ]
    # a file named explicitly is taken whatever its extension
    assert expand_inputs(["d/notes.txt"]) == (["d/notes.txt"], [])


def test_predict_gives_the_evaluation_paths_probabilities(class_run, synth_store, tmp_path):
    store = PreparedStore(synth_store)
    rows = store.indices("test")
    files = store.manifest["image_path"].iloc[rows].tolist()
    frame = predict(
        PredictConfig(
            run=str(class_run),
            inputs=files,
            out=str(tmp_path / "p.csv"),
            batch_size=7,
            device="cpu",
            heatmaps="off",
            workers=2,
            progress=False,
        )
    )
    loaded = load_model(class_run)
    expected = predict_store(
        loaded.model,
        store,
        rows,
        img_size=32,
        in_chans=1,
        multilabel=False,
        device=torch.device("cpu"),
    )
    by_file = frame.set_index("file")
    names = loaded.class_names
    got = by_file.loc[files, [f"p_{c}" for c in names]].to_numpy()
    assert (by_file["status"] == "ok").all()
    assert np.abs(got - expected).max() < 1e-5
    assert list(by_file.loc[files, "predicted"]) == [names[i] for i in expected.argmax(1)]
    assert list(by_file.loc[files, "height"]) == store.manifest["orig_height"].iloc[rows].tolist()
    assert pd.read_csv(tmp_path / "p.csv").shape == frame.shape
    assert "heatmap_file" not in frame.columns


def test_unreadable_inputs_get_error_rows_and_the_rest_is_predicted(class_run, tmp_path):
    good = _png(tmp_path / "in" / "good.png", (40, 70))
    dicom = _dicom(tmp_path / "in" / "scan.dcm", (60, 50))
    corrupt = tmp_path / "in" / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(200)))
    one_bit = tmp_path / "in" / "one_bit.png"
    Image.fromarray(np.eye(32, dtype=bool)).convert("1").save(one_bit)
    (tmp_path / "in" / "empty.dcm").write_bytes(b"")
    tiny = _png(tmp_path / "in" / "tiny.png", (4, 30))
    frame, stats = run_predict(
        PredictConfig(
            run=str(class_run),
            inputs=[str(tmp_path / "in"), str(tmp_path / "missing.dcm")],
            out=str(tmp_path / "out" / "preds.csv"),
            batch_size=2,
            device="cpu",
            heatmaps="all",
            heatmap_steps=2,
            workers=1,
            progress=False,
        )
    )
    rows = frame.set_index("file")
    assert len(frame) == 7 and stats.images == 2 and stats.errors == 5
    for path in (good, dicom):
        assert rows.loc[str(path), "status"] == "ok"
        assert rows.loc[str(path), "error"] == ""
    assert tuple(rows.loc[str(dicom), ["height", "width"]]) == (60, 50)
    errors = rows[rows["status"] == "error"]["error"].to_dict()
    assert "corrupt PNG" in errors[str(corrupt)] or "truncated" in errors[str(corrupt)]
    assert "1-bit" in errors[str(one_bit)]
    assert "empty file" in errors[str(tmp_path / "in" / "empty.dcm")]
    assert "unusable image shape" in errors[str(tiny)]
    assert errors[str(tmp_path / "missing.dcm")] == "no such file or folder"
    prob = rows.loc[str(good), [c for c in frame.columns if c.startswith("p_")]].to_numpy(float)
    assert prob.sum() == pytest.approx(1.0, abs=1e-5)
    assert rows.loc[str(corrupt), [c for c in frame.columns if c.startswith("p_")]].isna().all()
    # explanation overlays next to the CSV, drawn on the content (the padding cropped away)
    overlay = tmp_path / "out" / rows.loc[str(good), "heatmap_file"]
    assert overlay.parent == tmp_path / "out" / "preds_heatmaps"
    _, (_, _, height, width) = fit_square(np.zeros((40, 70), np.float32), 64)
    assert np.asarray(Image.open(overlay)).shape == (height, width, 3) == (37, 64, 3)
    assert pd.isna(rows.loc[str(corrupt), "heatmap_file"])
    assert np.isfinite(rows.loc[str(good), "heatmap_completeness_gap"])


@pytest.mark.parametrize("heatmaps", ["off", "positive", "all"])
def test_heatmaps_are_drawn_only_on_request(class_run, tmp_path, heatmaps) -> None:
    files = [str(_png(tmp_path / "in" / f"{i}.png", (40 + 4 * i, 50), seed=i)) for i in range(6)]
    frame = predict(
        PredictConfig(
            run=str(class_run),
            inputs=files,
            out=str(tmp_path / "preds.csv"),
            device="cpu",
            heatmaps=heatmaps,
            heatmap_steps=2,
            workers=0,
            progress=False,
        )
    )
    assert (frame["status"] == "ok").all()
    if heatmaps == "off":
        assert "heatmap_file" not in frame.columns
        assert not (tmp_path / "preds_heatmaps").exists()
        return
    first = frame.columns[frame.columns.str.startswith("p_")][0][2:]
    wanted = frame["predicted"] != first if heatmaps == "positive" else frame["status"] == "ok"
    assert frame["heatmap_file"].notna().tolist() == wanted.tolist()
    if heatmaps == "positive":  # the selection is a real one: some images, not all
        assert 0 < wanted.sum() < len(wanted), frame["predicted"].tolist()
    assert np.isfinite(frame.loc[wanted, "heatmap_completeness_gap"]).all()
    for name in frame.loc[wanted, "heatmap_file"]:
        assert (tmp_path / name).is_file()


def test_predict_rejects_an_unknown_heatmaps_choice() -> None:
    with pytest.raises(ValueError, match="--heatmaps must be one of off, positive, all"):
        PredictConfig(heatmaps="some")


def test_segmentation_writes_masks_at_the_original_resolution(seg_run, tmp_path) -> None:
    a = _png(tmp_path / "a.png", (50, 80), seed=1)
    b = _png(tmp_path / "b.png", (90, 30), seed=2)
    frame = predict(
        PredictConfig(
            run=str(seg_run),
            inputs=[str(tmp_path / "*.png")],
            out=str(tmp_path / "seg.csv"),
            device="cpu",
            workers=0,
            progress=False,
        )
    )
    assert list(frame.columns) == [
        "file",
        "status",
        "error",
        "height",
        "width",
        "lung_area_fraction",
        "lung_area_px",
        "mask_file",
        "overlay_file",
    ]
    for path, shape in ((a, (50, 80)), (b, (90, 30))):
        row = frame.set_index("file").loc[str(path)]
        mask = np.asarray(Image.open(tmp_path / row["mask_file"]))
        assert mask.shape == shape and set(np.unique(mask)) <= {0, 255}
        assert row["lung_area_px"] == (mask == 255).sum()
        assert row["lung_area_fraction"] == pytest.approx((mask == 255).mean())
        overlay = np.asarray(Image.open(tmp_path / row["overlay_file"]))
        assert overlay.shape[2] == 3 and max(overlay.shape[:2]) == 64  # store size 64


def test_original_grid_undoes_the_square_padding() -> None:
    # An output map that is exactly the fitted image (at a lower model resolution), sampled at
    # the original pixels, must give back the original picture.
    original = np.zeros((40, 100), dtype=np.float32)
    original[10:30, 60:90] = 1.0
    square, box = fit_square(original, 64)
    assert box == (19, 0, 26, 64)  # 40 x 100 -> 26 x 64, centred
    logits = torch.from_numpy(square / 255.0 - 0.5).float()[None, None]
    logits = F.interpolate(logits, size=(32, 32), mode="bilinear", antialias=True)
    grid = original_grid(box, original.shape, 64, torch.device("cpu"))
    back = F.grid_sample(logits, grid, mode="bilinear", align_corners=False)[0, 0] > 0
    truth = original > 0.5
    iou = (back.numpy() & truth).sum() / (back.numpy() | truth).sum()
    assert back.shape == (40, 100) and iou > 0.9
    assert not back[:8].any() and not back[:, :55].any()  # nothing where the original is empty


def test_missing_model_and_missing_preprocessing_are_clear_errors(class_run, tmp_path) -> None:
    empty = tmp_path / "run"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no model here"):
        load_model(empty)
    import json
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(class_run / "model", copy)
    meta = json.loads((copy / "model.json").read_text())
    del meta["extra"]["preprocessing"]
    (copy / "model.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="does not guess"):
        load_model(copy)


@pytest.mark.slow
def test_decoding_in_worker_processes_gives_the_same_rows(class_run, tmp_path) -> None:
    for i in range(3):
        _png(tmp_path / "in" / f"{i}.png", (30 + i, 40), seed=i)
    common = dict(
        run=str(class_run),
        inputs=[str(tmp_path / "in")],
        device="cpu",
        heatmaps="off",
        progress=False,
    )
    threads = predict(PredictConfig(out=str(tmp_path / "t.csv"), workers=2, **common))
    procs = predict(PredictConfig(out=str(tmp_path / "p.csv"), workers=2, processes=True, **common))
    pd.testing.assert_frame_equal(threads, procs)


def test_inference_bench_prints_and_appends_one_json_line(tmp_path, capsys) -> None:
    import importlib.util
    import json

    path = Path(__file__).resolve().parents[2] / "bench" / "inference_throughput.py"
    spec = importlib.util.spec_from_file_location("inference_throughput", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    args = [
        "--device", "cpu", "--arch", "vit_tiny", "--img-size", "32", "--patch-size", "8",
        "--batch-size", "4", "--steps", "2", "--warmup", "1", "--files", "6",
        "--file-size", "48", "--workers", "2", "--threads", "1", "--out-dir", str(tmp_path),
        "--heatmap-steps", "2",
    ]  # fmt: skip
    record = bench.main(args)
    bench.main(args)
    printed = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    saved = [json.loads(x) for x in (tmp_path / "inference.jsonl").read_text().splitlines()]
    assert len(printed) == len(saved) == 2 and saved[0] == record
    assert record["device"] == "cpu" and record["predict_files"] == 6
    for key in (
        "model_images_per_s",
        "transfer_images_per_s",
        "predict_images_per_s",
        "predict_heatmaps_all_images_per_s",
    ):
        assert record[key] > 0
    assert record["heatmap_steps"] == 2 and record["heatmaps_slowdown"] > 0
    assert 0 <= record["decode_wait_share"] <= 1 and 0 <= record["decode_cpu_share"] <= 1
