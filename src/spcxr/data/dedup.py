"""Duplicate detection across every source of a store: exact (same pixels) and near (perceptual).

Public CXR collections share many images (the COVID collections copy each other; the ieee8023 set
files some identical images under two patient ids; Kermany repeats images inside one patient).
A duplicate that lands on both sides of a split inflates every test number, so duplicate groups
are merged into one patient group before splitting (METHOD.md section 3).

Two stages:

1. Exact: identical native pixel hashes.
2. Near: candidate pairs whose 64-bit perceptual hashes (DCT pHash of the stored image) differ in
   at most ``max_hamming`` bits, found without comparing all pairs by multi-index hashing (split
   the hash into ``max_hamming + 1`` bands; by the pigeonhole principle two hashes within the
   distance agree exactly on at least one band). Each candidate is then verified on a 32 x 32
   histogram-equalised thumbnail: Pearson correlation >= ``min_corr``. pHash alone is too coarse
   for radiographs (different chest films of one patient, or of two patients, often sit within a
   few bits); the thumbnail check separates "same film, re-encoded" (~1.0) from "another film of
   the same patient" (<= ~0.96 on the shared ieee8023 data).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd
from PIL import Image
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

THUMB = 32


@dataclass
class DedupConfig:
    """Settings of duplicate detection.

    Attributes:
        max_hamming: largest pHash distance (bits of 64) for a near-duplicate candidate.
        min_corr: smallest thumbnail correlation for a candidate to count as a duplicate.
        max_candidates: budget of candidate pairs; above it ``max_hamming`` is lowered (and the
            report says so) so that a store of millions of images stays tractable.
    """

    max_hamming: int = 6
    min_corr: float = 0.98
    max_candidates: int = 50_000_000


def connected_groups(n: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Connected-component id of each of ``n`` nodes, given undirected edges ``a[k] - b[k]``."""
    graph = coo_matrix((np.ones(len(a), dtype=np.int8), (a, b)), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    return labels.astype(np.int64)


def thumbnail(image_u8: np.ndarray, box: tuple[int, int, int, int] | None = None) -> np.ndarray:
    """Histogram-equalised, zero-mean, unit-norm 32 x 32 thumbnail of an image's content box.

    ``box`` is (top, left, height, width) of the image content inside the padded store image.
    Equalisation (a rank transform) makes the comparison blind to window / contrast changes.
    """
    if box is not None:
        top, left, height, width = box
        image_u8 = image_u8[top : top + height, left : left + width]
    small = np.asarray(
        Image.fromarray(image_u8).resize((THUMB, THUMB), Image.Resampling.BILINEAR), np.float32
    ).ravel()
    ranks = np.empty_like(small)
    ranks[np.argsort(small, kind="stable")] = np.arange(small.size, dtype=np.float32)
    ranks -= ranks.mean()
    return ranks / max(float(np.linalg.norm(ranks)), 1e-6)


def _band_masks(max_hamming: int) -> list[np.uint64]:
    bands = max_hamming + 1
    edges = np.linspace(0, 64, bands + 1).round().astype(int)
    return [np.uint64(((1 << int(hi - lo)) - 1) << int(lo)) for lo, hi in itertools.pairwise(edges)]


def _pairs_sharing_key(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """All pairs (i < j) of positions whose ``keys`` are equal, vectorised per offset."""
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    firsts, seconds = [], []
    offset = 1
    while offset < len(order):
        same = sorted_keys[offset:] == sorted_keys[:-offset]
        if not same.any():
            break
        a, b = order[:-offset][same], order[offset:][same]
        firsts.append(np.minimum(a, b))
        seconds.append(np.maximum(a, b))
        offset += 1
    if not firsts:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty
    return np.concatenate(firsts), np.concatenate(seconds)


def _count_bucket_pairs(keys: np.ndarray) -> int:
    _, counts = np.unique(keys, return_counts=True)
    return int((counts * (counts - 1) // 2).sum())


def candidate_pairs(phash: np.ndarray, max_hamming: int) -> tuple[np.ndarray, np.ndarray]:
    """Pairs (i < j) with Hamming(phash[i], phash[j]) <= max_hamming, by multi-index hashing."""
    phash = np.asarray(phash, dtype=np.uint64)
    firsts, seconds = [], []
    for band in _band_masks(max_hamming):
        a, b = _pairs_sharing_key(phash & band)
        firsts.append(a)
        seconds.append(b)
    a = np.concatenate(firsts)
    b = np.concatenate(seconds)
    if len(a) == 0:
        return a, b
    n = np.int64(len(phash))
    unique = np.unique(a * n + b)
    a, b = unique // n, unique % n
    distance = np.bitwise_count(phash[a] ^ phash[b])
    keep = distance <= max_hamming
    return a[keep], b[keep]


def find_duplicates(
    manifest: pd.DataFrame,
    load_images: Callable[[np.ndarray], np.ndarray],
    config: DedupConfig | None = None,
) -> tuple[pd.DataFrame, np.ndarray, list[str]]:
    """Find exact and near-duplicate pairs among the manifest's rows.

    Args:
        manifest: rows with ``pixel_hash``, ``phash`` (uint64 as int64), and the content box
            columns ``box_top``, ``box_left``, ``box_height``, ``box_width``.
        load_images: ``f(indices) -> uint8 [n, S, S]`` reading stored images.
        config: thresholds.

    Returns:
        (pairs, group, notes): ``pairs`` has one row per duplicate pair (a, b, kind, hamming,
        corr); ``group`` gives each manifest row a duplicate-group id (-1 when unique);
        ``notes`` lists anything the report should say (e.g. a lowered threshold).
    """
    config = config or DedupConfig()
    n = len(manifest)
    notes: list[str] = []
    records: list[tuple[int, int, str, int, float]] = []

    # 1. exact duplicates: identical native pixels.
    hashes = manifest["pixel_hash"].to_numpy()
    a_exact, b_exact = _pairs_sharing_key(pd.factorize(hashes)[0].astype(np.int64))
    phash = manifest["phash"].to_numpy().astype(np.int64).view(np.uint64)
    for a, b in zip(a_exact.tolist(), b_exact.tolist(), strict=True):
        records.append((a, b, "exact", int(np.bitwise_count(phash[a] ^ phash[b])), 1.0))
    exact_set = set(zip(a_exact.tolist(), b_exact.tolist(), strict=True))

    # 2. near duplicates: pHash candidates verified on equalised thumbnails.
    max_hamming = config.max_hamming
    while max_hamming > 0:
        budget = sum(_count_bucket_pairs(phash & band) for band in _band_masks(max_hamming))
        if budget <= config.max_candidates:
            break
        max_hamming -= 1
    if max_hamming != config.max_hamming:
        notes.append(
            f"near-duplicate search lowered max_hamming {config.max_hamming} -> {max_hamming} "
            f"to stay within {config.max_candidates:,} candidate pairs"
        )
    a_near, b_near = candidate_pairs(phash, max_hamming)
    fresh = [
        (a, b)
        for a, b in zip(a_near.tolist(), b_near.tolist(), strict=True)
        if (a, b) not in exact_set
    ]
    if fresh:
        involved = np.unique(np.array(fresh, dtype=np.int64).ravel())
        images = load_images(involved)
        boxes = manifest[["box_top", "box_left", "box_height", "box_width"]].to_numpy()
        thumbs = {
            int(i): thumbnail(img, tuple(boxes[i])) for i, img in zip(involved, images, strict=True)
        }
        for a, b in fresh:
            corr = float(thumbs[a] @ thumbs[b])
            if corr >= config.min_corr:
                records.append((a, b, "near", int(np.bitwise_count(phash[a] ^ phash[b])), corr))

    pairs = pd.DataFrame(records, columns=["a", "b", "kind", "hamming", "corr"])
    group = np.full(n, -1, dtype=np.int64)
    if len(pairs):
        ends = pairs[["a", "b"]].to_numpy(np.int64)
        labels = connected_groups(n, ends[:, 0], ends[:, 1])
        members = np.unique(pairs[["a", "b"]].to_numpy().ravel())
        _, dense = np.unique(labels[members], return_inverse=True)
        group[members] = dense
        pairs["group"] = group[pairs["a"].to_numpy()]
    else:
        pairs["group"] = pd.Series(dtype=np.int64)
    return pairs, group, notes
