"""Paired Dice differences between segmentation runs of one ``spcxr evaluate`` report.

Reads the report's ``per_image_<run>.csv`` files, and for every run after the first prints, per
test source, its mean Dice and its difference from the first run on the same images, with the
95% patient-bootstrap interval of the difference (:func:`spcxr.evaluation.draws.paired_bootstrap`;
it covers the test patients, not training noise). One JSON line per run and source. Used for the
segmentation ablation in ``docs/study/segmentation_cpu.md``:

    spcxr evaluate RUN_A RUN_B ... --out REPORT
    python scripts/paired_dice.py REPORT RUN_A RUN_B ...
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd

from spcxr.evaluation.draws import TestSample, paired_bootstrap


def _mean_dice(dice: np.ndarray) -> dict[str, float]:
    return {"dice": float(np.mean(dice))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("report", type=Path)
    ap.add_argument("runs", nargs="+", help="run names (folder names); the first is the reference")
    ap.add_argument("--n-boot", type=int, default=1000)
    args = ap.parse_args()
    frames = {r: pd.read_csv(args.report / f"per_image_{r}.csv") for r in args.runs}
    ref_name, ref = args.runs[0], frames[args.runs[0]]
    for name in args.runs[1:]:
        for source, part in frames[name].groupby("source"):
            base = ref[ref["source"] == source].set_index("image_path")
            part = part.set_index("image_path").loc[base.index]

            def sample(frame: pd.DataFrame) -> TestSample:
                return TestSample(
                    frame.index.to_numpy().astype(str),
                    frame["patient_group"].to_numpy(),
                    {"dice": frame["dice"].to_numpy(float)},
                    _mean_dice,
                )

            diff = paired_bootstrap(sample(part), sample(base), n_boot=args.n_boot)["dice"]
            print(json.dumps({
                "run": name, "reference": ref_name, "source": source, "images": len(part),
                "dice": round(float(part["dice"].mean()), 4),
                "reference_dice": round(float(base["dice"].mean()), 4),
                "difference": round(diff["value"], 4),
                "low": round(diff["low"], 4), "high": round(diff["high"], 4),
            }))  # fmt: skip


if __name__ == "__main__":
    main()
