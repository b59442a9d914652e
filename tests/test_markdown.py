"""Markdown tables (spcxr.markdown)."""

from __future__ import annotations

from spcxr.markdown import table


def test_table_lines_are_unpadded_rows_under_a_rule() -> None:
    lines = table(["run", "n", "value [95% CI]"], [["a", 3, "0.5 [0.4, 0.6]"], ["b", None, ""]])
    assert lines == [
        "| run | n | value [95% CI] |",
        "|---|---|---|",
        "| a | 3 | 0.5 [0.4, 0.6] |",
        "| b | None |  |",
    ]
    assert table(["only"], []) == ["| only |", "|---|"]
