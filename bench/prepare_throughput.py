"""Benchmark ``spcxr prepare`` and store reads; prints one JSON line.

- Kermany: the shared pediatric train folder (5,216 JPEGs), all cores; images/s of the image
  phase (read, resize, hash, write shards) and of the whole command (listing, dedup, splits).
- DICOM: the 7 shared DICOM files (JPEG 2000, JPEG baseline, 8-16 bit), one worker, best of 3.
- Store reads: random batches of 256 images gathered from the Kermany store (memory-mapped,
  page cache warm), as a loader worker does.

Usage: python bench/prepare_throughput.py [--data ../shared/data/cxr]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from spcxr.data.prepare import PrepareConfig, prepare
from spcxr.data.store import PreparedStore
from spcxr.paths import shared_data_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=shared_data_dir())
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--read-batches", type=int, default=200)
    args = parser.parse_args()
    if args.data is None:
        raise SystemExit("shared data folder not found: pass --data or set SPCXR_DATA")
    out: dict[str, object] = {
        "bench": "prepare_throughput",
        "cpus": os.cpu_count(),
        "image_size": args.image_size,
    }
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        kermany = prepare(
            PrepareConfig(
                sources=[f"kermany_pediatric=folder:{args.data / 'kermany_pediatric/train'}"],
                out=str(tmp / "k"),
                image_size=args.image_size,
                progress=False,
            )
        )
        out["kermany_images"] = kermany.n_images
        out["kermany_images_per_s"] = round(kermany.n_processed / kermany.seconds_images, 1)
        out["kermany_end_to_end_images_per_s"] = round(kermany.n_images / kermany.seconds, 1)
        best = None
        for i in range(3):
            dicom = prepare(
                PrepareConfig(
                    sources=[f"csv:{args.data / 'dicom'}"],
                    out=str(tmp / f"d{i}"),
                    image_size=args.image_size,
                    workers=1,
                    progress=False,
                )
            )
            rate = dicom.n_processed / dicom.seconds_images
            best = rate if best is None else max(best, rate)
        out["dicom_files"] = dicom.n_images
        out["dicom_images_per_s"] = round(best, 1)

        store = PreparedStore(tmp / "k")
        rng = np.random.default_rng(0)
        store.images(np.arange(len(store)))  # warm the page cache, as a running loader has it
        batches = [rng.choice(len(store), 256, replace=False) for _ in range(args.read_batches)]
        start = time.perf_counter()
        for idx in batches:
            store.images(idx)
        seconds = time.perf_counter() - start
        out["store_read_batches_per_s"] = round(args.read_batches / seconds, 1)
        out["store_read_images_per_s"] = round(256 * args.read_batches / seconds, 1)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
