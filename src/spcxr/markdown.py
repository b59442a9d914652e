"""Markdown tables of the reports, model cards and results pages.

One format everywhere (``| a | b |`` rows under a ``|---|---|`` rule), with no column padding so
that the files diff line by line. ``pandas.DataFrame.to_markdown`` pads and aligns columns and
needs ``tabulate``; the tables here are built from rows that are already formatted text.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

__all__ = ["table"]


def table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    """The lines of a markdown table: the header, the rule, then one line per row.

    Args:
        header: column titles.
        rows: cells, each written with ``str``; a row as long as ``header``.

    Returns:
        ``["| h1 | h2 |", "|---|---|", "| a | b |", ...]``.
    """
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return lines
