"""The study's results page: RESULTS.md and its plots, every number traced to its data,
settings and compute."""

from __future__ import annotations

import json
import platform
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from spcxr.atomic import atomic_write_text
from spcxr.config import merge
from spcxr.markdown import table
from spcxr.study.config import StudyConfig, StudyTask, split_init


def _fmt(entry: dict[str, Any] | None) -> str:
    from spcxr.tasks.report import ci_text

    return ci_text(entry)


def write_results_page(config: StudyConfig, pretrain_dir: Path | None, missing: list[str]) -> Path:
    """The study's results page (markdown + plots) in ``config.results``.

    ``pretrain_dir`` is the study's own GMML run the tasks started from (None: ``gmml`` is not
    among the initialisations, only ``NAME=PATH`` encoders are); ``missing`` lists the runs left
    out because they had not finished.
    """
    from spcxr.data.store import PreparedStore

    out = Path(config.out)
    store_dir = out / "store"
    dest = Path(config.results)
    (dest / "plots").mkdir(parents=True, exist_ok=True)
    store = PreparedStore(store_dir)
    pre = pretrain_dir
    pre_info, pre_cfg, losses = _read_pretrain_run(pre) if pre else ({}, {}, [])
    m = store.manifest
    lines = [
        f"# Study results: variant `{config.variant}`",
        "",
        f"Produced by `spcxr study` with its `{config.variant}` configuration on "
        f"{time.strftime('%Y-%m-%d')} ({platform.node() and 'host ' + platform.machine()}, "
        f"device `{config.device}`). Every number below comes from this run; confidence intervals "
        "are 95% bootstrap intervals over patients (k-fold: Student t across folds).",
        "",
        "## Data",
        "",
    ]
    data_rows = []
    for source, part in m.groupby("source"):
        splits = part["split"].value_counts()
        classes = ", ".join(f"{k} {v}" for k, v in part["label"].value_counts().items())
        data_rows.append(
            [source, len(part), part["group"].nunique()]
            + [splits.get(split, 0) for split in ("train", "val", "test")]
            + [classes]
        )
    lines += table(["source", "images", "patients", "train", "val", "test", "classes"], data_rows)
    report = json.loads((store_dir / "report.json").read_text())
    lines += [
        "",
        f"Splits are by patient group (patients joined with their duplicate groups: "
        f"{report['duplicates']['pairs']} duplicate pairs found across all sources). "
        f"Images stored at {store.image_size} px (aspect kept, padded).",
        "",
        "## Pretraining (GMML)",
        "",
    ]
    if pre_info:
        d = pre_info.get("data", {})
        model = pre_cfg.get("model", {})
        lines += [
            f"- Pool: {d.get('images')} images of {d.get('patients')} patient groups "
            f"({', '.join(f'{k} {v}' for k, v in d.get('sources', {}).items())}): the training "
            "split of every source a task trains on; no validation/test image of any task, nor "
            "any duplicate of one, was pretrained on"
            + (
                f"; k-fold sources left out entirely: {', '.join(config.kfold_sources())}"
                if config.kfold_sources()
                else ""
            )
            + (
                f"; external test sources (test-only) never pretrained on: "
                f"{', '.join(config.external_sources())}"
                if config.external_sources()
                else ""
            )
            + ".",
            f"- Model: {model.get('arch')}/{model.get('patch_size')} at {model.get('img_size')} px, "
            f"{pre_info.get('steps')} steps of batch {pre_cfg.get('batch_size')} x 2 views "
            f"({pre_info.get('steps', 0) / max(pre_info.get('steps_per_epoch', 1), 1):.1f} epochs), "
            f"device {pre_info.get('device')}.",
        ]
        if losses:
            first, last = losses[0], losses[-1]
            lines.append(
                f"- Masked L1: {first['loss']:.3f} (step {first['step']}) -> {last['loss']:.3f} "
                f"(step {last['step']}); {np.mean([x['views_per_s'] for x in losses]):.0f} views/s."
            )
        previews = sorted((pre / "previews").glob("*.png")) if pre else []
        if previews:
            shutil.copy(previews[-1], dest / "plots" / "pretrain_preview.png")
            lines.append("\n![reconstruction preview](plots/pretrain_preview.png)")
    elif pre is None:
        lines.append(
            "- The study's own GMML run is not compared here: the GMML initialisations are the "
            "encoders listed below."
        )
    lines += _other_encoders(config, pretrain_dir)
    lines.append("")
    reports = {}
    for task in config.tasks:
        metrics_path = out / config.reports / task.name / "metrics.json"
        if metrics_path.is_file():
            reports[task.name] = json.loads(metrics_path.read_text())
    lines += verdict_section(config, reports)
    for task in config.tasks:
        if task.name in reports:
            report_dir = out / config.reports / task.name
            lines += _task_section(task, reports[task.name], report_dir, dest, config)
    if missing:
        lines += [
            "## Runs not included",
            "",
            "These runs had not finished when this page was written (`--finished-only`):",
            "",
            *[f"- `{r}`" for r in missing],
            "",
        ]
    if config.discussion and Path(config.discussion).is_file():
        lines += ["## Discussion", "", Path(config.discussion).read_text().strip(), ""]
    path = dest / "RESULTS.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


def _ceiling_text(data: dict) -> str:
    """``; Dice ceiling ... 0.988`` for a segmentation test set that records one."""
    ceiling = data.get("resolution_ceiling")
    return f"; Dice ceiling at the model's input size {ceiling:.3f}" if ceiling is not None else ""


def _task_section(
    task: StudyTask, results: dict[str, Any], report_dir: Path, dest: Path, config: StudyConfig
) -> list[str]:
    runs = results["runs"]
    first = next(iter(runs.values()))
    title = task.title or task.name
    run_info = {}
    for name, entry in runs.items():
        info_path = Path(entry["run"]) / "run.json"
        run_info[name] = json.loads(info_path.read_text()) if info_path.is_file() else {}
    seconds = sum(i.get("seconds", 0) for i in run_info.values())
    settings = merge(config.segment if task.kind == "segment" else config.finetune, task.settings)
    lines = [
        f"## {title}",
        "",
        f"- Train sources: {', '.join(task.sources)}; tested on: "
        f"{', '.join(task.test_sources or task.sources)}"
        + (
            f" ({task.n_folds}-fold cross-validation by patient)"
            if task.n_folds
            else " (test split)"
        )
        + "."
        + (
            f" External test (test-only, never pretrained, trained or selected on): "
            f"{', '.join(task.external_sources)}."
            if task.external_sources
            else ""
        ),
        f"- Labels: {json.dumps(task.labels) if task.labels else 'lung masks'}; budgets: "
        f"{', '.join(task.budgets)}; initialisations: {', '.join(config.inits)}; "
        f"label draws per budget below all: {_seeds_text(config, task)}.",
        f"- Settings: `{json.dumps(settings, sort_keys=True)}`.",
        *(
            f"- Settings of `{init}` runs only (its own recipe, chosen on validation): "
            f"`{json.dumps(extra, sort_keys=True)}`."
            for init, extra in task.init_settings.items()
        ),
        f"- Compute: {len(runs)} runs, {seconds / 60:.1f} min of training in total.",
        "",
    ]
    # test data of the pooled evaluation of the first run
    for source, ev in first["eval"].items():
        d = ev["data"]
        counts = ", ".join(f"{k} {v}" for k, v in (d.get("per_class") or {}).items())
        lines.append(
            f"- Test data {source}: {d['images']} images, {d['patients']} patients"
            + (f" ({counts})" if counts else "")
            + (f"; mask convention: {d['mask_convention']}" if d.get("mask_convention") else "")
            + _ceiling_text(d)
        )
    lines += [
        "",
        "Several label draws: mean with the 95% t interval across draws (k-fold: across folds); "
        "one run: its patient-bootstrap interval.",
        "",
    ]
    order = sorted(
        results["comparison"],
        key=lambda r: (r.get("external", False), r["train_images"], r["init"]),
    )
    setting_rows = []
    for row in order:
        folds = f" ({row['folds']} folds)" if row.get("folds") else ""
        tested = row.get("tested_on", "") + (" (external)" if row.get("external") else "")
        setting_rows.append(
            [
                row["setting"],
                row["init"],
                row["budget"],
                f"{row['train_images']} ({row.get('train_patients', '?')})",
                row.get("draws", row.get("folds", 1)),
                tested,
                f"{row.get('test_images', '?')} ({row.get('test_patients', '?')})",
                f"{row['metric']}{folds}",
                _fmt(row["value"]),
            ]
        )
    header = ["setting", "init", "budget", "training images (patients)", "draws", "tested on"]
    header += ["test images (patients)", "metric", "value [95% CI]"]
    lines += table(header, setting_rows)
    lines.append("")
    from spcxr.tasks.report import draws_section, paired_section

    if results.get("paired"):
        lines += [
            x.replace("## ", "### ", 1) if x.startswith("## ") else x
            for x in paired_section(results["paired"])
        ]
    if results.get("draws"):
        lines += [
            x.replace("## ", "### ", 1) if x.startswith("## ") else x
            for x in draws_section(results["draws"])
        ]
    # extra per-run metrics for every test source (secondary metrics and drift)
    lines += table(
        ["run", "test source", *_secondary(task)],
        [
            [name, source, *(_fmt(ev["metrics"].get(k)) for k in _secondary(task))]
            for name, entry in runs.items()
            for source, ev in entry["eval"].items()
        ],
    )
    lines.append("")
    for plot in ("label_efficiency.png", "drift.png"):
        src = report_dir / "plots" / plot
        if src.is_file():
            target = dest / "plots" / f"{task.name}_{plot}"
            shutil.copy(src, target)
            lines += [f"![{task.name} {plot[:-4]}](plots/{target.name})", ""]
    lines.append(
        f"Full report: `{report_dir / 'report.md'}` (not committed; regenerate with the study)."
    )
    lines.append("")
    return lines


VERDICT_METRICS = ("accuracy", "macro_auroc", "balanced_accuracy", "dice")
METRIC_NAMES = {"macro_auroc": "AUROC", "balanced_accuracy": "balanced accuracy", "dice": "Dice"}


def verdict(differences: dict[str, dict[str, Any]]) -> str:
    """What the paired intervals of one comparison say, in words: ahead where an interval lies
    above 0, behind where it lies below, and "cannot tell" where every interval covers 0.
    Intervals of one draw cover the test patients only, never the label draw: said so."""
    ahead = [m for m, d in differences.items() if _finite(d.get("low")) and d["low"] > 0]
    behind = [m for m, d in differences.items() if _finite(d.get("high")) and d["high"] < 0]
    if not any(_finite(d.get("low")) for d in differences.values()):
        return "no interval"

    def said(metrics: list[str]) -> str:
        return ", ".join(METRIC_NAMES.get(m, m) for m in metrics)

    if ahead and behind:
        text = f"mixed: ahead on {said(ahead)}, behind on {said(behind)}"
    elif ahead:
        text = f"ahead on {said(ahead)}"
    elif behind:
        text = f"behind on {said(behind)}"
    else:
        text = "cannot tell"
    one_draw = any(d.get("interval") == "test bootstrap" for d in differences.values())
    return text + (" (one draw)" if one_draw else "")


def _finite(x: Any) -> bool:
    return x is not None and bool(np.isfinite(x))


def verdict_section(config: StudyConfig, reports: dict[str, dict[str, Any]]) -> list[str]:
    """One line per task, comparison, budget and test set: the paired differences of every
    headline metric with their intervals, and what they say (:func:`verdict`)."""
    from spcxr.tasks.report import interval_text

    tasks = {t.name: t for t in config.tasks}
    rows = []
    for name, results in reports.items():
        if name not in tasks or tasks[name].reuse:  # drift tables pool unlike sources: no verdict
            continue
        groups: dict[tuple, dict[str, dict]] = {}
        for p in results.get("paired", []):
            if p["metric"] in VERDICT_METRICS:
                tested = p["tested_on"] + (" (external)" if p.get("external") else "")
                key = (p["comparison"], p["budget"], tested)
                groups.setdefault(key, {})[p["metric"]] = p["difference"]
        for (comparison, budget, tested), diffs in groups.items():
            first = next(iter(diffs.values()))
            n = first["n"] if first.get("paired") else f"{first['n_a']} vs {first['n_b']}"
            cells = " / ".join(
                f"{METRIC_NAMES.get(m, m)} {interval_text(m, d, signed=True)}"
                for m, d in diffs.items()
            )
            title = tasks[name].title or name
            rows.append([title, comparison, budget, tested, n, cells, verdict(diffs)])
    if not rows:
        return []
    return [
        "## Summary: where GMML helps",
        "",
        "Every paired comparison on this page (each initialisation minus scratch on the same "
        "label draws; accuracy in points), with the 95% interval of the mean difference: "
        "`ahead` / `behind` where the interval excludes 0, `cannot tell` where it covers 0. "
        "`(one draw)`: a single run per initialisation (all labels), whose interval covers the "
        "test patients but not the label draw.",
        "",
        *table(
            [
                "task",
                "comparison",
                "budget",
                "tested on",
                "draws",
                "difference [95% CI]",
                "verdict",
            ],
            rows,
        ),
        "",
    ]


def _read_pretrain_run(run: Path) -> tuple[dict[str, Any], dict[str, Any], list[dict]]:
    """A pretraining run folder's run.json, config.yaml and training log rows (not the feature
    monitor's); empty where a file is missing."""
    info = json.loads((run / "run.json").read_text()) if (run / "run.json").is_file() else {}
    cfg = (
        yaml.safe_load((run / "config.yaml").read_text()) if (run / "config.yaml").is_file() else {}
    )
    log_path = run / "log.jsonl"
    rows = [json.loads(x) for x in log_path.read_text().splitlines()] if log_path.is_file() else []
    return info, cfg or {}, [r for r in rows if "loss" in r]


def pretrain_compute(run: Path) -> dict[str, Any]:
    """Steps, epochs and compute of a pretraining run folder, from its run.json and log.

    ``minutes`` sums the logged throughput over the steps (pauses between resumed pieces don't
    count, but time lost to other jobs on a shared machine does); ``minutes_at_best`` prices
    every step at the run's fastest logged rate, an estimate of its cost on the machine alone.
    """
    info, cfg, losses = _read_pretrain_run(run)
    losses = [r for r in losses if r.get("views_per_s")]
    views_per_step = cfg.get("batch_size", 0) * cfg.get("augment", {}).get("n_views", 2)
    seconds, last = 0.0, 0
    for r in losses:
        seconds += (r["step"] - last) * views_per_step / r["views_per_s"]
        last = r["step"]
    best = max((r["views_per_s"] for r in losses), default=0.0)
    steps = info.get("steps", 0)
    return {
        "steps": steps,
        "steps_done": last,
        "epochs": last / max(info.get("steps_per_epoch", 1), 1),  # trained so far
        "minutes": seconds / 60,
        "minutes_at_best": last * views_per_step / best / 60 if best else float("nan"),
        "device": info.get("device"),
        "precision": info.get("precision"),
    }


def _other_encoders(config: StudyConfig, pretrain_dir: Path | None) -> list[str]:
    """The ``NAME=PATH`` initialisations (beside the study's own GMML encoder when it is
    compared): which encoder each is and what its pretraining cost."""
    named = [(name, path) for name, path in map(split_init, config.inits) if path]
    if not named:
        return []
    own = [("gmml", str(pretrain_dir))] if pretrain_dir and "gmml" in config.inits else []
    rows = []
    for name, path in [*own, *named]:
        run = Path(path)
        if run.is_file():  # an encoder file: its pretraining run is two folders up
            run = run.parent.parent if run.parent.name == "encoder" else run.parent
        c = pretrain_compute(run)
        rows.append(
            [
                f"`{name}`",
                f"`{path}`",
                f"{c['steps_done']} / {c['steps']}",
                f"{c['epochs']:.1f}",
                f"{c['minutes']:.0f}",
                f"{c['minutes_at_best']:.0f}",
                f"{c['device']} {c['precision']}",
            ]
        )
    header = ["init", "encoder", "steps done / planned", "epochs done", "minutes as run"]
    header += ["minutes at its fastest logged rate", "device"]
    return [
        "",
        "GMML encoders compared (the same recipe unless their folder's config says otherwise; "
        "minutes from the logged throughput, so they include time lost to other jobs on a "
        "shared machine; the fastest-rate column estimates the cost on the machine alone):",
        "",
        *table(header, rows),
    ]


def _seeds_text(config: StudyConfig, task: StudyTask) -> str:
    seeds = config.budget_seeds if task.budget_seeds is None else task.budget_seeds
    return f"{len(seeds)} (budget seeds {', '.join(map(str, seeds))})" if seeds else "1"


def _secondary(task: StudyTask) -> list[str]:
    if task.kind == "segment":
        return ["dice", "iou", "hd95"]
    return ["macro_auroc", "accuracy", "balanced_accuracy", "macro_f1", "ece"]
