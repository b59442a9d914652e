"""``spcxr sweep`` on the synthetic store: the grid, the choice per init, resume, bad input."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import yaml
from tests.tasks.test_classify import _config

from spcxr.cli import main
from spcxr.config import save_yaml
from spcxr.tasks.classify import FinetuneConfig
from spcxr.tasks.sweep import SweepConfig, parse_grid, setting_name, sweep


@pytest.fixture
def recipe(synth_store, tmp_path):
    path = tmp_path / "recipe.yaml"
    save_yaml(_config(synth_store, tmp_path / "unused"), path)
    return path


def test_parse_grid_reads_yaml_scalars_and_rejects_bad_entries() -> None:
    grid = parse_grid(["train.optim.lr=5e-4, 1e-3", "mode=finetune,linear"], FinetuneConfig)
    assert grid == {"train.optim.lr": [5e-4, 1e-3], "mode": ["finetune", "linear"]}
    assert setting_name({"train.optim.lr": 0.001, "mode": "linear"}) == "lr=0.001_mode=linear"
    assert setting_name({}) == "base"
    with pytest.raises(ValueError, match="not a setting"):
        parse_grid(["train.optim.learning_rate=1"], FinetuneConfig)
    with pytest.raises(ValueError, match="KEY=V1"):
        parse_grid(["train.optim.lr"], FinetuneConfig)
    with pytest.raises(ValueError, match="twice"):
        parse_grid(["mode=linear", "mode=finetune"], FinetuneConfig)


def test_sweep_runs_every_setting_on_the_same_draws_and_chooses_per_init(
    recipe, tmp_path, monkeypatch
) -> None:
    out = tmp_path / "sweep"
    config = SweepConfig(
        base=str(recipe),
        out=str(out),
        inits=["scratch", "other=scratch"],
        grid=["train.optim.lr=1e-4,3e-3"],
        budget="all",
        budget_seeds="0-1",
    )
    result = sweep(config)
    table = pd.read_csv(out / "sweep.csv")
    # the base recipe's lr (2e-3) is run too: a choice is compared with what it replaces
    assert len(table) == 2 * 3 * 2  # inits x settings x draws
    assert set(table["setting"]) == {"lr=0.0001", "lr=0.003", "lr=0.002"}
    for _, row in table.iterrows():
        saved = json.loads(
            (out / row["init"] / row["setting"] / f"draw-{row['draw']}" / "run.json").read_text()
        )
        assert saved["best_value"] == pytest.approx(row["value"])
        assert saved["init"]["init"] == "scratch"
        run_cfg = yaml.safe_load(
            (out / row["init"] / row["setting"] / f"draw-{row['draw']}" / "config.yaml").read_text()
        )
        assert run_cfg["train"]["optim"]["lr"] == pytest.approx(row["train.optim.lr"])
        assert run_cfg["budget_seed"] == row["draw"]
    # the choice is the setting with the best mean validation metric (macro AUROC: highest)
    means = table.groupby(["init", "setting"])["value"].mean()
    for init in ("scratch", "other"):
        assert result["chosen"][init] == means[init].idxmax()
        best = yaml.safe_load((out / f"best_{init}.yaml").read_text())
        assert best["train"]["optim"]["lr"] == float(result["chosen"][init].split("=")[1])
        assert best["init"] == "scratch"
    page = (out / "sweep.md").read_text()
    assert "never read" in page and f"chosen `{result['chosen']['scratch']}`" in page
    assert page.count("| `lr=0.002` (base recipe) |") == 2
    assert "`train.optim.lr` in [0.0001, 0.003, 0.002]" in page

    # a second call trains nothing: every run is finished
    def fail(*_a, **_k):
        raise AssertionError("a finished sweep run was trained again")

    monkeypatch.setattr("spcxr.tasks.classify.finetune", fail)
    again = sweep(config)
    assert again["chosen"] == result["chosen"]


def test_sweep_command_and_its_errors(recipe, tmp_path, capsys) -> None:
    out = tmp_path / "cli"
    argv = [
        "sweep",
        "--base",
        str(recipe),
        "--out",
        str(out),
        "--inits",
        "scratch",
        "--grid",
        "mode=finetune,linear",
        "--budget",
        "all",
        "--budget-seeds",
        "0",
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "scratch: chosen mode=" in printed and (out / "best_scratch.yaml").is_file()
    assert main(["sweep", "--out", str(out)]) == 2
    assert "--base" in capsys.readouterr().err
    assert main(["sweep", "--base", str(recipe), "--grid", "nope=1", "--out", str(out)]) == 2
    assert "'nope' is not a setting" in capsys.readouterr().err


def test_the_shipped_sweep_config_and_its_recipe_are_valid() -> None:
    from pathlib import Path

    from spcxr.config import load_yaml

    root = Path(__file__).parents[2]
    config = load_yaml(SweepConfig, root / "configs" / "sweep_kermany_cpu.yaml")
    config.validate()
    recipe = load_yaml(FinetuneConfig, root / config.base)
    assert recipe.budget == config.budget == "20/class" and recipe.labels.classes
    grid = parse_grid(config.grid, FinetuneConfig)
    assert grid["train.optim.lr"] == [3e-3, 1e-2]
