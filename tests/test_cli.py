"""The ``spcxr`` command: registered subcommands, flags from configs, YAML files, the demo."""

from __future__ import annotations

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
    commands = (
        "prepare",
        "pretrain",
        "finetune",
        "segment",
        "evaluate",
        "predict",
        "export",
        "serve",
        "study",
        "synth",
        "demo",
    )
    for name in commands:
        assert name in out
    for name in commands:  # every subcommand's flags are generated and its help renders
        with pytest.raises(SystemExit) as exit_info:
            main([name, "--help"])
        assert exit_info.value.code == 0


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


def test_demo_command_passes_its_flags_and_prints_the_summary(
    tmp_path: Path, capsys, monkeypatch
) -> None:
    # the demo itself runs in tests/test_demo.py; here only the command's wiring
    import spcxr.demo

    seen = {}

    def fake_run_demo(out, **kwargs):
        seen.update(out=out, **kwargs)
        return {"note": "synthetic", "report": str(out / "report.md")}

    monkeypatch.setattr(spcxr.demo, "run_demo", fake_run_demo)
    assert (
        main(
            [
                "demo",
                "--out",
                str(tmp_path / "d"),
                "--n-patients",
                "12",
                "--steps",
                "4",
                "--finetune-steps",
                "3",
                "--n-boot",
                "20",
            ]
        )
        == 0
    )
    assert seen["out"] == tmp_path / "d" and seen["n_patients"] == 12 and seen["steps"] == 4
    assert seen["finetune_steps"] == 3 and seen["n_boot"] == 20 and seen["data"] == ""
    assert "report:" in capsys.readouterr().out


def test_synth_command_writes_a_readable_set(tmp_path: Path) -> None:
    out = tmp_path / "synthetic"
    assert (
        main(["synth", "--out", str(out), "--n-patients", "3", "--size", "64", "--seed", "2"]) == 0
    )
    manifest = (out / "manifest.csv").read_text().splitlines()
    assert manifest[0] == "file,mask_file,label,patient_id,site,view,sex,age"
    assert len(manifest) >= 4
    assert all((out / line.split(",")[0]).is_file() for line in manifest[1:])


def test_ctrl_c_outside_a_clean_stop_names_the_flag_that_resumes(monkeypatch, capsys) -> None:
    """A second Ctrl-C (or one outside a training loop) exits 130 and says how to continue:
    pretrain and finetune / segment resume only when asked to."""
    import spcxr.pretrain.engine
    import spcxr.tasks.classify

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(spcxr.pretrain.engine, "pretrain", interrupted)
    monkeypatch.setattr(spcxr.tasks.classify, "finetune", interrupted)
    assert main(["pretrain", "--store", "s", "--out", "o"]) == 130
    assert "interrupted (run the same command with --resume to resume)" in capsys.readouterr().err
    assert main(["finetune", "--store", "s", "--out", "o", "--train-resume"]) == 130
    assert "interrupted (run the same command to resume)" in capsys.readouterr().err
    assert main(["finetune", "--store", "s", "--out", "o"]) == 130
    assert "with --train-resume to resume" in capsys.readouterr().err
