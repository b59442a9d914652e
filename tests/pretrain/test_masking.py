"""Tests of GMML group masking and corruption (spcxr.pretrain.masking)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import pytest
import torch
from scipy import stats
from torch.utils._python_dispatch import TorchDispatchMode

from spcxr.pretrain.masking import (
    KINDS,
    Corrupted,
    MaskingConfig,
    _pick_donors,
    block_cells,
    corrupt,
    first_cover,
    group_mask,
    sample_group_masks,
    sample_rectangles,
)
from spcxr.rng import BatchRandom

NOISE, ZEROS, COPY, REPLACE = (KINDS.index(k) for k in ("noise", "zeros", "copy", "replace"))


def _gen(seed: int = 0) -> torch.Generator:
    """Generator for test fixtures (not for the code under test)."""
    return torch.Generator().manual_seed(seed)


def _rnd(n: int, seed: int = 0, step: int = 0, device: str = "cpu") -> BatchRandom:
    return BatchRandom.local(seed, step, n, device)


def _rasterise(rects: torch.Tensor, count: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Union of the first ``count[v]`` pixel rectangles of each view.

    An independent method: +-1 at the four corners of each rectangle in a 2-D difference array,
    then a cumulative sum over both axes gives how many rectangles cover each pixel.
    """
    n, total, _ = rects.shape
    top, left, h, w = rects.unbind(-1)  # [n, R]
    weight = (torch.arange(total)[None, :] < count[:, None]).long()
    diff = torch.zeros(n, (height + 1) * (width + 1), dtype=torch.long)
    corners = ((top, left, 1), (top, left + w, -1), (top + h, left, -1), (top + h, left + w, 1))
    for row, col, sign in corners:
        diff.scatter_add_(1, row * (width + 1) + col, sign * weight)
    cover = diff.view(n, height + 1, width + 1).cumsum(1).cumsum(2)
    return cover[:, :height, :width] > 0


def _views(n: int, channels: int, size: int, seed: int = 1) -> torch.Tensor:
    # Values far from 0 and from N(0, 1) draws, so a corrupted pixel can never equal its input.
    # float64, so that two different input pixels never hold the same value either.
    return 10.0 + torch.rand(n, channels, size, size, generator=_gen(seed), dtype=torch.float64)


# --- targets and masks ---------------------------------------------------------------------


def test_target_fraction_is_uniform_on_the_reference_range() -> None:
    n = 2000
    cfg = MaskingConfig(replace=False)
    out = corrupt(_views(n, 1, 16), torch.arange(n), cfg, _rnd(n))
    a = out.target.double()
    assert a.min() >= 0.5 and a.max() <= 0.75
    assert a.min() < 0.502 and a.max() > 0.748
    assert stats.kstest(a.numpy(), stats.uniform(loc=0.5, scale=0.25).cdf).pvalue > 1e-3

    low = corrupt(_views(64, 1, 16), torch.arange(64), MaskingConfig(max_fraction=0.4), _rnd(64))
    assert torch.all(low.target[low.kind != REPLACE] == torch.tensor(0.4))  # U(0.4, 0.4)


@pytest.mark.parametrize(
    ("height", "width", "align", "n"),
    [(64, 64, 1, 1000), (96, 96, 8, 500), (160, 112, 16, 500), (100, 90, 16, 300)],
)
def test_mask_is_the_smallest_union_of_rectangles_reaching_the_target(
    height: int, width: int, align: int, n: int
) -> None:
    cfg = MaskingConfig(align=align)
    fractions = 0.5 + 0.25 * torch.rand(n, generator=_gen(5))
    out = sample_group_masks(n, height, width, fractions, cfg, _rnd(n), "cpu")
    assert out.mask.shape == (n, height, width) and out.mask.dtype == torch.bool
    # The mask is exactly the union of the first K rectangles ...
    assert torch.equal(out.mask, _rasterise(out.rects, out.used, height, width))
    # ... reaches the target ...
    need = fractions.double() * height * width
    area = out.mask.sum((1, 2)).double()
    assert torch.all(area >= need)
    assert torch.all(area / (height * width) >= fractions.double())
    # ... and K is minimal: K - 1 rectangles fall short.
    shorter = _rasterise(out.rects, out.used - 1, height, width).sum((1, 2)).double()
    assert torch.all(shorter < need)
    overshoot = area / (height * width) - fractions.double()
    max_block = block_cells(height, cfg) * block_cells(width, cfg) * align**2 / (height * width)
    assert overshoot.max() < max_block  # less than one block
    assert overshoot.mean() < 0.02
    print(
        f"{height}x{width} align {align}: overshoot mean {overshoot.mean():.4f} "
        f"max {overshoot.max():.4f}, rectangles mean {out.used.float().mean():.1f} "
        f"max {int(out.used.max())}, rounds {out.rounds}"
    )


def test_group_mask_handles_zero_targets_and_more_than_one_round() -> None:
    fractions = torch.tensor([0.0, 0.9, 0.3, 0.0])
    cfg = MaskingConfig()
    out = sample_group_masks(4, 32, 32, fractions, cfg, _rnd(4), "cpu")
    assert out.used[0] == 0 and out.used[3] == 0 and not out.mask[[0, 3]].any()
    assert out.used[1] > 62 and out.rounds >= 2  # 0.9 of 32x32 needs well over 62 blocks
    masks = group_mask(4, 32, 32, fractions, cfg, _rnd(4), "cpu")
    assert torch.equal(masks, out.mask)
    # Round r uses the rectangles of stream "mask/rect/round{r}", rows of unfinished views only.
    for r in range(out.rounds):
        drawn = sample_rectangles(62, 32, 32, cfg, _rnd(4), f"mask/rect/round{r}")
        active = out.used > 62 * r
        assert torch.equal(out.rects[active, 62 * r : 62 * (r + 1)], drawn[active])
        assert not out.rects[~active, 62 * r : 62 * (r + 1)].any()  # padding


@pytest.mark.parametrize(("size", "align"), [(96, 1), (224, 16)])
def test_blocks_are_snapped_and_smaller_than_max_block(size: int, align: int) -> None:
    cfg = MaskingConfig(align=align)
    limit = cfg.max_block * size
    drawn = sample_rectangles(62, size, size, cfg, _rnd(1000)) * align
    fractions = 0.5 + 0.25 * torch.rand(1000, generator=_gen(3))
    out = sample_group_masks(1000, size, size, fractions, cfg, _rnd(1000), "cpu")
    used = torch.arange(out.rects.shape[1])[None, :] < out.used[:, None]
    for rects in (drawn.reshape(-1, 4), out.rects[used]):
        top, left, h, w = rects.unbind(-1)
        for side in (h, w):
            assert side.min() >= align and side.max() < limit
        assert torch.all(rects % align == 0)
        assert top.min() >= 0 and torch.all(top + h <= size)
        assert left.min() >= 0 and torch.all(left + w <= size)
    # Every grid cell is a possible corner, every allowed size occurs (before clipping, sizes
    # are uniform, so the largest ones survive clipping often enough to be seen).
    cells = size // align
    top, left, h, w = drawn.reshape(-1, 4).unbind(-1)
    assert torch.equal(torch.unique(top), torch.arange(cells) * align)
    assert torch.equal(torch.unique(left), torch.arange(cells) * align)
    sizes = torch.arange(1, block_cells(size, cfg) + 1) * align
    assert torch.equal(torch.unique(h), sizes) and torch.equal(torch.unique(w), sizes)
    assert sizes[-1] == align * (math.ceil(limit / align) - 1)  # the largest multiple < limit
    # Corners are uniform over the grid; sizes are uniform where clipping cannot reach them.
    for corner in (top, left):
        counts = torch.bincount(corner // align, minlength=cells).double()
        assert stats.chisquare(counts.numpy()).pvalue > 1e-4
    k = block_cells(size, cfg)
    for corner, side in ((top, h), (left, w)):
        unclipped = corner // align + k <= cells
        counts = torch.bincount(side[unclipped] // align - 1, minlength=k).double()
        assert stats.chisquare(counts.numpy()).pvalue > 1e-4


def test_first_cover_matches_brute_force() -> None:
    n, count, height, width = 50, 62, 20, 24
    gen = _gen(7)
    top = torch.randint(0, height, (n, count), generator=gen)
    left = torch.randint(0, width, (n, count), generator=gen)
    h = torch.minimum(torch.randint(1, 8, (n, count), generator=gen), height - top)
    w = torch.minimum(torch.randint(1, 8, (n, count), generator=gen), width - left)
    rects = torch.stack([top, left, h, w], -1)
    expected = torch.full((n, height, width), 62, dtype=torch.int32)
    for j in reversed(range(count)):  # paint the last rectangle first, so the first one wins
        box = _rasterise(rects[:, j : j + 1], torch.ones(n, dtype=torch.int64), height, width)
        expected[box] = j
    got = first_cover(rects, height, width)
    assert torch.equal(got, expected)
    assert set(torch.unique(got).tolist()) == set(range(63))  # every bit index, sentinel too


# --- corruptions ---------------------------------------------------------------------------


@pytest.mark.parametrize("corruptions", [("noise",), ("zeros",), ("copy",), ("noise", "copy")])
def test_corruption_is_confined_to_the_mask(corruptions: tuple[str, ...]) -> None:
    views = _views(200, 3, 32)
    cfg = MaskingConfig(corruptions=corruptions)
    out = corrupt(views, torch.arange(200) // 2, cfg, _rnd(200))
    assert out.images.shape == views.shape and out.images.dtype == views.dtype
    assert out.mask.shape == (200, 1, 32, 32) and out.mask.dtype == torch.bool
    mask = out.mask.expand_as(views)
    assert torch.equal(out.images[~mask], views[~mask])
    assert torch.all(out.images[mask] != views[mask])  # every masked pixel was changed
    area = out.mask.double().mean((1, 2, 3))
    assert torch.all(area >= out.target.double())


def test_noise_is_gaussian_with_the_configured_std() -> None:
    views = _views(1000, 1, 32)
    cfg = MaskingConfig(noise_std=2.0, replace=False)
    out = corrupt(views, torch.arange(1000), cfg, _rnd(1000))
    assert torch.all(out.kind == NOISE)
    values = out.images[out.mask.expand_as(views)].double()
    assert values.numel() > 500_000
    assert abs(values.mean()) < 0.01
    assert abs(values.std() / 2.0 - 1.0) < 0.01
    assert abs(stats.kurtosis(values.numpy())) < 0.05  # Gaussian tails, not uniform


def test_noise_is_the_views_rows_of_the_noise_stream() -> None:
    # Noise is computed for the noise views only, but equals their rows of the full draw.
    views = _views(120, 2, 24)
    cfg = MaskingConfig(corruptions=("noise", "zeros", "copy"), noise_std=0.5)
    rnd = _rnd(120, seed=9, step=4)
    out = corrupt(views, torch.arange(120) // 2, cfg, rnd)
    noisy = out.kind == NOISE
    assert 10 < noisy.sum() < 60
    expected = (0.5 * rnd.normal("mask/noise", 2, 24, 24)).double()
    mask = out.mask.expand_as(views) & noisy[:, None, None, None]
    assert torch.equal(out.images[mask], expected[mask])


def test_zeros_are_exactly_zero() -> None:
    views = _views(300, 3, 32)
    out = corrupt(
        views, torch.arange(300), MaskingConfig(corruptions=("zeros",), replace=False), _rnd(300)
    )
    assert torch.all(out.kind == ZEROS)
    masked = out.images[out.mask.expand_as(views)]
    assert torch.all(masked == 0) and not torch.signbit(masked).any()


@pytest.mark.parametrize("align", [1, 16])
def test_copy_is_the_same_view_shifted_by_the_documented_offset(align: int) -> None:
    size = 64
    views = _views(300, 2, size)
    cfg = MaskingConfig(corruptions=("copy",), replace=False, align=align)
    out = corrupt(views, torch.arange(300), cfg, _rnd(300))
    assert torch.all(out.kind == COPY)
    dy, dx = out.shift.unbind(1)
    cells, margin = size // align, min(block_cells(size, cfg), (size // align) // 2)
    for d in (dy, dx):
        assert torch.all(d % align == 0)
        assert d.min() >= margin * align and d.max() <= (cells - margin) * align
    possible = (cells - 2 * margin + 1) ** 2
    assert len(torch.unique(out.shift, dim=0)) >= min(50, possible)  # offsets vary per view
    for v in range(300):
        source = torch.roll(views[v], shifts=(-int(dy[v]), -int(dx[v])), dims=(1, 2))
        m = out.mask[v].expand_as(source)
        assert torch.equal(out.images[v][m], source[m])
        assert torch.equal(out.images[v][~m], views[v][~m])


def test_replacement_pastes_co_located_pixels_of_another_image() -> None:
    n = 1200
    views = _views(n, 2, 64)
    ids = torch.arange(n) // 2  # two views per image, adjacent
    cfg = MaskingConfig(corruptions=("noise",))
    out = corrupt(views, ids, cfg, _rnd(n))
    replaced = out.kind == REPLACE
    assert torch.equal(replaced, out.donor >= 0)
    idx = torch.nonzero(replaced).squeeze(1)
    assert len(idx) > 400
    donor = out.donor[idx]
    assert torch.all(ids[donor] != ids[idx])
    mask = out.mask[idx].expand(-1, 2, -1, -1)
    assert torch.equal(out.images[idx][mask], views[donor][mask])
    assert torch.all(out.target[idx] == torch.tensor(0.3))
    area = out.mask[idx].double().mean((1, 2, 3))
    assert area.min() >= 0.3 and area.mean() < 0.32
    print(f"replaced area: mean {area.mean():.4f} max {area.max():.4f} over {len(idx)} views")
    # Donors are spread over the batch, not one favourite view.
    assert len(torch.unique(donor)) > 0.5 * len(idx)


@pytest.mark.parametrize(
    "corruptions", [("noise",), ("noise", "zeros"), ("noise", "zeros", "copy")]
)
def test_replacement_frequency_is_one_over_k_plus_one(corruptions: tuple[str, ...]) -> None:
    n = 4000
    cfg = MaskingConfig(corruptions=corruptions)
    out = corrupt(_views(n, 1, 16), torch.arange(n), cfg, _rnd(n))
    k = len(corruptions)
    p = 1 / (k + 1)
    counts = torch.bincount(out.kind, minlength=len(KINDS))
    sigma = math.sqrt(n * p * (1 - p))
    assert abs(counts[REPLACE] - n * p) < 4 * sigma
    # The other views are split evenly among the configured corruption types.
    others = n - int(counts[REPLACE])
    for name in corruptions:
        q = 1 / k
        assert abs(counts[KINDS.index(name)] - others * q) <= 4 * math.sqrt(others * q * (1 - q))
    unused = [i for i, name in enumerate(KINDS[:REPLACE]) if name not in corruptions]
    assert counts[unused].sum() == 0


def test_single_image_batch_falls_back_to_normal_corruption() -> None:
    views = _views(400, 1, 32)
    out = corrupt(views, torch.zeros(400, dtype=torch.int64), MaskingConfig(), _rnd(400))
    assert torch.all(out.kind == NOISE) and torch.all(out.donor == -1)
    assert out.target.min() >= 0.5


def test_dtype_is_preserved_for_half_precision() -> None:
    views = _views(64, 1, 32).to(torch.bfloat16)
    cfg = MaskingConfig(corruptions=("noise", "zeros", "copy"))
    out = corrupt(views, torch.arange(64) // 2, cfg, _rnd(64))
    assert out.images.dtype == torch.bfloat16
    mask = out.mask.expand_as(views)
    assert torch.equal(out.images[~mask], views[~mask])
    zeros = out.mask & (out.kind == ZEROS)[:, None, None, None]
    assert torch.all(out.images[zeros] == 0)


# --- randomness ----------------------------------------------------------------------------


def _assert_same(a: Corrupted, b: Corrupted) -> None:
    for name in ("images", "mask", "kind", "target", "donor", "shift"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


def test_same_seed_and_step_reproduce_and_masks_differ_per_view_and_step() -> None:
    views = _views(300, 1, 32)
    ids = torch.arange(300) // 2
    cfg = MaskingConfig(corruptions=("noise", "zeros", "copy"))
    first = corrupt(views, ids, cfg, _rnd(300, seed=42, step=7))
    _assert_same(first, corrupt(views, ids, cfg, _rnd(300, seed=42, step=7)))
    # Nothing else feeds the draws: the global torch RNG does not matter.
    torch.manual_seed(1234)
    torch.rand(10)
    _assert_same(first, corrupt(views, ids, cfg, _rnd(300, seed=42, step=7)))
    next_step = corrupt(views, ids, cfg, _rnd(300, seed=42, step=8))
    assert (first.mask != next_step.mask).flatten(1).any(1).all()  # every view differs per step
    flat = first.mask.flatten(1)
    assert len(torch.unique(flat, dim=0)) == len(flat)  # all views of a step differ
    # The two views of one image get independent masks too.
    assert (flat[0::2] != flat[1::2]).any(1).all()
    other_seed = corrupt(views, ids, cfg, _rnd(300, seed=43, step=7))
    assert (first.mask != other_seed.mask).flatten(1).any(1).all()


def _split(rnd_args: dict[str, int], n_views: int, batch: int, processes: int) -> list[BatchRandom]:
    """The BatchRandom of each of ``processes`` processes holding ``batch / processes`` images."""
    per = batch // processes
    return [
        BatchRandom.for_views(
            **rnd_args, n_views=n_views, global_batch=batch, first_image=p * per, local_batch=per
        )
        for p in range(processes)
    ]


@pytest.mark.parametrize("local_ids", [False, True])
def test_two_process_split_equals_one_process(local_ids: bool) -> None:
    """Each process of a 2-process run corrupts its views exactly as one process would.

    One process holds the global batch of B images (2 views each, view-major) and restricts
    donors to blocks of B/2 images. Process p holds images p*B/2 .. (p+1)*B/2 - 1 and their
    views; its ids are either the global ones with the same donor_block, or - as under DDP,
    where make_views numbers a process's own images from 0 - local ones with donor_block None.
    """
    batch, n_views, size = 16, 2, 32
    views = _views(batch * n_views, 2, size, seed=3)
    ids = torch.arange(batch).repeat(n_views)
    cfg = MaskingConfig(corruptions=("noise", "zeros", "copy"), donor_block=batch // 2)
    seed_step = {"seed": 5, "step": 11}
    full_rnd = BatchRandom.for_views(
        **seed_step, n_views=n_views, global_batch=batch, first_image=0, local_batch=batch
    )
    assert torch.equal(full_rnd.index, torch.arange(batch * n_views))
    full = corrupt(views, ids, cfg, full_rnd)
    assert torch.equal(full.images, corrupt(views, ids, cfg, _rnd(32, seed=5, step=11)).images)
    for name in ("noise", "zeros", "copy", "replace"):  # every kind is exercised
        assert (full.kind == KINDS.index(name)).any(), name

    for p, rnd in enumerate(_split(seed_step, n_views, batch, 2)):
        idx = rnd.index  # global view of each local view
        assert torch.equal(idx[: batch // 2], torch.arange(batch // 2) + p * batch // 2)
        part_cfg = cfg
        part_ids = ids[idx]
        if local_ids:
            part_ids = part_ids - p * batch // 2
            part_cfg = MaskingConfig(corruptions=cfg.corruptions, donor_block=None)
        part = corrupt(views[idx], part_ids, part_cfg, rnd)
        for name in ("images", "mask", "kind", "target", "shift"):
            assert torch.equal(getattr(part, name), getattr(full, name)[idx]), name
        donor = torch.where(part.donor >= 0, idx[part.donor.clamp_min(0)], -1)
        assert torch.equal(donor, full.donor[idx])


def test_group_mask_rounds_do_not_depend_on_other_views() -> None:
    # Half 0 finishes in one round, half 1 needs several: the full batch runs extra rounds that
    # process 0 of a split never runs, and must still give process 0's views the same masks.
    n, size = 64, 32
    fractions = torch.cat([torch.full((n // 2,), 0.1), torch.full((n // 2,), 0.9)])
    cfg = MaskingConfig()
    full = sample_group_masks(n, size, size, fractions, cfg, _rnd(n, seed=2), "cpu")
    halves = [
        BatchRandom(2, 0, n, torch.arange(n // 2) + p * n // 2, torch.device("cpu"))
        for p in range(2)
    ]
    parts = [
        sample_group_masks(n // 2, size, size, fractions[r.index], cfg, r, "cpu") for r in halves
    ]
    assert parts[0].rounds == 1 and parts[1].rounds == full.rounds >= 2
    for r, part in zip(halves, parts, strict=True):
        assert torch.equal(part.mask, full.mask[r.index])
        assert torch.equal(part.used, full.used[r.index])


def test_donors_are_uniform_over_other_images_of_the_block() -> None:
    # 12 images, 2 views each, blocks of 4 images: view 0 (image 0) has 6 candidates, the
    # views of images 1-3; over many steps each is picked 1/6 of the time.
    ids = torch.arange(12).repeat(2)
    picks = []
    for step in range(3000):
        donor, has = _pick_donors(ids, 4, _rnd(24, step=step))
        assert has.all()
        assert torch.all(ids[donor] != ids) and torch.all(ids[donor] // 4 == ids // 4)
        picks.append(donor)
    chosen = torch.stack(picks)  # [steps, 24]
    candidates = torch.tensor([1, 2, 3, 13, 14, 15])
    assert set(torch.unique(chosen[:, 0]).tolist()) == set(candidates.tolist())
    counts = (chosen[:, 0, None] == candidates).sum(0).double()
    assert stats.chisquare(counts.numpy()).pvalue > 1e-4
    # Views of one image do not always pick the same donor in a step.
    assert (chosen[:, 0] != chosen[:, 12]).double().mean() > 0.7


def test_donor_block_of_one_image_disables_replacement() -> None:
    out = corrupt(
        _views(64, 1, 16), torch.arange(32).repeat(2), MaskingConfig(donor_block=1), _rnd(64)
    )
    assert torch.all(out.kind == NOISE) and torch.all(out.donor == -1)


class _CountOps(TorchDispatchMode):
    """Counts the tensor operations (kernel launches on a GPU) run inside the context."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(
        self,
        func: Callable[..., Any],
        types: Sequence[type],
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        self.ops += 1
        return func(*args, **(kwargs or {}))


def test_operation_count_does_not_grow_with_batch_size() -> None:
    # Targets small enough for one rasterisation round at both batch sizes.
    cfg = MaskingConfig(max_fraction=0.3, replace_fraction=0.2, corruptions=("noise", "copy"))
    counts = []
    for n in (16, 1024):
        views = _views(n, 1, 32)
        with _CountOps() as counter:
            out = corrupt(views, torch.arange(n) // 2, cfg, _rnd(n))
        assert out.mask.any((1, 2, 3)).all()
        counts.append(counter.ops)
    assert counts[0] == counts[1] and counts[0] < 400


# --- errors and devices --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_fraction": 0.0}, "max_fraction"),
        ({"max_fraction": 1.5}, "max_fraction"),
        ({"max_block": 0.0}, "max_block"),
        ({"align": 0}, "align"),
        ({"corruptions": ()}, "corruptions"),
        ({"corruptions": ("blur",)}, "blur"),
        ({"corruptions": ("noise", "noise")}, "duplicates"),
        ({"replace_fraction": 0.0}, "replace_fraction"),
        ({"noise_std": -1.0}, "noise_std"),
        ({"donor_block": 0}, "donor_block"),
        ({"donor_block": 2.0}, "donor_block"),
    ],
)
def test_bad_config_is_rejected(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        MaskingConfig(**kwargs)


def test_bad_inputs_are_rejected() -> None:
    cfg = MaskingConfig(align=16)
    with pytest.raises(ValueError, match="smaller than one align cell"):
        group_mask(2, 8, 32, torch.full((2,), 0.5), cfg, _rnd(2), "cpu")
    with pytest.raises(ValueError, match=r"lie in \[0, 1\]"):
        group_mask(2, 32, 32, torch.tensor([0.5, 1.2]), cfg, _rnd(2), "cpu")
    with pytest.raises(ValueError, match="shape"):
        group_mask(3, 32, 32, torch.full((2,), 0.5), cfg, _rnd(3), "cpu")
    with pytest.raises(ValueError, match="whole 16-pixel cells"):  # 40 px = 2 cells + 8 px
        group_mask(1, 40, 40, torch.tensor([0.9]), cfg, _rnd(1), "cpu")
    with pytest.raises(ValueError, match="draws for 3 views, but there are 2"):
        group_mask(2, 32, 32, torch.full((2,), 0.5), cfg, _rnd(3), "cpu")
    with pytest.raises(ValueError, match="floating"):
        corrupt(torch.zeros(2, 1, 32, 32, dtype=torch.uint8), torch.arange(2), cfg, _rnd(2))
    with pytest.raises(ValueError, match="image_ids"):
        corrupt(torch.zeros(2, 1, 32, 32), torch.arange(3), cfg, _rnd(2))
    with pytest.raises(ValueError, match="draws for 4 views, but there are 2"):
        corrupt(torch.zeros(2, 1, 32, 32), torch.arange(2), cfg, _rnd(4))
    with pytest.raises(ValueError, match="draws on meta but the data is on cpu"):
        corrupt(torch.zeros(2, 1, 32, 32), torch.arange(2), cfg, _rnd(2, device="meta"))
    with pytest.raises(TypeError, match="BatchRandom, got Generator"):
        corrupt(torch.zeros(2, 1, 32, 32), torch.arange(2), cfg, _gen())  # type: ignore[arg-type]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_runs_on_cuda_reproducibly_and_like_the_cpu() -> None:
    views = _views(256, 1, 64)
    ids = torch.arange(256) // 2
    cfg = MaskingConfig(corruptions=("noise", "zeros", "copy"))
    a = corrupt(views.cuda(), ids.cuda(), cfg, _rnd(256, device="cuda"))
    b = corrupt(views.cuda(), ids.cuda(), cfg, _rnd(256, device="cuda"))
    _assert_same(a, b)
    assert a.images.device.type == "cuda" and a.mask.device.type == "cuda"
    mask = a.mask.expand_as(a.images)
    assert torch.equal(a.images[~mask], views.cuda()[~mask])
    assert torch.all(a.mask.double().mean((1, 2, 3)) >= a.target.double())
    # Same draws on both devices: identical masks and parameters; the hashed noise agrees up
    # to float rounding of log/cos/sin.
    cpu = corrupt(views, ids, cfg, _rnd(256))
    for name in ("mask", "kind", "target", "donor", "shift"):
        assert torch.equal(getattr(a, name).cpu(), getattr(cpu, name)), name
    assert torch.allclose(a.images.cpu(), cpu.images, atol=1e-5)
    with pytest.raises(ValueError, match="draws on cpu"):
        corrupt(views.cuda(), ids.cuda(), cfg, _rnd(256))
