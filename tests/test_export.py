"""``spcxr export``: the full model, the timm encoder, ONNX (checked against PyTorch), the
preprocessing record and the model card; and loading never unpickles untrusted files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from tests.inference.test_predict import make_class_run, make_seg_run

from spcxr.data.store import PreparedStore
from spcxr.export import ONNX_ATOL, ONNX_RTOL, ExportConfig, check_onnx, export, export_onnx
from spcxr.inference import PredictConfig, load_model, predict
from spcxr.models.classifier import load_classifier
from spcxr.models.segmentation import load_segmenter
from spcxr.train.checkpoint import load_checkpoint

ort = pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def class_run(synth_store, module_dir) -> Path:
    return make_class_run(synth_store, module_dir("export") / "cls")


@pytest.fixture(scope="module")
def seg_run(synth_store, module_dir) -> Path:
    return make_seg_run(synth_store, module_dir("export") / "seg")


def _store_inputs(store_path: Path, n: int, img_size: int) -> torch.Tensor:
    """Real model inputs: store images through the evaluation preprocessing."""
    from spcxr.tasks.classify import prepare_inputs

    store = PreparedStore(store_path)
    images = torch.from_numpy(store.images(np.arange(n))).unsqueeze(1)
    return prepare_inputs(images, img_size, 1)


def _ort(path: Path, x: torch.Tensor) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"image": x.numpy()})[0]


def test_classifier_export_loads_in_spcxr_timm_and_onnx_runtime(
    class_run, synth_store, tmp_path
) -> None:
    out = export(ExportConfig(run=str(class_run), out=str(tmp_path / "exp")))
    for name in (
        "model.safetensors", "model.json", "encoder/model.safetensors", "encoder/config.json",
        "model.onnx", "preprocessing.json", "MODEL_CARD.md", "training/run.json",
        "training/config.yaml",
    ):  # fmt: skip
        assert (out / name).is_file(), name
    assert not (out / "training" / "train_rows.csv").exists()  # no list of training images
    original, _ = load_classifier(class_run / "model")
    again, meta = load_classifier(out)
    x = _store_inputs(synth_store, 5, 32)
    with torch.no_grad():
        assert torch.equal(original(x), again(x))
    assert (
        meta["extra"]["export"]["weights_sha256"]
        == json.loads((class_run / "model" / "model.json").read_text())["weights_sha256"]
    )

    # timm alone rebuilds the encoder from the folder and gives the same tokens
    encoder = timm.create_model(f"local-dir:{out / 'encoder'}", pretrained=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(
            encoder.forward_features(x), original.encoder.forward_features(x), atol=1e-6, rtol=0
        )
    data_cfg = timm.data.resolve_data_config(model=encoder)  # what a timm user would apply
    assert data_cfg["input_size"] == (1, 32, 32)
    assert tuple(data_cfg["mean"]) == (0.5,) and tuple(data_cfg["std"]) == (0.25,)

    # ONNX Runtime = PyTorch within the stated tolerance, at batch sizes not used for tracing
    for batch in (1, 5):
        xb = _store_inputs(synth_store, batch, 32)
        with torch.no_grad():
            want = original(xb).numpy()
        got = _ort(out / "model.onnx", xb)
        assert got.shape == (batch, 3)
        # also relative to the (small, 3 training steps) logits: an all-zero output would fail
        assert np.abs(got - want).max() <= 1e-3 * np.abs(want).max()
        assert np.abs(got - want).max() <= ONNX_ATOL + ONNX_RTOL * np.abs(want).max()

    record = json.loads((out / "preprocessing.json").read_text())
    assert record["class_names"] == ["normal", "consolidation", "bilateral_opacities"]
    assert record["input"]["shape"] == ["N", 1, 32, 32]
    assert record["normalisation"]["mean"] == 0.5 and record["normalisation"]["std"] == 0.25
    assert record["preprocessing"]["store_image_size"] == 64
    assert record["onnx"]["check"]["ok"] and record["onnx"]["check"]["max_abs_diff"] < 1e-4
    assert record["architecture"]["timm_encoder"].startswith("vit_tiny")

    card = (out / "MODEL_CARD.md").read_text()
    assert card.startswith("# Model card: cls (classification)")
    assert "Not a medical device" in card and "Not evaluated" in card
    # an export of the export keeps the provenance and rebuilds the same card facts
    again_dir = export(ExportConfig(run=str(out), out=str(tmp_path / "exp2"), onnx=False))
    origin = json.loads((again_dir / "training" / "origin.json").read_text())
    assert origin == json.loads((out / "training" / "origin.json").read_text())
    assert origin["run"] == str(class_run.resolve())
    card2 = (again_dir / "MODEL_CARD.md").read_text()
    assert card2.startswith("# Model card: cls (classification)") and "model.onnx" not in card2

    # the export is a model folder for spcxr predict: same probabilities as the run
    store = PreparedStore(synth_store)
    files = store.manifest["image_path"].iloc[:4].tolist()
    common = dict(inputs=files, device="cpu", heatmaps="off", workers=0, progress=False)
    a = predict(PredictConfig(run=str(class_run), out=str(tmp_path / "a.csv"), **common))
    b = predict(PredictConfig(run=str(out), out=str(tmp_path / "b.csv"), **common))
    cols = [c for c in a.columns if c.startswith("p_")]
    np.testing.assert_array_equal(a[cols].to_numpy(), b[cols].to_numpy())


def test_segmenter_export_onnx_matches_pytorch(seg_run, synth_store, tmp_path) -> None:
    out = export(ExportConfig(run=str(seg_run), out=str(tmp_path / "seg_exp")))
    original, _ = load_segmenter(seg_run / "model")
    again, meta = load_segmenter(out)
    assert meta["task"] == "segmentation"
    x = _store_inputs(synth_store, 4, 32)
    with torch.no_grad():
        want = original(x).numpy()
        assert np.array_equal(again(x).numpy(), want)
    got = _ort(out / "model.onnx", x)
    assert got.shape == (4, 1, 32, 32)
    assert np.abs(got - want).max() <= 1e-3 * np.abs(want).max()
    assert np.abs(got - want).max() <= ONNX_ATOL + ONNX_RTOL * np.abs(want).max()
    record = json.loads((out / "preprocessing.json").read_text())
    assert record["output"]["name"] == "mask_logits" and record["output"]["activation"] == "sigmoid"
    assert "segmentation" in (out / "MODEL_CARD.md").read_text()


def test_onnx_check_detects_a_model_that_differs(class_run, tmp_path) -> None:
    model, _ = load_classifier(class_run / "model")
    torch.manual_seed(0)
    torch.nn.init.normal_(model.head.weight, std=0.5)  # logits of order 1, not ~1e-3
    path = export_onnx(model, tmp_path / "m.onnx", (1, 32, 32), output_name="logits")
    x = torch.randn(3, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    report = check_onnx(path, model, x)
    # fp32 round-off grows with the output's scale: the bound is relative to max |output|.
    assert report["ok"] and report["max_abs_output"] > 0.5
    assert report["max_abs_diff"] < 1e-5 * max(1.0, report["max_abs_output"])
    with torch.no_grad():
        model.head.bias += 0.01
    report = check_onnx(path, model, x)
    tol = 1e-5 * max(1.0, report["max_abs_output"])
    assert not report["ok"] and report["max_abs_diff"] == pytest.approx(0.01, abs=tol)


def test_export_without_onnx_writes_everything_else(class_run, tmp_path, monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "onnx" else real(name, *a)
    )
    out = export(ExportConfig(run=str(class_run), out=str(tmp_path / "exp")))
    assert not (out / "model.onnx").exists()
    assert (out / "model.safetensors").is_file() and (out / "MODEL_CARD.md").is_file()
    record = json.loads((out / "preprocessing.json").read_text())
    assert record["onnx"] == {"file": None, "skipped": "onnx is not installed"}
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install 'spcxr[onnx]'" in err[0]


# ---------------------------------------------------------------------------------------------
# safe loading


class _Payload:
    """Unpickling this object calls ``open(marker, "w")``: the file appears if code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _malicious(path: Path, marker: Path) -> Path:
    torch.save({"format": "spcxr-supervised-checkpoint", "model": _Payload(marker)}, path)
    return path


def test_malicious_pickle_checkpoint_is_refused_without_running_code(tmp_path) -> None:
    marker = tmp_path / "pwned"
    ckpt = _malicious(tmp_path / "checkpoint.pt", marker)
    with pytest.raises(
        ValueError,
        match=r"checkpoint\.pt: refused: the checkpoint holds a pickled Python object \(io\.open\)",
    ):
        load_checkpoint(ckpt)
    assert not marker.exists()
    # control: the file really is malicious (full unpickling runs the payload)
    torch.load(ckpt, weights_only=False)
    assert marker.exists()


def test_predict_and_export_never_fall_back_to_a_pickle(class_run, tmp_path) -> None:
    marker = tmp_path / "pwned"
    run = tmp_path / "run"
    run.mkdir()
    shutil.copyfile(class_run / "run.json", run / "run.json")
    _malicious(run / "checkpoint.pt", marker)
    with pytest.raises(FileNotFoundError, match="does not load checkpoint pickles"):
        load_model(run)
    with pytest.raises(FileNotFoundError, match="no model here"):
        export(ExportConfig(run=str(run), out=str(tmp_path / "exp")))
    with pytest.raises(FileNotFoundError, match="no model here"):
        predict(PredictConfig(run=str(run), inputs=[str(class_run / "run.json")], progress=False))
    # a pickle disguised as the weights file is not a safetensors file
    disguised = tmp_path / "disguised"
    shutil.copytree(class_run / "model", disguised)
    _malicious(disguised / "model.safetensors", marker)
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_model(disguised)
    # and a pretraining run whose checkpoint is a pickle is refused as an initialisation
    from spcxr.models.init_from import load_init

    with pytest.raises(ValueError, match="refused: the checkpoint holds a pickled Python object"):
        load_init(str(run), arch="vit_tiny", img_size=32, patch_size=8)
    assert not marker.exists()
