"""Runs in pieces: a step or time budget checkpoints and exits; resuming ends bitwise identical."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tests.conftest import tiny_pretrain_config

from spcxr.cli import main
from spcxr.pretrain.engine import PretrainConfig, parse_duration, pretrain
from spcxr.train.checkpoint import load_checkpoint


def _config(store: Path, out: Path, **kw) -> PretrainConfig:
    return tiny_pretrain_config(
        store,
        out,
        **{
            "epochs": 1.0,
            "max_steps": 0,
            "precision": "fp32",
            "checkpoint_every": 1000,
            "preview_every": 1000,
            **kw,
        },
    )


def test_parse_duration() -> None:
    assert parse_duration("2h") == 7200
    assert parse_duration("90m") == 5400
    assert parse_duration("1h30m") == 5400
    assert parse_duration("45s") == parse_duration("45") == 45
    assert parse_duration("") is None
    for bad in ("soon", "2d", "-1h", "0"):
        with pytest.raises(ValueError, match="--time-budget"):
            parse_duration(bad)


def test_pieces_by_step_budget_end_bitwise_identical(tiny_store: Path, tmp_path: Path) -> None:
    """Three invocations of at most 3 steps each == one uninterrupted run (exact equality)."""
    whole = pretrain(_config(tiny_store, tmp_path / "whole"))
    total = whole.total_steps
    assert total > 6 and whole.budget_stop is None
    done = []
    while not done or done[-1].budget_stop:
        piece = pretrain(_config(tiny_store, tmp_path / "pieces", step_budget=3, resume=True))
        done.append(piece)
        if piece.budget_stop:
            # A piece checkpoints where it stopped and exports no encoder (not finished).
            assert piece.budget_stop == "step_budget" and piece.encoder_path is None
            assert load_checkpoint(tmp_path / "pieces" / "checkpoint.pt")["step"] == piece.steps
            assert not (tmp_path / "pieces" / "encoder").exists()
    assert [p.steps for p in done] == [*range(3, total, 3), total]
    a = load_checkpoint(tmp_path / "whole" / "checkpoint.pt")
    b = load_checkpoint(tmp_path / "pieces" / "checkpoint.pt")
    assert a["step"] == b["step"] == total
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    from safetensors.torch import load_file

    enc_a = load_file(whole.encoder_path)
    enc_b = load_file(done[-1].encoder_path)
    assert enc_a.keys() == enc_b.keys()
    assert all(torch.equal(enc_a[k], enc_b[k]) for k in enc_a)


def test_cli_time_budget_exits_zero_with_the_resume_command(
    tiny_store: Path, tmp_path: Path, capsys
) -> None:
    args = [
        "pretrain",
        "--store",
        str(tiny_store),
        "--out",
        str(tmp_path / "run"),
        "--model-arch",
        "vit_tiny",
        "--model-img-size",
        "32",
        "--model-patch-size",
        "8",
        "--batch-size",
        "8",
        "--device",
        "cpu",
        "--precision",
        "fp32",
        "--workers",
        "0",
        "--no-progress",
        "--no-tensorboard",
        "--time-budget",
        "0.001s",
    ]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "--time-budget spent at step 1 of" in out
    assert out.strip().endswith(" ".join(args[:1] + args[1:]) + " --resume")
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt")["step"] == 1
    # The printed command continues the run (another step under the same budget).
    assert main([*args, "--resume"]) == 0
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt")["step"] == 2
