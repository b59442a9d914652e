"""GMML group masking and corruption, batched on the training device.

GMML (Atito, Awais, Kittler, "GMML is all you need", ICIP 2023), as used by SPCXR (Anwar et al.,
arXiv 2211.12944), corrupts groups of connected pixels - random axis-aligned rectangles - of each
view and trains the network to reconstruct them. The reference code adds one rectangle at a time
in a Python loop per image; here a whole batch is masked with a fixed number of tensor operations
per round, on the views' device. Every draw comes from a :class:`~spcxr.rng.BatchRandom`, so a
view's corruption depends only on ``(seed, step, stream, global view index)``: the same on 1 or N
processes and after a resume. The per-view process (defaults = the reference) and how the number
of rectangles is found without a loop are described in ``docs/internals.md``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from spcxr.rng import BatchRandom

KINDS: tuple[str, ...] = ("noise", "zeros", "copy", "replace")
"""Corruption kinds; :attr:`Corrupted.kind` indexes into this tuple."""

NOISE, ZEROS, COPY, REPLACE = range(len(KINDS))

# Rectangles per rasterisation round: bits 0..61 of an int64 mark rectangles, bit 62 is a
# sentinel meaning "no rectangle of this round covers the pixel" (bit 63 is the sign bit,
# left alone so that negation stays well defined).
_RECTS_PER_ROUND = 62
_SENTINEL = _RECTS_PER_ROUND
# Guard against a config that can never be satisfied in reasonable time (e.g. a target of 1.0
# needs every corner pixel covered, which takes ~H*W rectangles).
_MAX_ROUNDS = 1024


@dataclass
class MaskingConfig:
    """Settings of GMML group masking and corruption (defaults: the GMML reference code).

    Attributes:
        max_fraction: ``p``; the per-view target fraction is drawn from ``U(min(0.5, p), p)``
            (reference ``drop_perc`` / ``max_replace``, default 0.75 in SPCXR). Targets close
            to 1 are slow: the last uncovered pixels (corners) are rarely hit by a block.
        max_block: block height and width are below ``max_block * side`` (reference
            ``max_block_sz = 0.3``).
        align: grid, in pixels, that rectangle corners and sizes snap to. 1 gives pixel-level
            blocks (reference default for corruption); 16 gives patch-aligned blocks of 1-4
            patches per side at 224 px.
        corruptions: corruption types, one drawn uniformly per view: any of "noise", "zeros",
            "copy" (reference ``drop_type``, default "noise").
        replace_fraction: area covered by the mask of a replaced view, drawn as a group mask
            whose target is exactly this fraction.
        replace: enable replacement from another image, with probability ``1 / (k + 1)`` where
            ``k = len(corruptions)`` (reference ``GMML_replace_list``).
        noise_std: standard deviation of the "noise" corruption, in normalised intensity space
            (reference: ``normal_()``, i.e. 1).
        donor_block: replacement donors are drawn only among views whose image id is in the
            same block ``image_id // donor_block`` (and differs from the view's own). ``None``:
            the whole batch given to :func:`corrupt` - under DistributedDataParallel each
            process's own batch, since a process only holds its own images. A one-process run
            that must reproduce an ``N``-process run exactly uses ``donor_block`` = images per
            process, with global image ids (the reference draws donors from its loader batch).
    """

    max_fraction: float = 0.75
    max_block: float = 0.3
    align: int = 1
    corruptions: tuple[str, ...] = ("noise",)
    replace_fraction: float = 0.3
    replace: bool = True
    noise_std: float = 1.0
    donor_block: int | None = None

    def __post_init__(self) -> None:
        self.corruptions = tuple(self.corruptions)
        if not 0.0 < self.max_fraction <= 1.0:
            raise ValueError(
                f"MaskingConfig.max_fraction must be in (0, 1], got {self.max_fraction}"
            )
        if not 0.0 < self.max_block <= 1.0:
            raise ValueError(f"MaskingConfig.max_block must be in (0, 1], got {self.max_block}")
        if isinstance(self.align, bool) or not isinstance(self.align, int) or self.align < 1:
            raise ValueError(f"MaskingConfig.align must be an integer >= 1, got {self.align!r}")
        if not self.corruptions:
            raise ValueError("MaskingConfig.corruptions must name at least one corruption type")
        unknown = [c for c in self.corruptions if c not in KINDS[:REPLACE]]
        if unknown:
            raise ValueError(
                f"MaskingConfig.corruptions: unknown type(s) {unknown}; "
                f"choose from {list(KINDS[:REPLACE])}"
            )
        if len(set(self.corruptions)) != len(self.corruptions):
            raise ValueError(f"MaskingConfig.corruptions has duplicates: {self.corruptions}")
        if not 0.0 < self.replace_fraction <= 1.0:
            raise ValueError(
                f"MaskingConfig.replace_fraction must be in (0, 1], got {self.replace_fraction}"
            )
        if self.noise_std < 0:
            raise ValueError(f"MaskingConfig.noise_std must be >= 0, got {self.noise_std}")
        block = self.donor_block
        if block is not None and (
            isinstance(block, bool) or not isinstance(block, int) or block < 1
        ):
            raise ValueError(
                f"MaskingConfig.donor_block must be None or an integer >= 1, got {block!r}"
            )


@dataclass
class Corrupted:
    """A batch of corrupted views and what was done to them.

    Attributes:
        images: ``[V, C, H, W]`` corrupted views (same dtype/device as the input).
        mask: ``[V, 1, H, W]`` bool, the pixels that were corrupted or replaced; the
            reconstruction loss is scored there.
        kind: ``[V]`` int64 index into :data:`KINDS`.
        target: ``[V]`` float32 target fraction ``a`` (``replace_fraction`` for replaced views).
        donor: ``[V]`` int64 index (in the batch given to :func:`corrupt`) of the view whose
            pixels were pasted (``kind == replace``), -1 elsewhere. Always set by :func:`corrupt`.
        shift: ``[V, 2]`` int64 ``(dy, dx)`` offset of the "copy" corruption, zeros elsewhere.
            Always set by :func:`corrupt`.
    """

    images: Tensor
    mask: Tensor
    kind: Tensor
    target: Tensor
    donor: Tensor | None = field(default=None)
    shift: Tensor | None = field(default=None)


@dataclass
class GroupMasks:
    """Group masks together with the rectangles they were built from (for tests and plots).

    Attributes:
        mask: ``[n, H, W]`` bool, union of the first ``used[v]`` rectangles of view ``v``.
        rects: ``[n, R, 4]`` int64 ``(top, left, height, width)`` in pixels, clipped to the
            image and snapped to the ``align`` grid. Entries at index ``>= used[v]`` were drawn
            but not used (or are all-zero padding for views that finished early).
        used: ``[n]`` int64, the number ``K`` of rectangles in each mask.
        rounds: number of rasterisation rounds that were needed.
    """

    mask: Tensor
    rects: Tensor
    used: Tensor
    rounds: int


def block_cells(side: int, cfg: MaskingConfig) -> int:
    """Largest block side, in ``align`` cells, for an image side of ``side`` pixels.

    Block sides are multiples of ``align`` in ``[align, max_block * side)``, i.e. ``k * align``
    for ``k = 1 .. ceil(max_block * side / align) - 1``. When ``max_block * side <= align`` (tiny
    images, coarse grids) no multiple fits and single cells (``k = 1``) are used.
    """
    return max(1, math.ceil(cfg.max_block * side / cfg.align) - 1)


def sample_rectangles(
    count: int,
    height: int,
    width: int,
    cfg: MaskingConfig,
    rnd: BatchRandom,
    stream: str = "mask/rect/round0",
) -> Tensor:
    """Draws ``count`` independent rectangles per view (``rnd.count`` views), in ``align`` cells.

    The top-left cell is uniform over the ``H // align`` x ``W // align`` grid; the height and
    width are uniform over ``1 .. block_cells(side)`` cells, then clipped to the grid. This is
    the reference's ``GMML_drop_rand_patches`` block with two deliberate differences: the
    reference's ``randint(0, H - align)`` never picks the last grid row/column (exclusive upper
    bound) and its ``round(h / align) * align`` can exceed ``max_block * side``; here every grid
    cell can be a corner and every side is a multiple of ``align`` below ``max_block * side``.
    Pixels beyond the last whole cell (when ``align`` does not divide the side) are never
    covered. Round ``r`` of :func:`sample_group_masks` with ``stream=s`` uses the rectangles of
    ``sample_rectangles(62, ..., stream=f"{s}/round{r}")`` of its unfinished views.

    Args:
        count: rectangles per view.
        height: image height in pixels.
        width: image width in pixels.
        cfg: masking settings (``align``, ``max_block``).
        rnd: the step's random draws; one row of ``[count, 4]`` uniforms per view.
        stream: name of the random stream.

    Returns:
        ``[rnd.count, count, 4]`` int64 ``(top, left, height, width)`` in grid cells, on
        ``rnd.device``.
    """
    return rectangles_from_uniforms(
        rnd.rand(stream, count, 4, dtype=torch.float64), height, width, cfg
    )


def rectangles_from_uniforms(u: Tensor, height: int, width: int, cfg: MaskingConfig) -> Tensor:
    """Maps ``[..., 4]`` float64 uniforms in [0, 1) to rectangles (see :func:`sample_rectangles`).

    ``floor(u * k)`` is uniform over ``0 .. k - 1`` (up to float64 resolution, 2**-53); the clamp
    only guards against a product rounding up to ``k``.

    Returns:
        ``[..., 4]`` int64 ``(top, left, height, width)`` in grid cells.
    """
    hg, wg = height // cfg.align, width // cfg.align
    kh, kw = block_cells(height, cfg), block_cells(width, cfg)
    u_top, u_left, u_h, u_w = u.unbind(-1)
    top = _uniform_int(u_top, hg)
    left = _uniform_int(u_left, wg)
    h = torch.minimum(1 + _uniform_int(u_h, kh), hg - top)
    w = torch.minimum(1 + _uniform_int(u_w, kw), wg - left)
    return torch.stack([top, left, h, w], dim=-1)


def _uniform_int(u: Tensor, k: int) -> Tensor:
    """Uniforms in [0, 1) -> int64 uniform over ``0 .. k - 1``."""
    return torch.floor(u * k).long().clamp_max(k - 1)


def first_cover(rects: Tensor, height: int, width: int) -> Tensor:
    """Index of the first rectangle covering each cell, for up to 62 rectangles per view.

    Args:
        rects: ``[n, R, 4]`` int64 ``(top, left, height, width)``, ``R <= 62``.
        height: grid height.
        width: grid width.

    Returns:
        ``[n, height, width]`` int32 in ``[0, R)``, or 62 where no rectangle covers the cell.
    """
    count = rects.shape[1]
    if count > _RECTS_PER_ROUND:
        raise ValueError(f"first_cover handles at most {_RECTS_PER_ROUND} rectangles, got {count}")
    device = rects.device
    bits = torch.ones(count, dtype=torch.int64, device=device) << torch.arange(count, device=device)
    top, left, h, w = rects.unbind(-1)  # [n, R] each
    ys = torch.arange(height, device=device)[None, :, None]  # [1, H, 1]
    xs = torch.arange(width, device=device)[None, :, None]  # [1, W, 1]
    rows = (ys >= top[:, None, :]) & (ys < (top + h)[:, None, :])  # [n, H, R]
    cols = (xs >= left[:, None, :]) & (xs < (left + w)[:, None, :])  # [n, W, R]
    # Distinct powers of two: the sum is the bitwise OR. The sentinel bit is set in every row
    # and column, so it survives the AND and marks cells that no rectangle covers.
    row_bits = (rows * bits).sum(-1) | (1 << _SENTINEL)  # [n, H]
    col_bits = (cols * bits).sum(-1) | (1 << _SENTINEL)  # [n, W]
    covering = row_bits[:, :, None] & col_bits[:, None, :]  # [n, H, W]
    return _lowest_set_bit(covering)


def _lowest_set_bit(words: Tensor) -> Tensor:
    """Index (int32) of the lowest set bit of nonzero int64 words below 2**63."""
    lowest = words.neg()
    lowest &= words  # a single power of two, 2**0 .. 2**62
    # Powers of two convert to float32 exactly; the biased exponent field is then the bit index.
    index = lowest.to(torch.float32).view(torch.int32)
    index >>= 23
    index -= 127
    return index


def sample_group_masks(
    n: int,
    height: int,
    width: int,
    fractions: Tensor,
    cfg: MaskingConfig,
    rnd: BatchRandom,
    device: torch.device | str,
    stream: str = "mask/rect",
) -> GroupMasks:
    """Group masks with exact minimal rectangle counts, plus the rectangles used.

    See the module docstring for the method. Args as in :func:`group_mask`.
    """
    device = torch.device(device)
    _check_rnd(rnd, n, device, "group_mask")
    fractions = fractions.to(device=device)
    _check_fractions(n, height, width, fractions, cfg.align)
    align = cfg.align
    hg, wg = height // align, width // align
    cell = align * align
    # Stop rule of the reference: add rectangles while covered pixels < a * H * W.
    need = torch.ceil(fractions.double() * (height * width)).long()  # [n] pixels
    covered = torch.zeros(n, hg, wg, dtype=torch.bool, device=device)
    n_covered = torch.zeros(n, dtype=torch.int64, device=device)  # pixels
    used = torch.zeros(n, dtype=torch.int64, device=device)
    rect_rounds: list[Tensor] = []
    active = torch.nonzero(need > 0).squeeze(1)  # views still below their target
    while active.numel() > 0:
        if len(rect_rounds) >= _MAX_ROUNDS:
            raise RuntimeError(
                f"group_mask: targets not reached after {_MAX_ROUNDS * _RECTS_PER_ROUND} "
                "rectangles; lower MaskingConfig.max_fraction"
            )
        # Every view's uniforms of this round are drawn; only the unfinished views' rows are used.
        u = rnd.rand(f"{stream}/round{len(rect_rounds)}", _RECTS_PER_ROUND, 4, dtype=torch.float64)
        rects = rectangles_from_uniforms(u[active], height, width, cfg)  # [a, 62, 4]
        first = first_cover(rects, hg, wg)  # [a, hg, wg]
        prev = covered[active] if rect_rounds else None
        if prev is not None:  # count only cells that earlier rounds left uncovered
            first.masked_fill_(prev, _SENTINEL)
        # area[:, k] = pixels covered by all earlier rounds + the first k+1 rectangles here.
        area = n_covered[active, None] + _first_cover_counts(first).cumsum(1) * cell  # [a, R]
        short = (area < need[active, None]).sum(1)  # rectangles that leave the view short
        done = short < _RECTS_PER_ROUND
        take = torch.where(done, short + 1, _RECTS_PER_ROUND)  # rectangles used this round
        newly = first < take[:, None, None].to(torch.int32)
        covered[active] = newly if prev is None else prev | newly
        n_covered[active] = area.gather(1, (take - 1)[:, None]).squeeze(1)
        used[active] += take
        padded = torch.zeros(n, _RECTS_PER_ROUND, 4, dtype=torch.int64, device=device)
        padded[active] = rects
        rect_rounds.append(padded)
        active = active[~done]

    if rect_rounds:
        rects_px = torch.cat(rect_rounds, dim=1) * align
    else:
        rects_px = torch.zeros(n, 0, 4, dtype=torch.int64, device=device)
    return GroupMasks(
        mask=_expand_cells(covered, height, width, align),
        rects=rects_px,
        used=used,
        rounds=len(rect_rounds),
    )


def _check_fractions(n: int, height: int, width: int, fractions: Tensor, align: int) -> None:
    """Raises unless ``fractions`` is ``[n]`` and every target is reachable on the cell grid."""
    if height < align or width < align:
        raise ValueError(
            f"group_mask: image {height}x{width} is smaller than one align cell ({align} px)"
        )
    if fractions.shape != (n,):
        raise ValueError(
            f"group_mask: fractions must have shape [{n}], got {list(fractions.shape)}"
        )
    if bool(((fractions < 0) | (fractions > 1)).any()):
        raise ValueError("group_mask: fractions must lie in [0, 1]")
    reachable = (height // align) * (width // align) * align * align / (height * width)
    if bool((fractions > reachable).any()):
        raise ValueError(
            f"group_mask: a target fraction exceeds {reachable:.3f}, the part of a "
            f"{height}x{width} image that whole {align}-pixel cells cover"
        )


def _first_cover_counts(first: Tensor) -> Tensor:
    """``[n, H, W]`` first-cover indices -> ``[n, 62]`` cells per first index (one bincount)."""
    n = first.shape[0]
    bins = _SENTINEL + 1
    offsets = torch.arange(n, device=first.device, dtype=torch.int32) * bins
    hist = torch.bincount((first + offsets[:, None, None]).flatten(), minlength=n * bins)
    return hist.view(n, bins)[:, :_SENTINEL]


def group_mask(
    n: int,
    height: int,
    width: int,
    fractions: Tensor,
    cfg: MaskingConfig,
    rnd: BatchRandom,
    device: torch.device | str,
    stream: str = "mask/rect",
) -> Tensor:
    """GMML group masks for a batch: unions of random rectangles reaching a target area.

    For view ``v`` rectangles are drawn (see :func:`sample_rectangles`) until their union covers
    at least ``fractions[v] * height * width`` pixels; the mask is that union. ``cfg.max_fraction``
    is not used here (the caller draws the fractions). With ``align > 1`` and a side that is not
    a multiple of ``align``, the strip beyond the last whole cell is never masked.

    Args:
        n: number of views.
        height: image height in pixels.
        width: image width in pixels.
        fractions: ``[n]`` target fractions in ``[0, 1]``.
        cfg: masking settings (``align``, ``max_block``).
        rnd: the step's random draws for these ``n`` views (``rnd.count == n``, on ``device``).
        device: device of the result.
        stream: prefix of the random streams; round ``r`` of rectangles uses
            ``f"{stream}/round{r}"``.

    Returns:
        ``[n, height, width]`` bool masks.
    """
    return sample_group_masks(n, height, width, fractions, cfg, rnd, device, stream).mask


def corrupt(views: Tensor, image_ids: Tensor, cfg: MaskingConfig, rnd: BatchRandom) -> Corrupted:
    """Group-masks and corrupts a batch of views (GMML), all views at once.

    Per view: target ``a ~ U(min(0.5, p), p)``, one corruption type uniform over
    ``cfg.corruptions``, and - if ``cfg.replace`` - replacement with probability
    ``1 / (len(corruptions) + 1)``. The corruptions, on the masked pixels only:

    - ``noise``: ``N(0, noise_std)`` per pixel and channel from a counter-based hash of
      (view, element) (:meth:`BatchRandom.normal`: computed on the device for this process's
      views only; tails cut at about 5.7 standard deviations).
    - ``zeros``: 0.
    - ``copy``: the same (clean) view circularly shifted by a per-view offset ``(dy, dx)``:
      ``out[c, y, x] = views[v, c, (y + dy) % H, (x + dx) % W]`` (``torch.roll(view, (-dy,
      -dx))``). ``dy`` and ``dx`` are multiples of ``align`` drawn uniformly from
      ``[m, side - m]`` cells with ``m = min(block_cells(side), cells // 2)``, so (unless the
      image is under two blocks wide) a block is never copied from a region overlapping
      itself, even across the wrap-around. The reference copies each block from an
      independent random location of the partly corrupted image; one offset per view from
      the clean view gives the same "plausible anatomy in the wrong place" with one gather.
    - ``replace``: a new group mask with target exactly ``replace_fraction``, filled with the
      co-located pixels of the clean view ``donor[v]``, drawn uniformly among the views whose
      ``image_ids`` differ from ``image_ids[v]`` and lie in its ``cfg.donor_block`` (the
      reference draws any index of the batch, the view itself included): the candidate with
      the largest :meth:`BatchRandom.pair_rand` score, which depends only on the two views'
      global indices. A view with no such donor (all candidates share its image) keeps its
      normal corruption.

    Args:
        views: ``[V, C, H, W]`` floating-point views, normalised.
        image_ids: ``[V]`` integer id of the source image of each view (views of one image
            share an id).
        cfg: masking settings.
        rnd: the step's random draws for these views (``rnd.count == V``, on ``views.device``);
            row ``k`` of every draw belongs to view ``k``.

    Returns:
        The corrupted views, masks, kinds, targets, donors and copy offsets.
    """
    if views.dim() != 4 or not views.is_floating_point():
        raise ValueError(
            f"corrupt: views must be a floating [V, C, H, W] tensor, got {views.dtype} "
            f"of shape {list(views.shape)}"
        )
    n, _, height, width = views.shape
    device = views.device
    _check_rnd(rnd, n, device, "corrupt")
    if image_ids.shape != (n,):
        raise ValueError(f"corrupt: image_ids must have shape [{n}], got {list(image_ids.shape)}")
    image_ids = image_ids.to(device)

    low = min(0.5, cfg.max_fraction)
    target = low + (cfg.max_fraction - low) * rnd.rand("mask/target")
    allowed = torch.tensor([KINDS.index(c) for c in cfg.corruptions], device=device)
    kind = allowed[rnd.randint("mask/kind", 0, len(allowed))]
    donor = torch.full((n,), -1, dtype=torch.int64, device=device)
    if cfg.replace:
        candidate, has_donor = _pick_donors(image_ids, cfg.donor_block, rnd)
        u = rnd.rand("mask/replace")
        replaced = (u < 1.0 / (len(allowed) + 1)) & has_donor
        kind = torch.where(replaced, REPLACE, kind)
        target = torch.where(replaced, cfg.replace_fraction, target)
        donor = torch.where(replaced, candidate, donor)

    mask = group_mask(n, height, width, target, cfg, rnd, device, "mask/rect")[:, None]
    shift = _copy_shifts(height, width, cfg, rnd) * (kind == COPY)[:, None]  # [V, 2]
    images = torch.where(mask, _fill_values(views, kind, donor, shift, cfg, rnd), views)
    return Corrupted(images=images, mask=mask, kind=kind, target=target, donor=donor, shift=shift)


def _fill_values(
    views: Tensor,
    kind: Tensor,
    donor: Tensor,
    shift: Tensor,
    cfg: MaskingConfig,
    rnd: BatchRandom,
) -> Tensor:
    """``[V, C, H, W]`` corrupted values for every pixel; the caller keeps the masked ones.

    Only the values the config can produce are computed (a static choice), and "copy" and
    "replace" share one gather: both read the clean batch at (view, row, column) indices,
    ``(v, y + dy, x + dx)`` for a copy and ``(donor, y, x)`` for a replacement.

    Noise is computed for the "noise" views only (one host sync, ``torch.nonzero``): each row
    of :meth:`BatchRandom.normal` is a hash of its view's global index, so a ``BatchRandom``
    restricted to those views yields exactly their rows of ``rnd.normal("mask/noise", ...)``.
    The hash costs 2-3x ``torch.randn`` on a CPU, and half or fewer of the views are noise
    views (a quarter with the three corruption types).
    """
    per_view = kind[:, None, None, None]
    fill = torch.zeros_like(views)  # the "zeros" corruption, and what the others overwrite
    if "noise" in cfg.corruptions:
        noisy = torch.nonzero(kind == NOISE).squeeze(1)
        if noisy.numel() > 0:
            rows = dataclasses.replace(rnd, index=rnd.index[noisy.cpu()])
            noise = rows.normal("mask/noise", *views.shape[1:])  # float32 [n, C, H, W]
            if cfg.noise_std != 1.0:
                noise.mul_(cfg.noise_std)
            fill[noisy] = noise.to(views.dtype)
    if "copy" in cfg.corruptions or cfg.replace:
        own = torch.arange(views.shape[0], device=views.device)
        source = torch.where(kind == REPLACE, donor, own)
        gathered = _gather_views(views, source, shift)
        fill = torch.where((per_view == COPY) | (per_view == REPLACE), gathered, fill)
    return fill


def _pick_donors(
    image_ids: Tensor, donor_block: int | None, rnd: BatchRandom
) -> tuple[Tensor, Tensor]:
    """A uniformly random view of another image (in the same block) for every view.

    The donor is the argmax of the pair scores ``rnd.pair_rand("mask/donor")`` over the
    candidates. A score depends only on the two views' global indices, and local order follows
    global order, so a process holding part of the batch picks the same (global) donor, ties
    included, as one process holding all of it with the same candidates.

    Returns:
        ``[V]`` int64 donor indices and ``[V]`` bool "a donor exists".
    """
    other = image_ids[:, None] != image_ids[None, :]  # [V, V]
    if donor_block is not None:
        block = torch.div(image_ids, donor_block, rounding_mode="floor")
        other &= block[:, None] == block[None, :]
    scores = rnd.pair_rand("mask/donor")  # [V, V] in (0, 1)
    scores = scores.masked_fill(~other, -1.0)  # never picked while any candidate exists
    return scores.argmax(1), other.any(1)


def _copy_shifts(height: int, width: int, cfg: MaskingConfig, rnd: BatchRandom) -> Tensor:
    """Per-view ``(dy, dx)`` offsets of the "copy" corruption, in pixels (see :func:`corrupt`)."""
    u = rnd.rand("mask/shift", 2, dtype=torch.float64)  # [V, 2]
    offsets = []
    for axis, side in enumerate((height, width)):
        cells = side // cfg.align
        margin = min(block_cells(side, cfg), cells // 2)
        d = margin + _uniform_int(u[:, axis], cells - 2 * margin + 1)  # uniform on [m, cells - m]
        offsets.append((d % cells) * cfg.align)
    return torch.stack(offsets, dim=1)  # [V, 2]


def _gather_views(views: Tensor, source: Tensor, shift: Tensor) -> Tensor:
    """``out[v, c, y, x] = views[source[v], c, (y + dy_v) % H, (x + dx_v) % W]``, one gather."""
    _, channels, height, width = views.shape
    device = views.device
    rows = (torch.arange(height, device=device) + shift[:, :1]) % height  # [V, H]
    cols = (torch.arange(width, device=device) + shift[:, 1:]) % width  # [V, W]
    v = source[:, None, None, None]
    c = torch.arange(channels, device=device)[None, :, None, None]
    return views[v, c, rows[:, None, :, None], cols[:, None, None, :]]


def _expand_cells(cells: Tensor, height: int, width: int, align: int) -> Tensor:
    """``[n, hg, wg]`` cell mask -> ``[n, height, width]`` pixel mask (uncovered remainder)."""
    if align == 1:
        return cells
    n, hg, wg = cells.shape
    pixels = cells[:, :, None, :, None].expand(n, hg, align, wg, align).reshape(n, hg * align, -1)
    if pixels.shape[1:] == (height, width):
        return pixels
    out = torch.zeros(n, height, width, dtype=torch.bool, device=cells.device)
    out[:, : hg * align, : wg * align] = pixels
    return out


def _check_rnd(rnd: BatchRandom, n: int, device: torch.device, where: str) -> None:
    """Raises unless ``rnd`` draws for exactly ``n`` views on ``device``."""
    if not isinstance(rnd, BatchRandom):
        raise TypeError(f"{where}: expected a spcxr.rng.BatchRandom, got {type(rnd).__name__}")
    if rnd.count != n:
        raise ValueError(f"{where}: the BatchRandom draws for {rnd.count} views, but there are {n}")
    same_index = (
        rnd.device.index is None or device.index is None or rnd.device.index == device.index
    )
    if rnd.device.type != device.type or not same_index:
        raise ValueError(
            f"{where}: the BatchRandom draws on {rnd.device} but the data is on {device}; "
            "build it with device= the data's device"
        )
