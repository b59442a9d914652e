"""Runs in pieces: a step or time budget checkpoints and exits; resuming ends bitwise identical."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch
from tests.conftest import (
    console_script,
    sigterm_group_after_first_log_line,
    tiny_pretrain_config,
)

from spcxr.cli import main
from spcxr.pretrain.engine import PretrainConfig, Pretrainer, parse_duration, pretrain
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


def _signal_at_step(monkeypatch, step: int, *signums: int) -> None:
    """Deliver ``signums`` to this process while optimisation step ``step`` (1-based) runs."""
    original = Pretrainer.train_step
    calls = {"n": 0}

    def train_step(self, batches):
        calls["n"] += 1
        if calls["n"] == step:
            for signum in signums:
                os.kill(os.getpid(), signum)
        return original(self, batches)

    monkeypatch.setattr(Pretrainer, "train_step", train_step)


def test_sigterm_ends_the_step_checkpoints_there_and_resumes_bitwise(
    tiny_store: Path, tmp_path: Path, monkeypatch
) -> None:
    """A scheduler's SIGTERM at step 3: the step completes, the checkpoint holds step 3 (not the
    last periodic one: checkpoint_every is 1000), and the resumed run equals an uninterrupted one."""
    whole = pretrain(_config(tiny_store, tmp_path / "whole"))
    before = signal.getsignal(signal.SIGTERM)
    _signal_at_step(monkeypatch, 3, signal.SIGTERM)
    cut = pretrain(_config(tiny_store, tmp_path / "cut"))
    assert cut.budget_stop == "SIGTERM" and cut.steps == 3 and cut.encoder_path is None
    assert load_checkpoint(tmp_path / "cut" / "checkpoint.pt")["step"] == 3
    assert signal.getsignal(signal.SIGTERM) is before  # the handler is only there during the run
    monkeypatch.undo()
    resumed = pretrain(_config(tiny_store, tmp_path / "cut", resume=True))
    assert resumed.budget_stop is None and resumed.steps == whole.steps
    a = load_checkpoint(tmp_path / "whole" / "checkpoint.pt")["model"]
    b = load_checkpoint(tmp_path / "cut" / "checkpoint.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_second_ctrl_c_stops_at_once(tiny_store: Path, tmp_path: Path, monkeypatch) -> None:
    """One Ctrl-C asks for a checkpointed stop; a second one does not wait for it."""
    before = signal.getsignal(signal.SIGINT)
    _signal_at_step(monkeypatch, 2, signal.SIGINT, signal.SIGINT)
    with pytest.raises(KeyboardInterrupt, match="second interrupt"):
        pretrain(_config(tiny_store, tmp_path / "run"))
    assert not (tmp_path / "run" / "checkpoint.pt").exists()  # no checkpoint was due yet
    assert signal.getsignal(signal.SIGINT) is before


def test_cli_sigterm_exits_143_with_the_checkpoint_at_the_last_step(
    tiny_store: Path, tmp_path: Path
) -> None:
    """The installed script, stopped mid-run by SIGTERM to its whole process group, as
    ``kill -- -PGID`` or a cluster scheduler sends it: the data-loader worker gets it too and must
    not take the main process down with it (torch aborts when a worker is killed)."""
    run = tmp_path / "run"
    argv = [
        console_script(), "pretrain", "--store", str(tiny_store), "--out", str(run),
        "--model-arch", "vit_tiny", "--model-img-size", "32", "--model-patch-size", "8",
        "--batch-size", "8", "--device", "cpu", "--precision", "fp32", "--workers", "1",
        "--max-steps", "100000", "--log-every", "1", "--checkpoint-every", "100000",
        "--no-progress", "--no-tensorboard",
    ]  # fmt: skip
    status, out, err = sigterm_group_after_first_log_line(argv, run)
    assert status == 128 + signal.SIGTERM, err
    assert "Traceback" not in err
    step = load_checkpoint(run / "checkpoint.pt")["step"]
    logged = [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()]
    assert step >= 1 and step >= max(logged)
    assert f"stopped by SIGTERM at step {step} of 100000; checkpoint saved." in out
    assert out.strip().endswith("--no-tensorboard --resume")


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
