"""bench/serve_load.py runs end to end (a tiny model, one second of load) and prints one line."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest


@pytest.mark.slow
def test_serve_load_bench_prints_one_json_line(capsys) -> None:
    path = Path(__file__).resolve().parents[2] / "bench" / "serve_load.py"
    spec = importlib.util.spec_from_file_location("serve_load", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    args = ["--seconds", "1", "--clients", "2", "--files", "4", "--file-size", "64"]
    args += ["--img-size", "32", "--patch-size", "8", "--threads", "1", "--workers", "1"]
    result = bench.main(args)
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed == result
    assert result["errors"] == 0 and result["requests"] >= 1
    assert result["images_per_s"] > 0 and result["predict_images_per_s"] > 0
    assert result["serve_to_predict"] == pytest.approx(
        result["images_per_s"] / result["predict_images_per_s"], rel=0.02, abs=1e-3
    )
    assert result["p50_ms"] <= result["p99_ms"]
