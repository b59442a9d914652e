"""``spcxr pretrain``: the GMML training loop (METHOD.md section 1).

Data path: loader workers slice uint8 batches out of the prepared store; on the training device
each batch becomes ``n_views`` augmented views (:mod:`spcxr.data.augment`), group-masked and
corrupted (:mod:`spcxr.pretrain.masking`), and the ViT reconstructs the clean views
(:mod:`spcxr.pretrain.gmml`). Everything random is a function of ``(seed, step, global view)``
(:mod:`spcxr.rng`), so a run is reproducible, resumes exactly and gives the same
result on one process or under ``torchrun`` with DistributedDataParallel.

Optimisation follows the reference: AdamW without weight decay on biases and 1-D parameters,
``lr = base_lr * global_batch / 256`` with a per-iteration linear warm-up and cosine decay,
weight decay on a cosine from 0.04 to 0.4, gradient clipping at 3.0. ``precision: auto`` runs bf16
autocast on CUDA and on CPUs with native bf16 matmuls (AMX / AVX512-BF16), float32 elsewhere;
the loss is computed in float32 either way.

Long runs go in pieces: ``time_budget`` (or ``step_budget``) ends an invocation with a checkpoint
and exit status 0, and the same command with ``--resume`` continues it, bitwise as if it had never
stopped. SIGTERM (a scheduler pre-empting the job) and Ctrl-C do the same: the step in progress
ends, the checkpoint is written at it, and the CLI exits 143 / 130 (:mod:`spcxr.train.signals`).
``monitor_every`` scores the frozen features on labelled validation images along the way
(:mod:`spcxr.pretrain.monitor`).

Fast path (each a :class:`PretrainConfig` flag whose default ``None`` means "on CUDA, off on the
CPU", so CPU runs compute exactly what they always did): ``torch.compile`` of the model and the
loss, fused AdamW, and a :class:`~spcxr.data.loader.DevicePrefetcher` that copies the next batch
from pinned memory and augments and masks it on a side CUDA stream while the current step runs
(the host syncs of batched masking then no longer drain the training stream). On CUDA TF32
matmuls and cuDNN autotuning are always on. Attention goes through timm's fused
``scaled_dot_product_attention`` (flash attention in bf16). None of these change what is
computed, only how: the same views, masks and loss, up to floating-point summation order
(``tests/pretrain/test_fastpath.py``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import platform
import re
import signal
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from spcxr.atomic import atomic_write_text, remove_orphans
from spcxr.checks import at_least, positive, require, writable_folder
from spcxr.config import save_yaml, to_dict
from spcxr.data.augment import AugmentConfig, eval_transform, make_views
from spcxr.data.loader import (
    DataWaitMeter,
    DevicePrefetcher,
    EpochBatchSampler,
    StoreBatches,
    make_loader,
)
from spcxr.data.store import PreparedStore
from spcxr.errors import UsageError
from spcxr.pretrain.gmml import GMMLConfig, GMMLModel, param_groups, reconstruction_loss_terms
from spcxr.pretrain.masking import Corrupted, MaskingConfig, corrupt
from spcxr.pretrain.monitor import FeatureMonitor, select_monitor_set
from spcxr.rng import BatchRandom, derive_seed
from spcxr.train import distributed
from spcxr.train.checkpoint import load_checkpoint, save_checkpoint
from spcxr.train.logging import RunLogger
from spcxr.train.schedule import cosine_schedule
from spcxr.train.signals import StopRequest, stop_on_signals, stop_reason
from spcxr.versions import library_versions

log = logging.getLogger(__name__)

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
"""``torch.compile`` modes (``PretrainConfig.compile_mode``)."""


@dataclass
class OptimConfig:
    """Optimiser and schedules (defaults: the GMML reference).

    Attributes:
        lr: base learning rate per 256 images; the run uses ``lr * batch_size / 256``.
        min_lr: learning rate at the end of the cosine.
        warmup_epochs: epochs of linear warm-up from 0 (fractions allowed).
        weight_decay: weight decay at the start of the cosine schedule.
        weight_decay_end: weight decay at the end.
        clip_grad: gradient-norm clip (0 disables).
        betas: AdamW betas.
    """

    lr: float = 5e-4
    min_lr: float = 1e-6
    warmup_epochs: float = 10.0
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    clip_grad: float = 3.0
    betas: tuple[float, float] = (0.9, 0.999)


@dataclass
class PretrainConfig:
    """Settings of ``spcxr pretrain`` (every field is a CLI flag and a YAML key).

    Attributes:
        store: the prepared store to train on.
        out: the run folder (config, logs, checkpoints, previews, exported encoder).
        splits: store splits whose images pretraining sees. The default keeps validation and
            test images out of pretraining, so transfer results on them stay honest.
        sources: only these store sources (all when empty).
        model: the ViT and reconstruction head.
        masking: group masking and corruption.
        augment: view augmentation; the view size is always ``model.img_size``.
        optim: optimiser and schedules.
        batch_size: images per optimisation step, over all processes and accumulation steps.
        accum_steps: gradient accumulation steps per optimisation step.
        epochs: training length in epochs (passes over the chosen images).
        max_steps: optimisation steps; overrides ``epochs`` when > 0.
        seed: seed of data order, augmentation, masking and initialisation.
        device: ``auto``, ``cpu``, ``cuda``.
        precision: ``auto`` (bf16 autocast on CUDA and on CPUs with AMX or AVX512-BF16, else
            float32), ``fp32`` or ``bf16`` (an error on a CPU without native bf16).
        workers: data-loader worker processes per training process.
        compile: ``torch.compile`` the model and the loss (``None``: on CUDA; off on the CPU,
            where compiling takes longer than it saves in a short run).
        compile_mode: ``torch.compile`` mode: "default", "reduce-overhead" (CUDA graphs),
            "max-autotune" or "max-autotune-no-cudagraphs" (minutes of GEMM autotuning first).
        fused_optimizer: fused AdamW, one kernel for all parameters (``None``: on CUDA only).
        prefetch: copy, augment and mask the next batch on a side CUDA stream while the current
            step runs (``None``: on CUDA only; on the CPU it only reorders the same work).
        grad_checkpointing: recompute blocks in the backward pass (less memory).
        checkpoint_every: steps between checkpoints (one is also written at the end).
        log_every: steps between log lines.
        preview_every: steps between reconstruction previews (0: once per epoch and at the end).
        preview_images: images shown in a preview.
        monitor_every: steps between feature-monitor evaluations (0: off): k-NN and linear-probe
            accuracy of the frozen encoder on labelled validation images (never trained on).
        monitor_images: images in the monitor's fixed subset.
        monitor_split: the store split the monitor's images come from.
        monitor_column: the manifest column with the monitor's labels.
        monitor_sources: only images of these sources (all when empty).
        time_budget: wall-clock budget of this invocation, e.g. ``2h``, ``90m``, ``45s``, ``1h30m``
            (empty: none); when spent, the run checkpoints and exits 0, and the same command with
            ``--resume`` continues it.
        step_budget: optimisation steps this invocation runs before it checkpoints and exits
            (0: no limit); the same mechanism as ``time_budget``.
        resume: continue the run in ``out`` from its checkpoint (after a spent budget, a stop by
            SIGTERM / Ctrl-C at the step in progress, or a crash at the last periodic one).
        tensorboard: write TensorBoard scalars.
        progress: show a progress bar.
    """

    store: str = ""
    out: str = "runs/pretrain"
    splits: list[str] = field(default_factory=lambda: ["train"])
    sources: list[str] = field(default_factory=list)
    model: GMMLConfig = field(default_factory=GMMLConfig)
    masking: MaskingConfig = field(default_factory=MaskingConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    batch_size: int = 64
    accum_steps: int = 1
    epochs: float = 100.0
    max_steps: int = 0
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"
    workers: int = 2
    compile: bool | None = None
    compile_mode: str = "default"
    fused_optimizer: bool | None = None
    prefetch: bool | None = None
    grad_checkpointing: bool = False
    checkpoint_every: int = 1000
    log_every: int = 10
    preview_every: int = 0
    preview_images: int = 4
    monitor_every: int = 0
    monitor_images: int = 512
    monitor_split: str = "val"
    monitor_column: str = "label"
    monitor_sources: list[str] = field(default_factory=list)
    time_budget: str = ""
    step_budget: int = 0
    resume: bool = False
    tensorboard: bool = True
    progress: bool = True

    def __post_init__(self) -> None:
        """Refuse values that would crash or silently pretrain nothing, naming the flag."""
        at_least(self.batch_size, 1, "--batch-size")
        at_least(self.accum_steps, 1, "--accum-steps")
        require(
            self.batch_size % self.accum_steps == 0,
            "--batch-size",
            self.batch_size,
            f"must split into --accum-steps {self.accum_steps} equal accumulation micro-batches",
        )
        at_least(self.max_steps, 0, "--max-steps")
        if self.max_steps == 0:
            require(
                isinstance(self.epochs, (int, float)) and math.isfinite(self.epochs),
                "--epochs",
                self.epochs,
                "must be a finite number",
            )
            require(
                self.epochs > 0,
                "--epochs",
                self.epochs,
                "a run of 0 steps would save a random encoder as if pretrained: give --epochs "
                "> 0 or --max-steps > 0",
            )
        at_least(self.workers, 0, "--workers")
        o = self.optim
        positive(o.lr, "--optim-lr")
        at_least(o.min_lr, 0, "--optim-min-lr")
        at_least(o.warmup_epochs, 0, "--optim-warmup-epochs")
        at_least(o.weight_decay, 0, "--optim-weight-decay")
        at_least(o.weight_decay_end, 0, "--optim-weight-decay-end")
        at_least(o.clip_grad, 0, "--optim-clip-grad")
        at_least(self.checkpoint_every, 1, "--checkpoint-every")
        at_least(self.log_every, 1, "--log-every")
        at_least(self.preview_every, 0, "--preview-every")
        at_least(self.preview_images, 1, "--preview-images")
        require(
            self.compile_mode in COMPILE_MODES,
            "--compile-mode",
            self.compile_mode,
            f"must be one of {', '.join(COMPILE_MODES)}",
        )
        # The views are the model's input, so their size is the model's. An --augment-out-size
        # left at its default follows --model-img-size; one given that differs is refused
        # (it used to be overridden without a word).
        size = self.model.img_size
        if self.augment.out_size != size:
            require(
                self.augment.out_size == AugmentConfig.out_size,
                "--augment-out-size",
                self.augment.out_size,
                f"differs from --model-img-size {size}: the views are the ViT's input, so they "
                f"are always --model-img-size; leave --augment-out-size out or set "
                f"--model-img-size {self.augment.out_size}",
            )
            self.augment = dataclasses.replace(self.augment, out_size=size)


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the run stopped without overwriting the checkpoint."""


# The run folder and the store are the same when resumed however they are spelled (``./run``,
# ``run/``, an absolute path, a moved run): the checkpoint is read from the folder given, and
# the store is compared by its content fingerprint.
_SAME_BY_IDENTITY = {"out", "store"}

# Fields that may change when a run is resumed (they do not change what is computed).
_RESUMABLE = {
    "resume",
    "progress",
    "workers",
    "log_every",
    "tensorboard",
    "checkpoint_every",
    "preview_every",
    "max_steps",
    "epochs",
    "device",
    "precision",
    "monitor_every",
    "monitor_images",
    "monitor_split",
    "monitor_column",
    "monitor_sources",
    "time_budget",
    "step_budget",
    "compile",
    "compile_mode",
    "fused_optimizer",
    "prefetch",
    "grad_checkpointing",
}


@dataclass
class PreparedBatch:
    """One micro-batch augmented, masked and corrupted on the device, ready for the model.

    Attributes:
        micro_step: the micro-step whose random draws made it; it is trained at that step only.
        views: float32 ``[V, C, S, S]`` clean views (the reconstruction target).
        corrupted: the corrupted views (the model input) and their masks.
    """

    micro_step: int
    views: Tensor
    corrupted: Corrupted


@dataclass
class PretrainResult:
    """What a run did."""

    run_dir: Path
    steps: int
    final_loss: float
    losses: list[tuple[int, float]]
    views_per_second: float
    encoder_path: Path | None
    total_steps: int = 0
    budget_stop: str | None = None
    """Why this invocation stopped before the end (``time_budget`` / ``step_budget``, or the
    signal that asked for a stop: ``SIGTERM`` / ``SIGINT``), else None."""


@dataclass
class _Invocation:
    """What one call of :meth:`Pretrainer.run` carries from step to step.

    Attributes:
        logger: the run's metric log.
        bar: the progress bar.
        wait: time spent waiting for data.
        window_loss: summed loss since the last log line (on the device: no sync per step).
        bad_step: the first step with a non-finite loss, -1 if none (on the device).
        last_good: the step of the checkpoint known to be finite, or None.
        started: ``time.monotonic()`` at the start, for the time budget.
        first_step: the step this invocation started at, for the step budget.
        window_steps: steps since the last log line.
        window_start: ``time.perf_counter()`` at the start of the window.
        views_per_s: throughput of the last logged window.
        losses: ``(step, mean loss)`` of each log line.
        budget_stop: ``"time_budget"`` / ``"step_budget"`` once spent, ``"SIGTERM"`` /
            ``"SIGINT"`` once such a signal asked for a stop.
    """

    logger: RunLogger
    bar: Any
    wait: DataWaitMeter
    window_loss: Tensor
    bad_step: Tensor
    last_good: int | None
    started: float
    first_step: int
    window_steps: int = 0
    window_start: float = field(default_factory=time.perf_counter)
    views_per_s: float = 0.0
    losses: list[tuple[int, float]] = field(default_factory=list)
    budget_stop: str | None = None


def versions() -> dict[str, str]:
    """Versions that matter for reproducing a run (and the GPU, when there is one)."""
    info = library_versions("timm", "numpy")
    info["torch"] = torch.__version__  # with its build tag (e.g. +cu130): the CUDA build matters
    info["platform"] = platform.platform()
    if torch.cuda.is_available():
        info["cuda"] = str(torch.version.cuda)
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def fast_path_flag(flag: bool | None, device: torch.device) -> bool:
    """A fast-path flag: ``None`` means on for CUDA, off elsewhere."""
    return device.type == "cuda" if flag is None else bool(flag)


def set_optimizer_fused(optimizer: torch.optim.Optimizer, fused: bool) -> None:
    """Gives every group this run's ``fused`` setting, with step counters where it keeps them.

    ``Optimizer.load_state_dict`` copies the saved groups' options, so a checkpoint written by
    a fused (CUDA) run would make a resumed CPU run fused and vice versa; this restores the
    run's own choice after loading. Fused AdamW keeps each ``step`` counter as float32 on the
    parameter's device, the default implementations as float32 on the CPU (torch's
    conventions); the counters are moved to match, values unchanged.
    """
    for group in optimizer.param_groups:
        group["fused"] = True if fused else None
        on_device = fused or bool(group.get("capturable"))
        for param in group["params"]:
            state = optimizer.state.get(param)
            if state and "step" in state:
                device = param.device if on_device else torch.device("cpu")
                state["step"] = torch.as_tensor(state["step"]).to(device, torch.float32)


_DURATION = re.compile(r"(\d+(?:\.\d*)?)\s*([hms]?)")


def parse_duration(text: str, flag: str = "--time-budget") -> float | None:
    """Seconds in ``"2h"``, ``"90m"``, ``"45s"``, ``"1h30m"`` or ``"3600"``; None when empty."""
    text = str(text).strip().lower()
    if not text:
        return None
    parts = _DURATION.findall(text)
    if not parts or _DURATION.sub("", text).strip():
        raise ValueError(f"{flag}: not a duration: {text!r} (e.g. 2h, 90m, 45s, 1h30m)")
    seconds = sum(float(v) * {"h": 3600, "m": 60, "s": 1, "": 1}[u] for v, u in parts)
    if seconds <= 0:
        raise ValueError(f"{flag}: must be positive, got {text!r}")
    return seconds


def select_rows(store: PreparedStore, config: PretrainConfig) -> np.ndarray:
    """The manifest rows pretraining uses (the chosen splits and sources)."""
    rows = store.trainable(store.indices(config.splits or None, source=config.sources or None))
    if len(rows) == 0:
        raise ValueError(
            f"{store.root}: no images in splits {config.splits} / sources {config.sources or 'all'}"
        )
    return rows


class Pretrainer:
    """One GMML pretraining run (construct, then :meth:`run`)."""

    def __init__(self, config: PretrainConfig) -> None:
        if not config.store:
            raise ValueError("pretrain: --store is required (a folder written by `spcxr prepare`)")
        self.dist = distributed.setup(config.device, "--device")
        config.augment = dataclasses.replace(config.augment, out_size=config.model.img_size)
        self.config = config
        self.run_dir = Path(config.out)
        self.checkpoint_path = self.run_dir / "checkpoint.pt"
        if self.checkpoint_path.exists() and not config.resume:
            raise UsageError(
                f"--out {self.run_dir} already holds a run; pass --resume to continue it or "
                "choose another --out"
            )
        self.store = PreparedStore(config.store)
        self.rows = select_rows(self.store, config)
        if self.dist.is_main:
            # Before any work: a folder that cannot be written is a usage error, not a
            # traceback after the first checkpoint interval.
            writable_folder(self.run_dir, "--out")
            for orphan in remove_orphans(self.run_dir):
                log.info("removed %s (left by an interrupted write)", orphan)
        micro = config.batch_size // config.accum_steps
        if config.batch_size % config.accum_steps or micro % self.dist.world_size:
            raise UsageError(
                f"--batch-size {config.batch_size}: must split into --accum-steps "
                f"{config.accum_steps} micro-batches of a multiple of {self.dist.world_size} "
                "processes"
            )
        self.micro_global = micro
        self.micro_local = micro // self.dist.world_size
        self.steps_per_epoch = max(1, len(self.rows) // config.batch_size)
        self.total_steps = config.max_steps or math.ceil(config.epochs * self.steps_per_epoch)
        self.warmup_steps = round(config.optim.warmup_epochs * self.steps_per_epoch)
        self.base_lr = config.optim.lr * config.batch_size / 256.0
        self.device = self.dist.device
        self.cuda = self.device.type == "cuda"
        self.precision = distributed.resolve_precision(config.precision, self.device)
        self.amp = self.precision == "bf16"
        self.time_budget = parse_duration(config.time_budget)
        if config.step_budget < 0:
            raise ValueError(f"--step-budget must be >= 0, got {config.step_budget}")
        if config.compile_mode not in COMPILE_MODES:
            raise ValueError(
                f"compile_mode must be one of {COMPILE_MODES}, got {config.compile_mode!r}"
            )
        self.compiled = fast_path_flag(config.compile, self.device)
        self.fused = fast_path_flag(config.fused_optimizer, self.device)
        self.prefetch = fast_path_flag(config.prefetch, self.device)
        if self.cuda:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
            # Fixed shapes every step: let cuDNN time its algorithms for the patch embedding
            # and the head's transposed convolution once.
            torch.backends.cudnn.benchmark = True

        self.monitor: FeatureMonitor | None = None
        if config.monitor_every < 0:
            raise ValueError(f"--monitor-every must be >= 0, got {config.monitor_every}")
        if config.monitor_every and self.dist.is_main:
            subset = select_monitor_set(
                self.store,
                split=config.monitor_split,
                images=config.monitor_images,
                column=config.monitor_column,
                sources=config.monitor_sources,
                seed=config.seed,
            )
            overlap = np.intersect1d(subset.rows, self.rows)
            if len(overlap):
                raise ValueError(
                    f"--monitor-split {config.monitor_split!r}: {len(overlap)} monitor images are "
                    f"also pretrained on (--splits {config.splits}); pick a held-out split"
                )
            self.monitor = FeatureMonitor(
                self.store,
                subset,
                img_size=config.model.img_size,
                in_chans=config.model.in_chans,
                norm=config.augment,
                device=self.device,
                precision=self.precision,
            )

        torch.manual_seed(derive_seed(config.seed, "init"))
        self.model = GMMLModel(config.model).to(self.device)
        if config.grad_checkpointing:
            self.model.set_grad_checkpointing(True)
        self.optimizer = torch.optim.AdamW(
            param_groups(self.model, config.optim.weight_decay),
            lr=self.base_lr,
            betas=config.optim.betas,
            fused=True if self.fused else None,  # None: torch's default (foreach on CUDA)
        )
        self.step = 0
        if config.resume and self.checkpoint_path.exists():
            self._resume()
        elif config.resume:
            log.info("--resume: no checkpoint in %s yet, starting a new run", self.run_dir)
        self.forward_model: torch.nn.Module = self.model
        if self.dist.distributed:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.forward_model = DistributedDataParallel(self.model, device_ids=ids)
        self._compiled_loss = None
        if self.compiled:
            mode = None if config.compile_mode == "default" else config.compile_mode
            self.forward_model = torch.compile(self.forward_model, mode=mode)
            self._compiled_loss = torch.compile(reconstruction_loss_terms)

    # ----------------------------------------------------------------------------------------
    # bookkeeping

    def _state(self) -> dict[str, Any]:
        return {
            "format": "spcxr-pretrain-checkpoint",
            "step": self.step,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "config": to_dict(self.config),
            "store_fingerprint": self.store.fingerprint,
        }

    def _resume(self) -> None:
        state = load_checkpoint(self.checkpoint_path, map_location=self.device)
        saved, now = state["config"], to_dict(self.config)
        changed = sorted(
            k
            for k in now
            if k not in _RESUMABLE and k not in _SAME_BY_IDENTITY and saved.get(k) != now[k]
        )
        if changed:
            raise ValueError(
                f"{self.checkpoint_path}: cannot resume with different settings: {changed}"
            )
        if state["store_fingerprint"] != self.store.fingerprint:
            raise ValueError(
                f"{self.checkpoint_path}: the store changed since this run started "
                f"(fingerprint {state['store_fingerprint']} -> {self.store.fingerprint})"
            )
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        set_optimizer_fused(self.optimizer, self.fused)
        self.step = int(state["step"])
        log.info("resumed %s at step %d", self.run_dir, self.step)

    def _write_run_info(self) -> None:
        if not self.dist.is_main:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        save_yaml(self.config, self.run_dir / "config.yaml")
        m = self.store.manifest.iloc[self.rows]
        info = {
            "seed": self.config.seed,
            "versions": versions(),
            "world_size": self.dist.world_size,
            "device": str(self.device),
            "precision": self.precision,
            "precision_setting": self.config.precision,
            "cpu_bf16": distributed.cpu_bf16_support() if self.device.type == "cpu" else None,
            "threads": torch.get_num_threads(),
            "fast_path": {
                "compile": self.compiled,
                "compile_mode": self.config.compile_mode if self.compiled else None,
                "fused_optimizer": self.fused,
                "prefetch": self.prefetch,
            },
            "data": {
                "store": str(Path(self.config.store).resolve()),
                "store_fingerprint": self.store.fingerprint,
                "splits": self.config.splits,
                "sources": {k: int(v) for k, v in m["source"].value_counts().items()},
                "images": len(self.rows),
                "patients": int(m["group"].nunique()),
                "note": "pretraining saw only these images; other splits are untouched",
            },
            "steps": self.total_steps,
            "steps_per_epoch": self.steps_per_epoch,
            "learning_rate": self.base_lr,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        if self.monitor is not None:
            subset = self.monitor.subset
            info["monitor"] = {
                "split": self.config.monitor_split,
                "column": self.config.monitor_column,
                "classes": subset.classes,
                "images": len(subset.rows),
                "per_class": np.bincount(subset.labels, minlength=len(subset.classes)).tolist(),
                "majority": subset.majority,
                "note": "labels used only to score frozen features, never for training",
            }
        atomic_write_text(self.run_dir / "run.json", json.dumps(info, indent=2))

    # ----------------------------------------------------------------------------------------
    # one step

    def lr_wd(self, step: int) -> tuple[float, float]:
        """Learning rate and weight decay of ``step`` (per-iteration warm-up + cosine)."""
        o = self.config.optim
        lr = cosine_schedule(step, self.total_steps, self.base_lr, o.min_lr, self.warmup_steps)
        wd = cosine_schedule(step, self.total_steps, o.weight_decay, o.weight_decay_end)
        return lr, wd

    def apply_schedules(self, step: int) -> tuple[float, float]:
        """Sets the optimiser's learning rate and weight decay for ``step``; returns both."""
        lr, wd = self.lr_wd(step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
            if group["name"] == "decay":
                group["weight_decay"] = wd
        return lr, wd

    def corrupt_batch(self, images_u8: Tensor, micro_step: int):
        """Views and their corruption for one micro-batch (this process's share)."""
        rnd = BatchRandom.for_views(
            self.config.seed,
            micro_step,
            n_views=self.config.augment.n_views,
            global_batch=self.micro_global,
            first_image=self.dist.rank * self.micro_local,
            local_batch=images_u8.shape[0],
            device=self.device,
        )
        views, image_ids = make_views(images_u8, self.config.augment, rnd)
        views = self._model_channels(views)
        return views, corrupt(views, image_ids, self.config.masking, rnd)

    def _model_channels(self, views: Tensor) -> Tensor:
        """Gray views repeated to the model's input channels (a 3-channel backbone)."""
        chans = self.config.model.in_chans
        return views if chans == 1 else views.expand(-1, chans, -1, -1).contiguous()

    @torch.no_grad()
    def prepare_batch(self, images_u8: Tensor, micro_step: int) -> PreparedBatch:
        """Augments, masks and corrupts one micro-batch of uint8 images for ``micro_step``.

        Uses no global random generator (every draw comes from the step's
        :class:`~spcxr.rng.BatchRandom`), so it may run ahead of the training step,
        on another CUDA stream, without changing anything that is computed.
        """
        views, corrupted = self.corrupt_batch(images_u8, micro_step)
        return PreparedBatch(micro_step, views, corrupted)

    def train_step(self, batches: Sequence[Tensor | PreparedBatch]) -> tuple[Tensor, Tensor]:
        """One optimisation step over ``accum_steps`` micro-batches; returns (loss, grad norm).

        Args:
            batches: the step's micro-batches: uint8 images ``[b, 1, S, S]`` on the device, or
                :class:`PreparedBatch` es made for these micro-steps (see :meth:`batches`).
        """
        config = self.config
        loss_terms = self._compiled_loss or reconstruction_loss_terms
        total_sum = torch.zeros((), device=self.device)
        total_count = torch.zeros((), device=self.device)
        for a, batch in enumerate(batches):
            micro_step = self.step * config.accum_steps + a
            # Stochastic depth draws from the global RNG: reseed per step so a resumed run
            # redraws exactly what the interrupted one would have.
            torch.manual_seed(derive_seed(config.seed, micro_step, self.dist.rank))
            if isinstance(batch, Tensor):
                batch = self.prepare_batch(batch, micro_step)
            elif batch.micro_step != micro_step:
                raise ValueError(
                    f"a batch prepared for micro-step {batch.micro_step} reached micro-step "
                    f"{micro_step}: its augmentation and masks would not be this step's"
                )
            sync = a == len(batches) - 1 or not self.dist.distributed
            context = contextlib.nullcontext() if sync else self.forward_model.no_sync()
            with context:
                with distributed.autocast(self.device, self.precision):
                    recon = self.forward_model(batch.corrupted.images)
                loss_sum, count = loss_terms(
                    recon, batch.views, batch.corrupted.mask, config.model.loss_on
                )
                # Normalise by the masked-pixel count of the whole global micro-batch: DDP then
                # averages gradients to exactly the one-process gradient.
                global_count = distributed.all_reduce_sum(count.detach()).clamp_min(1.0)
                loss = loss_sum * (self.dist.world_size / global_count) / len(batches)
                loss.backward()
            total_sum += loss_sum.detach()
            total_count += count.detach()
        clip = config.optim.clip_grad if config.optim.clip_grad > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        sums = distributed.all_reduce_sum(torch.stack([total_sum, total_count]))
        return sums[0] / sums[1].clamp_min(1.0), grad_norm.detach()

    # ----------------------------------------------------------------------------------------
    # the loop

    def batches(self, steps: int | None = None) -> Iterator[list[Tensor | PreparedBatch]]:
        """The micro-batches of each optimisation step from ``self.step`` on, on the device.

        Loader workers read this process's slice of every global batch from the store
        (:class:`~spcxr.data.loader.EpochBatchSampler`); each yielded list holds the
        ``accum_steps`` micro-batches of one step, in order: uint8 images, or with
        ``prefetch`` :class:`PreparedBatch` es that a
        :class:`~spcxr.data.loader.DevicePrefetcher` copied, augmented and masked one batch
        ahead (on a side stream on CUDA).

        Args:
            steps: optimisation steps to yield (default: up to the end of the run).
        """
        config = self.config
        accum = config.accum_steps
        first_micro = self.step * accum
        last = self.total_steps if steps is None else self.step + steps
        sampler = EpochBatchSampler(
            self.rows,
            self.micro_global,
            rank=self.dist.rank,
            world_size=self.dist.world_size,
            seed=config.seed,
            start_step=first_micro,
            total_steps=last * accum,
            steps_per_epoch=self.steps_per_epoch * accum,  # whole optimisation steps
        )
        loader = make_loader(
            StoreBatches(self.store), sampler, workers=config.workers, pin_memory=self.cuda
        )
        micro_batches: Iterator[Tensor | PreparedBatch]
        if self.prefetch:
            micro_batches = iter(
                DevicePrefetcher(
                    loader,
                    self.device,
                    lambda index, batch: self.prepare_batch(batch["images"], first_micro + index),
                )
            )
        else:
            micro_batches = (b["images"].to(self.device, non_blocking=True) for b in loader)
        group: list[Tensor | PreparedBatch] = []
        for micro in micro_batches:
            group.append(micro)
            if len(group) == accum:
                yield group
                group = []

    def run(self) -> PretrainResult:
        """Trains from ``self.step`` to the end of the run, or until this invocation's budget."""
        self._write_run_info()
        run = self._start_invocation()
        step_batches = self.batches()
        self.model.train()
        # SIGTERM (a scheduler's pre-emption) / Ctrl-C end the step, checkpoint there and return.
        with stop_on_signals() as stop:
            self._loop(run, step_batches, stop)
        return self._finish(run)

    def _loop(
        self,
        run: _Invocation,
        step_batches: Iterator[Sequence[Tensor | PreparedBatch]],
        stop: StopRequest,
    ) -> None:
        config = self.config
        try:
            while self.step < self.total_steps:
                run.wait.waiting()
                batches = next(step_batches, None)
                if batches is None:
                    break
                run.wait.fetched()
                lr, wd, grad_norm = self._step(run, batches)
                done = self.step == self.total_steps
                if self.step % config.log_every == 0 or done:
                    self._log(run, lr, wd, grad_norm)
                self._previews_and_monitor(run, done)
                if not done:
                    run.budget_stop = self._budget_spent(run.started, run.first_step, stop)
                if self.step % config.checkpoint_every == 0 or done or run.budget_stop:
                    self._checkpoint(run)
                if done or run.budget_stop:
                    break
        finally:
            step_batches.close()  # stops the loader workers
            run.bar.close()
            run.logger.close()

    def _start_invocation(self) -> _Invocation:
        """The log, progress bar, data-wait meter and loss window of this invocation."""
        config = self.config
        logger = RunLogger(
            self.run_dir,
            enabled=self.dist.is_main,
            tensorboard=config.tensorboard,
            start_step=self.step,
        )
        wait = DataWaitMeter(self.device)
        bar = tqdm(
            total=self.total_steps,
            initial=self.step,
            desc="pretrain",
            unit="step",
            disable=not (config.progress and self.dist.is_main),
        )
        return _Invocation(
            logger=logger,
            bar=bar,
            wait=wait,
            window_loss=torch.zeros((), device=self.device),
            bad_step=torch.full((), -1, dtype=torch.int64, device=self.device),
            last_good=self.step if self.checkpoint_path.exists() else None,
            started=time.monotonic(),
            first_step=self.step,
        )

    def _step(
        self, run: _Invocation, batches: Sequence[Tensor | PreparedBatch]
    ) -> tuple[float, float, Tensor]:
        """Schedules, one optimisation step, and the loss window; returns (lr, wd, grad norm)."""
        lr, wd = self.apply_schedules(self.step)
        loss, grad_norm = self.train_step(batches)
        # Remember the first non-finite step without a host sync.
        run.bad_step = torch.where(
            (run.bad_step < 0) & ~torch.isfinite(loss), self.step, run.bad_step
        )
        run.window_loss += torch.nan_to_num(loss, nan=0.0, posinf=0.0)
        run.window_steps += 1
        self.step += 1
        run.bar.update(1)
        return lr, wd, grad_norm

    def _log(self, run: _Invocation, lr: float, wd: float, grad_norm: Tensor) -> None:
        """Stops on a non-finite loss, else logs the window's mean loss and throughput."""
        self._check_finite(run.bad_step, run.last_good)
        views_per_step = self.config.batch_size * self.config.augment.n_views
        elapsed = time.perf_counter() - run.window_start
        run.views_per_s = run.window_steps * views_per_step / max(elapsed, 1e-9)
        mean_loss = float(run.window_loss) / run.window_steps
        run.losses.append((self.step, mean_loss))
        record = {
            "loss": mean_loss,
            "lr": lr,
            "wd": wd,
            "views_per_s": run.views_per_s,
            "grad_norm": float(grad_norm),
            "epoch": self.step / self.steps_per_epoch,
        }
        data_wait = run.wait.fraction()  # after the syncs above: no extra wait
        if data_wait is not None:
            record["data_wait_frac"] = data_wait
        run.logger.log(self.step, record)
        run.bar.set_postfix(loss=f"{mean_loss:.4f}", views_s=f"{run.views_per_s:.0f}")
        run.window_loss.zero_()
        run.window_steps, run.window_start = 0, time.perf_counter()

    def _previews_and_monitor(self, run: _Invocation, done: bool) -> None:
        """The reconstruction preview (each epoch by default) and the feature monitor, if due."""
        config = self.config
        if self.step % (config.preview_every or self.steps_per_epoch) == 0 or done:
            self.preview()
        if config.monitor_every and (self.step % config.monitor_every == 0 or done):
            self.run_monitor(run.logger)

    def _checkpoint(self, run: _Invocation) -> None:
        """Saves the checkpoint, never over a good one with a non-finite loss behind it."""
        self._check_finite(run.bad_step, run.last_good)
        self.save()
        run.last_good = self.step

    def _finish(self, run: _Invocation) -> PretrainResult:
        """Exports the encoder of a finished run (not of a piece of one); the result."""
        encoder_path = self.export() if self.dist.is_main and not run.budget_stop else None
        distributed.barrier()
        if run.budget_stop:
            log.info(
                "%s at step %d of %d; checkpoint %s",
                stop_reason(run.budget_stop),
                self.step,
                self.total_steps,
                self.checkpoint_path,
            )
        return PretrainResult(
            run_dir=self.run_dir,
            steps=self.step,
            final_loss=run.losses[-1][1] if run.losses else float("nan"),
            losses=run.losses,
            views_per_second=run.views_per_s,
            encoder_path=encoder_path,
            total_steps=self.total_steps,
            budget_stop=run.budget_stop,
        )

    def _budget_spent(self, started: float, first_step: int, stop: StopRequest) -> str | None:
        """Why this invocation stops here, if it does: ``"step_budget"``, ``"time_budget"``, or
        the signal that asked for a stop (``"SIGTERM"`` / ``"SIGINT"``).

        Under torchrun the ranks agree (a rank over its time budget, or one that got a signal,
        stops all of them), so every process checkpoints and leaves at the same step. Without a
        time budget that agreement costs a host sync, so signals are then only compared every
        ``log_every`` steps (a log line syncs anyway).
        """
        config = self.config
        if config.step_budget and self.step - first_step >= config.step_budget:
            return "step_budget"  # the same step on every rank: nothing to agree on
        signum = stop.signum or 0
        over = self.time_budget is not None and time.monotonic() - started >= self.time_budget
        if self.dist.distributed:
            if self.time_budget is None and self.step % config.log_every:
                return None
            flags = torch.tensor(
                [float(over), float(signum > 0), float(signum)], device=self.device
            )
            over_n, signalled, signum_sum = distributed.all_reduce_sum(flags).tolist()
            over = over_n > 0
            if signalled > 0 and not signum:
                signum = round(signum_sum / signalled)  # the signal another rank got
        if signum:
            return signal.Signals(signum).name
        return "time_budget" if over else None

    def run_monitor(self, logger: RunLogger) -> dict[str, float] | None:
        """Scores the frozen encoder's features (main process); logs them under ``monitor/``."""
        if self.monitor is None:
            return None
        began = time.perf_counter()
        scores = self.monitor(self.model.encoder)
        scores["seconds"] = time.perf_counter() - began
        scores["epoch"] = self.step / self.steps_per_epoch
        logger.log(self.step, {"kind": "monitor", **scores}, prefix="monitor")
        log.info(
            "monitor step %d: k-NN %.3f, linear probe %.3f (majority %.3f)",
            self.step,
            scores["knn_acc"],
            scores["probe_acc"],
            scores["majority"],
        )
        return scores

    def _check_finite(self, bad_step: Tensor, last_good: int | None) -> None:
        first = int(bad_step)
        if first >= 0:
            keep = (
                f"the last good checkpoint (step {last_good}) is kept in {self.checkpoint_path}"
                if last_good is not None
                else "no checkpoint had been written yet"
            )
            raise NonFiniteLossError(
                f"non-finite loss at step {first} (lr {self.lr_wd(first)[0]:.3g}); stopped, "
                f"{keep}. Lower --optim-lr or check the data (spcxr prepare's report)."
            )

    def save(self) -> None:
        """Write the checkpoint (main process; atomic)."""
        if self.dist.is_main:
            save_checkpoint(self._state(), self.checkpoint_path)
        distributed.barrier()

    def export(self) -> Path:
        """Save the encoder as a timm state dict (safetensors + config.json) in ``encoder/``."""
        from spcxr.models.vit import save_encoder

        return save_encoder(
            self.model.encoder,
            self.run_dir / "encoder",
            mean=self.config.augment.mean,
            std=self.config.augment.std,
            extra_config={
                "spcxr": {"step": self.step, "store_fingerprint": self.store.fingerprint}
            },
        )

    @torch.no_grad()
    def preview(self) -> Path | None:
        """Reconstruction preview PNG: clean | corrupted | reconstruction | mask, fixed images."""
        if not self.dist.is_main:
            return None
        from spcxr.pretrain.preview import save_preview

        n = min(self.config.preview_images, len(self.rows))
        rows = self.rows[np.linspace(0, len(self.rows) - 1, n).astype(int)]
        images = torch.from_numpy(self.store.images(rows)).unsqueeze(1).to(self.device)
        # Whole images (deterministic resize, no crop) so the anatomy is recognisable, and
        # fixed corruptions (step -1), so previews of successive epochs are comparable.
        views = self._model_channels(
            eval_transform(images, self.config.model.img_size, self.config.augment)
        )
        rnd = BatchRandom.local(self.config.seed, -1, n, self.device)
        corrupted = corrupt(views, torch.arange(n, device=self.device), self.config.masking, rnd)
        was_training = self.model.training
        self.model.eval()
        with distributed.autocast(self.device, self.precision):
            recon = self.model(corrupted.images).float()
        self.model.train(was_training)
        path = self.run_dir / "previews" / f"step_{self.step:07d}.png"
        save_preview(
            path,
            views,
            corrupted.images,
            recon,
            corrupted.mask,
            self.config.augment,
            title=f"step {self.step}",
        )
        return path


def pretrain(config: PretrainConfig) -> PretrainResult:
    """Run GMML pretraining (see :class:`PretrainConfig`)."""
    trainer = Pretrainer(config)
    try:
        return trainer.run()
    finally:
        distributed.teardown()
