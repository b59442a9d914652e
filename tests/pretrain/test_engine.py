"""The GMML training loop: outputs, schedules, exact resume, SIGKILL safety, DDP equivalence."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tests.conftest import tiny_pretrain_config, wait_for_first_log_line

from spcxr.pretrain import engine
from spcxr.pretrain.engine import (
    NonFiniteLossError,
    PretrainConfig,
    Pretrainer,
    pretrain,
)
from spcxr.pretrain.gmml import GMMLConfig
from spcxr.train.checkpoint import load_checkpoint
from spcxr.train.logging import read_log
from spcxr.train.schedule import cosine_schedule

TINY = [
    "--model-arch",
    "vit_tiny",
    "--model-img-size",
    "32",
    "--model-patch-size",
    "8",
    "--model-drop-path-rate",
    "0",
    "--batch-size",
    "8",
    "--device",
    "cpu",
    "--workers",
    "0",
    "--no-progress",
    "--no-tensorboard",
]


def _config(store: Path, out: Path, **kw) -> PretrainConfig:
    return tiny_pretrain_config(store, out, **{"max_steps": 8, **kw})


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(run / "checkpoint.pt")["model"]


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def test_cosine_schedule_matches_reference_shape() -> None:
    # Linear warm-up from 0 over 10 steps, then cosine from base to final at step 110.
    assert cosine_schedule(0, 110, 1.0, 0.0, 10) == 0.0
    assert cosine_schedule(5, 110, 1.0, 0.0, 10) == pytest.approx(0.5)
    assert cosine_schedule(10, 110, 1.0, 0.0, 10) == pytest.approx(1.0)
    assert cosine_schedule(60, 110, 1.0, 0.0, 10) == pytest.approx(0.5)
    assert cosine_schedule(110, 110, 1.0, 1e-6, 10) == pytest.approx(1e-6)
    # Weight decay: cosine 0.04 -> 0.4 without warm-up.
    assert cosine_schedule(0, 100, 0.04, 0.4) == pytest.approx(0.04)
    assert cosine_schedule(50, 100, 0.04, 0.4) == pytest.approx(0.22)


def test_run_writes_config_logs_previews_checkpoint_and_timm_encoder(
    tiny_store: Path, tmp_path: Path
) -> None:
    import timm

    run = tmp_path / "run"
    result = pretrain(_config(tiny_store, run, tensorboard=True))
    assert result.steps == 8
    for name in ("config.yaml", "run.json", "log.jsonl", "checkpoint.pt"):
        assert (run / name).is_file(), name
    info = json.loads((run / "run.json").read_text())
    assert info["seed"] == 0 and info["versions"]["torch"] == torch.__version__
    assert info["data"]["splits"] == ["train"]
    assert info["data"]["images"] < 96  # val and test images are not used for pretraining
    records = read_log(run)
    assert [r["step"] for r in records] == [2, 4, 6, 8]
    assert {"loss", "lr", "wd", "views_per_s", "grad_norm"} <= records[0].keys()
    assert records[0]["lr"] < records[1]["lr"]  # warm-up (1 step here), then cosine decay
    assert list((run / "tb").glob("events.out.tfevents.*"))
    previews = sorted((run / "previews").glob("*.png"))
    assert [p.name for p in previews] == ["step_0000004.png", "step_0000008.png"]
    state = load_checkpoint(run / "checkpoint.pt")
    assert state["step"] == 8 and state["config"]["batch_size"] == 8
    # The encoder loads into timm as a plain state dict (safetensors).
    model = timm.create_model(
        "vit_tiny_patch8_224"
        if "vit_tiny_patch8_224" in timm.list_models()
        else "vit_tiny_patch16_224",
        pretrained=True,
        pretrained_cfg_overlay=dict(
            file=str(result.encoder_path), num_classes=0, input_size=(1, 32, 32)
        ),
        in_chans=1,
        img_size=32,
        patch_size=8,
    )
    enc = {k: v for k, v in state["model"].items() if k.startswith("encoder.")}
    for key, value in model.state_dict().items():
        assert torch.equal(value, enc[f"encoder.{key}"]), key


def test_resume_continues_exactly(tiny_store: Path, tmp_path: Path, monkeypatch) -> None:
    """Interrupt after 6 steps (checkpoint at 4), resume, and match an uninterrupted run.

    Tolerance: exact equality (same operations in the same order on the CPU).
    """
    pretrain(_config(tiny_store, tmp_path / "full"))
    calls = {"n": 0}
    original = Pretrainer.train_step

    def crash_after_six(self, batches):
        calls["n"] += 1
        if calls["n"] == 7:
            raise KeyboardInterrupt("simulated interruption")
        return original(self, batches)

    monkeypatch.setattr(Pretrainer, "train_step", crash_after_six)
    with pytest.raises(KeyboardInterrupt):
        pretrain(_config(tiny_store, tmp_path / "cut"))
    assert load_checkpoint(tmp_path / "cut" / "checkpoint.pt")["step"] == 4
    monkeypatch.setattr(Pretrainer, "train_step", original)
    resumed = pretrain(_config(tiny_store, tmp_path / "cut", resume=True))
    assert resumed.steps == 8
    assert _max_diff(_weights(tmp_path / "full"), _weights(tmp_path / "cut")) == 0.0
    full_log = {r["step"]: r["loss"] for r in read_log(tmp_path / "full")}
    cut_log = {r["step"]: r["loss"] for r in read_log(tmp_path / "cut")}
    assert cut_log[8] == full_log[8]


def test_resume_refuses_changed_settings_and_existing_runs(
    tiny_store: Path, tmp_path: Path
) -> None:
    pretrain(_config(tiny_store, tmp_path / "r", max_steps=2, checkpoint_every=2))
    with pytest.raises(ValueError, match="already holds a run"):
        Pretrainer(_config(tiny_store, tmp_path / "r", max_steps=2))
    with pytest.raises(ValueError, match=r"different settings: \[.batch_size.\]"):
        Pretrainer(_config(tiny_store, tmp_path / "r", batch_size=16, resume=True))


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(
    tiny_store: Path, tmp_path: Path, monkeypatch
) -> None:
    original = engine.reconstruction_loss_terms
    calls = {"n": 0}

    def nan_from_step_five(recon, clean, mask, loss_on):
        calls["n"] += 1
        total, count = original(recon, clean, mask, loss_on)
        return (total * float("nan"), count) if calls["n"] >= 5 else (total, count)

    monkeypatch.setattr(engine, "reconstruction_loss_terms", nan_from_step_five)
    with pytest.raises(
        NonFiniteLossError, match=r"non-finite loss at step 4.*last good checkpoint \(step 4\)"
    ):
        pretrain(_config(tiny_store, tmp_path / "nan"))
    state = load_checkpoint(tmp_path / "nan" / "checkpoint.pt")
    assert state["step"] == 4
    assert all(torch.isfinite(v).all() for v in state["model"].values())


def _spcxr(*args: str, env: dict | None = None) -> list[str]:
    return [sys.executable, "-m", "spcxr", "pretrain", *args]


@pytest.mark.slow
def test_sigkill_at_any_moment_leaves_a_loadable_checkpoint(
    tiny_store: Path, tmp_path: Path
) -> None:
    run = tmp_path / "killed"
    args = [
        "--store",
        str(tiny_store),
        "--out",
        str(run),
        *TINY,
        "--max-steps",
        "60",
        "--checkpoint-every",
        "1",
        "--log-every",
        "1",
        "--preview-every",
        "1000",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        _spcxr(*args), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.time() + 600  # generous: the machine may be busy with other work
    while time.time() < deadline and not (run / "checkpoint.pt").exists():
        time.sleep(0.05)
    time.sleep(0.7)  # somewhere in the middle of writing checkpoints every step
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    state = load_checkpoint(run / "checkpoint.pt")
    assert 1 <= state["step"] < 60
    # And the run resumes from it (the checkpoint interval may change on resume).
    resume = [
        *args[:-6],
        "--resume",
        "--checkpoint-every",
        "1000",
        "--log-every",
        "1000",
        "--preview-every",
        "1000",
    ]
    done = subprocess.run(_spcxr(*resume), env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert load_checkpoint(run / "checkpoint.pt")["step"] == 60
    # A temporary checkpoint the kill may have left is removed when the run starts again.
    assert not list(run.glob(".*.tmp")) and not list(run.glob("*/.*.tmp"))
    steps = [r["step"] for r in read_log(run)]
    assert steps == sorted(set(steps))  # each step logged once, in order


@pytest.mark.slow
def test_two_process_ddp_matches_one_process(tiny_store: Path, tmp_path: Path) -> None:
    """torchrun (gloo, 2 CPU processes x 4 images) vs 1 process x 8 images, 4 steps.

    Replacement donors are drawn within each process's batch, so the one-process run uses
    ``--masking-donor-block 4``; stochastic depth draws per process, so it is off (0) in both.
    Tolerance: 1e-5 absolute on every weight (gloo sums gradients in another order).
    """
    common = [
        "--store",
        str(tiny_store),
        *TINY,
        "--max-steps",
        "4",
        "--checkpoint-every",
        "4",
        "--log-every",
        "1",
        "--masking-donor-block",
        "4",
        "--preview-every",
        "1000",
        "--masking-corruptions",
        "noise",
        "zeros",
        "copy",
        "--optim-lr",
        "0.05",
        "--optim-warmup-epochs",
        "0",
        # float32: one and two processes agree to summation order; bf16 rounding would not.
        "--precision",
        "fp32",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run(
        _spcxr("--out", str(tmp_path / "one"), *common),
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            "2",
            "--master-port",
            str(29500 + os.getpid() % 1000),
            "-m",
            "spcxr",
            "pretrain",
            "--out",
            str(tmp_path / "two"),
            *common,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    assert _max_diff(a, b) < 1e-5
    # The weights moved (so equality is not trivial) and the logged losses agree.
    init = Pretrainer(
        _config(
            tiny_store,
            tmp_path / "init",
            model=GMMLConfig(arch="vit_tiny", img_size=32, patch_size=8, drop_path_rate=0.0),
        )
    ).model.state_dict()
    assert _max_diff(a, init) > 1e-3
    la = [r["loss"] for r in read_log(tmp_path / "one")]
    lb = [r["loss"] for r in read_log(tmp_path / "two")]
    assert la == pytest.approx(lb, abs=1e-5)


@pytest.mark.slow
def test_ddp_ranks_agree_on_the_step_where_a_signal_stops_them(
    tiny_store: Path, tmp_path: Path
) -> None:
    """SIGTERM to one of two torchrun workers only: both leave at the same step (a rank that
    stopped alone would leave the other waiting in its next gradient all-reduce forever). Without
    a time budget the ranks compare signals every ``log_every`` (here 3) steps."""
    run = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
        "--master-port", str(29500 + (os.getpid() + 7) % 1000), "-m", "spcxr", "pretrain",
        "--store", str(tiny_store), "--out", str(run), *TINY, "--max-steps", "100000",
        "--checkpoint-every", "100000", "--log-every", "3", "--preview-every", "100000",
        "--precision", "fp32",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_first_log_line(proc, run, timeout=180)
        workers = subprocess.run(
            ["pgrep", "-P", str(proc.pid)], capture_output=True, text=True, check=True
        ).stdout.split()
        assert len(workers) == 2, workers
        os.kill(int(workers[1]), signal.SIGTERM)
        out, err = proc.communicate(timeout=180)
    finally:
        proc.kill()
    stops = re.findall(r"stopped by SIGTERM at step (\d+) of 100000", out)
    assert len(stops) == 2 and stops[0] == stops[1], out + err[-3000:]
    step = int(stops[0])
    assert step % 3 == 0
    assert load_checkpoint(run / "checkpoint.pt")["step"] == step


def test_gradient_accumulation_sees_the_whole_batch_per_step(
    tiny_store: Path, tmp_path: Path, monkeypatch
) -> None:
    seen: list[int] = []
    original = Pretrainer.train_step

    def record(self, batches):
        seen.append(sum(b.shape[0] for b in batches))
        assert len(batches) == 2
        return original(self, batches)

    monkeypatch.setattr(Pretrainer, "train_step", record)
    result = pretrain(
        _config(tiny_store, tmp_path / "acc", accum_steps=2, max_steps=3, log_every=1)
    )
    assert seen == [8, 8, 8] and result.steps == 3
    assert all(torch.isfinite(torch.tensor(loss)) for _, loss in result.losses)
    with pytest.raises(ValueError, match="accumulation"):
        Pretrainer(_config(tiny_store, tmp_path / "bad", accum_steps=3))


@pytest.mark.parametrize(
    "name", sorted(p.name for p in (Path(__file__).parents[2] / "configs").glob("pretrain_*.yaml"))
)
def test_the_shipped_long_cpu_pretraining_configs_are_valid_and_resumable(name: str) -> None:
    """Every shipped long-run config loads (its settings pass validation) and runs in
    resumable, time-budgeted pieces with the feature monitor on (issue 14, point 3)."""
    from spcxr.config import load_yaml
    from spcxr.pretrain.engine import PretrainConfig

    config = load_yaml(PretrainConfig, Path(__file__).parents[2] / "configs" / name)
    assert config.resume and config.time_budget and config.monitor_every > 0
    assert config.store == "runs/study_cpu/store" and config.splits == ["train"]
