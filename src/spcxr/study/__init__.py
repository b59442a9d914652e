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

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from spcxr.config import from_dict, merge, to_dict
from spcxr.errors import RunStopped, UsageError
from spcxr.study.config import StudyConfig, StudyTask, load_study, split_init
from spcxr.study.page import write_results_page
from spcxr.train.signals import stop_exit_status, stop_reason

log = logging.getLogger(__name__)


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


def _encoder_ready(init: str) -> bool:
    """``scratch``, an encoder file, or a pretraining run folder that has finished: its encoder
    is exported and holds the run's last step (a folder with only a checkpoint is a pretraining
    still running; one whose export is older than its schedule is a finished run being continued
    to more epochs, and its runs must not be trained from the old encoder under the new name)."""
    from spcxr.models.init_from import export_is_current

    return init == "scratch" or Path(init).is_file() or export_is_current(init)


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
        settings = merge(
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
        settings = merge(
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
        from spcxr.data.store import PreparedStore

        pool = set(PreparedStore(self.store).manifest["source"])
        if config.sources:
            pool &= set(config.sources)
        # Only sources a task trains on: a source that no task names (e.g. an external test set
        # whose task a trimmed-down config left out, and which is therefore not prepared
        # test-only) is never pretrained on.
        trained = self.config.trained_sources()
        if trained is not None:
            pool &= set(trained)
        # k-fold sources evaluate on every one of their images: none may be pretrained on.
        pool -= set(self._kfold_sources())
        if not pool:
            raise UsageError(
                "study: no source left to pretrain on (the tasks' training sources, less the "
                "k-fold ones)"
            )
        config.sources = sorted(pool)
        result = pretrain(config)
        if result.budget_stop:
            # An unfinished encoder must not be fine-tuned as if it were the study's: stop here
            # (pretraining resumes when the same study command runs again).
            raise RunStopped(
                f"pretraining stopped ({stop_reason(result.budget_stop)}) at step {result.steps} "
                f"of {result.total_steps}, checkpoint in {run}; run the same command to continue",
                stop_exit_status(result.budget_stop),
            )
        self.timings["pretrain_s"] = time.perf_counter() - start
        return run

    def external(self) -> list[str]:
        """Every task's external test sources (prepared test-only)."""
        return self.config.external_sources()

    def _kfold_sources(self) -> list[str]:
        return self.config.kfold_sources()

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
                    for spec in self.config.inits:
                        init, source = self.init_source(spec)
                        name = (
                            f"{init}_{slug}"
                            + (f"_fold{fold}" if fold is not None else "")
                            + (f"_draw{draw}" if draw is not None else "")
                        )
                        settings = merge(base, task.settings)
                        settings = merge(settings, task.init_settings.get(init, {}))
                        settings.update(
                            store=str(self.store),
                            out=str(self.out / "tasks" / task.name / name),
                            init=source,
                            sources=list(task.sources),
                            budget=budget,
                        )
                        if draw is not None:
                            settings["budget_seed"] = int(draw)
                        runs.append(self._finish_settings(task, settings, fold))
        return runs

    def init_source(self, spec: str) -> tuple[str, str]:
        """``(name, --init)`` of an ``inits`` entry: ``gmml`` (this study's pretraining),
        ``scratch``, or ``NAME=PATH`` - another encoder (a pretraining run folder or an encoder
        file), e.g. the same recipe pretrained for another number of epochs; its runs are named
        ``NAME_<budget>...`` and pair with scratch on the same draws."""
        if spec == "scratch":
            return spec, "scratch"
        if spec == "gmml":
            return spec, str(self.pretrain_dir)
        return split_init(spec)

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
        from spcxr.tasks.loop import run_finished
        from spcxr.tasks.segment import SegmentConfig, segment

        done = []
        source = next((t for t in self.config.tasks if t.name == task.reuse), task)
        kind = source.kind
        for run, settings in self.runs_of(task):
            if not run_finished(run) and self.config.finished_only:
                log.warning("study: %s is not finished; left out (--finished-only)", run)
                self.missing.append(str(run))
                continue
            if not run_finished(run) and not _encoder_ready(settings["init"]):
                # e.g. a longer pretraining still running: never fine-tune from its checkpoint
                log.warning(
                    "study: %s left out: %s has no exported encoder yet", run, settings["init"]
                )
                self.missing.append(f"{run} (encoder {settings['init']} not finished)")
                continue
            if not run_finished(run):
                log.info("study: training %s", run)
                if kind == "segment":
                    segment(from_dict(SegmentConfig, settings))
                else:
                    finetune(from_dict(FinetuneConfig, settings))
            done.append(run)
        return done

    def evaluate(self, task: StudyTask, runs: list[Path]) -> dict[str, Any]:
        """Evaluate a task's runs together; a report that is already up to date (same settings,
        same runs, written after each of them finished) is read back instead of recomputed, so a
        resumed study does not re-score its finished tasks."""
        from spcxr.config import to_dict
        from spcxr.tasks.evaluate import EvaluateConfig, evaluate

        settings = merge(
            {
                "runs": [str(r) for r in runs],
                "stores": [str(self.store)],
                "sources": list(task.test_sources or task.sources),
                "external": list(task.external_sources),
                "group_by": task.group_by,
                "labels": list(task.test_rename),
                "out": str(self.out / self.config.reports / task.name),
                "device": self.device,
            },
            self.config.evaluate,
        )
        config = from_dict(EvaluateConfig, settings)
        metrics = Path(config.out) / "metrics.json"
        if metrics.is_file():
            written = metrics.stat().st_mtime
            results = json.loads(metrics.read_text())
            expected = json.loads(json.dumps(to_dict(config)))
            if config.precision == "auto":  # stored as what it resolved to
                expected["precision"] = results.get("precision")
            if results.get("config") == expected and all(
                (run / "run.json").stat().st_mtime < written for run in runs
            ):
                log.info("study: %s is up to date; not re-evaluated", metrics)
                return results
        return evaluate(config)

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
                "report": str(self.out / self.config.reports / task.name / "report.md"),
                "seconds": round(time.perf_counter() - t0, 1),
                "comparison": results["comparison"],
            }
        summary["seconds"] = round(time.perf_counter() - start, 1)
        if self.config.stop_after == "train":
            return summary
        if self.config.results:
            page = write_results_page(self.config, self.pretrain_dir, self.missing)
            summary["results_page"] = str(page)
        return summary


def _nest_prepare(settings: dict[str, Any]) -> dict[str, Any]:
    """Accept flat flag-style keys (split_fractions) next to nested ones (split: {...})."""
    from spcxr.config import _flatten_yaml, set_dotted
    from spcxr.data.prepare import PrepareConfig

    data: dict[str, Any] = {}
    for dotted, value in _flatten_yaml(PrepareConfig, settings).items():
        set_dotted(data, dotted, value)
    return data


def run_study(config: StudyConfig) -> dict[str, Any]:
    """Run a study (see the module docstring); returns a summary."""
    return Study(config).run()


__all__ = ["Study", "StudyConfig", "StudyTask", "load_study", "run_study", "to_dict"]
