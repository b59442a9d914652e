"""Device and precision resolution shared by every command."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from spcxr.cli import main
from spcxr.train import distributed
from spcxr.train.distributed import resolve_precision

CPU = torch.device("cpu")


def test_auto_precision_follows_the_cpu(monkeypatch) -> None:
    monkeypatch.setattr(distributed, "cpu_bf16_support", lambda: "amx_bf16")
    assert resolve_precision("auto", CPU) == "bf16"
    assert resolve_precision("fp32", CPU) == "fp32"
    monkeypatch.setattr(distributed, "cpu_bf16_support", lambda: None)
    assert resolve_precision("auto", CPU) == "fp32"
    assert resolve_precision("auto", torch.device("cuda")) == "bf16"
    with pytest.raises(ValueError, match=r"--train-precision bf16: this CPU has no native bf16"):
        resolve_precision("bf16", CPU, flag="--train-precision")
    with pytest.raises(ValueError, match="--precision must be one of auto, fp32, bf16"):
        resolve_precision("fp16", CPU)


def test_cpu_flags_are_read_from_cpuinfo(monkeypatch, tmp_path: Path) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse avx512f avx512_bf16 avx512_vnni\n")
    real_path = distributed.Path
    monkeypatch.setattr(
        distributed, "Path", lambda p: info if p == "/proc/cpuinfo" else real_path(p)
    )
    distributed.cpu_bf16_support.cache_clear()
    try:
        assert distributed.cpu_bf16_support() == "avx512_bf16"
        info.write_text("flags\t\t: fpu sse avx2\n")
        distributed.cpu_bf16_support.cache_clear()
        assert distributed.cpu_bf16_support() is None
    finally:
        distributed.cpu_bf16_support.cache_clear()


def test_bf16_without_support_is_a_one_line_usage_error(
    tiny_store: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    monkeypatch.setattr(distributed, "cpu_bf16_support", lambda: None)
    args = ["pretrain", "--store", str(tiny_store), "--out", str(tmp_path / "r")]
    code = main([*args, "--device", "cpu", "--precision", "bf16", "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err
    assert err.startswith("spcxr pretrain: error: --precision bf16: this CPU has no native bf16")
