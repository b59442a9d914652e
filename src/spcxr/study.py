"""``spcxr study CONFIG``: the paper's protocol end to end, from one YAML file.

1. Prepare one store from every source (patient-level splits; duplicates grouped across sources,
   so an image and its copy always share a split).
2. GMML-pretrain on the pool of *training* images of every source: every image in any validation
   or test split of any task - and, through the duplicate groups, every copy of one - is left out
   (the store's split is per patient group, and each task evaluates on the store's test split or
   on held-out folds of the k-fold sources, which are then also excluded from the pool).
3. For every task, initialisation (GMML / scratch) and label budget: fine-tune (or train the
   segmenter) with the same recipe.
4. Evaluate each task's runs together (CIs by patient bootstrap, drift tables, label-efficiency
   plots) and write a results page that says which data, settings and compute produced each
   number.

Every step is skipped when its output is complete, so an interrupted study resumes where it
stopped (a run in progress resumes from its checkpoint).
"""

from __future__ import annotations

import copy
import json
import logging
import os
import platform
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from spcxr.atomic import atomic_write_text
from spcxr.config import from_dict, to_dict

log = logging.getLogger(__name__)


@dataclass
class StudyTask:
    """One downstream task of a study.

    ``reuse`` names another task whose runs (at this task's ``budgets``) are evaluated here
    instead of training new ones, e.g. drift: the pneumonia classifiers trained on Kermany,
    tested on every source with ``test_rename`` mapping the other sources' abnormal labels
    (tuberculosis, covid19, ...) onto the trained positive class.

    ``external_sources`` are external test sets (e.g. Kermany's official test split, Montgomery
    for lung masks): the study prepares them test-only (never pretrained, trained or selected
    on) and reports them beside the internal test. ``budget_seeds`` (default: the study's)
    gives every budget except ``all`` one run per label draw, paired across initialisations.
    """

    name: str
    kind: str = "classify"  # classify | segment
    title: str = ""
    sources: list[str] = field(default_factory=list)
    test_sources: list[str] = field(default_factory=list)
    labels: dict[str, Any] = field(default_factory=dict)
    budgets: list[str] = field(default_factory=lambda: ["all"])
    n_folds: int = 0
    group_by: str = "source"
    settings: dict[str, Any] = field(default_factory=dict)
    reuse: str = ""
    test_rename: list[str] = field(default_factory=list)
    external_sources: list[str] = field(default_factory=list)
    budget_seeds: list[int] | None = None


@dataclass
class StudyConfig:
    """A study: data, pretraining, tasks (see ``configs/study_*.yaml``)."""

    variant: str = "cpu"
    out: str = "runs/study"
    results: str = ""
    data: str = ""
    sources: list[str] = field(default_factory=list)
    prepare: dict[str, Any] = field(default_factory=dict)
    pretrain: dict[str, Any] = field(default_factory=dict)
    pretrain_run: str = ""
    finetune: dict[str, Any] = field(default_factory=dict)
    segment: dict[str, Any] = field(default_factory=dict)
    evaluate: dict[str, Any] = field(default_factory=dict)
    inits: list[str] = field(default_factory=lambda: ["gmml", "scratch"])
    budget_seeds: list[int] = field(default_factory=list)
    tasks: list[StudyTask] = field(default_factory=list)
    discussion: str = ""
    device: str = "auto"
    only: list[str] = field(default_factory=list)
    stop_after: str = ""
    finished_only: bool = False


def load_study(path: str | Path, overrides: dict[str, Any] | None = None) -> StudyConfig:
    raw = yaml.safe_load(Path(path).read_text()) or {}
    raw.update(overrides or {})
    tasks = [StudyTask(**t) for t in raw.pop("tasks", [])]
    unknown = set(raw) - {f for f in StudyConfig.__dataclass_fields__}
    if unknown:
        raise ValueError(f"{path}: unknown study keys {sorted(unknown)}")
    config = StudyConfig(**raw)
    config.tasks = tasks
    return config


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _data_root(config: StudyConfig) -> Path:
    from spcxr.paths import shared_data_dir

    if config.data:
        return Path(config.data)
    root = shared_data_dir()
    if root is None:
        raise FileNotFoundError(
            "no data folder: set `data:` in the study config or SPCXR_DATA (../shared/data/cxr)"
        )
    return root


def _finished(run: Path) -> bool:
    info = run / "run.json"
    return info.is_file() and "finished" in json.loads(info.read_text())


class Study:
    """Runs a :class:`StudyConfig` step by step (each step skipped when already complete)."""

    def __init__(self, config: StudyConfig) -> None:
        self.config = config
        self.out = Path(config.out)
        self.store = self.out / "store"
        self.timings: dict[str, float] = {}
        self.missing: list[str] = []
        self.device = config.device

    # -- 1. data
    def prepare(self) -> Path:
        from spcxr.data.prepare import PrepareConfig, prepare

        if (self.store / "manifest.parquet").is_file():
            return self.store
        start = time.perf_counter()
        sources = [self._source_spec(s) for s in self.config.sources]
        settings = _merge(
            {"sources": sources, "out": str(self.store), "progress": False}, self.config.prepare
        )
        nested = _nest_prepare(settings)
        split = nested.setdefault("split", {})
        split["test_only"] = sorted(set(split.get("test_only") or []) | set(self.external()))
        prepare(from_dict(PrepareConfig, nested))
        self.timings["prepare_s"] = time.perf_counter() - start
        return self.store

    def _source_spec(self, spec: str) -> str:
        """``[NAME=][TYPE:]PATH`` with a relative PATH taken under the data folder."""
        head, sep, path = spec.rpartition(":") if ":" in spec else ("", "", spec)
        if not sep and "=" in spec:
            head, sep, path = spec.partition("=")
        if os.path.isabs(path):
            return spec
        return f"{head}{sep}{_data_root(self.config) / path}"

    # -- 2. pretraining
    def pretrain(self) -> Path:
        from spcxr.pretrain.engine import PretrainConfig, pretrain

        if self.config.pretrain_run:
            return Path(self.config.pretrain_run)
        run = self.out / "pretrain"
        if (run / "encoder" / "model.safetensors").is_file():
            return run
        start = time.perf_counter()
        settings = _merge(
            {
                "store": str(self.store),
                "out": str(run),
                "splits": ["train"],
                "resume": True,
                "device": self.device,
            },
            self.config.pretrain,
        )
        config = from_dict(PretrainConfig, settings)
        excluded = self._kfold_sources()
        if excluded:
            # k-fold sources evaluate on every one of their images: none may be pretrained on.
            from spcxr.data.store import PreparedStore

            store = PreparedStore(self.store)
            config.sources = sorted(set(store.manifest["source"]) - set(excluded))
        pretrain(config)
        self.timings["pretrain_s"] = time.perf_counter() - start
        return run

    def external(self) -> list[str]:
        """Every task's external test sources (prepared test-only)."""
        return sorted({s for t in self.config.tasks for s in t.external_sources})

    def _kfold_sources(self) -> list[str]:
        return sorted({s for t in self.config.tasks if t.n_folds for s in t.sources})

    # -- 3. downstream runs
    def runs_of(self, task: StudyTask) -> list[tuple[Path, dict[str, Any]]]:
        """(run folder, settings) of every run of a task."""
        from spcxr.data.budget import parse_budget

        if task.reuse:
            source = next((t for t in self.config.tasks if t.name == task.reuse), None)
            if source is None:
                raise ValueError(f"task {task.name!r} reuses unknown task {task.reuse!r}")
            wanted = {parse_budget(b).slug for b in task.budgets}
            return [
                (run, settings)
                for run, settings in self.runs_of(source)
                if parse_budget(settings["budget"]).slug in wanted
            ]
        runs = []
        base = self.config.segment if task.kind == "segment" else self.config.finetune
        seeds = self.config.budget_seeds if task.budget_seeds is None else task.budget_seeds
        # Budget, fold and draw outside, initialisation inside: each GMML run is followed by its
        # scratch pair, so an interrupted study already holds complete pairs at the small budgets.
        for budget in task.budgets:
            folds = range(task.n_folds) if task.n_folds else [None]
            slug = parse_budget(budget).slug
            # Repeated label draws at every budget short of all labels (None: one run).
            draws = list(seeds) if seeds and slug != "all" else [None]
            for fold in folds:
                for draw in draws:
                    for init in self.config.inits:
                        name = (
                            f"{init}_{slug}"
                            + (f"_fold{fold}" if fold is not None else "")
                            + (f"_draw{draw}" if draw is not None else "")
                        )
                        settings = _merge(base, task.settings)
                        settings.update(
                            store=str(self.store),
                            out=str(self.out / "tasks" / task.name / name),
                            init="scratch" if init == "scratch" else str(self.pretrain_dir),
                            sources=list(task.sources),
                            budget=budget,
                        )
                        if draw is not None:
                            settings["budget_seed"] = int(draw)
                        runs.append(self._finish_settings(task, settings, fold))
        return runs

    def _finish_settings(
        self, task: StudyTask, settings: dict[str, Any], fold: int | None
    ) -> tuple[Path, dict[str, Any]]:
        settings.setdefault("train", {})["device"] = self.device
        settings["train"]["resume"] = True
        if task.kind == "classify":
            settings["labels"] = dict(task.labels)
            if fold is not None:
                settings.update(n_folds=task.n_folds, fold=fold)
        return Path(settings["out"]), settings

    def train(self, task: StudyTask) -> list[Path]:
        from spcxr.tasks.classify import FinetuneConfig, finetune
        from spcxr.tasks.segment import SegmentConfig, segment

        done = []
        source = next((t for t in self.config.tasks if t.name == task.reuse), task)
        kind = source.kind
        for run, settings in self.runs_of(task):
            if not _finished(run) and self.config.finished_only:
                log.warning("study: %s is not finished; left out (--finished-only)", run)
                self.missing.append(str(run))
                continue
            if not _finished(run):
                log.info("study: training %s", run)
                if kind == "segment":
                    segment(from_dict(SegmentConfig, settings))
                else:
                    finetune(from_dict(FinetuneConfig, settings))
            done.append(run)
        return done

    def evaluate(self, task: StudyTask, runs: list[Path]) -> dict[str, Any]:
        from spcxr.tasks.evaluate import EvaluateConfig, evaluate

        settings = _merge(
            {
                "runs": [str(r) for r in runs],
                "stores": [str(self.store)],
                "sources": list(task.test_sources or task.sources),
                "external": list(task.external_sources),
                "group_by": task.group_by,
                "labels": list(task.test_rename),
                "out": str(self.out / "reports" / task.name),
                "device": self.device,
            },
            self.config.evaluate,
        )
        return evaluate(from_dict(EvaluateConfig, settings))

    def run(self) -> dict[str, Any]:
        start = time.perf_counter()
        self.prepare()
        summary: dict[str, Any] = {"variant": self.config.variant, "tasks": {}}
        if self.config.stop_after == "prepare":
            return summary
        # Scratch-only runs need no encoder (they can run while pretraining is still going).
        self.pretrain_dir = self.pretrain() if "gmml" in self.config.inits else None
        if self.config.stop_after == "pretrain":
            return summary
        for task in self.config.tasks:
            if self.config.only and task.name not in self.config.only:
                continue
            t0 = time.perf_counter()
            runs = self.train(task)
            if self.config.stop_after == "train" or not runs:
                continue
            results = self.evaluate(task, runs)
            summary["tasks"][task.name] = {
                "report": str(self.out / "reports" / task.name / "report.md"),
                "seconds": round(time.perf_counter() - t0, 1),
                "comparison": results["comparison"],
            }
        summary["seconds"] = round(time.perf_counter() - start, 1)
        if self.config.stop_after == "train":
            return summary
        if self.config.results and self.pretrain_dir is not None:
            summary["results_page"] = str(write_results_page(self))
        return summary


def _nest_prepare(settings: dict[str, Any]) -> dict[str, Any]:
    """Accept flat flag-style keys (split_fractions) next to nested ones (split: {...})."""
    from spcxr.config import _flatten_yaml, _set
    from spcxr.data.prepare import PrepareConfig

    data: dict[str, Any] = {}
    for dotted, value in _flatten_yaml(PrepareConfig, settings).items():
        _set(data, dotted, value)
    return data


def run_study(config: StudyConfig) -> dict[str, Any]:
    """Run a study (see the module docstring); returns a summary."""
    return Study(config).run()


# ------------------------------------------------------------------------------------------------
# results page


def _fmt(entry: dict[str, Any] | None) -> str:
    from spcxr.tasks.report import ci_text

    return ci_text(entry)


def write_results_page(study: Study) -> Path:
    """The study's results page (markdown + plots) in ``config.results``."""
    from spcxr.data.store import PreparedStore

    config = study.config
    dest = Path(config.results)
    (dest / "plots").mkdir(parents=True, exist_ok=True)
    store = PreparedStore(study.store)
    pre = study.pretrain_dir
    pre_info = json.loads((pre / "run.json").read_text()) if (pre / "run.json").is_file() else {}
    pre_cfg = (
        yaml.safe_load((pre / "config.yaml").read_text()) if (pre / "config.yaml").is_file() else {}
    )
    log_path = pre / "log.jsonl"
    rows = [json.loads(x) for x in log_path.read_text().splitlines()] if log_path.is_file() else []
    losses = [r for r in rows if "loss" in r]  # training rows (not the feature monitor's)
    m = store.manifest
    lines = [
        f"# Study results: variant `{config.variant}`",
        "",
        f"Produced by `spcxr study` with its `{config.variant}` configuration on "
        f"{time.strftime('%Y-%m-%d')} ({platform.node() and 'host ' + platform.machine()}, "
        f"device `{study.device}`). Every number below comes from this run; confidence intervals "
        "are 95% bootstrap intervals over patients (k-fold: Student t across folds).",
        "",
        "## Data",
        "",
        "| source | images | patients | train | val | test | classes |",
        "|---|---|---|---|---|---|---|",
    ]
    for source, part in m.groupby("source"):
        splits = part["split"].value_counts()
        classes = ", ".join(f"{k} {v}" for k, v in part["label"].value_counts().items())
        lines.append(
            f"| {source} | {len(part)} | {part['group'].nunique()} | {splits.get('train', 0)} | "
            f"{splits.get('val', 0)} | {splits.get('test', 0)} | {classes} |"
        )
    report = json.loads((study.store / "report.json").read_text())
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
            "split of every source; no validation/test image of any task, nor any duplicate of "
            "one, was pretrained on"
            + (
                f"; k-fold sources left out entirely: {', '.join(study._kfold_sources())}"
                if study._kfold_sources()
                else ""
            )
            + (
                f"; external test sources (test-only) never pretrained on: "
                f"{', '.join(study.external())}"
                if study.external()
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
        previews = sorted((pre / "previews").glob("*.png"))
        if previews:
            shutil.copy(previews[-1], dest / "plots" / "pretrain_preview.png")
            lines.append("\n![reconstruction preview](plots/pretrain_preview.png)")
    lines.append("")
    for task in config.tasks:
        report_dir = study.out / "reports" / task.name
        metrics_path = report_dir / "metrics.json"
        if not metrics_path.is_file():
            continue
        results = json.loads(metrics_path.read_text())
        lines += _task_section(task, results, report_dir, dest, study)
    if study.missing:
        lines += [
            "## Runs not included",
            "",
            "These runs had not finished when this page was written (`--finished-only`):",
            "",
            *[f"- `{r}`" for r in study.missing],
            "",
        ]
    if config.discussion and Path(config.discussion).is_file():
        lines += ["## Discussion", "", Path(config.discussion).read_text().strip(), ""]
    path = dest / "RESULTS.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


def _task_section(task, results, report_dir: Path, dest: Path, study: Study) -> list[str]:
    runs = results["runs"]
    first = next(iter(runs.values()))
    title = task.title or task.name
    run_info = {}
    for name, entry in runs.items():
        info_path = Path(entry["run"]) / "run.json"
        run_info[name] = json.loads(info_path.read_text()) if info_path.is_file() else {}
    seconds = sum(i.get("seconds", 0) for i in run_info.values())
    settings = _merge(
        study.config.segment if task.kind == "segment" else study.config.finetune, task.settings
    )
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
        f"{', '.join(task.budgets)}; initialisations: {', '.join(study.config.inits)}; "
        f"label draws per budget below all: {_seeds_text(study, task)}.",
        f"- Settings: `{json.dumps(settings, sort_keys=True)}`.",
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
        )
    lines += [
        "",
        "Several label draws: mean with the 95% t interval across draws (k-fold: across folds); "
        "one run: its patient-bootstrap interval.",
        "",
        "| setting | init | budget | training images (patients) | draws | tested on | "
        "test images (patients) | metric | value [95% CI] |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    order = sorted(
        results["comparison"],
        key=lambda r: (r.get("external", False), r["train_images"], r["init"]),
    )
    for row in order:
        folds = f" ({row['folds']} folds)" if row.get("folds") else ""
        tested = row.get("tested_on", "") + (" (external)" if row.get("external") else "")
        lines.append(
            f"| {row['setting']} | {row['init']} | {row['budget']} | {row['train_images']} "
            f"({row.get('train_patients', '?')}) | {row.get('draws', row.get('folds', 1))} | "
            f"{tested} | {row.get('test_images', '?')} ({row.get('test_patients', '?')}) | "
            f"{row['metric']}{folds} | {_fmt(row['value'])} |"
        )
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
    lines += [
        "| run | test source | " + " | ".join(_secondary(task)) + " |",
        "|---|---|" + "---|" * len(_secondary(task)),
    ]
    for name, entry in runs.items():
        for source, ev in entry["eval"].items():
            cells = [_fmt(ev["metrics"].get(k)) for k in _secondary(task)]
            lines.append(f"| {name} | {source} | " + " | ".join(cells) + " |")
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


def _seeds_text(study: Study, task: StudyTask) -> str:
    seeds = study.config.budget_seeds if task.budget_seeds is None else task.budget_seeds
    return f"{len(seeds)} (budget seeds {', '.join(map(str, seeds))})" if seeds else "1"


def _secondary(task: StudyTask) -> list[str]:
    if task.kind == "segment":
        return ["dice", "iou", "hd95"]
    return ["macro_auroc", "accuracy", "balanced_accuracy", "macro_f1", "ece"]


__all__ = ["Study", "StudyConfig", "StudyTask", "load_study", "run_study", "to_dict"]
