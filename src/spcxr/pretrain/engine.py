"""``spcxr pretrain``: the GMML training loop (METHOD.md section 1).

Data path: loader workers slice uint8 batches out of the prepared store; on the training device
each batch becomes ``n_views`` augmented views (:mod:`spcxr.data.augment`), group-masked and
corrupted (:mod:`spcxr.pretrain.masking`), and the ViT reconstructs the clean views
(:mod:`spcxr.pretrain.gmml`). Everything random is a function of ``(seed, step, global view)``
(:mod:`spcxr.pretrain.rng`), so a run is reproducible, resumes exactly and gives the same
result on one process or under ``torchrun`` with DistributedDataParallel.

Optimisation follows the reference: AdamW without weight decay on biases and 1-D parameters,
``lr = base_lr * global_batch / 256`` with a per-iteration linear warm-up and cosine decay,
weight decay on a cosine from 0.04 to 0.4, gradient clipping at 3.0, bf16 autocast on CUDA.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from spcxr.atomic import atomic_write_text
from spcxr.config import save_yaml, to_dict
from spcxr.data.augment import AugmentConfig, eval_transform, make_views
from spcxr.data.loader import EpochBatchSampler, StoreBatches, make_loader
from spcxr.data.store import PreparedStore
from spcxr.pretrain.gmml import GMMLConfig, GMMLModel, param_groups, reconstruction_loss_terms
from spcxr.pretrain.masking import MaskingConfig, corrupt
from spcxr.pretrain.rng import BatchRandom, derive_seed
from spcxr.train import distributed
from spcxr.train.checkpoint import load_checkpoint, save_checkpoint
from spcxr.train.logging import RunLogger
from spcxr.train.schedule import cosine_schedule
from spcxr.versions import library_versions

log = logging.getLogger(__name__)


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
        workers: data-loader worker processes per training process.
        compile: ``torch.compile`` the model.
        grad_checkpointing: recompute blocks in the backward pass (less memory).
        checkpoint_every: steps between checkpoints (one is also written at the end).
        log_every: steps between log lines.
        preview_every: steps between reconstruction previews (0: once per epoch and at the end).
        preview_images: images shown in a preview.
        resume: continue the run in ``out`` from its checkpoint.
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
    workers: int = 2
    compile: bool = False
    grad_checkpointing: bool = False
    checkpoint_every: int = 1000
    log_every: int = 10
    preview_every: int = 0
    preview_images: int = 4
    resume: bool = False
    tensorboard: bool = True
    progress: bool = True


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the run stopped without overwriting the checkpoint."""


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
    "compile",
    "grad_checkpointing",
}


@dataclass
class PretrainResult:
    """What a run did."""

    run_dir: Path
    steps: int
    final_loss: float
    losses: list[tuple[int, float]]
    views_per_second: float
    encoder_path: Path | None


def versions() -> dict[str, str]:
    """Versions that matter for reproducing a run (and the GPU, when there is one)."""
    info = library_versions("timm", "numpy")
    info["torch"] = torch.__version__  # with its build tag (e.g. +cu130): the CUDA build matters
    info["platform"] = platform.platform()
    if torch.cuda.is_available():
        info["cuda"] = str(torch.version.cuda)
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def select_rows(store: PreparedStore, config: PretrainConfig) -> np.ndarray:
    """The manifest rows pretraining uses (the chosen splits and sources)."""
    rows = store.indices(config.splits or None, source=config.sources or None)
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
        self.dist = distributed.setup(config.device)
        config.augment = dataclasses.replace(config.augment, out_size=config.model.img_size)
        self.config = config
        self.run_dir = Path(config.out)
        self.store = PreparedStore(config.store)
        self.rows = select_rows(self.store, config)
        micro = config.batch_size // config.accum_steps
        if config.batch_size % config.accum_steps or micro % self.dist.world_size:
            raise ValueError(
                f"batch_size {config.batch_size} must split into {config.accum_steps} accumulation "
                f"steps of a multiple of {self.dist.world_size} processes"
            )
        self.micro_global = micro
        self.micro_local = micro // self.dist.world_size
        self.steps_per_epoch = max(1, len(self.rows) // config.batch_size)
        self.total_steps = config.max_steps or math.ceil(config.epochs * self.steps_per_epoch)
        self.warmup_steps = round(config.optim.warmup_epochs * self.steps_per_epoch)
        self.base_lr = config.optim.lr * config.batch_size / 256.0
        self.device = self.dist.device
        self.amp = self.device.type == "cuda"
        if self.amp:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True

        torch.manual_seed(derive_seed(config.seed, "init"))
        self.model = GMMLModel(config.model).to(self.device)
        if config.grad_checkpointing:
            self.model.set_grad_checkpointing(True)
        self.optimizer = torch.optim.AdamW(
            param_groups(self.model, config.optim.weight_decay),
            lr=self.base_lr,
            betas=config.optim.betas,
        )
        self.step = 0
        self.checkpoint_path = self.run_dir / "checkpoint.pt"
        if config.resume and self.checkpoint_path.exists():
            self._resume()
        elif config.resume:
            log.info("--resume: no checkpoint in %s yet, starting a new run", self.run_dir)
        elif self.checkpoint_path.exists():
            raise ValueError(
                f"{self.run_dir} already holds a run; pass --resume to continue it or choose another --out"
            )
        self.forward_model: torch.nn.Module = self.model
        if self.dist.distributed:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.forward_model = DistributedDataParallel(self.model, device_ids=ids)
        if config.compile:
            self.forward_model = torch.compile(self.forward_model)

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
        changed = sorted(k for k in now if k not in _RESUMABLE and saved.get(k) != now[k])
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
        atomic_write_text(self.run_dir / "run.json", json.dumps(info, indent=2))

    # ----------------------------------------------------------------------------------------
    # one step

    def lr_wd(self, step: int) -> tuple[float, float]:
        """Learning rate and weight decay of ``step`` (per-iteration warm-up + cosine)."""
        o = self.config.optim
        lr = cosine_schedule(step, self.total_steps, self.base_lr, o.min_lr, self.warmup_steps)
        wd = cosine_schedule(step, self.total_steps, o.weight_decay, o.weight_decay_end)
        return lr, wd

    def _schedules(self, step: int) -> tuple[float, float]:
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

    def train_step(self, batches: list[Tensor]) -> tuple[Tensor, Tensor]:
        """One optimisation step over ``accum_steps`` micro-batches; returns (loss, grad norm)."""
        config = self.config
        total_sum = torch.zeros((), device=self.device)
        total_count = torch.zeros((), device=self.device)
        for a, images_u8 in enumerate(batches):
            micro_step = self.step * config.accum_steps + a
            # Stochastic depth draws from the global RNG: reseed per step so a resumed run
            # redraws exactly what the interrupted one would have.
            torch.manual_seed(derive_seed(config.seed, micro_step, self.dist.rank))
            with torch.no_grad():
                views, corrupted = self.corrupt_batch(images_u8, micro_step)
            sync = a == len(batches) - 1 or not self.dist.distributed
            context = contextlib.nullcontext() if sync else self.forward_model.no_sync()
            with context:
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
                    recon = self.forward_model(corrupted.images)
                loss_sum, count = reconstruction_loss_terms(
                    recon, views, corrupted.mask, config.model.loss_on
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

    def run(self) -> PretrainResult:
        config = self.config
        self._write_run_info()
        logger = RunLogger(self.run_dir, enabled=self.dist.is_main, tensorboard=config.tensorboard)
        sampler = EpochBatchSampler(
            self.rows,
            self.micro_global,
            rank=self.dist.rank,
            world_size=self.dist.world_size,
            seed=config.seed,
            start_step=self.step * config.accum_steps,
            total_steps=self.total_steps * config.accum_steps,
            steps_per_epoch=self.steps_per_epoch * config.accum_steps,  # whole optimisation steps
        )
        loader = make_loader(
            StoreBatches(self.store), sampler, workers=config.workers, pin_memory=self.amp
        )
        bar = tqdm(
            total=self.total_steps,
            initial=self.step,
            desc="pretrain",
            unit="step",
            disable=not (config.progress and self.dist.is_main),
        )
        views_per_step = config.batch_size * config.augment.n_views
        losses: list[tuple[int, float]] = []
        window_loss = torch.zeros((), device=self.device)
        window_steps, window_start = 0, time.perf_counter()
        bad_step = torch.full((), -1, dtype=torch.int64, device=self.device)
        last_good = self.step if self.checkpoint_path.exists() else None
        vps = 0.0
        preview_every = config.preview_every or self.steps_per_epoch
        self.model.train()
        batches: list[Tensor] = []
        try:
            for batch in loader:
                batches.append(batch["images"].to(self.device, non_blocking=True))
                if len(batches) < config.accum_steps:
                    continue
                lr, wd = self._schedules(self.step)
                loss, grad_norm = self.train_step(batches)
                batches = []
                # Remember the first non-finite step without a host sync.
                bad_step = torch.where((bad_step < 0) & ~torch.isfinite(loss), self.step, bad_step)
                window_loss += torch.nan_to_num(loss, nan=0.0, posinf=0.0)
                window_steps += 1
                self.step += 1
                bar.update(1)
                done = self.step == self.total_steps
                if self.step % config.log_every == 0 or done:
                    self._check_finite(bad_step, last_good)
                    elapsed = time.perf_counter() - window_start
                    vps = window_steps * views_per_step / max(elapsed, 1e-9)
                    mean_loss = float(window_loss) / window_steps
                    losses.append((self.step, mean_loss))
                    logger.log(
                        self.step,
                        {
                            "loss": mean_loss,
                            "lr": lr,
                            "wd": wd,
                            "views_per_s": vps,
                            "grad_norm": float(grad_norm),
                            "epoch": self.step / self.steps_per_epoch,
                        },
                    )
                    bar.set_postfix(loss=f"{mean_loss:.4f}", views_s=f"{vps:.0f}")
                    window_loss.zero_()
                    window_steps, window_start = 0, time.perf_counter()
                if self.step % preview_every == 0 or done:
                    self.preview()
                if self.step % config.checkpoint_every == 0 or done:
                    self._check_finite(bad_step, last_good)
                    self.save()
                    last_good = self.step
                if done:
                    break
        finally:
            bar.close()
            logger.close()
        encoder_path = self.export() if self.dist.is_main else None
        distributed.barrier()
        return PretrainResult(
            run_dir=self.run_dir,
            steps=self.step,
            final_loss=losses[-1][1] if losses else float("nan"),
            losses=losses,
            views_per_second=vps,
            encoder_path=encoder_path,
        )

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
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
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
