"""Throughput of batched view augmentation and GMML masking/corruption; prints one JSON line.

Usage: ``python bench/masking_speed.py [--device cpu|cuda] [--batch 256] [--size 224]
[--store-size 256]``

Reports views/s (median of ``--repeats`` timed calls after one warm-up) of
:func:`spcxr.data.augment.make_views` (``batch / 2`` uint8 images of ``store-size`` pixels, 2
views each, default config), of :func:`spcxr.pretrain.masking.group_mask` and
:func:`~spcxr.pretrain.masking.corrupt` at align 1 and 16, and, for scale, of a per-image
Python loop in the style of the GMML reference (``GMML_drop_rand_patches``: one rectangle per
iteration until the target area is reached). Every timed call draws from a new step of a
:class:`~spcxr.rng.BatchRandom`, as training does.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import statistics
import time
from collections.abc import Callable

import torch

from spcxr.data.augment import AugmentConfig, make_views
from spcxr.pretrain.masking import MaskingConfig, corrupt, group_mask
from spcxr.rng import BatchRandom


def _timed(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Median seconds of one call of ``fn`` (after a warm-up call)."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _per_image_loop(views: torch.Tensor, max_fraction: float, max_block: float) -> None:
    """Reference-style noise corruption: Python loop over views and over rectangles."""
    _, channels, height, width = views.shape
    for view in views:
        need = random.uniform(min(0.5, max_fraction), max_fraction) * height * width
        mask = torch.zeros(height, width, dtype=torch.bool, device=views.device)
        while mask.sum() < need:
            top, left = random.randrange(height), random.randrange(width)
            h = min(random.randrange(1, int(max_block * height)), height - top)
            w = min(random.randrange(1, int(max_block * width)), width - left)
            view[:, top : top + h, left : left + w] = torch.randn(
                channels, h, w, device=views.device
            )
            mask[top : top + h, left : left + w] = True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--size", type=int, default=224, help="view side (augment output)")
    parser.add_argument("--store-size", type=int, default=256, help="side of the stored images")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--loop-views", type=int, default=16, help="views for the loop baseline")
    args = parser.parse_args()

    device = torch.device(args.device)
    gen = torch.Generator(device=device).manual_seed(0)
    n, size = args.batch, args.size
    steps = itertools.count()

    def rnd() -> BatchRandom:
        """The draws of the next step (a new BatchRandom per call, as in training)."""
        return BatchRandom.local(0, next(steps), n, device)

    result: dict[str, object] = {
        "bench": "masking_speed",
        "device": str(device),
        "threads": torch.get_num_threads(),
        "batch": n,
        "size": size,
        "store_size": args.store_size,
    }
    aug = AugmentConfig(out_size=size, n_views=2)
    stored = torch.randint(
        0, 256, (n // 2, 1, args.store_size, args.store_size), generator=gen, device=device
    ).to(torch.uint8)
    t_views = _timed(lambda: make_views(stored, aug, rnd()), device, args.repeats)
    result["make_views_views_per_s"] = round(n / t_views, 1)

    views = torch.randn(n, 1, size, size, generator=gen, device=device)
    ids = torch.arange(n, device=device) // 2  # two views per image
    for align in (1, 16):
        cfg = MaskingConfig(align=align)
        fractions = 0.5 + 0.25 * torch.rand(n, generator=gen, device=device)
        t_mask = _timed(
            lambda cfg=cfg, f=fractions: group_mask(n, size, size, f, cfg, rnd(), device),
            device,
            args.repeats,
        )
        t_default = _timed(lambda cfg=cfg: corrupt(views, ids, cfg, rnd()), device, args.repeats)
        cfg3 = MaskingConfig(align=align, corruptions=("noise", "zeros", "copy"))
        t_three = _timed(lambda cfg=cfg3: corrupt(views, ids, cfg, rnd()), device, args.repeats)
        result[f"align{align}"] = {
            "group_mask_views_per_s": round(n / t_mask, 1),
            "corrupt_default_views_per_s": round(n / t_default, 1),
            "corrupt_noise_zeros_copy_views_per_s": round(n / t_three, 1),
        }
    loop_views = views[: args.loop_views].clone()
    random.seed(0)
    t_loop = _timed(lambda: _per_image_loop(loop_views, 0.75, 0.3), device, 2)
    result["per_image_loop_views_per_s"] = round(args.loop_views / t_loop, 1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
