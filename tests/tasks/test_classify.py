"""``spcxr finetune`` end to end on the synthetic store: runs, budgets, folds, resume, init."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from spcxr.data.labels import LabelConfig
from spcxr.data.store import PreparedStore
from spcxr.models.classifier import ClassifierConfig
from spcxr.tasks.classify import FinetuneConfig, finetune, select_rows
from spcxr.tasks.loop import FinetuneOptimConfig, TrainConfig

ABNORMAL = LabelConfig(
    classes=["normal", "abnormal"],
    rename=["consolidation=abnormal", "bilateral_opacities=abnormal"],
)


def _config(store: Path, out: Path, **kw) -> FinetuneConfig:
    train = TrainConfig(
        epochs=1,
        min_steps=6,
        batch_size=16,
        eval_every=3,
        patience=0,
        device="cpu",
        workers=0,
        progress=False,
        tensorboard=False,
        optim=FinetuneOptimConfig(lr=2e-3, warmup_epochs=0.0),
    )
    base = dict(
        store=str(store),
        out=str(out),
        labels=ABNORMAL,
        model=ClassifierConfig(arch="vit_tiny", img_size=32, patch_size=8, head="both"),
        train=train,
    )
    base.update(kw)
    return FinetuneConfig(**base)


def test_finetune_writes_model_run_info_and_selects_on_validation(synth_store, tmp_path) -> None:
    info = finetune(_config(synth_store, tmp_path / "run"))
    run = tmp_path / "run"
    assert (run / "model" / "model.safetensors").is_file()
    saved = json.loads((run / "run.json").read_text())
    assert saved["finished"] and saved["steps"] == 6
    assert saved["data"]["classes"] == ["normal", "abnormal"]
    assert saved["data"]["train"]["images"] + 0 > 0
    log = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [3, 6]
    assert all("val_macro_auroc" in r and "val_loss" in r for r in log)
    best = max(log, key=lambda r: r["val_macro_auroc"])
    assert info["best_step"] == best["step"]
    rows = pd.read_csv(run / "train_rows.csv")
    store = PreparedStore(synth_store)
    assert set(store.manifest["split"].iloc[rows["row"]]) == {"train"}


def test_a_small_validation_split_is_called_noisy(synth_store, tmp_path, caplog) -> None:
    from spcxr.tasks.classify import SMALL_VALIDATION_PER_CLASS, _warn_if_small_validation

    with caplog.at_level("WARNING", logger="spcxr"):
        finetune(_config(synth_store, tmp_path / "run"))
    val = json.loads((tmp_path / "run" / "run.json").read_text())["data"]["val"]["per_class"]
    assert min(val.values()) < SMALL_VALIDATION_PER_CLASS  # the synthetic store's few images
    (said,) = [r.getMessage() for r in caplog.records if "validation split:" in r.getMessage()]
    fewest = min(val, key=val.__getitem__)
    assert f"only {val[fewest]} of class {fewest!r}" in said and "noisy" in said

    caplog.clear()
    enough = np.repeat([0, 1], SMALL_VALIDATION_PER_CLASS)
    with caplog.at_level("WARNING", logger="spcxr"):
        _warn_if_small_validation(enough, ["normal", "abnormal"])
        _warn_if_small_validation(enough[:-1], ["normal", "abnormal"])
        _warn_if_small_validation(np.zeros(3, int), ["normal", "abnormal"])  # warned elsewhere
    assert (
        len(caplog.records) == 1 and "only 9 of class 'abnormal'" in caplog.records[0].getMessage()
    )


def test_label_budget_is_by_patient_and_nested(synth_store) -> None:
    store = PreparedStore(synth_store)
    small = select_rows(store, _config(synth_store, "x", budget="2/class"))
    large = select_rows(store, _config(synth_store, "x", budget="5/class"))
    full = select_rows(store, _config(synth_store, "x"))
    assert set(small.train) <= set(large.train) <= set(full.train)
    counts = np.bincount(small.y_train, minlength=2)
    assert (counts >= 2).all()
    groups = store.manifest["group"]
    chosen = set(groups.iloc[small.train])
    every = groups.iloc[full.train]
    assert set(every[every.isin(chosen)].index) == set(store.manifest.index[small.train])


def test_kfold_holds_out_whole_patients_and_keeps_last_state(synth_store, tmp_path) -> None:
    store = PreparedStore(synth_store)
    cfgs = [_config(synth_store, tmp_path / f"f{k}", n_folds=3, fold=k) for k in range(3)]
    parts = [select_rows(store, c) for c in cfgs]
    held = [set(p.heldout) for p in parts]
    assert not (held[0] & held[1]) and not (held[1] & held[2])
    g = store.manifest["group"]
    for p in parts:
        assert not set(g.iloc[p.train]) & set(g.iloc[p.heldout])
    info = finetune(cfgs[0])
    assert info["best_step"] == info["steps"]  # no selection without a validation split


def test_resume_gives_the_same_model(synth_store, tmp_path, monkeypatch) -> None:
    from safetensors.torch import load_file

    finetune(_config(synth_store, tmp_path / "full"))
    import spcxr.tasks.loop as loop

    real = loop.save_checkpoint
    calls = {"n": 0}

    def crash_after_first(state, path):
        real(state, path)
        calls["n"] += 1
        if calls["n"] == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(loop, "save_checkpoint", crash_after_first)
    with pytest.raises(KeyboardInterrupt):
        finetune(_config(synth_store, tmp_path / "cut"))
    monkeypatch.setattr(loop, "save_checkpoint", real)
    cfg = _config(synth_store, tmp_path / "cut")
    cfg.train.resume = True
    finetune(cfg)
    a = load_file(tmp_path / "full" / "model" / "model.safetensors")
    b = load_file(tmp_path / "cut" / "model" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def _signal_at_step(monkeypatch, step: int, signum: int) -> None:
    """Deliver ``signum`` to this process while optimisation step ``step`` (1-based) runs."""
    import os

    import spcxr.tasks.loop as loop

    real, calls = loop.phase_lr, {"n": 0}

    def phase_lr(*args):
        calls["n"] += 1
        if calls["n"] == step:
            os.kill(os.getpid(), signum)
        return real(*args)

    monkeypatch.setattr(loop, "phase_lr", phase_lr)


def test_sigterm_between_validations_checkpoints_there_and_resumes_exactly(
    synth_store, tmp_path, monkeypatch
) -> None:
    """SIGTERM at step 4 (validations at 3 and 6): the step completes, the checkpoint holds
    step 4, run.json says where it stopped and is not finished; resumed, the run ends with the
    uninterrupted run's model and log (the training loss since step 3 is carried over)."""
    import signal

    from safetensors.torch import load_file

    from spcxr.errors import RunStopped
    from spcxr.train.checkpoint import load_checkpoint

    finetune(_config(synth_store, tmp_path / "full"))
    before = signal.getsignal(signal.SIGTERM)
    _signal_at_step(monkeypatch, 4, signal.SIGTERM)
    with pytest.raises(RunStopped, match=r"stopped by SIGTERM at step 4 of 6.*--train-resume") as e:
        finetune(_config(synth_store, tmp_path / "cut"))
    assert e.value.exit_status == 143
    assert signal.getsignal(signal.SIGTERM) is before
    monkeypatch.undo()
    cut = tmp_path / "cut"
    assert load_checkpoint(cut / "checkpoint.pt")["step"] == 4
    info = json.loads((cut / "run.json").read_text())
    assert info["stopped"] == {"by": "SIGTERM", "step": 4} and "finished" not in info
    cfg = _config(synth_store, cut)
    cfg.train.resume = True
    done = finetune(cfg)
    assert done["steps"] == 6 and done["finished"]
    a = load_file(tmp_path / "full" / "model" / "model.safetensors")
    b = load_file(cut / "model" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    logs = [
        [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
        for run in (tmp_path / "full", cut)
    ]
    assert logs[0] == logs[1] and [r["step"] for r in logs[1]] == [3, 6]


def test_cli_finetune_stopped_by_sigterm_exits_143_and_says_how_to_continue(
    synth_store, tmp_path
) -> None:
    """The installed script, SIGTERM to its process group mid-run (data-loader worker included)."""
    from tests.conftest import console_script, sigterm_group_after_first_log_line

    run = tmp_path / "run"
    argv = [
        console_script(), "finetune", "--store", str(synth_store), "--out", str(run),
        "--labels-classes", "normal", "abnormal",
        "--labels-rename", "consolidation=abnormal", "bilateral_opacities=abnormal",
        "--model-arch", "vit_tiny", "--model-img-size", "32", "--model-patch-size", "8",
        "--train-min-steps", "100000", "--train-batch-size", "8", "--train-eval-every", "1",
        "--train-patience", "0", "--train-device", "cpu", "--train-workers", "1",
        "--no-train-progress", "--no-train-tensorboard",
    ]  # fmt: skip
    status, _, err = sigterm_group_after_first_log_line(argv, run)
    assert status == 143, err
    assert "stopped by SIGTERM at step" in err and "--train-resume" in err, err
    assert "Traceback" not in err
    from spcxr.train.checkpoint import load_checkpoint

    step = json.loads((run / "run.json").read_text())["stopped"]["step"]
    assert load_checkpoint(run / "checkpoint.pt")["step"] == step >= 1


def test_linear_probe_changes_only_the_head(synth_store, tmp_path) -> None:
    from safetensors.torch import load_file

    finetune(_config(synth_store, tmp_path / "gmml_free", mode="linear"))
    w = load_file(tmp_path / "gmml_free" / "model" / "model.safetensors")
    torch.manual_seed(0)
    # the encoder of a linear probe is the initial one: rebuild it from the same seed
    from spcxr.models.classifier import build_classifier
    from spcxr.rng import derive_seed

    torch.manual_seed(derive_seed(0, "init"))
    model, _ = build_classifier(_config(synth_store, "x").model, 2, "scratch")
    init = model.state_dict()
    enc = [k for k in w if k.startswith("encoder.")]
    assert enc and all(torch.equal(w[k], init[k]) for k in enc)
    head = [k for k in w if not k.startswith("encoder.")]
    assert any(not torch.equal(w[k], init[k]) for k in head)


def test_probe_then_finetune_freezes_the_encoder_for_the_probe_phase_only(
    synth_store, tmp_path, monkeypatch
) -> None:
    """LP-FT: 3 of 6 steps train the head alone; the encoder moves only afterwards; a run cut
    at the switch resumes to the same model as one that was not cut."""
    from safetensors.torch import load_file

    from spcxr.models.classifier import build_classifier
    from spcxr.rng import derive_seed
    from spcxr.train.checkpoint import load_checkpoint

    def cfg(out: str, resume: bool = False) -> FinetuneConfig:
        c = _config(synth_store, tmp_path / out, mode="probe_finetune", probe_fraction=0.5)
        c.train.resume = resume
        return c

    finetune(cfg("full"))
    import spcxr.tasks.loop as loop

    real = loop.save_checkpoint

    def crash_at_the_switch(state, path):
        real(state, path)
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "save_checkpoint", crash_at_the_switch)
    with pytest.raises(KeyboardInterrupt):
        finetune(cfg("cut"))
    monkeypatch.setattr(loop, "save_checkpoint", real)
    at_switch = load_checkpoint(tmp_path / "cut" / "checkpoint.pt", map_location="cpu")
    assert at_switch["step"] == 3
    torch.manual_seed(derive_seed(0, "init"))
    model, _ = build_classifier(cfg("x").model, 2, "scratch")
    init = model.state_dict()
    enc = [k for k in init if k.startswith("encoder.")]
    head = [k for k in init if k.startswith("head.")]
    assert all(torch.equal(at_switch["model"][k], init[k]) for k in enc)
    assert any(not torch.equal(at_switch["model"][k], init[k]) for k in head)
    finetune(cfg("cut", resume=True))
    state = load_checkpoint(tmp_path / "cut" / "checkpoint.pt", map_location="cpu")
    assert state["step"] == 6
    assert any(not torch.equal(state["model"][k], init[k]) for k in enc)
    a = load_file(tmp_path / "full" / "model" / "model.safetensors")
    b = load_file(tmp_path / "cut" / "model" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_errors_name_the_problem(synth_store, tmp_path) -> None:
    with pytest.raises(ValueError, match="--store"):
        finetune(FinetuneConfig())
    with pytest.raises(ValueError, match="mode"):
        FinetuneConfig(mode="probe")
    with pytest.raises(ValueError, match="--probe-fraction"):
        FinetuneConfig(mode="probe_finetune", probe_fraction=1.0)
    with pytest.raises(ValueError, match=r"no training rows|fewer than two"):
        finetune(_config(synth_store, tmp_path / "e", sources=["nope"]))


def test_budget_seeds_train_one_run_per_draw_and_skip_finished_draws(synth_store, tmp_path) -> None:
    from spcxr.cli import main
    from spcxr.tasks.loop import parse_seeds, run_draws

    assert parse_seeds("0-4") == [0, 1, 2, 3, 4]
    assert parse_seeds("0,2,5") == [0, 2, 5] and parse_seeds("0-1,7") == [0, 1, 7]
    for bad in ("3-1", "a", "1,1"):
        with pytest.raises(ValueError, match="--budget-seeds"):
            parse_seeds(bad)
    config = _config(synth_store, tmp_path / "draws", budget="3/class", budget_seeds="0,2")
    first = run_draws(config, finetune)
    assert [r["run_dir"] for r in first] == [str(tmp_path / "draws" / f"draw-{s}") for s in (0, 2)]
    assert [r["data"]["budget_seed"] for r in first] == [0, 2]
    rows = [
        set(pd.read_csv(tmp_path / "draws" / f"draw-{s}" / "train_rows.csv")["pixel_hash"])
        for s in (0, 2)
    ]
    assert rows[0] != rows[1]  # two different label draws
    stamp = (tmp_path / "draws" / "draw-0" / "run.json").stat().st_mtime_ns
    again = run_draws(config, finetune)
    assert all(r["skipped"] for r in again)
    assert (tmp_path / "draws" / "draw-0" / "run.json").stat().st_mtime_ns == stamp
    # the CLI spells it --budget-seeds; a finished draw is reported, an unfinished one resumed
    (tmp_path / "draws" / "draw-2" / "run.json").unlink()
    code = main(
        ["finetune", "--config", str(tmp_path / "draws" / "draw-0" / "config.yaml"),
         "--out", str(tmp_path / "draws"), "--budget-seeds", "0,2", "--train-resume"]
    )  # fmt: skip
    assert code == 0
    assert json.loads((tmp_path / "draws" / "draw-2" / "run.json").read_text())["finished"]
    assert (tmp_path / "draws" / "draw-0" / "run.json").stat().st_mtime_ns == stamp
