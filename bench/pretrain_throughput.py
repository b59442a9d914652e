"""Benchmark a GMML pretraining step: spcxr's batched pipeline vs a reference-style one.

Both pipelines train the same ViT with the same optimiser on the same store batches; they
differ only in how views are augmented, masked and corrupted:

- spcxr: loader workers slice uint8 batches out of the store; augmentation, group masking and
  corruption run as batched tensor operations on the training device
  (:mod:`spcxr.data.augment`, :mod:`spcxr.pretrain.masking`).
- reference-style (implemented here, after the behaviour of the GMML authors' code): loader
  workers augment each image separately (torchvision transforms) and corrupt each view with a
  Python loop that adds one rectangle at a time until the target area is covered; on the
  training device a second loop over the images of the batch redraws the replacement views
  from another image, one image at a time.

Prints one JSON line: views/s of each full step (measured in the same run, in alternating phases)
and their ratio; views/s of each data pipeline alone (loader + augmentation + masking, no model:
the ceiling a pipeline puts on a fast training step); and the share of spcxr's step spent in
augmentation + masking.

Usage: python bench/pretrain_throughput.py [--store STORE] [--arch vit_small --img-size 224
       --patch-size 16 --batch 16 --steps 6 --device auto]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.v2 as T
from torch.utils.data import DataLoader, Dataset

from spcxr.data.augment import AugmentConfig
from spcxr.data.loader import EpochBatchSampler, StoreBatches, make_loader
from spcxr.data.store import PreparedStore
from spcxr.pretrain.engine import OptimConfig, PretrainConfig, Pretrainer
from spcxr.pretrain.gmml import GMMLConfig, reconstruction_loss
from spcxr.pretrain.masking import MaskingConfig

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


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def run(args: argparse.Namespace, store: Path) -> dict:
    config = PretrainConfig(
        store=str(store),
        out=tempfile.mkdtemp(),
        model=GMMLConfig(arch=args.arch, img_size=args.img_size, patch_size=args.patch_size),
        optim=OptimConfig(warmup_epochs=0),
        batch_size=args.batch,
        max_steps=10**6,
        device=args.device,
        workers=args.workers,
        progress=False,
        tensorboard=False,
        splits=[],
    )
    trainer = Pretrainer(config)
    device = trainer.device
    views_per_step = args.batch * config.augment.n_views
    rows = trainer.rows

    model = trainer.model
    seeds = iter(range(10**6))

    def spcxr_phase(steps: int) -> tuple[list[float], list[float]]:
        """The real loader + train_step; augmentation+masking also timed alone on each batch."""
        sampler = EpochBatchSampler(rows, args.batch, seed=next(seeds), total_steps=steps + 1)
        loader = iter(make_loader(StoreBatches(store), sampler, workers=args.workers))
        step_times, aug_times = [], []
        for k in range(steps + 1):  # the first step warms the workers up
            start = time.perf_counter()
            batch = next(loader)["images"].to(device)
            _sync(device)
            t0 = time.perf_counter()
            with torch.no_grad():
                trainer.corrupt_batch(batch, trainer.step)
            _sync(device)
            aug = time.perf_counter() - t0
            trainer.train_step([batch])  # redoes the same augmentation + masking inside
            trainer.step += 1
            _sync(device)
            if k:
                step_times.append(time.perf_counter() - start - aug)
                aug_times.append(aug)
        del loader  # stop its workers before the other pipeline runs
        return step_times, aug_times

    def reference_phase(steps: int) -> list[float]:
        ref_data = ReferenceViews(store, config.augment, config.masking)
        order = np.random.default_rng(next(seeds)).choice(rows, args.batch * (steps + 1))
        loader = iter(
            DataLoader(ref_data, batch_size=args.batch, num_workers=args.workers, sampler=order)
        )
        times = []
        for k in range(steps + 1):
            start = time.perf_counter()
            clean, corrupted, masks = next(loader)
            clean = clean.flatten(0, 1).to(device)
            corrupted, masks = corrupted.flatten(0, 1).to(device), masks.flatten(0, 1).to(device)
            corrupted, masks = reference_replace(clean, corrupted, masks, config.masking)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                recon = model(corrupted)
            loss = reconstruction_loss(recon, clean, masks[:, :1])
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 3.0)
            trainer.optimizer.step()
            trainer.optimizer.zero_grad(set_to_none=True)
            _sync(device)
            if k:
                times.append(time.perf_counter() - start)
        del loader
        return times

    def pipeline_only(steps: int) -> tuple[float, float]:
        """Views/s of each data pipeline alone (no model): the ceiling it puts on a fast step."""
        sampler = EpochBatchSampler(rows, args.batch, seed=next(seeds), total_steps=steps + 1)
        loader = iter(make_loader(StoreBatches(store), sampler, workers=args.workers))
        next(loader)
        start = time.perf_counter()
        for k in range(steps):
            with torch.no_grad():
                trainer.corrupt_batch(next(loader)["images"].to(device), k)
        _sync(device)
        ours = steps * views_per_step / (time.perf_counter() - start)
        del loader
        ref_data = ReferenceViews(store, config.augment, config.masking)
        order = np.random.default_rng(next(seeds)).choice(rows, args.batch * (steps + 1))
        loader = iter(
            DataLoader(ref_data, batch_size=args.batch, num_workers=args.workers, sampler=order)
        )
        next(loader)
        start = time.perf_counter()
        for _ in range(steps):
            clean, corrupted, masks = next(loader)
            reference_replace(
                clean.flatten(0, 1).to(device),
                corrupted.flatten(0, 1).to(device),
                masks.flatten(0, 1).to(device),
                config.masking,
            )
        _sync(device)
        theirs = steps * views_per_step / (time.perf_counter() - start)
        del loader
        return ours, theirs

    spcxr_pipe, ref_pipe = pipeline_only(args.pipeline_steps)

    # Phases A B A B: each pipeline's loader workers run only during its own phase (so one
    # pipeline's prefetching never steals the CPU from the other), and drift hits both alike.
    spcxr_times, aug_times, ref_times = [], [], []
    half = max(1, args.steps // 2)
    for _ in range(2):
        step, aug = spcxr_phase(half)
        spcxr_times += step
        aug_times += aug
        ref_times += reference_phase(half)
    spcxr_vps = views_per_step / float(np.median(spcxr_times))
    ref_vps = views_per_step / float(np.median(ref_times))
    aug_share = float(np.median(aug_times)) / float(np.median(spcxr_times))
    return {
        "bench": "pretrain_throughput",
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "threads": torch.get_num_threads(),
        "arch": args.arch,
        "img_size": args.img_size,
        "patch_size": args.patch_size,
        "batch_images": args.batch,
        "views_per_step": views_per_step,
        "workers": args.workers,
        "steps": args.steps,
        "spcxr_views_per_s": round(spcxr_vps, 2),
        "reference_style_views_per_s": round(ref_vps, 2),
        "speedup": round(spcxr_vps / ref_vps, 2),
        "spcxr_aug_mask_share_of_step": round(aug_share, 4),
        "spcxr_pipeline_only_views_per_s": round(spcxr_pipe, 1),
        "reference_style_pipeline_only_views_per_s": round(ref_pipe, 1),
        "spcxr_aug_mask_ms": round(1000 * float(np.median(aug_times)), 1),
        "spcxr_step_ms": round(1000 * float(np.median(spcxr_times)), 1),
        "reference_step_ms": round(1000 * float(np.median(ref_times)), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--store", type=Path, help="a prepared store (default: a synthetic one)")
    parser.add_argument("--arch", default="vit_small")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--patch-size", type=int, default=16)
    parser.add_argument("--batch", type=int, default=16, help="images per step (2 views each)")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument(
        "--pipeline-steps", type=int, default=10, help="steps of the no-model phase"
    )
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1))
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    random.seed(0)
    torch.manual_seed(0)
    store = args.store
    if store is None:
        from spcxr.data.prepare import PrepareConfig, prepare
        from spcxr.data.synthetic import SyntheticConfig, write_synthetic_dataset

        tmp = Path(tempfile.mkdtemp())
        write_synthetic_dataset(tmp / "synthetic", SyntheticConfig(n_patients=40))
        prepare(
            PrepareConfig(
                sources=[f"csv:{tmp / 'synthetic'}"], out=str(tmp / "store"), progress=False
            )
        )
        store = tmp / "store"
    result = run(args, store)
    result["store"] = str(store)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
