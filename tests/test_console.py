"""Every README command as a user runs it: the installed ``spcxr`` console script, in a subprocess.

Each step runs on the synthetic set with tiny settings and must exit 0, print its one-line
summary, and leave no traceback on stderr. Later steps use the outputs of earlier ones, as a user
following the README would.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pandas as pd
import pytest
from tests.conftest import console_script

pytestmark = pytest.mark.slow

TINY_VIT = ["--model-arch", "vit_tiny", "--model-img-size", "32", "--model-patch-size", "8"]
TINY_TRAIN = [
    "--train-epochs", "1", "--train-min-steps", "3", "--train-batch-size", "8",
    "--train-device", "cpu", "--train-workers", "0", "--no-train-progress",
    "--no-train-tensorboard",
]  # fmt: skip


def spcxr(*args: str, cwd: Path, expect: int = 0) -> subprocess.CompletedProcess[str]:
    """Runs ``spcxr ARGS`` and checks the exit status and that nothing crashed."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(
        [console_script(), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == expect, f"spcxr {' '.join(args)}\n{done.stdout}\n{done.stderr}"
    assert "Traceback" not in done.stderr, done.stderr
    return done


@pytest.fixture(scope="module")
def work(module_dir) -> Path:
    root = module_dir("console")
    spcxr("synth", "--out", "synth", "--n-patients", "24", "--size", "96", "--seed", "3", cwd=root)
    return root


@pytest.fixture(scope="module")
def store(work: Path) -> Path:
    done = spcxr(
        "prepare", "synth", "--out", "store", "--image-size", "64", "--workers", "1",
        "--no-progress", cwd=work,
    )  # fmt: skip
    assert done.stdout.startswith("store store: ") and "| report: store/report.md" in done.stdout
    return work / "store"


@pytest.fixture(scope="module")
def pretrained(work: Path, store: Path) -> Path:
    done = spcxr(
        "pretrain", "--store", "store", "--out", "pre", *TINY_VIT, "--batch-size", "8",
        "--max-steps", "3", "--device", "cpu", "--workers", "0", "--no-progress",
        "--no-tensorboard", "--augment-out-size", "32", cwd=work,
    )  # fmt: skip
    assert done.stdout.startswith("run pre: 3 steps, masked L1 ")
    return work / "pre"


@pytest.fixture(scope="module")
def classifier(work: Path, pretrained: Path) -> Path:
    done = spcxr(
        "finetune", "--store", "store", "--init", "pre", "--out", "ft",
        "--labels-classes", "normal", "consolidation", "bilateral_opacities",
        *TINY_VIT, "--model-head", "cls", *TINY_TRAIN, cwd=work,
    )  # fmt: skip
    assert (
        re.match(r"run ft: \d+ steps in \d+ s on \d+ images", done.stdout)
        and "model: ft/model" in done.stdout
    )
    return work / "ft"


@pytest.fixture(scope="module")
def segmenter(work: Path, pretrained: Path) -> Path:
    done = spcxr(
        "segment", "--store", "store", "--init", "pre", "--out", "seg", *TINY_VIT,
        "--model-decoder-channels", "16", "8", "8", *TINY_TRAIN, cwd=work,
    )  # fmt: skip
    assert (
        re.match(r"run seg: \d+ steps in ", done.stdout) and "best validation Dice" in done.stdout
    )
    return work / "seg"


def test_synth_writes_the_set(work: Path) -> None:
    manifest = pd.read_csv(work / "synth" / "manifest.csv")
    assert manifest["patient_id"].nunique() == 24


def test_prepare_pretrain_finetune_segment(store: Path, pretrained: Path, classifier: Path,
                                           segmenter: Path) -> None:  # fmt: skip
    assert (store / "manifest.parquet").is_file()
    assert (pretrained / "encoder" / "model.safetensors").is_file()
    assert json.loads((classifier / "run.json").read_text())["finished"]
    assert (segmenter / "model" / "model.safetensors").is_file()


def test_evaluate(work: Path, classifier: Path, segmenter: Path) -> None:
    done = spcxr("evaluate", "ft", "--out", "report_ft", "--n-boot", "50", cwd=work)
    assert done.stdout.rstrip().endswith("report: report_ft/report.md")
    assert (work / "report_ft" / "metrics.json").is_file()
    done = spcxr("evaluate", "seg", "--out", "report_seg", "--n-boot", "50", cwd=work)
    assert "dice" in done.stdout


def test_predict_and_export(work: Path, classifier: Path, segmenter: Path) -> None:
    images = sorted((work / "synth").rglob("*.png"))[:3]
    inputs = [str(p) for p in images]
    done = spcxr("predict", "--run", "ft", *inputs, "--out", "preds.csv", "--no-progress", cwd=work)
    assert done.stdout.strip() == "3 images predicted, 0 errors: preds.csv"
    frame = pd.read_csv(work / "preds.csv")
    assert (frame["status"] == "ok").all() and "heatmap_file" not in frame.columns
    done = spcxr(
        "predict", "--run", "seg", *inputs, "--out", "lungs.csv", "--no-progress", cwd=work
    )
    assert pd.read_csv(work / "lungs.csv")["lung_area_fraction"].between(0, 1).all()
    done = spcxr("export", "--run", "ft", "--out", "exported", cwd=work)
    assert done.stdout.strip() == "exported to exported (model card: exported/MODEL_CARD.md)"
    assert (work / "exported" / "model.onnx").is_file()
    # an exported folder predicts like the run
    spcxr("predict", "--run", "exported", *inputs, "--out", "p2.csv", "--no-progress", cwd=work)
    again = pd.read_csv(work / "p2.csv")
    pd.testing.assert_series_equal(again["predicted"], frame["predicted"])


def test_study_on_a_tiny_config(work: Path) -> None:
    (work / "study.yaml").write_text(
        f"""variant: tiny
out: study_out
results: study_results
data: {work}
device: cpu
sources: [synth]
prepare: {{image_size: 64, workers: 1}}
pretrain:
  model: {{arch: vit_tiny, img_size: 32, patch_size: 8}}
  augment: {{out_size: 32}}
  batch_size: 8
  max_steps: 3
  workers: 0
  progress: false
  tensorboard: false
finetune:
  model: {{arch: vit_tiny, img_size: 32, patch_size: 8, head: cls}}
  train: {{epochs: 1, min_steps: 2, batch_size: 8, workers: 0, progress: false,
           tensorboard: false}}
evaluate: {{n_boot: 50}}
tasks:
  - name: abnormal
    title: normal vs abnormal
    sources: [synth]
    labels:
      column: label
      classes: [normal, abnormal]
      rename: [consolidation=abnormal, bilateral_opacities=abnormal]
    budgets: ["all"]
"""
    )
    done = spcxr("study", "study.yaml", cwd=work)
    summary = json.loads(done.stdout)
    assert summary
    assert (work / "study_results" / "RESULTS.md").is_file()


def test_demo_on_a_reduced_setting(work: Path) -> None:
    done = spcxr(
        "demo", "--out", "demo", "--n-patients", "30", "--steps", "4", "--finetune-steps", "4",
        "--segment-steps", "4", "--n-boot", "50", cwd=work,
    )  # fmt: skip
    assert done.stdout.rstrip().endswith("report: demo/report.md")
    assert (work / "demo" / "report.md").is_file()


def test_usage_errors_exit_2_with_one_line(work: Path) -> None:
    done = spcxr("finetune", "--store", "no_such_store", "--out", "x", cwd=work, expect=2)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("spcxr finetune: error: ")
    assert "no_such_store" in lines[0]
    done = spcxr("predict", "--run", "ft", "x.png", "--heatmaps", "maybe", cwd=work, expect=2)
    assert "--heatmaps" in done.stderr.strip().splitlines()[-1]
