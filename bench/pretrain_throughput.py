"""GMML pretraining throughput: spcxr end-to-end vs the bare model step vs a reference-style pipeline.

Measured in one run, on one device (or one per rank under ``torchrun``), in this order and
repeated ``--rounds`` times (phases alternate, so drift on a shared machine hits all alike):

- ``bare``: the model step alone (forward, loss, backward, gradient clipping, optimiser) of
  :meth:`Pretrainer.train_step` on one prepared batch (real views and masks) already on the
  device: the ceiling for this model, batch and device.
- ``spcxr``: end-to-end from a prepared store on local disk, the code path of ``spcxr
  pretrain``: loader workers slice uint8 batches out of the store
  (:meth:`Pretrainer.batches`), the :class:`~spcxr.data.loader.DevicePrefetcher` copies them to
  the device and augments, masks and corrupts them there (batched, on a side CUDA stream), and
  the same model step runs. The fraction of time the device waits for data is measured as in
  training (:class:`~spcxr.data.loader.DataWaitMeter`: CUDA events, no per-step sync).
- ``pipeline``: the spcxr data path alone (loader + device augmentation + masking, no model):
  the rate it could feed.
- ``reference``: a pipeline after the GMML authors' code (implemented here): loader workers
  augment each image with torchvision transforms and corrupt each view with a Python loop that
  adds one rectangle at a time; on the device a second loop over the views of the batch redraws
  the replacement views from another image, one view at a time; an eager model step with autocast
  and the default (foreach) AdamW. Its loader hands each whole batch to one worker, so its rate
  arrives in waves; it is timed after the initial backlog (``prefetch_factor x workers``
  batches) over at least two waves. It reads the same prepared store as spcxr (256 px uint8),
  not the original image files the authors' ImageFolder loader decodes, so it is faster than
  their code and the ratio to it is conservative.
- ``reference_pipeline`` (with ``--reference-pipeline``): its data path alone (loader workers
  + the replacement loop, no model).

Every phase times ``--steps`` steps after ``--warmup`` untimed ones (compilation happens in the
first warm-up and is reported as ``warmup_s``), with a device sync only at the ends of a phase.
Model FLOPs per view are counted with ``torch.utils.flop_counter.FlopCounterMode`` on one forward
+ backward (on the meta device: free); MFU = FLOPs/view x views/s / peak, with the peak from
``--peak-tflops`` or a table of datasheet values keyed on the GPU name (null on the CPU). The
bf16 matmul rate measured on the device (``matmul_tflops``) is reported too, with the MFU against
it.

``--precision compare`` instead measures float32 against bf16 autocast end to end (the
``spcxr`` phase and the bare step), side by side for each of ``--archs``, phases alternating over
``--rounds``, and prints one JSON line with the views/s of each and their ratio (bf16 / fp32).
``--precision auto|fp32|bf16`` sets the precision of the ordinary run.

Prints one JSON line (rank 0) and appends it to ``OUT_DIR/pretrain_throughput.jsonl`` with
``--out-dir``. Under ``torchrun --nproc_per_node N`` each rank reads only its slice of every
global batch (``--batch-size`` is per rank), and views/s are totals over the ranks with the
per-rank rates alongside; the reference phase runs per rank without gradient averaging.

Usage:
    # GPU (defaults: ViT-S/16 at 224 px, 256 images = 512 views per step, bf16, compiled)
    python bench/pretrain_throughput.py --device cuda --out-dir bench_out
    torchrun --nproc_per_node 8 bench/pretrain_throughput.py --device cuda
    # CPU, a small model
    python bench/pretrain_throughput.py --device cpu --arch vit_tiny --img-size 64 \\
        --patch-size 8 --batch-size 16 --steps 6 --warmup 2 --workers 1 --ref-workers 1
    # CPU, float32 vs bf16 autocast for ViT-Ti/16 and ViT-S/16 at 112 px, batch 32
    python bench/pretrain_throughput.py --device cpu --precision compare --img-size 112 \\
        --batch-size 32 --steps 4 --warmup 1 --rounds 2 --workers 1
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
import torchvision.transforms.v2 as T
from torch.utils.data import DataLoader, Dataset
from torch.utils.flop_counter import FlopCounterMode

from spcxr.data.augment import AugmentConfig
from spcxr.data.loader import DataWaitMeter
from spcxr.data.store import PreparedStore
from spcxr.pretrain.engine import OptimConfig, PreparedBatch, PretrainConfig, Pretrainer
from spcxr.pretrain.gmml import GMMLConfig, GMMLModel, param_groups, reconstruction_loss
from spcxr.pretrain.masking import MaskingConfig
from spcxr.train import distributed

# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s: half of the "with sparsity" figures of
# NVIDIA's datasheets (H100: "NVIDIA H100 Tensor Core GPU" datasheet, SXM 1,979 / NVL 1,671 /
# PCIe 1,513; H200: "NVIDIA H200 Tensor Core GPU" datasheet, SXM 1,979 / NVL 1,671; A100: 312
# dense). Matched, first hit, on torch.cuda.get_device_name(); "NVIDIA H100 80GB HBM3" is the SXM
# part. Sustained clocks under load are lower: ``matmul_tflops`` is what the card delivered.
PEAK_BF16_TFLOPS: tuple[tuple[str, float, str], ...] = (
    ("h200 nvl", 835.0, "NVIDIA H200 NVL datasheet (1,671 sparse / 2)"),
    ("h200", 989.0, "NVIDIA H200 SXM datasheet (1,979 sparse / 2)"),
    ("h100 nvl", 835.0, "NVIDIA H100 NVL datasheet (1,671 sparse / 2)"),
    ("h100 pcie", 756.0, "NVIDIA H100 PCIe datasheet (1,513 sparse / 2)"),
    ("h100", 989.0, "NVIDIA H100 SXM datasheet (1,979 sparse / 2)"),
    ("a100", 312.0, "NVIDIA A100 datasheet (dense bf16)"),
)


def peak_tflops(device_name: str, override: float | None) -> tuple[float | None, str | None]:
    """Peak dense TFLOP/s of the training dtype and where it comes from (``None`` if unknown)."""
    if override is not None:
        return override, "--peak-tflops"
    name = device_name.lower()
    for key, value, source in PEAK_BF16_TFLOPS:
        if key in name:
            return value, source
    return None, None


def gflop_per_view(model_config: GMMLConfig, loss_on: str) -> float:
    """Model GFLOP of one view's forward + backward (FlopCounterMode on the meta device).

    Matmuls, attention (SDPA decomposes into batched matmuls on the meta device) and the
    convolutions are counted; elementwise work, norms and the optimiser are not, as in the usual
    MFU convention.
    """
    views = 2
    with torch.device("meta"):
        model = GMMLModel(model_config)
        side, chans = model_config.img_size, model_config.in_chans
        x = torch.empty(views, chans, side, side)
        mask = torch.ones(views, 1, side, side, dtype=torch.bool)
    counter = FlopCounterMode(display=False)
    with counter:
        reconstruction_loss(model(x), x, mask, loss_on).backward()
    return counter.get_total_flops() / views / 1e9


def matmul_tflops(device: torch.device) -> float:
    """Sustained matmul TFLOP/s in the training dtype (bf16 on CUDA, float32 on the CPU)."""
    cuda = device.type == "cuda"
    n, reps = (8192, 20) if cuda else (1024, 5)
    dtype = torch.bfloat16 if cuda else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    _sync(device)
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    _sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - start) / 1e12


# ---------------------------------------------------------------------------------------------
# reference-style pipeline


def reference_corrupt_one(x: torch.Tensor, cfg: MaskingConfig, donor: torch.Tensor | None = None):
    """One view, one rectangle per loop iteration (the reference's per-image while-loop)."""
    _, h, w = x.shape
    p = cfg.max_fraction
    fraction = cfg.replace_fraction if donor is not None else random.uniform(min(0.5, p), p)
    target = fraction * h * w
    max_h, max_w = int(h * cfg.max_block), int(w * cfg.max_block)
    align = max(1, cfg.align)
    mask = torch.zeros_like(x)
    while mask[0].sum() < target:
        r, c = random.randint(0, h - align), random.randint(0, w - align)
        rh = round(min(random.randint(align, max_h), h - r) / align) * align
        rw = round(min(random.randint(align, max_w), w - c) / align) * align
        if donor is not None:
            x[:, r : r + rh, c : c + rw] = donor[:, r : r + rh, c : c + rw]
        else:
            x[:, r : r + rh, c : c + rw] = torch.empty((x.shape[0], rh, rw)).normal_()
        mask[:, r : r + rh, c : c + rw] = 1
    return x, mask


class ReferenceViews(Dataset):
    """Per-image torchvision augmentation + per-view rectangle loop, in loader workers."""

    def __init__(self, store: Path, aug: AugmentConfig, masking: MaskingConfig) -> None:
        self.store_path, self.store = store, None
        self.masking = masking
        self.transform = T.Compose(
            [
                T.RandomResizedCrop(
                    aug.out_size, scale=aug.crop_scale, ratio=aug.crop_ratio, antialias=True
                ),
                T.RandomHorizontalFlip(aug.flip_p),
                T.RandomApply([T.ColorJitter(aug.brightness, aug.contrast)], p=aug.jitter_p),
                T.RandomApply([T.GaussianBlur(13, aug.blur_sigma)], p=aug.blur_p),
                T.ToDtype(torch.float32, scale=True),
                T.Normalize([aug.mean], [aug.std]),
            ]
        )
        self.n_views = aug.n_views

    def __len__(self) -> int:
        return 10**9

    def __getitem__(self, row: int):
        if self.store is None:
            self.store = PreparedStore(self.store_path)
        image = torch.from_numpy(self.store.images([row])[0]).unsqueeze(0)
        clean, corrupted, masks = [], [], []
        for _ in range(self.n_views):
            view = self.transform(image)
            bad, mask = reference_corrupt_one(view.clone(), self.masking)
            clean.append(view)
            corrupted.append(bad)
            masks.append(mask)
        return torch.stack(clean), torch.stack(corrupted), torch.stack(masks)


def reference_replace(
    clean: torch.Tensor, corrupted: torch.Tensor, masks: torch.Tensor, cfg: MaskingConfig
):
    """The per-image replacement loop on the training device."""
    p_replace = 1.0 / (len(cfg.corruptions) + 1)
    out_x, out_m = corrupted.clone(), masks.clone()
    n = clean.shape[0]
    for i in range(n):
        j = random.randrange(n)
        if random.random() < p_replace:
            out_x[i], out_m[i] = reference_corrupt_one(clean[i].clone(), cfg, donor=clean[j])
    return out_x, out_m


# ---------------------------------------------------------------------------------------------
# phases


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclasses.dataclass
class Timed:
    """Views and seconds of the timed steps of one phase (summed over rounds)."""

    views: int = 0
    seconds: float = 0.0

    def add(self, views: int, seconds: float) -> None:
        self.views += views
        self.seconds += seconds

    @property
    def rate(self) -> float:
        return self.views / self.seconds if self.seconds > 0 else float("nan")


def bare_phase(trainer: Pretrainer, prepared: PreparedBatch, warmup: int, steps: int) -> float:
    """Seconds of ``steps`` model steps on one prepared batch (after ``warmup`` steps)."""
    start = time.perf_counter()
    for k in range(warmup + steps):
        if k == warmup:
            _sync(trainer.device)
            start = time.perf_counter()
        trainer.apply_schedules(trainer.step)
        trainer.train_step([dataclasses.replace(prepared, micro_step=trainer.step)])
        trainer.step += 1
    _sync(trainer.device)
    return time.perf_counter() - start


def spcxr_phase(trainer: Pretrainer, warmup: int, steps: int) -> tuple[float, float]:
    """Seconds of ``steps`` end-to-end steps from the store, and the data-wait fraction."""
    meter = DataWaitMeter(trainer.device)
    step_batches = trainer.batches(steps=warmup + steps)
    start = time.perf_counter()
    for k in range(warmup + steps):
        if k == warmup:
            _sync(trainer.device)
            meter.fraction()  # the timed window starts here
            start = time.perf_counter()
        meter.waiting()
        batches = next(step_batches)
        meter.fetched()
        trainer.apply_schedules(trainer.step)
        trainer.train_step(batches)
        trainer.step += 1
    _sync(trainer.device)
    seconds = time.perf_counter() - start
    wait = meter.fraction()
    step_batches.close()
    return seconds, float(wait if wait is not None else 0.0)


def pipeline_phase(trainer: Pretrainer, warmup: int, steps: int) -> float:
    """Seconds of ``steps`` batches of the data path alone (loader + augmentation + masking)."""
    step_batches = trainer.batches(steps=warmup + steps)
    start = time.perf_counter()
    for k in range(warmup + steps):
        if k == warmup:
            _sync(trainer.device)
            start = time.perf_counter()
        for a, micro in enumerate(next(step_batches)):
            if isinstance(micro, torch.Tensor):  # no prefetcher: prepare here
                trainer.prepare_batch(micro, k * trainer.config.accum_steps + a)
    _sync(trainer.device)
    seconds = time.perf_counter() - start
    step_batches.close()
    return seconds


def reference_phase(
    trainer: Pretrainer,
    store: Path,
    args: argparse.Namespace,
    warmup: int,
    steps: int,
    seed: int,
    *,
    with_model: bool = True,
) -> tuple[float, float]:
    """Seconds of ``steps`` reference-style steps (after ``warmup`` ones), data-wait fraction.

    ``with_model=False`` times the data path alone: loader workers + the replacement loop.
    """
    device, config = trainer.device, trainer.config
    model = trainer.model  # eager, as the reference
    optimizer = torch.optim.AdamW(
        param_groups(model, config.optim.weight_decay),
        lr=trainer.base_lr,
        betas=config.optim.betas,
    )
    order = np.random.default_rng(seed).choice(trainer.rows, args.ref_batch_size * (warmup + steps))
    loader = DataLoader(
        ReferenceViews(store, config.augment, config.masking),
        batch_size=args.ref_batch_size,
        num_workers=args.ref_workers,
        sampler=order.tolist(),
        pin_memory=device.type == "cuda",
    )
    meter = DataWaitMeter(device)
    batches = iter(loader)
    start = time.perf_counter()
    for k in range(warmup + steps):
        if k == warmup:
            _sync(device)
            meter.fraction()
            start = time.perf_counter()
        meter.waiting()
        clean, corrupted, masks = next(batches)
        meter.fetched()
        clean = clean.flatten(0, 1).to(device, non_blocking=True)
        corrupted = corrupted.flatten(0, 1).to(device, non_blocking=True)
        masks = masks.flatten(0, 1).to(device, non_blocking=True)
        corrupted, masks = reference_replace(clean, corrupted, masks, config.masking)
        if not with_model:
            continue
        with distributed.autocast(device, trainer.precision):
            recon = model(corrupted)
        loss = reconstruction_loss(recon, clean, masks[:, :1], config.model.loss_on)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.optim.clip_grad)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    _sync(device)
    seconds = time.perf_counter() - start
    wait = meter.fraction()
    del batches, loader  # stop its workers before the next phase
    return seconds, float(wait if wait is not None else 0.0)


# ---------------------------------------------------------------------------------------------
# the run


def build_store(path: Path, images: int, size: int) -> Path:
    """A prepared store of ``images`` synthetic radiographs of ``size`` px at ``path``."""
    from spcxr.data.prepare import PrepareConfig, prepare
    from spcxr.data.synthetic import SyntheticConfig, write_synthetic_dataset

    raw = path.parent / f"{path.name}_raw"
    listing = write_synthetic_dataset(
        raw, SyntheticConfig(n_patients=math.ceil(images / 2), images_per_patient=(2, 2), size=size)
    )
    # Pretraining reads no lung masks: leave them out of the store (half its size).
    rows = pd.read_csv(listing)
    rows["mask_file"] = ""
    rows.to_csv(listing, index=False)
    prepare(PrepareConfig(sources=[f"csv:{raw}"], out=str(path), image_size=size, progress=False))
    shutil.rmtree(raw)  # the store holds the pixels; the PNGs were only its input
    return path


def shared_store(args: argparse.Namespace, info: distributed.DistInfo) -> tuple[Path, bool]:
    """The store to read: ``--store`` (built there if missing), else a temporary one.

    Rank 0 builds it; the other ranks wait and get its path.

    Returns:
        The store's path and whether it is a temporary one (to delete at the end).
    """
    temporary = args.store is None
    path = args.store or Path(tempfile.mkdtemp(prefix="spcxr_bench_")) / "store"
    if info.is_main and not (path / "manifest.parquet").exists():
        images = args.store_images or 2 * args.batch_size * info.world_size
        build_store(path, images, args.store_size)
    if info.distributed:
        box = [str(path)]
        dist.broadcast_object_list(box, src=0)
        path = Path(box[0])
        distributed.barrier()
    return path, temporary


def _gather(value: float, info: distributed.DistInfo) -> list[float]:
    if not info.distributed:
        return [value]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, value)
    return [float(v) for v in out]


def run(args: argparse.Namespace) -> dict[str, Any] | None:
    wall = time.perf_counter()
    info = distributed.setup(args.device)
    store, temporary = shared_store(args, info)
    if args.only_build_store:
        return None
    try:
        if args.precision == "compare":
            result = compare_precisions(args, info, store)
        else:
            result = measure(args, info, store)
    finally:
        distributed.barrier()
        if temporary and info.is_main:
            shutil.rmtree(store.parent, ignore_errors=True)
    if result is not None:
        result["total_s"] = round(time.perf_counter() - wall, 1)
    return result


def bench_config(
    args: argparse.Namespace, info: distributed.DistInfo, store: Path, arch: str, precision: str
) -> PretrainConfig:
    """The pretraining settings of a measured trainer."""
    return PretrainConfig(
        store=str(store),
        out=tempfile.mkdtemp(prefix="spcxr_bench_run_"),
        splits=[],
        model=GMMLConfig(arch=arch, img_size=args.img_size, patch_size=args.patch_size),
        optim=OptimConfig(warmup_epochs=0),
        batch_size=args.batch_size * info.world_size,
        max_steps=10**6,
        device=args.device,
        precision=precision,
        workers=args.workers,
        compile=args.compile,
        compile_mode=args.compile_mode,
        fused_optimizer=args.fused,
        prefetch=args.prefetch,
        progress=False,
        tensorboard=False,
    )


def compare_precisions(
    args: argparse.Namespace, info: distributed.DistInfo, store: Path
) -> dict[str, Any] | None:
    """float32 vs bf16 autocast, end to end and bare, per arch; phases alternate per round."""
    trainers = {
        (arch, precision): Pretrainer(bench_config(args, info, store, arch, precision))
        for arch in args.archs
        for precision in ("fp32", "bf16")
    }
    views_per_step = args.batch_size * trainers[next(iter(trainers))].config.augment.n_views
    prepared = {}
    for key, trainer in trainers.items():
        first = next(trainer.batches(steps=1))[0]
        prepared[key] = (
            first if isinstance(first, PreparedBatch) else trainer.prepare_batch(first, 0)
        )
        bare_phase(trainer, prepared[key], 0, 1)  # first-step allocations, oneDNN primitives
    timed = {key: (Timed(), Timed()) for key in trainers}
    waits: dict[tuple[str, str], list[float]] = {key: [] for key in trainers}
    for _ in range(args.rounds):
        for key, trainer in trainers.items():
            seconds, wait = spcxr_phase(trainer, args.warmup, args.steps)
            timed[key][0].add(args.steps * views_per_step, seconds)
            waits[key].append(wait)
            if not args.skip_bare:
                seconds = bare_phase(trainer, prepared[key], args.warmup, args.steps)
                timed[key][1].add(args.steps * views_per_step, seconds)
    rates = {key: (_gather(e.rate, info), _gather(b.rate, info)) for key, (e, b) in timed.items()}
    if not info.is_main:
        return None
    results: dict[str, Any] = {}
    for arch in args.archs:
        fp32_e, fp32_b = (sum(v) for v in rates[(arch, "fp32")])
        bf16_e, bf16_b = (sum(v) for v in rates[(arch, "bf16")])
        results[arch] = {
            "fp32_views_per_s": round(fp32_e, 2),
            "bf16_views_per_s": round(bf16_e, 2),
            "speedup": round(bf16_e / fp32_e, 3),
            "bare_fp32_views_per_s": None if args.skip_bare else round(fp32_b, 2),
            "bare_bf16_views_per_s": None if args.skip_bare else round(bf16_b, 2),
            "bare_speedup": None if args.skip_bare else round(bf16_b / fp32_b, 3),
            "data_wait_frac_fp32": round(float(np.mean(waits[(arch, "fp32")])), 4),
            "data_wait_frac_bf16": round(float(np.mean(waits[(arch, "bf16")])), 4),
        }
    for trainer in trainers.values():
        shutil.rmtree(trainer.config.out, ignore_errors=True)
    device = info.device
    return {
        "bench": "pretrain_precision",
        "tag": args.tag,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "cpu_bf16": distributed.cpu_bf16_support() if device.type == "cpu" else None,
        "torch": torch.__version__,
        "world_size": info.world_size,
        "threads": torch.get_num_threads(),
        "img_size": args.img_size,
        "patch_size": args.patch_size,
        "batch_images_per_rank": args.batch_size,
        "views_per_step_per_rank": views_per_step,
        "workers": args.workers,
        "warmup": args.warmup,
        "steps": args.steps,
        "rounds": args.rounds,
        "results": results,
    }


def measure(
    args: argparse.Namespace, info: distributed.DistInfo, store: Path
) -> dict[str, Any] | None:
    """All phases; the result on rank 0 (``None`` on the other ranks)."""
    device = info.device
    config = bench_config(args, info, store, args.arch, args.precision)
    trainer = Pretrainer(config)
    views_per_step = args.batch_size * config.augment.n_views
    ref_views = args.ref_batch_size * config.augment.n_views
    # The reference loader's initial backlog (2 batches per worker) arrives before its steady
    # rate; time at least two full waves of workers after it.
    ref_warmup = args.ref_warmup if args.ref_warmup is not None else 2 * args.ref_workers + 1
    ref_steps = (
        args.ref_steps if args.ref_steps is not None else max(args.steps, 2 * args.ref_workers)
    )

    gflop = gflop_per_view(config.model, config.model.loss_on)
    mm_tflops = matmul_tflops(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak, peak_source = peak_tflops(name, args.peak_tflops)

    # One real batch, prepared as in training, for the bare step (same views and masks).
    first = next(trainer.batches(steps=1))[0]
    prepared = first if isinstance(first, PreparedBatch) else trainer.prepare_batch(first, 0)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    warmup_s = bare_phase(trainer, prepared, 0, 1)  # compiles, when compiling

    bare, spcxr, pipe, ref, ref_pipe = Timed(), Timed(), Timed(), Timed(), Timed()
    waits, ref_waits, peak_mem = [], [], 0.0
    for r in range(args.rounds):
        bare.add(
            args.steps * views_per_step, bare_phase(trainer, prepared, args.warmup, args.steps)
        )
        seconds, wait = spcxr_phase(trainer, args.warmup, args.steps)
        spcxr.add(args.steps * views_per_step, seconds)
        waits.append(wait)
        pipe.add(args.steps * views_per_step, pipeline_phase(trainer, args.warmup, args.steps))
        if cuda:  # spcxr's peak (the reference phase below is left out)
            peak_mem = max(peak_mem, torch.cuda.max_memory_allocated(device) / 2**30)
        if not args.skip_reference:
            seconds, wait = reference_phase(trainer, store, args, ref_warmup, ref_steps, seed=r)
            ref.add(ref_steps * ref_views, seconds)
            ref_waits.append(wait)
        if args.reference_pipeline:
            seconds, _ = reference_phase(
                trainer, store, args, ref_warmup, ref_steps, seed=100 + r, with_model=False
            )
            ref_pipe.add(ref_steps * ref_views, seconds)
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)

    rates = {
        key: _gather(t.rate, info)
        for key, t in (
            ("bare", bare),
            ("spcxr", spcxr),
            ("pipeline", pipe),
            ("reference", ref),
            ("reference_pipeline", ref_pipe),
        )
    }
    wait_all = _gather(float(np.mean(waits)), info)
    ref_wait_all = _gather(float(np.mean(ref_waits)) if ref_waits else float("nan"), info)
    mem_all = _gather(peak_mem, info)
    if not info.is_main:
        return None
    total = {key: float(sum(values)) for key, values in rates.items()}

    def mfu(views_per_s: float, peak_value: float | None) -> float | None:
        if peak_value is None or not math.isfinite(views_per_s):
            return None
        return round(gflop * views_per_s / info.world_size / (peak_value * 1e3), 4)

    def r2(x: float, digits: int = 2) -> float | None:
        return round(x, digits) if math.isfinite(x) else None

    shutil.rmtree(config.out, ignore_errors=True)  # the trainer's (empty) run folder
    result = {
        "bench": "pretrain_throughput",
        "tag": args.tag,
        "device": name,
        "torch": torch.__version__,
        "cuda": torch.version.cuda if device.type == "cuda" else None,
        "world_size": info.world_size,
        "threads": torch.get_num_threads(),
        "arch": args.arch,
        "img_size": args.img_size,
        "patch_size": args.patch_size,
        "batch_images_per_rank": args.batch_size,
        "views_per_step_per_rank": views_per_step,
        "dtype": "bf16 autocast" if trainer.amp else "float32",
        "precision": trainer.precision,
        "compile": trainer.compiled,
        "compile_mode": config.compile_mode if trainer.compiled else None,
        "fused_optimizer": trainer.fused,
        "prefetch": trainer.prefetch,
        "workers": args.workers,
        "warmup": args.warmup,
        "steps": args.steps,
        "rounds": args.rounds,
        "ref_workers": args.ref_workers,
        "ref_batch_images": args.ref_batch_size,
        "ref_warmup": ref_warmup,
        "ref_steps": ref_steps,
        "bare_views_per_s": r2(total["bare"]),
        "spcxr_views_per_s": r2(total["spcxr"]),
        "reference_views_per_s": r2(total["reference"]),
        "spcxr_pipeline_views_per_s": r2(total["pipeline"]),
        "reference_pipeline_views_per_s": r2(total["reference_pipeline"]),
        "spcxr_vs_reference": r2(total["spcxr"] / total["reference"]),
        "spcxr_vs_bare": r2(total["spcxr"] / total["bare"], 3),
        "data_wait_frac": round(max(wait_all), 4),
        "reference_data_wait_frac": r2(max(ref_wait_all), 4),
        "gflop_per_view": round(gflop, 3),
        "peak_tflops": peak,
        "peak_source": peak_source,
        "mfu_bare": mfu(total["bare"], peak),
        "mfu_spcxr": mfu(total["spcxr"], peak),
        "matmul_tflops": round(mm_tflops, 3),
        "mfu_spcxr_vs_matmul": mfu(total["spcxr"], mm_tflops),
        "peak_memory_gib": round(max(mem_all), 2) if cuda else None,
        "warmup_s": round(warmup_s, 1),
        "per_rank_views_per_s": {key: [r2(v) for v in values] for key, values in rates.items()},
        "store": str(store),
        "store_images": len(trainer.rows),
    }
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add = parser.add_argument
    add("--device", default="auto", help="auto, cpu or cuda")
    add("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    add("--arch", default="vit_small")
    add(
        "--precision",
        default="auto",
        choices=("auto", "fp32", "bf16", "compare"),
        help="compute precision; compare: fp32 vs bf16 side by side for each of --archs",
    )
    add("--archs", nargs="+", default=["vit_tiny", "vit_small"], help="--precision compare")
    add("--img-size", type=int, default=224)
    add("--patch-size", type=int, default=16)
    add("--batch-size", type=int, default=256, help="images per step per rank (2 views each)")
    add("--steps", type=int, default=30, help="timed steps per phase and round")
    add("--warmup", type=int, default=8, help="untimed steps before each phase's timed ones")
    add("--rounds", type=int, default=1, help="times the phases are repeated, alternating")
    opt = argparse.BooleanOptionalAction
    add("--compile", action=opt, default=None, help="torch.compile (default: on CUDA only)")
    add("--compile-mode", default="default")
    add("--fused", action=opt, default=None, help="fused AdamW (default: on CUDA only)")
    add("--prefetch", action=opt, default=None, help="side-stream prefetch (default: CUDA)")
    add("--workers", type=int, default=min(4, os.cpu_count() or 1), help="spcxr loader workers")
    add("--ref-workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    add("--ref-batch-size", type=int, default=None, help="default: --batch-size")
    add("--ref-warmup", type=int, default=None, help="default: 2 x ref workers + 1")
    add("--ref-steps", type=int, default=None, help="default: max(steps, 2 x ref workers)")
    add("--skip-reference", action="store_true")
    add("--skip-bare", action="store_true", help="--precision compare: end to end only")
    add("--reference-pipeline", action="store_true", help="also time its data path alone")
    add("--store", type=Path, help="a prepared store; built there if missing (default: temp)")
    add("--store-images", type=int, default=None, help="images of a built store (2 batches)")
    add("--store-size", type=int, default=256, help="image side of a built store")
    add("--peak-tflops", type=float, default=None, help="device peak for MFU (default: table)")
    add("--out-dir", type=Path, help="append the JSON line to OUT_DIR/pretrain_throughput.jsonl")
    add("--tag", default="", help="a label copied into the JSON line")
    add("--only-build-store", action="store_true", help="build --store, measure nothing")
    args = parser.parse_args(argv)
    if args.ref_batch_size is None:
        args.ref_batch_size = args.batch_size
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    random.seed(0)
    torch.manual_seed(0)
    result = run(args)
    try:
        if result is not None:
            line = json.dumps(result)
            print(line, flush=True)
            if args.out_dir is not None:
                args.out_dir.mkdir(parents=True, exist_ok=True)
                with open(args.out_dir / "pretrain_throughput.jsonl", "a") as f:
                    f.write(line + "\n")
    finally:
        distributed.teardown()


if __name__ == "__main__":
    main()
