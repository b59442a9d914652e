"""The pretraining fast path (prefetcher, fused AdamW, torch.compile) computes what the plain path does.

Everything here runs on the CPU. The CUDA-only parts (side stream, events, ``record_stream``) sit
in a few lines of :class:`~spcxr.data.loader.DevicePrefetcher` and
:class:`~spcxr.data.loader.DataWaitMeter`; the ordering logic around them is the same code on
every device and is what these tests pin down.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from pathlib import Path

import pytest
import torch

from spcxr.data import loader as loader_module
from spcxr.data.loader import (
    DataWaitMeter,
    DevicePrefetcher,
    EpochBatchSampler,
    StoreBatches,
    make_loader,
    move_to,
    tensors_in,
)
from spcxr.data.store import PreparedStore
from spcxr.pretrain.engine import (
    OptimConfig,
    PreparedBatch,
    PretrainConfig,
    Pretrainer,
    fast_path_flag,
    pretrain,
    set_optimizer_fused,
)
from spcxr.pretrain.gmml import GMMLConfig
from spcxr.train.checkpoint import load_checkpoint
from spcxr.train.logging import read_log


def _config(store: Path, out: Path, **kwargs) -> PretrainConfig:
    defaults = dict(
        store=str(store),
        out=str(out),
        model=GMMLConfig(arch="vit_tiny", img_size=32, patch_size=8, drop_path_rate=0.1),
        optim=OptimConfig(lr=1e-3, warmup_epochs=0),
        batch_size=8,
        max_steps=6,
        device="cpu",
        workers=0,
        log_every=2,
        checkpoint_every=3,
        preview_every=1000,
        progress=False,
        tensorboard=False,
    )
    defaults.update(kwargs)
    return PretrainConfig(**defaults)


def _loader(store: Path, steps: int = 5):
    rows = PreparedStore(store).indices("train")
    sampler = EpochBatchSampler(rows, 8, seed=3, total_steps=steps)
    return make_loader(StoreBatches(store), sampler, workers=0)


# ---------------------------------------------------------------------------------------------
# DevicePrefetcher


def test_prefetcher_yields_the_loader_batches_in_order(tiny_store: Path) -> None:
    plain = list(_loader(tiny_store))
    fetched = list(DevicePrefetcher(_loader(tiny_store), "cpu"))
    assert len(fetched) == len(plain) == 5
    for a, b in zip(plain, fetched, strict=True):
        assert torch.equal(a["rows"], b["rows"])
        assert torch.equal(a["images"], b["images"])
    # Consecutive batches differ (the comparison is not between copies of one batch).
    assert not torch.equal(plain[0]["rows"], plain[1]["rows"])


def test_prefetcher_prepares_one_batch_ahead_with_its_index() -> None:
    events: list[str] = []

    def prepare(index: int, batch: torch.Tensor) -> tuple[int, torch.Tensor]:
        events.append(f"prepare {index}")
        return index, batch * 2

    source = [torch.full((2,), float(k)) for k in range(4)]
    for index, doubled in DevicePrefetcher(source, "cpu", prepare):
        events.append(f"use {index}")
        assert torch.equal(doubled, torch.full((2,), 2.0 * index))
    # Batch i + 1 is prepared before batch i is handed over (on CUDA: while step i - 1 runs).
    assert events == [
        "prepare 0",
        "prepare 1",
        "use 0",
        "prepare 2",
        "use 1",
        "prepare 3",
        "use 2",
        "use 3",
    ]
    assert list(DevicePrefetcher([], "cpu", prepare)) == []


def test_each_rank_reads_only_its_slice_of_every_global_batch(tiny_store: Path) -> None:
    """Under torchrun the store is read once in total per step: rank r gets its own rows."""
    rows = PreparedStore(tiny_store).indices("train")
    whole = list(EpochBatchSampler(rows, 8, seed=1, total_steps=6))
    ranks = [
        list(EpochBatchSampler(rows, 8, rank=r, world_size=2, seed=1, total_steps=6))
        for r in (0, 1)
    ]
    for step, batch in enumerate(whole):
        assert ranks[0][step] + ranks[1][step] == batch
        assert not set(ranks[0][step]) & set(ranks[1][step])


class _FakeCuda:
    """Stand-ins for the torch.cuda stream and event calls, logging what is done in which order."""

    def __init__(self) -> None:
        self.log: list[tuple] = []
        self.active = "main"  # the stream current on the host thread
        self.main = _FakeStream(self, "main")
        self.events = 0

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(
            torch.cuda, "Stream", lambda device=None, priority=0: _FakeStream(self, "side")
        )
        monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: self.main)
        monkeypatch.setattr(torch.cuda, "stream", self.stream)
        monkeypatch.setattr(torch.cuda, "Event", self.event)
        monkeypatch.setattr(loader_module, "move_to", lambda batch, device, non_blocking: batch)

    @contextlib.contextmanager
    def stream(self, stream: _FakeStream):
        before, self.active = self.active, stream.name
        try:
            yield
        finally:
            self.active = before

    def event(self, enable_timing: bool = False) -> _FakeEvent:
        self.events += 1
        return _FakeEvent(self, self.events)


class _FakeStream:
    def __init__(self, cuda: _FakeCuda, name: str) -> None:
        self.cuda, self.name = cuda, name

    def wait_event(self, event: _FakeEvent) -> None:
        self.cuda.log.append(("wait", self.name, event.number))


class _FakeEvent:
    def __init__(self, cuda: _FakeCuda, number: int) -> None:
        self.cuda, self.number, self.time = cuda, number, None

    def record(self, stream: _FakeStream | None = None) -> None:
        self.time = time.perf_counter()
        name = stream.name if stream is not None else self.cuda.active
        self.cuda.log.append(("record", name, self.number))

    def synchronize(self) -> None:
        self.cuda.log.append(("sync", self.number))

    def elapsed_time(self, end: _FakeEvent) -> float:
        return (end.time - self.time) * 1000.0


def test_prefetcher_cuda_path_prepares_on_a_side_stream(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CUDA branch, with the stream and event calls faked: what runs where, in which order."""
    cuda = _FakeCuda()
    cuda.install(monkeypatch)

    def prepare(index: int, batch: torch.Tensor) -> torch.Tensor:
        cuda.log.append(("prepare", index, cuda.active))
        return batch

    for item in DevicePrefetcher([torch.zeros(1), torch.ones(1)], "cuda", prepare):
        cuda.log.append(("use", int(item), cuda.active))
    assert cuda.log == [
        ("prepare", 0, "side"),  # copy + prepare inside the side stream
        ("record", "side", 1),  # its ready event, on the side stream
        ("wait", "main", 1),  # the training stream waits for it (no host sync) ...
        ("prepare", 1, "side"),  # ... the next batch is prepared ...
        ("record", "side", 2),
        ("use", 0, "main"),  # ... and batch 0 is handed over on the training stream
        ("wait", "main", 2),
        ("use", 1, "main"),
    ]


def test_data_wait_meter_cuda_path_reads_event_times(monkeypatch: pytest.MonkeyPatch) -> None:
    cuda = _FakeCuda()
    cuda.install(monkeypatch)
    meter = DataWaitMeter("cuda")
    meter.waiting()
    time.sleep(0.05)
    meter.fetched()
    time.sleep(0.15)
    share = meter.fraction()
    assert share is not None and 0.15 < share < 0.35
    assert cuda.log[-1] == ("sync", 3)  # one sync, on the last event, when read
    assert all(entry[:2] == ("record", "main") for entry in cuda.log[:-1])


def test_move_to_and_tensors_in_walk_nested_batches() -> None:
    @dataclasses.dataclass
    class Item:
        a: torch.Tensor
        b: list
        note: str

    item = Item(torch.zeros(1), [torch.ones(2), {"c": torch.arange(3)}], "x")
    assert [t.numel() for t in tensors_in(item)] == [1, 2, 3]
    moved = move_to({"x": [torch.ones(1)], "y": (torch.zeros(2), 5)}, torch.device("cpu"))
    assert isinstance(moved["y"], tuple) and moved["y"][1] == 5
    assert torch.equal(moved["x"][0], torch.ones(1))


# ---------------------------------------------------------------------------------------------
# DataWaitMeter


def test_data_wait_meter_measures_the_blocked_share() -> None:
    meter = DataWaitMeter("cpu")
    assert meter.fraction() is None
    with pytest.raises(RuntimeError, match="waiting"):
        meter.fetched()
    for _ in range(2):
        meter.waiting()
        time.sleep(0.05)  # blocked on the loader
        meter.fetched()
        time.sleep(0.15)  # the step
    share = meter.fraction()
    # 0.1 s of 0.4 s; sleeps overshoot a little on a loaded machine.
    assert share is not None and 0.18 < share < 0.35
    meter.waiting()
    meter.fetched()
    time.sleep(0.1)
    assert meter.fraction() < 0.05  # a new window, with no waiting in it


# ---------------------------------------------------------------------------------------------
# flags and the optimiser


def test_fast_path_flags_default_to_cuda_only(tiny_store: Path, tmp_path: Path) -> None:
    assert fast_path_flag(None, torch.device("cuda")) is True
    assert fast_path_flag(None, torch.device("cpu")) is False
    assert fast_path_flag(False, torch.device("cuda")) is False
    assert fast_path_flag(True, torch.device("cpu")) is True
    plain = Pretrainer(_config(tiny_store, tmp_path / "plain"))
    assert (plain.compiled, plain.fused, plain.prefetch) == (False, False, False)
    assert all(g["fused"] is None for g in plain.optimizer.param_groups)
    fast = Pretrainer(_config(tiny_store, tmp_path / "fast", fused_optimizer=True, prefetch=True))
    assert (fast.fused, fast.prefetch) == (True, True)
    assert all(g["fused"] is True for g in fast.optimizer.param_groups)
    with pytest.raises(ValueError, match="--compile-mode fastest"):
        Pretrainer(_config(tiny_store, tmp_path / "bad", compile_mode="fastest"))


def test_set_optimizer_fused_restores_the_runs_choice_after_loading() -> None:
    param = torch.nn.Parameter(torch.ones(3))
    fused = torch.optim.AdamW([param], lr=0.1, fused=True)
    param.grad = torch.ones(3)
    fused.step()
    plain = torch.optim.AdamW([param], lr=0.1)
    plain.load_state_dict(fused.state_dict())
    assert plain.param_groups[0]["fused"] is True  # what load_state_dict does on its own
    set_optimizer_fused(plain, False)
    step = plain.state[param]["step"]
    assert plain.param_groups[0]["fused"] is None
    assert step.device.type == "cpu" and step.dtype == torch.float32 and float(step) == 1.0
    set_optimizer_fused(plain, True)
    assert plain.param_groups[0]["fused"] is True and float(plain.state[param]["step"]) == 1.0


# ---------------------------------------------------------------------------------------------
# same loss on the same batch and masks


def _two_steps(trainer: Pretrainer) -> tuple[list[list], list[float], list[float]]:
    seen, losses, norms = [], [], []
    for batches in trainer.batches(steps=2):
        seen.append(batches)
        loss, norm = trainer.train_step(batches)
        trainer.step += 1
        losses.append(float(loss))
        norms.append(float(norm))
    return seen, losses, norms


def test_prefetch_and_fused_adamw_give_the_plain_loss(tiny_store: Path, tmp_path: Path) -> None:
    """Same views, masks and loss; fused AdamW changes only the summation order of the update.

    Tolerance: step 0 is bitwise equal (the optimiser has not acted yet); step 1 within rtol 1e-5
    (float32 on the CPU; fused and for-loop AdamW round differently in the last bits).
    """
    plain = Pretrainer(_config(tiny_store, tmp_path / "plain"))
    fast = Pretrainer(_config(tiny_store, tmp_path / "fast", fused_optimizer=True, prefetch=True))
    seen_plain, loss_plain, norm_plain = _two_steps(plain)
    seen_fast, loss_fast, norm_fast = _two_steps(fast)
    assert all(isinstance(b, torch.Tensor) for group in seen_plain for b in group)
    prepared = [b for group in seen_fast for b in group]
    assert all(isinstance(b, PreparedBatch) for b in prepared)
    assert [b.micro_step for b in prepared] == [0, 1]
    for step, (images, ready) in enumerate(zip(seen_plain, prepared, strict=True)):
        again = plain.prepare_batch(images[0], step)
        assert torch.equal(again.views, ready.views)
        assert torch.equal(again.corrupted.mask, ready.corrupted.mask)
        assert torch.equal(again.corrupted.images, ready.corrupted.images)
    assert loss_fast[0] == loss_plain[0] and norm_fast[0] == norm_plain[0]
    assert loss_fast[1] == pytest.approx(loss_plain[1], rel=1e-5)
    assert norm_fast[1] == pytest.approx(norm_plain[1], rel=1e-5)
    assert loss_plain[0] != loss_plain[1]


def test_a_batch_prepared_for_another_step_is_refused(tiny_store: Path, tmp_path: Path) -> None:
    trainer = Pretrainer(_config(tiny_store, tmp_path / "r"))
    images = next(iter(_loader(tiny_store)))["images"]
    with pytest.raises(ValueError, match="micro-step 5 reached micro-step 0"):
        trainer.train_step([trainer.prepare_batch(images, 5)])


@pytest.mark.slow
def test_run_with_prefetch_matches_the_plain_run_and_logs_data_wait(
    tiny_store: Path, tmp_path: Path
) -> None:
    """A whole run (gradient accumulation, a checkpoint, a loader worker): identical weights.

    Tolerance: exact equality (the same operations in the same order on the CPU; prefetching
    only moves augmentation and masking one batch earlier).
    """
    common = dict(accum_steps=2, workers=1, max_steps=3, log_every=1, checkpoint_every=2)
    pretrain(_config(tiny_store, tmp_path / "plain", **common))
    pretrain(_config(tiny_store, tmp_path / "prefetch", prefetch=True, **common))
    a = load_checkpoint(tmp_path / "plain" / "checkpoint.pt")["model"]
    b = load_checkpoint(tmp_path / "prefetch" / "checkpoint.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    logs = [read_log(tmp_path / name) for name in ("plain", "prefetch")]
    assert [r["loss"] for r in logs[0]] == [r["loss"] for r in logs[1]]
    assert all(0.0 <= r["data_wait_frac"] <= 1.0 for log in logs for r in log)


@pytest.mark.slow
def test_resume_with_another_optimizer_setting(tiny_store: Path, tmp_path: Path) -> None:
    """Two steps with fused AdamW, checkpoint, then resumed with the default AdamW.

    The resumed run keeps its own flag and ends where an uninterrupted fused run does.
    Tolerance: 1e-6 absolute on every weight (fused and for-loop AdamW differ in the last
    bits; the weights move by ~4e-3 over the four steps at this learning rate).
    """
    settings = dict(max_steps=4, optim=OptimConfig(lr=0.05, warmup_epochs=0))
    run = tmp_path / "switch"
    first = Pretrainer(_config(tiny_store, run, fused_optimizer=True, **settings))
    for batches in first.batches(steps=2):  # what run() does, stopped after two steps
        first.apply_schedules(first.step)
        first.train_step(batches)
        first.step += 1
    first.save()
    resumed = Pretrainer(_config(tiny_store, run, resume=True, **settings))
    assert resumed.step == 2
    assert all(g["fused"] is None for g in resumed.optimizer.param_groups)
    resumed.run()
    pretrain(_config(tiny_store, tmp_path / "fused", fused_optimizer=True, **settings))
    a = load_checkpoint(run / "checkpoint.pt")["model"]
    b = load_checkpoint(tmp_path / "fused" / "checkpoint.pt")["model"]
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-6
    init = Pretrainer(_config(tiny_store, tmp_path / "init")).model.state_dict()
    assert max(float((a[k] - init[k]).abs().max()) for k in a) > 1e-3  # the weights moved


@pytest.mark.slow
def test_compiled_step_gives_the_plain_loss(
    tiny_store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """torch.compile (inductor, CPU) of model and loss: the same losses and gradient norms.

    Inductor draws stochastic depth with its own generator unless ``fallback_random``; with it,
    the compiled step draws what eager does. Tolerance: rtol 1e-4 (float32; fused kernels sum
    in another order).
    """
    monkeypatch.setattr(torch._inductor.config, "fallback_random", True)
    # Reconstruct from block 3: only blocks 1-3 run, a quarter of the graph to compile.
    model = GMMLConfig(
        arch="vit_tiny", img_size=32, patch_size=8, drop_path_rate=0.1, recon_blocks=(3,)
    )
    plain = Pretrainer(_config(tiny_store, tmp_path / "plain", model=model, precision="fp32"))
    compiled = Pretrainer(
        _config(
            tiny_store,
            tmp_path / "compiled",
            model=model,
            compile=True,
            prefetch=True,
            precision="fp32",
        )
    )
    assert compiled.compiled and compiled.forward_model is not compiled.model
    _, loss_plain, norm_plain = _two_steps(plain)
    _, loss_compiled, norm_compiled = _two_steps(compiled)
    assert loss_compiled == pytest.approx(loss_plain, rel=1e-4)
    assert norm_compiled == pytest.approx(norm_plain, rel=1e-4)
    assert loss_plain[0] != loss_plain[1]
