"""Duplicate detection: candidate search by multi-index hashing, thumbnail verification."""

from __future__ import annotations

import numpy as np
import pandas as pd
from PIL import Image
from scipy.ndimage import gaussian_filter

from spcxr.data.dedup import (
    DedupConfig,
    candidate_pairs,
    connected_groups,
    find_duplicates,
    thumbnail,
)
from spcxr.data.prepare import fit_square, perceptual_hash, pixel_hash


def _brute_pairs(phash: np.ndarray, max_hamming: int) -> set[tuple[int, int]]:
    out = set()
    for i in range(len(phash)):
        for j in range(i + 1, len(phash)):
            if int(np.bitwise_count(phash[i] ^ phash[j])) <= max_hamming:
                out.add((i, j))
    return out


def test_candidate_pairs_equal_brute_force() -> None:
    rng = np.random.default_rng(0)
    base = rng.integers(0, 2**63, size=60, dtype=np.int64).astype(np.uint64)
    # Add close variants: flip 1..8 random bits of some hashes.
    variants = []
    for k in range(60):
        h = base[k % 60]
        for bit in rng.choice(64, size=int(rng.integers(1, 9)), replace=False):
            h ^= np.uint64(1) << np.uint64(bit)
        variants.append(h)
    phash = np.concatenate([base, np.array(variants, dtype=np.uint64)])
    for max_hamming in (0, 3, 6, 8):
        a, b = candidate_pairs(phash, max_hamming)
        assert set(zip(a.tolist(), b.tolist(), strict=True)) == _brute_pairs(phash, max_hamming)


def test_connected_groups() -> None:
    labels = connected_groups(6, np.array([0, 1, 4]), np.array([1, 2, 5]))
    assert labels[0] == labels[1] == labels[2]
    assert labels[4] == labels[5]
    assert len(set(labels.tolist())) == 3


def _film(rng: np.random.Generator, size: int = 200) -> np.ndarray:
    """A smooth random 'radiograph' in [0, 1]."""
    img = gaussian_filter(rng.random((size, size)), 6)
    img = (img - img.min()) / (img.max() - img.min())
    return img.astype(np.float32)


def _rows(images: list[np.ndarray], patients: list[str]) -> tuple[pd.DataFrame, np.ndarray]:
    stored, rows = [], []
    for img, patient in zip(images, patients, strict=True):
        u8, box = fit_square(img, 128)
        stored.append(u8)
        rows.append(
            {
                "source": "s",
                "patient_id": patient,
                "pixel_hash": pixel_hash(img),
                "phash": perceptual_hash(u8, box),
                "box_top": box[0],
                "box_left": box[1],
                "box_height": box[2],
                "box_width": box[3],
            }
        )
    return pd.DataFrame(rows), np.stack(stored)


def test_find_duplicates_exact_near_and_distinct() -> None:
    rng = np.random.default_rng(1)
    a, b, c = _film(rng), _film(rng), _film(rng)
    # Near duplicates of `a`: re-windowed (gamma) and re-sized + re-quantised to 8 bits.
    a_gamma = a**1.3
    a_small = np.asarray(Image.fromarray((a * 255).astype(np.uint8)).resize((150, 150)), np.float32)
    a_small /= 255.0
    # "Another film of the same patient": the same anatomy shifted and with new noise.
    b_follow_up = np.roll(b, 12, axis=1) * 0.9 + 0.1 * _film(rng)
    images = [a, a.copy(), a_gamma, a_small, b, b_follow_up, c]
    patients = ["p1", "p2", "p3", "p4", "p5", "p5", "p6"]
    manifest, stored = _rows(images, patients)
    pairs, group, _ = find_duplicates(manifest, lambda idx: stored[idx], DedupConfig())
    found = {(int(r.a), int(r.b)): r.kind for r in pairs.itertuples()}
    assert found[(0, 1)] == "exact"
    for i, j in ((0, 2), (0, 3), (1, 2), (1, 3), (2, 3)):
        assert found[(i, j)] == "near", (i, j)
    assert (4, 5) not in found  # different films of one patient are not duplicates
    assert group[0] == group[1] == group[2] == group[3] >= 0
    assert group[4] == group[5] == group[6] == -1


def test_thumbnail_is_contrast_invariant() -> None:
    rng = np.random.default_rng(2)
    u8 = (_film(rng) * 255).astype(np.uint8)
    t1 = thumbnail(u8)
    t2 = thumbnail((np.sqrt(u8 / 255.0) * 255).astype(np.uint8))
    assert float(t1 @ t2) > 0.99
    assert abs(float(np.linalg.norm(t1)) - 1) < 1e-5


def test_candidate_budget_lowers_threshold_and_says_so() -> None:
    rng = np.random.default_rng(3)
    images = [_film(rng, 64) for _ in range(30)]
    manifest, stored = _rows(images, [f"p{i}" for i in range(30)])
    _, _, notes = find_duplicates(manifest, lambda idx: stored[idx], DedupConfig(max_candidates=0))
    assert notes and "lowered max_hamming 6 ->" in notes[0]
