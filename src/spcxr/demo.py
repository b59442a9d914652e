"""``spcxr demo``: the embedded default, end to end on the CPU in minutes.

1. Write the synthetic chest-radiograph set (:mod:`spcxr.data.synthetic`: anatomy-like phantoms
   with lung masks, three labels and three "hospitals"). It is synthetic: numbers from it say
   that the pipeline works, not how well a model reads real radiographs.
2. Prepare a store from it (readers, dedup, patient-level splits, report).
3. GMML-pretrain a small ViT on the store's training split and export the encoder.

To run on real data instead: ``spcxr prepare /path/to/dataset --out store`` and
``spcxr pretrain --store store --out run`` (see the README).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from spcxr.data.prepare import PrepareConfig, prepare
from spcxr.data.synthetic import SyntheticConfig, write_synthetic_dataset
from spcxr.pretrain.engine import OptimConfig, PretrainConfig, pretrain
from spcxr.pretrain.gmml import GMMLConfig

log = logging.getLogger(__name__)


def demo_pretrain_config(
    store: Path, out: Path, *, steps: int, seed: int, batch_size: int = 32
) -> PretrainConfig:
    """A CPU-sized GMML run: ViT-Ti/8 at 64 px; everything else at the reference defaults."""
    config = PretrainConfig(
        store=str(store),
        out=str(out),
        model=GMMLConfig(arch="vit_tiny", img_size=64, patch_size=8, drop_path_rate=0.0),
        optim=OptimConfig(lr=1.5e-3, warmup_epochs=0.5),
        batch_size=batch_size,
        max_steps=steps,
        seed=seed,
        device="cpu",
        workers=1,
        checkpoint_every=max(steps // 2, 1),
        log_every=10,
        preview_every=max(steps // 4, 1),
    )
    config.augment.crop_scale = (0.25, 1.0)
    return config


def run_demo(
    out: Path, *, n_patients: int = 120, seed: int = 0, steps: int = 150
) -> dict[str, Any]:
    """Run the demo into ``out`` and return a summary (also printed by the CLI)."""
    out = Path(out)
    start = time.perf_counter()
    log.info("1/3 writing the synthetic set to %s", out / "synthetic")
    write_synthetic_dataset(out / "synthetic", SyntheticConfig(n_patients=n_patients, seed=seed))

    log.info("2/3 preparing the store %s", out / "store")
    prepared = prepare(
        PrepareConfig(
            sources=[f"synthetic=csv:{out / 'synthetic'}"], out=str(out / "store"), overwrite=True
        )
    )

    log.info("3/3 GMML pretraining (ViT-Ti/8, 64 px, %d steps on the CPU)", steps)
    run_dir = out / "pretrain"
    if run_dir.exists():
        import shutil

        shutil.rmtree(run_dir)
    n_train = prepared.report["splits"]["train"]["images"]
    batch_size = min(32, n_train)  # tiny --n-patients: one batch is the whole training split
    result = pretrain(
        demo_pretrain_config(out / "store", run_dir, steps=steps, seed=seed, batch_size=batch_size)
    )
    previews = sorted((run_dir / "previews").glob("*.png"))
    report = prepared.report
    return {
        "note": "synthetic data: this shows the pipeline works, not clinical performance",
        "store": {
            "path": str(prepared.store),
            "images": report["images"],
            "patients": report["patients"],
            "with_mask": report["with_mask"],
            "splits": {k: v["images"] for k, v in report["splits"].items()},
            "duplicate_pairs": report["duplicates"]["pairs"],
            "skipped": report["errors"]["total"],
        },
        "pretrain": {
            "run": str(run_dir),
            "steps": result.steps,
            "masked_l1_first": result.losses[0][1] if result.losses else None,
            "masked_l1_last": result.final_loss,
            "views_per_second": round(result.views_per_second, 1),
            "preview": str(previews[-1]) if previews else None,
            "encoder": str(result.encoder_path),
        },
        "seconds": round(time.perf_counter() - start, 1),
    }
