"""``spcxr sweep``: choose a fine-tuning (or segmentation) recipe on validation, per encoder.

A grid of settings (learning rate, layer decay, epochs, linear probe vs full fine-tuning, head,
augmentation, ...) is run from every initialisation on the same label draws, and each setting
is scored by the validation metric its runs select on (``run.json``'s ``best_value``: macro
AUROC, validation loss or Dice). The test split is never read. Issue 14 point 4: a recipe tuned
for scratch training need not suit a pretrained encoder (MAE-family work tunes layer decay and
learning rate per encoder), so each initialisation gets its own choice from the same grid, and
few-label choices are averaged over several label draws because one draw decides nothing.

Outputs in ``OUT``: one run per (init, setting, draw) in ``OUT/<init>/<setting>/draw-<seed>``
(finished runs are skipped, so an interrupted sweep resumes), ``sweep.csv`` (one row per run),
``sweep.md`` (settings ranked per initialisation), ``sweep.json`` (the resolved sweep, versions)
and ``best_<init>.yaml``: the base recipe with the chosen setting, ready for ``--config``.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from spcxr import markdown
from spcxr.atomic import atomic_write_text
from spcxr.config import config_keys, from_dict, get_dotted, load_yaml, set_dotted, to_dict
from spcxr.tasks.loop import draw_dir, parse_seeds, run_finished
from spcxr.versions import library_versions

log = logging.getLogger(__name__)

__all__ = ["SweepConfig", "parse_grid", "setting_name", "sweep"]

TASKS = ("finetune", "segment")
# validation metrics where lower is better (everything else: higher)
_LOWER_IS_BETTER = ("loss",)


@dataclass
class SweepConfig:
    """Settings of ``spcxr sweep`` (every field is a CLI flag and a YAML key).

    Attributes:
        base: YAML of the recipe being varied (``spcxr finetune`` or ``spcxr segment`` keys).
        task: ``finetune`` or ``segment``: which command the runs are.
        out: the sweep folder.
        store: the prepared store (empty: the base recipe's).
        inits: initialisations, each swept over the whole grid and chosen separately:
            ``scratch``, an encoder or pretraining run folder, or ``NAME=PATH`` to name it.
        grid: one entry per varied setting, ``KEY=V1,V2,...`` with ``KEY`` a dotted recipe key
            (``train.optim.lr=5e-4,1e-3,3e-3``, ``mode=finetune,linear``); every combination
            is run. Values are numbers, booleans or words.
        budget: the label budget of every run (``20/class``, ``all``, ...).
        budget_seeds: label draws per setting (the same draws for every setting and init).
        include_base: also run the base recipe's own values of the grid's keys when they are
            not one of the grid's combinations, so that a choice is always compared with the
            recipe it would replace (marked ``(base recipe)`` in ``sweep.md``).
    """

    base: str = ""
    task: str = "finetune"
    out: str = "runs/sweep"
    store: str = ""
    inits: list[str] = field(default_factory=lambda: ["scratch"])
    grid: list[str] = field(default_factory=list)
    budget: str = "20/class"
    budget_seeds: str = "0-2"
    include_base: bool = True

    def validate(self) -> None:
        """Raises ValueError naming the flag of a missing or wrong setting."""
        if self.task not in TASKS:
            raise ValueError(f"--task must be one of {TASKS}, got {self.task!r}")
        if not self.base:
            raise ValueError("--base: the recipe YAML to sweep is required")
        if not self.inits:
            raise ValueError("--inits: at least one initialisation is required")
        parse_seeds(self.budget_seeds)


def _task(task: str) -> tuple[type, Any]:
    if task == "segment":
        from spcxr.tasks.segment import SegmentConfig, segment

        return SegmentConfig, segment
    from spcxr.tasks.classify import FinetuneConfig, finetune

    return FinetuneConfig, finetune


def parse_grid(entries: list[str], cls: type) -> dict[str, list[Any]]:
    """``{"train.optim.lr": [5e-4, 1e-3]}`` from ``["train.optim.lr=5e-4,1e-3"]``.

    Raises:
        ValueError: an entry without ``=`` or values, a key that ``cls`` does not have, or a key
            given twice.
    """
    keys = config_keys(cls)
    grid: dict[str, list[Any]] = {}
    for entry in entries:
        key, eq, values = entry.partition("=")
        key = key.strip().replace("-", "_")
        items = [v.strip() for v in values.split(",") if v.strip()]
        if not eq or not items:
            raise ValueError(f"--grid: {entry!r} is not KEY=V1,V2,...")
        if key not in keys:
            raise ValueError(
                f"--grid: {key!r} is not a setting of the recipe; known: {sorted(keys)}"
            )
        if key in grid:
            raise ValueError(f"--grid: {key!r} is given twice")
        grid[key] = [_scalar(v) for v in items]
    return grid


def _scalar(text: str) -> Any:
    """``5e-4`` -> 0.0005 (YAML 1.1 would keep it a string), ``3`` -> 3, ``true`` -> True."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return yaml.safe_load(text)


def setting_name(setting: dict[str, Any]) -> str:
    """A folder name for one combination, e.g. ``lr=0.001_layer_decay=0.75`` (``base``: none)."""
    if not setting:
        return "base"
    parts = [f"{key.rsplit('.', 1)[-1]}={value}" for key, value in setting.items()]
    return re.sub(r"[^A-Za-z0-9_.=+-]", "-", "_".join(parts))


def _init_name(spec: str) -> tuple[str, str]:
    """``(name, --init)``: ``NAME=PATH`` is named; ``scratch`` is itself; a path its folder."""
    name, eq, path = spec.partition("=")
    if eq:
        return name, path
    return ("scratch", "scratch") if spec == "scratch" else (Path(spec).name or spec, spec)


def _better(select: str) -> float:
    """+1 when a higher ``select`` is better, -1 when lower is."""
    return -1.0 if select in _LOWER_IS_BETTER else 1.0


def sweep(config: SweepConfig) -> dict[str, Any]:
    """Runs the grid from every init on the same draws; returns the table and the choices."""
    config.validate()
    cls, train_fn = _task(config.task)
    base_cfg = load_yaml(cls, config.base)  # checks the base recipe before any run
    grid = parse_grid(config.grid, cls)
    combos = [dict(zip(grid, values, strict=True)) for values in itertools.product(*grid.values())]
    base_data = to_dict(base_cfg)
    base_setting = {key: get_dotted(base_data, key) for key in grid}
    if config.include_base and base_setting not in combos:
        combos.append(base_setting)
        for key, value in base_setting.items():
            if value not in grid[key]:
                grid[key].append(value)
    seeds = parse_seeds(config.budget_seeds)
    inits = [_init_name(spec) for spec in config.inits]
    if len({name for name, _ in inits}) != len(inits):
        raise ValueError(f"--inits: two initialisations share a name: {config.inits}")
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for (name, init), setting, seed in itertools.product(inits, combos, seeds):
        label = setting_name(setting)
        run = draw_dir(out / name / label, seed)
        data = to_dict(base_cfg)
        for key, value in setting.items():
            set_dotted(data, key, value)
        data.update(out=str(run), init=init, budget=config.budget, budget_seed=seed)
        data["budget_seeds"] = ""
        if config.store:
            data["store"] = config.store
        data["train"]["resume"] = True
        if run_finished(run):
            info = json.loads((run / "run.json").read_text())
        else:
            log.info("sweep: %s, %s, draw %d -> %s", name, label, seed, run)
            info = train_fn(from_dict(cls, data))
        rows.append(
            {
                "init": name,
                "setting": label,
                **{key: setting[key] for key in grid},
                "draw": seed,
                "select": info["select"],
                "value": float(info["best_value"]),
                "best_step": info["best_step"],
                "steps": info["steps"],
                "seconds": float(info.get("seconds", float("nan"))),
                "run": str(run),
            }
        )
    table = pd.DataFrame(rows)
    table.to_csv(out / "sweep.csv", index=False)
    ranked, chosen = _rank(table, list(grid))
    for name, setting_row in chosen.items():
        data = to_dict(base_cfg)
        for key in grid:
            value = setting_row[key]
            set_dotted(data, key, value.item() if isinstance(value, np.generic) else value)
        data["init"] = dict(inits)[name]
        atomic_write_text(out / f"best_{name}.yaml", yaml.safe_dump(data, sort_keys=False))
    result = {
        "sweep": to_dict(config),
        "grid": grid,
        "draws": seeds,
        "versions": library_versions("torch", "timm", "numpy"),
        "chosen": {name: row["setting"] for name, row in chosen.items()},
    }
    atomic_write_text(out / "sweep.json", json.dumps(result, indent=2, default=str))
    page = _page(config, grid, seeds, ranked, chosen, setting_name(base_setting))
    atomic_write_text(out / "sweep.md", "\n".join(page))
    return {**result, "table": table, "ranked": ranked}


def _rank(table: pd.DataFrame, keys: list[str]) -> tuple[pd.DataFrame, dict[str, pd.Series]]:
    """Per init and setting: mean, SD and per-draw values of the validation metric, ranked
    best first; and the best setting of each init (highest mean, or lowest for a loss).
    ``keys``: the grid's settings (columns of ``table``)."""
    groups = []
    for (init, setting), part in table.groupby(["init", "setting"], sort=False):
        part = part.sort_values("draw")
        values = part["value"].to_numpy()
        groups.append(
            {
                "init": init,
                "setting": setting,
                **{k: part[k].iloc[0] for k in keys},
                "select": part["select"].iloc[0],
                "mean": float(values.mean()),
                "sd": float(values.std(ddof=1)) if len(values) > 1 else math.nan,
                "per_draw": ", ".join(f"{v:.4f}" for v in values),
                "minutes": float(part["seconds"].sum() / 60),
            }
        )
    ranked = pd.DataFrame(groups)
    ranked["score"] = ranked["mean"] * ranked["select"].map(_better)
    ranked = ranked.sort_values(["init", "score"], ascending=[True, False], kind="stable")
    chosen = {init: part.iloc[0] for init, part in ranked.groupby("init", sort=False)}
    return ranked.drop(columns="score"), chosen


def _page(config, grid, seeds, ranked: pd.DataFrame, chosen, base_label: str) -> list[str]:
    lines = [
        "# spcxr sweep",
        "",
        f"Recipe `{config.base}` ({config.task}); label budget {config.budget}; draws "
        f"{', '.join(map(str, seeds))} (the same for every setting and initialisation). "
        "Scored on the validation split only (each run's model-selection metric); the test "
        "split is never read.",
        "",
        "Grid: " + "; ".join(f"`{k}` in {v}" for k, v in grid.items()),
        "",
    ]
    for init, part in ranked.groupby("init", sort=False):
        best = chosen[init]
        lines += [
            f"## {init}: chosen `{best['setting']}` (validation {best['select']} "
            f"{best['mean']:.4f}; recipe in `best_{init}.yaml`)",
            "",
            *markdown.table(
                [
                    "setting",
                    f"validation {part['select'].iloc[0]}: mean",
                    "SD",
                    "per draw",
                    "training minutes",
                ],
                [
                    (
                        f"`{r['setting']}`"
                        + (" (base recipe)" if r["setting"] == base_label else ""),
                        f"{r['mean']:.4f}",
                        f"{r['sd']:.4f}",
                        r["per_draw"],
                        f"{r['minutes']:.1f}",
                    )
                    for _, r in part.iterrows()
                ],
            ),
            "",
        ]
    lines.append(
        "Differences smaller than the SD across draws are not a reason to prefer a setting; "
        "confirm a choice on new draws and on an external test before concluding."
    )
    return lines
