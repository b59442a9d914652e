"""Model cards: what a trained spcxr model is, what it saw, how well it did, and what not to use
it for (after Mitchell et al., "Model Cards for Model Reporting", FAT* 2019).

Every fact comes from files the run wrote, none is typed in by hand:

* ``model.json``: task, architecture, classes, input size, normalisation, preprocessing, init;
* ``run.json``: the training data (store, images, patients, per class, per source, budget,
  exclusions), the initialisation (the GMML pretraining run, its data and steps) and the
  schedule actually run (steps, best step, selection metric);
* ``config.yaml``: the fine-tuning settings;
* an ``spcxr evaluate`` report (``metrics.json``, optional): metrics with patient-bootstrap
  confidence intervals per test source;
* the run's store (when still present and unchanged): the class x source table and the share
  of children per class, to flag shortcuts a model can learn instead of the disease.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from spcxr import markdown
from spcxr.atomic import atomic_write_text

__all__ = [
    "NOT_A_DEVICE",
    "find_evaluation",
    "model_card",
    "run_record_dir",
    "shortcut_table",
    "write_model_card",
]

NOT_A_DEVICE = (
    "**Research use only. Not a medical device**: not cleared or approved by any regulator, "
    "not validated for clinical use, and not to be used for diagnosis, triage, screening or "
    "treatment decisions."
)
# Metrics shown per evaluated source, in this order (keys of spcxr evaluate's metrics.json).
_HEADLINE = (
    "macro_auroc",
    "balanced_accuracy",
    "accuracy",
    "macro_f1",
    "ece",
    "sensitivity",
    "specificity_binary",
    "dice",
    "iou",
    "hd95",
)
_PER_CLASS = ("auroc/", "per_class_accuracy/", "specificity/")
_SHORTCUT_SHARE = 0.9  # a class drawn this much from one source is flagged
_CHILD_AGE = 18.0


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None


def run_record_dir(model_dir: str | os.PathLike[str]) -> Path | None:
    """The folder holding ``run.json`` (+ ``config.yaml``) for a model folder, if any.

    An export folder -> its ``training/`` copy; ``RUN/model`` -> ``RUN``; else the folder itself
    or, failing that, its parent.
    """
    model_dir = Path(model_dir)
    candidates = [model_dir / "training"]
    if model_dir.name == "model":
        candidates.append(model_dir.parent)
    candidates += [model_dir, model_dir.parent]
    for candidate in candidates:
        if (candidate / "run.json").is_file():
            return candidate
    return None


def find_evaluation(
    report: str | os.PathLike[str], run_dir: Path | None, info: Mapping[str, Any] | None
) -> tuple[Path, dict[str, Any], dict[str, Any]] | None:
    """The newest ``metrics.json`` under ``report`` that evaluated this run.

    A report entry belongs to the run when its ``run`` path is the run folder, or, for moved
    folders and exports, when its training rows have the run's digest (a fingerprint of exactly
    which images trained it).

    Args:
        report: a ``metrics.json``, a report folder, or a folder of report folders.
        run_dir: the run folder (``None`` when unknown).
        info: the run's ``run.json``.

    Returns:
        ``(metrics.json path, the whole results, this run's entry)``, or ``None``.
    """
    root = Path(report)
    if root.is_file():
        candidates = [root]
    elif root.is_dir():
        candidates = sorted(root.rglob("metrics.json"), key=lambda p: p.stat().st_mtime)[::-1]
    else:
        raise FileNotFoundError(f"{root}: no such report file or folder")
    digest = ((info or {}).get("data") or {}).get("train", {}).get("digest")
    for path in candidates:
        results = _read_json(path)
        if not results or not isinstance(results.get("runs"), dict):
            continue
        for entry in results["runs"].values():
            same_path = run_dir is not None and _same_path(entry.get("run"), run_dir)
            same_rows = digest is not None and (entry.get("train") or {}).get("digest") == digest
            if same_path or same_rows:
                return path, results, entry
    return None


def _same_path(text: str | None, path: Path) -> bool:
    if not text:
        return False
    try:
        return Path(text).resolve() == path.resolve()
    except OSError:
        return False


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return "n/a" if not math.isfinite(value) else f"{value:.{digits}g}"
    return str(value)


def _ci(entry: Mapping[str, Any]) -> str:
    value, low, high = entry.get("value"), entry.get("low"), entry.get("high")
    if value is None or not math.isfinite(value):
        return "n/a"
    if low is None or high is None or not (math.isfinite(low) and math.isfinite(high)):
        return f"{value:.3f}"
    return f"{value:.3f} [{low:.3f}, {high:.3f}]"


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    return markdown.table(header, [[_fmt(v) for v in row] for row in rows])


def _counts(title: str, counts: Mapping[str, Any] | None) -> list[str]:
    if not counts:
        return []
    return [f"- {title}: " + ", ".join(f"{k} {v}" for k, v in counts.items())]


def shortcut_table(run_dir: Path, info: Mapping[str, Any], meta: Mapping[str, Any]):
    """Training images per class and source, and the share of children per class.

    Read from the run's store (its fingerprint must still match) and ``train_rows.csv``.

    Returns:
        ``(class x source counts, {class: share of known ages < 18, or None})``, or ``None``
        when the store or the rows are gone, the store changed, or the run is not a
        single-label classification.
    """
    from spcxr.data.labels import LabelConfig, targets
    from spcxr.data.store import PreparedStore

    data = info.get("data") or {}
    labels = (meta.get("extra") or {}).get("labels")
    rows_csv = run_dir / "train_rows.csv"
    store_path = data.get("store")
    if not labels or not store_path or not rows_csv.is_file() or not Path(store_path).is_dir():
        return None
    label_config = LabelConfig(**labels)
    if label_config.multilabel:
        return None
    try:
        store = PreparedStore(store_path)
    except (OSError, ValueError):
        return None
    if store.fingerprint != data.get("store_fingerprint"):
        return None
    rows = pd.read_csv(rows_csv)["row"].to_numpy()
    classes = list(meta["class_names"])
    y = targets(store.manifest, rows, label_config, classes)
    m = store.manifest.iloc[rows]
    frame = pd.DataFrame({"class": [classes[int(i)] for i in y], "source": m["source"].to_numpy()})
    table = pd.crosstab(frame["class"], frame["source"]).reindex(classes, fill_value=0)
    ages = pd.to_numeric(m["age"], errors="coerce").to_numpy() if "age" in m else None
    children: dict[str, float | None] = {}
    for i, name in enumerate(classes):
        known = ages[(y == i) & np.isfinite(ages)] if ages is not None else np.array([])
        children[name] = float((known < _CHILD_AGE).mean()) if len(known) else None
    return table, children


def _model_section(meta: Mapping[str, Any], files: Mapping[str, str]) -> list[str]:
    cfg = meta["config"]
    prep = (meta.get("extra") or {}).get("preprocessing") or {}
    lines = ["## Model", ""]
    lines.append(f"- Task: {meta['task']}")
    if meta["task"] == "classification":
        lines.append(f"- Classes (output order): {', '.join(meta['class_names'])}")
        labels = (meta.get("extra") or {}).get("labels") or {}
        if labels.get("rename"):
            lines.append(f"- Label mapping: {', '.join(labels['rename'])}")
        lines.append(
            f"- Architecture: {cfg['arch']} Vision Transformer (timm), patch {cfg['patch_size']}, "
            f"{cfg.get('head', 'cls')} head"
        )
        activation = "sigmoid per finding" if labels.get("column") == "findings" else "softmax"
        lines.append(f"- Output: logits; probabilities by {activation}")
    else:
        lines.append(
            f"- Architecture: {cfg['arch']} Vision Transformer (timm), patch {cfg['patch_size']}, "
            f"{cfg.get('decoder')} decoder (skips from blocks {cfg.get('skip_blocks')})"
        )
        lines.append("- Output: one lung-mask logit per pixel (probability by sigmoid, mask > 0.5)")
    c, h, w = meta["input_size"]
    lines.append(
        f"- Input: {c} x {h} x {w} (channels x height x width), normalised "
        f"(x - {meta['mean']}) / {meta['std']} for intensities x in [0, 1]"
    )
    if prep:
        lines.append(
            f"- Preprocessing: read (DICOM windowing {prep.get('dicom_windowing')!r}, "
            f"percentiles {prep.get('dicom_percentiles')}), fit into a "
            f"{prep.get('store_image_size')} px square (aspect kept, zero padding), 8 bit, "
            f"resized to {prep.get('img_size')} px"
        )
    for name, what in files.items():
        lines.append(f"- `{name}`: {what}")
    return lines


def _data_section(info: Mapping[str, Any] | None) -> list[str]:
    lines = ["## Training data", ""]
    if not info:
        return [*lines, "Not recorded (no run.json with the model)."]
    data = info.get("data") or {}
    train = data.get("train") or {}
    lines.append(f"- Store: `{data.get('store')}` (fingerprint {data.get('store_fingerprint')})")
    lines.append(
        f"- Training images: {train.get('images')} from {train.get('patients')} patients "
        f"(label budget: {data.get('budget', 'all')})"
    )
    lines += _counts("Per class", train.get("per_class") or train.get("positives"))
    lines += _counts("Per source", train.get("sources"))
    lines += _counts("Per site", train.get("sites"))
    val = data.get("val")
    if val:
        lines.append(
            f"- Validation (model selection only): {val.get('images')} images, "
            f"{val.get('patients')} patients"
        )
        lines += _counts("Validation per class", val.get("per_class"))
    if data.get("fold"):
        fold = data["fold"]
        lines.append(f"- k-fold: fold {fold['fold']} of {fold['n_folds']} held out")
    excluded = {k: v for k, v in (data.get("excluded") or {}).items() if v}
    lines += _counts("Excluded rows", excluded)
    return lines


def _pretrain_section(init: Mapping[str, Any] | None) -> list[str]:
    lines = ["## Pretraining", ""]
    if not init:
        return [*lines, "Not recorded."]
    kind = init.get("init")
    if kind == "scratch":
        return [*lines, "None: random initialisation (the supervised-transformer baseline)."]
    lines.append(
        f"- Initialisation: {kind} from `{init.get('path')}` (sha256 {init.get('weights_sha256')})"
    )
    source = init.get("source_run") or {}
    if kind == "gmml" or source.get("steps") is not None:
        lines.append(
            "- Method: GMML (group-masked model learning, Atito et al., arXiv 2205.14986; SPCXR, "
            "Anwar et al., arXiv 2211.12944)"
        )
        steps = source.get("steps_done") or source.get("steps")
        lines.append(
            f"- Pretraining run: `{source.get('run')}`: {steps} steps "
            f"(planned {source.get('steps')}, {source.get('epochs')} epochs), seed "
            f"{source.get('seed')}"
        )
        lines.append(
            f"- Pretraining images: {source.get('images')} from {source.get('patients')} "
            f"patients (splits {source.get('splits')}); store fingerprint "
            f"{source.get('store_fingerprint')}"
        )
        lines += _counts("Pretraining sources", source.get("sources"))
        batch = _pretrain_batch(source.get("run"))
        if batch and steps:
            lines.append(
                f"- Images seen during pretraining: {int(steps) * batch} "
                f"({steps} steps x batch {batch})"
            )
    elif source:
        lines.append(f"- Source record: {json.dumps(source, default=str)}")
    return lines


def _pretrain_batch(run: str | None) -> int | None:
    if not run:
        return None
    try:
        config = yaml.safe_load((Path(run) / "config.yaml").read_text())
        return int(config["batch_size"])
    except (OSError, KeyError, TypeError, ValueError, yaml.YAMLError):
        return None


def _finetune_section(
    meta: Mapping[str, Any], info: Mapping[str, Any] | None, config: Mapping[str, Any] | None
) -> list[str]:
    lines = ["## Fine-tuning", ""]
    extra = meta.get("extra") or {}
    if meta["task"] == "classification":
        lines.append(f"- Mode: {extra.get('mode', 'finetune')}")
    if config:
        train = config.get("train") or {}
        optim = train.get("optim") or {}
        model = config.get("model") or {}
        lines.append(
            f"- Schedule: {train.get('epochs')} epochs (at least {train.get('min_steps')} "
            f"steps), batch {train.get('batch_size')}, seed {train.get('seed')}, patience "
            f"{train.get('patience')}"
        )
        lines.append(
            f"- Optimiser: AdamW, base lr {optim.get('lr')} per 256 images, min lr "
            f"{optim.get('min_lr')}, weight decay {optim.get('weight_decay')}, warm-up "
            f"{optim.get('warmup_epochs')} epochs, layer decay {optim.get('layer_decay')}, "
            f"betas {optim.get('betas')}"
        )
        lines.append(f"- Stochastic depth: {model.get('drop_path_rate')}")
        if "label_smoothing" in config:
            lines.append(
                f"- Loss: cross-entropy, label smoothing {config.get('label_smoothing')}, "
                f"class imbalance: {config.get('balance')}"
            )
        if "dice_weight" in config:
            lines.append(
                f"- Loss: {config.get('dice_weight')} x soft Dice + {config.get('bce_weight')} x "
                f"BCE; encoder freezing: {model.get('freeze')}"
            )
        augment = config.get("augment")
        if augment:
            lines.append("- Augmentation: " + ", ".join(f"{k} {v}" for k, v in augment.items()))
    if info and "finished" not in info:
        from spcxr.tasks.loop import UNFINISHED_MODEL, unfinished_reason

        lines.append(f"- Run: **not finished** ({unfinished_reason(info)}): {UNFINISHED_MODEL}")
    elif info:
        lines.append(
            f"- Run: {info.get('steps')} steps in {info.get('seconds')} s on {info.get('device')}; "
            f"model selected at step {info.get('best_step')} on validation "
            f"{info.get('select')} = {_fmt(info.get('best_value'))}"
            + (" (stopped early)" if info.get("stopped_early") else "")
        )
        versions = info.get("versions")
        if versions:
            lines.append("- Software: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    return lines


def _evaluation_section(found: tuple[Path, dict, dict] | None, report: str) -> list[str]:
    lines = ["## Evaluation", ""]
    if found is None:
        if report:
            return [
                *lines,
                f"Not evaluated: no `spcxr evaluate` report under `{report}` evaluated this run.",
            ]
        return [*lines, "Not evaluated: no `spcxr evaluate` report was given (`--report`)."]
    path, results, entry = found
    config = results.get("config") or {}
    level = config.get("level", 0.95)
    lines.append(
        f"From `{path}` (split {config.get('split')!r}). Intervals: {level:.0%} patient-level "
        f"bootstrap ({config.get('n_boot')} replicates; all images of a drawn patient together)."
    )
    for source, block in (entry.get("eval") or {}).items():
        data = block.get("data") or {}
        metrics = block.get("metrics") or {}
        lines += ["", f"### {source}: {data.get('images')} images, {data.get('patients')} patients"]
        excluded = {k: v for k, v in (data.get("excluded") or {}).items() if v}
        if excluded:
            lines.append("Excluded: " + ", ".join(f"{k} {v}" for k, v in excluded.items()))
        keys = [k for k in _HEADLINE if k in metrics]
        keys += [k for k in metrics if k.startswith(_PER_CLASS)]
        rows = [
            [key.replace("per_class_accuracy/", "sensitivity/"), _ci(metrics[key])] for key in keys
        ]
        lines += ["", *_table(["metric", f"value [{level:.0%} CI]"], rows)]
    return lines


def _limits_section(
    meta: Mapping[str, Any], info: Mapping[str, Any] | None, shortcuts
) -> list[str]:
    lines = [
        "## Intended use",
        "",
        NOT_A_DEVICE,
        "",
        "Intended for research on chest X-ray representation learning: comparing pretraining "
        "and fine-tuning settings, label-efficiency and drift studies, and as a starting point "
        "for further (properly validated) work. Explanation maps (`spcxr predict`) are a "
        "debugging aid, not a localisation of disease.",
        "",
        "## Limitations and known data problems",
        "",
    ]
    sources = sorted(((info or {}).get("data") or {}).get("train", {}).get("sources") or {})
    if sources == ["synthetic"]:
        lines.append(
            "- Trained on spcxr's synthetic phantoms only: it has never seen a real "
            "radiograph, and its numbers say nothing about real images."
        )
    lines.append(
        "- Source shortcuts: public chest X-ray sets differ by hospital, scanner, processing, "
        "burned-in text and patient population. When classes come from different sources, a "
        "model can learn the source instead of the disease and still score well on a test split "
        "of the same sources. Test on sources and sites not used in training (`spcxr evaluate "
        "--stores ...`) before believing a number."
    )
    lines.append(
        "- Age: the pneumonia images of the Kermany (Guangzhou) set are of children aged 1-5, "
        "most adult sets have few children; a pediatric-vs-adult difference is an easy shortcut "
        "for pneumonia-vs-normal across sources, and performance does not transfer between the "
        "two populations."
    )
    if shortcuts is not None:
        table, children = shortcuts
        lines += ["", "Training images per class and source (from the run's store):", ""]
        header = ["class", *map(str, table.columns), "children (age < 18, known ages)"]
        rows = []
        for name, counts in table.iterrows():
            share = children.get(name)
            rows.append([name, *map(int, counts), "n/a" if share is None else f"{share:.0%}"])
        lines += _table(header, rows)
        flagged = []
        for name, counts in table.iterrows():
            total = counts.sum()
            if total and len(table.columns) > 1 and counts.max() / total >= _SHORTCUT_SHARE:
                flagged.append(f"{name} ({counts.max() / total:.0%} from {counts.idxmax()})")
        if flagged:
            lines += [
                "",
                "**Shortcut risk**: classes drawn (almost) entirely from one source: "
                + ", ".join(flagged)
                + ".",
            ]
        lines.append("")
    lines.append(
        "- Labels: public labels are often mined from reports by NLP or assigned per source, with "
        "noise; probabilities are calibrated (at best) to the training prevalence, not to a "
        "clinical population."
    )
    lines.append(
        "- Views and devices: trained on the views in its data (mostly PA/AP frontal); lateral "
        "views, portable images with tubes and lines, and post-processing not seen in training "
        "are out of distribution."
    )
    return lines


def model_card(
    model_dir: str | os.PathLike[str],
    *,
    report: str | os.PathLike[str] = "",
    files: Mapping[str, str] | None = None,
    title: str | None = None,
) -> str:
    """The model card (markdown) of a model folder (``RUN/model`` or an export).

    Args:
        model_dir: a folder holding ``model.json`` (the weights are not read).
        report: an ``spcxr evaluate`` report (see :func:`find_evaluation`); empty: "not
            evaluated".
        files: file name -> description of the files shipped with the model (exports).
        title: heading (default: the run's folder name).

    Returns:
        The markdown text.
    """
    model_dir = Path(model_dir)
    meta = _read_json(model_dir / "model.json")
    if meta is None or "task" not in meta:
        raise ValueError(f"{model_dir / 'model.json'}: not a readable spcxr model description")
    run_dir = run_record_dir(model_dir)
    info = _read_json(run_dir / "run.json") if run_dir else None
    config = None
    if run_dir and (run_dir / "config.yaml").is_file():
        config = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8"))
    found = find_evaluation(report, _training_run(run_dir), info) if report else None
    shortcuts = None
    if run_dir is not None and info is not None and meta["task"] == "classification":
        shortcuts = shortcut_table(_training_run(run_dir) or run_dir, info, meta)
    name = title or (_training_run(run_dir) or model_dir).name
    lines = [f"# Model card: {name} ({meta['task']})", "", NOT_A_DEVICE, ""]
    lines += _model_section(meta, files or {})
    lines += ["", *_data_section(info)]
    init = (info or {}).get("init") or (meta.get("extra") or {}).get("init")
    lines += ["", *_pretrain_section(init)]
    lines += ["", *_finetune_section(meta, info, config)]
    lines += ["", *_evaluation_section(found, str(report))]
    lines += ["", *_limits_section(meta, info, shortcuts)]
    return "\n".join(lines).rstrip() + "\n"


def _training_run(run_dir: Path | None) -> Path | None:
    """The original run folder: ``run_dir`` itself, or the one an export's copy came from."""
    if run_dir is None:
        return None
    origin = run_dir / "origin.json"
    if run_dir.name == "training" and origin.is_file():
        record = _read_json(origin) or {}
        if record.get("run"):
            return Path(record["run"])
    return run_dir


def write_model_card(path: str | os.PathLike[str], text: str) -> Path:
    """Writes a model card (atomically)."""
    path = Path(path)
    atomic_write_text(path, text)
    return path
