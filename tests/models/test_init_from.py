"""Encoder initialisation for fine-tuning (spcxr.models.init_from.load_init)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from timm.layers import resample_abs_pos_embed

from spcxr.models.classifier import Classifier, ClassifierConfig, save_classifier
from spcxr.models.folder import read_model_dir
from spcxr.models.init_from import export_is_current, load_init
from spcxr.models.vit import create_encoder, save_encoder
from spcxr.pretrain.engine import PretrainConfig, pretrain
from spcxr.pretrain.gmml import GMMLConfig
from spcxr.train.checkpoint import load_checkpoint

TINY = dict(arch="vit_tiny", img_size=32, patch_size=8)


# tiny models on one intra-op thread (tests/conftest.py: one_thread)
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def gmml_run(tiny_store: Path, module_dir) -> Path:
    """A real 2-step GMML run (ViT-Ti/8 at 32 px) on the tiny synthetic store."""
    run = module_dir("gmml") / "run"
    pretrain(
        PretrainConfig(
            store=str(tiny_store),
            out=str(run),
            model=GMMLConfig(**TINY, drop_path_rate=0.0),
            batch_size=8,
            max_steps=2,
            device="cpu",
            workers=0,
            preview_every=100,
            progress=False,
            tensorboard=False,
        )
    )
    return run


@pytest.fixture(scope="module")
def gmml_encoder_state(gmml_run: Path) -> dict[str, torch.Tensor]:
    """The encoder tensors of the GMMLModel as trained (from its checkpoint)."""
    model_state = load_checkpoint(gmml_run / "checkpoint.pt")["model"]
    return {k.removeprefix("encoder."): v for k, v in model_state.items() if k[:8] == "encoder."}


@pytest.fixture()
def checkpoint_only_run(gmml_run: Path, tmp_path: Path) -> Path:
    """A copy of the run without its exported encoder/ (as after an interrupted run)."""
    run = tmp_path / "run"
    shutil.copytree(gmml_run, run, ignore=shutil.ignore_patterns("encoder"))
    return run


def _assert_state_equal(encoder: torch.nn.Module, expected: dict[str, torch.Tensor]) -> None:
    state = encoder.state_dict()
    assert state.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(state[key], value), key


def _sha16(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def test_scratch_is_random_and_follows_the_torch_seed() -> None:
    torch.manual_seed(3)
    a, info = load_init("scratch", **TINY)
    torch.manual_seed(3)
    b, _ = load_init("scratch", **TINY, drop_path_rate=0.0)
    assert info == {"init": "scratch", "path": None, "weights_sha256": None, "source_run": None}
    assert a.patch_embed.patch_size == (8, 8) and a.patch_embed.img_size == (32, 32)
    assert a.num_classes == 0 and a.patch_embed.proj.in_channels == 1
    assert 0.01 < float(a.pos_embed.detach().std()) < 0.03  # timm's trunc_normal(std=0.02) init
    _assert_state_equal(b, a.state_dict())
    assert a.blocks[-1].drop_path1.drop_prob == pytest.approx(0.1)
    assert isinstance(b.blocks[-1].drop_path1, torch.nn.Identity)


def test_run_dir_loads_the_exported_encoder_exactly(gmml_run, gmml_encoder_state) -> None:
    encoder, info = load_init(str(gmml_run), **TINY)
    _assert_state_equal(encoder, gmml_encoder_state)
    weights = gmml_run / "encoder" / "model.safetensors"
    assert info["init"] == "gmml"
    assert info["path"] == str(weights.resolve())
    assert info["weights_sha256"] == _sha16(weights)
    run_json = json.loads((gmml_run / "run.json").read_text())
    source = info["source_run"]
    assert source["store_fingerprint"] == run_json["data"]["store_fingerprint"]
    assert source["images"] == run_json["data"]["images"]
    assert source["splits"] == ["train"]
    assert source["steps"] == 2 and source["steps_done"] == 2
    assert source["epochs"] == pytest.approx(2 / run_json["steps_per_epoch"], abs=1e-3)
    json.dumps(info)  # the record goes into model.json / run.json


def test_exported_encoder_folder_and_file(gmml_run, gmml_encoder_state, tmp_path: Path) -> None:
    for source in (gmml_run / "encoder", gmml_run / "encoder" / "model.safetensors"):
        encoder, info = load_init(str(source), **TINY)
        _assert_state_equal(encoder, gmml_encoder_state)
        assert info["init"] == "encoder"
        # The export sits in a run folder: its run.json says what pretraining saw.
        assert (
            info["source_run"]["images"]
            == json.loads((gmml_run / "run.json").read_text())["data"]["images"]
        )
        assert info["source_run"]["steps_done"] == 2
    # Copied elsewhere, the file still carries what engine.export stored in its header.
    outside = tmp_path / "encoder.safetensors"
    shutil.copy(gmml_run / "encoder" / "model.safetensors", outside)
    encoder, info = load_init(str(outside), **TINY)
    _assert_state_equal(encoder, gmml_encoder_state)
    assert info["init"] == "encoder" and info["source_run"]["spcxr"]["step"] == 2


def test_checkpoint_path_when_encoder_was_not_exported(
    checkpoint_only_run, gmml_encoder_state
) -> None:
    encoder, info = load_init(str(checkpoint_only_run), **TINY)
    _assert_state_equal(encoder, gmml_encoder_state)
    ckpt = checkpoint_only_run / "checkpoint.pt"
    assert info["init"] == "gmml" and info["path"] == str(ckpt.resolve())
    assert info["weights_sha256"] == _sha16(ckpt)
    assert info["source_run"]["steps_done"] == 2
    assert not export_is_current(checkpoint_only_run)  # not exported: not finished


def test_an_unfinished_pretraining_is_used_with_a_warning(
    checkpoint_only_run, caplog: pytest.LogCaptureFixture
) -> None:
    info_path = checkpoint_only_run / "run.json"
    info_path.write_text(json.dumps({**json.loads(info_path.read_text()), "steps": 5}))
    with caplog.at_level("WARNING", logger="spcxr.models.init_from"):
        _, info = load_init(str(checkpoint_only_run), **TINY)
    assert "has not finished (step 2 of 5)" in caplog.text
    assert (info["source_run"]["steps_done"], info["source_run"]["steps"]) == (2, 5)


def test_a_run_continued_past_its_export_says_which_step_the_export_holds(
    gmml_run, gmml_encoder_state, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A finished run resumed with more epochs (``--epochs 200 --resume``) keeps its old
    ``encoder/`` until it finishes again; fine-tuning from the folder meanwhile uses that export,
    records its step and warns."""
    run = tmp_path / "continued"
    shutil.copytree(gmml_run, run)
    info_path = run / "run.json"
    info_path.write_text(json.dumps({**json.loads(info_path.read_text()), "steps": 5}))
    with caplog.at_level("WARNING", logger="spcxr.models.init_from"):
        encoder, info = load_init(str(run), **TINY)
    _assert_state_equal(encoder, gmml_encoder_state)
    assert "exported at step 2, but the run now goes to step 5" in caplog.text
    assert not export_is_current(run) and export_is_current(gmml_run)
    assert (info["source_run"]["steps_done"], info["source_run"]["steps"]) == (2, 5)
    caplog.clear()
    with caplog.at_level("WARNING", logger="spcxr.models.init_from"):
        load_init(str(gmml_run), **TINY)  # a finished run's own export: no warning
    assert caplog.text == ""


def test_naming_checkpoint_pt_uses_it_even_with_an_export(gmml_run, gmml_encoder_state) -> None:
    encoder, info = load_init(str(gmml_run / "checkpoint.pt"), **TINY)
    _assert_state_equal(encoder, gmml_encoder_state)
    assert info["init"] == "gmml" and info["path"].endswith("checkpoint.pt")


def test_other_img_size_resamples_pos_embed_on_both_paths(
    gmml_run, checkpoint_only_run, gmml_encoder_state
) -> None:
    size = dict(TINY, img_size=48)  # grid 4x4 -> 6x6
    from_export, _ = load_init(str(gmml_run), **size)
    from_ckpt, _ = load_init(str(checkpoint_only_run), **size)
    expected = dict(gmml_encoder_state)
    expected["pos_embed"] = resample_abs_pos_embed(
        gmml_encoder_state["pos_embed"], new_size=[6, 6], old_size=[4, 4], num_prefix_tokens=1
    )
    assert from_export.pos_embed.shape == (1, 1 + 36, 192)
    _assert_state_equal(from_export, expected)
    _assert_state_equal(from_ckpt, expected)
    assert from_ckpt(torch.zeros(1, 1, 48, 48)).shape == (1, 192)


def test_three_channel_request_adapts_the_patch_kernel(gmml_run, gmml_encoder_state) -> None:
    encoder, _ = load_init(str(gmml_run), **TINY, in_chans=3)
    kernel = gmml_encoder_state["patch_embed.proj.weight"]
    assert torch.allclose(encoder.patch_embed.proj.weight, kernel.repeat(1, 3, 1, 1) / 3)


@pytest.mark.parametrize("kind", ["export", "checkpoint"])
def test_patch_or_arch_mismatch_names_file_and_values(kind, gmml_run, checkpoint_only_run) -> None:
    run = gmml_run if kind == "export" else checkpoint_only_run
    weights = "model.safetensors" if kind == "export" else "checkpoint.pt"
    with pytest.raises(ValueError, match=rf"{weights}.*patch_size': \(8, 16\)"):
        load_init(str(run), **dict(TINY, patch_size=16))
    with pytest.raises(ValueError, match=rf"{weights}.*vit_small.*embed_dim': \(192, 384\)"):
        load_init(str(run), **dict(TINY, arch="vit_small"))


def test_finetuned_folder_gives_its_encoder(tmp_path: Path) -> None:
    torch.manual_seed(0)
    cfg = ClassifierConfig(**TINY)
    model = Classifier(create_encoder(**TINY), num_classes=2)
    save_classifier(model, cfg, ["normal", "abnormal"], tmp_path / "model", extra={"k": 1})
    # A fine-tuning run folder keeps its best model in model/.
    encoder, info = load_init(str(tmp_path), **dict(TINY, img_size=40))
    assert info["init"] == "finetuned" and info["source_run"]["extra"] == {"k": 1}
    assert info["source_run"]["task"] == "classification"
    assert torch.equal(encoder.blocks[5].mlp.fc1.weight, model.encoder.blocks[5].mlp.fc1.weight)
    assert encoder.pos_embed.shape == (1, 1 + 25, 192)
    state, meta = read_model_dir(tmp_path / "model")
    assert meta["weights_sha256"] == info["weights_sha256"]
    assert set(state) == set(model.state_dict())


def test_plain_encoder_file_without_run(tmp_path: Path) -> None:
    torch.manual_seed(1)
    source = create_encoder(**TINY)
    path = save_encoder(source, tmp_path / "enc.safetensors")
    encoder, info = load_init(str(path), **TINY)
    _assert_state_equal(encoder, source.state_dict())
    assert info["init"] == "encoder" and info["source_run"] is None


def test_bad_sources_raise_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_init(str(tmp_path / "nowhere"), **TINY)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty: not an init source"):
        load_init(str(tmp_path / "empty"), **TINY)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model.json").write_text("{not json")
    (bad / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match=r"bad/model.json: not valid JSON"):
        load_init(str(bad), **TINY)
