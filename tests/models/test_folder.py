"""The fine-tuned model folder format (spcxr.models.folder): safetensors + model.json."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from spcxr.models.folder import (
    MODEL_FORMAT,
    MODEL_META,
    MODEL_WEIGHTS,
    file_sha256,
    load_exact,
    read_model_dir,
    write_model_dir,
)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))


def test_round_trip_keeps_every_tensor_and_records_the_hash(tmp_path: Path) -> None:
    model = _model()
    write_model_dir(model, tmp_path / "m", {"task": "classification", "classes": ["a", "b"]})
    state, meta = read_model_dir(tmp_path / "m")
    assert state.keys() == model.state_dict().keys()
    for key, value in model.state_dict().items():
        assert torch.equal(state[key], value)
    assert meta["format"] == MODEL_FORMAT and meta["format_version"] == 1
    assert meta["classes"] == ["a", "b"]
    digest = hashlib.sha256((tmp_path / "m" / MODEL_WEIGHTS).read_bytes()).hexdigest()
    assert meta["weights_sha256"] == digest[:16] == file_sha256(tmp_path / "m" / MODEL_WEIGHTS)


def test_load_exact_fills_a_meta_device_model(tmp_path: Path) -> None:
    write_model_dir(_model(), tmp_path / "m", {})
    state, _ = read_model_dir(tmp_path / "m")
    with torch.device("meta"):
        shell = _model()
    loaded = load_exact(shell, state, tmp_path / "m")
    assert not any(t.is_meta for t in loaded.state_dict().values())
    assert torch.equal(loaded[0].weight, _model()[0].weight)
    with pytest.raises(ValueError, match="weights do not fit"):
        load_exact(nn.Linear(3, 5), state, tmp_path / "m")


def test_bad_folders_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=MODEL_META):
        read_model_dir(tmp_path)
    write_model_dir(_model(), tmp_path / "m", {})
    meta = tmp_path / "m" / MODEL_META
    meta.write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ValueError, match=f"{meta}: not an spcxr model description"):
        read_model_dir(tmp_path / "m")
    meta.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_model_dir(tmp_path / "m")
    with pytest.raises(ValueError, match="not JSON serialisable"):
        write_model_dir(_model(), tmp_path / "n", {"bad": object()})
