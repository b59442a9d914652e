"""``spcxr demo``: the embedded default, the whole method end to end on the CPU in minutes.

1. Write the synthetic chest-radiograph set (:mod:`spcxr.data.synthetic`: anatomy-like phantoms
   with lung masks, three labels, three "hospitals" that differ in contrast, noise, blur, burned-in
   markers and prevalence). It is synthetic: its numbers say that the pipeline works, never how
   well a model reads real radiographs.
2. Prepare a store (readers, dedup, patient-level splits, report).
3. GMML-pretrain a small ViT on the store's training split.
4. Fine-tune normal-vs-abnormal classifiers on one hospital (site_a) at a small label budget,
   from the GMML encoder and from scratch (the same recipe); evaluate both on every hospital's
   test patients with 95% CIs (the drift table).
5. Train a lung segmenter on the GMML encoder and evaluate it (Dice, IoU, HD95 with CIs).
6. Predict on a few test images: probabilities, Grad-CAM heatmaps, lung masks and overlays.
7. Write ``report.md`` linking every report and plot.

``spcxr demo --data DIR`` runs the same pipeline on a real folder (any layout ``spcxr prepare``
reads: class folders, a CSV manifest, an official dataset layout); the classification task uses
its ``label`` column, and segmentation runs when the folder has lung masks.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from spcxr import markdown
from spcxr.atomic import atomic_write_text

log = logging.getLogger(__name__)

ABNORMAL = {
    "column": "label",
    "classes": ["normal", "abnormal"],
    "rename": ["consolidation=abnormal", "bilateral_opacities=abnormal"],
}


def demo_study_config(
    out: Path,
    *,
    steps: int,
    seed: int,
    source: str,
    synthetic: bool,
    finetune_steps: int = 60,
    segment_steps: int = 80,
    n_boot: int = 500,
    draws: int = 3,
):
    """The demo as a study: ViT-Ti/8 at 64 px; everything else at the method's defaults.

    The classifiers are trained on ``draws`` label draws (budget seeds 0..draws-1), GMML and
    scratch on the same ones, so the comparison is a paired difference with an interval: at a
    few labels per class, one draw decides nothing.
    """
    from spcxr.study import StudyConfig, StudyTask

    model = {"arch": "vit_tiny", "img_size": 64, "patch_size": 8}
    train = {
        "epochs": 1,
        "min_steps": finetune_steps,
        "batch_size": 32,
        "patience": 0,
        "workers": 0,
        "progress": False,
        "seed": seed,
        "optim": {"lr": 2e-3, "warmup_epochs": 0.5, "layer_decay": 0.75},
    }
    tasks = [
        StudyTask(
            name="classify",
            title="Normal vs abnormal, trained on site_a, tested on every site"
            if synthetic
            else "Classification on the folder's labels",
            labels=ABNORMAL if synthetic else {"column": "label"},
            budgets=["8/class"] if synthetic else ["20/class", "all"],
            group_by="site" if synthetic else "source",
            settings={"sites": ["site_a"]} if synthetic else {},
            budget_seeds=list(range(draws)),
        ),
        StudyTask(name="lungs", kind="segment", title="Lung segmentation", budgets=["all"]),
    ]
    return StudyConfig(
        variant="demo",
        out=str(out),
        sources=[source],
        prepare={"image_size": 128, "workers": 0},
        pretrain={
            "model": {**model, "drop_path_rate": 0.0},
            "optim": {"lr": 1.5e-3, "warmup_epochs": 0.5},
            "augment": {"crop_scale": [0.25, 1.0]},
            "batch_size": 32,
            "max_steps": steps,
            "seed": seed,
            "workers": 1,
            "checkpoint_every": max(steps // 2, 1),
            "log_every": 10,
            "preview_every": max(steps // 3, 1),
            "progress": False,
        },
        finetune={"model": {**model, "head": "both", "drop_path_rate": 0.1}, "train": train},
        segment={
            "model": {**model, "drop_path_rate": 0.1, "decoder_channels": [64, 32, 16]},
            "train": {**train, "min_steps": segment_steps, "batch_size": 16},
        },
        evaluate={"n_boot": n_boot},
        inits=["gmml", "scratch"],
        tasks=tasks,
        device="cpu",
    )


def run_demo(
    out: Path,
    *,
    n_patients: int = 120,
    seed: int = 0,
    steps: int = 120,
    data: str = "",
    finetune_steps: int = 60,
    segment_steps: int = 80,
    n_boot: int = 500,
    predict_images: int = 4,
    draws: int = 3,
) -> dict[str, Any]:
    """Run the demo into ``out`` and return a summary (also printed by the CLI)."""
    from spcxr.data.synthetic import SyntheticConfig, write_synthetic_dataset
    from spcxr.study import Study

    out = Path(out)
    start = time.perf_counter()
    if data:
        source, synthetic = str(Path(data).resolve()), False
    else:
        log.info("writing the synthetic set to %s", out / "synthetic")
        if not (out / "synthetic" / "manifest.csv").is_file():
            write_synthetic_dataset(
                out / "synthetic", SyntheticConfig(n_patients=n_patients, seed=seed)
            )
        source, synthetic = f"synthetic=csv:{(out / 'synthetic').resolve()}", True
    config = demo_study_config(
        out,
        steps=steps,
        seed=seed,
        source=source,
        synthetic=synthetic,
        finetune_steps=finetune_steps,
        segment_steps=segment_steps,
        n_boot=n_boot,
        draws=draws,
    )
    study = Study(config)
    study.prepare()
    from spcxr.data.store import PreparedStore

    store = PreparedStore(study.store)
    if not store.has_mask.any():
        config.tasks = [t for t in config.tasks if t.kind != "segment"]
    study.pretrain_dir = study.pretrain()
    summary: dict[str, Any] = {
        "note": "synthetic data: this shows the pipeline works, not clinical performance"
        if synthetic
        else f"data: {data}",
        "store": str(study.store),
        "pretrain": _pretrain_summary(study.pretrain_dir),
        "tasks": {},
    }
    for task in config.tasks:
        runs = study.train(task)
        results = study.evaluate(task, runs)
        summary["tasks"][task.name] = {
            "report": str(out / "reports" / task.name / "report.md"),
            "comparison": [
                {
                    "run": r["setting"],
                    "metric": r["metric"],
                    "value": _round(r["value"]),
                }
                for r in results["comparison"]
            ],
            "paired": [
                {
                    "comparison": r["comparison"],
                    "budget": r["budget"],
                    "tested_on": r["tested_on"],
                    "metric": r["metric"],
                    "draws": r["difference"].get("n", 0),
                    "difference": _round(r["difference"]),
                }
                for r in results.get("paired", [])
            ],
        }
    summary["predictions"] = _predict_examples(study, store, predict_images)
    summary["seconds"] = round(time.perf_counter() - start, 1)
    summary["report"] = str(write_demo_report(out, summary))
    return summary


def _round(entry: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {
        k: round(float(entry[k]), 3) for k in ("value", "low", "high") if k in entry
    }
    if "interval" in entry:  # "test bootstrap": one draw's patient-bootstrap interval
        out["interval"] = entry["interval"]
    return out


def _pretrain_summary(run: Path) -> dict[str, Any]:
    lines = (run / "log.jsonl").read_text().splitlines() if (run / "log.jsonl").is_file() else []
    log_rows = [r for r in map(json.loads, lines) if "loss" in r]  # not the monitor's rows
    previews = sorted((run / "previews").glob("*.png"))
    return {
        "run": str(run),
        "masked_l1_first": round(log_rows[0]["loss"], 4) if log_rows else None,
        "masked_l1_last": round(log_rows[-1]["loss"], 4) if log_rows else None,
        "steps": log_rows[-1]["step"] if log_rows else 0,
        "preview": str(previews[-1]) if previews else None,
        "encoder": str(run / "encoder"),
    }


def _predict_examples(study, store, n: int) -> dict[str, Any]:
    """Predict on ``n`` test images with the GMML-initialised models (files read from disk)."""
    from spcxr.inference.predict import PredictConfig, predict

    test = store.indices("test")
    if n <= 0 or len(test) == 0:
        return {}
    files = store.manifest["image_path"].iloc[test[:n]].tolist()
    out: dict[str, Any] = {}
    for task in study.config.tasks:
        run = next((r for r, _ in study.runs_of(task) if r.name.startswith("gmml")), None)
        if run is None:
            continue
        csv = study.out / "predictions" / f"{task.name}.csv"
        frame = predict(
            PredictConfig(
                run=str(run),
                inputs=files,
                out=str(csv),
                device="cpu",
                heatmaps="all",
                progress=False,
            )
        )
        images = [
            str(csv.parent / f)
            for col in ("heatmap_file", "overlay_file")
            if col in frame.columns
            for f in frame[col].dropna().tolist()
        ]
        out[task.name] = {
            "csv": str(csv),
            "ok": int((frame["status"] == "ok").sum()),
            "images": images,
        }
    return out


def _rel(path: str | Path, base: Path) -> str:
    return os.path.relpath(Path(path).resolve(), base.resolve())


def write_demo_report(out: Path, summary: dict[str, Any]) -> Path:
    """``out/report.md``: what ran, the headline numbers, links to every report and plot."""
    lines = [
        "# spcxr demo",
        "",
        summary["note"],
        "",
        f"Store: `{summary['store']}` (see its `report.md`).",
        "",
        "## GMML pretraining",
        "",
        f"Masked L1 {summary['pretrain']['masked_l1_first']} -> "
        f"{summary['pretrain']['masked_l1_last']} in {summary['pretrain']['steps']} steps.",
        "",
    ]
    if summary["pretrain"].get("preview"):
        lines += [f"![reconstruction preview]({_rel(summary['pretrain']['preview'], out)})", ""]
    for name, task in summary["tasks"].items():
        report = Path(task["report"])
        lines += [f"## {name}", "", f"Full report: [{_rel(report, out)}]({_rel(report, out)})", ""]
        rows = []
        for row in task["comparison"]:
            v = row["value"]
            ci = f" [{v['low']:.3f}, {v['high']:.3f}]" if "low" in v else ""
            rows.append([row["run"], row["metric"], f"{v.get('value', float('nan')):.3f}{ci}"])
        lines += [*markdown.table(["run", "metric", "value [95% CI]"], rows), ""]
        if task.get("paired"):
            lines += [
                "Paired difference over the same label draws (mean [95% t interval]; an "
                "interval that includes 0 means the draws cannot tell the two apart; one draw: "
                "the patient-bootstrap interval on the same test images, which covers the test "
                "patients, not the label draw):",
                "",
            ]
            header = ["comparison", "budget", "tested on", "metric", "draws", "difference [95% CI]"]
            rows = []
            for row in task["paired"]:
                d = row["difference"]
                if row["draws"] >= 2 and "low" in d:
                    interval = f"[{d['low']:+.3f}, {d['high']:+.3f}]"
                elif d.get("interval") == "test bootstrap":
                    interval = f"[{d['low']:+.3f}, {d['high']:+.3f}] (one draw: test bootstrap)"
                else:
                    interval = "(one draw: no interval)"
                value = f"{d.get('value', float('nan')):+.3f} {interval}"
                keys = ("comparison", "budget", "tested_on", "metric", "draws")
                rows.append([*(row[key] for key in keys), value])
            lines += [*markdown.table(header, rows), ""]
        for png in sorted((report.parent / "plots").glob("*.png")):
            lines.append(f"![{png.stem}]({_rel(png, out)})")
        lines.append("")
    if summary.get("predictions"):
        lines += ["## Predictions on test images", ""]
        for name, p in summary["predictions"].items():
            csv = Path(p["csv"])
            lines.append(f"- {name}: [{_rel(csv, out)}]({_rel(csv, out)}) ({p['ok']} images)")
            for png in p.get("images", []):
                lines.append(f"  ![{Path(png).stem}]({_rel(png, out)})")
        lines.append("")
    lines.append(f"Wall time: {summary.get('seconds', 0):.0f} s.")
    path = out / "report.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path
