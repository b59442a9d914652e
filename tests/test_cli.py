"""The ``spcxr`` command: registered subcommands, flags from configs, YAML files, the demo."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from spcxr.cli import build_parser, main
from spcxr.config import load_yaml, resolve, save_yaml
from spcxr.pretrain.engine import PretrainConfig


def test_only_working_subcommands_are_registered(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for name in ("prepare", "pretrain", "synth", "demo"):
        assert name in out
    for planned in ("finetune", "segment", "evaluate", "predict", "export"):
        assert planned not in out.split("positional arguments")[-1].split("options")[0]


def test_nested_config_flags_yaml_and_precedence(tmp_path: Path) -> None:
    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        "store: s\nbatch_size: 32\nmodel:\n  arch: vit_tiny\n  recon_blocks: [2, 4]\n"
        "masking_align: 16\noptim:\n  betas: [0.9, 0.95]\n"
    )
    parser = build_parser()
    args = parser.parse_args(
        ["pretrain", "--config", str(cfg), "--batch-size", "8", "--model-img-size", "96"]
    )
    config = resolve(PretrainConfig, args)
    assert config.batch_size == 8  # the flag beats the file
    assert config.model.arch == "vit_tiny" and config.model.img_size == 96
    assert config.model.recon_blocks == (2, 4)
    assert config.masking.align == 16  # flat, flag-spelled key
    assert config.optim.betas == (0.9, 0.95)
    save_yaml(config, tmp_path / "resolved.yaml")
    assert load_yaml(PretrainConfig, tmp_path / "resolved.yaml") == config
    assert yaml.safe_load((tmp_path / "resolved.yaml").read_text())["model"]["recon_blocks"] == [
        2,
        4,
    ]


def test_unknown_yaml_key_is_an_error(tmp_path: Path, capsys) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("store: s\nbatch_sise: 32\n")
    assert main(["pretrain", "--config", str(cfg)]) == 2
    assert "unknown config key 'batch_sise'" in capsys.readouterr().err


def test_missing_store_is_a_clear_error(tmp_path: Path, capsys) -> None:
    assert main(["pretrain", "--store", str(tmp_path / "nope"), "--out", str(tmp_path / "r")]) == 2
    assert "not a prepared store" in capsys.readouterr().err


def test_demo_end_to_end(tmp_path: Path, capsys) -> None:
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--n-patients", "12", "--steps", "4"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (
        summary["store"]["images"] >= 12
        and summary["store"]["with_mask"] == summary["store"]["images"]
    )
    assert summary["store"]["skipped"] == 0
    assert summary["pretrain"]["steps"] == 4
    assert Path(summary["pretrain"]["encoder"]).is_file()
    assert Path(summary["pretrain"]["preview"]).is_file()
    assert (out / "store" / "report.md").is_file()
    assert "synthetic" in summary["note"]


def test_synth_command_writes_a_readable_set(tmp_path: Path) -> None:
    out = tmp_path / "synthetic"
    assert (
        main(["synth", "--out", str(out), "--n-patients", "3", "--size", "64", "--seed", "2"]) == 0
    )
    manifest = (out / "manifest.csv").read_text().splitlines()
    assert manifest[0] == "file,mask_file,label,patient_id,site,view,sex,age"
    assert len(manifest) >= 4
    assert all((out / line.split(",")[0]).is_file() for line in manifest[1:])
