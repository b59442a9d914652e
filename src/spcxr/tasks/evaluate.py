"""``spcxr evaluate``: metrics with confidence intervals, drift tables, comparisons, plots.

One or more runs are evaluated on one or more stores. For every run and every test source the
metrics come with 95% confidence intervals from a bootstrap that resamples *patients* (all images
of a drawn patient together), so correlated images of one patient do not narrow the interval.
k-fold runs are evaluated on their own held-out fold; several folds of one setting are summarised
across folds (Student t interval) and pooled.

Hygiene checks: an evaluation image whose pixels are identical to a training image of the run
(any source) is excluded and counted; evaluating on the run's own training or validation split is
allowed only with an explicit warning in the report.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from spcxr.atomic import atomic_write_text
from spcxr.checks import at_least, require, writable_folder
from spcxr.data.labels import LabelConfig, targets, usable
from spcxr.data.store import PreparedStore
from spcxr.errors import UsageError
from spcxr.evaluation.bootstrap import split_ci
from spcxr.evaluation.draws import TestSample, paired_bootstrap
from spcxr.train.distributed import resolve_device, resolve_precision

log = logging.getLogger(__name__)


@dataclass
class EvaluateConfig:
    """Settings of ``spcxr evaluate``.

    Attributes:
        runs: run folders (fine-tuning or segmentation) to evaluate; several give a comparison
            table, and runs at several label budgets a label-efficiency plot.
        stores: stores to test on (empty: each run's own store). Several stores or sources give
            the drift table (train on A, test on A, B, C).
        split: the split evaluated (``test``); k-fold runs always use their held-out fold.
        sources: only these test sources (empty: all).
        group_by: manifest column whose values get one column each in the drift table
            (``source``, or ``site`` for hospitals within one source).
        out: the report folder (metrics.json, report.md, plots/, predictions).
        n_boot: bootstrap replicates (resampling patients).
        level: confidence level of the intervals.
        seed: bootstrap seed.
        device: ``auto``, ``cpu`` or ``cuda``.
        precision: ``auto`` (bf16 autocast on CUDA and on CPUs with AMX or AVX512-BF16, else
            float32), ``fp32`` or ``bf16`` (an error on a CPU without native bf16).
        batch_size: inference batch size.
        labels: rename labels of the test data (for stores whose vocabulary differs from the
            training store's); empty: the run's own label settings.
        external: external test sources (e.g. a test-only source such as Kermany's official
            test set): evaluated and reported on their own, never pooled with the internal test.
    """

    runs: list[str] = field(default_factory=list)
    stores: list[str] = field(default_factory=list)
    split: str = "test"
    sources: list[str] = field(default_factory=list)
    group_by: str = "source"
    out: str = "report"
    n_boot: int = 1000
    level: float = 0.95
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"
    batch_size: int = 128
    labels: list[str] = field(default_factory=list)
    external: list[str] = field(default_factory=list)

    def test_sources(self) -> list[str]:
        """Sources to test on: the internal ones and the external ones (empty: every source)."""
        if not self.sources:
            return []
        return list(dict.fromkeys([*self.sources, *self.external]))

    def __post_init__(self) -> None:
        at_least(self.n_boot, 1, "--n-boot")
        require(0 < self.level < 1, "--level", self.level, "must be in (0, 1), e.g. 0.95")
        at_least(self.batch_size, 1, "--batch-size")


def _run_name(run: Path) -> str:
    """The run's folder name; a label draw ``OUT/draw-3`` is named ``OUT_draw-3``."""
    if re.fullmatch(r"draw-\d+", run.name):
        return f"{run.parent.name}_{run.name}"
    return run.name


@dataclass
class EvalSet:
    """Test rows of one store/source for one run, with their targets."""

    store: PreparedStore
    source: str
    rows: np.ndarray
    y: np.ndarray
    excluded: dict[str, int]


def _label_config(info: dict, meta: dict, override: list[str]) -> LabelConfig:
    labels = LabelConfig(**meta["extra"]["labels"])
    if override:
        labels.rename = list(labels.rename) + list(override)
    return labels


def eval_sets(run: Path, info: dict, meta: dict, config: EvaluateConfig) -> list[EvalSet]:
    """The test rows of every store and source for one run.

    Raises:
        ValueError: no test row is left (the message says how many were excluded and why).
    """
    labels = _label_config(info, meta, config.labels)
    classes = meta["class_names"]
    train_hashes = set(pd.read_csv(run / "train_rows.csv")["pixel_hash"].astype(str))
    heldout = info["data"].get("heldout")
    stores = config.stores or [info["data"]["store"]]
    sets = []
    last_excluded: dict[str, int] = {}
    for store_path in stores:
        store = PreparedStore(store_path)
        if heldout is not None and store.fingerprint == info["data"]["store_fingerprint"]:
            rows = np.asarray(heldout["rows"], dtype=np.int64)
        else:
            rows = store.indices(config.split, source=config.test_sources() or None)
        y = targets(store.manifest, rows, labels, classes)
        keep = usable(y)
        excluded = {}
        if (~keep).any():
            excluded["missing or other label"] = int((~keep).sum())
        hashes = store.manifest["pixel_hash"].iloc[rows].astype(str).to_numpy()
        seen = np.isin(hashes, list(train_hashes))
        if (seen & keep).any():
            excluded["identical to a training image"] = int((seen & keep).sum())
        keep &= ~seen
        rows, y = rows[keep], y[keep]
        sources = store.manifest[config.group_by].iloc[rows].astype(str).to_numpy()
        for source in sorted(set(sources)):
            sel = sources == source
            sets.append(EvalSet(store, str(source), rows[sel], y[sel], excluded))
        if not len(rows):
            log.warning("%s: no test rows left in %s (excluded: %s)", run, store.root, excluded)
            last_excluded = excluded
    if not sets:
        raise ValueError(
            f"{run}: no labelled test rows in split {config.split!r} of {stores} "
            f"(excluded: {last_excluded})"
        )
    return sets


def evaluate(config: EvaluateConfig) -> dict[str, Any]:
    """Evaluate every run (see :class:`EvaluateConfig`); writes the report folder."""
    from spcxr.tasks.classify import load_run_model

    if not config.runs:
        raise ValueError("evaluate: give at least one --runs RUN folder")
    device = resolve_device(config.device, "--device")
    out = writable_folder(config.out, "--out")
    (out / "plots").mkdir(parents=True, exist_ok=True)
    config.precision = resolve_precision(config.precision, device)
    results: dict[str, Any] = {
        "config": _plain_config(config),
        "device": str(device),
        "precision": config.precision,
        "runs": {},
    }
    # (run, test source) -> what its metrics came from: a single-draw comparison gets a paired
    # patient bootstrap from these (kept in memory only).
    samples: dict[tuple[str, str], TestSample] = {}
    for run_text in config.runs:
        run = Path(run_text)
        info = json.loads((run / "run.json").read_text())
        _require_finished(run, info)
        if info.get("kind") == "segmentation":
            from spcxr.tasks.segment import evaluate_segmentation_run

            results["runs"][_run_name(run)] = evaluate_segmentation_run(
                run, info, config, out, samples=samples
            )
            continue
        model, meta, info = load_run_model(run, device)
        results["runs"][_run_name(run)] = _evaluate_classifier(
            run, model, meta, info, config, out, samples=samples
        )
    label_inits(results["runs"])
    results["drift"] = drift_table(results)
    results["comparison"] = comparison(results, config.level)
    results["draws"] = draw_tables(results, config.level)
    results["paired"] = paired_comparisons(
        results, config.level, samples=samples, n_boot=config.n_boot, seed=config.seed
    )
    atomic_write_text(out / "metrics.json", json.dumps(results, indent=2, default=_json_default))
    from spcxr.tasks.report import write_report

    write_report(results, out)
    return results


def _require_finished(run: Path, info: dict[str, Any]) -> None:
    """Refuse a run that has not finished: its ``model/`` is only the best state validated so
    far, and a report must never pass it off as the run's result."""
    from spcxr.tasks.loop import UNFINISHED_MODEL, unfinished_reason

    if "finished" not in info:
        raise UsageError(
            f"{run}: this run has not finished ({unfinished_reason(info)}): {UNFINISHED_MODEL}; "
            "finish it first (the command that trained it, with --train-resume), then evaluate it"
        )


def _plain_config(config: EvaluateConfig) -> dict[str, Any]:
    from spcxr.config import to_dict

    return to_dict(config)


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(type(value).__name__)


def _evaluate_classifier(
    run: Path,
    model,
    meta: dict,
    info: dict,
    config,
    out: Path,
    samples: dict[tuple[str, str], TestSample] | None = None,
) -> dict:
    from spcxr.evaluation.bootstrap import bootstrap_ci
    from spcxr.evaluation.metrics import classification_metrics, multilabel_metrics
    from spcxr.evaluation.plots import confusion_matrix_plot, reliability_diagram, roc_curves
    from spcxr.tasks.classify import predict_store

    device = resolve_device(config.device)
    classes = meta["class_names"]
    cfg = meta["config"]
    multilabel = LabelConfig(**meta["extra"]["labels"]).multilabel
    name = _run_name(run)
    entry: dict[str, Any] = {
        "kind": "classification",
        "run": str(run),
        "init": info["init"],
        "mode": meta["extra"].get("mode", "finetune"),
        "classes": classes,
        "train": info["data"]["train"],
        "budget": info["data"].get("budget", "all"),
        "budget_seed": info["data"].get("budget_seed"),
        "train_seed": info.get("seed"),
        "fold": info["data"].get("fold"),
        "train_sources": sorted(
            info["data"]["train"].get(config.group_by + "s") or info["data"]["train"]["sources"]
        ),
        "eval": {},
    }
    metric_fn = multilabel_metrics if multilabel else classification_metrics
    pred_frames, pooled_y, pooled_p, pooled_g = [], [], [], []
    pooled_ext = False
    for s in eval_sets(run, info, meta, config):
        if len(s.rows) == 0:
            continue
        prob = predict_store(
            model,
            s.store,
            s.rows,
            img_size=cfg["img_size"],
            in_chans=cfg["in_chans"],
            multilabel=multilabel,
            device=device,
            batch_size=config.batch_size,
            precision=config.precision,
        )
        groups = s.store.manifest["group"].iloc[s.rows].to_numpy()
        # Patient groups are store-local ids: prefix with the store so pooling stays correct.
        gkey = np.array([f"{s.store.fingerprint}:{g}" for g in groups])
        ci = bootstrap_ci(
            _bind(metric_fn, classes),
            _codes(gkey),
            n_boot=config.n_boot,
            seed=config.seed,
            level=config.level,
            y_true=s.y,
            prob=prob,
        )
        if samples is not None:
            keys = s.store.manifest["image_path"].iloc[s.rows].to_numpy().astype(str)
            samples[(str(run), s.source)] = TestSample(
                keys, gkey, {"y_true": s.y, "prob": prob}, _bind(metric_fn, classes)
            )
        external = s.source in config.external
        entry["eval"][s.source] = {
            "data": _describe(s, classes, multilabel),
            **split_ci(ci),
            **({"external": True} if external else {}),
        }
        # An external test set is reported on its own, never pooled with the internal ones
        # (plots show the internal test; only when there is none, the external one).
        if not external or not pooled_y:
            if pooled_y and pooled_ext:
                pooled_y, pooled_p, pooled_g = [], [], []
            pooled_ext = external
            pooled_y.append(s.y)
            pooled_p.append(prob)
            pooled_g.append(gkey)
        frame = pd.DataFrame(
            {
                "image_path": s.store.manifest["image_path"].iloc[s.rows].to_numpy(),
                "source": s.source,
                "patient_group": groups,
            }
        )
        if multilabel:
            for j, c in enumerate(classes):
                frame[f"true_{c}"] = s.y[:, j]
        else:
            frame["true"] = [classes[i] for i in s.y]
            frame["predicted"] = [classes[i] for i in prob.argmax(1)]
        for j, c in enumerate(classes):
            frame[f"p_{c}"] = prob[:, j]
        pred_frames.append(frame)
    if not pred_frames:
        raise ValueError(
            f"{run}: no labelled test rows in split {config.split!r} of {config.stores}"
        )
    y, prob, g = np.concatenate(pooled_y), np.concatenate(pooled_p), np.concatenate(pooled_g)
    if len(pooled_y) > 1:
        entry["eval"]["all"] = {
            "data": {"images": len(y), "patients": len(set(g))},
            **split_ci(
                bootstrap_ci(
                    _bind(metric_fn, classes),
                    _codes(g),
                    n_boot=config.n_boot,
                    seed=config.seed,
                    level=config.level,
                    y_true=y,
                    prob=prob,
                )
            ),
        }
    pd.concat(pred_frames).to_csv(out / f"predictions_{name}.csv", index=False)
    plots = {}
    if not multilabel:
        plots["roc"] = roc_curves(y, prob, classes, out / "plots" / f"{name}_roc.png", title=name)
        point = classification_point(entry)
        plots["confusion"] = confusion_matrix_plot(
            point["confusion"], classes, out / "plots" / f"{name}_confusion.png"
        )
        plots["reliability"] = reliability_diagram(
            y, prob, out / "plots" / f"{name}_reliability.png"
        )
    entry["plots"] = {k: str(Path(v).relative_to(out)) for k, v in plots.items()}
    return entry


def classification_point(entry: dict) -> dict:
    """Point estimates (incl. the confusion matrix) of a run's pooled evaluation."""
    return entry["eval"][_headline_source(entry)]["point"]


def _bind(metric_fn, classes: list[str]):
    """``metric_fn(y_true, prob)`` with the class names bound (bootstrap calls it per replicate)."""
    return lambda y_true, prob: metric_fn(y_true, prob, classes)


def _codes(keys: np.ndarray) -> np.ndarray:
    _, codes = np.unique(keys, return_inverse=True)
    return codes


def _describe(s: EvalSet, classes: list[str], multilabel: bool) -> dict[str, Any]:
    m = s.store.manifest.iloc[s.rows]
    d: dict[str, Any] = {
        "store": str(s.store.root),
        "images": len(s.rows),
        "patients": int(m["group"].nunique()),
        "excluded": s.excluded,
    }
    if not multilabel:
        d["per_class"] = {c: int((s.y == i).sum()) for i, c in enumerate(classes)}
    return d


PRIMARY = ("macro_auroc", "balanced_accuracy", "accuracy", "dice")


def _primary(metrics: dict) -> str:
    for key in PRIMARY:
        if key in metrics:
            return key
    raise KeyError("no primary metric")


def drift_table(results: dict) -> dict[str, Any]:
    """Run x test-source table of the primary metric (train on A, test on A, B, C...)."""
    rows = {}
    for name, entry in results["runs"].items():
        sources = [s for s in entry["eval"] if s != "all"]
        if not sources:
            continue
        metric = _primary(entry["eval"][sources[0]]["metrics"])
        rows[name] = {
            "train_sources": entry["train_sources"],
            "metric": metric,
            "cells": {s: entry["eval"][s]["metrics"][metric] for s in sources},
        }
    return rows


def label_inits(entries: dict[str, dict]) -> None:
    """Give every run its initialisation's name (``entry["init_label"]``): the kind (``gmml``,
    ``scratch``, ...), and, where runs of one kind start from different encoders (e.g. GMML
    pretrained for 10, 27 and 100 epochs), the encoder's pretraining length or, failing that, its
    weights' hash - so that comparisons never pool different encoders as one initialisation."""
    encoders: dict[str, dict[Any, Any]] = {}
    for entry in entries.values():
        init = entry["init"]
        epochs = _trained_epochs(init.get("source_run") or {})
        encoders.setdefault(init.get("init", "?"), {})[init.get("weights_sha256")] = epochs
    names: dict[tuple[str, Any], str] = {}
    for kind, shas in encoders.items():
        if len(shas) == 1:
            names[(kind, next(iter(shas)))] = kind
            continue
        by_epochs = {
            sha: f"{kind} {epochs:.0f} ep" if isinstance(epochs, (int, float)) else kind
            for sha, epochs in shas.items()
        }
        for sha, label in by_epochs.items():
            if list(by_epochs.values()).count(label) > 1:  # same length, other weights
                label = f"{label} {str(sha)[:8]}"
            names[(kind, sha)] = label
    for entry in entries.values():
        init = entry["init"]
        entry["init_label"] = names[(init.get("init", "?"), init.get("weights_sha256"))]


def _trained_epochs(source: dict) -> float | None:
    """Epochs of pretraining an encoder had: steps done (a checkpoint of an unfinished run has
    fewer than planned) over steps per epoch, else the planned epochs."""
    done, per_epoch = source.get("steps_done"), source.get("steps_per_epoch")
    if isinstance(done, (int, float)) and isinstance(per_epoch, (int, float)) and per_epoch > 0:
        return done / per_epoch
    return source.get("epochs")


def _init_of(entry: dict) -> str:
    """The run's initialisation name (see :func:`label_inits`)."""
    return entry.get("init_label") or entry["init"].get("init", "?")


def _setting_key(entry: dict) -> str:
    """Runs that differ only in their fold or their label draw belong to one setting."""
    name = _run_name(Path(entry["run"]))
    return re.sub(r"[-_]?(fold\d+|draw-?\d+)$", "", name)


def _headline_source(entry: dict) -> str:
    """The internal evaluation a comparison row shows: all sources pooled, else the (first)
    training source, else the first tested one (segmentation is never pooled across mask
    conventions). External test sets are never the headline while an internal one exists."""
    evals = entry["eval"]
    if "all" in evals:
        return "all"
    for source in entry.get("train_sources", []):
        if source in evals and not evals[source].get("external"):
            return source
    internal = [s for s, ev in evals.items() if not ev.get("external")]
    return internal[0] if internal else next(iter(evals))


def _tested_sets(entry: dict) -> list[str]:
    """The headline (internal) evaluation, then every external test set."""
    head = _headline_source(entry)
    return [head] + [s for s, ev in entry["eval"].items() if ev.get("external") and s != head]


def _settings(results: dict) -> dict[str, list[dict]]:
    settings: dict[str, list[dict]] = {}
    for entry in results["runs"].values():
        settings.setdefault(_setting_key(entry), []).append(entry)
    return settings


def _is_folds(entries: list[dict]) -> bool:
    return len(entries) > 1 and all(e.get("fold") for e in entries)


def comparison(results: dict, level: float) -> list[dict[str, Any]]:
    """One row per setting and test set (internal, then external): primary metric with CI.

    k-fold settings (runs differing only in the held-out fold) get the mean across folds, and
    repeated label draws (runs differing only in the budget seed) the mean across draws, each
    with a Student t interval; a single run keeps its patient-bootstrap interval.
    """
    from spcxr.evaluation.bootstrap import fold_summary
    from spcxr.evaluation.draws import draw_summary

    rows = []
    for key, entries in _settings(results).items():
        first = entries[0]
        for tested in _tested_sets(first):
            present = [e for e in entries if tested in e["eval"]]
            metric = _primary(first["eval"][tested]["metrics"])
            data = first["eval"][tested]["data"]
            row = {
                "setting": key,
                "init": _init_of(first),
                "mode": first.get("mode", "finetune"),
                "budget": first.get("budget", "all"),
                "train_images": int(np.mean([e["train"]["images"] for e in present])),
                "train_patients": int(np.mean([e["train"]["patients"] for e in present])),
                "metric": metric,
                "tested_on": tested,
                "external": bool(first["eval"][tested].get("external")),
                "test_images": data.get("images"),
                "test_patients": data.get("patients"),
            }
            values = [e["eval"][tested]["metrics"][metric]["value"] for e in present]
            if _is_folds(present):
                row["value"] = fold_summary(values, level=level)
                row["folds"] = len(present)
            elif len(present) > 1:
                row["value"] = draw_summary(values, level=level)
                row["draws"] = len(present)
            else:
                row["value"] = first["eval"][tested]["metrics"][metric]
                row["draws"] = 1
            rows.append(row)
    return rows


DRAW_METRICS = {
    "classification": ("accuracy", "macro_auroc", "balanced_accuracy"),
    "segmentation": ("dice",),
}


def _draw_key(entry: dict) -> str:
    """What pairs two runs: their label draw (budget seed), for k-fold their fold, and their
    training seed when it is not the default 0 (repeated training seeds on one label draw,
    e.g. with all labels, are repetitions: paired seed with seed, never collapsed into one)."""
    seed = entry.get("budget_seed")
    if seed is None:  # a run from before budget seeds were recorded: never paired
        return f"run:{entry['run']}"
    fold = entry.get("fold")
    train_seed = entry.get("train_seed") or 0
    return (
        f"seed {seed}"
        + (f", fold {fold['fold']}" if fold else "")
        + (f", training seed {train_seed}" if train_seed else "")
    )


def draw_tables(results: dict, level: float) -> list[dict[str, Any]]:
    """Per setting, test set and metric: every draw's value with its bootstrap CI, and the
    mean, SD and t interval across draws (folds count as draws of the held-out set)."""
    from spcxr.evaluation.draws import draw_summary

    tables = []
    for key, entries in _settings(results).items():
        first = entries[0]
        for tested in _tested_sets(first):
            present = [e for e in entries if tested in e["eval"]]
            data = first["eval"][tested]["data"]
            for metric in DRAW_METRICS.get(first["kind"], ()):
                if metric not in first["eval"][tested]["metrics"]:
                    continue
                runs = [
                    {
                        "draw": _draw_key(e),
                        "train_seed": e.get("train_seed") or 0,
                        "run": e["run"],
                        "train_images": e["train"]["images"],
                        "train_patients": e["train"]["patients"],
                        **{
                            k: e["eval"][tested]["metrics"][metric].get(k)
                            for k in ("value", "low", "high")
                        },
                    }
                    for e in present
                ]
                tables.append(
                    {
                        "setting": key,
                        "init": _init_of(first),
                        "mode": first.get("mode", "finetune"),
                        "budget": first.get("budget", "all"),
                        "tested_on": tested,
                        "external": bool(first["eval"][tested].get("external")),
                        "test_images": data.get("images"),
                        "test_patients": data.get("patients"),
                        "metric": metric,
                        "summary": draw_summary([r["value"] for r in runs], level),
                        "runs": runs,
                    }
                )
    return tables


def _metric_by_draw(entries: list[dict], tested: str, metric: str) -> dict[str, float]:
    return {
        _draw_key(e): e["eval"][tested]["metrics"][metric]["value"]
        for e in entries
        if tested in e["eval"] and metric in e["eval"][tested]["metrics"]
    }


def paired_comparisons(
    results: dict,
    level: float,
    reference: str = "scratch",
    samples: dict[tuple[str, str], TestSample] | None = None,
    n_boot: int = 1000,
    seed: int = 0,
) -> list[dict]:
    """Every initialisation minus ``reference`` (scratch), per budget, test set and metric,
    over the same label draws: per-draw differences and the paired t interval of their mean
    (:func:`spcxr.evaluation.draws.paired_difference`); without matching draws, unpaired.

    A single matching draw has no t interval; when ``samples`` holds both runs' test rows it
    gets the paired patient-bootstrap interval on the test set instead (``"interval":
    "test bootstrap"``), which covers the test patients but not the label draw."""
    from spcxr.evaluation.draws import paired_difference

    by_setting: dict[tuple[str, str], dict[str, list[dict]]] = {}
    for entry in results["runs"].values():
        init = _init_of(entry)
        key = (str(entry.get("budget", "all")), entry.get("mode", "finetune"))
        by_setting.setdefault(key, {}).setdefault(init, []).append(entry)
    out = []
    boot: dict[tuple[str, str, str], dict] = {}
    for (budget, mode), inits in by_setting.items():
        base = inits.get(reference)
        if not base:
            continue
        for init, entries in inits.items():
            if init == reference:
                continue
            for tested in _tested_sets(entries[0]):
                for metric in DRAW_METRICS.get(entries[0]["kind"], ()):
                    a = _metric_by_draw(entries, tested, metric)
                    b = _metric_by_draw(base, tested, metric)
                    if not a or not b:
                        continue
                    difference = paired_difference(a, b, level)
                    if difference["paired"] and difference["n"] == 1 and samples:
                        intervals = _one_draw_intervals(
                            difference["keys"][0],
                            entries,
                            base,
                            tested,
                            samples,
                            boot,
                            n_boot=n_boot,
                            seed=seed,
                            level=level,
                        )
                        ci = intervals.get(metric)
                        if ci is not None:
                            difference.update(
                                low=ci["low"], high=ci["high"], interval="test bootstrap"
                            )
                    out.append(
                        {
                            "comparison": f"{init} - {reference}",
                            "budget": budget,
                            "mode": mode,
                            "tested_on": tested,
                            "external": bool(entries[0]["eval"][tested].get("external")),
                            "metric": metric,
                            "difference": difference,
                        }
                    )
    return out


def _one_draw_intervals(
    key: str,
    entries: list[dict],
    base: list[dict],
    tested: str,
    samples: dict[tuple[str, str], TestSample],
    cache: dict[tuple[str, str, str], dict],
    **boot_args: Any,
) -> dict:
    """Paired patient-bootstrap intervals, per metric, of the two runs trained on draw ``key``
    and scored on ``tested`` (computed once per pair); empty when either run's rows were not kept.
    """
    runs = [e["run"] for group in (entries, base) for e in group if _draw_key(e) == key]
    if len(runs) != 2 or any((run, tested) not in samples for run in runs):
        return {}
    cache_key = (runs[0], runs[1], tested)
    if cache_key not in cache:
        a, b = (samples[(run, tested)] for run in runs)
        cache[cache_key] = paired_bootstrap(a, b, **boot_args)
    return cache[cache_key]
