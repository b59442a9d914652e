"""Label budgets for label-efficiency curves: a few labelled training images, chosen by patient.

A label-efficiency curve fine-tunes the same model on growing subsets of the labelled training
split (e.g. 2/class, 10/class, 1%, 10%, all) and plots a test metric against the number of
labels; it is how self-supervised pretraining such as GMML is usually judged against training
from scratch (METHOD.md section 3, and the SPCXR paper, arXiv 2211.12944, whose fine-tuning
runs use reduced label fractions). Three rules make such curves meaningful:

- **By patient.** A patient's images are all in or all out (METHOD.md: split by patient, never
  by image), so "20 images" never means 20 views of 5 patients seen as independent samples.
- **Stratified.** Each class is drawn separately, so even the smallest budget sees every class.
- **Nested.** For one seed, each class's patient groups are visited in one fixed random order
  and every budget keeps a *prefix* of that order, so a smaller budget is a subset of a larger
  one, of any kind: the curve adds labels, it does not redraw them.

Budget spellings accepted by :func:`parse_budget`:

=================  ===========================================================================
``"all"``          every row.
``"0.1"``, 0.1     a fraction in (0, 1] of each class's images (float, or a string with a
                   decimal point); ``"1.0"`` is a fraction (everything), not one image.
``"10%"``          the same fraction as a percentage in (0, 100].
``"20/class"``     about 20 images of each class.
``"100"``, 100     about 100 images in total, split across classes in proportion to their
                   image counts (an int, or a string of digits, optionally ``"100 images"``).
=================  ===========================================================================

A bare integer means a *total* (not a per-class count) so that ``"100"`` reads as "100 labels",
the x axis of a label-efficiency curve; per-class counts always carry ``/class``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np
import pandas as pd

from spcxr.data.splits import _greedy_assign, _group_strata

BUDGET_KINDS = ("all", "fraction", "per_class", "total")

_PER_CLASS = re.compile(r"^(\d+)\s*/\s*class$")
_PERCENT = re.compile(r"^(\d+(?:\.\d*)?|\.\d+)\s*%$")
_TOTAL = re.compile(r"^(\d+)(?:\s*images?)?$")
_FRACTION = re.compile(r"^(?:\d+\.\d*|\.\d+|\d+(?=e))(?:e-?\d+)?$")


@dataclass(frozen=True)
class Budget:
    """How many labelled training images a run may use (see the module docstring).

    Attributes:
        kind: ``"all"``, ``"fraction"``, ``"per_class"`` or ``"total"``.
        value: the fraction in (0, 1] (``"fraction"``), images per class (``"per_class"``) or
            images in total (``"total"``); ``None`` for ``"all"``.
    """

    kind: str
    value: float | int | None = None

    def __post_init__(self) -> None:
        if self.kind not in BUDGET_KINDS:
            raise ValueError(f"budget kind must be one of {BUDGET_KINDS}, got {self.kind!r}")
        if self.kind == "all":
            if self.value is not None:
                raise ValueError(f"budget 'all' takes no value, got {self.value!r}")
        elif self.kind == "fraction":
            if isinstance(self.value, bool) or not isinstance(self.value, (int, float)):
                raise ValueError(f"fraction budget needs a number, got {self.value!r}")
            if not 0 < self.value <= 1:
                raise ValueError(f"fraction budget must be in (0, 1], got {self.value}")
            object.__setattr__(self, "value", float(self.value))
        else:
            if isinstance(self.value, bool) or not isinstance(self.value, int) or self.value < 1:
                raise ValueError(f"{self.kind} budget needs an integer >= 1, got {self.value!r}")

    def __str__(self) -> str:
        """Readable label that :func:`parse_budget` reads back: ``10%``, ``20/class``, ..."""
        if self.kind == "all":
            return "all"
        if self.kind == "fraction":
            return f"{100 * self.value:.6g}%"
        if self.kind == "per_class":
            return f"{self.value}/class"
        return f"{self.value} images"

    @property
    def slug(self) -> str:
        """File-name-safe label: ``all``, ``pct10``, ``pct2_5``, ``20perclass``, ``n100``."""
        if self.kind == "all":
            return "all"
        if self.kind == "fraction":
            return "pct" + f"{100 * self.value:.6g}".replace(".", "_").replace("-", "m")
        if self.kind == "per_class":
            return f"{self.value}perclass"
        return f"n{self.value}"


def parse_budget(text: str | int | float | Budget) -> Budget:
    """Reads a budget: ``"all"``, ``"0.1"``/``0.1``, ``"10%"``, ``"20/class"``, ``"100"``/``100``.

    Args:
        text: the spelling (case and surrounding spaces ignored), a number, or a
            :class:`Budget` (returned as is).

    Returns:
        The :class:`Budget`.

    Raises:
        ValueError: an unknown spelling or a value out of range (the message lists the
            accepted spellings).
    """
    if isinstance(text, Budget):
        return text
    if isinstance(text, bool):
        raise ValueError(f"budget must be a string or number, got {text!r}")
    if isinstance(text, (int, np.integer)):
        return Budget("total", int(text))
    if isinstance(text, (float, np.floating)):
        return Budget("fraction", float(text))
    if not isinstance(text, str):
        raise ValueError(f"budget must be a string or number, got {type(text).__name__}")
    s = text.strip().lower()
    try:
        if s == "all":
            return Budget("all")
        if m := _PER_CLASS.match(s):
            return Budget("per_class", int(m.group(1)))
        if m := _PERCENT.match(s):
            return Budget("fraction", float(m.group(1)) / 100)
        if m := _TOTAL.match(s):
            return Budget("total", int(m.group(1)))
        if _FRACTION.match(s):
            return Budget("fraction", float(s))
    except ValueError as err:
        raise ValueError(f"budget {text!r}: {err}") from err
    raise ValueError(
        f"budget {text!r} not understood; use 'all', a fraction in (0, 1] ('0.1'), a percentage "
        "('10%'), images per class ('20/class') or images in total ('100')"
    )


def _check_frame(frame: pd.DataFrame, columns: tuple[str, ...], where: str) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(f"{where}: frame lacks column(s) {missing}; it has {list(frame.columns)}")
    if len(frame) == 0:
        raise ValueError(f"{where}: the frame has no rows")
    for column in columns:
        n_missing = int(frame[column].isna().sum())
        if n_missing:
            raise ValueError(
                f"{where}: {n_missing} of {len(frame)} rows have no value in column {column!r} "
                "(select labelled rows first, e.g. PreparedStore.indices(split, labelled=True))"
            )


def group_classes(
    frame: pd.DataFrame, label_col: str = "label", group_col: str = "group"
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Patient groups of the rows and the class of each group (its majority label).

    Group codes follow the sorted group ids, so they do not depend on the row order. Ties in
    the majority go to the label that sorts first.

    Args:
        frame: rows with ``label_col`` and ``group_col`` (no missing values).
        label_col: class label column.
        group_col: patient group column.

    Returns:
        ``(group_code, group_class, group_size, class_names)``: int64 ``[n_rows]`` group code
        of each row (0..G-1), int64 ``[G]`` class index of each group, int64 ``[G]`` images per
        group, and the sorted class names (every label present in the frame).
    """
    _check_frame(frame, (label_col, group_col), "group_classes")
    group_code, _ = pd.factorize(frame[group_col], sort=True)
    label_code, class_names = pd.factorize(frame[label_col], sort=True)
    n_groups, n_classes = int(group_code.max()) + 1, len(class_names)
    counts = np.zeros((n_groups, n_classes), dtype=np.int64)
    np.add.at(counts, (group_code, label_code), 1)
    group_class = counts.argmax(axis=1)  # first maximum: the label that sorts first
    return (
        group_code.astype(np.int64),
        group_class.astype(np.int64),
        counts.sum(axis=1),
        np.asarray(class_names),
    )


def _class_target(budget: Budget, class_images: int, total_images: int) -> int:
    """Images wanted from one class (before rounding up to whole patients).

    Round half up, and at least one image so that every class is represented; both are
    monotone in the budget's value, which keeps budgets nested.
    """
    if budget.kind == "all":
        return class_images
    if budget.kind == "per_class":
        return int(budget.value)
    share = budget.value if budget.kind == "fraction" else budget.value / total_images
    return max(1, math.floor(share * class_images + 0.5))


def select_budget(
    frame: pd.DataFrame,
    budget: Budget | str | int | float,
    *,
    seed: int,
    label_col: str = "label",
    group_col: str = "group",
) -> np.ndarray:
    """Positional indices of the rows a label budget keeps: whole patients, per class, nested.

    Each patient group belongs to the class of its majority label (:func:`group_classes`). The
    groups of every class are put in one random order (``numpy.random.default_rng(seed)``
    permutation of the sorted group ids, so the order does not depend on how the rows are
    sorted), and the budget keeps, per class, the shortest prefix of that order whose image
    count reaches the class's target:

    - fraction ``f``: ``round_half_up(f * n_c)`` of the class's ``n_c`` images, at least 1;
    - ``N/class``: ``N`` images;
    - ``N`` in total: ``round_half_up(N * n_c / n)`` images, at least 1 (so with fewer labels
      than classes, the total is exceeded rather than a class dropped);
    - ``all``: every row.

    Because whole patients are added, a class can overshoot its target by up to one patient's
    images minus one (a patient with 4 images may turn a target of 2 into 5). A target above
    the class's images takes the whole class. Images are counted per group, so a group's
    images all count towards its class, including any with another label.

    Since every budget keeps a per-class prefix of the same order, selections with one seed
    are nested: for any two budgets, within each class one selection contains the other (and
    budgets of one kind are nested outright as their value grows).

    Args:
        frame: the candidate rows, typically the labelled rows of the training split.
        budget: a :class:`Budget` or anything :func:`parse_budget` reads.
        seed: seed of the per-class patient order (repeats of a curve use different seeds).
        label_col: class label column.
        group_col: patient group column (the store's ``group``: patients merged with their
            duplicates, so duplicates never straddle the selection).

    Returns:
        Sorted int64 positional indices into ``frame``.

    Raises:
        ValueError: missing columns, missing values, an empty frame, or a class none of whose
            images belong to a patient group of that class (it could never be selected).
    """
    budget = parse_budget(budget)
    group_code, group_class, group_size, class_names = group_classes(frame, label_col, group_col)
    groups_per_class = np.bincount(group_class, minlength=len(class_names))
    empty = [str(c) for c, k in zip(class_names, groups_per_class, strict=True) if k == 0]
    if empty:
        raise ValueError(
            f"select_budget: class(es) {empty} of column {label_col!r} have no patient group of "
            f"their own (their images belong to patients whose majority label is another "
            f"class), so no budget can select them"
        )
    if budget.kind == "all":
        return np.arange(len(frame), dtype=np.int64)

    order = np.random.default_rng(seed).permutation(len(group_size))
    keep = np.zeros(len(group_size), dtype=bool)
    total = len(frame)
    for c in range(len(class_names)):
        members = order[group_class[order] == c]
        cumulative = np.cumsum(group_size[members])
        target = _class_target(budget, int(cumulative[-1]), total)
        # Shortest prefix whose image count reaches the target (all of them if none does).
        n_keep = min(int(np.searchsorted(cumulative, target, side="left")) + 1, len(members))
        keep[members[:n_keep]] = True
    return np.flatnonzero(keep[group_code]).astype(np.int64)


def kfold_groups(
    frame: pd.DataFrame,
    k: int,
    *,
    seed: int,
    label_col: str = "label",
    group_col: str = "group",
) -> np.ndarray:
    """Fold id per row: stratified group k-fold (each patient group in one fold).

    The same assignment the store uses for its ``fold`` column
    (:func:`spcxr.data.splits.assign_splits`), for a subset such as one source's labelled
    images: each group's stratum is its majority label, groups are visited in a seeded random
    order per stratum and each goes to the fold furthest below its share of that stratum's
    images, so class balance (in images) is roughly equal across folds. A stratum with at least
    ``k`` groups puts a group in every fold.

    Args:
        frame: the rows to fold.
        k: number of folds (2 .. number of groups).
        seed: seed of the assignment.
        label_col: stratification column (missing values form a stratum of their own).
        group_col: patient group column (no missing values).

    Returns:
        int64 ``[len(frame)]`` fold ids in 0..k-1.

    Raises:
        ValueError: missing columns, missing group ids, an empty frame, or ``k`` out of range.
    """
    missing = [c for c in (label_col, group_col) if c not in frame.columns]
    if missing:
        raise ValueError(
            f"kfold_groups: frame lacks column(s) {missing}; it has {list(frame.columns)}"
        )
    _check_frame(frame, (group_col,), "kfold_groups")
    group_code, _ = pd.factorize(frame[group_col], sort=True)
    n_groups = int(group_code.max()) + 1
    if not isinstance(k, (int, np.integer)) or not 2 <= k <= n_groups:
        raise ValueError(
            f"kfold_groups: k must be an integer in [2, {n_groups}] (the number of "
            f"patient groups), got {k!r}"
        )
    sizes = np.bincount(group_code, minlength=n_groups)
    strata = _group_strata(frame, group_code, label_col)
    group_fold = _greedy_assign(sizes, strata, np.ones(k), np.random.default_rng(seed))
    return group_fold[group_code].astype(np.int64)
