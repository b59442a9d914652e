"""The results page's summary: what each paired interval says, in words."""

from __future__ import annotations

from spcxr.study.config import StudyConfig, StudyTask
from spcxr.study.page import verdict, verdict_section


def _d(value: float, low: float, high: float, **extra) -> dict:
    return {"value": value, "low": low, "high": high, "paired": True, "n": 5, **extra}


def test_verdict_reads_the_intervals() -> None:
    assert verdict({"accuracy": _d(0.03, -0.06, 0.12)}) == "cannot tell"
    assert verdict({"accuracy": _d(0.03, 0.01, 0.05), "macro_auroc": _d(0.02, -0.01, 0.05)}) == (
        "ahead on accuracy"
    )
    assert verdict({"dice": _d(-0.03, -0.04, -0.02)}) == "behind on Dice"
    both = {"accuracy": _d(0.03, 0.01, 0.05), "balanced_accuracy": _d(-0.03, -0.05, -0.01)}
    assert verdict(both) == "mixed: ahead on accuracy, behind on balanced accuracy"
    one = {"dice": _d(0.03, 0.02, 0.05, interval="test bootstrap", n=1)}
    assert verdict(one) == "ahead on Dice (one draw)"
    unpaired = {"accuracy": {"value": 0.1, "paired": False, "n_a": 1, "n_b": 1}}
    assert verdict(unpaired) == "no interval"


def test_verdict_section_lists_every_comparison() -> None:
    config = StudyConfig(tasks=[StudyTask(name="t", title="T")])
    paired = [
        {"comparison": "gmml - scratch", "budget": "20/class", "tested_on": "ext", "external": True,
         "metric": m, "difference": _d(0.05, 0.01, 0.09)}
        for m in ("accuracy", "macro_auroc", "ece")
    ]  # fmt: skip
    lines = verdict_section(config, {"t": {"paired": paired}})
    row = next(x for x in lines if x.startswith("| T |"))
    assert "ext (external)" in row and "ahead on accuracy, AUROC" in row and "| 5 |" in row
    assert "accuracy +5.0 [+1.0, +9.0] / AUROC +0.050 [+0.010, +0.090]" in row
    assert "ece" not in row
    assert verdict_section(config, {"t": {"paired": []}}) == []
    drift = StudyConfig(tasks=[StudyTask(name="t", reuse="u")])  # drift tables: no verdict
    assert verdict_section(drift, {"t": {"paired": paired}}) == []
