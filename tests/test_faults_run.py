"""Fault injection for runs (pretrain, finetune, segment, export, evaluate): every fault ends in
one line that names the flag or the file, the documented exit status (2: usage error, found
before any work; 1: the run failed, e.g. a full disk), nothing torn, no orphan temporary file,
and an exact resume.

Faults that root cannot produce (a chmod'ed folder) are injected by monkeypatching the one
system call that would fail; tests that need the real thing skip under root with the reason.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from tests.conftest import console_script

import spcxr.atomic as atomic
from spcxr.atomic import atomic_write_text
from spcxr.cli import main
from spcxr.train.checkpoint import load_checkpoint, save_checkpoint
from spcxr.train.logging import read_log

SRC = Path(__file__).resolve().parents[1] / "src"

PRETRAIN = [
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
    "--optim-lr",
    "1e-3",
    "--optim-warmup-epochs",
    "0.2",
    "--device",
    "cpu",
    "--workers",
    "0",
    "--log-every",
    "2",
    "--checkpoint-every",
    "4",
    "--preview-every",
    "1000",
    "--no-progress",
    "--no-tensorboard",
]

TRAIN = [
    "--model-arch",
    "vit_tiny",
    "--model-img-size",
    "32",
    "--model-patch-size",
    "8",
    "--train-epochs",
    "1",
    "--train-min-steps",
    "6",
    "--train-batch-size",
    "16",
    "--train-eval-every",
    "3",
    "--train-patience",
    "0",
    "--train-device",
    "cpu",
    "--train-workers",
    "0",
    "--no-train-progress",
    "--no-train-tensorboard",
    "--train-optim-lr",
    "2e-3",
    "--train-optim-warmup-epochs",
    "0",
]

FINETUNE = [
    *TRAIN,
    "--labels-classes",
    "normal",
    "abnormal",
    "--labels-rename",
    "consolidation=abnormal",
    "bilateral_opacities=abnormal",
]

SEGMENT = [*TRAIN, "--model-decoder-channels", "32", "16", "8", "8"]

# What every fault test sees: the command's name, its arguments (store and out filled in).
COMMANDS = {
    "pretrain": lambda store, out: ["pretrain", "--store", str(store), "--out", str(out)],
    "finetune": lambda store, out: ["finetune", "--store", str(store), "--out", str(out)],
    "segment": lambda store, out: ["segment", "--store", str(store), "--out", str(out)],
}


def _run(capsys, argv: list[str]) -> tuple[int, list[str]]:
    """``spcxr.cli.main(argv)``: its exit status and its stderr lines."""
    capsys.readouterr()
    status = main(argv)
    return status, capsys.readouterr().err.splitlines()


def _assert_one_line(lines: list[str], command: str, *named: str) -> None:
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"spcxr {command}: "), lines
    assert "Traceback" not in lines[0]
    for what in named:
        assert what in lines[0], (what, lines[0])


def _orphans(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*.tmp") if atomic.ORPHAN_PATTERN.match(p.name)]


def _store_for(command: str, tiny_store: Path, synth_store: Path) -> Path:
    return tiny_store if command == "pretrain" else synth_store


def _args(command: str) -> list[str]:
    return {"pretrain": PRETRAIN, "finetune": FINETUNE, "segment": SEGMENT}[command]


# ---------------------------------------------------------------------------------------------
# bad flag values: exit 2, one line naming the flag, nothing written


@pytest.mark.parametrize(
    ("command", "extra", "flag"),
    [
        ("pretrain", ["--batch-size", "0"], "--batch-size"),  # was ZeroDivisionError
        ("pretrain", ["--batch-size", "-8"], "--batch-size"),  # was "Invalid learning rate"
        ("pretrain", ["--max-steps", "-5"], "--max-steps"),  # was a random encoder, exit 0
        ("pretrain", ["--max-steps", "0", "--epochs", "0"], "--epochs"),  # the same
        ("pretrain", ["--max-steps", "0", "--epochs", "-1"], "--epochs"),
        ("pretrain", ["--workers", "-3"], "--workers"),
        ("pretrain", ["--model-img-size", "-5"], "--model-img-size"),
        ("pretrain", ["--model-img-size", "36"], "--model-img-size"),  # not a multiple of 8
        ("pretrain", ["--augment-out-size", "48"], "--augment-out-size"),  # was overridden
        ("pretrain", ["--optim-lr", "0"], "--optim-lr"),
        ("pretrain", ["--accum-steps", "3"], "--accum-steps"),
        ("pretrain", ["--checkpoint-every", "0"], "--checkpoint-every"),
        ("pretrain", ["--device", "gpu"], "--device"),
        ("finetune", ["--train-batch-size", "0"], "--train-batch-size"),
        ("finetune", ["--train-batch-size", "-8"], "--train-batch-size"),
        ("finetune", ["--train-epochs", "0", "--train-min-steps", "0"], "--train-epochs"),
        ("finetune", ["--train-epochs", "-2"], "--train-epochs"),
        ("finetune", ["--train-min-steps", "-1"], "--train-min-steps"),
        ("finetune", ["--train-optim-lr", "-0.001"], "--train-optim-lr"),
        ("finetune", ["--train-workers", "-3"], "--train-workers"),
        ("finetune", ["--label-smoothing", "1.5"], "--label-smoothing"),
        ("finetune", ["--train-device", "gpu"], "--train-device"),
        ("segment", ["--train-batch-size", "0"], "--train-batch-size"),
        ("segment", ["--train-epochs", "0", "--train-min-steps", "0"], "--train-epochs"),
        ("segment", ["--train-optim-lr", "0"], "--train-optim-lr"),
    ],
)
def test_bad_flag_is_a_one_line_usage_error(
    command, extra, flag, tiny_store, synth_store, tmp_path, capsys
) -> None:
    out = tmp_path / "run"
    store = _store_for(command, tiny_store, synth_store)
    status, err = _run(capsys, [*COMMANDS[command](store, out), *_args(command), *extra])
    assert status == 2
    _assert_one_line(err, command, "error:", flag)
    assert not out.exists()  # found before anything was written


@pytest.mark.parametrize("command", ["pretrain", "finetune", "segment"])
def test_a_missing_store_leaves_no_run_folder(command, tmp_path, capsys) -> None:
    out = tmp_path / "run"
    status, err = _run(capsys, [*COMMANDS[command](tmp_path / "nope", out), *_args(command)])
    assert status == 2
    _assert_one_line(err, command, "error:", str(tmp_path / "nope"))
    assert not out.exists()


def test_augment_out_size_equal_to_the_model_size_is_accepted() -> None:
    from spcxr.data.augment import AugmentConfig
    from spcxr.pretrain.engine import PretrainConfig
    from spcxr.pretrain.gmml import GMMLConfig

    model = GMMLConfig(arch="vit_tiny", img_size=48, patch_size=8)
    assert PretrainConfig(model=model).augment.out_size == 48  # the default follows the model
    same = PretrainConfig(model=model, augment=AugmentConfig(out_size=48))
    assert same.augment.out_size == 48


@pytest.mark.parametrize(
    ("command", "flag"),
    [("pretrain", "--device"), ("finetune", "--train-device"), ("segment", "--train-device")],
)
def test_cuda_without_a_gpu_is_a_usage_error(
    command, flag, tiny_store, synth_store, tmp_path, capsys, monkeypatch
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "run"
    store = _store_for(command, tiny_store, synth_store)
    status, err = _run(capsys, [*COMMANDS[command](store, out), *_args(command), flag, "cuda"])
    assert status == 2
    _assert_one_line(err, command, f"{flag} cuda", "no CUDA GPU")
    assert not out.exists()


def test_evaluate_bad_device_and_level_are_usage_errors(tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    base = ["evaluate", str(tmp_path / "no_run"), "--out", str(tmp_path / "rep")]
    status, err = _run(capsys, [*base, "--device", "cuda"])
    assert status == 2
    _assert_one_line(err, "evaluate", "--device cuda")
    status, err = _run(capsys, [*base, "--level", "1.5"])
    assert status == 2
    _assert_one_line(err, "evaluate", "--level 1.5")


# ---------------------------------------------------------------------------------------------
# an output folder that cannot be written: exit 2 before any work


@pytest.fixture(scope="module")
def class_run(synth_store, module_dir) -> Path:
    """A finished 6-step classification run on the synthetic store."""
    run = module_dir("faults") / "class_run"
    assert main(["finetune", "--store", str(synth_store), "--out", str(run), *FINETUNE]) == 0
    return run


def _out_command(command: str, tiny_store, synth_store, class_run, out: Path) -> list[str]:
    if command == "export":
        return ["export", "--run", str(class_run), "--out", str(out), "--no-onnx"]
    if command == "evaluate":
        return ["evaluate", str(class_run), "--out", str(out), "--n-boot", "20", "--device", "cpu"]
    store = _store_for(command, tiny_store, synth_store)
    return [*COMMANDS[command](store, out), *_args(command)]


RUN_COMMANDS = ["pretrain", "finetune", "segment", "export", "evaluate"]


@pytest.mark.parametrize("command", RUN_COMMANDS)
def test_output_under_a_file_is_a_usage_error(
    command, tiny_store, synth_store, class_run, tmp_path, capsys
) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, not a folder")
    out = blocker / "run"
    argv = _out_command(command, tiny_store, synth_store, class_run, out)
    status, err = _run(capsys, argv)
    assert status == 2
    _assert_one_line(err, command, "--out", str(out))
    assert blocker.read_text() == "a file, not a folder"


@pytest.mark.parametrize("command", RUN_COMMANDS)
def test_read_only_output_folder_is_a_usage_error(
    command, tiny_store, synth_store, class_run, tmp_path, capsys, monkeypatch
) -> None:
    """The file system refuses the probe file (EROFS), as a read-only mount does for root too."""
    real_open = os.open

    def read_only(path, flags, *args, **kwargs):
        if ".spcxr-write-probe." in str(path):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", read_only)
    out = tmp_path / "ro"
    status, err = _run(capsys, _out_command(command, tiny_store, synth_store, class_run, out))
    assert status == 2
    _assert_one_line(err, command, "--out", str(out), "Read-only file system")
    assert not [p for p in out.rglob("*") if p.is_file()]  # nothing was written


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a chmod 0555 folder anyway")
def test_chmod_read_only_output_folder_is_a_usage_error(tiny_store, tmp_path, capsys) -> None:
    parent = tmp_path / "locked"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        argv = [*COMMANDS["pretrain"](tiny_store, parent / "run"), *PRETRAIN]
        status, err = _run(capsys, argv)
    finally:
        parent.chmod(0o755)
    assert status == 2
    _assert_one_line(err, "pretrain", "--out", "Permission denied")


# ---------------------------------------------------------------------------------------------
# a full disk mid-run: exit 1, the previous checkpoint intact, no orphan, an exact resume


class DiskFull:
    """Makes the ``fail_on``-th ``torch.save`` write half a file and fail as torch does on a
    full disk ("enforce fail at inline_container.cc"), with the file system reporting no free
    space while it is "full"."""

    def __init__(self, monkeypatch, fail_on: int) -> None:
        self.calls = 0
        self.full = False
        self.fail_on = fail_on
        real_save, real_free = torch.save, atomic._free_bytes

        def save(obj, f, *args, **kwargs):
            self.calls += 1
            if self.calls == self.fail_on:
                self.full = True
                Path(f).write_bytes(b"PK\x03\x04" + b"\0" * 600)  # a torn zip
                raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos")
            return real_save(obj, f, *args, **kwargs)

        monkeypatch.setattr(torch, "save", save)
        monkeypatch.setattr(atomic, "_free_bytes", lambda f: 0 if self.full else real_free(f))


def test_full_disk_at_a_pretrain_checkpoint_fails_cleanly_and_resumes_exactly(
    tiny_store, tmp_path, capsys, monkeypatch
) -> None:
    full = tmp_path / "full"
    assert main([*COMMANDS["pretrain"](tiny_store, full), *PRETRAIN, "--max-steps", "8"]) == 0
    cut = tmp_path / "cut"
    argv = [*COMMANDS["pretrain"](tiny_store, cut), *PRETRAIN, "--max-steps", "8"]
    with monkeypatch.context() as m:
        DiskFull(m, fail_on=2)  # the checkpoint of step 8; step 4's is on disk
        status, err = _run(capsys, argv)
    assert status == 1
    _assert_one_line(err, "pretrain", "failed:", "No space left on device", "checkpoint.pt")
    assert load_checkpoint(cut / "checkpoint.pt")["step"] == 4  # the previous one, intact
    assert not _orphans(cut)
    assert not (cut / "encoder").exists()  # no encoder of an unfinished run
    # Space freed: the same command with --resume finishes with the uninterrupted weights.
    status, err = _run(capsys, [*argv, "--resume"])
    assert status == 0, err
    a, b = load_checkpoint(full / "checkpoint.pt"), load_checkpoint(cut / "checkpoint.pt")
    assert b["step"] == 8
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    steps = [r["step"] for r in read_log(cut)]
    assert steps == [2, 4, 6, 8]
    assert [r["loss"] for r in read_log(cut)] == [r["loss"] for r in read_log(full)]


@pytest.mark.parametrize("command", ["finetune", "segment"])
def test_full_disk_at_a_supervised_checkpoint_fails_cleanly_and_resumes_exactly(
    command, synth_store, tmp_path, capsys, monkeypatch
) -> None:
    from safetensors.torch import load_file

    full, cut = tmp_path / "full", tmp_path / "cut"
    assert main([*COMMANDS[command](synth_store, full), *_args(command)]) == 0
    argv = [*COMMANDS[command](synth_store, cut), *_args(command)]
    with monkeypatch.context() as m:
        DiskFull(m, fail_on=2)  # the checkpoint of step 6; step 3's is on disk
        status, err = _run(capsys, argv)
    assert status == 1
    _assert_one_line(err, command, "No space left on device", str(cut / "checkpoint.pt"))
    assert load_checkpoint(cut / "checkpoint.pt")["step"] == 3
    assert not _orphans(cut)
    status, err = _run(capsys, [*argv, "--train-resume"])
    assert status == 0, err
    a = load_file(full / "model" / "model.safetensors")
    b = load_file(cut / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["step"] for r in read_log(cut)] == [3, 6]


def test_a_checkpoint_write_failure_on_a_disk_with_space_names_the_file(
    tmp_path, monkeypatch
) -> None:
    def broken(obj, f, *args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos")

    monkeypatch.setattr(torch, "save", broken)
    monkeypatch.setattr(atomic, "_free_bytes", lambda f: 1 << 40)
    with pytest.raises(OSError) as caught:
        save_checkpoint({"step": 1}, tmp_path / "checkpoint.pt")
    assert caught.value.errno == errno.EIO
    assert caught.value.filename == str(tmp_path / "checkpoint.pt")
    assert not list(tmp_path.iterdir())


def _fsync_enospc(monkeypatch, name: str) -> None:
    """``fsync`` of the temporary file of ``name`` reports ENOSPC (as NFS and delayed
    allocation do when the disk fills)."""
    real = atomic._fsync

    def fsync(path, *, directory=False):
        if not directory and Path(path).name.startswith(f".{name}."):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(path, directory=directory)

    monkeypatch.setattr(atomic, "_fsync", fsync)


@pytest.mark.parametrize(
    ("command", "name"), [("export", "model.safetensors"), ("evaluate", "metrics.json")]
)
def test_full_disk_in_export_and_evaluate_is_one_line_exit_1(
    command, name, tiny_store, synth_store, class_run, tmp_path, capsys, monkeypatch
) -> None:
    out = tmp_path / "out"
    argv = _out_command(command, tiny_store, synth_store, class_run, out)
    with monkeypatch.context() as m:
        _fsync_enospc(m, name)
        status, err = _run(capsys, argv)
    assert status == 1
    _assert_one_line(err, command, "failed:", "No space left on device")
    assert not (out / name).exists()
    assert not _orphans(out)
    status, err = _run(capsys, argv)  # space freed: the same command works
    assert status == 0, err
    assert (out / name).is_file()


def test_a_library_write_error_on_a_full_disk_becomes_enospc(tmp_path, monkeypatch) -> None:
    """safetensors reports a full disk as ``SafetensorError``; spcxr says ENOSPC and the file."""
    monkeypatch.setattr(atomic, "_free_bytes", lambda f: 0)
    target = tmp_path / "model.safetensors"
    with pytest.raises(OSError) as caught, atomic.atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("Error while serializing: IoError(StorageFull)")
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(target)
    assert not list(tmp_path.iterdir())


# ---------------------------------------------------------------------------------------------
# --resume of the same run folder spelled differently, or moved


def test_resume_accepts_the_run_folder_however_it_is_spelled_or_moved(
    tiny_store, tmp_path, capsys, monkeypatch
) -> None:
    monkeypatch.chdir(tmp_path)
    store = f"{tiny_store}/"  # the store spelled differently too

    def pretrain(out: str, steps: int) -> int:
        argv = ["pretrain", "--store", store, "--out", out, *PRETRAIN, "--resume"]
        status, err = _run(capsys, [*argv, "--max-steps", str(steps), "--checkpoint-every", "2"])
        assert status == 0, err
        return load_checkpoint(Path(out) / "checkpoint.pt")["step"]

    assert main(["pretrain", "--store", str(tiny_store), "--out", "run", *PRETRAIN,
                 "--max-steps", "2", "--checkpoint-every", "2"]) == 0  # fmt: skip
    assert pretrain("./run", 4) == 4
    assert pretrain("run/", 6) == 6
    assert pretrain(str(tmp_path / "run"), 8) == 8
    (tmp_path / "run").rename(tmp_path / "moved")
    assert pretrain("moved", 10) == 10
    assert [r["step"] for r in read_log(tmp_path / "moved")] == [2, 4, 6, 8, 10]


# ---------------------------------------------------------------------------------------------
# file modes follow the umask


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_atomic_writes_respect_the_umask(umask, mode, tmp_path) -> None:
    previous = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "a.json", "{}")
        save_checkpoint({"step": torch.tensor(1)}, tmp_path / "checkpoint.pt")
    finally:
        os.umask(previous)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == mode
    assert (tmp_path / "checkpoint.pt").stat().st_mode & 0o777 == mode


# ---------------------------------------------------------------------------------------------
# orphan temporary files of a killed run are removed when it starts again

ORPHANS = [".checkpoint.pt.k3x9_q2a.tmp", ".run.json.a1b2c3d4.tmp"]


@pytest.mark.parametrize("command", ["pretrain", "finetune", "segment"])
def test_orphan_temporary_files_are_removed_on_resume(
    command, tiny_store, synth_store, tmp_path, capsys
) -> None:
    store = _store_for(command, tiny_store, synth_store)
    run = tmp_path / "run"
    argv = [*COMMANDS[command](store, run), *_args(command)]
    if command == "pretrain":
        argv += ["--max-steps", "4"]
    assert main(argv) == 0
    sub = "encoder" if command == "pretrain" else "model"
    planted = [run / name for name in ORPHANS] + [run / sub / ".model.safetensors.zzzzzzzz.tmp"]
    for path in planted:
        path.write_bytes(b"\0" * 37)
    (run / "notes.tmp").write_text("the user's own file")
    resume = "--resume" if command == "pretrain" else "--train-resume"
    status, err = _run(capsys, [*argv, resume])
    assert status == 0, err
    assert not any(p.exists() for p in planted)
    assert not _orphans(run)
    assert (run / "notes.tmp").read_text() == "the user's own file"


def test_remove_orphans_matches_only_atomic_temporary_files(tmp_path) -> None:
    names = [".x.pt.abcdefgh.tmp", ".x.pt.abc.tmp", "x.pt.abcdefgh.tmp", ".x.pt.abcdefgh.tmpx"]
    for name in names:
        (tmp_path / name).write_text("")
    removed = atomic.remove_orphans(tmp_path)
    assert [p.name for p in removed] == [".x.pt.abcdefgh.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names[1:])


# ---------------------------------------------------------------------------------------------
# after a resume the log holds each step once


def _tensorboard_steps(run: Path, tag: str) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tb"))
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars(tag)}


def test_pretrain_log_and_tensorboard_hold_each_step_once_after_resume(
    tiny_store, tmp_path, capsys, monkeypatch
) -> None:
    from spcxr.pretrain.engine import Pretrainer

    pytest.importorskip("tensorboard")
    argv = [*COMMANDS["pretrain"](tiny_store, tmp_path / "run"), *PRETRAIN, "--tensorboard"]
    argv += ["--max-steps", "8"]
    calls = {"n": 0}
    original = Pretrainer.train_step

    def crash_at_seven(self, batches):
        calls["n"] += 1
        if calls["n"] == 7:  # steps 2, 4, 6 logged, checkpoint at 4
            raise KeyboardInterrupt
        return original(self, batches)

    with monkeypatch.context() as m:
        m.setattr(Pretrainer, "train_step", crash_at_seven)
        status, _ = _run(capsys, argv)
    assert status == 130
    run = tmp_path / "run"
    assert [r["step"] for r in read_log(run)] == [2, 4, 6]
    status, err = _run(capsys, [*argv, "--resume"])
    assert status == 0, err
    records = read_log(run)
    assert [r["step"] for r in records] == [2, 4, 6, 8]
    scalars = _tensorboard_steps(run, "train/loss")
    assert sorted(scalars) == [2, 4, 6, 8]
    assert scalars[6] == pytest.approx(records[2]["loss"], rel=1e-6)  # the resumed run's value


def test_supervised_log_holds_each_step_once_after_resume(
    synth_store, tmp_path, capsys, monkeypatch
) -> None:
    import spcxr.tasks.loop as loop

    run = tmp_path / "run"
    argv = [*COMMANDS["finetune"](synth_store, run), *FINETUNE]
    real = loop.save_checkpoint
    calls = {"n": 0}

    def killed_before_second(state, path):
        calls["n"] += 1
        if calls["n"] == 2:  # step 6 is logged, its checkpoint never written
            raise KeyboardInterrupt
        real(state, path)

    with monkeypatch.context() as m:
        m.setattr(loop, "save_checkpoint", killed_before_second)
        status, _ = _run(capsys, argv)
    assert status == 130
    assert [r["step"] for r in read_log(run)] == [3, 6]
    status, err = _run(capsys, [*argv, "--train-resume"])
    assert status == 0, err
    assert [r["step"] for r in read_log(run)] == [3, 6]


def test_truncate_log_drops_later_steps_and_a_torn_line(tmp_path) -> None:
    from spcxr.train.logging import truncate_log

    path = tmp_path / "log.jsonl"
    lines = [json.dumps({"step": s, "loss": s / 10}) for s in (2, 4, 6)]
    path.write_text("\n".join(lines) + '\n{"step": 8, "lo')
    assert truncate_log(path, 4) == 2
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [2, 4]
    assert truncate_log(path, 4) == 0


# ---------------------------------------------------------------------------------------------
# the installed console script, as a user runs it


def _console_script() -> list[str]:
    return [console_script()]


@pytest.mark.parametrize(
    ("command", "extra", "named"),
    [
        ("pretrain", ["--batch-size", "0"], "--batch-size 0"),
        ("pretrain", ["--device", "cuda"], "--device cuda"),
        ("pretrain", ["--out", "{blocker}/run"], "--out"),
        ("finetune", ["--train-epochs", "0", "--train-min-steps", "0"], "--train-epochs 0"),
        ("segment", ["--train-device", "cuda"], "--train-device cuda"),
    ],
)
def test_console_script_faults_are_one_line(
    command, extra, named, tiny_store, synth_store, tmp_path
) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    extra = [x.format(blocker=blocker) for x in extra]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
        "CUDA_VISIBLE_DEVICES": "",  # no GPU, whatever the machine has
        "OMP_NUM_THREADS": "1",
    }
    store = _store_for(command, tiny_store, synth_store)
    argv = [*_console_script(), *COMMANDS[command](store, tmp_path / "run"), *_args(command)]
    done = subprocess.run(
        [*argv, *extra], env=env, capture_output=True, text=True, timeout=300, check=False
    )
    lines = done.stderr.splitlines()
    assert done.returncode == 2, done.stderr
    _assert_one_line(lines, command, "error:", named)
    assert done.stdout == ""
    assert not (tmp_path / "run").exists()


def test_console_script_full_run_leaves_no_orphan(tiny_store, tmp_path) -> None:
    run = tmp_path / "run"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
    }
    argv = [*_console_script(), *COMMANDS["pretrain"](tiny_store, run), *PRETRAIN]
    done = subprocess.run(
        [*argv, "--max-steps", "4"], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    assert f"run {run}: 4 steps" in done.stdout
    assert not _orphans(run)
    assert (run / "encoder" / "model.safetensors").is_file()
    shutil.rmtree(run)
