"""The study's YAML file as dataclasses: its tasks, its settings, and their merging."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spcxr.config import merge, read_chain

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


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

    ``init_settings`` maps an initialisation's name (``gmml``, ``scratch`` or the NAME of a
    ``NAME=PATH`` entry) to settings merged over ``settings`` for its runs only: each
    initialisation's own recipe, chosen on the validation split by ``spcxr sweep`` (a
    pretrained encoder and a random one rarely want the same learning rate). The runs stay
    paired: same label draws, same data, same selection rule.
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
    init_settings: dict[str, dict[str, Any]] = field(default_factory=dict)


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
    # the task reports' folder under ``out``: a second config on the same study folder (e.g. the
    # pretraining-length curve) reuses its finished runs and keeps its own reports
    reports: str = "reports"
    discussion: str = ""
    device: str = "auto"
    only: list[str] = field(default_factory=list)
    stop_after: str = ""
    finished_only: bool = False

    def external_sources(self) -> list[str]:
        """Every task's external test sources (prepared test-only)."""
        return sorted({s for t in self.tasks for s in t.external_sources})

    def trained_sources(self) -> list[str] | None:
        """The sources some task trains on (``None``: a task trains on every source)."""
        tasks = [t for t in self.tasks if not t.reuse]
        if any(not t.sources for t in tasks):
            return None
        return sorted({s for t in tasks for s in t.sources})

    def kfold_sources(self) -> list[str]:
        """The sources of k-fold tasks (each of their images is evaluated on once)."""
        return sorted({s for t in self.tasks if t.n_folds for s in t.sources})


def load_study(path: str | Path, overrides: dict[str, Any] | None = None) -> StudyConfig:
    """A study config; ``base: OTHER.yaml`` (relative to this file) starts from another study
    config, whose settings this file's keys update (nested settings key by key; ``tasks`` and
    lists replaced whole)."""
    raw: dict[str, Any] = {}
    for _, settings in read_chain(path):
        raw = merge(raw, settings)
    raw.update(overrides or {})
    tasks = [StudyTask(**t) for t in raw.pop("tasks", [])]
    unknown = set(raw) - {f for f in StudyConfig.__dataclass_fields__}
    if unknown:
        raise ValueError(f"{path}: unknown study keys {sorted(unknown)}")
    config = StudyConfig(**raw)
    config.tasks = tasks
    for spec in config.inits:
        name, target = split_init(spec)
        if spec in ("gmml", "scratch") or (target and _NAME.fullmatch(name)):
            continue
        raise ValueError(
            f"{path}: inits entry {spec!r}: give gmml, scratch or NAME=PATH (an encoder or a "
            "pretraining run folder; NAME of letters, digits, '.', '-' and '_')"
        )
    names = {split_init(spec)[0] for spec in config.inits}
    for task in tasks:
        unknown = set(task.init_settings) - names
        if unknown:
            raise ValueError(
                f"{path}: task {task.name!r}: init_settings names {sorted(unknown)}, which are "
                f"not in inits {sorted(names)}"
            )
    return config


def split_init(spec: str) -> tuple[str, str]:
    """``(NAME, PATH)`` of an ``inits`` entry ``NAME=PATH``; ``(spec, "")`` for ``gmml`` and
    ``scratch``, which name no path."""
    name, _, path = spec.partition("=")
    return name, path
