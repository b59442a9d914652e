"""Patient-level splits: groups, stratified train/val/test and k-fold assignment, leakage check.

METHOD.md section 3: split by patient, never by image, and deduplicate across sources first. A
*group* is a connected set of rows linked by a shared patient (``source:patient_id``) or by a
duplicate pair; every row of a group lands in the same split and the same fold.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from spcxr.data.dedup import connected_groups
from spcxr.data.records import SPLITS
from spcxr.errors import UsageError


class LeakageError(RuntimeError):
    """A patient group spans more than one split."""


@dataclass
class SplitConfig:
    """How rows are split.

    Attributes:
        mode: ``"random"`` (stratified by ``stratify``, grouped by patient) or ``"official"``
            (keep each source's official split where it has one; random for the rest; a
            validation split carved from official train by patient when a source has none).
        fractions: train / val / test fractions for random assignment (they must sum to 1).
        n_folds: number of folds of the k-fold assignment (stratified, grouped); 0 disables.
        stratify: manifest column to stratify on (``none`` for no stratification).
        seed: seed of the assignment.
        official_conflict: when a patient group spans official splits (a leak in the official
            split, e.g. a duplicate filed in both train and test), the whole group goes to
            the most held-out of its splits (``"held_out"``: test > val > train), or the
            store fails (``"fail"``).
        test_only: sources that are external test sets: every one of their rows goes to the
            test split, and so does every patient group that holds one of them (a duplicate of
            an external image in another source), so they are never trained, selected or
            pretrained on.
    """

    mode: str = "random"
    fractions: tuple[float, float, float] = (0.7, 0.1, 0.2)
    n_folds: int = 5
    stratify: str | None = "label"
    seed: int = 0
    official_conflict: str = "held_out"
    test_only: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.mode not in ("random", "official"):
            raise UsageError(f"--split-mode must be 'random' or 'official', got {self.mode!r}")
        fractions = tuple(self.fractions)
        if len(fractions) != 3 or min(fractions) < 0:
            raise UsageError(
                f"--split-fractions must be 3 non-negative numbers (train val test): {fractions}"
            )
        if abs(sum(fractions) - 1.0) > 1e-6:  # never renormalised behind the user's back
            raise UsageError(
                f"--split-fractions {' '.join(f'{f:g}' for f in fractions)} sum to "
                f"{sum(fractions):g}, not 1"
            )
        if self.n_folds < 0 or self.n_folds == 1:
            raise UsageError(f"--split-n-folds must be 0 (off) or >= 2, got {self.n_folds}")
        if isinstance(self.stratify, str) and self.stratify.strip().lower() in ("", "none", "null"):
            self.stratify = None
        if self.official_conflict not in ("held_out", "fail"):
            raise UsageError(
                "--split-official-conflict must be 'held_out' or 'fail', got "
                f"{self.official_conflict!r}"
            )


def patient_groups(manifest: pd.DataFrame, duplicate_group: np.ndarray | None = None) -> np.ndarray:
    """Group id per row: rows sharing ``source:patient_id`` or a duplicate group are one group."""
    n = len(manifest)
    keys = (manifest["source"].astype(str) + ":" + manifest["patient_id"].astype(str)).to_numpy()
    firsts, seconds = [], []
    for codes in (pd.factorize(keys)[0],) + (
        (duplicate_group,) if duplicate_group is not None else ()
    ):
        codes = np.asarray(codes, dtype=np.int64)
        valid = np.flatnonzero(codes >= 0)
        order = valid[np.argsort(codes[valid], kind="stable")]
        same = codes[order[1:]] == codes[order[:-1]]
        firsts.append(order[:-1][same])
        seconds.append(order[1:][same])
    return connected_groups(n, np.concatenate(firsts), np.concatenate(seconds))


def _group_strata(manifest: pd.DataFrame, groups: np.ndarray, stratify: str | None) -> np.ndarray:
    """One stratum per group: the most frequent value of ``stratify`` among its rows."""
    if stratify is None or stratify not in manifest.columns:
        return np.zeros(groups.max() + 1 if len(groups) else 0, dtype=np.int64)
    values = manifest[stratify].astype("string").fillna("<none>")
    frame = pd.DataFrame({"group": groups, "value": values.to_numpy()})
    counts = frame.value_counts(["group", "value"]).reset_index(name="n")
    counts = counts.sort_values(["group", "n", "value"], ascending=[True, False, True])
    top = counts.drop_duplicates("group").set_index("group")["value"]
    return pd.factorize(top.sort_index().to_numpy())[0]


def _greedy_assign(
    sizes: np.ndarray, strata: np.ndarray, targets: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """Assign groups to bins so each stratum's image counts follow ``targets`` (fractions).

    Groups are visited in random order (largest first within a tie-free shuffle would bias the
    result); each goes to the bin whose share of its stratum is furthest below its target.
    """
    assignment = np.full(len(sizes), -1, dtype=np.int64)
    order = rng.permutation(len(sizes))
    for stratum in np.unique(strata):
        members = order[strata[order] == stratum]
        total = sizes[members].sum()
        filled = np.zeros(len(targets))
        goal = targets / targets.sum() * total
        for g in members:
            deficit = goal - filled
            b = int(np.argmax(deficit))
            assignment[g] = b
            filled[b] += sizes[g]
    return assignment


def assign_splits(
    manifest: pd.DataFrame, groups: np.ndarray, config: SplitConfig
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Split and fold of every row, grouped by ``groups``.

    Returns:
        (split, fold, notes): ``split`` holds "train"/"val"/"test", ``fold`` 0..k-1 (or -1),
        ``notes`` lines for the report (e.g. official-split conflicts resolved).
    """
    if config.stratify is not None and config.stratify not in manifest.columns:
        raise UsageError(
            f"--split-stratify: no manifest column {config.stratify!r}; columns: "
            f"{', '.join(map(str, manifest.columns))}"
        )
    rng = np.random.default_rng(config.seed)
    n_groups = int(groups.max()) + 1 if len(groups) else 0
    sizes = np.bincount(groups, minlength=n_groups)
    strata = _group_strata(manifest, groups, config.stratify)
    notes: list[str] = []
    fractions = np.asarray(config.fractions, dtype=float)

    group_split = np.full(n_groups, -1, dtype=np.int64)
    external = manifest["source"].astype(str).isin(list(config.test_only)).to_numpy()
    external_groups = np.unique(groups[external])
    if len(external_groups):
        group_split[external_groups] = SPLITS.index("test")
        joined = int((np.isin(groups, external_groups) & ~external).sum())
        if joined:
            notes.append(
                f"{joined} rows of other sources share a patient group (duplicate) with a "
                f"test-only source ({', '.join(config.test_only)}): moved to test"
            )
    if config.mode == "official" and "official_split" in manifest.columns:
        official = manifest["official_split"].map({s: i for i, s in enumerate(SPLITS)})
        official = official.fillna(-1).to_numpy(np.int64)
        frame = pd.DataFrame({"group": groups, "official": official})
        held = frame[frame.official >= 0].groupby("group")["official"]
        most_held, least_held = held.max(), held.min()
        conflicts = most_held.index[most_held.to_numpy() != least_held.to_numpy()]
        if len(conflicts):
            if config.official_conflict == "fail":
                raise LeakageError(
                    f"{len(conflicts)} patient groups span official splits (e.g. groups "
                    f"{list(conflicts[:5])}); set official_conflict='held_out' to resolve"
                )
            rows = np.flatnonzero(np.isin(groups, conflicts) & (official >= 0))
            moved = int((official[rows] != most_held.reindex(groups[rows]).to_numpy()).sum())
            notes.append(
                f"{len(conflicts)} patient groups spanned official splits; {moved} rows moved "
                "to the group's most held-out split"
            )
        official_groups = most_held.index.to_numpy()
        free_official = group_split[official_groups] < 0
        group_split[official_groups[free_official]] = most_held.to_numpy()[free_official]
        # Official train without an official val: carve val out of it, by patient.
        has_val = (official == SPLITS.index("val")).any()
        if not has_val and fractions[1] > 0:
            train_groups = np.flatnonzero(group_split == 0)
            share = fractions[1] / (fractions[0] + fractions[1])
            pick = _greedy_assign(
                sizes[train_groups], strata[train_groups], np.array([1 - share, share]), rng
            )
            group_split[train_groups[pick == 1]] = 1
    free = np.flatnonzero(group_split < 0)
    if len(free):
        group_split[free] = _greedy_assign(sizes[free], strata[free], fractions, rng)

    group_fold = np.full(n_groups, -1, dtype=np.int64)
    if config.n_folds > 1:
        # External test sets take no part in cross-validation.
        inner = np.setdiff1d(np.arange(n_groups), external_groups)
        group_fold[inner] = _greedy_assign(
            sizes[inner], strata[inner], np.ones(config.n_folds), rng
        )

    split = np.array(SPLITS, dtype=object)[group_split[groups]]
    return split, group_fold[groups], notes


def check_leakage(manifest: pd.DataFrame, group_column: str = "group") -> None:
    """Raise :class:`LeakageError` if any patient group has rows in more than one split.

    Also checks the raw patient key (``source:patient_id``), so a store whose group column was
    edited by hand cannot hide a leak.
    """
    patient = manifest["source"].astype(str) + ":" + manifest["patient_id"].astype(str)
    frame = pd.DataFrame(
        {"group": manifest[group_column].to_numpy(), "patient": patient, "split": manifest["split"]}
    )
    for key, what in (("group", "patient groups"), ("patient", "patients")):
        n_splits = frame.groupby(key)["split"].nunique()
        leaking = n_splits.index[n_splits.to_numpy() > 1]
        if len(leaking):
            examples = []
            for k in leaking[:5]:
                rows = frame[frame[key] == k]
                who = (
                    f"group {k} (patients {', '.join(sorted(rows.patient.unique()))})"
                    if key == "group"
                    else k
                )
                examples.append(f"{who} in {sorted(rows.split.unique())}")
            raise LeakageError(
                f"{len(leaking)} {what} span several splits (leakage): " + "; ".join(examples)
            )
