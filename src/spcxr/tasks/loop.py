"""The supervised training loop shared by fine-tuning (``spcxr finetune``) and segmentation.

A task (:class:`SupervisedTask`: rows, model, loss, validation, run record) says what differs;
:func:`run_task` and :func:`fit` do the rest.

Recipe (METHOD.md section 2; DeiT / the authors' SiT code, with MAE-style layer-wise lr decay):
AdamW, ``lr = base_lr * batch / 256``, linear warm-up then cosine to ``min_lr`` per iteration,
weight decay 0.05 without decay on biases / 1-D parameters, layer-wise lr decay, bf16 autocast on
CUDA and on CPUs with native bf16 (``precision: auto``; losses stay float32). Model selection
and early stopping look at the validation split only; the test split is never read during
training.

Every random choice is a function of ``(seed, step)``: the batch order (a permutation per epoch,
or class-balanced draws), the augmentation, stochastic depth. An interrupted run resumes from its
last checkpoint and continues exactly as the uninterrupted one would have. SIGTERM / Ctrl-C
finish the step in progress, checkpoint exactly there and end the run unfinished (exit status
143 / 130; :mod:`spcxr.train.signals`), so nothing since the last validation is lost.
"""

from __future__ import annotations

import json
import logging
import math
import signal
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from spcxr.atomic import atomic_write_text, remove_orphans
from spcxr.checks import at_least, positive, require, writable_folder
from spcxr.config import save_yaml
from spcxr.data.loader import StoreBatches, leave_stop_signals_to_the_main_process
from spcxr.data.store import PreparedStore
from spcxr.errors import RunStopped, UsageError
from spcxr.rng import derive_seed
from spcxr.train.checkpoint import load_checkpoint, save_checkpoint
from spcxr.train.distributed import autocast, resolve_device, resolve_precision
from spcxr.train.logging import RunLogger
from spcxr.train.lrd import param_groups_lrd
from spcxr.train.schedule import cosine_schedule
from spcxr.train.signals import stop_exit_status, stop_on_signals
from spcxr.versions import library_versions

log = logging.getLogger(__name__)


@dataclass
class FinetuneOptimConfig:
    """Optimiser and schedule of supervised training (DeiT / SiT fine-tuning recipe).

    Attributes:
        lr: base learning rate per 256 images (the run uses ``lr * batch_size / 256``).
        min_lr: learning rate at the end of the cosine.
        weight_decay: AdamW weight decay (none on biases, norms, position embedding, CLS).
        warmup_epochs: epochs of linear warm-up (fractions allowed).
        layer_decay: layer-wise lr decay: block ``i`` of ``L`` gets ``lr * decay ** (L + 1 - i)``
            (0.55-0.75 in MAE-family CXR work; 1.0 disables).
        clip_grad: gradient-norm clip (0 disables; DeiT does not clip).
        betas: AdamW betas.
    """

    lr: float = 5e-4
    min_lr: float = 1e-6
    weight_decay: float = 0.05
    warmup_epochs: float = 5.0
    layer_decay: float = 0.75
    clip_grad: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)


@dataclass
class TrainConfig:
    """Length, batching and bookkeeping of a supervised run.

    Attributes:
        epochs: passes over the training rows.
        min_steps: at least this many optimisation steps (small label budgets: an epoch of 20
            images is one step, so a budget curve needs a floor on the steps).
        batch_size: images per step (capped at the number of training images).
        eval_every: validate every this many steps (0: once per epoch, but at most 10 times).
        patience: stop when the validation metric has not improved for this many evaluations
            (0: never stop early).
        seed: seed of initialisation, batch order, augmentation and stochastic depth.
        device: ``auto`` (CUDA when available), ``cpu`` or ``cuda[:i]``.
        precision: ``auto`` (bf16 autocast on CUDA and on CPUs with AMX or AVX512-BF16, else
            float32), ``fp32`` or ``bf16`` (an error on a CPU without native bf16).
        workers: loader worker processes (they only slice the store's memory-mapped arrays).
        resume: continue the run in ``out`` from its checkpoint.
        tensorboard: also write TensorBoard scalars.
        progress: show a progress bar.
    """

    epochs: float = 50.0
    min_steps: int = 0
    batch_size: int = 64
    eval_every: int = 0
    patience: int = 10
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"
    workers: int = 1
    resume: bool = False
    tensorboard: bool = True
    progress: bool = True
    optim: FinetuneOptimConfig = field(default_factory=FinetuneOptimConfig)

    def validate(self, prefix: str = "--train-") -> None:
        """Refuse values that would crash or silently train nothing (flags ``PREFIX...``).

        Raises:
            UsageError: the first bad value, naming its flag (e.g. ``--train-batch-size``).
        """
        p, o = prefix, self.optim
        at_least(self.batch_size, 1, f"{p}batch-size")
        at_least(self.epochs, 0, f"{p}epochs")
        at_least(self.min_steps, 0, f"{p}min-steps")
        require(
            self.epochs > 0 or self.min_steps > 0,
            f"{p}epochs",
            self.epochs,
            f"a run of 0 steps trains nothing: give {p}epochs > 0 or {p}min-steps > 0",
        )
        at_least(self.eval_every, 0, f"{p}eval-every")
        at_least(self.patience, 0, f"{p}patience")
        at_least(self.workers, 0, f"{p}workers")
        positive(o.lr, f"{p}optim-lr")
        at_least(o.min_lr, 0, f"{p}optim-min-lr")
        at_least(o.weight_decay, 0, f"{p}optim-weight-decay")
        at_least(o.warmup_epochs, 0, f"{p}optim-warmup-epochs")
        positive(o.layer_decay, f"{p}optim-layer-decay")
        at_least(o.clip_grad, 0, f"{p}optim-clip-grad")


def claim_run_dir(run_dir: Path, resume: bool, flag: str = "--out") -> None:
    """Before anything is written: the run folder is writable (:func:`writable_folder`), an
    existing run is continued only with ``--resume``, and temporary files a killed run left
    behind are deleted.

    Raises:
        UsageError: the folder cannot be written, or holds a run and ``resume`` is off.
    """
    if (run_dir / "checkpoint.pt").is_file() and not resume:
        raise UsageError(
            f"{flag} {run_dir} already holds a run; pass --train-resume or choose another {flag}"
        )
    writable_folder(run_dir, flag)
    for orphan in remove_orphans(run_dir):
        log.info("removed %s (left by an interrupted write)", orphan)


class StepBatches:
    """The rows of every step: a seeded permutation per epoch, or class-balanced draws.

    Args:
        rows: training rows (manifest indices).
        batch_size: rows per step.
        seed: order seed.
        weights: per-row sampling weights (class-balanced sampling) or ``None`` (plain epochs).
    """

    def __init__(
        self, rows: np.ndarray, batch_size: int, seed: int, weights: np.ndarray | None = None
    ) -> None:
        self.rows = np.asarray(rows, dtype=np.int64)
        self.batch_size = min(batch_size, len(self.rows))
        self.seed = seed
        self.weights = None if weights is None else weights / weights.sum()
        self.steps_per_epoch = math.ceil(len(self.rows) / self.batch_size)

    def rows_of(self, step: int) -> np.ndarray:
        epoch, within = divmod(step, self.steps_per_epoch)
        rng = np.random.default_rng([self.seed, epoch])
        n = len(self.rows)
        if self.weights is not None:
            order = rng.choice(n, size=self.steps_per_epoch * self.batch_size, p=self.weights)
        else:
            # A permutation, topped up from a second one so every step has a full batch.
            order = np.concatenate([rng.permutation(n), rng.permutation(n)])
        return self.rows[order[within * self.batch_size : (within + 1) * self.batch_size]]

    def iterate(self, start: int, stop: int) -> Iterator[np.ndarray]:
        for step in range(start, stop):
            yield self.rows_of(step)


class _Batches(torch.utils.data.Dataset):
    """Step index -> store batch (loader workers slice the memory-mapped store)."""

    def __init__(self, store: PreparedStore, plan: StepBatches, with_masks: bool) -> None:
        self.data = StoreBatches(store, with_masks=with_masks)
        self.plan = plan

    def __len__(self) -> int:
        return 1 << 62

    def __getitem__(self, step: int) -> dict[str, torch.Tensor]:
        return self.data[self.plan.rows_of(step)]


def store_batches(
    store: PreparedStore, plan: StepBatches, start: int, stop: int, *, workers: int, masks: bool
) -> Iterator[dict[str, torch.Tensor]]:
    """Batches of steps ``start .. stop - 1`` read by ``workers`` loader processes."""
    loader = torch.utils.data.DataLoader(
        _Batches(store, plan, masks),
        sampler=range(start, stop),
        batch_size=None,
        num_workers=workers,
        pin_memory=torch.cuda.is_available(),
        prefetch_factor=4 if workers > 0 else None,
        # a stop signal to the process group is the main process's to handle (checkpoint first)
        worker_init_fn=leave_stop_signals_to_the_main_process if workers > 0 else None,
    )
    return iter(loader)


@dataclass
class FitResult:
    """What :func:`fit` did."""

    steps: int
    best_step: int
    best_value: float
    history: list[dict[str, Any]]
    stopped_early: bool
    seconds: float
    stopped_by: str | None = None  # the signal that stopped the run unfinished ("SIGTERM")
    total_steps: int = 0


def phase_lr(
    step: int, total: int, probe_steps: int, base: float, final: float, warmup: int
) -> float:
    """The learning rate at ``step``: a warm-up and cosine over the run, or, with a probe phase
    of ``probe_steps``, one over the probe phase and another over the rest. Warm-ups are capped
    at a quarter of their phase (tiny budgets never spend a phase warming up)."""
    if step < probe_steps:
        return cosine_schedule(step, probe_steps, base, final, min(warmup, probe_steps // 4))
    length = total - probe_steps
    return cosine_schedule(step - probe_steps, length, base, final, min(warmup, length // 4))


def make_optimizer(
    model: nn.Module, optim: FinetuneOptimConfig, num_layers: int
) -> torch.optim.Optimizer:
    groups = param_groups_lrd(
        model,
        weight_decay=optim.weight_decay,
        layer_decay=optim.layer_decay,
        num_layers=num_layers,
    )
    if not groups:
        raise ValueError("the model has no trainable parameters")
    kwargs: dict[str, Any] = {}
    if next(model.parameters()).is_cuda:
        kwargs["fused"] = True
    return torch.optim.AdamW(groups, lr=optim.lr, betas=optim.betas, **kwargs)


class SupervisedTask(ABC):
    """One supervised run for :func:`run_task`: its rows, model, loss, validation and record.

    A subclass reads its settings and rows in ``__init__`` (raising before anything is written),
    sets ``train_rows``, ``plan`` and ``select``, and implements the hooks below;
    :func:`run_task` does the steps every task shares, as MAE's ``main_finetune`` does around
    ``engine_finetune``.

    Attributes:
        kind: the run's kind in ``run.json`` (``classification``, ``segmentation``).
        with_masks: batches also carry the lung masks.
        select: the validation metric that picks the best state; ``"last"``: nothing is
            validated and the last state is kept (k-fold: the held-out fold is the test set).
        higher_is_better: direction of ``select``.
        probe_fraction: share of the steps trained with the encoder frozen before the whole
            model is (probe-then-fine-tune; 0: none). The model must have ``freeze_encoder``.
    """

    kind = ""
    with_masks = False
    select = "loss"
    higher_is_better = True
    probe_fraction = 0.0
    train_rows: np.ndarray
    plan: StepBatches
    model: nn.Module
    init_info: dict[str, Any]

    def __init__(self, config: Any, command: str) -> None:
        if not config.store:
            raise ValueError(
                f"{command}: --store is required (a folder written by `spcxr prepare`)"
            )
        self.config = config
        self.train: TrainConfig = config.train
        self.run_dir = Path(config.out)
        self.device = resolve_device(config.train.device, "--train-device")
        self.precision = resolve_precision(
            config.train.precision, self.device, flag="--train-precision"
        )
        self.store = PreparedStore(config.store)

    @abstractmethod
    def build_model(self) -> tuple[nn.Module, dict[str, Any]]:
        """The model on ``self.device`` and the record of its initialisation."""

    @abstractmethod
    def loss(self, batch: dict[str, torch.Tensor], step: int) -> torch.Tensor:
        """The scalar loss of a batch (uint8 ``images``, ``masks``, ``rows`` on the device)."""

    @abstractmethod
    def validate(self) -> dict[str, float]:
        """Validation metrics (called in eval mode, without gradients)."""

    @abstractmethod
    def save_best(self) -> None:
        """Write the current model as the best one."""

    @abstractmethod
    def describe(self) -> dict[str, Any]:
        """The ``data`` record of ``run.json``: store, rows, budget, exclusions."""


def run_task(task: SupervisedTask) -> dict[str, Any]:
    """Train ``task``: claim the run folder, build the model from the ``init`` seed, write
    config.yaml, run.json and train_rows.csv, :func:`fit`, and complete run.json."""
    run_dir, train = task.run_dir, task.train
    claim_run_dir(run_dir, train.resume)
    torch.manual_seed(derive_seed(train.seed, "init"))
    task.model, task.init_info = task.build_model()
    run_dir.mkdir(parents=True, exist_ok=True)
    save_yaml(task.config, run_dir / "config.yaml")
    info = {
        "kind": task.kind,
        "seed": train.seed,
        "versions": library_versions(),
        "device": str(task.device),
        "precision": task.precision,
        "init": task.init_info,
        "data": task.describe(),
        "select": task.select,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    atomic_write_text(run_dir / "run.json", json.dumps(info, indent=2))
    write_train_rows(task.store, task.train_rows, run_dir)
    result = fit(task)
    if result.stopped_by:
        # Not finished: run.json says where it stopped, and gets no "finished" (a study or a
        # repeated-draws run resumes it instead of skipping it).
        info["stopped"] = {"by": result.stopped_by, "step": result.steps}
        atomic_write_text(run_dir / "run.json", json.dumps(info, indent=2))
        again = (
            "run the same command to continue"
            if train.resume
            else "continue with the same command plus --train-resume"
        )
        raise RunStopped(
            f"{run_dir}: stopped by {result.stopped_by} at step {result.steps} of "
            f"{result.total_steps}, checkpoint saved; {again}",
            stop_exit_status(result.stopped_by),
        )
    return finish_run(run_dir, info, result)


@dataclass
class _Progress:
    """What :func:`fit` carries from step to step, and what its checkpoint restores."""

    step: int = 0
    best_value: float = float("nan")
    best_step: int = -1
    bad_evals: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    # the training loss since the last validation (a stop between validations saves it)
    window: float = 0.0
    window_n: int = 0

    def state(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "best_value": self.best_value,
            "best_step": self.best_step,
            "bad_evals": self.bad_evals,
            "history": self.history,
            "train_loss_window": (self.window, self.window_n),
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> _Progress:
        window, window_n = state.get("train_loss_window", (0.0, 0))
        return cls(
            step=state["step"],
            best_value=state["best_value"],
            best_step=state["best_step"],
            bad_evals=state["bad_evals"],
            history=state["history"],
            window=window,
            window_n=window_n,
        )


def _validation(
    task: SupervisedTask, p: _Progress, lr: float, epoch: float
) -> tuple[dict[str, Any], float]:
    """Validate at step ``p.step``: keep the state if it is the best so far (``task.save_best``),
    count a bad validation otherwise, and close the training-loss window. Returns the log record
    and the selection value; with ``select: last`` nothing is validated and every state counts
    as the best so far."""
    metrics: dict[str, float] = {}
    value, improved = float("nan"), True
    if task.select != "last":
        task.model.eval()
        with torch.no_grad():
            metrics = task.validate()
        task.model.train()
        value = metrics.get(task.select, float("nan"))
        if not math.isfinite(value):
            raise ValueError(f"validation metric {task.select!r} is undefined: {metrics}")
        improved = not math.isfinite(p.best_value) or (
            value > p.best_value if task.higher_is_better else value < p.best_value
        )
    if improved:
        p.best_value, p.best_step, p.bad_evals = value, p.step, 0
        task.save_best()
    else:
        p.bad_evals += 1
    record = {
        "epoch": epoch,
        "lr": lr,
        "train_loss": p.window / max(p.window_n, 1),
        **{f"val_{k}": v for k, v in metrics.items()},
        "best": improved,
    }
    p.history.append({"step": p.step, **record})
    p.window, p.window_n = 0.0, 0
    return record, value


def fit(task: SupervisedTask) -> FitResult:
    """Train ``task.model`` with ``task.loss`` on the planned batches; keep the best validated
    state (``task.save_best``), checkpoint at every validation, stop after ``patience`` bad
    validations. The encoder depth sets the layer-wise lr decay."""
    model, plan, config, select = task.model, task.plan, task.train, task.select
    run_dir, device = task.run_dir, task.device
    started = time.perf_counter()
    spe = plan.steps_per_epoch
    total = max(math.ceil(config.epochs * spe), config.min_steps, 1)
    eval_every = config.eval_every or max(spe, math.ceil(total / 10))
    warmup = round(config.optim.warmup_epochs * spe)
    base_lr = config.optim.lr * plan.batch_size / 256.0
    # Probe-then-fine-tune: two phases, each with its own warm-up and cosine (a restart).
    probe_steps = round(task.probe_fraction * total) if task.probe_fraction else 0
    # The optimiser holds every parameter; a frozen encoder has no gradients, so AdamW skips it
    # (no update, no weight decay) until it is unfrozen.
    optimizer = make_optimizer(model, config.optim, len(model.encoder.blocks))
    precision = resolve_precision(config.precision, device, flag="--train-precision")

    ckpt_path = run_dir / "checkpoint.pt"
    p = _Progress()
    if config.resume and ckpt_path.is_file():
        state = load_checkpoint(ckpt_path, map_location=device)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        p = _Progress.from_state(state)
        log.info("resumed %s at step %d", run_dir, p.step)
    elif ckpt_path.is_file():
        raise UsageError(
            f"--out {run_dir} already holds a run; pass --train-resume or choose another --out"
        )

    def checkpoint() -> None:
        save_checkpoint(
            {
                "format": "spcxr-supervised-checkpoint",
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                **p.state(),
            },
            ckpt_path,
        )

    logger = RunLogger(run_dir, tensorboard=config.tensorboard, start_step=p.step)
    bar = tqdm(
        total=total, initial=p.step, desc=run_dir.name, unit="step", disable=not config.progress
    )
    stopped_early, stopped_by = False, None
    with stop_on_signals() as stop:
        try:
            batches = store_batches(
                task.store, plan, p.step, total, workers=config.workers, masks=task.with_masks
            )
            if probe_steps:
                model.freeze_encoder(p.step < probe_steps)
            model.train()
            while p.step < total:
                batch = {k: v.to(device, non_blocking=True) for k, v in next(batches).items()}
                if probe_steps and p.step == probe_steps:
                    model.freeze_encoder(False)
                    p.bad_evals = 0  # patience counts from the start of fine-tuning
                    log.info(
                        "step %d: encoder unfrozen (fine-tuning after the probe phase)", p.step
                    )
                lr = phase_lr(p.step, total, probe_steps, base_lr, config.optim.min_lr, warmup)
                for group in optimizer.param_groups:
                    group["lr"] = lr * group.get("lr_scale", 1.0)
                # Stochastic depth and dropout draw from the global RNG: reseed per step (resume).
                torch.manual_seed(derive_seed(config.seed, "step", p.step))
                with autocast(device, precision):
                    loss = task.loss(batch, p.step)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if config.optim.clip_grad > 0:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), config.optim.clip_grad)
                optimizer.step()
                p.step += 1
                bar.update(1)
                p.window += float(loss.detach())
                p.window_n += 1
                if p.step % eval_every == 0 or p.step == total:
                    record, value = _validation(task, p, lr, p.step / spe)
                    logger.log(p.step, record)
                    bar.set_postfix(
                        train_loss=f"{record['train_loss']:.3f}",
                        **{f"val_{select}": f"{value:.3f}"},
                    )
                    checkpoint()
                    # Never stop in the probe phase: the fine-tuning phase has not been tried yet.
                    if config.patience and p.bad_evals >= config.patience and p.step > probe_steps:
                        stopped_early = True
                        log.info(
                            "early stop at step %d (best %s %.4f at step %d)",
                            p.step,
                            select,
                            p.best_value,
                            p.best_step,
                        )
                        break
                elif stop.signum is not None:
                    # Between validations: checkpoint here. Every random choice is a function of
                    # (seed, step), so the resumed run goes on exactly as if never stopped.
                    checkpoint()
                if stop.signum is not None and p.step < total:
                    stopped_by = signal.Signals(stop.signum).name
                    log.warning(
                        "%s: stopped by %s at step %d of %d", run_dir, stopped_by, p.step, total
                    )
                    break
        finally:
            bar.close()
            logger.close()
    return FitResult(
        steps=p.step,
        best_step=p.best_step,
        best_value=p.best_value,
        history=p.history,
        stopped_early=stopped_early,
        seconds=time.perf_counter() - started,
        stopped_by=stopped_by,
        total_steps=total,
    )


def write_train_rows(store: PreparedStore, rows: np.ndarray, run_dir: Path) -> None:
    """``train_rows.csv``: exactly which images a run trained on (``spcxr evaluate`` refuses to
    score any test image whose pixel hash is in it)."""
    m = store.manifest
    pd.DataFrame(
        {
            "row": rows,
            "image_path": m["image_path"].iloc[rows].to_numpy(),
            "patient_group": m["group"].iloc[rows].to_numpy(),
            "pixel_hash": m["pixel_hash"].iloc[rows].to_numpy(),
        }
    ).to_csv(run_dir / "train_rows.csv", index=False)


UNFINISHED_MODEL = "its model is only the best state validated so far"


def unfinished_reason(info: dict[str, Any]) -> str:
    """Why a run's ``run.json`` has no ``finished``: the signal that stopped it and where, else
    an interruption (a killed process) or a run still training."""
    stopped = info.get("stopped")
    if isinstance(stopped, dict):
        return f"stopped by {stopped.get('by')} at step {stopped.get('step')}"
    return "interrupted, or still training"


def finish_run(run_dir: Path, info: dict[str, Any], result: FitResult) -> dict[str, Any]:
    """Add what :func:`fit` did to the run's record and rewrite ``run.json``."""
    info.update(
        {
            "steps": result.steps,
            "best_step": result.best_step,
            "best_value": result.best_value,
            "stopped_early": result.stopped_early,
            "seconds": round(result.seconds, 1),
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
    )
    atomic_write_text(run_dir / "run.json", json.dumps(info, indent=2))
    return info


def preprocessing_record(store: PreparedStore, img_size: int) -> dict[str, Any]:
    """How a model's inputs were made from raw files, so inference repeats it (not re-guesses).

    Raw file -> :func:`spcxr.io.read_image` with these DICOM settings (pixels in [0, 1], higher =
    more attenuation) -> :func:`spcxr.data.prepare.fit_square` to ``store_image_size`` (aspect
    kept, padded with 0) -> uint8 -> :func:`spcxr.data.augment.eval_transform` to ``img_size``
    (bilinear, antialiased) -> ``(x - mean) / std``.
    """
    prep = store.meta.get("prepare_config", {})
    return {
        "store_image_size": int(store.image_size),
        "dicom_windowing": prep.get("dicom_windowing", "auto"),
        "dicom_percentiles": list(prep.get("dicom_percentiles", (0.5, 99.5))),
        "img_size": int(img_size),
        "mean": 0.5,
        "std": 0.25,
        "steps": [
            "spcxr.io.read_image",
            "spcxr.data.prepare.fit_square(store_image_size) -> uint8",
            "spcxr.data.augment.eval_transform(img_size)",
        ],
    }


def class_weights(y: np.ndarray, n_classes: int) -> np.ndarray:
    """Inverse-frequency class weights: every present class weighs the same in total, and the
    mean weight over the samples is 1 (classes absent get weight 0)."""
    counts = np.bincount(y, minlength=n_classes).astype(np.float64)
    present = max(int((counts > 0).sum()), 1)
    weights = np.where(counts > 0, counts.sum() / np.maximum(counts, 1) / present, 0.0)
    return weights


# ---------------------------------------------------------------------------------------------
# repeated label draws


def parse_seeds(text: str | int | list[int]) -> list[int]:
    """Budget seeds: ``"0-4"`` (inclusive range), ``"0,2,5"``, a mix (``"0-2,7"``) or a list.

    Raises:
        ValueError: an unreadable spelling, a descending range or a repeated seed (the message
            names ``--budget-seeds``).
    """
    if isinstance(text, int):
        return [text]
    if isinstance(text, list):
        parts = [str(x) for x in text]
    else:
        parts = [p.strip() for p in str(text).split(",") if p.strip()]
    seeds: list[int] = []
    for part in parts:
        low, dash, high = part.partition("-")
        try:
            a = int(low)
            b = int(high) if dash else a
        except ValueError:
            raise ValueError(
                f"--budget-seeds: {text!r} is not a list of seeds (use e.g. 0-4 or 0,2,5)"
            ) from None
        if b < a or a < 0:
            raise ValueError(f"--budget-seeds: range {part!r} must be ascending and >= 0")
        seeds.extend(range(a, b + 1))
    if not seeds:
        raise ValueError(f"--budget-seeds: no seed in {text!r}")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"--budget-seeds: {text!r} repeats a seed")
    return seeds


def draw_dir(out: str | Path, seed: int) -> Path:
    """Run folder of one label draw of a repeated-draws run."""
    return Path(out) / f"draw-{seed}"


def run_finished(run: str | Path) -> bool:
    """True when ``run/run.json`` says the run finished."""
    info = Path(run) / "run.json"
    return info.is_file() and "finished" in json.loads(info.read_text())


def run_draws(config: Any, train_fn: Callable[[Any], dict[str, Any]]) -> list[dict[str, Any]]:
    """One run per seed of ``config.budget_seeds`` in ``OUT/draw-SEED`` (repeated label draws).

    Each draw is a normal run with ``budget_seed`` = its seed; a finished draw is skipped (its
    run.json is returned), an interrupted one resumes from its checkpoint. Few-label results
    vary more between draws than between initialisations, so one draw decides nothing.
    """
    from dataclasses import replace

    results = []
    for seed in parse_seeds(config.budget_seeds):
        run = draw_dir(config.out, seed)
        if run_finished(run):
            log.info("draw %d: %s already finished; skipped", seed, run)
            info = json.loads((run / "run.json").read_text())
            info["skipped"] = True
        else:
            info = train_fn(replace(config, out=str(run), budget_seed=seed, budget_seeds=""))
        info["run_dir"] = str(run)
        results.append(info)
    return results
