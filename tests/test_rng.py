"""Tests of the counter-based step randomness (spcxr.rng.BatchRandom, hash32)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from spcxr.rng import BatchRandom, derive_seed, hash32


def _lowbias32(x: int) -> int:
    """C. Wellons' lowbias32 on unsigned 32-bit integers, in plain Python integers."""
    x &= 0xFFFFFFFF
    x ^= x >> 16
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    x ^= x >> 16
    return x


def _signed(x: int) -> int:
    return x - (1 << 32) if x >= 1 << 31 else x


def _halves(
    seed: int, step: int, n_views: int, batch: int
) -> tuple[BatchRandom, list[BatchRandom]]:
    """One process holding ``batch`` images, and two processes holding half each."""
    full = BatchRandom.for_views(
        seed, step, n_views=n_views, global_batch=batch, first_image=0, local_batch=batch
    )
    half = batch // 2
    parts = [
        BatchRandom.for_views(
            seed, step, n_views=n_views, global_batch=batch, first_image=p * half, local_batch=half
        )
        for p in range(2)
    ]
    return full, parts


# --- hash32 ----------------------------------------------------------------------------------


def test_hash32_matches_the_reference_lowbias32() -> None:
    edge = [0, 1, 2, 2**31 - 1, -1, -(2**31), 0x7FEB352D, -0x7B935975, 12345, -98765]
    rng = np.random.default_rng(0)
    values = edge + rng.integers(-(2**31), 2**31, size=2000).tolist()
    got = hash32(torch.tensor(values, dtype=torch.int32))
    assert got.dtype == torch.int32
    expected = [_signed(_lowbias32(v)) for v in values]
    assert got.tolist() == expected
    assert _lowbias32(0) == 0 and _lowbias32(1) != 1  # 0 is lowbias32's fixed point


def test_hash32_is_a_bijection_on_a_range_and_mixes_bits() -> None:
    words = hash32(torch.arange(1 << 16, dtype=torch.int32))
    assert len(torch.unique(words)) == 1 << 16  # a permutation of int32: no collisions
    # Avalanche: flipping input bit 0 flips each output bit about half of the time.
    flipped = hash32(torch.arange(1 << 16, dtype=torch.int32) ^ 1)
    diff = (words ^ flipped).long() & 0xFFFFFFFF
    bits = ((diff[:, None] >> torch.arange(32)) & 1).double().mean(0)
    assert bits.min() > 0.45 and bits.max() < 0.55


# --- normal() --------------------------------------------------------------------------------


def test_normal_is_standard_gaussian() -> None:
    rnd = BatchRandom.local(0, 0, 64)
    z = rnd.normal("test/noise", 3, 41, 43)  # odd element count: the last pair is half used
    assert z.shape == (64, 3, 41, 43) and z.dtype == torch.float32
    x = z.double().flatten().numpy()
    n = x.size
    assert abs(x.mean()) < 4 / math.sqrt(n)
    assert abs(x.std() - 1) < 4 / math.sqrt(2 * n)
    assert abs(stats.kurtosis(x)) < 4 * math.sqrt(24 / n)  # excess kurtosis 0
    assert abs(stats.skew(x)) < 4 * math.sqrt(6 / n)
    assert stats.kstest(x, "norm").pvalue > 1e-3
    assert np.abs(x).max() < 5.8  # 23-bit uniforms cut the tails at about 5.7 sigma
    assert np.abs(x).max() > 4.0


def test_normal_has_no_correlation_between_neighbours() -> None:
    rnd = BatchRandom.local(1, 2, 256)
    z = rnd.normal("test/noise", 32, 32).double()  # [V, 32, 32]
    flat = z.flatten(1)  # [V, 1024]
    pairs = flat.shape[1] // 2
    neighbours = {
        "next column": (z[:, :, :-1], z[:, :, 1:]),
        "next row": (z[:, :-1, :], z[:, 1:, :]),
        "next view": (z[:-1], z[1:]),
        "cos and sin of one pair": (flat[:, :pairs], flat[:, pairs:]),
    }
    for name, (a, b) in neighbours.items():
        a, b = a.flatten(), b.flatten()
        limit = 5 / math.sqrt(a.numel())
        r = torch.corrcoef(torch.stack([a, b]))[0, 1]
        assert abs(r) < limit, name
        # No dependence through the magnitude either (e.g. a shared Box-Muller radius).
        r2 = torch.corrcoef(torch.stack([a**2, b**2]))[0, 1]
        assert abs(r2) < limit, name


# --- pair_rand() and rand() ------------------------------------------------------------------


def test_uniforms_are_uniform() -> None:
    rnd = BatchRandom.local(3, 4, 300)
    pairs = rnd.pair_rand("test/pairs")
    assert pairs.shape == (300, 300) and pairs.dtype == torch.float32
    assert pairs.min() > 0 and pairs.max() < 1
    assert stats.kstest(pairs.flatten().numpy(), "uniform").pvalue > 1e-3
    assert len(torch.unique(pairs)) > 0.99 * pairs.numel()
    assert not torch.allclose(pairs, pairs.T)  # ordered pairs: (i, j) and (j, i) differ
    u = rnd.rand("test/u", 100)
    assert u.shape == (300, 100) and stats.kstest(u.flatten().numpy(), "uniform").pvalue > 1e-3
    k = rnd.randint("test/k", -2, 5, 10)
    assert k.dtype == torch.int64 and k.shape == (300, 10)
    counts = torch.bincount(k.flatten() + 2, minlength=7)
    assert len(counts) == 7 and stats.chisquare(counts.numpy()).pvalue > 1e-3


# --- independence of the process split -------------------------------------------------------


def test_for_views_layout() -> None:
    rnd = BatchRandom.for_views(0, 0, n_views=2, global_batch=6, first_image=3, local_batch=3)
    assert rnd.index.tolist() == [3, 4, 5, 9, 10, 11] and rnd.total == 12 and rnd.count == 6
    one = BatchRandom.for_views(0, 0, n_views=2, global_batch=6, first_image=0, local_batch=6)
    assert torch.equal(one.index, BatchRandom.local(0, 0, 12).index)


def test_two_halves_draw_the_rows_of_the_full_batch() -> None:
    full, parts = _halves(seed=7, step=3, n_views=3, batch=10)
    u = full.rand("test/u", 4, 2)
    f64 = full.rand("test/u64", 5, dtype=torch.float64)
    k = full.randint("test/k", 0, 9, 3)
    z = full.normal("test/z", 2, 5, 7)
    p = full.pair_rand("test/p")
    covered = torch.cat([part.index for part in parts])
    assert torch.equal(covered.sort().values, torch.arange(30))  # every view exactly once
    for part in parts:
        idx = part.index
        assert torch.equal(part.rand("test/u", 4, 2), u[idx])
        assert torch.equal(part.rand("test/u64", 5, dtype=torch.float64), f64[idx])
        assert torch.equal(part.randint("test/k", 0, 9, 3), k[idx])
        assert torch.equal(part.normal("test/z", 2, 5, 7), z[idx])
        assert torch.equal(part.pair_rand("test/p"), p[idx][:, idx])


@pytest.mark.parametrize("draw", ["rand", "normal", "pair_rand"])
def test_seeds_steps_and_streams_differ_and_reproduce(draw: str) -> None:
    def values(seed: int, step: int, stream: str) -> torch.Tensor:
        rnd = BatchRandom.local(seed, step, 16)
        if draw == "rand":
            return rnd.rand(stream, 32)
        if draw == "normal":
            return rnd.normal(stream, 32)
        return rnd.pair_rand(stream)

    base = values(11, 5, "a")
    assert torch.equal(base, values(11, 5, "a"))  # a fresh BatchRandom redraws the same
    torch.manual_seed(0)  # the global RNG plays no part
    assert torch.equal(base, values(11, 5, "a"))
    for other in (values(12, 5, "a"), values(11, 6, "a"), values(11, 5, "b")):
        assert other.shape == base.shape
        assert (other != base).double().mean() > 0.99  # unrelated, not shifted copies
    # Views of one batch differ from each other.
    assert (base[1:] != base[:-1]).double().mean() > 0.99


def test_derive_seed_is_stable_and_63_bit() -> None:
    seeds = {derive_seed(s, t, name) for s in range(4) for t in range(4) for name in "ab"}
    assert len(seeds) == 32 and all(0 <= x < 2**63 for x in seeds)
    assert derive_seed(1, 2, "x") == derive_seed(1, 2, "x") != derive_seed(1, 2, "y")


def test_normal_views_never_share_shifted_noise() -> None:
    """No two views carry (shifted) copies of one noise sequence: values are ~all distinct."""
    z = BatchRandom.local(seed=5, step=11, count=512).normal("mask/noise", 4096).numpy()
    # Pairs of neighbouring values as one 64-bit key: a chance repeat is very rare, while a
    # shifted copy of a sequence repeats thousands of pairs.
    pairs = np.stack([z[:, :-1], z[:, 1:]], axis=-1).astype(np.float32).view(np.int64).ravel()
    repeated = pairs.size - np.unique(pairs).size
    assert repeated < 10


def test_normal_is_not_shifted_for_views_with_close_words(monkeypatch) -> None:
    """Adversarial case: two views whose hashed words differ by 2 get unrelated noise."""
    rnd = BatchRandom.local(seed=0, step=0, count=2)
    monkeypatch.setattr(
        BatchRandom,
        "_view_words",
        lambda self, stream: torch.tensor([1000, 1002], dtype=torch.int32),
    )
    z = rnd.normal("mask/noise", 2048).numpy()
    shared = np.intersect1d(z[0], z[1]).size
    assert shared < 5, f"{shared} values of view 0 reappear in view 1"
