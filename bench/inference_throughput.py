"""Inference throughput of a ViT classifier: the model alone, and ``spcxr predict`` end to end.

Phases, on one device:

- ``model``: the classifier's forward pass on normalised images already on the device (random
  tensors), batched, under ``torch.inference_mode`` and bf16 autocast on CUDA (as ``spcxr
  predict`` runs it), optionally ``torch.compile``'d and in channels-last layout: the ceiling.
  On CUDA also with the weights converted to bf16 once (no autocast):
  ``model_bf16_weights_images_per_s``.
- ``transfer``: the same from uint8 store-size squares in pinned host memory: the copy to the
  device (non-blocking), :func:`spcxr.data.augment.eval_transform` on the device and the model,
  i.e. what ``spcxr predict`` does after a file has been decoded.
- ``predict``: :func:`spcxr.inference.run_predict` on ``--files`` generated PNG files in a
  temporary folder (``--file-size`` px, 8 bit): reading, ``fit_square``, batching, the model
  and the CSV, with ``--workers`` decoding threads; heatmaps off (the default), then the same
  files with ``--heatmaps all`` (``heatmap_steps + 1`` forward/backward passes per image; see
  ``spcxr.explain``): ``predict_heatmaps_all_images_per_s`` and ``heatmaps_slowdown``. The
  reading/preprocessing share is reported two ways: ``decode_wait_share``, the fraction of the
  wall time the model waited for decoded images (how decode-bound the pipeline is), and
  ``decode_cpu_share``, decoding time (summed over the workers) / (decoding + model time).

Prints one JSON line and, with ``--out-dir``, appends it to ``OUT_DIR/inference.jsonl``
(``bench/gpu_all.sh`` calls ``python bench/inference_throughput.py --device cuda --out-dir DIR``).
The issue's target: >= 20,000 images/s for the classifier (ViT-S/16, 224 px, bf16) on an H200.

Usage:
    python bench/inference_throughput.py                     # CPU: ViT-Ti/16 at 112 px, < 1 min
    python bench/inference_throughput.py --device cuda --out-dir bench_out   # ViT-S/16 at 224
    python bench/inference_throughput.py --device cuda --compile --batch-size 2048
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import copy
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
from PIL import Image

from spcxr.data.augment import AugmentConfig, eval_transform
from spcxr.inference import PredictConfig, run_predict
from spcxr.models.classifier import Classifier, ClassifierConfig, build_classifier, save_classifier

TARGET_CUDA_IMAGES_PER_S = 20_000
STORE_SIZE = 256  # spcxr prepare's default square


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add = p.add_argument
    add("--device", default="auto", help="auto, cpu or cuda[:i]")
    add("--arch", default=None, help="default: vit_small on CUDA, vit_tiny on the CPU")
    add("--img-size", type=int, default=None, help="default: 224 on CUDA, 112 on the CPU")
    add("--patch-size", type=int, default=16)
    add("--classes", type=int, default=3)
    add("--batch-size", type=int, default=None, help="default: 1024 on CUDA, 32 on the CPU")
    add("--steps", type=int, default=None, help="timed batches (default: 50 CUDA, 6 CPU)")
    add("--warmup", type=int, default=None, help="untimed batches (default: 10 CUDA, 2 CPU)")
    add("--compile", action=argparse.BooleanOptionalAction, default=False,
        help="torch.compile the model of the model/transfer phases")  # fmt: skip
    add("--compile-mode", default="default")
    add("--channels-last", action=argparse.BooleanOptionalAction, default=None,
        help="channels-last model and inputs (default: on with CUDA)")  # fmt: skip
    add("--files", type=int, default=None, help="PNG files of the predict phase (2048 / 32)")
    add("--file-size", type=int, default=None, help="side of the PNG files (1024 CUDA / 384 CPU)")
    add("--workers", type=int, default=None, help="decoding threads (default: CPU count, <= 16)")
    add("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    add("--skip-predict", action="store_true", help="only the model and transfer phases")
    add("--heatmap-steps", type=int, default=16,
        help="also time predict with --heatmaps all at these steps (0: skip)")  # fmt: skip
    add("--tag", default="", help="free text copied to the JSON line")
    add("--out-dir", type=Path, help="append the JSON line to OUT_DIR/inference.jsonl")
    args = p.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    defaults = {
        "arch": ("vit_small", "vit_tiny"),
        "img_size": (224, 112),
        "batch_size": (1024, 32),
        "steps": (50, 6),
        "warmup": (10, 2),
        "files": (2048, 32),
        "file_size": (1024, 384),
        "channels_last": (True, False),
    }
    for key, (on_cuda, on_cpu) in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, on_cuda if cuda else on_cpu)
    if args.workers is None:
        args.workers = max(1, min(16, os.cpu_count() or 1))
    return args


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, steps: int, warmup: int, device: torch.device) -> tuple[float, float]:
    """(seconds of ``steps`` calls after ``warmup`` calls, seconds of the warm-up)."""
    started = time.perf_counter()
    for _ in range(warmup):
        fn()
    _sync(device)
    warm = time.perf_counter() - started
    started = time.perf_counter()
    for _ in range(steps):
        fn()
    _sync(device)
    return time.perf_counter() - started, warm


def model_phases(model: Classifier, args: argparse.Namespace, device: torch.device) -> dict:
    """images/s of the model alone, and from pinned uint8 squares on the host."""
    amp = device.type == "cuda"
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    net = model.to(device).eval().to(memory_format=fmt)
    if args.compile:
        net = torch.compile(net, mode=args.compile_mode, dynamic=False)
    batch, size = args.batch_size, args.img_size
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(batch, 1, size, size, device=device, generator=gen)
    x = x.contiguous(memory_format=fmt)

    @torch.inference_mode()
    def forward(inputs: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            return net(inputs)

    seconds, warm = _timed(lambda: forward(x), args.steps, args.warmup, device)
    out: dict[str, Any] = {
        "model_images_per_s": round(batch * args.steps / seconds, 1),
        "model_warmup_s": round(warm, 2),
    }

    norm = AugmentConfig(out_size=size)
    host = torch.randint(0, 256, (batch, 1, STORE_SIZE, STORE_SIZE), dtype=torch.uint8)
    if device.type == "cuda":
        host = host.pin_memory()

    def transfer_and_forward() -> torch.Tensor:
        images = host.to(device, non_blocking=True)
        inputs = eval_transform(images, size, norm).contiguous(memory_format=fmt)
        return forward(inputs)

    steps = max(1, args.steps // 2)
    seconds, _ = _timed(transfer_and_forward, steps, 1, device)
    out["transfer_images_per_s"] = round(batch * steps / seconds, 1)

    if device.type == "cuda":
        # bf16 weights and inputs without autocast (no per-call weight casts, bf16 LayerNorm):
        # the rate of a deployment that converts the model once.
        half = copy.deepcopy(model).to(device=device, dtype=torch.bfloat16, memory_format=fmt)
        half = half.eval()
        if args.compile:
            half = torch.compile(half, mode=args.compile_mode, dynamic=False)
        xh = x.to(torch.bfloat16)
        with torch.inference_mode():
            seconds, _ = _timed(lambda: half(xh), args.steps, args.warmup, device)
        out["model_bf16_weights_images_per_s"] = round(batch * args.steps / seconds, 1)
    return out


def _write_png(path: Path, size: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    # A smooth-ish radiograph-like image: low-frequency structure plus noise (PNG does not
    # compress it to nothing, as it would a constant image).
    small = rng.random((size // 16, size // 16), dtype=np.float32)
    base = np.asarray(Image.fromarray(small, mode="F").resize((size, size), Image.BILINEAR))
    pixels = np.clip(base * 200 + rng.normal(0, 8, (size, size)), 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(path, compress_level=1)


def predict_phase(model: Classifier, args: argparse.Namespace, device: torch.device) -> dict:
    """``spcxr predict`` end to end on generated PNG files."""
    with tempfile.TemporaryDirectory(prefix="spcxr_infer_bench_") as tmp:
        root = Path(tmp)
        cfg = ClassifierConfig(
            arch=args.arch, img_size=args.img_size, patch_size=args.patch_size, in_chans=1
        )
        preprocessing = {
            "store_image_size": STORE_SIZE,
            "dicom_windowing": "auto",
            "dicom_percentiles": [0.5, 99.5],
            "img_size": args.img_size,
            "mean": 0.5,
            "std": 0.25,
        }
        names = [f"class_{i}" for i in range(args.classes)]
        save_classifier(
            model, cfg, names, root / "run" / "model", extra={"preprocessing": preprocessing}
        )
        images = root / "images"
        images.mkdir()
        started = time.perf_counter()
        with cf.ThreadPoolExecutor(args.workers) as pool:
            list(
                pool.map(
                    lambda i: _write_png(images / f"{i:06d}.png", args.file_size, i),
                    range(args.files),
                )
            )
        write_s = time.perf_counter() - started
        runs = {}
        # The default (no heatmaps) and `--heatmaps all` on the same files, side by side.
        for heatmaps in ("off", "all") if args.heatmap_steps else ("off",):
            config = PredictConfig(
                run=str(root / "run"),
                inputs=[str(images)],
                out=str(root / f"predictions_{heatmaps}.csv"),
                batch_size=min(args.batch_size, 256),
                device=str(device),
                heatmaps=heatmaps,
                heatmap_steps=max(args.heatmap_steps, 1),
                workers=args.workers,
                progress=False,
            )
            frame, runs[heatmaps] = run_predict(config)
            if (frame["status"] != "ok").any():
                raise RuntimeError(f"predict failed on some files: {frame[frame.status != 'ok']}")
    stats = runs["off"]
    busy = stats.decode_seconds + stats.model_seconds
    heat = {}
    if "all" in runs:
        with_maps = runs["all"].images / runs["all"].seconds
        heat = {
            "predict_heatmaps_all_images_per_s": round(with_maps, 1),
            "heatmap_steps": args.heatmap_steps,
            "heatmaps_slowdown": round(stats.images / stats.seconds / with_maps, 1),
        }
    return {
        **heat,
        "predict_images_per_s": round(stats.images / stats.seconds, 1),
        "predict_files": stats.images,
        "file_size": args.file_size,
        "predict_batch_size": config.batch_size,
        "workers": args.workers,
        "decode_wait_share": round(stats.wait_seconds / stats.seconds, 3),
        "decode_cpu_share": round(stats.decode_seconds / busy, 3) if busy else None,
        "model_share": round(stats.model_seconds / stats.seconds, 3),
        "decode_ms_per_image": round(1000 * stats.decode_seconds / max(stats.images, 1), 2),
        "files_written_s": round(write_s, 1),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    cfg = ClassifierConfig(
        arch=args.arch, img_size=args.img_size, patch_size=args.patch_size, drop_path_rate=0.0
    )
    model, _ = build_classifier(cfg, args.classes)
    started = time.perf_counter()
    record: dict[str, Any] = {
        "bench": "inference_throughput",
        "tag": args.tag,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "arch": args.arch,
        "img_size": args.img_size,
        "patch_size": args.patch_size,
        "batch_size": args.batch_size,
        "precision": "bf16 autocast" if device.type == "cuda" else "fp32",
        "compile": args.compile,
        "channels_last": args.channels_last,
        "threads": torch.get_num_threads(),
    }
    record.update(model_phases(model, args, device))
    if not args.skip_predict:
        record.update(predict_phase(model, args, device))
    if device.type == "cuda":
        record["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        record["target_images_per_s"] = TARGET_CUDA_IMAGES_PER_S
        best = max(record["model_images_per_s"], record["model_bf16_weights_images_per_s"])
        record["target_met"] = best >= TARGET_CUDA_IMAGES_PER_S
    record["seconds"] = round(time.perf_counter() - started, 1)
    line = json.dumps(record)
    print(line, flush=True)
    if args.out_dir is not None:
        args.out_dir.mkdir(parents=True, exist_ok=True)
        with open(args.out_dir / "inference.jsonl", "a") as handle:
            handle.write(line + "\n")
    return record


if __name__ == "__main__":
    main()
