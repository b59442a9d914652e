"""``report.md`` of ``spcxr evaluate``: the data used, every metric with its CI, plots, drift.

A reader should be able to tell from the report alone what was trained on what (sources, classes,
patients, label budget, initialisation and what pretraining saw), what it was tested on, and how
sure each number is.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from spcxr import markdown
from spcxr.atomic import atomic_write_text

CLASS_METRICS = [
    ("accuracy", "accuracy"),
    ("balanced_accuracy", "balanced accuracy"),
    ("macro_f1", "macro F1"),
    ("macro_auroc", "macro AUROC"),
    ("ece", "expected calibration error (15 bins)"),
]
SEG_METRICS = [
    ("dice", "Dice"),
    ("iou", "IoU"),
    ("hd95", "HD95 (pixels of the evaluation grid)"),
    ("hd95_mm", "HD95 (mm)"),
]


def ci_text(entry: dict[str, Any] | None, digits: int = 3) -> str:
    """``value [low, high]`` or ``n/a``."""
    if not entry:
        return "n/a"
    value = entry.get("value")
    if value is None or not np.isfinite(value):
        return "n/a"
    low, high = entry.get("low"), entry.get("high")
    if low is None or high is None or not np.isfinite(low) or not np.isfinite(high):
        return f"{value:.{digits}f}"
    return f"{value:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def _init_text(init: dict[str, Any]) -> str:
    kind = init.get("init", "?")
    if kind == "scratch":
        return "random initialisation (supervised-transformer baseline)"
    text = (
        f"{kind} from `{init.get('path', '?')}` (weights sha256 {init.get('weights_sha256', '?')})"
    )
    src = init.get("source_run") or {}
    if src:
        bits = [
            f"{k}: {v}" for k, v in src.items() if k in ("steps", "images", "sources", "splits")
        ]
        if bits:
            text += "; pretraining " + ", ".join(bits)
    return text


def _metric_rows(metrics: dict[str, Any], classes: list[str]) -> list[tuple[str, str]]:
    rows = [(label, ci_text(metrics.get(key))) for key, label in CLASS_METRICS if key in metrics]
    for c in classes:
        for key, label in (
            (f"per_class_accuracy/{c}", f"sensitivity (per-class accuracy) {c}"),
            (f"specificity/{c}", f"specificity {c}"),
            (f"auroc/{c}", f"AUROC {c} vs rest"),
        ):
            if key in metrics:
                rows.append((label, ci_text(metrics[key])))
    return rows


def write_report(results: dict[str, Any], out: Path) -> Path:
    """Write ``out/report.md`` (and the comparison / drift plots) from evaluate's results."""
    cfg = results["config"]
    lines = [
        "# spcxr evaluation report",
        "",
        f"Split evaluated: `{cfg['split']}` (k-fold runs: their held-out fold). "
        f"95% confidence intervals: bootstrap over patients, {cfg['n_boot']} replicates "
        f"(seed {cfg['seed']}); intervals across folds and across label draws use Student's t "
        "(the mean's interval), and differences between initialisations over the same draws "
        "the paired t interval.",
        "",
    ]
    comparison = results.get("comparison") or []
    if len(comparison) > 1:
        lines += _comparison_section(comparison, out)
    if results.get("draws"):
        lines += draws_section(results["draws"])
    if results.get("paired"):
        lines += paired_section(results["paired"])
    drift = results.get("drift") or {}
    if (
        any(len(r["cells"]) > 1 for r in drift.values())
        or len({tuple(r["train_sources"]) for r in drift.values()}) > 1
    ):
        lines += _drift_section(drift, out)
    for name, entry in results["runs"].items():
        lines += _run_section(name, entry)
    path = out / "report.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


def _comparison_section(rows: list[dict[str, Any]], out: Path) -> list[str]:

    lines = [
        "## Comparison",
        "",
        "Several label draws (or folds) of one setting: their mean with the t interval across "
        "draws; one run: its patient-bootstrap interval.",
        "",
    ]
    header = ["setting", "initialisation", "mode", "label budget", "training images", "draws"]
    header += ["tested on", "test images (patients)", "metric", "value [95% CI]"]
    cells = []
    for r in rows:
        folds = f" ({r['folds']} folds)" if r.get("folds") else ""
        tested = r.get("tested_on", "") + (" (external)" if r.get("external") else "")
        cells.append(
            [
                r["setting"],
                r["init"],
                r["mode"],
                r["budget"],
                r["train_images"],
                r.get("draws", r.get("folds", 1)),
                tested,
                f"{r.get('test_images', '')} ({r.get('test_patients', '')})",
                f"{r['metric']}{folds}",
                ci_text(r["value"]),
            ]
        )
    lines += [*markdown.table(header, cells), ""]
    budgets = {r["train_images"] for r in rows}
    if len(budgets) > 1:
        path = label_efficiency_plot(rows, out / "plots" / "label_efficiency.png")
        lines += [
            f"![label efficiency]({Path(path).relative_to(out)})",
            "",
            "Bands: the 95% t interval of the mean across label draws (one run: its bootstrap "
            "interval); internal and external test sets side by side.",
            "",
        ]
    return lines


def label_efficiency_plot(rows: list[dict[str, Any]], path: Path) -> Path:
    """Mean across draws against training labels, one panel per test set (internal first)."""
    from spcxr.evaluation.plots import budget_panels

    panels: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        title = r.get("tested_on", "test") + (" (external)" if r.get("external") else " (internal)")
        panels.setdefault(title, []).append(
            {
                "run": f"{r['init']} ({r['mode']})" if r["mode"] != "finetune" else r["init"],
                "labels": max(r["train_images"], 1),
                "value": r["value"]["value"],
                "low": r["value"].get("low", np.nan),
                "high": r["value"].get("high", np.nan),
            }
        )
    order = sorted(panels, key=lambda t: t.endswith("(external)"))
    metric = rows[0]["metric"]
    return budget_panels({t: panels[t] for t in order}, path, metric=metric, ylabel=metric)


def _pct(metric: str, value: float | None, signed: bool = False) -> str:
    if value is None or not np.isfinite(value):
        return "n/a"
    if metric in ("accuracy", "balanced_accuracy"):
        return f"{100 * value:+.1f}" if signed else f"{100 * value:.1f}%"
    return f"{value:+.3f}" if signed else f"{value:.3f}"


def interval_text(metric: str, d: dict[str, Any], signed: bool = False) -> str:
    """``value [low, high]`` of a metric or a difference (accuracies in %, signed: with +)."""
    text = _pct(metric, d.get("value"), signed)
    low, high = d.get("low"), d.get("high")
    if low is None or high is None or not (np.isfinite(low) and np.isfinite(high)):
        return text
    return f"{text} [{_pct(metric, low, signed)}, {_pct(metric, high, signed)}]"


def draws_section(tables: list[dict[str, Any]]) -> list[str]:
    """Per setting, test set and metric: each draw (bootstrap CI) and the summary across draws."""
    lines = [
        "## Label draws",
        "",
        "Each draw is one run on its own patient-level label draw (`budget_seed`); its value "
        "has its patient-bootstrap 95% CI. Across draws: mean, SD and the 95% t interval of "
        "the mean. Accuracies in %.",
        "",
    ]
    if any(r.get("train_seed") for t in tables for r in t["runs"]):
        lines[2] += (
            " Runs repeated on one draw with another training seed are named by it and "
            "paired with scratch seed by seed."
        )
    header = ["setting", "budget", "tested on", "test images (patients)", "metric", "draws"]
    header += ["per draw [bootstrap CI]", "mean [95% t interval]", "SD", "range"]
    rows = []
    for t in tables:
        s, metric = t["summary"], t["metric"]
        rows.append(
            [
                t["setting"],
                t["budget"],
                t["tested_on"] + (" (external)" if t.get("external") else ""),
                f"{t['test_images']} ({t['test_patients']})",
                metric,
                s["n"],
                "; ".join(f"{r['draw']}: {interval_text(metric, r)}" for r in t["runs"]),
                interval_text(metric, s),
                _pct(metric, s.get("std")),
                f"{_pct(metric, s.get('min'))} - {_pct(metric, s.get('max'))}",
            ]
        )
    lines += [*markdown.table(header, rows), ""]
    return lines


def paired_section(rows: list[dict[str, Any]]) -> list[str]:
    """GMML - scratch over the same draws: per-draw differences and the paired t interval."""
    lines = [
        "## Paired differences between initialisations",
        "",
        "Difference of each initialisation from scratch on the same label draws (accuracy in "
        "points). `paired`: mean of the per-draw differences with its 95% paired t interval; "
        "`unpaired`: no matching draws, difference of means with Welch's interval; `one draw`: "
        "the 95% patient-bootstrap interval of the difference on the same test images (it "
        "covers the test patients, not the variation between label draws).",
        "",
    ]
    header = ["comparison", "budget", "tested on", "metric", "pairing", "draws"]
    header += ["per-draw differences", "mean difference [95% CI]"]
    cells = []
    for r in rows:
        d = r["difference"]
        tested = r["tested_on"] + (" (external)" if r.get("external") else "")
        if d["paired"]:
            per = ", ".join(_pct(r["metric"], x, True) for x in d["differences"])
            n = d["n"]
            pairing = "one draw" if d.get("interval") == "test bootstrap" else "paired"
        else:
            per = ""
            n = f"{d['n_a']} vs {d['n_b']}"
            pairing = "unpaired"
        interval = interval_text(r["metric"], d, signed=True)
        cells.append([r["comparison"], r["budget"], tested, r["metric"], pairing, n, per, interval])
    lines += [*markdown.table(header, cells), ""]
    return lines


def _drift_section(drift: dict[str, Any], out: Path) -> list[str]:
    from spcxr.evaluation.plots import drift_heatmap

    sources = sorted({s for r in drift.values() for s in r["cells"]})
    metric = next(iter(drift.values()))["metric"]
    lines = [
        "## Drift: trained on (rows) / tested on (columns)",
        "",
        f"Metric: {metric}, 95% CI by patient bootstrap.",
        "",
    ]
    values = pd.DataFrame(index=list(drift), columns=sources, dtype=float)
    labels = pd.DataFrame(index=list(drift), columns=sources, dtype=object)
    rows = []
    for name, r in drift.items():
        cells = []
        for s in sources:
            c = r["cells"].get(s)
            cells.append(ci_text(c))
            values.loc[name, s] = c["value"] if c else np.nan
            labels.loc[name, s] = ci_text(c, 2) if c else ""
        rows.append([f"{name} ({', '.join(r['train_sources'])})", *cells])
    lines += markdown.table(["run (trained on)", *sources], rows)
    path = drift_heatmap(
        values, out / "plots" / "drift.png", title=f"{metric} by test source", annotations=labels
    )
    lines += ["", f"![drift]({Path(path).relative_to(out)})", ""]
    return lines


def _run_section(name: str, entry: dict[str, Any]) -> list[str]:
    train = entry["train"]
    per_class = train.get("per_class") or train.get("positives") or {}
    lines = [
        f"## Run `{name}`",
        "",
        f"- Task: {entry['kind']}"
        + (f", classes {', '.join(entry['classes'])}" if entry.get("classes") else ""),
        f"- Initialisation: {_init_text(entry['init'])}",
        f"- Mode: {entry.get('mode', 'finetune')}; label budget: {entry.get('budget', 'all')}"
        + (
            f"; fold {entry['fold']['fold']} of {entry['fold']['n_folds']}"
            if entry.get("fold")
            else ""
        ),
        f"- Trained on: {train['images']} images of {train['patients']} patients "
        f"({', '.join(f'{k} {v}' for k, v in train['sources'].items())}); "
        + ", ".join(f"{k} {v}" for k, v in per_class.items())
        + f"; image-set digest `{train.get('digest', '?')}`",
        "",
    ]
    for source, ev in entry["eval"].items():
        d = ev["data"]
        counts = ", ".join(f"{k} {v}" for k, v in (d.get("per_class") or {}).items())
        excluded = d.get("excluded") or {}
        ex = "; excluded: " + ", ".join(f"{k} {v}" for k, v in excluded.items()) if excluded else ""
        lines += [
            f"### Tested on {source}: {d['images']} images, {d['patients']} patients"
            + (f" ({counts})" if counts else "")
            + ex,
            "",
        ]
        rows = (
            [
                (label, ci_text(ev["metrics"].get(key)))
                for key, label in SEG_METRICS
                if key in ev["metrics"]
            ]
            if entry["kind"] == "segmentation"
            else _metric_rows(ev["metrics"], entry.get("classes", []))
        )
        lines += [*markdown.table(["metric", "value [95% CI]"], rows), ""]
        if d.get("resolution_ceiling") is not None:
            lines += [
                f"Dice ceiling at the model's input size: {d['resolution_ceiling']:.3f} (the "
                "reference masks taken down to the model's grid and back up: what a perfect "
                "model at that size would score).",
                "",
            ]
    for kind, rel in (entry.get("plots") or {}).items():
        lines.append(f"![{kind}]({rel})")
    lines.append("")
    return lines
