"""YAML configs that start from another (``base:``): the order in which settings win, the errors."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from spcxr.config import add_arguments, load_yaml, merge, read_chain, resolve

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@dataclass
class Optim:
    """Attributes:
    lr: learning rate.
    betas: Adam betas.
    """

    lr: float = 1.0
    betas: tuple[float, float] = (0.9, 0.99)


@dataclass
class Settings:
    """Attributes:
    out: output folder.
    epochs: epochs.
    optim: optimiser.
    """

    out: str = "runs/x"
    epochs: int = 1
    optim: Optim = field(default_factory=Optim)


def _write(path: Path, data: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data))
    return path


def _resolve(path: Path, *flags: str) -> Settings:
    parser = argparse.ArgumentParser()
    add_arguments(parser, Settings)
    return resolve(Settings, parser.parse_args(["--config", str(path), *flags]))


def test_a_chain_of_bases_applies_furthest_first_then_flags(tmp_path: Path) -> None:
    """Each file overrides its base; a nested key and its flag spelling in another file are one
    setting; lists are replaced whole; flags win over every file."""
    _write(
        tmp_path / "root.yaml", {"out": "a", "epochs": 5, "optim": {"lr": 2.0, "betas": [0.5, 0.6]}}
    )
    _write(tmp_path / "sub" / "mid.yaml", {"base": "../root.yaml", "optim_lr": 3.0})
    child = _write(
        tmp_path / "sub" / "child.yaml", {"base": "mid.yaml", "optim": {"betas": [0.1, 0.2]}}
    )
    assert [p.name for p, _ in read_chain(child)] == ["root.yaml", "mid.yaml", "child.yaml"]
    assert _resolve(child) == Settings(out="a", epochs=5, optim=Optim(lr=3.0, betas=(0.1, 0.2)))
    assert _resolve(child, "--epochs", "7", "--optim-lr", "4").optim.lr == 4.0
    assert _resolve(child, "--epochs", "7").epochs == 7
    assert load_yaml(Settings, child) == _resolve(child)


def test_bad_chains_are_refused_naming_the_file(tmp_path: Path) -> None:
    a = _write(tmp_path / "a.yaml", {"base": "b.yaml", "epochs": 1})
    _write(tmp_path / "b.yaml", {"base": "a.yaml", "epochs": 2})
    with pytest.raises(ValueError, match="comes back on itself"):
        read_chain(a)
    own = _write(tmp_path / "own.yaml", {"base": "own.yaml"})
    with pytest.raises(ValueError, match="comes back on itself"):
        read_chain(own)
    _write(tmp_path / "typo.yaml", {"optim": {"l_r": 1.0}})
    child = _write(tmp_path / "c.yaml", {"base": "typo.yaml"})
    with pytest.raises(ValueError, match=r"typo\.yaml: unknown config key 'optim.l_r'"):
        _resolve(child)
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="must be a mapping"):
        read_chain(_write(tmp_path / "d.yaml", {"base": "list.yaml"}))
    with pytest.raises(FileNotFoundError):
        read_chain(_write(tmp_path / "e.yaml", {"base": "missing.yaml"}))


def test_merge_is_nested_and_leaves_its_inputs_alone() -> None:
    base = {"a": {"b": 1, "c": [1, 2]}, "d": 1}
    extra = {"a": {"c": [3]}, "e": 2}
    assert merge(base, extra) == {"a": {"b": 1, "c": [3]}, "d": 1, "e": 2}
    assert base == {"a": {"b": 1, "c": [1, 2]}, "d": 1} and extra == {"a": {"c": [3]}, "e": 2}


def test_the_vits_config_is_the_long_cpu_run_with_its_stated_changes() -> None:
    """configs/pretrain_cpu_vits.yaml says only what differs from configs/pretrain_cpu_long.yaml."""
    from spcxr.config import to_dict
    from spcxr.pretrain.engine import PretrainConfig

    long = to_dict(load_yaml(PretrainConfig, CONFIGS / "pretrain_cpu_long.yaml"))
    vits = to_dict(load_yaml(PretrainConfig, CONFIGS / "pretrain_cpu_vits.yaml"))
    changed = {
        f"{group}.{key}" if isinstance(long[group], dict) else group
        for group in long
        for key in (long[group] if isinstance(long[group], dict) else [None])
        if (long[group][key] if key else long[group]) != (vits[group][key] if key else vits[group])
    }
    assert changed == {"out", "model.arch", "optim.lr", "optim.warmup_epochs"}
    assert vits["model"]["arch"] == "vit_small" and vits["optim"]["lr"] == 2.0e-3


def test_a_command_with_a_setting_called_base_reads_it_as_that_setting(tmp_path: Path) -> None:
    """``spcxr sweep``'s ``base`` is its recipe file, not a config to start from."""
    from spcxr.tasks.sweep import SweepConfig

    recipe = _write(tmp_path / "recipe.yaml", {"train": {"epochs": 3}})
    sweep = _write(tmp_path / "sweep.yaml", {"base": str(recipe), "inits": ["scratch"]})
    config = load_yaml(SweepConfig, sweep)
    assert config.base == str(recipe) and config.inits == ["scratch"]
    assert load_yaml(SweepConfig, CONFIGS / "sweep_kermany_cpu.yaml").base == (
        "configs/finetune_kermany_cpu.yaml"
    )
